"""SWAG moments, ring buffer and sampling distribution, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from swaglora.params import flatten, trainable_parameters, unflatten, use_params
from swaglora.posterior import SWAG, SWAGDiag, get_method

from conftest import small_model


def set_trainable(model: nn.Module, vector: torch.Tensor) -> None:
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, value in unflatten(vector, params).items():
            params[name].copy_(value)


def snapshots(n: int, d: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, generator=g) + torch.randn(n, d, generator=g)).to(dtype)


def test_moments_and_ring_buffer_match_numpy():
    model = small_model()
    frozen = model[0].weight.detach().clone()
    swag = SWAG(model, max_rank=3, dtype=torch.float64)
    assert swag.num_params == 8 and list(swag.parameter_shapes) == ["1.weight", "1.bias"]
    thetas = snapshots(7, 8)
    buffer_ptr = swag.state.deviations.data_ptr()
    ref = thetas.double().numpy()
    for i in range(7):
        set_trainable(model, thetas[i])
        swag.collect(model)
        mean_i = ref[: i + 1].mean(axis=0)
        np.testing.assert_allclose(swag.state.mean.numpy(), mean_i, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(swag.state.sq_mean.numpy(), (ref[: i + 1] ** 2).mean(axis=0), rtol=1e-12, atol=1e-12)
        assert swag.n_collected == i + 1 and swag.rank == min(i + 1, 3)
        if i == 1:  # before wrap-around: rows 0, 1 filled in order, row 2 still empty
            np.testing.assert_allclose(swag.state.deviations[1].numpy(), ref[1] - mean_i, atol=1e-12)
            assert torch.count_nonzero(swag.state.deviations[2]) == 0
    # after 7 snapshots with K=3: row j holds the latest snapshot i with i % 3 == j (i = 6, 4, 5)
    for row, i in [(0, 6), (1, 4), (2, 5)]:
        expected = ref[i] - ref[: i + 1].mean(axis=0)  # deviation from the mean AFTER update i
        np.testing.assert_allclose(swag.state.deviations[row].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert swag.state.next_row == 7 % 3 and swag.state.n == 7
    assert swag.state.deviations.data_ptr() == buffer_ptr  # preallocated ring buffer, never re-concatenated
    var = np.maximum((ref**2).mean(0) - ref.mean(0) ** 2, 1e-30)
    np.testing.assert_allclose(swag.variance().numpy(), var, rtol=1e-9)
    assert torch.equal(model[0].weight, frozen)
    mean = swag.mean_params()
    np.testing.assert_allclose(mean["1.bias"].numpy(), ref.mean(0)[6:], rtol=1e-12)


def test_swag_diag_keeps_no_deviations():
    model = small_model()
    diag = get_method("swag-diag")(model)
    assert isinstance(diag, SWAGDiag) and diag.max_rank == 0 and diag.default_scale == 1.0
    for theta in snapshots(4, 8):
        set_trainable(model, theta)
        diag.collect(model)
    assert diag.state.deviations.shape == (0, 8) and diag.rank == 0 and diag.state.next_row == 0
    assert "max_rank" not in diag.hparams()


def test_default_scale():
    model = small_model()
    assert SWAG(model).default_scale == 0.5
    assert SWAG(model, max_rank=1).default_scale == 1.0  # K' <= 1 always: diagonal only
    swag = SWAG(model, max_rank=3, default_scale=0.3)
    for theta in snapshots(4, 8):
        set_trainable(model, theta)
        swag.collect(model)
    a = swag.sample(torch.Generator().manual_seed(5))
    b = swag.sample(torch.Generator().manual_seed(5), scale=0.3)
    assert all(torch.equal(a[n], b[n]) for n in a)


def fitted_swag(max_rank: int, n: int, seed: int = 3) -> SWAG:
    """SWAG over one parameter vector of D=6, fp64, after n snapshots."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    swag = SWAG(model, max_rank=max_rank, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.2, 0.5, 1.0, 1.5, 0.7, 0.3], dtype=torch.float64)
    for _ in range(n):
        with torch.no_grad():
            model.w.copy_(1.0 + scales * torch.randn(6, generator=g, dtype=torch.float64))
        swag.collect(model)
    return swag


def formula_covariance(swag: SWAG, scale: float, divisor_rank: int | None = None) -> np.ndarray:
    var = swag.variance().numpy()
    cov = np.diag(var)
    k = swag.rank if divisor_rank is None else divisor_rank
    if swag.rank >= 2:
        dev = swag.state.deviations[: swag.rank].numpy()
        cov = cov + dev.T @ dev / (k - 1)
    return scale * cov


def max_z_scores(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    """Largest |error| / standard error over the mean and the covariance entries."""
    n = samples.shape[0]
    mean_z = np.abs(samples.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    emp_cov = np.cov(samples, rowvar=False)
    d = np.diag(cov)
    cov_se = np.sqrt((np.outer(d, d) + cov**2) / n)  # sd of a Gaussian sample covariance entry
    return float(mean_z.max()), float((np.abs(emp_cov - cov) / cov_se).max())


@pytest.mark.parametrize(
    "max_rank, n, scale, expected_rank",
    [
        (1, 8, None, 1),  # K' = 1: diagonal only, default scale 1
        (5, 3, None, 3),  # 1 < K' < K: divide by K'-1 = 2, not K-1 = 4; default scale 0.5
        (3, 7, 2.0, 3),  # K' = K after wrap-around, explicit scale
        (0, 5, None, 0),  # SWAG-diagonal
    ],
)
def test_sample_distribution_matches_formula(max_rank, n, scale, expected_rank):
    swag = fitted_swag(max_rank, n)
    assert swag.rank == expected_rank
    eff_scale = swag.default_scale if scale is None else scale
    assert eff_scale == (scale or (0.5 if max_rank >= 2 else 1.0))
    n_draws = 20000
    g = torch.Generator().manual_seed(11)
    samples = torch.stack([swag.sample(g, scale)["w"] for _ in range(n_draws)]).numpy()
    mean, cov = swag.state.mean.numpy(), formula_covariance(swag, eff_scale)
    mean_z, cov_z = max_z_scores(samples, mean, cov)
    assert mean_z < 5 and cov_z < 5, (mean_z, cov_z)
    # projected onto each held deviation direction: variance dᵀΣd, sd of a sample variance σ²·sqrt(2/(N-1))
    # the first snapshot's deviation is exactly 0 (theta_1 - mean_1); it is still held while n <= K
    held = [d for d in swag.state.deviations[: swag.rank].numpy() if np.linalg.norm(d) > 0]
    assert len(held) == swag.rank - (1 if 0 < n <= max_rank else 0)
    for d in held:
        proj_var = float(np.var(samples @ d, ddof=1))
        true_var = float(d @ cov @ d)
        assert abs(proj_var - true_var) < 5 * true_var * math.sqrt(2 / (n_draws - 1)), (proj_var, true_var)
    # the same check has the power to reject the original code's K-1 divisor and a wrong scale
    if 1 < swag.rank < max_rank:
        assert max(max_z_scores(samples, mean, formula_covariance(swag, eff_scale, divisor_rank=max_rank))) > 5
    assert max(max_z_scores(samples, mean, formula_covariance(swag, 2 * eff_scale))) > 5


def test_scale_zero_returns_mean_exactly():
    swag = fitted_swag(3, 5)
    draw = swag.sample(torch.Generator().manual_seed(0), scale=0)
    assert torch.equal(draw["w"], swag.state.mean)
    assert torch.equal(swag.mean_params()["w"], swag.state.mean)
    with pytest.raises(ValueError, match="scale"):
        swag.sample(scale=-1.0)


def test_sampling_is_deterministic_per_generator_and_leaves_global_rng_alone():
    swag = fitted_swag(3, 5)
    global_state = torch.get_rng_state()
    a = swag.sample(torch.Generator().manual_seed(42))["w"]
    b = swag.sample(torch.Generator().manual_seed(42))["w"]
    c = swag.sample(torch.Generator().manual_seed(43))["w"]
    unseeded = [swag.sample()["w"] for _ in range(2)]
    draws1 = swag.draws(4, torch.Generator().manual_seed(7))
    draws2 = swag.draws(4, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(unseeded[0], unseeded[1])
    assert len(draws1) == 4 and all(torch.equal(x["w"], y["w"]) for x, y in zip(draws1, draws2))
    assert not torch.equal(draws1[0]["w"], draws1[1]["w"])


def test_sample_before_collect_is_an_error():
    swag = SWAG(small_model())
    with pytest.raises(RuntimeError, match="before any collect"):
        swag.sample()
    with pytest.raises(RuntimeError, match="before any collect"):
        swag.mean_params()


def test_bf16_model_moments_in_fp32():
    model = small_model(dtype=torch.bfloat16)
    swag = SWAG(model, max_rank=2)
    thetas = snapshots(4, 8, dtype=torch.bfloat16)
    for theta in thetas:
        set_trainable(model, theta)
        swag.collect(model)
    assert swag.state.mean.dtype == swag.state.sq_mean.dtype == swag.state.deviations.dtype == torch.float32
    ref = thetas.double().numpy()  # the exact bf16 values
    np.testing.assert_allclose(swag.state.mean.numpy(), ref.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(swag.state.sq_mean.numpy(), (ref**2).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(swag.state.deviations[1].numpy(), ref[3] - ref.mean(0), rtol=1e-5, atol=1e-6)
    draw = swag.sample(torch.Generator().manual_seed(0))
    assert draw["1.weight"].dtype == torch.float32
    with use_params(model, draw):
        assert torch.equal(model[1].weight, draw["1.weight"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32 or float64"):
        SWAG(model, dtype=torch.bfloat16)


def test_collect_refuses_a_changed_model():
    model = small_model()
    swag = SWAG(model)
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        swag.collect(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SWAG(small_model().requires_grad_(False))


def test_collected_mean_matches_flattened_weights():
    model = small_model()
    swag = SWAG(model)
    swag.collect(model)
    assert torch.equal(swag.state.mean, flatten(trainable_parameters(model)))
