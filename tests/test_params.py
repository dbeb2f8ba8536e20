"""Trainable-parameter selection, flatten/unflatten and the use_params context manager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swaglora.params import flatten, parameter_shapes, trainable_parameters, unflatten, use_params

from conftest import small_model


def test_trainable_parameters_selects_by_requires_grad_in_order():
    model = small_model()
    params = trainable_parameters(model)
    assert list(params) == ["1.weight", "1.bias"]
    assert params["1.weight"] is model[1].weight
    model[0].weight.requires_grad_(True)
    assert list(trainable_parameters(model)) == ["0.weight", "1.weight", "1.bias"]


def test_trainable_parameters_ignores_names():
    class Tricky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Parameter(torch.zeros(2), requires_grad=False)  # lora-looking, frozen
            self.base = nn.Parameter(torch.zeros(3))

    assert list(trainable_parameters(Tricky())) == ["base"]


def test_flatten_unflatten_round_trip():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([10.0, 11.0]), "c": torch.tensor(7.0)}
    vec = flatten(tensors)
    assert torch.equal(vec, torch.tensor([0.0, 1, 2, 3, 4, 5, 10, 11, 7]))
    back = unflatten(vec, parameter_shapes(tensors))
    assert list(back) == ["a", "b", "c"]
    for name in tensors:
        assert torch.equal(back[name], tensors[name])
    back_like_tensors = unflatten(vec, tensors)  # `like` may hold tensors instead of shapes
    assert back_like_tensors["a"].shape == (2, 3)
    with pytest.raises(ValueError, match="9 elements"):
        unflatten(torch.zeros(8), tensors)


def test_flatten_casts_bf16_exactly():
    x = torch.tensor([1.0 + 2**-7, -3.5, 1e-3], dtype=torch.bfloat16)
    flat = flatten({"x": x}, dtype=torch.float32)
    assert flat.dtype == torch.float32
    assert torch.equal(flat, x.float())
    assert flatten({}).numel() == 0


def test_use_params_sets_then_restores():
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = {"1.weight": torch.full((2, 3), 2.0, dtype=torch.float64), "1.bias": torch.tensor([1.0, -1.0])}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with use_params(model, theta) as m:
        assert m is model
        assert model[1].weight.dtype == torch.float32  # cast to the parameter's dtype
        assert torch.equal(model[1].weight, torch.full((2, 3), 2.0))
        hidden = x @ before["0.weight"].T + before["0.bias"]
        expected = hidden @ torch.full((3, 2), 2.0) + torch.tensor([1.0, -1.0])
        torch.testing.assert_close(model(x), expected)
        assert model[1].weight.requires_grad and model[1].weight.grad_fn is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_use_params_restores_on_exception():
    model = small_model()
    before = model[1].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with use_params(model, {"1.weight": torch.zeros(2, 3)}):
            assert torch.equal(model[1].weight, torch.zeros(2, 3))
            raise RuntimeError("boom")
    assert torch.equal(model[1].weight, before)


def test_use_params_rejects_mismatch_before_touching_model():
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        with use_params(model, {"1.bias": torch.zeros(2), "2.weight": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match=r"shape of '1\.weight': \(3, 2\) in theta vs \(2, 3\)"):
        with use_params(model, {"1.weight": torch.zeros(3, 2)}):
            pass
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_use_params_bf16_model():
    model = small_model(dtype=torch.bfloat16)
    before = model[1].bias.detach().clone()
    value = torch.tensor([0.1, 0.2], dtype=torch.float32)
    with use_params(model, {"1.bias": value}):
        assert model[1].bias.dtype == torch.bfloat16
        assert torch.equal(model[1].bias, value.to(torch.bfloat16))
    assert torch.equal(model[1].bias, before)
