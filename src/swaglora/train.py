"""One training loop: a MAP phase, then a collection phase that feeds posteriors.

The loop owns the optimiser and the schedule; posterior methods only see
``collect(model)`` calls (like ``torch.optim.swa_utils.AveragedModel.update_parameters``),
so anyone can use them from their own loop instead.

The learning rate of every step is :func:`swaglora.schedule.lr_at`.
The MAP phase ends by reloading the best-validation-NLL epoch, as in the paper.

Checkpoints (``checkpoint_dir``): at each epoch end and every ``train.checkpoint_every`` steps the loop
saves everything it needs to continue exactly (weights, AdamW state, position, RNG, collectors, best MAP
state, history); ``fit(..., resume=checkpoint)`` continues from one bitwise as if never stopped. The data
order of an epoch is a function of (seed, epoch), so a resumed epoch sees the same batches. Ctrl-C stops
at the next optimiser step with a checkpoint.

Several processes (``accelerate launch``, see ``distributed.py``): each takes a slice of every global batch
and gradients are averaged before the step; only the main process collects, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed, metrics, trajectory
from .config import RunConfig
from .data import MCQExample
from .io import atomic_write_text
from .params import trainable_parameters, use_params
from .predict import predict_logits
from .schedule import lr_at
from .scoring import HiddenCache, Scorer

__all__ = ["TrainResult", "fit", "lr_at", "evaluate_point"]


@dataclass
class TrainResult:
    map_state: dict[str, torch.Tensor]  # trainable weights at the end of the MAP phase (best validation epoch)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    examples_per_second: float = 0.0
    kept_epoch: int | None = None  # swag.force_save: the (1-based) epoch whose collector states were kept


#: Examples are shuffled, then sorted by length within pools of this many batches: random batches of
#: questions were ~43% padding, pooled ones ~5%, while the batch order stays random.
LENGTH_POOL = 16


def _batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a pure function of (seed, epoch), so a resumed epoch gets the same ones."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"data/{seed}/{epoch}".encode()))
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * LENGTH_POOL
    batches = []
    for start in range(0, len(perm), pool):
        chunk = sorted(perm[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


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
    checkpoint_dir: Path | None = None,
    resume: checkpoint.Checkpoint | None = None,
    hooks: Sequence = (),
    trajectory_dir: Path | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on ``train``; collect snapshots into ``collectors``.

    Args:
        scorer: wraps the (LoRA) model and its scoring mode.
        train, validation: examples; validation picks the best MAP epoch and is logged.
        cfg: the run configuration (train and swag sections).
        collectors: posteriors whose ``collect(model)`` is called on the collection schedule.
        on_map_done: called with the model once the MAP phase is over (best epoch reloaded).
        cache: lower-layer cache shared with evaluation (the lower layers are frozen).
        log_path: per-epoch metrics are appended here as JSON lines (rewritten from the history on resume).
        seed: data-order seed (never the global RNG).
        checkpoint_dir: write checkpoints here (each epoch end, every ``train.checkpoint_every`` steps, Ctrl-C).
        resume: a checkpoint written by this function with the same arguments: continue from it. When its
            ``meta["map_done"]`` is true, ``on_map_done`` was already called and is not called again.
        hooks: training variations (e.g. a variational posterior's, :meth:`Posterior.member_training`), each a
            context manager installed while training with ``start(steps_per_epoch)``, ``tensors()`` (extra
            trained tensors outside the optimiser: checkpointed, and restored with the best epoch) and
            ``after_step(step, lr_scale)`` (called after each optimiser step with its lr / ``train.lr``).
        trajectory_dir: record the SWAG phase's snapshots and epoch ends here (:mod:`swaglora.trajectory`).

    Raises:
        FloatingPointError: a non-finite loss or weights, naming the optimiser step (no checkpoint of it is written).
        KeyboardInterrupt: after Ctrl-C, once the checkpoint of the current step is saved.
    """
    # Dropout draws its masks from torch's global RNG: run the loop on a forked global RNG seeded from
    # ``seed``, so training is reproducible and the caller's RNG state is left untouched.
    with torch.random.fork_rng(devices=[]), _Interrupt(enabled=checkpoint_dir is not None) as interrupt, \
            contextlib.ExitStack() as installed:
        torch.random.default_generator.set_state(torch.Generator().manual_seed(seed + 1).get_state())
        loop = _Loop(scorer, train, validation, cfg, collectors, on_map_done, cache, log_path, seed, progress,
                     checkpoint_dir, interrupt, [installed.enter_context(h) for h in hooks], trajectory_dir)
        if resume is not None:
            loop.restore(resume)
        return loop.run()


class _Interrupt:
    """Turns the first Ctrl-C into a request to stop at the next optimiser step (checkpointed); a second one stops now."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nswaglora: stopping after this optimiser step with a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __enter__(self) -> _Interrupt:
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


class _Loop:
    def __init__(self, scorer, train, validation, cfg, collectors, on_map_done, cache, log_path, seed, progress,
                 checkpoint_dir, interrupt, hooks=(), trajectory_dir=None) -> None:
        self.dist = distributed.current()
        self.scorer, self.train, self.validation, self.cfg = scorer, train, validation, cfg
        self.collectors, self.on_map_done, self.log_path, self.seed = list(collectors), on_map_done, log_path, seed
        self.progress = progress and self.dist.is_main
        self.checkpoint_dir, self.interrupt = checkpoint_dir, interrupt
        self.trajectory_dir = trajectory_dir if self.dist.is_main else None
        self.cache = cache if cache is not None else HiddenCache(scorer)
        self.cache.fill(list(train) + list(validation), cfg.eval.batch_size)
        self.params = trainable_parameters(scorer.model)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.steps_per_epoch = trajectory.steps_per_epoch(cfg, len(train))
        self.result = TrainResult(map_state=_clone(self.params))
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.start(self.steps_per_epoch)
        self.extra = {f"{j}/{k}": t for j, h in enumerate(self.hooks) for k, t in h.tensors().items()}
        self.best_extra = _clone(self.extra)
        # the position and running totals: exactly what a checkpoint must carry besides tensors
        self.epoch, self.batch, self.step, self.seen, self.running, self.seconds = 0, 0, 0, 0, 0.0, 0.0
        self.best_nll, self.map_done = math.inf, False
        # swag.force_save: the collectors' states at the kept epoch, and the SWA mean's best validation NLL
        self.kept: list[dict[str, torch.Tensor]] | None = None
        self.best_swa_nll = math.inf
        if cfg.swag.force_save >= 0 and self.collectors and not callable(getattr(self.collectors[0], "mean_params", None)):
            raise ValueError(f"swag.force_save needs a collector with an SWA mean (mean_params), not {type(self.collectors[0]).__name__}")

    # ------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict:
        """What must match between a checkpoint and the loop resuming from it."""
        return {"seed": self.seed, "steps_per_epoch": self.steps_per_epoch, "params": list(self.params),
                "collectors": [type(p).name for p in self.collectors], **({"extra": list(self.extra)} if self.extra else {})}

    def save(self) -> Path | None:
        bad = [n for n, p in {**self.params, **self.extra}.items() if not torch.isfinite(p).all()]
        if bad:  # never checkpoint a diverged state: the previous checkpoint stays the newest
            raise FloatingPointError(f"non-finite weights ({bad[0]}) after optimiser step {self.step}; "
                                     "not checkpointed (lower the learning rate?)")
        if self.checkpoint_dir is None or not self.dist.is_main:
            return None
        tensors = {f"param/{k}": v for k, v in self.params.items()}
        tensors.update({f"best/{k}": v for k, v in self.result.map_state.items()})
        tensors.update({f"extra/{k}": v for k, v in self.extra.items()})
        tensors.update({f"best_extra/{k}": v for k, v in self.best_extra.items()})
        optim_tensors, optim_meta = checkpoint.optimizer_state(self.optimizer)
        tensors.update(optim_tensors)
        tensors["rng/torch"] = torch.random.get_rng_state()  # dropout masks
        for j, p in enumerate(self.collectors):
            tensors.update({f"collector/{j}/{k}": v for k, v in p.state_dict().items()})
        for j, state in enumerate(self.kept or []):
            tensors.update({f"kept/{j}/{k}": v for k, v in state.items()})
        meta = {**self._identity(), "epoch": self.epoch, "batch": self.batch, "seen": self.seen, "running": self.running,
                "seconds": time.perf_counter() - self.start, "best_nll": None if math.isinf(self.best_nll) else self.best_nll,
                "map_done": self.map_done, "optimizer": optim_meta, "kept_epoch": self.result.kept_epoch,
                "best_swa_nll": None if math.isinf(self.best_swa_nll) else self.best_swa_nll,
                # as JSON lines: the checkpoint's own JSON is key-sorted, the log keeps the records' order
                "history": [json.dumps(r) for r in self.result.history]}
        return checkpoint.save(self.checkpoint_dir, self.step, tensors, meta)

    def restore(self, ckpt: checkpoint.Checkpoint) -> None:
        meta = ckpt.meta
        differs = [k for k, v in self._identity().items() if meta.get(k) != v]
        if differs:
            raise ValueError(f"checkpoint {ckpt.path} was written by another training setup ({', '.join(differs)} differ); "
                             "use --overwrite to start over")
        _load(self.params, ckpt.group("param"))
        self.result.map_state = _clone(ckpt.group("best"))
        _load(self.extra, ckpt.group("extra"))
        self.best_extra = _clone(ckpt.group("best_extra"))
        checkpoint.load_optimizer_state(self.optimizer, ckpt)
        for j, p in enumerate(self.collectors):
            p.load_state_dict(ckpt.group(f"collector/{j}"))
        torch.random.set_rng_state(ckpt.tensors["rng/torch"])
        self.result.history = [json.loads(line) for line in meta["history"]]
        self.epoch, self.batch, self.step, self.seen = meta["epoch"], meta["batch"], ckpt.step, meta["seen"]
        self.running, self.seconds, self.map_done = meta["running"], meta["seconds"], meta["map_done"]
        self.best_nll = math.inf if meta["best_nll"] is None else meta["best_nll"]
        self.best_swa_nll = math.inf if meta.get("best_swa_nll") is None else meta["best_swa_nll"]
        self.result.kept_epoch = meta.get("kept_epoch")
        if self.result.kept_epoch is not None:
            self.kept = [_clone(ckpt.group(f"kept/{j}")) for j in range(len(self.collectors))]
        if self.log_path is not None and self.dist.is_main:  # drop records logged after the checkpoint
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in self.result.history))

    def _stop(self, path: Path | None) -> None:
        where = f"; checkpoint {path}" if path is not None else ""
        print(f"swaglora: interrupted after optimiser step {self.step}{where}. Run the same command again to resume.",
              file=sys.stderr)
        raise KeyboardInterrupt

    # ------------------------------------------------------------------ training
    def log(self, record: dict) -> None:
        self.result.history.append(record)
        if self.log_path is not None and self.dist.is_main:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def run(self) -> TrainResult:
        cfg, dist, model, params = self.cfg, self.dist, self.scorer.model, self.params
        total_epochs = cfg.train.epochs + cfg.swag.epochs
        every = trajectory.collect_every(cfg, len(self.train))
        accum, ckpt_every = cfg.train.grad_accum, cfg.train.checkpoint_every
        self.start = time.perf_counter() - self.seconds
        from tqdm.auto import tqdm

        while self.epoch < total_epochs:
            epoch = self.epoch
            collecting = epoch >= cfg.train.epochs
            model.train()
            lengths = [len(e.input_ids) for e in self.scorer.encode(list(self.train))]
            batches = _batches(lengths, cfg.train.batch_size, self.seed, epoch)
            bar = tqdm(total=len(batches), initial=self.batch, disable=not self.progress, leave=False, unit="batch",
                       desc=f"epoch {epoch + 1}/{total_epochs}" + (" (SWAG)" if collecting else ""))
            stop = False
            for i in range(self.batch, len(batches)):
                loss, stop = self._forward_backward(batches[i], accum)
                if not math.isfinite(loss):
                    steps = checkpoint.steps(self.checkpoint_dir) if self.checkpoint_dir is not None else []
                    kept = f"the checkpoint of step {steps[0]} is kept" if steps else "no checkpoint was written"
                    raise FloatingPointError(f"non-finite loss {loss} at optimiser step {self.step + 1} (epoch {epoch + 1}); "
                                             f"{kept} (lower the learning rate?)")
                self.running += loss
                self.seen += len(batches[i])
                bar.update(1)
                bar.set_postfix(loss=f"{self.running / (i + 1):.3f}", ex_s=f"{self.seen / (time.perf_counter() - self.start):.1f}")
                if (i + 1) % accum and i + 1 != len(batches):
                    continue
                dist.average_gradients(list(params.values()))
                lr = lr_at(self.step, self.steps_per_epoch, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for hook in self.hooks:
                    hook.after_step(self.step, lr / cfg.train.lr)
                self.step, self.batch = self.step + 1, i + 1
                if collecting and every is not None and self.step % every == 0 and dist.is_main:
                    for posterior in self.collectors:
                        posterior.collect(model)
                    if self.trajectory_dir is not None:
                        trajectory.record(self.trajectory_dir, model, trajectory.step_name(self.step))
                if i + 1 < len(batches):  # the epoch end below checkpoints the last step of an epoch
                    path = self.save() if stop or (ckpt_every and self.step % ckpt_every == 0) else None
                    if stop:
                        self._stop(path)
            bar.close()
            self._end_epoch(epoch, collecting, every, len(batches))
            path = self.save()
            if stop or (dist.world == 1 and self.interrupt.requested):  # several processes: only the agreed flag
                self._stop(path)
        if cfg.train.epochs == 0 and self.on_map_done is not None and not self.map_done:
            self.on_map_done(model)
        if self.kept is not None:  # swag.force_save: the moments of the kept epoch, not the last one
            for p, state in zip(self.collectors, self.kept):
                p.load_state_dict(state)
        self.result.seconds = time.perf_counter() - self.start
        self.result.examples_per_second = self.seen / max(self.result.seconds, 1e-9)
        return self.result

    def _forward_backward(self, rows: list[int], accum: int) -> tuple[float, bool]:
        """Loss of this process's shard of a global batch, backward; returns (global batch loss, stop requested)."""
        dist = self.dist
        mine = dist.shard(rows)
        loss_value = 0.0
        if mine:
            batch = self.scorer.batch([self.train[r] for r in mine])
            loss = nn.functional.cross_entropy(self.scorer.top(self.cache.hidden(batch), batch), batch.labels)
            loss_value = loss.item()
            if dist.world > 1:
                # weight the shard's mean loss by its share of the global batch: the gradients averaged over
                # processes are then those of the global batch's mean loss, whatever the shard sizes
                loss = loss * (len(mine) * dist.world / len(rows))
                loss_value *= len(mine) / len(rows)
            if math.isfinite(loss_value):
                (loss / accum).backward()
        if dist.world == 1:
            return loss_value, self.interrupt.requested
        loss_value, stops = dist.sum([loss_value, float(self.interrupt.requested)])
        return loss_value, stops > 0

    def _early_stop(self, collection_epoch: int) -> dict:
        """``swag.force_save``: score the SWA mean on validation and keep the collectors' states when the rule says so."""
        if self.collectors[0].n_collected == 0:
            return {}
        with use_params(self.scorer.model, self.collectors[0].mean_params()):
            nll = evaluate_point(self.scorer, self.cache, self.validation, self.cfg.eval.batch_size)["nll"]
        choice = _swa_choice(nll, self.best_swa_nll, collection_epoch, self.cfg.swag.force_save)
        if choice is not None:
            self.kept = [_clone(p.state_dict()) for p in self.collectors]
            self.result.kept_epoch = self.epoch + 1
            self.best_swa_nll = min(nll, self.best_swa_nll)
        return {"val_swa_nll": nll, "swag_kept": choice}

    def _end_epoch(self, epoch: int, collecting: bool, every: int | None, n_batches: int) -> None:
        cfg, model = self.cfg, self.scorer.model
        model.eval()
        if collecting and every is None and self.dist.is_main:
            for posterior in self.collectors:
                posterior.collect(model)
        if collecting and self.trajectory_dir is not None:
            trajectory.record(self.trajectory_dir, model, trajectory.epoch_name(epoch + 1))
        record = {"epoch": epoch + 1, "phase": "collect" if collecting else "fit", "train_loss": self.running / n_batches,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        if self.validation and self.dist.is_main:
            record.update({f"val_{k}": v for k, v in evaluate_point(self.scorer, self.cache, self.validation, cfg.eval.batch_size).items()})
        if collecting and cfg.swag.force_save >= 0 and self.collectors and self.validation and self.dist.is_main:
            record.update(self._early_stop(epoch - cfg.train.epochs))
        self.log(record)
        if not collecting and not self.validation:
            self.result.map_state, self.best_extra = _clone(self.params), _clone(self.extra)
        elif not collecting:
            # the main process's validation decides, so that every process keeps the same best state
            nll = self.dist.from_main(record.get("val_nll", 0.0))
            if nll < self.best_nll:
                self.best_nll, self.result.map_state, self.best_extra = nll, _clone(self.params), _clone(self.extra)
        if epoch + 1 == cfg.train.epochs:
            _load(self.params, self.result.map_state)  # the paper restarts SWAG from the best MAP checkpoint
            _load(self.extra, self.best_extra)
            if self.on_map_done is not None:
                self.on_map_done(model)
            self.map_done = True
        self.epoch, self.batch, self.running = epoch + 1, 0, 0.0


def _swa_choice(nll: float, best: float, collection_epoch: int, force_save: int) -> str | None:
    """The SWAG-LoRA code's rule (train.py, ``force_save``) for one collection epoch (0-based): ``"best"`` when the SWA
    mean's validation NLL improves on the best so far, else ``"forced"`` at epoch ``force_save``, else None (the
    earlier kept state stays)."""
    if nll < best:
        return "best"
    return "forced" if collection_epoch == force_save else None


def _clone(tensors) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


@torch.no_grad()
def _load(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(state[name])
