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
    load_posterior,
)
from swaglora.posterior.dropout import MCDropout
from swaglora.posterior.ensemble import Ensemble
from swaglora.posterior.laplace import Laplace
from swaglora.posterior.map import MAP
from swaglora.posterior.swag import SWAG, SWAGDiag, SWAGState

METHODS: dict[str, type[Posterior]] = {}


class UnknownMethodError(KeyError, ValueError):
    """Raised by :func:`get_method`; a KeyError and a ValueError, with a readable message."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: type[Posterior]) -> type[Posterior]:
    """Add a Posterior subclass under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Posterior)):
        raise TypeError(f"register() expects a Posterior subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no 'name' to register under")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
    METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[Posterior]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"Unknown method {name!r}. Available: {', '.join(method_names())}") from None


for _cls in (MAP, SWAG, SWAGDiag, Ensemble, MCDropout, Laplace):
    register(_cls)
del _cls

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "METHODS",
    "TENSORS_NAME",
    "MAP",
    "SWAG",
    "SWAGDiag",
    "SWAGState",
    "Ensemble",
    "Laplace",
    "MCDropout",
    "Posterior",
    "UnknownMethodError",
    "get_method",
    "load_posterior",
    "method_names",
    "register",
]
