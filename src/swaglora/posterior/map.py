"""MAP: a point mass at the fine-tuned weights (the non-Bayesian baseline)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from swaglora.params import Shapes
from swaglora.posterior.base import Posterior, Row, check_state_shapes


class MAP(Posterior):
    """Point mass at the weights current at the last ``collect(model)`` (or at construction).

    Weights are stored in each parameter's own dtype, so sampling returns them exactly.
    """

    name = "map"
    rows = (
        Row("zero-shot", 0, "the base model before fine-tuning", sampled=False, before_training=True),
        Row("map", 10, "LoRA fine-tuning, the best validation epoch of the MAP phase (SWAG's starting point)", sampled=False, reference=True, default=True),
        Row("ensemble", 60, "deep ensemble of the members' MAP weights", all_members=True, default=True),
    )

    def __init__(self, model: nn.Module | Shapes, device: str | torch.device | None = None) -> None:
        super().__init__(model)
        self.device = device
        self._weights: dict[str, Tensor] | None = None
        if isinstance(model, nn.Module):
            self.collect(model)

    def collect(self, model: nn.Module) -> None:
        self._weights = {
            n: p.detach().to(self.device or p.device, copy=True) for n, p in self._read(model).items()
        }

    @property
    def is_point_mass(self) -> bool:
        return True

    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        if self._weights is None:
            raise RuntimeError("MAP.sample() called before collect(model) or load_state_dict()")
        return {n: w.clone() for n, w in self._weights.items()}

    def state_dict(self) -> dict[str, Tensor]:
        if self._weights is None:
            raise RuntimeError("MAP has no weights yet: call collect(model) first")
        return dict(self._weights)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        check_state_shapes(self.parameter_shapes, state, type(self).__name__)
        self._weights = {n: state[n].detach().to(self.device or state[n].device, copy=True) for n in self.parameter_shapes}
