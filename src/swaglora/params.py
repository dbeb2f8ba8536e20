"""Trainable-parameter bookkeeping: select, flatten/unflatten, and temporarily swap weights.

Parameters are selected by ``requires_grad`` (never by name matching), so the same code
tracks exactly the LoRA weights of a PEFT model, or any other trainable subset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

Shapes = Mapping[str, Sequence[int]]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for parameters with ``requires_grad``, in ``named_parameters`` order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def flatten(
    tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Tensor:
    """Concatenate the tensors (in mapping order) into one detached vector ``[D]``."""
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors.values()])


def unflatten(vector: Tensor, like: Mapping[str, Sequence[int] | Tensor]) -> dict[str, Tensor]:
    """Split ``vector [D]`` into ``{name: tensor}`` shaped like ``like`` (values: shapes or tensors).

    The returned tensors are views of ``vector``.
    """
    shapes = {name: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for name, v in like.items()}
    if vector.dim() != 1 or vector.numel() != numel(shapes):
        raise ValueError(
            f"cannot unflatten a vector of shape {tuple(vector.shape)} into {len(shapes)} "
            f"tensors with {numel(shapes)} elements in total"
        )
    out: dict[str, Tensor] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = vector[offset : offset + size].view(shape)
        offset += size
    return out


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def shape_mismatches(
    expected: Shapes, actual: Shapes, expected_label: str = "expected", actual_label: str = "actual"
) -> list[str]:
    """Human-readable differences between two ``{name: shape}`` maps (empty list: identical)."""
    problems = []
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing:
        problems.append(f"{len(missing)} name(s) in {expected_label} but not in {actual_label}: {_preview(missing)}")
    if extra:
        problems.append(f"{len(extra)} name(s) in {actual_label} but not in {expected_label}: {_preview(extra)}")
    for name in expected:
        if name in actual and tuple(expected[name]) != tuple(actual[name]):
            problems.append(
                f"shape of {name!r}: {tuple(expected[name])} in {expected_label} vs {tuple(actual[name])} in {actual_label}"
            )
    return problems


def check_same_shapes(
    expected: Shapes, actual: Shapes, expected_label: str = "expected", actual_label: str = "actual"
) -> None:
    """Raise a one-line ValueError summarising the differences of two ``{name: shape}`` maps (order ignored)."""
    problems = shape_mismatches(expected, actual, expected_label, actual_label)
    if problems:
        more = f" (and {len(problems) - 2} more difference(s))" if len(problems) > 2 else ""
        raise ValueError(f"{expected_label} and {actual_label} do not match: {'; '.join(problems[:2])}{more}")


@contextmanager
def use_params(model: nn.Module, theta: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily copy ``theta`` into the model's parameters of the same names.

    Values are cast to each parameter's dtype/device, copied without autograd, and the
    original values are restored when the block exits, also on exception. ``theta`` may
    cover any subset of ``model.named_parameters()`` (they need not require grad, so a
    PEFT adapter loaded for inference works); unknown names or wrong shapes raise ValueError
    before anything is modified.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in theta if n not in params]
    problems = [f"{len(unknown)} name(s) not parameters of the model: {_preview(unknown)}"] if unknown else []
    problems += [
        f"shape of {n!r}: {tuple(v.shape)} in theta vs {tuple(params[n].shape)} in the model"
        for n, v in theta.items()
        if n in params and tuple(v.shape) != tuple(params[n].shape)
    ]
    if problems:
        raise ValueError("use_params: theta does not match the model:\n  " + "\n  ".join(problems))
    originals = {n: params[n].detach().clone() for n in theta}
    try:
        with torch.no_grad():
            for n, value in theta.items():
                params[n].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for n, value in originals.items():
                params[n].copy_(value)
