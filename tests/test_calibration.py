"""Temperature scaling: recovers a known temperature, never worsens the NLL, handles absent choices."""

from __future__ import annotations

import math

import pytest
import torch

from swaglora.calibration import apply_temperature, fit_temperature, temperature_nll


def synthetic(true_t: float, n: int = 5000, c: int = 4, seed: int = 0, spread: float = 3.0):
    """Logits z and labels drawn from softmax(z / true_t): true_t is the calibrating temperature."""
    g = torch.Generator().manual_seed(seed)
    z = spread * torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z / true_t, 1), 1, generator=g).squeeze(1)
    return z, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_a_known_temperature(seed):
    z, y = synthetic(2.5, seed=seed)
    t = fit_temperature(z, y)
    assert abs(t - 2.5) / 2.5 < 0.05, t
    # the fitted T is the NLL minimum: nearby temperatures are worse
    assert temperature_nll(z, y, t) < min(temperature_nll(z, y, t * 1.02), temperature_nll(z, y, t / 1.02))
    assert temperature_nll(z, y, t) < temperature_nll(z, y, 1.0)


@pytest.mark.parametrize("true_t, expect", [(1.0, "near 1"), (0.4, "below 1"), (2.5, "above 1")])
def test_never_increases_nll(true_t, expect):
    z, y = synthetic(true_t, n=2000, seed=3)
    t = fit_temperature(z.float(), y)
    assert temperature_nll(z, y, t) <= temperature_nll(z, y, 1.0)
    if expect == "near 1":
        assert abs(t - 1) < 0.1
    elif expect == "below 1":
        assert t < 0.6
    else:
        assert t > 2


def test_returns_one_when_nothing_improves():
    y = torch.tensor([0, 1, 2, 1])
    assert fit_temperature(torch.zeros(4, 3), y) == 1.0  # NLL does not depend on T
    # labels on the least likely choice: the best T > 0 is "infinite"; it is bounded and still improves
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    t = fit_temperature(z, torch.tensor([1, 0]))
    assert math.isfinite(t) and t > 10 and temperature_nll(z, torch.tensor([1, 0]), t) < temperature_nll(z, torch.tensor([1, 0]))


def test_padded_choices():
    z, y = synthetic(2.0, n=3000, c=4, seed=5)
    n_choices = torch.randint(2, 5, (3000,), generator=torch.Generator().manual_seed(6))
    y = torch.minimum(y, n_choices - 1)  # labels among the present choices
    absent = torch.arange(4)[None] >= n_choices[:, None]
    padded = z.masked_fill(absent, -math.inf)
    t = fit_temperature(padded, y)
    assert math.isfinite(t) and t > 1
    # the same as very negative finite logits (probability ~0 at these temperatures)
    assert t == pytest.approx(fit_temperature(z.masked_fill(absent, -1e4), y), rel=1e-6)
    probs = torch.softmax(apply_temperature(padded, t), 1)
    assert torch.isfinite(probs).all() and torch.equal(probs[absent], torch.zeros(int(absent.sum()), dtype=probs.dtype))
    # a BMA predictive enters as the log of its averaged probabilities (zeros become -inf)
    bma = torch.log(torch.softmax(padded, 1))
    assert fit_temperature(bma, y) == pytest.approx(t, rel=1e-5)
    with pytest.raises(ValueError, match="absent"):
        fit_temperature(padded, torch.full((3000,), 3))


def test_apply_temperature_and_input_checks():
    z = torch.tensor([[2.0, -math.inf, 1.0]])
    assert torch.equal(apply_temperature(z, 2.0), torch.tensor([[1.0, -math.inf, 0.5]]))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(z, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fit_temperature(torch.zeros(0, 2), torch.zeros(0))


def test_pipeline_fits_and_applies_the_temperature_to_the_same_choices_when_some_are_absent():
    """Validation mixes 2-choice questions (padded to 4 with absent choices) with uninformative 4-choice
    ones (uniform at every T). The 2-choice ones put 0.99 on choice A and A is right in 11 of 20, so the
    NLL of the applied predictive is minimised where softmax(log p / T) gives A 0.55:
    T = ln(99) / ln(0.55 / 0.45) ~= 22.9, at which absent choices written as log(1e-30) would take ~5% each."""
    from swaglora.data import MCQExample
    from swaglora.evaluate import _temperature_scaled

    two = [MCQExample(f"t{i}", "q", ("x", "y"), ("A", "B"), "A" if i < 11 else "B") for i in range(20)]
    four = [MCQExample(f"f{i}", "q", ("w", "x", "y", "z"), ("A", "B", "C", "D"), "ABCD"[i % 4]) for i in range(10)]
    probs = torch.tensor([[0.99, 0.01, 0.0, 0.0]] * 20 + [[0.25] * 4] * 10)[None]  # [S=1, N, C]
    scaled, info = _temperature_scaled({"validation": probs}, [("validation", "validation", two + four)])
    expected = math.log(99) / math.log(0.55 / 0.45)
    assert info["temperature"] == pytest.approx(expected, rel=1e-4)
    q = scaled["validation"][0].double()
    assert torch.all(q[:20, 2:] == 0) and torch.allclose(q[:20, 0], torch.full((20,), 0.55, dtype=torch.float64), atol=1e-5)
    hand_nll = -(11 * math.log(0.55) + 9 * math.log(0.45) + 10 * math.log(0.25)) / 30
    labels = torch.tensor([ex.answer_index for ex in two + four])
    assert float(-q.gather(1, labels[:, None]).log().mean()) == pytest.approx(hand_nll, rel=1e-5)
