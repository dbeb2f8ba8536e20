"""The recorded SWAG-phase trajectory of a member (``swag.keep_trajectory``), and rebuilding posteriors from it.

A member trained with ``swag.keep_trajectory`` writes to ``members/<i>/trajectory/`` the trainable weights at every
snapshot its schedule collects (``step-<global optimiser step>.safetensors``, unless ``swag.every`` is ``epoch``) and
at the end of every SWAG epoch (``epoch-<1-based epoch>.safetensors``). The training trajectory of the default
schedule (``train.schedule=auto``) does not depend on the SWAG collection settings: the MAP phase's lr does not
depend on ``swag.epochs``, the SWAG phase's lr is ``swag.lr`` from its first step, and collecting never touches the
weights, the optimiser or a random generator. So a member collected with

* another rank ``swag.max_rank``,
* fewer SWAG epochs,
* snapshots every ``k * swag.every`` steps, or per epoch,

is, bit for bit, the recorded member's training with those settings: :func:`replay` calls each posterior's
``collect`` on the recorded weights in the order training would have (``swaglora train --recollect-from``;
the protocol study's collection factors cost no training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig, config_to_dict, flag_of
from .io import atomic_save_safetensors, load_safetensors
from .params import trainable_parameters
from .rundir import RESULT_NEUTRAL

__all__ = ["DIRNAME", "AUTO_EVERY", "collect_every", "record", "snapshot_names", "recollect_differences", "replay"]

DIRNAME = "trajectory"
#: ``swag.every auto``: a snapshot every this many optimiser steps (the protocol study's base; every 100 steps was
#: not better on validation, +0.009 [+0.000, +0.018] on ARC-Easy, a snapshot per epoch clearly worse), or more
#: often when the SWAG phase is shorter than ``AUTO_EVERY * AUTO_MIN_PER_RANK * swag.max_rank`` steps
AUTO_EVERY = 25
AUTO_MIN_PER_RANK = 2

#: the settings a recollected run may change (every other one shapes the trajectory or the copied posteriors)
RECOLLECTABLE = {"swag.epochs", "swag.every", "swag.max_rank", "swag.scale", "swag.keep_trajectory",
                 "posterior.members", "posterior.samples"}


def step_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.safetensors"


def record(directory: Path, model: nn.Module, name: str) -> None:
    """Write the model's trainable weights as snapshot ``name`` (atomically; a resumed training rewrites the
    snapshots after its checkpoint with the same bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / name, {k: v.detach() for k, v in trainable_parameters(model).items()})


def steps_per_epoch(cfg: RunConfig, n_train: int) -> int:
    """Optimiser steps per epoch (as the training loop counts them)."""
    return math.ceil(math.ceil(n_train / cfg.train.batch_size) / cfg.train.grad_accum)


def collect_every(cfg: RunConfig, n_train: int) -> int | None:
    """The optimiser steps between two snapshots a member trained with ``cfg`` on ``n_train`` questions collects
    (``None``: one at each SWAG epoch's end). ``swag.every auto`` is ``min(AUTO_EVERY, L // (2K))`` steps, at
    least 1, for a SWAG phase of L optimiser steps and K = ``swag.max_rank``: :data:`AUTO_EVERY` when L is at
    least 25·2K steps, else an interval that collects at least 2K snapshots (there are at least ``L // every`` of
    them in L steps). On 2,251 ARC-Easy questions (282 steps per epoch, 3 SWAG epochs, K=5) every 25 steps; on 400
    questions (50 per epoch) every 15, so that a small training set still fills the rank K."""
    if cfg.swag.every == "epoch":
        return None
    if cfg.swag.every != "auto":
        return int(cfg.swag.every)
    swag_steps = steps_per_epoch(cfg, n_train) * cfg.swag.epochs
    return max(1, min(AUTO_EVERY, swag_steps // max(1, AUTO_MIN_PER_RANK * cfg.swag.max_rank)))


def snapshot_names(cfg: RunConfig, n_train: int) -> list[str]:
    """The snapshots a member trained with ``cfg`` on ``n_train`` questions collects, in collection order."""
    every = collect_every(cfg, n_train)
    if every is None:
        return [epoch_name(cfg.train.epochs + e) for e in range(1, cfg.swag.epochs + 1)]
    per_epoch = steps_per_epoch(cfg, n_train)
    first, last = cfg.train.epochs * per_epoch + 1, (cfg.train.epochs + cfg.swag.epochs) * per_epoch
    return [step_name(s) for s in range(first, last + 1) if s % every == 0]


def recollect_differences(source: RunConfig, cfg: RunConfig, n_train: int) -> list[str]:
    """Why members trained with ``source`` (and ``swag.keep_trajectory``) on ``n_train`` questions cannot be
    recollected as ``cfg``'s: one line per reason, naming the flag; empty when they can."""
    why = []
    if not source.swag.keep_trajectory:
        why.append(f"it was trained without {flag_of('swag.keep_trajectory')}")
    a, b = config_to_dict(source), config_to_dict(cfg)
    for section in b:
        if section == "eval":
            continue
        for key, value in b[section].items():
            name = f"{section}.{key}"
            if name not in RECOLLECTABLE | RESULT_NEUTRAL and a.get(section, {}).get(key) != value:
                why.append(f"{flag_of(name)} is {a.get(section, {}).get(key)!r} there, {value!r} here "
                           "(only the SWAG collection settings may differ)")
    if source.train.schedule != "auto" and source.swag.epochs != cfg.swag.epochs:
        why.append(f"{flag_of('train.schedule')} {source.train.schedule} decays the lr over the SWAG epochs too, "
                   f"so {flag_of('swag.epochs')} must stay {source.swag.epochs}")
    if cfg.swag.epochs > source.swag.epochs:
        why.append(f"{flag_of('swag.epochs')} {cfg.swag.epochs} is more than the {source.swag.epochs} it recorded")
    if source.swag.force_save >= 0 or cfg.swag.force_save >= 0:
        why.append(f"{flag_of('swag.force_save')} (early stopping on validation) cannot be replayed")
    wanted, recorded = collect_every(cfg, n_train), collect_every(source, n_train)
    if wanted is not None:
        shown = cfg.swag.every if cfg.swag.every != "auto" else f"auto ({wanted} steps)"
        if recorded is None:
            why.append(f"{flag_of('swag.every')} {shown}: it recorded epoch ends only (swag.every epoch)")
        elif wanted % recorded:
            why.append(f"{flag_of('swag.every')} {shown} is not a multiple of the {recorded} steps it recorded")
    if cfg.posterior.members > source.posterior.members:
        why.append(f"{flag_of('posterior.members')} {cfg.posterior.members} is more than its {source.posterior.members}")
    return why


@torch.no_grad()
def replay(directory: Path, names: list[str], model: nn.Module, collectors: Mapping[str, object]) -> None:
    """Load each snapshot ``names`` (in order) into the model's trainable weights and ``collect`` it into every
    collector, as the training loop did. The model's trainable weights are left at the last snapshot."""
    params = trainable_parameters(model)
    for name in names:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a snapshot of the recorded trajectory is missing")
        weights = load_safetensors(path)
        if set(weights) != set(params):
            raise ValueError(f"{path} holds other parameters than this model's trainable ones")
        for k, p in params.items():
            p.copy_(weights[k])
        for collector in collectors.values():
            collector.collect(model)


def check_source(source: RunConfig, cfg: RunConfig, n_train: int, flag: str = "--recollect-from") -> None:
    why = recollect_differences(source, cfg, n_train)
    if why:
        raise ConfigError(f"{flag}: cannot rebuild its members with these settings: " + "; ".join(why))
