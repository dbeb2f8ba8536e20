"""Paired differences between chosen rows, on every metric the report intervals: one line per pair ``a:b``.

    python scripts/pairs_table.py RUN [RUN ...] --pairs swag:map-matched,multiswag:ensemble-matched,multiswag:map+ts

For each pair, ``a − b`` with its 95% paired bootstrap interval (pooled over the runs = seeds, the same resamples
as ``swaglora report --reference b``, whose results it reads in process): ACC, ECE, NLL, Brier and AURC on the
in-distribution test set, NLL on each shift set, and the total-entropy OOD AUROC per shift set. ``*`` where the
interval excludes 0. Markdown on standard output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from swaglora.report import collect_results

TEST_KEYS = ("accuracy", "ece", "nll", "brier", "aurc")
LABEL = {"accuracy": "ACC", "ece": "ECE", "nll": "NLL", "brier": "Brier", "aurc": "AURC"}


def cell(d: dict | None) -> str:
    if d is None:
        return "—"
    star = " *" if d.get("significant") else ""
    return f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{star}".replace("-", "−")


def pair_rows(runs: list[Path], pairs: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    by_ref = {b: collect_results(runs, reference=b) for b in dict.fromkeys(b for _, b in pairs)}
    first = next(iter(by_ref.values()))
    test = first["reference_test_set"]
    shifts = [s for s in first["eval_sets"] if first["sets"][s]["role"] == "shift"]
    header = ["a − b"] + [f"{test} Δ {LABEL[k]}" for k in TEST_KEYS] + [f"{s} Δ NLL" for s in shifts]
    header += [f"{s} Δ AUROC (entropy)" for s in shifts]
    rows = []
    for a, b in pairs:
        res = by_ref[b]
        diffs = {blk["eval_set"]: {d["method"]: d for d in blk["methods"]} for blk in res["intervals"]}
        ood = {blk["eval_set"]: {(d["method"], d["score"]): d for d in blk["rows"]} for blk in res["ood_intervals"]}
        row = [f"{a} − {b}"] + [cell(diffs.get(test, {}).get(a, {}).get(f"{k}_diff")) for k in TEST_KEYS]
        row += [cell(diffs.get(s, {}).get(a, {}).get("nll_diff")) for s in shifts]
        row += [cell(ood.get(s, {}).get((a, "entropy"), {}).get("auroc_diff")) for s in shifts]
        rows.append(row)
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (one per seed)")
    parser.add_argument("--pairs", required=True, help="comma-separated a:b (a − b)")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",") if p]
    if any(len(p) != 2 or not all(p) for p in pairs):
        parser.error(f"--pairs: give a:b pairs, got {args.pairs!r}")
    header, rows = pair_rows(args.runs, pairs)
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
