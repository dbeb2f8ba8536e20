"""The one train/evaluate pipeline that every method goes through.

config -> data -> model + LoRA -> train members (collect posteriors) -> save ->
draw S parameter sets per table row -> predict on every evaluation set -> metrics files.

Run directory layout::

    RUN/config.json
    RUN/members/<i>/adapter/                 PEFT adapter (MAP weights) for other tools
    RUN/members/<i>/posteriors/<method>/     posterior_config.json + posterior.safetensors
    RUN/members/<i>/train_log.jsonl          per-epoch train loss and validation metrics
    RUN/members/<i>/done.json                written last: a member with it is never retrained
    RUN/eval/<set>/<row>/metrics.json        accuracy, ece, nll, brier, n (+ method details)
    RUN/eval/<set>/<row>/predictions.jsonl   id, probs (label order), labels, answer, uncertainties
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__, metrics
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict
from .calibration import apply_temperature, fit_temperature
from .data import BLOB_SHIFT_SETS, MCQExample, limit, resolve_dataset, split_validation, task_splits
from .io import apply_umask, atomic_write_json, atomic_write_text, make_temp_dir, read_json
from .models import LoadedModel, add_lora, decoder_parts, init_lora, load_model, model_fingerprint, runtime_info
from .params import trainable_parameters, use_params
from .posterior import Ensemble, Posterior, Row, base_rows, get_method, load_posterior, reference_row, row, row_names
from .predict import predict_logits, predict_probs
from .scoring import HiddenCache, LetterHead, Scorer
from .train import fit

if TYPE_CHECKING:
    from . import validate

__all__ = ["Session", "open_session", "train_members", "evaluate_run", "run", "set_dir_name"]


#: ``--swag-scale auto`` chooses among these covariance scales by validation NLL.
SCALE_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def set_dir_name(name: str) -> str:
    """A filesystem-safe directory name for an evaluation set (no path can escape the run directory)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")
    return safe or "set"


@dataclass
class Session:
    """Everything loaded once per process: model, scorer, lower-layer cache and data."""

    cfg: RunConfig
    lm: LoadedModel
    model: nn.Module
    scorer: Scorer
    cache: HiddenCache
    train: list[MCQExample] = field(default_factory=list)
    validation: list[MCQExample] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, Any]:
        """Stored with every posterior; loading refuses a posterior whose metadata differs."""
        lora = self.cfg.lora
        return {
            "base_model": self.lm.name,
            "base_fingerprint": model_fingerprint(self.model),
            "lora": f"r={lora.r},alpha={lora.alpha},targets={lora.targets},layers={lora.layers}",
            "scoring": self.scorer.mode,
        }


def _training_data(cfg: RunConfig) -> tuple[list[MCQExample], list[MCQExample]]:
    seed = cfg.train.seed
    if cfg.data.data:
        train, validation = split_validation(resolve_dataset(cfg.data.data, "train"), cfg.data.val_fraction, seed)
    else:
        splits = task_splits(cfg.data.task)
        train = resolve_dataset(cfg.data.task, splits.train)
        if splits.validation and splits.validation != splits.test:
            validation = resolve_dataset(cfg.data.task, splits.validation)
        else:  # the paper's choice when there is no separate validation split: a seeded 20% of train
            train, validation = split_validation(train, cfg.data.val_fraction, seed)
    train = limit(train, cfg.data.train_limit or None, seed)
    validation = limit(validation, cfg.data.val_limit or None, seed)
    return train, validation


def open_session(cfg: RunConfig, lm: LoadedModel | None = None, with_data: bool = True) -> Session:
    """Load the model (or reuse ``lm``), add LoRA and set up scoring and data."""
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    lm = lm if lm is not None else load_model(cfg.model)
    model = add_lora(lm.model, cfg.lora, seed=cfg.train.seed)
    scorer = Scorer(model, lm.tokenizer, lm.scoring, max_length=cfg.model.max_length, train_head=cfg.model.train_head)
    session = Session(cfg=cfg, lm=lm, model=model, scorer=scorer, cache=HiddenCache(scorer))
    if with_data:
        session.train, session.validation = _training_data(cfg)
        check_schedule(cfg, len(session.train))
    return session


def check_schedule(cfg: RunConfig, n_train: int) -> None:
    """Refuse a SWAG rank the collection schedule can never fill (the low-rank part would silently shrink)."""
    if cfg.swag.epochs == 0 or cfg.swag.max_rank == 0:
        return
    steps_per_epoch = -(-(-(-n_train // cfg.train.batch_size)) // cfg.train.grad_accum)
    if cfg.swag.every == "epoch":
        snapshots = cfg.swag.epochs
    else:  # the loop collects when the global step count is a multiple of ``every``, in the SWAG phase only
        every, map_steps = int(cfg.swag.every), cfg.train.epochs * steps_per_epoch
        snapshots = (map_steps + cfg.swag.epochs * steps_per_epoch) // every - map_steps // every
    if cfg.swag.max_rank > snapshots:
        raise ValueError(f"swag.max_rank={cfg.swag.max_rank} is larger than the {snapshots} snapshots the schedule "
                         f"collects (swag.epochs={cfg.swag.epochs}, swag.every={cfg.swag.every}, {steps_per_epoch} "
                         "steps per epoch); lower --swag-max-rank or collect more often")


@torch.no_grad()
def reset_trainable(session: Session, seed: int) -> None:
    """Fresh LoRA init for an ensemble member (lora_A kaiming-uniform from a seeded generator, lora_B zero,
    letter head back to the LM-head rows)."""
    head = decoder_parts(session.model).lm_head.weight
    for module in session.model.modules():
        if isinstance(module, LetterHead):
            module.weight.copy_(head[module.token_ids])
    init_lora(session.model, seed)


def _needed_posteriors(rows: list[str]) -> list[str]:
    """The methods whose posteriors the rows use, trained or fitted along with each member."""
    return sorted({row(r).method for r in rows if not row(r).before_training})


def member_seed(cfg: RunConfig, index: int) -> int:
    return cfg.train.seed * 1000 + index


def _save_adapter(model: nn.Module, directory: Path) -> None:
    """Save the PEFT adapter atomically (temporary directory, then rename)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(".adapter-", directory.parent)
    try:
        model.save_pretrained(tmp)
        apply_umask(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_members(session: Session, run_dir: Path, members: list[int], rows: list[str], progress: bool = True) -> None:
    """Train each member (its own seed), collecting the posteriors the table rows need; skip finished ones.

    An unfinished member resumes from its newest valid checkpoint in ``members/<i>/checkpoints/`` (bitwise as
    if never stopped). Under ``accelerate launch`` every process trains (data parallel); only the main one
    writes files.
    """
    from . import checkpoint, distributed

    cfg = session.cfg
    dist = distributed.current()
    names = _needed_posteriors(rows)
    for index in members:
        out = run_dir / "members" / str(index)
        if (out / "done.json").is_file():
            continue
        seed = member_seed(cfg, index)
        reset_trainable(session, seed)
        model = session.model
        meta = session.metadata
        resume = checkpoint.latest(out / "checkpoints")
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if resume is None:
                (out / "train_log.jsonl").unlink(missing_ok=True)
                for base in base_rows():  # the model before fine-tuning
                    get_method(base.method).build(model, cfg).save(out / "posteriors" / base.saved, meta)
            else:
                print(f"swaglora: member {index}: resuming from {resume.path}", file=sys.stderr)
        posteriors = {n: get_method(n).build(model, cfg) for n in names}
        along = [p for p in posteriors.values() if p.trajectory]
        if resume is not None and resume.meta["map_done"] and dist.is_main:
            # post-hoc posteriors were fitted and saved at the end of the MAP phase, before that checkpoint
            for name, p in posteriors.items():
                if not p.trajectory:
                    posteriors[name] = load_posterior(out / "posteriors" / name, model=model, expected_metadata=meta)

        def at_map_end(m: nn.Module) -> None:
            if not dist.is_main:
                return
            for name, p in posteriors.items():
                if not p.trajectory:
                    fit_posthoc(session, p)
                    p.save(out / "posteriors" / name, meta)  # now: a resumed run after this point reloads it

        result = fit(session.scorer, session.train, session.validation, cfg, collectors=along, on_map_done=at_map_end,
                     cache=session.cache, log_path=out / "train_log.jsonl", seed=seed, progress=progress,
                     checkpoint_dir=out / "checkpoints", resume=resume)
        with torch.no_grad():  # the adapter on disk holds the MAP weights, not the last SWAG-phase ones
            params = trainable_parameters(model)
            for k, v in result.map_state.items():
                params[k].copy_(v)
        if dist.is_main:
            for name, p in posteriors.items():
                p.save(out / "posteriors" / name, meta)
            _save_adapter(model, out / "adapter")
            atomic_write_json(out / "done.json", {"seed": seed, "seconds": result.seconds,
                                                  "examples_per_second": result.examples_per_second,
                                                  "n_train": len(session.train), "library_version": __version__})
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a finished member is never resumed
        dist.wait()


def fit_posthoc(session: Session, posterior: Posterior) -> None:
    """Collect and fit a post-hoc posterior (MAP, MC dropout, Laplace) at the model's current weights."""
    size = session.cfg.train.batch_size
    posterior.collect(session.model)
    posterior.fit(session.model, [session.train[i : i + size] for i in range(0, len(session.train), size)],
                  session_loss(session))


def add_posthoc_posterior(session: Session, member: Path, name: str) -> None:
    """Fit a post-hoc method that a finished member was trained without, at that member's saved MAP weights,
    so ``evaluate --methods laplace`` works on any run without retraining."""
    cls = get_method(name)
    if cls.trajectory:
        raise ValueError(f"{member} has no '{name}' posterior and it can only be collected during training; "
                         f"retrain with it in --methods")
    if not session.train:
        raise ValueError(f"fitting '{name}' for {member} needs the training data of the run")
    point = reference_row().saved  # the member's fine-tuned weights
    map_weights = load_posterior(member / "posteriors" / point, model=session.model, expected_metadata=session.metadata)
    with use_params(session.model, map_weights.sample()):
        posterior = cls.build(session.model, session.cfg)
        fit_posthoc(session, posterior)
    posterior.save(member / "posteriors" / name, session.metadata)


def session_loss(session: Session):
    """``loss_fn(model, examples) -> (logits, labels)`` for post-hoc methods (Laplace)."""

    def loss_fn(model: nn.Module, examples: list[MCQExample]):
        batch = session.scorer.batch(examples)
        return session.scorer.top(session.cache.hidden(batch), batch), batch.labels

    return loss_fn


def _member_dirs(run_dirs: list[Path]) -> list[Path]:
    found = []
    for run in run_dirs:
        for member in sorted((run / "members").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
            if (member / "done.json").is_file():
                found.append(member)
    if not found:
        raise FileNotFoundError(f"no finished members under {', '.join(str(r) for r in run_dirs)} (train first)")
    return found


def check_posteriors(session: Session, members: list[Path], rows: list[str]) -> None:
    """Load every saved posterior the rows use, of every member, before any row is evaluated: a damaged file
    or a run of another base model or LoRA setup fails at once."""
    for member in members:
        for name in sorted({row(r).saved for r in rows}):
            if (member / "posteriors" / name).is_dir():
                load_posterior(member / "posteriors" / name, model=session.model, expected_metadata=session.metadata)


def eval_sets(session: Session) -> list[tuple[str, str, list[MCQExample]]]:
    """(name, role, examples) for validation, the in-distribution test split and every shift set."""
    return [("validation", "validation", session.validation), *eval_data(session.cfg)]


def eval_data(cfg: RunConfig) -> list[tuple[str, str, list[MCQExample]]]:
    """(name, role, examples) for the in-distribution test split and every shift set."""
    lim = cfg.eval.limit or None
    seed = EVAL_SUBSET_SEED
    sets = []
    if cfg.eval.test:
        name = cfg.eval.test
        sets.append((_display_name(name), "test", limit(resolve_dataset(name, "test"), lim, seed)))
    elif cfg.data.data:
        name = cfg.data.data  # user data without a test set: validation only (add --test-data)
    else:
        name = cfg.data.task
        split = task_splits(cfg.data.task).test if cfg.eval.split == "test" else cfg.eval.split
        sets.append((name, "test", limit(resolve_dataset(cfg.data.task, split), lim, seed)))
    specs = [s.strip() for s in cfg.eval.shift.split(",") if s.strip()]
    specs = [x for spec in specs for x in (BLOB_SHIFT_SETS if spec == "blob" else (spec,))]  # BLoB's protocol
    for spec in dict.fromkeys(specs):
        if spec == name:
            continue
        sets.append((_display_name(spec), "shift", limit(resolve_dataset(spec, "test"), lim, seed)))
    return sets


def check_eval_split(cfg: RunConfig) -> None:
    """Refuse an in-distribution evaluation split that the run trains on or tunes on (the validation split
    chooses the MAP epoch, the temperature, the auto scale and the abstention threshold, so its numbers are
    optimistic), unless ``eval.allow_tuning_split`` opts in; then warn."""
    if cfg.data.data or cfg.eval.test:
        return
    splits = task_splits(cfg.data.task)
    split = {"train": splits.train, "validation": splits.validation, "test": splits.test}.get(cfg.eval.split, cfg.eval.split)
    tuning = {splits.train} | ({splits.validation} if splits.validation != splits.test else set())
    if split not in tuning:
        return
    what = f"--split {cfg.eval.split} evaluates on the {cfg.data.task} split {split!r} that the run trains or validates on"
    if not cfg.eval.allow_tuning_split:
        raise ConfigError(f"{what} (it picks the MAP epoch, temperature, auto scale and abstention threshold); "
                          f"evaluate on --split test, or pass --allow-tuning-split to do it anyway")
    print(f"swaglora: WARNING: {what}; its numbers are optimistic, not a test result", file=sys.stderr)


#: Evaluation subsets (``--eval-limit``) are drawn with this seed whatever the training seed, so runs with
#: different seeds are scored on the same questions and their spread is the training's alone.
EVAL_SUBSET_SEED = 0


def _display_name(spec: str) -> str:
    """Short name of a data spec: a file's stem, else the spec itself."""
    return Path(spec).name.split(".")[0] if spec.endswith((".jsonl", ".jsonl.gz")) else spec


def _write_eval(out: Path, examples: list[MCQExample], sample_probs: torch.Tensor, info: dict) -> dict:
    labels = torch.tensor([ex.answer_index for ex in examples])
    probs = metrics.predictive(sample_probs)
    result = {**metrics.summarize(sample_probs, labels), **info}
    unc = metrics.uncertainty(sample_probs)
    lines = []
    for i, ex in enumerate(examples):
        p = probs[i, : ex.n_choices]
        pred = int(p.argmax())
        lines.append(json.dumps({
            "id": ex.id, "question": ex.question, "probs": [round(float(x), 6) for x in p], "labels": list(ex.labels),
            "answer": ex.answer, "prediction": ex.labels[pred], "confidence": float(p[pred]), "correct": pred == ex.answer_index,
            "total_entropy": float(unc["total_entropy"][i]), "expected_entropy": float(unc["expected_entropy"][i]),
            "mutual_information": float(unc["mutual_information"][i]),
        }))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out / "metrics.json", result)
    return result


def draw_generator(member_seed: int, method: str, eval_set: str | None = None) -> torch.Generator:
    """The generator of the random draws of one member posterior: a function of the member's training seed
    (:func:`member_seed`, so of the run's seed and the member index), the posterior and the evaluation set
    only, never of paths or time.

    ``eval_set=None`` seeds the posterior's *weight* draws, which are the same for every evaluation set (and
    for ``swaglora predict``): the S models of the Bayesian model average are one set of models, so a
    question gets the same probabilities in whichever set it is scored, and in-distribution and shift sets
    are compared under the same draws (OOD detection). Randomness inside a forward pass (MC-dropout masks,
    the linearised predictive's logit samples) uses the generator of the set.
    """
    key = f"{member_seed}/{method}" if eval_set is None else f"{member_seed}/{method}/{eval_set}"
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def evaluate_run(session: Session, run_dirs: list[Path], rows: list[str], out_dir: Path, progress: bool = True) -> list[dict]:
    """Evaluate every table row on every evaluation set with the shared prediction path.

    A row's posterior is one member's saved posterior, or the equal-weight :class:`Ensemble` of every member's
    (MultiSWAG, deep ensembles); either goes through :func:`predict.predict_probs`. Member ``i``'s weights are
    drawn with :func:`draw_generator` of its own seed (the same weights for every set), so the ``swag`` row and
    member 0 of ``multiswag`` are the same S draws. A row samples with its posterior's own default scale unless
    the row fixes one (``Row.scale``) or the user set ``swag.scale`` for posteriors that take it.
    """
    from tqdm.auto import tqdm

    members = _member_dirs(run_dirs)
    check_posteriors(session, members, rows)
    sets = [(n, r, ex) for n, r, ex in eval_sets(session) if ex]
    bar = tqdm(desc="evaluate", disable=not progress, leave=False, unit="ex")
    evaluation = _RowEvaluation(session, members, sets, out_dir, bar)
    results = [result for name in rows for result in evaluation.write_row(row(name))]
    bar.close()
    return results


class _RowEvaluation:
    """The table rows of one evaluation: posteriors of the members, the auto scale, predictions, files."""

    def __init__(self, session: Session, members: list[Path], sets: list, out_dir: Path, bar: Any) -> None:
        self.session, self.cfg, self.members, self.sets, self.out_dir, self.bar = session, session.cfg, members, sets, out_dir, bar
        self.seeds = [int(read_json(m / "done.json")["seed"]) for m in members]
        self.chosen: dict[tuple, float] = {}

    def posterior(self, index: int, spec: Row) -> Posterior:
        directory = self.members[index] / "posteriors" / spec.saved
        if not directory.is_dir():
            add_posthoc_posterior(self.session, self.members[index], spec.method)
        return load_posterior(directory, model=self.session.model, expected_metadata=self.session.metadata)

    def predict(self, posterior: Posterior, used: range, spec: Row, examples: list[MCQExample], n: int,
                scale: float | None, set_name: str | None = None, progress: Any = None) -> torch.Tensor:
        """Sample probabilities ``[S, N, C]``: weights drawn per member seed, in-forward randomness per set."""
        weights = [draw_generator(self.seeds[i], spec.saved) for i in used]
        return predict_probs(self.session.scorer, examples, posterior, n, weights if len(weights) > 1 else weights[0],
                             forward_generator=draw_generator(self.seeds[used[0]], spec.saved, set_name) if set_name else None,
                             cache=self.session.cache, batch_size=self.cfg.eval.batch_size, scale=scale,
                             linearized=spec.linearized, progress=progress)

    def auto_scale(self, spec: Row, n: int) -> float:
        """``--swag-scale auto``: the scale of the grid with the lowest validation NLL (member 0, with the draws
        its evaluation uses)."""
        key = (spec.saved, n)
        if key not in self.chosen:
            validation = [(set_name, ex) for set_name, role, ex in self.sets if role == "validation"]
            if not validation:
                raise ValueError("--swag-scale auto needs a validation set")
            examples = validation[0][1]
            labels = torch.tensor([ex.answer_index for ex in examples])
            posterior = self.posterior(0, spec)
            scores = {scale: metrics.nll(metrics.predictive(self.predict(posterior, range(1), spec, examples, n, scale)), labels)
                      for scale in SCALE_GRID}
            self.chosen[key] = min(scores, key=scores.get)
            atomic_write_json(self.out_dir / "eval" / f"scale-{spec.saved}.json", {"grid_nll": scores, "chosen": self.chosen[key]})
        return self.chosen[key]

    def write_row(self, spec: Row) -> list[dict]:
        """Predict the row on every set (and its temperature-scaled variant), write and return the results."""
        cfg, method = self.cfg, get_method(spec.method)
        n, scale, setting = method.samples_for(cfg, spec), spec.scale, cfg.swag.scale_setting
        if scale is None and spec.sampled and method.takes_swag_scale:
            scale = self.auto_scale(spec, n) if setting == "auto" else setting
        used = range(len(self.members)) if spec.all_members else range(1)
        start = time.perf_counter()
        parts = [self.posterior(i, spec) for i in used]
        posterior = Ensemble(parts) if spec.all_members else parts[0]
        probs = {set_name: self.predict(posterior, used, spec, examples, n, scale, set_name, self.bar)
                 for set_name, _, examples in self.sets}
        common = {"n_members": len(used), "scale": (scale if scale is not None else parts[0].default_scale) if spec.sampled else spec.scale,
                  "seconds": time.perf_counter() - start, "seed": cfg.train.seed}
        variants = [(spec.name, probs, {})]
        if cfg.eval.calibrate == "temperature":
            variants.append((f"{spec.name}+ts", *_temperature_scaled(probs, self.sets)))
        results = []
        for label, set_probs, extra in variants:
            for set_name, role, examples in self.sets:
                info = {"method": label, "eval_set": set_name, "role": role, "n_samples": set_probs[set_name].shape[0],
                        **common, **extra}
                out = self.out_dir / "eval" / set_dir_name(set_name) / label
                results.append(_write_eval(out, examples, set_probs[set_name], info))
        return results


def _bma_log_probs(probs: torch.Tensor, examples: list[MCQExample]) -> torch.Tensor:
    """``log`` of the BMA predictive ``[N, C]`` of sample probabilities ``[S, N, C]``: ``-inf`` exactly at the
    absent choices (beyond an example's choice count), present ones at least ``log`` of the smallest normal
    float, so that fitting and applying a temperature see the same choices."""
    present = torch.arange(probs.shape[-1])[None, :] < torch.tensor([ex.n_choices for ex in examples])[:, None]
    log_pred = metrics.predictive(probs).double().clamp_min(torch.finfo(torch.float64).tiny).log()
    return log_pred.masked_fill(~present, float("-inf"))


def _temperature_scaled(probs: dict[str, torch.Tensor], sets) -> tuple[dict[str, torch.Tensor], dict]:
    """Temperature scaling on top of any method: one T fitted on the validation predictive by NLL
    (logits = log of the BMA-averaged probabilities, absent choices ``-inf``), applied to every set."""
    validation = [(name, ex) for name, role, ex in sets if role == "validation"]
    if not validation:
        raise ValueError("--calibrate temperature needs a validation set")
    name, examples = validation[0]
    labels = torch.tensor([ex.answer_index for ex in examples])
    temperature = fit_temperature(_bma_log_probs(probs[name], examples), labels)
    scaled = {}
    for set_name, _, set_examples in sets:
        logits = apply_temperature(_bma_log_probs(probs[set_name], set_examples), temperature)
        scaled[set_name] = torch.softmax(logits, -1)[None].float()
    return scaled, {"temperature": temperature}


#: Settings that may change between a run and its resumption: they do not change any result.
RESULT_NEUTRAL = {"train.checkpoint_every", "train.threads", "model.device"}

#: Version of the run-directory layout; a run written by a newer swaglora is refused, not misread.
RUN_FORMAT_VERSION = 1


def check_run_format(run_dir: Path) -> None:
    marker = run_dir / "swaglora_run.json"
    if marker.is_file():
        version = read_json(marker).get("format_version")
        if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
            raise ValueError(f"{run_dir} was written with run format {version!r}, newer than this swaglora "
                             f"{__version__} understands ({RUN_FORMAT_VERSION}); upgrade swaglora")


def write_run_marker(run_dir: Path, **extra: Any) -> None:
    """Mark ``run_dir`` as swaglora's (``swaglora_run.json``): only such a directory is written into again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "swaglora_run.json",
                      {"format_version": RUN_FORMAT_VERSION, "library_version": __version__, **extra})


def save_config(cfg: RunConfig, run_dir: Path, data_sha256: dict[str, str] | None = None) -> None:
    """Write config.json (refusing a different result-changing config) and the run marker with the sha256 of
    every data file the run reads."""
    check_run_format(run_dir)
    path = run_dir / "config.json"
    data = config_to_dict(cfg)
    if path.is_file():
        saved = read_json(path)
        if saved != data:
            defaults = config_to_dict(RunConfig())  # a key missing from an older config.json means its default
            changed = sorted(f"{s}.{k}" for s in data for k in data[s]
                             if saved.get(s, {}).get(k, defaults[s][k]) != data[s][k])
            if any(not c.startswith("eval.") and c not in RESULT_NEUTRAL for c in changed):
                raise ValueError(f"{run_dir} holds a run with a different config ({', '.join(changed)}); "
                                 "use another --out or --overwrite")
    write_run_marker(run_dir, data_sha256=data_sha256 or {}, runtime=runtime_info(cfg.model))
    atomic_write_json(path, data)


def load_run_config(run_dir: Path) -> RunConfig:
    check_run_format(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a swaglora run directory (no config.json)")
    return config_from_dict(read_json(run_dir / "config.json"), source=str(run_dir / "config.json"))


def requested_rows(cfg: RunConfig) -> list[str]:
    """zero-shot and the rows of ``--methods``, in order; an unknown name raises ValueError."""
    wanted = row_names() if cfg.eval.methods.strip() == "all" else [r.strip() for r in cfg.eval.methods.split(",") if r.strip()]
    rows = [base.name for base in base_rows()] + wanted
    for name in rows:
        row(name)  # an unknown name raises ValueError
    check_eval_split(cfg)  # every command that trains or evaluates a run asks for its rows first
    return list(dict.fromkeys(rows))


def row_unavailable(cfg: RunConfig, name: str) -> str | None:
    """Why a table row cannot be built with these settings, or None."""
    spec = row(name)
    if cfg.swag.epochs == 0 and get_method(spec.method).trajectory:
        return "needs SWAG epochs (--swag-epochs is 0)"
    if cfg.swag.members < 2 and spec.all_members:
        return f"needs --members 2 or more (--members is {cfg.swag.members})"
    return None


def table_rows(cfg: RunConfig) -> list[str]:
    """The rows of the results table: the requested ones these settings can build."""
    return [r for r in requested_rows(cfg) if row_unavailable(cfg, r) is None]


def run(cfg: RunConfig, run_dir: Path, progress: bool = True, overwrite: bool = False,
        plan: validate.Plan | None = None) -> list[dict]:
    """The main job: train the members, evaluate every row on every set, write the results.

    ``plan``: what :func:`swaglora.validate.preflight` returned for this job (checked here when None).
    """
    from . import validate
    from .distributed import current

    dist = current()
    plan = plan or validate.preflight(cfg, "run", run_dir, overwrite=overwrite)
    rows = plan.rows
    prepare_run_dir(cfg, run_dir, overwrite, plan.data_sha256)
    session = open_session(cfg)
    train_members(session, run_dir, list(range(cfg.swag.members)), rows, progress=progress)
    if not dist.is_main:  # under accelerate launch: training is data parallel, evaluation runs once
        return []
    return evaluate_run(session, [run_dir], rows, run_dir, progress=progress)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, overwrite: bool, data_sha256: dict[str, str] | None = None) -> None:
    """``--overwrite`` and the config file, done by the main process only (others wait for it).

    Only a directory carrying the run marker is ever deleted or written into (:func:`validate.check_out_dir`).
    """
    from .distributed import current
    from .validate import check_out_dir

    dist = current()
    if dist.is_main:
        check_out_dir(run_dir, overwrite)
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        save_config(cfg, run_dir, data_sha256)
    dist.wait()


def base_examples(cfg: RunConfig) -> list[MCQExample]:
    """The examples a zero-shot ``evaluate`` scores: ``--data``, or ``--task`` at ``--split``."""
    spec = cfg.data.data or cfg.data.task
    split = cfg.eval.split if cfg.data.data or cfg.eval.split != "test" else task_splits(cfg.data.task).test
    return limit(resolve_dataset(spec, split), cfg.eval.limit or None, EVAL_SUBSET_SEED)


def evaluate_base(session: Session, out_dir: Path, progress: bool = True) -> list[dict]:
    """Zero-shot evaluation of the base model (LoRA at init is the identity) on ``--data`` or ``--task/--split``;
    writes ``out_dir/metrics.json`` and ``out_dir/predictions.jsonl``."""
    cfg = session.cfg
    spec = cfg.data.data or cfg.data.task
    examples = base_examples(cfg)
    thetas = [{k: v.detach().clone() for k, v in trainable_parameters(session.model).items()}]
    logits = predict_logits(session.scorer, examples, thetas, cache=session.cache, batch_size=cfg.eval.batch_size)
    info = {"method": base_rows()[0].name, "eval_set": spec, "role": "test", "n_samples": 1, "n_members": 1, "scale": None,
            "seconds": None, "seed": cfg.train.seed, "model": session.lm.name, "scoring": session.scorer.mode}
    return [_write_eval(out_dir, examples, torch.softmax(logits, -1), info)]
