"""Reading run directories (the files :mod:`swaglora.rundir` describes) into predictions and metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_json


ROLES = ("validation", "test", "shift")


@dataclass
class _Preds:
    probs: np.ndarray  # [N, C] predictive, zero-padded
    confidence: np.ndarray  # [N]
    correct: np.ndarray  # [N] 0/1 floats
    total_entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_information: np.ndarray
    rows: list[dict[str, Any]]  # id, question, labels, answer, prediction, probs


@dataclass
class _Entry:
    metrics: dict[str, Any]
    preds: _Preds | None
    path: Path


@dataclass
class _Run:
    path: Path
    seed: int
    entries: dict[tuple[str, str], _Entry] = field(default_factory=dict)  # (eval_set, method)
    config: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] | None = None  # swaglora_run.json's dtype, device, CPU flags, torch version


def _n_samples(entry: _Entry) -> int:
    """The posterior draws behind an entry's predictions (1: a point estimate, no MI)."""
    try:
        return int(entry.metrics.get("n_samples") or 1)
    except (TypeError, ValueError):
        return 1


_PRED_FIELDS = ("probs", "confidence", "correct", "total_entropy", "expected_entropy", "mutual_information")


def read_predictions(path: Path) -> _Preds:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
            missing = [k for k in _PRED_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    c = max(len(r["probs"]) for r in rows)
    probs = np.zeros((len(rows), c), dtype=np.float64)
    for i, r in enumerate(rows):
        probs[i, : len(r["probs"])] = r["probs"]

    def col(k: str) -> np.ndarray:
        return np.asarray([float(r[k]) for r in rows], dtype=np.float64)

    keep = ("id", "question", "labels", "answer", "prediction", "probs")
    return _Preds(probs=probs, confidence=col("confidence"), correct=col("correct"),
                  total_entropy=col("total_entropy"), expected_entropy=col("expected_entropy"),
                  mutual_information=col("mutual_information"),
                  rows=[{k: r.get(k) for k in keep} for r in rows])


def _load_run(run_dir: Path, index: int, notes: list[str]) -> _Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    metric_files = sorted(run_dir.glob("eval/*/*/metrics.json"))
    if not metric_files:
        raise ValueError(f"no evaluation results in run directory {run_dir}: expected "
                         f"{run_dir}/eval/<set>/<method>/metrics.json")
    config: dict[str, Any] = {}
    if (run_dir / "config.json").is_file():
        config = read_json(run_dir / "config.json")
    marker = run_dir / "swaglora_run.json"
    # the evaluation's runtime when an `evaluate` recorded one (its numbers were computed under it), else the run's
    saved = read_json(marker) if marker.is_file() else {}
    runtime = saved.get("evaluation_runtime") or saved.get("runtime")
    run = _Run(path=run_dir, seed=index, config=config, runtime=runtime)
    seed = (config.get("train") or {}).get("seed") if isinstance(config, dict) else None
    for mf in metric_files:
        m = read_json(mf)
        method, eval_set = m.get("method") or mf.parent.name, m.get("eval_set") or mf.parent.parent.name
        if m.get("role") not in ROLES:
            raise ValueError(f"{mf}: role must be one of {ROLES}, got {m.get('role')!r}")
        if seed is None and m.get("seed") is not None:
            seed = m["seed"]
        pf = mf.parent / "predictions.jsonl"
        preds = read_predictions(pf) if pf.is_file() else None
        if preds is None:
            notes.append(f"{run_dir}: no predictions.jsonl for {method} on {eval_set}; "
                         f"derived metrics (OOD, selective, abstention) skipped there.")
        elif m.get("n") is not None and int(m["n"]) != len(preds.rows):
            notes.append(f"{pf}: {len(preds.rows)} predictions but metrics.json says n={m['n']}.")
        if (eval_set, method) in run.entries:
            raise ValueError(f"{run_dir}: duplicate results for {method} on {eval_set} ({mf})")
        run.entries[(eval_set, method)] = _Entry(metrics=m, preds=preds, path=mf.parent)
    run.seed = int(seed) if seed is not None else index
    return run


def _raw_runs(results: dict[str, Any]) -> list[_Run]:
    """The loaded predictions; re-read from ``results['runs']`` when absent (results from JSON)."""
    runs = results.get("_raw")
    if runs is None:
        notes: list[str] = []
        runs = sorted((_load_run(Path(d), i, notes) for i, d in enumerate(results["runs"])),
                      key=lambda r: r.seed)
    return runs
