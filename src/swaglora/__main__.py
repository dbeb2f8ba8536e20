"""``python -m swaglora`` (also ``accelerate launch -m swaglora``)."""

import sys

from .cli import main

sys.exit(main())
