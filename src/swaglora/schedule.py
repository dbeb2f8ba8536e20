"""The learning-rate schedule of the training loop.

Per optimiser step:
  * MAP phase (``train.epochs``), ``train.schedule=auto``: linear warm-up over ``train.warmup`` of the
    phase, then linear decay to 0 when no collection follows, or constant ``train.lr`` when it does
    (like SWA, which holds a high learning rate before averaging);
    ``train.schedule=linear`` (the SWAG-LoRA code: transformers' ``get_linear_schedule_with_warmup``
    over all epochs, stepped only before SWAG starts): warm-up over ``train.warmup`` and linear decay
    to 0 over the MAP *and* SWAG steps, cut off where the SWAG phase starts (step s uses (s+1)/W of
    the peak in warm-up, transformers' s/W: the peak comes one step earlier);
  * collection phase (``swag.epochs``): linear anneal from the lr the MAP schedule reached at its end
    to ``swag.lr`` over ``swag.anneal_epochs`` epochs (as ``torch.optim.swa_utils.SWALR``: its first
    step keeps that lr), then constant ``swag.lr``; a snapshot is collected every ``swag.every``
    steps or at each epoch end.
"""

from __future__ import annotations

import math

from .config import RunConfig

__all__ = ["lr_at"]


def lr_at(step: int, steps_per_epoch: int, cfg: RunConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based) (the schedule above)."""
    map_steps = cfg.train.epochs * steps_per_epoch
    swag_steps = cfg.swag.epochs * steps_per_epoch
    horizon = map_steps + (swag_steps if cfg.train.schedule == "linear" else 0)
    warmup = max(1, math.ceil(cfg.train.warmup * horizon)) if cfg.train.warmup > 0 else 0
    base = cfg.train.lr

    def map_lr(s: int) -> float:
        if s < warmup:
            return base * (s + 1) / warmup
        if cfg.swag.epochs > 0 and cfg.train.schedule == "auto":
            return base
        return base * max(0.0, (horizon - s) / max(1, horizon - warmup))

    if step < map_steps:
        return map_lr(step)
    start = map_lr(map_steps) if map_steps else base  # where the MAP schedule stopped
    anneal = cfg.swag.anneal_epochs * steps_per_epoch
    into = step - map_steps
    if into < anneal:
        return start + into / anneal * (cfg.swag.lr - start)
    return cfg.swag.lr
