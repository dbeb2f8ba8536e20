"""One training loop: a MAP phase, then a collection phase that feeds posteriors.

The loop owns the optimiser and the schedule; posterior methods only see
``collect(model)`` calls (like ``torch.optim.swa_utils.AveragedModel.update_parameters``),
so anyone can use them from their own loop instead.

Schedule (per optimiser step):
  * MAP phase (``train.epochs``): linear warm-up over ``train.warmup`` of the phase, then
    linear decay to 0 when no collection follows, or constant ``train.lr`` when it does
    (like SWA, which holds a high learning rate before averaging);
  * collection phase (``swag.epochs``): linear anneal from ``train.lr`` to ``swag.lr``
    over ``swag.anneal_epochs`` epochs, then constant ``swag.lr``; a snapshot is
    collected every ``swag.every`` steps or at each epoch end.
The MAP phase ends by reloading the best-validation-NLL epoch, as in the paper.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import metrics
from .config import RunConfig
from .data import MCQExample
from .params import trainable_parameters
from .predict import predict_logits
from .scoring import HiddenCache, Scorer

__all__ = ["TrainResult", "fit", "lr_at", "evaluate_point"]


@dataclass
class TrainResult:
    map_state: dict[str, torch.Tensor]  # trainable weights at the end of the MAP phase (best validation epoch)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    examples_per_second: float = 0.0


def lr_at(step: int, steps_per_epoch: int, cfg: RunConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based) under the schedule described in the module docstring."""
    map_steps = cfg.train.epochs * steps_per_epoch
    warmup = max(1, math.ceil(cfg.train.warmup * map_steps)) if cfg.train.warmup > 0 else 0
    base = cfg.train.lr
    if step < map_steps:
        if step < warmup:
            return base * (step + 1) / warmup
        if cfg.swag.epochs > 0:
            return base
        return base * max(0.0, (map_steps - step) / max(1, map_steps - warmup))
    into = step - map_steps
    anneal = cfg.swag.anneal_epochs * steps_per_epoch
    if into < anneal:
        frac = (into + 1) / anneal
        return base + frac * (cfg.swag.lr - base)
    return cfg.swag.lr


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    perm = torch.randperm(n, generator=generator).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate_point(scorer: Scorer, cache: HiddenCache, examples: Sequence[MCQExample], batch_size: int) -> dict:
    """Metrics of the model's current weights on ``examples``."""
    theta = {k: v.detach().clone() for k, v in trainable_parameters(scorer.model).items()}
    logits = predict_logits(scorer, list(examples), [theta], cache=cache, batch_size=batch_size)
    labels = torch.tensor([ex.answer_index for ex in examples])
    return metrics.summarize(torch.softmax(logits, -1), labels)


def fit(
    scorer: Scorer,
    train: Sequence[MCQExample],
    validation: Sequence[MCQExample],
    cfg: RunConfig,
    collectors: Sequence = (),
    on_map_done: Callable[[nn.Module], None] | None = None,
    cache: HiddenCache | None = None,
    log_path: Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train the model's trainable parameters on ``train``; collect snapshots into ``collectors``.

    Args:
        scorer: wraps the (LoRA) model and its scoring mode.
        train, validation: examples; validation picks the best MAP epoch and is logged.
        cfg: the run configuration (train and swag sections).
        collectors: posteriors whose ``collect(model)`` is called on the collection schedule.
        on_map_done: called with the model once the MAP phase is over (best epoch reloaded).
        cache: lower-layer cache shared with evaluation (the lower layers are frozen).
        log_path: per-epoch metrics are appended here as JSON lines.
        seed: data-order seed (one generator, never the global RNG).
    """
    # Dropout draws its masks from torch's global RNG: run the loop on a forked global RNG seeded from
    # ``seed``, so training is reproducible and the caller's RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.set_state(torch.Generator().manual_seed(seed + 1).get_state())
        return _fit(scorer, train, validation, cfg, collectors, on_map_done, cache, log_path, seed, progress)


def _fit(scorer, train, validation, cfg, collectors, on_map_done, cache, log_path, seed, progress) -> TrainResult:
    from tqdm.auto import tqdm

    model = scorer.model
    cache = cache if cache is not None else HiddenCache(scorer)
    cache.fill(list(train) + list(validation), cfg.eval.batch_size)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    bs, accum = cfg.train.batch_size, cfg.train.grad_accum
    steps_per_epoch = math.ceil(math.ceil(len(train) / bs) / accum)
    total_epochs = cfg.train.epochs + cfg.swag.epochs
    every = None if cfg.swag.every == "epoch" else int(cfg.swag.every)
    result = TrainResult(map_state={k: v.detach().clone() for k, v in params.items()})
    best_nll = math.inf
    step, seen, start = 0, 0, time.perf_counter()

    def log(record: dict) -> None:
        result.history.append(record)
        if log_path is not None:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    for epoch in range(total_epochs):
        collecting = epoch >= cfg.train.epochs
        model.train()
        batches = _batches(len(train), bs, generator)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{total_epochs}" + (" (SWAG)" if collecting else ""),
                   disable=not progress, leave=False, unit="batch")
        running = 0.0
        for i, rows in enumerate(bar):
            batch = scorer.batch([train[r] for r in rows])
            logits = scorer.top(cache.hidden(batch), batch)
            loss = nn.functional.cross_entropy(logits, batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {step}")
            (loss / accum).backward()
            running += loss.item()
            seen += len(rows)
            if (i + 1) % accum == 0 or i + 1 == len(batches):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, steps_per_epoch, cfg)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if collecting and every is not None and step % every == 0:
                    for posterior in collectors:
                        posterior.collect(model)
            bar.set_postfix(loss=f"{running / (i + 1):.3f}", ex_s=f"{seen / (time.perf_counter() - start):.1f}")
        model.eval()
        if collecting and every is None:
            for posterior in collectors:
                posterior.collect(model)
        record = {"epoch": epoch + 1, "phase": "swag" if collecting else "map", "train_loss": running / len(batches),
                  "lr": optimizer.param_groups[0]["lr"]}
        if validation:
            record.update({f"val_{k}": v for k, v in evaluate_point(scorer, cache, validation, cfg.eval.batch_size).items()})
        log(record)
        if not collecting and validation and record["val_nll"] < best_nll:
            best_nll = record["val_nll"]
            result.map_state = {k: v.detach().clone() for k, v in params.items()}
        if not collecting and not validation:
            result.map_state = {k: v.detach().clone() for k, v in params.items()}
        if epoch + 1 == cfg.train.epochs:
            _load(params, result.map_state)  # the paper restarts SWAG from the best MAP checkpoint
            if on_map_done is not None:
                on_map_done(model)
    if cfg.train.epochs == 0 and on_map_done is not None:
        on_map_done(model)
    result.seconds = time.perf_counter() - start
    result.examples_per_second = seen / max(result.seconds, 1e-9)
    return result


@torch.no_grad()
def _load(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(state[name])
