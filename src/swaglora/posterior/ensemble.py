"""Equal-weight mixtures of posteriors.

MultiSWAG (Wilson & Izmailov 2020, https://arxiv.org/abs/2002.08791) is an ``Ensemble`` of
independently trained ``SWAG`` posteriors; a deep ensemble is an ``Ensemble`` of ``MAP``s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swaglora.params import Shapes, shape_mismatches
from swaglora.posterior.base import Posterior, get_method, load_posterior, make_generator


class Ensemble(Posterior):
    """Uniform mixture of ``members`` (all tracking the same parameter names and shapes).

    ``draws(S)`` concatenates every member's draws (M x S weights, or one per point-mass
    member), so averaging predictions over them is the equal-weight mixture of the members'
    Bayesian model averages. Members are trained separately: collect into
    ``ensemble.members[i]``, not into the ensemble.
    """

    name = "ensemble"

    def __init__(self, members: Sequence[Posterior]) -> None:
        members = list(members)
        if not members or not all(isinstance(m, Posterior) for m in members):
            raise ValueError("Ensemble needs a non-empty list of Posterior members")
        for i, member in enumerate(members[1:], start=1):
            problems = shape_mismatches(members[0].parameter_shapes, member.parameter_shapes, "member 0", f"member {i}")
            if problems:
                raise ValueError("ensemble members track different parameters:\n  " + "\n  ".join(problems))
        super().__init__(members[0].parameter_shapes)
        self.members = members
        self.stochastic_forward = any(m.stochastic_forward for m in members)  # type: ignore[misc]

    def collect(self, model: nn.Module) -> None:
        raise TypeError("collect into one member (ensemble.members[i].collect(model)), not into the Ensemble")

    def fit(self, model: nn.Module, batches: Any, loss_fn: Any, **kwargs: Any) -> None:
        raise TypeError("fit each member with its own model (ensemble.members[i].fit(...)), not the Ensemble")

    @property
    def is_point_mass(self) -> bool:
        return len(self.members) == 1 and self.members[0].is_point_mass

    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        g = make_generator(generator)
        i = int(torch.randint(len(self.members), (1,), generator=g, device=g.device))
        return self.members[i].sample(g, scale)

    def draws(
        self, n_samples: int, generator: torch.Generator | Sequence[torch.Generator] | None = None,
        scale: float | None = None,
    ) -> list[dict[str, Tensor]]:
        """Every member's draws in turn, from one ``generator``, or from one generator per member (member i's
        draws are then exactly those it gives alone with its own generator)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(self.members):
                raise ValueError(f"{len(generator)} generators for an ensemble of {len(self.members)} members")
            return [d for member, g in zip(self.members, generator) for d in member.draws(n_samples, g, scale)]
        g = make_generator(generator)
        return [d for member in self.members for d in member.draws(n_samples, g, scale)]

    def hparams(self) -> dict[str, Any]:
        return {"members": [{"method": m.name, "hparams": m.hparams()} for m in self.members]}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"members.{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state_dict().items()}

    @staticmethod
    def _split(state: Mapping[str, Tensor], n_members: int) -> list[dict[str, Tensor]]:
        parts: list[dict[str, Tensor]] = [{} for _ in range(n_members)]
        for key, value in state.items():
            head, index, rest = (key.split(".", 2) + ["", ""])[:3]
            if head != "members" or not index.isdigit() or int(index) >= n_members or not rest:
                raise ValueError(f"unexpected key {key!r} in the state of an ensemble of {n_members} members")
            parts[int(index)][rest] = value
        return parts

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for i, (member, part) in enumerate(zip(self.members, self._split(state, len(self.members)))):
            try:
                member.load_state_dict(part)
            except ValueError as e:
                raise ValueError(f"ensemble member {i}: {e}") from e

    @classmethod
    def from_config(
        cls, parameters: Shapes, hparams: Mapping[str, Any], state: Mapping[str, Tensor], device: str = "cpu"
    ) -> Ensemble:
        specs = hparams.get("members")
        if not isinstance(specs, list) or not specs:
            raise ValueError("ensemble config has no 'members' list")
        parts = cls._split(state, len(specs))
        members = []
        for i, (spec, part) in enumerate(zip(specs, parts)):
            try:
                members.append(get_method(spec["method"]).from_config(parameters, spec.get("hparams", {}), part, device))
            except ValueError as e:
                raise ValueError(f"ensemble member {i}: {e}") from e
        return cls(members)

    @classmethod
    def from_directories(
        cls,
        directories: Sequence[str | Path],
        model: nn.Module | None = None,
        expected_metadata: Mapping[str, Any] | None = None,
    ) -> Ensemble:
        """An ensemble of posteriors saved separately (e.g. one per training seed)."""
        return cls([load_posterior(d, model, expected_metadata) for d in directories])
