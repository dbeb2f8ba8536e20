"""swaglora: SWAG and MultiSWAG posteriors over LoRA adapters of causal LLMs."""

__version__ = "0.1.0"

from .params import trainable_parameters, use_params  # noqa: E402
from .posterior import MAP, SWAG, Ensemble, Laplace, MCDropout, Posterior, SWAGDiag, get_method, load_posterior, method_names  # noqa: E402

__all__ = [
    "__version__",
    "Posterior",
    "MAP",
    "SWAG",
    "SWAGDiag",
    "Ensemble",
    "Laplace",
    "MCDropout",
    "get_method",
    "load_posterior",
    "method_names",
    "trainable_parameters",
    "use_params",
]
