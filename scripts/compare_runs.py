"""One row of two protocols, paired on the same questions: B − A with its 95% bootstrap interval.

    python scripts/compare_runs.py --a runs/defaults-arce/seed-1 --b runs/arce-lr10/seed-1 \
        --row swag --set validation --labels "swag lr,swag lr/10"

For a choice between two settings made on validation, where the two runs are not one study (e.g. a setting the
study did not screen): reads ``RUN/eval/SET/ROW/predictions.jsonl`` of each run, aligns the questions by id (the
runs must have scored the same questions with the same answers), and prints ACC, ECE, NLL, Brier and AURC of each
protocol with B − A, from :func:`swaglora.metrics.paired_bootstrap` (1,000 resamples of the questions, the same
for both protocols). Several runs per side (comma-separated, one per seed, in the same seed order) are pooled as
the report pools seeds: a resample's statistic is the mean over the seeds. ``*`` where the interval excludes 0.
Markdown on standard output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from swaglora import metrics as M
from swaglora.reporting.load import read_predictions

KEYS = ("accuracy", "ece", "nll", "brier", "aurc")
LABEL = {"accuracy": "ACC", "ece": "ECE", "nll": "NLL", "brier": "Brier", "aurc": "AURC"}


def _predictive(run: Path, eval_set: str, row: str, order: list[str] | None, answers: dict[str, str] | None):
    path = run / "eval" / eval_set / row / "predictions.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is {row!r} evaluated on {eval_set!r} in {run}?)")
    preds = read_predictions(path)
    by_id = {r["id"]: (i, r) for i, r in enumerate(preds.rows)}
    if order is None:
        order = [r["id"] for r in preds.rows]
        answers = {r["id"]: r["answer"] for r in preds.rows}
    if set(by_id) != set(order):
        raise ValueError(f"{path}: scored other questions than the first run ({len(set(by_id) ^ set(order))} ids differ)")
    wrong = [q for q in order if by_id[q][1]["answer"] != answers[q]]
    if wrong:
        raise ValueError(f"{path}: question {wrong[0]!r} has another answer than in the first run")
    probs = preds.probs[[by_id[q][0] for q in order]]
    labels = np.asarray([by_id[q][1]["labels"].index(answers[q]) for q in order])
    return probs, labels, order, answers


def compare(a: list[Path], b: list[Path], eval_set: str, row: str, labels: tuple[str, str] = ("A", "B"),
            n_boot: int = 1000) -> dict[str, dict[str, dict[str, float]]]:
    """``paired_bootstrap`` of the row's predictive in runs ``a`` and ``b`` (one run per seed, same seed order),
    differences to ``a``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"--a has {len(a)} runs and --b {len(b)}: give one run per seed on each side")
    order = answers = y = None
    sides: dict[str, list[np.ndarray]] = {labels[0]: [], labels[1]: []}
    for label, runs in zip(labels, (a, b)):
        for run in runs:
            probs, lab, order, answers = _predictive(Path(run), eval_set, row, order, answers)
            y = lab if y is None else y
            sides[label].append(probs)
    width = max(p.shape[1] for v in sides.values() for p in v)
    sides = {k: [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in v] for k, v in sides.items()}
    return M.paired_bootstrap(sides, y, reference=labels[0], n_boot=n_boot, seed=0)


def table(result: dict, labels: tuple[str, str]) -> str:
    def num(x: float, signed: bool = False) -> str:
        return (f"{x:+.4f}" if signed else f"{x:.4f}").replace("-", "−")

    lines = [f"| metric | {labels[0]} | {labels[1]} | {labels[1]} − {labels[0]} [95% CI] |", "|---|---:|---:|---:|"]
    for k in KEYS:
        d = result[labels[1]][f"{k}_diff"]
        star = " *" if d["significant"] else ""
        lines.append(f"| {LABEL[k]} | {num(result[labels[0]][k]['value'])} | {num(result[labels[1]][k]['value'])} | "
                     f"{num(d['value'], True)} [{num(d['lo'], True)}, {num(d['hi'], True)}]{star} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="run directories of protocol A, comma-separated (one per seed)")
    parser.add_argument("--b", required=True, help="run directories of protocol B, in the same seed order")
    parser.add_argument("--row", required=True, help="results-table row, e.g. swag")
    parser.add_argument("--set", default="validation", help="evaluation set (default: validation)")
    parser.add_argument("--labels", default="A,B", help="names of the two protocols, comma-separated")
    args = parser.parse_args(argv)
    labels = tuple(x.strip() for x in args.labels.split(","))
    if len(labels) != 2 or labels[0] == labels[1]:
        parser.error(f"--labels: two different names, got {args.labels!r}")
    try:
        result = compare([Path(p) for p in args.a.split(",")], [Path(p) for p in args.b.split(",")],
                         args.set, args.row, labels)
    except ValueError as err:
        parser.error(str(err))
    print(table(result, labels), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
