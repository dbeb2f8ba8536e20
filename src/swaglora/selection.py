"""Which examples a run trains, validates and evaluates on (from the config's data and eval sections)."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import ConfigError, RunConfig
from .data import MCQExample, limit, split_validation
from .tasks import BLOB_SHIFT_SETS, resolve_dataset, task_splits

__all__ = ["EVAL_SUBSET_SEED", "training_data", "eval_data", "base_examples", "check_eval_split"]


#: Evaluation subsets (``--eval-limit``) are drawn with this seed whatever the training seed, so runs with
#: different seeds are scored on the same questions and their spread is the training's alone.
EVAL_SUBSET_SEED = 0


def training_data(cfg: RunConfig) -> tuple[list[MCQExample], list[MCQExample]]:
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


def eval_data(cfg: RunConfig) -> list[tuple[str, str, list[MCQExample]]]:
    """(name, role, examples) for the in-distribution test split and every shift set (none with
    ``eval.validation_only``)."""
    if cfg.eval.validation_only:
        return []
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


def base_examples(cfg: RunConfig) -> list[MCQExample]:
    """The examples a zero-shot ``evaluate`` scores: ``--data``, or ``--task`` at ``--split``."""
    spec = cfg.data.data or cfg.data.task
    split = cfg.eval.split if cfg.data.data or cfg.eval.split != "test" else task_splits(cfg.data.task).test
    return limit(resolve_dataset(spec, split), cfg.eval.limit or None, EVAL_SUBSET_SEED)


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


def _display_name(spec: str) -> str:
    """Short name of a data spec: a file's stem, else the spec itself."""
    return Path(spec).name.split(".")[0] if spec.endswith((".jsonl", ".jsonl.gz")) else spec
