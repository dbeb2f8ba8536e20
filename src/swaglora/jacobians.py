"""Per-example Jacobians of the choice logits with respect to trainable parameters.

For the linearised (GLM) predictive every example needs :math:`J_n = \\partial f(x_n) / \\partial\\theta`
(``C x D``), not the batch sum that one backward pass gives. Examples of a batch do not interact
(one row each), so for a linear map :math:`y = Wx (+b)` applied at positions t of example n

.. math:: \\partial f_c(x_n) / \\partial W = \\sum_t g_{nct}\\, a_{nt}^\\top, \\qquad g_{nct} = \\partial f_c / \\partial y_{nt},

and one backward pass per choice c (gradients at the recorded outputs y) yields the Jacobians of
every example of the batch at once. Parameters that are not the weight/bias of a linear map get one
backward pass per example and choice (slow, meant for small leftovers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["per_example_jacobians"]


def per_example_jacobians(
    model: nn.Module,
    logits_fn: Callable[[], Tensor],
    linear: Sequence[tuple[str, str | None]],
    other: Sequence[str] = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits [B, C], {name: Jacobian [B, C, *shape]})`` for the named parameters.

    ``linear``: ``(weight name, bias name or None)`` pairs whose module computes ``F.linear(x, weight, bias)``
    on inputs ``[B, ..., in]`` (peft's ``lora_A``/``lora_B``, the letter head); ``other``: any further
    trainable parameters. Absent choices (``-inf`` logits) get zero Jacobians.
    """
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {w.rpartition(".")[0]: [] for w, _ in linear}
    hook = lambda m: lambda _, args, out: calls[m].append((args[0].detach(), out))  # noqa: E731
    handles = [modules[m].register_forward_hook(hook(m)) for m in calls]
    try:
        with torch.enable_grad():
            logits = logits_fn()
    finally:
        for h in handles:
            h.remove()
    b, c = logits.shape
    recs = [(m, x, y) for m in calls for x, y in calls[m]]
    jac = {w: params[w].new_zeros(b, c, *params[w].shape, dtype=torch.float32) for w, _ in linear}
    jac.update({bias: params[bias].new_zeros(b, c, *params[bias].shape, dtype=torch.float32) for _, bias in linear if bias})
    jac.update({n: params[n].new_zeros(b, c, *params[n].shape, dtype=torch.float32) for n in other})
    owner = {w.rpartition(".")[0]: (w, bias) for w, bias in linear}
    present = torch.isfinite(logits.detach())
    for k in range(c):
        if not present[:, k].any():
            continue
        seed = torch.zeros_like(logits)
        seed[:, k] = present[:, k].to(seed.dtype)  # d f_k / d(.) for every example at once
        grads = torch.autograd.grad(logits, [y for *_, y in recs], seed, retain_graph=True, allow_unused=True) if recs else []
        for (m, x, y), g in zip(recs, grads):
            if g is None:
                continue
            w, bias = owner[m]
            g = g.reshape(b, -1, y.shape[-1]).float()
            jac[w][:, k] += torch.einsum("bto,bti->boi", g, x.reshape(b, -1, x.shape[-1]).float())
            if bias:
                jac[bias][:, k] += g.sum(1)
        for n in range(b) if other else ():
            if present[n, k]:
                gs = torch.autograd.grad(logits[n, k], [params[p] for p in other], retain_graph=True, allow_unused=True)
                for p, g in zip(other, gs):
                    if g is not None:
                        jac[p][n, k] = g.float()
    return logits.detach(), jac
