"""Posteriors over a model's trainable (e.g. LoRA) parameters, and their registry.

Usable from any training loop::

    posterior = SWAG(model, max_rank=20)
    ...  # train; every few steps after burn-in:
    posterior.collect(model)
    posterior.save("out/swag", metadata={"base_model": "..."})

    for theta in posterior.draws(16, torch.Generator().manual_seed(0)):
        with use_params(model, theta):  # from swaglora.params
            ...  # predict, then average the probabilities
"""

from __future__ import annotations

from swaglora.posterior.base import (
    CONFIG_NAME,
    FORMAT_VERSION,
    TENSORS_NAME,
    Posterior,
    Row,
    load_posterior,
)
from swaglora.posterior.blob import BLoB
from swaglora.posterior.dropout import MCDropout
from swaglora.posterior.ensemble import Ensemble
from swaglora.posterior.laplace import Laplace
from swaglora.posterior.map import MAP
from swaglora.posterior.matched import MatchedMAP
from swaglora.posterior.swag import SWAG, SWAGDiag, SWAGState
from swaglora.posterior.tfb import TFB, TFBOnBLoB

from swaglora.posterior.registry import (
    METHODS,
    ROWS,
    UnknownMethodError,
    base_rows,
    default_rows,
    expand_rows,
    get_method,
    method_names,
    reference_row,
    register,
    row,
    row_names,
    rows,
)

for _cls in (MAP, MatchedMAP, SWAG, SWAGDiag, Ensemble, MCDropout, Laplace, BLoB, TFB, TFBOnBLoB):
    register(_cls)
del _cls

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "METHODS",
    "BLoB",
    "TENSORS_NAME",
    "MAP",
    "MatchedMAP",
    "SWAG",
    "SWAGDiag",
    "SWAGState",
    "TFB",
    "TFBOnBLoB",
    "Ensemble",
    "Laplace",
    "MCDropout",
    "Posterior",
    "ROWS",
    "Row",
    "base_rows",
    "default_rows",
    "expand_rows",
    "reference_row",
    "row",
    "row_names",
    "rows",
    "UnknownMethodError",
    "get_method",
    "load_posterior",
    "method_names",
    "register",
]
