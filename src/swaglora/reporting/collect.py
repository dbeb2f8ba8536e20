"""Aggregating loaded runs: per-seed values, mean and sample std, OOD, selective prediction, abstention, intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics as M
from ..io import read_json
from ..posterior import row, row_names
from ..rundir import member_dirs
from .intervals import _intervals, _ood_intervals
from .load import ROLES, _Entry, _n_samples, _Preds, _Run, _load_run, _raw_runs

DECIMALS = 4
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
N_UNCERTAIN = 10


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


class _Acc:
    """Per (method, eval_set, metric) lists of (seed, value) in run order."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, tuple[list, list]]]] = {}

    def add(self, method: str, eval_set: str, metric: str, seed: int, value: float | None) -> None:
        seeds, values = (self.data.setdefault(method, {}).setdefault(eval_set, {})
                         .setdefault(metric, ([], [])))
        seeds.append(seed)
        values.append(None if value is None else _finite_or_none(value))


def collect_results(run_dirs: Iterable[str | Path] | str | Path,
                    abstain_risk: float | None = None, reference: str | None = None) -> dict[str, Any]:
    """Read evaluation runs (one directory per seed) and aggregate every metric across seeds.

    Args:
        run_dirs: run directories (or a single one) laid out as in the module docstring.
        abstain_risk: if given, also compute the abstention threshold of each method and
            seed on the validation set (:func:`metrics.abstention_threshold`) and its risk
            and coverage on every set (:func:`metrics.selective_risk`).
        reference: the row the paired differences are taken to (default: ``map``, the registry's reference
            row); e.g. ``map-matched`` for SWAG against MAP at equal training compute.

    Returns:
        A JSON-serialisable dict (except the private ``"_raw"`` key holding the loaded
        predictions for the figures) with ``runs``, ``runtime`` (per run, ``None`` if not recorded), ``seeds``, ``methods``,
        ``eval_sets``, ``sets`` (role, n), ``n_samples``, ``reference_test_set``,
        ``validation_set``, ``metrics[method][eval_set][metric]`` =
        ``{mean, std, n_seeds, values, seeds}``, ``uncertain_questions``, ``notes``,
        ``abstain_risk`` and ``format``.

    Raises:
        ValueError: no run directories, a directory without any ``eval/*/*/metrics.json``, or a ``reference``
            that no run evaluated.
    """
    notes: list[str] = []
    runs = _load_runs(run_dirs, notes)
    seeds = [r.seed for r in runs]
    roles, set_n, methods_seen, n_samples = _catalogue(runs, notes)
    methods = sorted(methods_seen, key=_method_key)
    if reference is not None and reference not in methods:
        raise ValueError(f"--reference {reference}: the runs have no '{reference}' results (they have: {', '.join(methods)})")
    eval_sets, ref, val, shifts = _order_sets(runs, roles, notes)
    _note_missing(runs, methods, methods_seen, eval_sets, notes)
    acc = _accumulate(runs, methods, eval_sets, ref, shifts)
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
        "intervals": _intervals(runs, methods, [x for x in eval_sets if roles[x] != "validation"], notes, reference),
        "ood_intervals": _ood_intervals(runs, methods, ref, shifts, {k: f for k, (f, _) in OOD_SCORES.items()}, notes,
                                        reference),
        "costs": _costs(runs, methods, ref),
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


def _costs(runs: list[_Run], methods: list[str], ref: str | None) -> dict[str, dict[str, Any]]:
    """What each row cost, per seed, from the run directories: ``train_seconds`` (the training runs of the members
    its posterior comes from: ``done-<posterior>.json`` where the posterior trained its own member, else the
    member's ``done.json``, MAP and collection phases together; 0 for the base model), ``eval_seconds`` (the row's
    evaluation on every set, post-hoc fitting included: metrics.json's ``seconds``) and ``posterior_mb`` (the
    files of its saved posteriors, MB = 10^6 bytes). ``+ts`` rows cost what their row does (one temperature)."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        if "+" in m or m not in row_names():
            continue
        spec = row(m)
        seeds, train, evals, sizes = [], [], [], []
        for run in runs:
            try:
                members = member_dirs([run.path])
            except FileNotFoundError:  # evaluation files without the members (a copied report input)
                continue
            used = members if spec.all_members else members[:1]
            posteriors = [d / "posteriors" / spec.saved for d in used]
            entry = run.entries.get((ref, m)) if ref is not None else None
            if entry is None or not used or not all(d.is_dir() for d in posteriors):
                continue  # a row this run did not evaluate (or trained but not yet evaluated) costs nothing here
            seconds = 0.0
            for d in used:
                done = d / f"done-{spec.saved}.json"
                done = done if done.is_file() else d / "done.json"
                if not spec.before_training and done.is_file():
                    seconds += float(read_json(done).get("seconds") or 0.0)
            seeds.append(run.seed)
            train.append(seconds)
            evals.append(None if entry.metrics.get("seconds") is None else float(entry.metrics["seconds"]))
            sizes.append(sum(f.stat().st_size for d in posteriors for f in d.iterdir() if f.is_file()) / 1e6)
        if seeds:
            out[m] = {"train_seconds": _stat(seeds, train), "eval_seconds": _stat(seeds, evals),
                      "posterior_mb": _stat(seeds, sizes)}
    return out


def _load_runs(run_dirs: Iterable[str | Path] | str | Path, notes: list[str]) -> list[_Run]:
    """The runs in seed order (stable), with notes on shared seeds and mixed dtypes."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("collect_results: no run directories given")
    runs = [_load_run(d, i, notes) for i, d in enumerate(run_dirs)]
    runs.sort(key=lambda r: r.seed)  # stable: equal seeds keep the given order
    seeds = [r.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        notes.append(f"Several runs share a seed ({seeds}); they are still treated as separate runs.")
    dtypes = sorted({r.runtime.get("dtype") for r in runs if r.runtime})
    if len(dtypes) > 1:
        notes.append(f"The runs computed in different dtypes ({', '.join(map(str, dtypes))}): the spread over seeds "
                     "includes the dtype's effect (see Run environment).")
    return runs


def _catalogue(runs: list[_Run], notes: list[str]) -> tuple[dict[str, str], dict[str, int], dict[str, list[int]], dict[str, int]]:
    """Role and size of every set, the seeds each method has, and each method's sample count."""
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
    return roles, set_n, methods_seen, n_samples


def _order_sets(runs: list[_Run], roles: dict[str, str], notes: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """The sets by role (shift sets in the config's order), the reference test set, the validation set, the shifts."""
    shift_order: list[str] = []
    cfg_shift = (runs[0].config.get("eval") or {}).get("shift") if isinstance(runs[0].config, dict) else None
    if isinstance(cfg_shift, str):
        shift_order = [x.strip() for x in cfg_shift.split(",") if x.strip()]

    def set_key(s: str) -> tuple:
        return (ROLES.index(roles[s]), shift_order.index(s) if s in shift_order else len(shift_order), s)

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
    return eval_sets, ref, val, shifts


def _note_missing(runs: list[_Run], methods: list[str], methods_seen: dict[str, list[int]], eval_sets: list[str],
                  notes: list[str]) -> None:
    seeds = [r.seed for r in runs]
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


def _accumulate(runs: list[_Run], methods: list[str], eval_sets: list[str], ref: str | None, shifts: list[str]) -> _Acc:
    """Per-seed values of the stored metrics, selective prediction on every set and OOD detection per shift set."""
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
        if ref is None:
            continue
        for m in methods:
            e_in = r.entries.get((ref, m))
            if e_in is None or e_in.preds is None:
                continue
            for s in shifts:
                e_out = r.entries.get((s, m))
                if e_out is not None and e_out.preds is not None:
                    multi = max(_n_samples(e_in), _n_samples(e_out)) > 1
                    _ood(acc, m, s, r.seed, e_in.preds, e_out.preds, multi)
    return acc


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


def _public(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if not k.startswith("_")}
