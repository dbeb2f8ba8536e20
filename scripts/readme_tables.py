"""The README's result tables from a report's results.json (``swaglora report ... --out DIR`` writes it).

    python scripts/readme_tables.py runs/arce-full/report/results.json [--methods map,swag,...]

With one results.json, prints three Markdown tables: the in-distribution test set (ACC, ECE, NLL, Brier, AURC as mean ± std over seeds,
and the paired differences to MAP with their 95% bootstrap intervals, pooled over seeds: ``*`` where the interval
excludes 0), the shift sets (ACC, NLL, Δ NLL) and OOD detection (AUROC by entropy and by MI per shift set, each
with its paired difference to MAP's entropy AUROC). Every number is copied from results.json, rounded to 3 decimals; the
best mean of a column (lowest, or highest for ACC and AUROC) is bold. Rows: every method of the report, or
``--methods``.

    python scripts/readme_tables.py docs/defaults-arce/seed-0/results.json docs/defaults-arce/seed-1/results.json \
        --labels "seed 0,seed 1" [--methods ...]

With several results.json (e.g. one report per seed, where the seeds' predictions cannot be pooled), prints the
paired differences to MAP side by side, one column per file under each metric: the in-distribution test set (Δ ACC,
ECE, NLL, Brier, AURC), then each shift set's Δ NLL and Δ entropy AUROC. The files must have the same test and shift
sets and the same reference row.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from swaglora.reporting.render import _md_table

HIGHER = {"accuracy", "ood_auroc_entropy", "ood_auroc_mi"}
LABEL = {"accuracy": "ACC", "ece": "ECE", "nll": "NLL", "brier": "Brier", "aurc": "AURC",
         "ood_auroc_entropy": "AUROC (entropy)", "ood_auroc_mi": "AUROC (MI)"}


def _num(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    text = f"{x:+.3f}" if signed else f"{x:.3f}"
    return text.replace("-", "−")


def _mean_std(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    if stat["n_seeds"] > 1:
        return f"{_num(stat['mean'])} ± {_num(stat['std'])}"
    return _num(stat["mean"])


def _diff(d: dict | None) -> str:
    if not d:
        return ""
    if d["lo"] == d["hi"] == d["value"]:
        return _num(d["value"], signed=True)
    star = " *" if d.get("significant") else ""
    return f"{_num(d['value'], signed=True)} [{_num(d['lo'])}, {_num(d['hi'])}]{star}"


def _best(results: dict, methods: list[str], s: str, key: str) -> float | None:
    values = [results["metrics"].get(m, {}).get(s, {}).get(key, {}).get("mean") for m in methods]
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return max(values) if key in HIGHER else min(values)


def _cell(results: dict, m: str, s: str, key: str, best: float | None) -> str:
    stat = results["metrics"].get(m, {}).get(s, {}).get(key)
    text = _mean_std(stat)
    if stat and best is not None and stat.get("mean") == best:
        text = f"**{text}**"
    return text


def _diffs(results: dict, s: str) -> dict[str, dict]:
    block = next((b for b in results.get("intervals") or [] if b["eval_set"] == s), None)
    return {d["method"]: d for d in block["methods"]} if block else {}


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(_md_table(header, rows)).rstrip()  # the report's Markdown tables: text column, then numbers


def tables(results: dict, methods: list[str] | None = None) -> str:
    methods = [m for m in (methods or results["methods"]) if m in results["metrics"]]
    roles = {s: results["sets"][s]["role"] for s in results["eval_sets"]}
    test = results["reference_test_set"]
    shifts = [s for s in results["eval_sets"] if roles[s] == "shift"]
    out = []

    keys = ("accuracy", "ece", "nll", "brier", "aurc")
    diffs = _diffs(results, test)
    best = {k: _best(results, methods, test, k) for k in keys}
    rows = [[m] + [_cell(results, m, test, k, best[k]) for k in keys]
            + [_diff(diffs.get(m, {}).get(f"{k}_diff")) or "—" for k in keys]
            for m in methods]
    n = results["sets"][test]["n"]
    block = next((b for b in results.get("intervals") or [] if b["eval_set"] == test), None)
    ref = block["reference"] if block and block["reference"] else "map"
    out.append(f"{test} test ({n} questions; Δ = method − {ref}):\n\n" + _table(
        ["method"] + [LABEL[k] for k in keys] + [f"Δ {LABEL[k]}" for k in keys], rows))

    if shifts:
        header, cols = ["method"], []
        for s in shifts:
            header += [f"{s} ACC", f"{s} NLL", f"{s} Δ NLL"]
            cols.append((s, _diffs(results, s), _best(results, methods, s, "accuracy"), _best(results, methods, s, "nll")))
        rows = []
        for m in methods:
            row = [m]
            for s, d, best_acc, best_nll in cols:
                row += [_cell(results, m, s, "accuracy", best_acc), _cell(results, m, s, "nll", best_nll),
                        _diff(d.get(m, {}).get("nll_diff")) or "—"]
            rows.append(row)
        out.append("Shift sets:\n\n" + _table(header, rows))

        header, cols = ["method"], []
        ood = {b["eval_set"]: {(d["method"], d["score"]): d for d in b["rows"]} for b in results.get("ood_intervals") or []}
        for s in shifts:
            for key in ("ood_auroc_entropy", "ood_auroc_mi"):
                header += [f"{s} {LABEL[key]}", "Δ"]
                cols.append((s, key))
        best = {c: _best(results, methods, *c) for c in cols}
        rows = []
        for m in methods:
            row = [m]
            for s, key in cols:
                d = ood.get(s, {}).get((m, key.removeprefix("ood_auroc_")), {}).get("auroc_diff")
                row += [_cell(results, m, s, key, best[(s, key)]), _diff(d) if d else "—"]
            rows.append(row)
        out.append(f"OOD detection (AUROC, each shift set against {test} test; Δ = AUROC − {ref}'s entropy AUROC on "
                   f"the same resamples):\n\n" + _table(header, rows))
    return "\n\n".join(out) + "\n"


def _layout(results: dict) -> tuple[str, list[str], str]:
    test = results["reference_test_set"]
    shifts = [s for s in results["eval_sets"] if results["sets"][s]["role"] == "shift"]
    block = next((b for b in results.get("intervals") or [] if b["eval_set"] == test), None)
    return test, shifts, (block["reference"] if block and block["reference"] else "map")


def side_by_side(files: list[dict], labels: list[str], methods: list[str] | None = None) -> str:
    """Δ to the reference row of each results dict, one column per dict under each metric (two tables)."""
    if len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} results files")
    test, shifts, ref = _layout(files[0])
    for label, r in zip(labels, files):
        if _layout(r) != (test, shifts, ref):
            raise ValueError(f"{label}: test set, shift sets or reference differ from {labels[0]}'s "
                             f"({_layout(r)} vs {(test, shifts, ref)})")
    methods = [m for m in (methods or files[0]["methods"]) if any(m in r["metrics"] for r in files)]
    diffs = [{s: _diffs(r, s) for s in [test, *shifts]} for r in files]
    ood = [{b["eval_set"]: {(d["method"], d["score"]): d for d in b["rows"]} for b in r.get("ood_intervals") or []}
           for r in files]
    keys = ("accuracy", "ece", "nll", "brier", "aurc")
    header = ["method"] + [f"Δ {LABEL[k]} {lab}" for k in keys for lab in labels]
    rows = [[m] + [_diff(d[test].get(m, {}).get(f"{k}_diff")) or "—" for k in keys for d in diffs] for m in methods]
    out = [f"{test} test (Δ = method − {ref}; one column per {', '.join(labels)}):\n\n" + _table(header, rows)]
    if shifts:
        header = ["method"] + [f"{s} Δ NLL {lab}" for s in shifts for lab in labels] \
            + [f"{s} Δ AUROC (entropy) {lab}" for s in shifts for lab in labels]
        rows = []
        for m in methods:
            row = [m] + [_diff(d[s].get(m, {}).get("nll_diff")) or "—" for s in shifts for d in diffs]
            row += [_diff(o.get(s, {}).get((m, "entropy"), {}).get("auroc_diff")) or "—" for s in shifts for o in ood]
            rows.append(row)
        out.append(f"Shift sets (Δ NLL and Δ entropy AUROC against {test} test, to {ref}):\n\n" + _table(header, rows))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json of swaglora report (several: side by side)")
    parser.add_argument("--methods", default="", help="comma-separated rows, in this order (default: all)")
    parser.add_argument("--labels", default="", help="column label per results file when several (default: the "
                                                     "file's seeds, e.g. 'seed 0')")
    args = parser.parse_args(argv)
    files = [json.loads(p.read_text()) for p in args.results]
    methods = [m for m in args.methods.split(",") if m] or None
    if len(files) == 1:
        print(tables(files[0], methods), end="")
        return 0
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else [
        "seed " + ",".join(map(str, r.get("seeds") or [])) for r in files]
    try:
        print(side_by_side(files, labels, methods), end="")
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
