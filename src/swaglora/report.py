"""Turn finished evaluation directories (one per seed) into tables, figures and a report.

Input (written by the evaluation pipeline, one ``RUN`` directory per seed)::

    RUN/config.json                                # run configuration; train.seed is the seed
    RUN/swaglora_run.json                          # "runtime": dtype, device, CPU SIMD flags, torch
    RUN/eval/<set_dir>/<method>/metrics.json       # accuracy, ece, nll, brier, n, method,
                                                   # eval_set, role, n_samples, scale, seconds, seed
    RUN/eval/<set_dir>/<method>/predictions.jsonl  # id, question, probs, labels, answer, prediction,
                                                   # confidence, correct, total_entropy,
                                                   # expected_entropy, mutual_information

``role`` is ``validation``, ``test`` (in-distribution) or ``shift`` (OOD).

Public API
----------
* :func:`collect_results` reads the runs and returns a dict (``results``) holding, per
  ``(method, eval_set, metric)``, the per-seed values and their mean / sample std
  (``std = 0`` with one seed). Metrics: the stored ``accuracy``, ``ece``, ``nll``,
  ``brier``, ``n``, ``seconds``; derived from the predictions: selective prediction
  (``aurc``, ``acc@50``, ``acc@80``, ``acc@90``) on every set, OOD detection
  (``ood_{auroc,aupr,fpr95}_{entropy,mi,aleatoric}``, stored under the shift set; ``mi``
  and ``aleatoric`` only for methods with ``n_samples > 1``) of every shift set against
  the in-distribution test set, and, with ``abstain_risk``, abstention
  (``abstain_threshold`` under the validation set; ``abstain_risk`` and
  ``abstain_coverage`` under the validation, test and shift sets).
* :func:`write_report` writes ``report.md``, ``results.csv``, ``results.json`` and PNG
  figures under ``figures/`` (every file atomically) and returns the path of ``report.md``.
* :func:`print_table` renders a compact plain-text table for the terminal.

Number format (report.md)
-------------------------
Every metric number in report.md is ``format_number(x) == f"{x:.4f}"`` of the exact
value in results.json (``mean`` and ``std``); a cell is ``"<mean>"`` when the entry has
one seed and ``"<mean> ± <std>"`` with several; a missing / non-finite value (e.g. an
abstention threshold of ``inf``, stored as ``null``) is ``"n/a"``. Integer counts
(examples, samples, seeds) are printed as integers. In the "most uncertain questions"
table the predictive distribution is shown with ``f"{p:.2f}"`` per choice and the
entropy with the 4-decimal rule. results.csv stores the full-precision values
(``repr`` of the float, as in results.json).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .posterior import reference_row, row_names

__all__ = [
    "collect_results", "write_report", "print_table", "add_abstention", "format_number", "format_cell",
    "DECIMALS", "METRIC_LABELS", "BASE_METRICS", "SELECTIVE_METRICS", "OOD_STATS",
    "OOD_SCORES", "ABSTAIN_METRICS", "COVERAGES",
]

DECIMALS = 4
ROLES = ("validation", "test", "shift")
BASE_METRICS = ("accuracy", "ece", "nll", "brier")
STORED_METRICS = BASE_METRICS + ("n", "seconds")
COVERAGES = (0.5, 0.8, 0.9)
SELECTIVE_METRICS = ("aurc",) + tuple(f"acc@{round(c * 100)}" for c in COVERAGES)
#: OOD statistic -> column label; OOD score -> (field in predictions.jsonl, row label).
OOD_STATS = {"auroc": "AUROC", "aupr": "AUPR", "fpr95": "FPR@95TPR"}
OOD_SCORES = {
    "entropy": ("total_entropy", "entropy (total)"),
    "mi": ("mutual_information", "MI (epistemic)"),
    "aleatoric": ("expected_entropy", "expected entropy (aleatoric)"),
}
ABSTAIN_METRICS = ("abstain_threshold", "abstain_risk", "abstain_coverage")
METRIC_LABELS = {
    "accuracy": "ACC", "ece": "ECE", "nll": "NLL", "brier": "Brier", "n": "N", "seconds": "Seconds",
    "aurc": "AURC", **{f"acc@{round(c * 100)}": f"Acc@{round(c * 100)}%" for c in COVERAGES},
    "abstain_threshold": "Threshold", "abstain_risk": "Risk", "abstain_coverage": "Coverage",
}
N_UNCERTAIN = 10
QUESTION_CHARS = 120
N_BINS = 15


# ----------------------------------------------------------------------------- format
def format_number(x: float | None) -> str:
    """The report's number rule: ``f"{x:.4f}"``; ``None`` / non-finite -> ``"n/a"``."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{DECIMALS}f}"


def format_cell(stat: dict[str, Any] | None) -> str:
    """``mean`` (one seed) or ``mean ± std`` (several seeds); ``"—"`` for a missing entry."""
    if not stat:
        return "—"
    if stat["mean"] is None:
        return "n/a"
    if stat["n_seeds"] > 1:
        return f"{format_number(stat['mean'])} ± {format_number(stat['std'])}"
    return format_number(stat["mean"])


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _stat(seeds: list[int], values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof=1, 0 with one value) of per-seed values, exactly as numpy."""
    if any(v is None for v in values):
        mean = std = None
    else:
        arr = np.asarray(values, dtype=np.float64)
        mean = _finite_or_none(np.mean(arr))
        std = _finite_or_none(np.std(arr, ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": mean, "std": std, "n_seeds": len(values), "values": list(values), "seeds": list(seeds)}


def _method_key(m: str) -> tuple:
    """Methods in the registry's row order (others follow alphabetically; ``m+ts`` follows ``m``)."""
    base, order = m.split("+", 1)[0], row_names()
    rank = order.index(base) if base in order else len(order)
    return (rank, base, m != base, m)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


# --------------------------------------------------------------------------- loading
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


_PRED_FIELDS = ("probs", "confidence", "correct", "total_entropy", "expected_entropy", "mutual_information")


def _read_predictions(path: Path) -> _Preds:
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
    runtime = read_json(marker).get("runtime") if marker.is_file() else None
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
        preds = _read_predictions(pf) if pf.is_file() else None
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


# ------------------------------------------------------------------------- collecting
class _Acc:
    """Per (method, eval_set, metric) lists of (seed, value) in run order."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, tuple[list, list]]]] = {}

    def add(self, method: str, eval_set: str, metric: str, seed: int, value: float | None) -> None:
        seeds, values = (self.data.setdefault(method, {}).setdefault(eval_set, {})
                         .setdefault(metric, ([], [])))
        seeds.append(seed)
        values.append(None if value is None else _finite_or_none(value))


def _n_samples(entry: _Entry) -> int:
    try:
        return int(entry.metrics.get("n_samples") or 1)
    except (TypeError, ValueError):
        return 1


def collect_results(run_dirs: Iterable[str | Path] | str | Path,
                    abstain_risk: float | None = None) -> dict[str, Any]:
    """Read evaluation runs (one directory per seed) and aggregate every metric across seeds.

    Args:
        run_dirs: run directories (or a single one) laid out as in the module docstring.
        abstain_risk: if given, also compute the abstention threshold of each method and
            seed on the validation set (:func:`metrics.abstention_threshold`) and its risk
            and coverage on every set (:func:`metrics.selective_risk`).

    Returns:
        A JSON-serialisable dict (except the private ``"_raw"`` key holding the loaded
        predictions for the figures) with ``runs``, ``runtime`` (per run, ``None`` if not recorded), ``seeds``, ``methods``,
        ``eval_sets``, ``sets`` (role, n), ``n_samples``, ``reference_test_set``,
        ``validation_set``, ``metrics[method][eval_set][metric]`` =
        ``{mean, std, n_seeds, values, seeds}``, ``uncertain_questions``, ``notes``,
        ``abstain_risk`` and ``format``.

    Raises:
        ValueError: no run directories, or a directory without any ``eval/*/*/metrics.json``.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("collect_results: no run directories given")
    notes: list[str] = []
    runs = [_load_run(d, i, notes) for i, d in enumerate(run_dirs)]
    runs.sort(key=lambda r: r.seed)  # stable: equal seeds keep the given order
    seeds = [r.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        notes.append(f"Several runs share a seed ({seeds}); they are still treated as separate runs.")
    dtypes = sorted({r.runtime.get("dtype") for r in runs if r.runtime})
    if len(dtypes) > 1:
        notes.append(f"The runs computed in different dtypes ({', '.join(map(str, dtypes))}): the spread over seeds "
                     "includes the dtype's effect (see Run environment).")

    # sets and roles, methods
    roles: dict[str, str] = {}
    set_n: dict[str, int] = {}
    methods_seen: dict[str, list[int]] = {}
    n_samples: dict[str, int] = {}
    for r in runs:
        for (s, m), e in r.entries.items():
            role = e.metrics["role"]
            if roles.setdefault(s, role) != role:
                notes.append(f"{s} has role {role!r} in {e.path} but {roles[s]!r} elsewhere; using {roles[s]!r}.")
            if e.metrics.get("n") is not None:
                set_n.setdefault(s, int(e.metrics["n"]))
            if r.seed not in methods_seen.setdefault(m, []):
                methods_seen[m].append(r.seed)
            n_samples[m] = max(n_samples.get(m, 1), _n_samples(e))
    methods = sorted(methods_seen, key=_method_key)
    shift_order: list[str] = []
    cfg_shift = (runs[0].config.get("eval") or {}).get("shift") if isinstance(runs[0].config, dict) else None
    if isinstance(cfg_shift, str):
        shift_order = [x.strip() for x in cfg_shift.split(",") if x.strip()]

    def set_key(s: str) -> tuple:
        role = roles[s]
        return (ROLES.index(role), shift_order.index(s) if s in shift_order else len(shift_order), s)

    eval_sets = sorted(roles, key=set_key)
    tests = [s for s in eval_sets if roles[s] == "test"]
    vals = [s for s in eval_sets if roles[s] == "validation"]
    shifts = [s for s in eval_sets if roles[s] == "shift"]
    ref = tests[0] if tests else None
    val = vals[0] if vals else None
    if len(tests) > 1:
        notes.append(f"Several test sets {tests}; OOD detection uses {ref} as in-distribution.")
    if len(vals) > 1:
        notes.append(f"Several validation sets {vals}; abstention thresholds use {val}.")
    if shifts and ref is None:
        notes.append("No in-distribution test set: OOD detection skipped.")

    for m in methods:
        missing = [s for s in seeds if s not in methods_seen[m]]
        if missing:
            notes.append(f"Method {m} is missing on seed(s) {missing}: its numbers average "
                         f"{len(seeds) - len(missing)} of {len(seeds)} seeds.")
            continue
        for s in eval_sets:
            present = [r.seed for r in runs if (s, m) in r.entries]
            if 0 < len(present) < len(runs):
                notes.append(f"Method {m} on {s} is missing on seed(s) "
                             f"{[x for x in seeds if x not in present]}.")

    acc = _Acc()
    for r in runs:
        for s in eval_sets:
            for m in methods:
                e = r.entries.get((s, m))
                if e is None:
                    continue
                for k in STORED_METRICS:
                    v = e.metrics.get(k)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        acc.add(m, s, k, r.seed, float(v))
                if e.preds is not None:
                    _selective(acc, m, s, r.seed, e.preds)
        if ref is not None:
            for m in methods:
                e_in = r.entries.get((ref, m))
                if e_in is None or e_in.preds is None:
                    continue
                for s in shifts:
                    e_out = r.entries.get((s, m))
                    if e_out is None or e_out.preds is None:
                        continue
                    multi = max(_n_samples(e_in), _n_samples(e_out)) > 1
                    _ood(acc, m, s, r.seed, e_in.preds, e_out.preds, multi)

    results: dict[str, Any] = {
        "runs": [str(r.path) for r in runs],
        "runtime": [r.runtime for r in runs],
        "seeds": seeds,
        "methods": methods,
        "eval_sets": eval_sets,
        "sets": {s: {"role": roles[s], "n": set_n.get(s)} for s in eval_sets},
        "n_samples": n_samples,
        "reference_test_set": ref,
        "validation_set": val,
        "metrics": {m: {s: {k: _stat(*acc.data[m][s][k]) for k in acc.data[m][s]}
                        for s in eval_sets if s in acc.data.get(m, {})} for m in methods},
        "notes": notes,
        "abstain_risk": None,
        "uncertain_questions": _uncertain(runs, methods, n_samples, ref, notes),
        "intervals": _intervals(runs, methods, [x for x in eval_sets if roles[x] != "validation"], notes),
        "format": {
            "decimals": DECIMALS,
            "rule": f"report.md prints every metric as f'{{x:.{DECIMALS}f}}' of the value in this "
                    "file; 'mean ± std' when n_seeds > 1; null -> 'n/a'.",
        },
        "_raw": runs,
    }
    if abstain_risk is not None:
        results = add_abstention(results, abstain_risk)
    return results


def _selective(acc: _Acc, m: str, s: str, seed: int, p: _Preds) -> None:
    acc.add(m, s, "aurc", seed, M.aurc(p.confidence, p.correct))
    for c, key in zip(COVERAGES, SELECTIVE_METRICS[1:]):
        acc.add(m, s, key, seed, M.accuracy_at_coverage(p.confidence, p.correct, c))


def _ood(acc: _Acc, m: str, s: str, seed: int, p_in: _Preds, p_out: _Preds, multi: bool) -> None:
    for score, (fld, _) in OOD_SCORES.items():
        if score != "entropy" and not multi:
            continue
        a, b = getattr(p_in, fld), getattr(p_out, fld)
        acc.add(m, s, f"ood_auroc_{score}", seed, M.auroc(a, b))
        acc.add(m, s, f"ood_aupr_{score}", seed, M.aupr(a, b))
        acc.add(m, s, f"ood_fpr95_{score}", seed, M.fpr_at_tpr(a, b, 0.95))


def _uncertain(runs: list[_Run], methods: list[str], n_samples: dict[str, int],
               ref: str | None, notes: list[str]) -> dict[str, Any] | None:
    if ref is None:
        notes.append("No test set: the list of most uncertain questions is omitted.")
        return None
    candidates = [m for m in methods if any((ref, m) in r.entries and r.entries[(ref, m)].preds for r in runs)]
    if not candidates:
        return None
    method = max(candidates, key=lambda m: (n_samples[m], -candidates.index(m)))
    run = next(r for r in runs if (ref, method) in r.entries and r.entries[(ref, method)].preds)
    p = run.entries[(ref, method)].preds
    order = np.argsort(-p.total_entropy, kind="stable")[:N_UNCERTAIN]
    questions = []
    for i in order:
        row = dict(p.rows[int(i)])
        row["total_entropy"] = float(p.total_entropy[i])
        row["confidence"] = float(p.confidence[i])
        questions.append(row)
    return {"method": method, "seed": run.seed, "eval_set": ref, "questions": questions}


#: Bootstrap resamples of the questions behind every interval (paired across methods, pooled over seeds).
N_BOOT, INTERVAL_LEVEL = 1000, 0.95


def _aligned(runs: list[_Run], s: str, m: str, answers: dict[str, str], width: int) -> list[np.ndarray] | None:
    """The predictive of ``m`` on ``s`` in every run, rows in the order of ``answers`` (question id -> answer);
    None if a run scored other questions or other answers."""
    ids, out = list(answers), []
    for r in runs:
        p = r.entries[(s, m)].preds
        order = {row["id"]: i for i, row in enumerate(p.rows)}
        if len(order) != len(ids) or any(answers.get(row["id"]) != row["answer"] for row in p.rows):
            return None
        probs = np.zeros((len(ids), max(width, p.probs.shape[1])))
        probs[:, : p.probs.shape[1]] = p.probs[[order[i] for i in ids]]
        out.append(probs)
    return out


def _intervals(runs: list[_Run], methods: list[str], sets: list[str], notes: list[str]) -> list[dict[str, Any]]:
    """Per set: :func:`metrics.paired_bootstrap` of every method that has predictions on it in every run,
    with the questions aligned by id; differences are to the registry's reference row (the fine-tuned point estimate) where it is present."""
    out: list[dict[str, Any]] = []
    for s in sets:
        have = [m for m in methods if all((s, m) in r.entries and r.entries[(s, m)].preds for r in runs)]
        if not have:
            continue
        first = runs[0].entries[(s, have[0])].preds
        answers = {row["id"]: row["answer"] for row in first.rows}
        labels = np.asarray([row["labels"].index(row["answer"]) for row in first.rows])
        predictives = {m: _aligned(runs, s, m, answers, first.probs.shape[1]) for m in have}
        if any(v is None for v in predictives.values()):
            notes.append(f"{s}: methods or seeds were scored on different questions or answers; no intervals for {s}.")
            continue
        width = max(p.shape[1] for v in predictives.values() for p in v)
        predictives = {m: [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in v] for m, v in predictives.items()}
        reference = reference_row()
        ref = reference.name if reference is not None and reference.name in predictives else None
        result = M.paired_bootstrap(predictives, labels, reference=ref, n_boot=N_BOOT, level=INTERVAL_LEVEL, seed=0)
        out.append({"eval_set": s, "n": len(answers), "n_boot": N_BOOT, "level": INTERVAL_LEVEL, "reference": ref,
                    "methods": [{"method": m, **result[m]} for m in have]})
    return out


def _interval_cell(d: dict[str, Any], signed: bool = False) -> str:
    value = f"{d['value']:+.{DECIMALS}f}" if signed else format_number(d["value"])
    star = " *" if d.get("significant") else ""
    return f"{value} [{d['lo']:.{DECIMALS}f}, {d['hi']:.{DECIMALS}f}]{star}"


def _interval_tables(results: dict[str, Any]) -> list[str]:
    intervals = results.get("intervals") or []
    if not intervals:
        return []
    first = intervals[0]
    L = ["## Intervals and differences to MAP", "",
         f"{round(first['level'] * 100)}% percentile intervals from {first['n_boot']} bootstrap resamples of the "
         "questions of each set; the same resamples for every method (paired) and every seed (a resample's "
         "value is the mean over seeds). `Δ` = method − MAP on the same resamples; `*` marks a difference "
         "whose interval excludes 0. The interval covers the choice of questions, not the training seed "
         "(see the ± std of the main table for that).", ""]
    for block in intervals:
        L += [f"### `{block['eval_set']}` ({block['n']} questions)", ""]
        header = ["Method"] + [METRIC_LABELS[k] for k in M.BOOTSTRAP_METRICS]
        if block["reference"]:
            header += [f"Δ {METRIC_LABELS[k]}" for k in M.BOOTSTRAP_METRICS]
        rows = []
        for d in block["methods"]:
            row = [_md_escape(d["method"])] + [_interval_cell(d[k]) for k in M.BOOTSTRAP_METRICS]
            if block["reference"]:
                row += [_interval_cell(d[f"{k}_diff"], signed=True) if f"{k}_diff" in d else "—"
                        for k in M.BOOTSTRAP_METRICS]
            rows.append(row)
        L += _md_table(header, rows)
    return L


def _raw_runs(results: dict[str, Any]) -> list[_Run]:
    """The loaded predictions; re-read from ``results['runs']`` when absent (results from JSON)."""
    runs = results.get("_raw")
    if runs is None:
        notes: list[str] = []
        runs = sorted((_load_run(Path(d), i, notes) for i, d in enumerate(results["runs"])),
                      key=lambda r: r.seed)
    return runs


def add_abstention(results: dict[str, Any], target_risk: float) -> dict[str, Any]:
    """Copy of ``results`` with abstention metrics for ``target_risk`` (replacing earlier ones).

    Per method and seed: ``t = abstention_threshold(conf_val, correct_val, target_risk)``
    on the validation set, then ``selective_risk(conf, correct, t)`` on the validation,
    test and shift sets. ``t = inf`` (no threshold reaches the target) is stored as ``null``.
    """
    if not 0 <= target_risk <= 1:
        raise ValueError(f"abstain_risk must be in [0, 1], got {target_risk}")
    runs = _raw_runs(results)
    out = {k: v for k, v in results.items() if k not in ("metrics", "notes")}
    out["notes"] = [n for n in results["notes"] if not n.startswith("Abstention")]
    out["metrics"] = {m: {s: {k: v for k, v in d.items() if k not in ABSTAIN_METRICS}
                          for s, d in sets.items()} for m, sets in results["metrics"].items()}
    out["abstain_risk"] = float(target_risk)
    val = results["validation_set"]
    if val is None:
        out["notes"].append("Abstention: no validation set, so no threshold can be chosen; "
                            "abstention rows omitted.")
        return out
    acc = _Acc()
    targets = [s for s in results["eval_sets"] if results["sets"][s]["role"] in ROLES]
    for r in runs:
        for m in results["methods"]:
            e = r.entries.get((val, m))
            if e is None or e.preds is None:
                continue
            t = M.abstention_threshold(e.preds.confidence, e.preds.correct, target_risk)
            acc.add(m, val, "abstain_threshold", r.seed, t)
            for s in targets:
                es = r.entries.get((s, m))
                if es is None or es.preds is None:
                    continue
                risk, cov = M.selective_risk(es.preds.confidence, es.preds.correct, t)
                acc.add(m, s, "abstain_risk", r.seed, risk)
                acc.add(m, s, "abstain_coverage", r.seed, cov)
    for m, sets in acc.data.items():
        for s, d in sets.items():
            out["metrics"].setdefault(m, {}).setdefault(s, {}).update({k: _stat(*v) for k, v in d.items()})
    if any(v is None for d in acc.data.values() for v in d.get(val, {}).get("abstain_threshold", ([], []))[1]):
        out["notes"].append(f"Abstention: for some method/seed no confidence threshold reaches risk "
                            f"{target_risk} on {val}; it abstains on everything (threshold n/a, coverage 0).")
    return out


# --------------------------------------------------------------------------- writing
def _public(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, dict[str, Any]]]:
    out = []
    for m in results["methods"]:
        for s in results["eval_sets"]:
            for k, st in results["metrics"].get(m, {}).get(s, {}).items():
                out.append((m, s, results["sets"][s]["role"], k, st))
    return out


def _csv_text(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "eval_set", "role", "metric", "mean", "std", "n_seeds"])
    for m, s, role, k, st in _rows(results):
        w.writerow([m, s, role, k, "" if st["mean"] is None else repr(st["mean"]),
                    "" if st["std"] is None else repr(st["std"]), st["n_seeds"]])
    return buf.getvalue()


def _md_escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> list[str]:
    """Markdown table; the first ``left`` columns are left-aligned text, the rest right-aligned."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(rows_i) + " |" for rows_i in rows]
    return lines + [""]


def _metric_table(results: dict[str, Any], sets: Sequence[str], keys: Sequence[str],
                  methods: Sequence[str] | None = None) -> list[str]:
    methods = results["methods"] if methods is None else methods
    header = ["Method"] + [f"{s} {METRIC_LABELS[k]}" for s in sets for k in keys]
    rows = []
    for m in methods:
        d = results["metrics"].get(m, {})
        rows.append([_md_escape(m)] + [format_cell(d.get(s, {}).get(k)) for s in sets for k in keys])
    return _md_table(header, rows)


def _ood_table(results: dict[str, Any], shifts: Sequence[str]) -> list[str]:
    header = ["Method", "Score"] + [f"{s} {lab}" for s in shifts for lab in OOD_STATS.values()]
    rows = []
    for m in results["methods"]:
        d = results["metrics"].get(m, {})
        for score, (_, label) in OOD_SCORES.items():
            if not any(f"ood_auroc_{score}" in d.get(s, {}) for s in shifts):
                continue
            rows.append([_md_escape(m), label] + [format_cell(d.get(s, {}).get(f"ood_{st}_{score}"))
                                                  for s in shifts for st in OOD_STATS])
    return _md_table(header, rows, left=2)


def _distribution(row: dict[str, Any]) -> str:
    labels = row.get("labels") or [chr(ord("A") + i) for i in range(len(row["probs"]))]
    return " · ".join(f"{_md_escape(lab)} {p:.2f}" for lab, p in zip(labels, row["probs"]))


def _truncate(text: Any, n: int = QUESTION_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _environment(results: dict[str, Any]) -> list[str]:
    """The "Run environment" section: what each run computed in, besides its config (swaglora_run.json)."""
    rows = []
    for path, seed, rt in zip(results["runs"], results["seeds"], results["runtime"]):
        if not rt:
            rows.append([f"`{_md_escape(path)}`", str(seed)] + ["not recorded"] + [""] * 4)
            continue
        speed = rt.get("bf16_speedup")
        rows.append([f"`{_md_escape(path)}`", str(seed), _md_escape(rt.get("dtype")), _md_escape(rt.get("device")),
                     _md_escape(rt.get("torch")), _md_escape(" ".join(rt.get("cpu_flags") or []) or "—"),
                     "" if speed is None else f"{speed:.2f}x"])
    return ["## Run environment", ""] + _md_table(
        ["Run", "Seed", "dtype", "Device", "torch", "CPU SIMD flags", "bf16 / fp32 speed"], rows, left=6)


def _markdown(results: dict[str, Any], figures: dict[str, Any]) -> str:
    sets, roles = results["eval_sets"], {s: results["sets"][s]["role"] for s in results["eval_sets"]}
    main_sets = [s for s in sets if roles[s] in ("test", "shift")]
    val_sets = [s for s in sets if roles[s] == "validation"]
    shifts = [s for s in sets if roles[s] == "shift"]
    ref, val = results["reference_test_set"], results["validation_set"]
    seeds = results["seeds"]
    L = ["# swaglora evaluation report", ""]
    L.append(f"Runs ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
             f"{', '.join(str(s) for s in seeds)}):")
    L += [f"- `{p}`" for p in results["runs"]] + [""]
    L.append(f"Numbers: every metric is printed as `f\"{{x:.{DECIMALS}f}}\"` of the value in "
             "`results.json`; cells read `mean ± std` (sample std over seeds) when an entry has "
             "several seeds, `n/a` for a missing/undefined value, `—` when the method has no "
             "result on that set. Full-precision values are in `results.csv` / `results.json`.")
    L.append("")
    L += _environment(results)
    if results["notes"]:
        L += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in results["notes"]] + [""]

    L += ["## Evaluation sets", ""]
    L += _md_table(["Set", "Role", "Examples", "Methods"],
                   [[_md_escape(s), roles[s], "" if results["sets"][s]["n"] is None else str(results["sets"][s]["n"]),
                     str(sum(1 for m in results["methods"] if s in results["metrics"].get(m, {})))]
                    for s in sets], left=2)

    L += ["## Main results", "",
          "Accuracy (ACC, higher is better), expected calibration error (ECE, 15 bins), negative "
          "log-likelihood (NLL) and Brier score (lower is better) on the in-distribution test set "
          "and the shifted sets.", ""]
    L += _metric_table(results, main_sets, BASE_METRICS)
    if val_sets:
        L += ["### Validation split", ""] + _metric_table(results, val_sets, BASE_METRICS)
    L += ["### Posterior samples per method", ""]
    L += _md_table(["Method", "Samples"], [[_md_escape(m), str(results["n_samples"][m])] for m in results["methods"]])
    L += _interval_tables(results)

    L += ["## OOD detection", ""]
    if ref is not None and shifts:
        L += [f"Each shift set (positive) against the in-distribution test set `{ref}`; higher "
              "score = more OOD. AUROC and AUPR: higher is better; FPR@95TPR: lower is better. "
              "MI (epistemic) and expected-entropy (aleatoric) rows exist only for methods with "
              "several posterior samples.", ""]
        L += _ood_table(results, shifts)
    else:
        L += ["No OOD evaluation (needs a test set and at least one shift set).", ""]

    L += ["## Selective prediction", "",
          "AURC (area under the risk-coverage curve, lower is better) and accuracy on the most "
          "confident 50/80/90% of each set (confidence = max predictive probability).", ""]
    L += _metric_table(results, sets, SELECTIVE_METRICS)

    risk = results.get("abstain_risk")
    if risk is not None:
        L += ["## Abstention", ""]
        if val is None:
            L += ["No validation set: abstention thresholds cannot be chosen, so no rows.", ""]
        else:
            L += [f"Target risk {format_number(risk)}: per method and seed the lowest confidence "
                  f"threshold whose selective risk on `{val}` is at most the target; its risk and "
                  "coverage on each set.", ""]
            header = ["Method", f"{val} Threshold"] + [f"{s} {METRIC_LABELS[k]}" for s in sets
                                                       for k in ("abstain_risk", "abstain_coverage")]
            rows = []
            for m in results["methods"]:
                d = results["metrics"].get(m, {})
                if "abstain_threshold" not in d.get(val, {}):
                    continue
                rows.append([_md_escape(m), format_cell(d[val]["abstain_threshold"])]
                            + [format_cell(d.get(s, {}).get(k)) for s in sets
                               for k in ("abstain_risk", "abstain_coverage")])
            L += _md_table(header, rows)

    L += ["## Figures", ""]
    if not (figures.get("reliability") or figures.get("risk_coverage") or figures.get("entropy")):
        L += ["No figures: they need predictions on an in-distribution test set.", ""]
    if figures.get("reliability"):
        L += [f"### Reliability diagrams (`{ref}`, pooled over seeds)", ""]
        L += [f"![reliability {m}]({p})" for m, p in figures["reliability"].items()] + [""]
    if figures.get("risk_coverage"):
        L += [f"### Risk-coverage curves (`{ref}`, pooled over seeds)", "",
              f"![risk-coverage]({figures['risk_coverage']})", ""]
    if figures.get("entropy"):
        L += [f"### Predictive entropy: `{ref}` vs shift sets (pooled over seeds)", ""]
        L += [f"![entropy {m}]({p})" for m, p in figures["entropy"].items()] + [""]

    uq = results.get("uncertain_questions")
    if uq:
        L += ["## The ten most uncertain test questions", "",
              f"Highest predictive entropy on `{uq['eval_set']}` for `{uq['method']}` "
              f"({results['n_samples'][uq['method']]} samples), seed {uq['seed']}.", ""]
        L += _md_table(["#", "Question", "Predicted distribution", "Prediction", "Answer", "Entropy"],
                       [[str(i + 1), _md_escape(_truncate(q.get("question"))), _distribution(q),
                         _md_escape(q.get("prediction")), _md_escape(q.get("answer")),
                         format_number(q["total_entropy"])] for i, q in enumerate(uq["questions"])], left=5)
    return "\n".join(L).rstrip() + "\n"


# --------------------------------------------------------------------------- figures
def _pooled(runs: list[_Run], s: str, m: str) -> list[_Preds]:
    return [r.entries[(s, m)].preds for r in runs if (s, m) in r.entries and r.entries[(s, m)].preds]


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _figures(results: dict[str, Any], fig_dir: Path) -> dict[str, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new(w: float = 5.0, h: float = 4.5, ncols: int = 1) -> tuple[Any, Any]:
        fig = Figure(figsize=(w, h))
        FigureCanvasAgg(fig)
        return fig, fig.subplots(1, ncols, squeeze=False)[0]

    ref = results["reference_test_set"]
    out: dict[str, Any] = {"reliability": {}, "entropy": {}, "risk_coverage": None}
    if ref is None:
        return out
    runs = _raw_runs(results)
    shifts = [s for s in results["eval_sets"] if results["sets"][s]["role"] == "shift"]
    fig_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for m in results["methods"]:
        base, k = _safe_name(m), 1
        while (name := base if k == 1 else f"{base}-{k}") in names.values():
            k += 1
        names[m] = name

    rc_fig, (rc_ax,) = new(6.0, 4.5)
    any_rc = False
    for m in results["methods"]:
        ps = _pooled(runs, ref, m)
        if not ps:
            continue
        c = max(p.probs.shape[1] for p in ps)
        probs = np.concatenate([np.pad(p.probs, ((0, 0), (0, c - p.probs.shape[1]))) for p in ps])
        correct = np.concatenate([p.correct for p in ps])
        conf = np.concatenate([p.confidence for p in ps])
        # labels consistent with the stored correctness (only argmax == label matters for bins)
        pred = probs.argmax(1)
        labels = np.where(correct > 0.5, pred, (pred + 1) % max(c, 2))
        b = M.reliability_bins(probs, labels, N_BINS)
        e = M.ece(probs, labels, N_BINS)
        fig, (ax,) = new()
        lower, width = np.asarray(b["lower"]), 1.0 / N_BINS
        accs = np.nan_to_num(np.asarray(b["accuracy"]), nan=0.0)
        confs = np.asarray(b["confidence"])
        ax.bar(lower, accs, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
        has = np.asarray(b["count"]) > 0
        ax.bar(lower[has], (confs - accs)[has], bottom=accs[has], width=width, align="edge",
               color="none", edgecolor="tab:red", hatch="//", linewidth=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{m} on {ref}: ECE {format_number(e)} (pooled)")
        ax.legend(loc="upper left", fontsize=8)
        path = fig_dir / f"reliability_{names[m]}.png"
        _save_fig(fig, path)
        out["reliability"][m] = f"figures/{path.name}"

        cov, risk = M.risk_coverage(conf, correct)
        aurc = results["metrics"].get(m, {}).get(ref, {}).get("aurc")
        lab = m if aurc is None else f"{m} (AURC {format_number(aurc['mean'])})"
        rc_ax.plot(cov.numpy(), risk.numpy(), label=lab)
        any_rc = True

        fields = [("total_entropy", "predictive entropy (nats)")]
        if results["n_samples"].get(m, 1) > 1:
            fields.append(("mutual_information", "mutual information (nats)"))
        fig, axes = new(5.0 * len(fields), 4.0, len(fields))
        for ax, (fld, xlabel) in zip(axes, fields):
            series = [(f"{ref} (in-dist.)", np.concatenate([getattr(p, fld) for p in ps]))]
            for s in shifts:
                q = _pooled(runs, s, m)
                if q:
                    series.append((s, np.concatenate([getattr(p, fld) for p in q])))
            hi = max(float(v.max()) for _, v in series)
            bins = np.linspace(0.0, hi if hi > 0 else 1.0, 31)
            for label, v in series:
                ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.5, label=label)
            ax.set(xlabel=xlabel, ylabel="density", title=f"{m}: {fld.replace('_', ' ')}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / f"entropy_{names[m]}.png"
        _save_fig(fig, path)
        out["entropy"][m] = f"figures/{path.name}"

    if any_rc:
        rc_ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="risk (error rate)",
                  title=f"Risk-coverage on {ref} (pooled over seeds)")
        rc_ax.legend(fontsize=8)
        path = fig_dir / "risk_coverage.png"
        _save_fig(rc_fig, path)
        out["risk_coverage"] = f"figures/{path.name}"
    return out


def write_report(results: dict[str, Any], out_dir: str | Path, abstain_risk: float | None = None) -> Path:
    """Write ``report.md``, ``results.csv``, ``results.json`` and ``figures/*.png`` to ``out_dir``.

    Args:
        results: output of :func:`collect_results` (or its ``results.json``; the run
            directories listed in it are then re-read for the figures).
        out_dir: created if needed.
        abstain_risk: target risk for the abstention table (computed here if ``results``
            does not already hold it for this target); ``None`` keeps what ``results`` has.

    Returns:
        Path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "_raw": _raw_runs(results)}  # the caller's dict is left untouched
    if abstain_risk is not None and results.get("abstain_risk") != float(abstain_risk):
        results = add_abstention(results, abstain_risk)
    figures = _figures(results, out_dir / "figures")
    public = _public(results)
    atomic_write_json(out_dir / "results.json", public)
    atomic_write_text(out_dir / "results.csv", _csv_text(public))
    report = out_dir / "report.md"
    atomic_write_text(report, _markdown(public, figures))
    return report


def print_table(results: dict[str, Any]) -> str:
    """Compact plain-text table: one line per (eval set, method) with ACC / ECE / NLL / Brier."""
    sets, methods = results["eval_sets"], results["methods"]
    header = ["set", "role", "method"] + [METRIC_LABELS[k] for k in BASE_METRICS]
    rows = []
    for s in sets:
        for m in methods:
            d = results["metrics"].get(m, {}).get(s)
            if d is None:
                continue
            rows.append([s, results["sets"][s]["role"], m] + [format_cell(d.get(k)) for k in BASE_METRICS])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    n = len(results["seeds"])

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        out.append(line(r))
        prev = r[0]
    out.append(f"({n} seed{'s' if n != 1 else ''}; mean ± sample std when several)")
    return "\n".join(out)
