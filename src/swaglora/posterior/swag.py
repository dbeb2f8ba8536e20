r"""SWAG: a Gaussian over the trainable weights from the SGD trajectory.

Maddox et al. 2019, "A Simple Baseline for Bayesian Uncertainty in Deep Learning",
https://arxiv.org/abs/1902.02476 ; applied to LoRA adapters by Onal et al. 2024,
https://arxiv.org/abs/2405.03425 .

For snapshots :math:`\theta_1..\theta_n` (flattened, :math:`D` numbers each) we keep running
moments and the last :math:`K` deviations, updated per snapshot :math:`\theta`::

    mean    <- mean * n/(n+1) + theta / (n+1)
    sq_mean <- sq_mean * n/(n+1) + theta**2 / (n+1)
    D_hat[next_row] <- theta - mean          # mean AFTER the update, as in the SWAG code
    var = clamp(sq_mean - mean**2, min=var_clamp)

The posterior is :math:`N(\text{mean}, \Sigma)` with
:math:`\Sigma = \text{scale}\,(\mathrm{diag}(var) + \hat D^\top \hat D / (K'-1))`, where
:math:`K' = \min(n, K)` is the number of deviation rows actually held (the original code divides
by :math:`K-1` even before :math:`K` rows exist). A draw is

    theta = mean + sqrt(scale) * (sqrt(var) * z1 + D_hat^T z2 / sqrt(K'-1)),  z1 ~ N(0, I_D), z2 ~ N(0, I_K')

With :math:`K' \le 1` (or ``max_rank=0``: SWAG-diagonal) the low-rank term is dropped. The
paper samples with scale 1/2 (:math:`\tfrac12(\Sigma_{diag} + \Sigma_{lowrank})`), our default
when ``max_rank >= 2``; diagonal-only SWAG defaults to scale 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from swaglora.params import Shapes, flatten, unflatten
from swaglora.posterior.base import Posterior, Row, check_state_shapes, make_generator

if TYPE_CHECKING:
    from swaglora.config import RunConfig

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SWAGState:
    mean: Tensor  # [D] running mean of the snapshots
    sq_mean: Tensor  # [D] running mean of their squares
    deviations: Tensor  # [K, D] ring buffer of theta - mean
    n: int = 0  # snapshots collected
    next_row: int = 0  # row of ``deviations`` the next snapshot overwrites


class SWAG(Posterior):
    """SWAG: Gaussian with the SWA mean and diagonal + rank-K covariance from the collected snapshots."""

    name = "swag"
    trajectory = True
    default_scale = 0.5  # the paper's 1/2 (Sigma_diag + Sigma_lowrank); a rank <= 1 posterior uses SWAGDiag's
    takes_swag_scale = True
    rows = (
        Row("swa", 20, "SWAG mean (stochastic weight averaging)", scale=0.0, sampled=False, default=True),
        Row("swag", 40, "SWAG, diagonal + low-rank covariance", default=True),
        Row("multiswag", 50, "ensemble of the members' SWAG posteriors", all_members=True, default=True),
    )

    def __init__(
        self,
        model: nn.Module | Shapes,
        max_rank: int = 5,
        var_clamp: float = 1e-30,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        default_scale: float | None = None,
    ) -> None:
        super().__init__(model)
        dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in _DTYPES.values():
            raise ValueError(f"SWAG moments must be float32 or float64, got {dtype}")
        if int(max_rank) != max_rank or max_rank < 0:
            raise ValueError(f"max_rank must be a non-negative integer, got {max_rank!r}")
        self.max_rank, self.var_clamp, self.dtype, self.device = int(max_rank), float(var_clamp), dtype, torch.device(device)
        if default_scale is None:
            default_scale = type(self).default_scale if self.max_rank >= 2 else SWAGDiag.default_scale
        self.default_scale = float(default_scale)
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=self.device)  # noqa: E731
        self.state = SWAGState(zeros(self.num_params), zeros(self.num_params), zeros(self.max_rank, self.num_params))

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, tuple[Any, str]]:
        return {"max_rank": (int(cfg.swag.max_rank), "swag.max_rank")}

    def collect(self, model: nn.Module) -> None:
        theta = flatten(self._read(model), dtype=self.dtype, device=self.device)
        s, n = self.state, self.state.n
        s.mean.mul_(n / (n + 1)).add_(theta, alpha=1 / (n + 1))
        s.sq_mean.mul_(n / (n + 1)).add_(theta * theta, alpha=1 / (n + 1))
        if self.max_rank:
            s.deviations[s.next_row] = theta - s.mean
            s.next_row = (s.next_row + 1) % self.max_rank
        s.n = n + 1

    @property
    def n_collected(self) -> int:
        return self.state.n

    @property
    def rank(self) -> int:
        """K' = deviation rows actually held, min(n, max_rank)."""
        return min(self.state.n, self.max_rank)

    def variance(self) -> Tensor:
        return torch.clamp(self.state.sq_mean - self.state.mean**2, min=self.var_clamp)

    def mean_params(self) -> dict[str, Tensor]:
        """The SWA mean as ``{name: tensor}`` (a copy)."""
        self._require_snapshots("mean_params")
        return unflatten(self.state.mean.clone(), self.parameter_shapes)

    def _require_snapshots(self, what: str) -> None:
        if self.state.n == 0:
            raise RuntimeError(f"{type(self).__name__}.{what}() called before any collect(model)")

    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        self._require_snapshots("sample")
        scale = self.default_scale if scale is None else float(scale)
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be finite and >= 0, got {scale}")
        if scale == 0:
            return self.mean_params()
        g = make_generator(generator)
        z1 = torch.randn(self.num_params, generator=g, dtype=self.dtype, device=g.device).to(self.device)
        noise = self.variance().sqrt() * z1
        k = self.rank
        if k >= 2:  # rows 0..k-1 are filled (the buffer fills in order before wrapping)
            z2 = torch.randn(k, generator=g, dtype=self.dtype, device=g.device).to(self.device)
            noise += (self.state.deviations[:k].T @ z2) / math.sqrt(k - 1)
        return unflatten(self.state.mean + math.sqrt(scale) * noise, self.parameter_shapes)

    def hparams(self) -> dict[str, Any]:
        dtype = next(k for k, v in _DTYPES.items() if v == self.dtype)
        return {"max_rank": self.max_rank, "var_clamp": self.var_clamp, "dtype": dtype, "default_scale": self.default_scale}

    def state_dict(self) -> dict[str, Tensor]:
        s = self.state
        count = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        return {"mean": s.mean, "sq_mean": s.sq_mean, "deviations": s.deviations, "n": count(s.n), "next_row": count(s.next_row)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        d, k = self.num_params, self.max_rank
        rows = state.get("deviations")
        if rows is not None and rows.dim() == 2 and rows.shape[1] == d and rows.shape[0] != k:
            raise ValueError(f"deviations have rank {rows.shape[0]} but this {type(self).__name__} has max_rank={k}")
        check_state_shapes({"mean": (d,), "sq_mean": (d,), "deviations": (k, d), "n": (), "next_row": ()}, state, "SWAG")
        n, next_row = int(state["n"]), int(state["next_row"])
        if n < 0 or next_row != (n % k if k else 0):
            raise ValueError(f"inconsistent SWAG counters: n={n}, next_row={next_row}, max_rank={k}")
        cast = lambda t: t.detach().to(dtype=self.dtype, device=self.device, copy=True)  # noqa: E731
        self.state = SWAGState(cast(state["mean"]), cast(state["sq_mean"]), cast(state["deviations"]), n, next_row)


class SWAGDiag(SWAG):
    """SWAG-diagonal: ``SWAG`` with ``max_rank=0`` (no low-rank covariance, default scale 1)."""

    name = "swag-diag"
    default_scale = 1.0  # SWAG-diagonal of Maddox et al. samples N(mean, diag(var)) unscaled
    rows = (Row("swag-diag", 30, "SWAG with diagonal covariance", default=True),)

    def __init__(
        self,
        model: nn.Module | Shapes,
        var_clamp: float = 1e-30,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        default_scale: float | None = None,
    ) -> None:
        super().__init__(model, 0, var_clamp, dtype, device, default_scale)

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, tuple[Any, str]]:
        return {}  # no rank

    def hparams(self) -> dict[str, Any]:
        return {k: v for k, v in super().hparams().items() if k != "max_rank"}
