r"""Temperature scaling: one scalar T > 0 fitted by NLL on held-out data.

Guo et al. 2017, "On Calibration of Modern Neural Networks", https://arxiv.org/abs/1706.04599 .

The calibrated predictive is :math:`\mathrm{softmax}(z / T)`. T minimises the mean NLL
:math:`-\frac1N\sum_n \log \mathrm{softmax}(z_n/T)_{y_n}` over :math:`\log T` (so T > 0), with
LBFGS (strong-Wolfe line search) started at T = 1. The fit never makes the NLL on the fitting
set worse: if the optimum is not strictly better than T = 1 (or is not finite), T = 1 is returned.
T is kept in :math:`[e^{-10}, e^{10}]`.

Logits of absent choices (padding) are ``-inf``: they stay ``-inf`` (probability 0) at every T.

Bayesian model averages: for a predictive averaged over S samples,
:math:`\bar p = \frac1S\sum_s p_s`, pass ``log(p_bar)`` as the logits (``-inf`` where
:math:`\bar p = 0`): then T = 1 reproduces :math:`\bar p` exactly, and T sharpens or flattens
the averaged predictive, :math:`\bar p^{1/T} / \sum \bar p^{1/T}`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fit_temperature", "apply_temperature", "temperature_nll"]

_MAX_LOG_T = 10.0


def _check(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu().reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"expected logits [N, C] and labels [N] with N >= 1, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if torch.isnan(logits).any() or (logits == math.inf).any():
        raise ValueError("logits must not be NaN or +inf (-inf marks an absent choice)")
    if ((labels < 0) | (labels >= logits.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    if torch.isinf(logits.gather(1, labels[:, None])).any():
        raise ValueError("a label points at an absent (-inf) choice")
    return logits, labels


def _nll(logits: Tensor, labels: Tensor, log_t: Tensor) -> Tensor:
    present = torch.isfinite(logits)
    scaled = torch.where(present, torch.where(present, logits, 0.0) * torch.exp(-log_t), -math.inf)  # no inf*0 in grads
    return -torch.log_softmax(scaled, dim=1).gather(1, labels[:, None]).mean()


def temperature_nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` at ``labels``."""
    logits, labels = _check(logits, labels)
    return float(_nll(logits, labels, torch.tensor(math.log(temperature), dtype=torch.float64)))


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)``; 1.0 if that does not improve it.

    ``logits``: ``[N, C]`` logits or log-probabilities (``-inf`` = absent choice; for a BMA
    predictive, the log of the averaged probabilities); ``labels``: ``[N]`` choice indices.
    """
    logits, labels = _check(logits, labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _nll(logits, labels, log_t)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        fitted = log_t.detach().clamp(-_MAX_LOG_T, _MAX_LOG_T)
        before, after = float(_nll(logits, labels, torch.zeros((), dtype=torch.float64))), float(_nll(logits, labels, fitted))
    if not (math.isfinite(after) and after < before):
        return 1.0
    return math.exp(float(fitted))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (``-inf`` stays ``-inf``); softmax of it is the calibrated predictive."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return logits / temperature
