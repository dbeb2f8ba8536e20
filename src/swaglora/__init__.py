"""swaglora: SWAG and MultiSWAG posteriors over LoRA adapters of causal LLMs."""

from ._version import __version__
from .params import trainable_parameters, use_params
from .posterior import MAP, SWAG, Ensemble, Laplace, MCDropout, Posterior, SWAGDiag, get_method, load_posterior, method_names



def __getattr__(name: str):
    """Import on first use what pulls in transformers (seconds), so ``import swaglora`` stays fast."""
    if name == "SWAGCallback":
        from .callbacks import SWAGCallback

        return SWAGCallback
    if name == "load":
        from .predictor import load

        return load
    if name == "bma":
        from .predict import bma

        return bma
    raise AttributeError(f"module 'swaglora' has no attribute {name!r}")


__all__ = [
    "__version__",
    "SWAGCallback",
    "bma",
    "load",
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
