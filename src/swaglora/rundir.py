"""The run directory: its layout, format version, config file and the evaluation files the report reads.

Layout (one ``RUN`` directory per seed)::

    RUN/swaglora_run.json                    the run marker: format_version, library_version, data sha256, runtime
    RUN/config.json                          the run configuration (train.seed is the seed)
    RUN/members/<i>/adapter/                 PEFT adapter (MAP weights) for other tools
    RUN/members/<i>/posteriors/<method>/     posterior_config.json + posterior.safetensors ("init": before training)
    RUN/members/<i>/train_log.jsonl          per-epoch train loss and validation metrics
    RUN/members/<i>/done.json                written last: a member with it is never retrained
    RUN/eval/scale-<method>.json             --swag-scale auto: validation NLL per grid scale and the choice
    RUN/eval/<set>/<row>/metrics.json        accuracy, ece, nll, brier, n, method, eval_set, role (validation,
                                             test or shift), n_samples, n_members, scale, seconds (null when some of
                                             the row was read back from eval/.predictions), reused_predictions, seed
    RUN/eval/<set>/<row>/predictions.jsonl   id, question, probs (label order), labels, answer, prediction,
                                             confidence, correct, total_entropy, expected_entropy,
                                             mutual_information
    RUN/eval/.predictions/<sha256>.safetensors  the sample probabilities of each (members, posterior, draws,
                                             scale, set) an evaluation has predicted, written at once: an
                                             interrupted evaluation resumes and a later one (more --methods,
                                             sets, --calibrate) predicts only what is new; safe to delete
    RUN/eval/validation/<row>/abstention.json  with --abstain-risk R at evaluation: the row's abstention rule
                                             chosen on validation: target_risk R, threshold (answer when
                                             confidence >= threshold; null: never), the risk and coverage it
                                             achieves on validation, n (``swaglora predict`` uses it)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import metrics
from ._version import __version__
from .config import RunConfig, config_from_dict, config_to_dict
from .data import MCQExample
from .io import apply_umask, atomic_write_json, atomic_write_text, make_temp_dir, read_json
from .models import runtime_info

__all__ = ["RUN_FORMAT_VERSION", "RESULT_NEUTRAL", "PREDICTION_STORE", "ABSTENTION_NAME", "set_dir_name", "prediction_rows", "write_eval",
           "write_abstention", "member_dirs", "save_adapter", "check_run_format", "write_run_marker", "record_evaluation_runtime", "save_config",
           "load_run_config"]


#: Settings that may change between a run and its resumption: they do not change any result.
RESULT_NEUTRAL = {"train.checkpoint_every", "train.threads", "model.device"}


#: Sample probabilities of every prediction made, in ``RUN/eval/`` (a name :func:`set_dir_name` never gives).
PREDICTION_STORE = ".predictions"

#: The abstention rule of a row, next to its validation metrics.json.
ABSTENTION_NAME = "abstention.json"


#: Version of the run-directory layout; a run written by a newer swaglora is refused, not misread.
RUN_FORMAT_VERSION = 1


def set_dir_name(name: str) -> str:
    """A filesystem-safe directory name for an evaluation set (no path can escape the run directory)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")
    return safe or "set"


def prediction_rows(examples: list[MCQExample], sample_probs: torch.Tensor) -> list[dict]:
    """Per question, from sample probabilities ``[S, N, C]``: id, probs (the BMA predictive in label order, full
    precision), labels, prediction, confidence, total_entropy, expected_entropy, mutual_information."""
    probs = metrics.predictive(sample_probs)
    unc = metrics.uncertainty(sample_probs)
    rows = []
    for i, ex in enumerate(examples):
        p = probs[i, : ex.n_choices]
        pred = int(p.argmax())
        rows.append({"id": ex.id, "probs": [float(x) for x in p], "labels": list(ex.labels), "prediction": ex.labels[pred],
                     "confidence": float(p[pred]), "total_entropy": float(unc["total_entropy"][i]),
                     "expected_entropy": float(unc["expected_entropy"][i]),
                     "mutual_information": float(unc["mutual_information"][i])})
    return rows


def write_eval(out: Path, examples: list[MCQExample], sample_probs: torch.Tensor, info: dict) -> dict:
    """``metrics.json`` and ``predictions.jsonl`` of one row on one set. Probabilities are written at full
    precision: anything recomputed from the file (report intervals, OOD, selective prediction) equals what
    ``metrics.json`` holds, also for a tiny probability on the answer (rounded, it would become 0)."""
    labels = torch.tensor([ex.answer_index for ex in examples])
    result = {**metrics.summarize(sample_probs, labels), **info}
    lines = []
    for ex, row in zip(examples, prediction_rows(examples, sample_probs)):
        lines.append(json.dumps({"id": row["id"], "question": ex.question, "probs": row["probs"], "labels": row["labels"],
                                 "answer": ex.answer, "prediction": row["prediction"], "confidence": row["confidence"],
                                 "correct": row["prediction"] == ex.answer, "total_entropy": row["total_entropy"],
                                 "expected_entropy": row["expected_entropy"],
                                 "mutual_information": row["mutual_information"]}))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out / "metrics.json", result)
    return result


def write_abstention(out: Path, rule: dict | None) -> None:
    """Store a row's abstention rule next to its validation metrics (None removes an older one, which the
    evaluation just written would have made stale)."""
    if rule is None:
        (out / ABSTENTION_NAME).unlink(missing_ok=True)
    else:
        atomic_write_json(out / ABSTENTION_NAME, rule)


def member_dirs(run_dirs: list[Path]) -> list[Path]:
    found = []
    for run in run_dirs:
        for member in sorted((run / "members").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
            if (member / "done.json").is_file():
                found.append(member)
    if not found:
        raise FileNotFoundError(f"no finished members under {', '.join(str(r) for r in run_dirs)} (train first)")
    return found


def save_adapter(model: nn.Module, directory: Path) -> None:
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


def record_evaluation_runtime(out: Path, cfg: RunConfig) -> None:
    """``evaluate``: put the runtime its numbers are computed under (dtype, device, CPU flags, torch) into ``out``'s
    run marker as ``evaluation_runtime``, beside the training's ``runtime`` when ``out`` is the run itself (an
    evaluation may run on another machine or dtype than the training); the report shows it."""
    marker = out / "swaglora_run.json"
    data = read_json(marker) if marker.is_file() else {"format_version": RUN_FORMAT_VERSION, "library_version": __version__}
    atomic_write_json(marker, {**data, "evaluation_runtime": runtime_info(cfg.model)})


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
            was = lambda s, k: saved.get(s, {}).get(k, defaults[s][k])  # noqa: E731
            changed = sorted((f"{s}.{k}", was(s, k), data[s][k]) for s in data for k in data[s] if was(s, k) != data[s][k])
            refused = [f"{name}: {old!r} there, {new!r} here" for name, old, new in changed
                       if not name.startswith("eval.") and name not in RESULT_NEUTRAL]
            if refused:
                hint = (" (--swag-every 25 for a run trained when 25 was the default)"
                        if any(name == "swag.every" and new == "auto" for name, _, new in changed) else "")
                raise ValueError(f"{run_dir} holds a run with a different config ({'; '.join(refused)}); give the "
                                 f"same settings{hint}, another --out or --overwrite")
    write_run_marker(run_dir, data_sha256=data_sha256 or {}, runtime=runtime_info(cfg.model))
    atomic_write_json(path, data)


def load_run_config(run_dir: Path) -> RunConfig:
    check_run_format(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a swaglora run directory (no config.json)")
    return config_from_dict(read_json(run_dir / "config.json"), source=str(run_dir / "config.json"))
