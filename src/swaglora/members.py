"""Training the members of a run: the session (model, scorer, cache, data), each member's training with the
posteriors collected along it, and post-hoc fitting."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, distributed, trajectory
from ._version import __version__
from .config import RunConfig, flag_of
from .data import MCQExample
from .io import atomic_write_json, atomic_write_text, read_json
from .models import LoadedModel, add_lora, init_lora, load_model, model_fingerprint
from .params import trainable_parameters, use_params
from .posterior import CONFIG_NAME, Posterior, base_rows, get_method, load_posterior, reference_row, row
from .rundir import save_adapter
from .scoring import HiddenCache, Scorer
from .selection import training_data
from .train import fit

__all__ = ["Session", "open_session", "check_schedule", "member_seed", "draw_generator", "train_members",
           "needed_posteriors", "own_member_indices", "train_own_member", "recollect_member", "fit_posthoc", "add_posthoc_posterior", "saved_settings_differ"]


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


def open_session(cfg: RunConfig, lm: LoadedModel | None = None, with_data: bool = True) -> Session:
    """Load the model (or reuse ``lm``), add LoRA and set up scoring and data."""
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    lm = lm if lm is not None else load_model(cfg.model)
    model = add_lora(lm.model, cfg.lora, seed=cfg.train.seed)
    scorer = Scorer(model, lm.tokenizer, lm.scoring, max_length=cfg.model.max_length, train_head=cfg.model.train_head)
    session = Session(cfg=cfg, lm=lm, model=model, scorer=scorer, cache=HiddenCache(scorer))
    if with_data:
        session.train, session.validation = training_data(cfg)
        check_schedule(cfg, len(session.train))
    return session


def _every(cfg: RunConfig, n_train: int) -> int | str | None:
    """``swag.every`` as the member collects it (``auto`` resolved; done.json records it); None without SWAG phase."""
    if cfg.swag.epochs == 0:
        return None
    every = trajectory.collect_every(cfg, n_train)
    return "epoch" if every is None else every


def check_schedule(cfg: RunConfig, n_train: int) -> None:
    """Refuse a SWAG rank the collection schedule can never fill (the low-rank part would silently shrink)."""
    if cfg.swag.epochs == 0 or cfg.swag.max_rank == 0:
        return
    steps_per_epoch = trajectory.steps_per_epoch(cfg, n_train)
    snapshots = len(trajectory.snapshot_names(cfg, n_train))
    if cfg.swag.max_rank > snapshots:
        raise ValueError(f"swag.max_rank={cfg.swag.max_rank} is larger than the {snapshots} snapshots the schedule "
                         f"collects (swag.epochs={cfg.swag.epochs}, swag.every={cfg.swag.every}, {steps_per_epoch} "
                         f"steps per epoch on {n_train} training questions); lower --swag-max-rank, collect more "
                         "often or train more SWAG epochs")


def needed_posteriors(rows: list[str]) -> list[str]:
    """The methods whose posteriors the rows use (and those their post-hoc fits start from), trained or fitted
    along with each member."""
    methods = {row(r).method for r in rows if not row(r).before_training}
    return sorted(methods | {get_method(m).fitted_at for m in methods if get_method(m).fitted_at})


def member_seed(cfg: RunConfig, index: int) -> int:
    return cfg.train.seed * 1000 + index


def draw_generator(member_seed: int, method: str, eval_set: str | None = None) -> torch.Generator:
    """The generator of the random draws of one member posterior: a function of the member's training seed
    (:func:`member_seed`, so of the run's seed and the member index), the posterior and the evaluation set
    only, never of paths or time.

    ``eval_set=None`` seeds the posterior's *weight* draws, which are the same for every evaluation set (and
    for ``swaglora predict``): the S models of the Bayesian model average are one set of models, so a
    question gets the same probabilities in whichever set it is scored, and in-distribution and shift sets
    are compared under the same draws (OOD detection). Randomness inside a forward pass (MC-dropout masks,
    the linearised predictive's logit samples) uses the generator of the set. A post-hoc fit that draws
    weights (TFB's search of its noise level) gets the weight-draw generator too (:func:`fit_posthoc`).
    """
    key = f"{member_seed}/{method}" if eval_set is None else f"{member_seed}/{method}/{eval_set}"
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def train_members(session: Session, run_dir: Path, members: list[int], rows: list[str], progress: bool = True) -> None:
    """Train each member (its own seed), collecting the posteriors the table rows need; skip finished ones.

    An unfinished member resumes from its newest valid checkpoint in ``members/<i>/checkpoints/`` (bitwise as
    if never stopped). Under ``accelerate launch`` every process trains (data parallel); only the main one
    writes files. Methods that train their own member (BLoB) are trained after that, see :func:`train_own_member`.
    """
    cfg = session.cfg
    needed = needed_posteriors(rows)
    # a post-hoc fit at another posterior's point (``fitted_at``) waits for that posterior: it is fitted when
    # first evaluated (:func:`add_posthoc_posterior`)
    names = [n for n in needed if not get_method(n).trains_own_member and not get_method(n).fitted_at]
    for index in members:
        out = run_dir / "members" / str(index)
        if not (out / "done.json").is_file():
            train_member(session, out, index, names, progress)
    for index in members:
        for name in needed:
            if get_method(name).trains_own_member and index in own_member_indices(name, rows, members):
                train_own_member(session, run_dir / "members" / str(index), name, member_seed(cfg, index), progress)


def own_member_indices(name: str, rows: list[str], members: list[int]) -> list[int]:
    """The members for which method ``name``, which trains its own member (map-matched, BLoB), trains it: every
    member when a requested row mixes all members' posteriors of it (``blob-ensemble``), else member 0 only,
    the one a single-member row uses (``map-matched``, ``blob``, ``tfb-blob``). A later run with an ensemble
    row trains the others then (finished ones are kept)."""
    mixes = any(row(r).all_members and (row(r).method == name or get_method(row(r).method).fitted_at == name)
                for r in rows if not row(r).before_training)
    return list(members) if mixes else [i for i in members if i == 0]


def train_member(session: Session, out: Path, index: int, names: list[str], progress: bool = True) -> None:
    """Train member ``index`` into ``out`` (resuming from its checkpoints), collecting and fitting the posteriors
    ``names``; write them, the adapter and ``done.json``."""
    cfg, dist, model, meta = session.cfg, distributed.current(), session.model, session.metadata
    seed = member_seed(cfg, index)
    init_lora(model, seed)  # a fresh member: LoRA and the letter head at their initial values
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
                fit_posthoc(session, p, seed, progress)
                p.save(out / "posteriors" / name, meta)  # now: a resumed run after this point reloads it

    result = fit(session.scorer, session.train, session.validation, cfg, collectors=along, on_map_done=at_map_end,
                 cache=session.cache, log_path=out / "train_log.jsonl", seed=seed, progress=progress,
                 checkpoint_dir=out / "checkpoints", resume=resume,
                 trajectory_dir=out / trajectory.DIRNAME if cfg.swag.keep_trajectory else None)
    with torch.no_grad():  # the adapter on disk holds the MAP weights, not the last SWAG-phase ones
        params = trainable_parameters(model)
        for k, v in result.map_state.items():
            params[k].copy_(v)
    if dist.is_main:
        for name, p in posteriors.items():
            p.save(out / "posteriors" / name, meta)
        save_adapter(model, out / "adapter")
        atomic_write_json(out / "done.json", {"seed": seed, "seconds": result.seconds,
                                              "examples_per_second": result.examples_per_second,
                                              "kept_swag_epoch": result.kept_epoch,
                                              "swag_every": _every(cfg, len(session.train)),
                                              "n_train": len(session.train), "library_version": __version__,
                                              "max_choices": max(ex.n_choices for ex in session.train)})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a finished member is never resumed
    dist.wait()


def recollect_member(session: Session, source: Path, out: Path, names: list[str]) -> None:
    """Member ``out``: member ``source`` (trained with ``swag.keep_trajectory``, checked compatible by
    :func:`swaglora.trajectory.check_source`) with the trajectory posteriors among ``names`` collected anew from its
    recorded snapshots under this session's settings (rank, SWAG epochs, schedule), as training with them would
    have, bit for bit; its adapter, post-hoc posteriors and own-member methods are copied. Written beside ``out``
    and renamed into place, so a stopped recollection leaves no half member."""
    cfg, model = session.cfg, session.model
    tmp = out.with_name(f".{out.name}.recollect")
    shutil.rmtree(tmp, ignore_errors=True)
    along = {n: get_method(n) for n in names if get_method(n).trajectory}
    skip = {trajectory.DIRNAME, "checkpoints", *(f"checkpoints-{n}" for n in names)}
    shutil.copytree(source, tmp, ignore=lambda d, entries: [e for e in entries if Path(d) == source and e in skip])
    for name in along:
        shutil.rmtree(tmp / "posteriors" / name, ignore_errors=True)
    done = read_json(source / "done.json")
    collectors = {n: cls.build(model, cfg) for n, cls in along.items()}
    snapshots = trajectory.snapshot_names(cfg, done["n_train"])
    trajectory.replay(source / trajectory.DIRNAME, snapshots, model, collectors)
    for name, p in collectors.items():
        p.save(tmp / "posteriors" / name, session.metadata)
    log = [line for line in (source / "train_log.jsonl").read_text().splitlines()
           if line.strip() and json.loads(line).get("epoch", 0) <= cfg.train.epochs + cfg.swag.epochs]
    atomic_write_text(tmp / "train_log.jsonl", "".join(f"{line}\n" for line in log))
    every = _every(cfg, done["n_train"])
    atomic_write_json(tmp / "done.json", {**done, "swag_every": every, "recollected": {
        "swag_epochs": cfg.swag.epochs, "swag_every": every, "swag_max_rank": cfg.swag.max_rank,
        "snapshots": len(snapshots)}})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train_own_member(session: Session, out: Path, name: str, seed: int, progress: bool = True) -> None:
    """Train member ``out`` again for a method that trains its own member (BLoB): from a fresh LoRA init with the
    member's seed (so the same init and data order as its MAP training), with the method's training hooks, for
    ``train.epochs`` (no collection phase), keeping the best validation epoch; then save
    ``posteriors/<name>`` (its presence marks this training finished) and ``done-<name>.json`` (time).
    Resumes from ``checkpoints-<name>/`` bitwise, like the member's own training."""
    if (out / "posteriors" / name / CONFIG_NAME).is_file():
        return
    cfg, dist, model = session.cfg, distributed.current(), session.model
    init_lora(model, seed)  # a fresh member: LoRA and the letter head at their initial values
    posterior = get_method(name).build(model, cfg)
    hook = posterior.member_training(model, cfg, len(session.train), seed)
    checkpoints = out / f"checkpoints-{name}"
    resume = checkpoint.latest(checkpoints)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (out / f"train_log-{name}.jsonl").unlink(missing_ok=True)
        else:
            print(f"swaglora: member {out.name} ({name}): resuming from {resume.path}", file=sys.stderr)
    result = fit(session.scorer, session.train, session.validation, type(posterior).member_config(cfg),
                 cache=session.cache, log_path=out / f"train_log-{name}.jsonl", seed=seed, progress=progress,
                 checkpoint_dir=checkpoints, resume=resume, hooks=[hook] if hook is not None else [])
    with torch.no_grad():  # the best epoch's weights (fit has reloaded them; the hook's tensors too)
        params = trainable_parameters(model)
        for k, v in result.map_state.items():
            params[k].copy_(v)
    if dist.is_main:
        posterior.collect(model)
        atomic_write_json(out / f"done-{name}.json", {"seed": seed, "seconds": result.seconds,
                                                      "examples_per_second": result.examples_per_second})
        posterior.save(out / "posteriors" / name, session.metadata)
        shutil.rmtree(checkpoints, ignore_errors=True)
    dist.wait()


class PassBar(list):
    """A list of batches whose every pass advances ``bar`` (restarted at each pass, since a fit may iterate its
    batches more than once): a post-hoc fit over the training data (Laplace's, ~20 min at the defaults on 2
    cores) shows its progress like training does."""

    def __init__(self, items: list, bar: Any) -> None:
        super().__init__(items)
        self.bar = bar

    def __iter__(self):
        self.bar.reset(total=len(self))
        for item in super().__iter__():
            yield item
            self.bar.update(1)


def fit_posthoc(session: Session, posterior: Posterior, seed: int, progress: bool = False) -> None:
    """Collect and fit a post-hoc posterior (MAP, MC dropout, Laplace, TFB) at the model's current weights.

    Every method gets the training batches, the validation batches (``validation=``) and the generator of
    member ``seed``'s weight draws for it (``generator=``, :func:`draw_generator`); each uses what it needs
    (Laplace the training data, TFB the validation data and the generator). ``progress``: a bar over each pass
    through the training batches.
    """
    from tqdm.auto import tqdm

    size = session.cfg.train.batch_size

    def batches(examples: list[MCQExample]) -> list[list[MCQExample]]:
        return [examples[i : i + size] for i in range(0, len(examples), size)]

    train = batches(session.train)
    with tqdm(total=len(train), desc=f"fit {posterior.name}", disable=not progress, leave=False, unit="batch") as bar:
        posterior.collect(session.model)
        posterior.fit(session.model, PassBar(train, bar), session_loss(session),
                      validation=batches(session.validation), generator=draw_generator(seed, posterior.name))


def posthoc_unavailable(member: Path, name: str) -> str | None:
    """Why method ``name``'s posterior, missing from ``member``, cannot be fitted post hoc there, or None: only
    training makes a trajectory or own-member posterior (SWAG, BLoB), and a ``fitted_at`` fit needs its start."""
    cls = get_method(name)
    if cls.trajectory or cls.trains_own_member:
        return (f"{member} has no '{name}' posterior and only training makes it; "
                f"train the run again with {name} in --methods (finished members are kept)")
    if cls.fitted_at and not (member / "posteriors" / cls.fitted_at).is_dir():
        return (f"'{name}' is fitted at the '{cls.fitted_at}' posterior, which {member} does not have; "
                f"train the run again with {cls.fitted_at} in --methods")
    return None


def saved_settings_differ(member: Path, name: str, cfg: RunConfig) -> str | None:
    """Why ``member``'s saved ``name`` posterior cannot serve this config, or None: it was fitted or trained with
    other values of the settings its method takes from the config (:meth:`Posterior.settings`), e.g.
    ``evaluate --tfb-metric accuracy`` on a run whose TFB searched its noise level by NLL. A saved posterior is
    never refitted in place: the results made with it would no longer match it."""
    directory = member / "posteriors" / name
    if not (directory / CONFIG_NAME).is_file():
        return None
    cls = get_method(name)
    saved = read_json(directory / CONFIG_NAME).get("hparams", {})
    changed = [(key, saved[h], value) for h, (value, key) in cls.settings(cfg).items() if h in saved and saved[h] != value]
    if not changed:
        return None
    what = ", ".join(f"{flag_of(key)} {old!r} (this command: {new!r})" for key, old, new in changed)
    verb = "trained" if cls.trajectory or cls.trains_own_member else "fitted"
    if verb == "trained":
        remedy = f"only training makes it: train a new run with these settings, or leave {'them' if len(changed) > 1 else 'it'} as the run has"
    else:
        remedy = (f"a saved posterior is not refitted in place; to fit it with these settings, copy the run (predictions "
                  f"do not depend on its path) and remove members/*/posteriors/{name} in the copy, then evaluate the copy")
    return f"{directory} was {verb} with {what}; {remedy}"


def add_posthoc_posterior(session: Session, member: Path, name: str) -> None:
    """Fit a post-hoc method that a finished member was trained without, at that member's saved MAP weights (or
    at the point estimate of the posterior the method names in ``fitted_at``), so ``evaluate --methods laplace``
    works on any run without retraining."""
    why = posthoc_unavailable(member, name)
    if why:
        raise ValueError(why)
    if not session.train:
        raise ValueError(f"fitting '{name}' for {member} needs the training data of the run")
    cls = get_method(name)
    point = cls.fitted_at or reference_row().saved  # the member's fine-tuned weights, or another posterior's point
    start = load_posterior(member / "posteriors" / point, model=session.model, expected_metadata=session.metadata)
    seed = int(read_json(member / "done.json")["seed"])
    with use_params(session.model, start.sample(scale=0.0)):
        posterior = cls.build(session.model, session.cfg)
        fit_posthoc(session, posterior, seed)
    posterior.save(member / "posteriors" / name, session.metadata)


def session_loss(session: Session):
    """``loss_fn(model, examples) -> (logits, labels)`` for post-hoc methods (Laplace, TFB)."""

    def loss_fn(model: nn.Module, examples: list[MCQExample]):
        batch = session.scorer.batch(examples)
        return session.scorer.top(session.cache.hidden(batch), batch), batch.labels

    return loss_fn
