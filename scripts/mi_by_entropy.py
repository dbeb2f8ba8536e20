"""Does mutual information see a shift that total entropy does not? OOD AUROC of MI within bins of equal total
entropy (quantile bins of the pooled in-distribution + shift questions), per method and shift set.

    python scripts/mi_by_entropy.py RUN_DIR --methods swag,multiswag,ensemble,laplace [--test arc_easy] [--bins 5]

Reads ``RUN_DIR/eval/<set>/<method>/predictions.jsonl`` (a ``swaglora run``/``evaluate`` directory of one seed) and
prints a Markdown table: the overall AUROC of MI, total entropy and expected entropy (each shift set positive
against the test set), then MI's AUROC within each entropy bin with the share of shift questions in it. An
overall MI AUROC near or under 0.5 with within-bin AUROCs near 0.5 says that, at equal predictive entropy, the
posterior's samples disagree no more on the shift set than in distribution: a shift in difficulty (aleatoric),
not in novelty (epistemic).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from swaglora import metrics as M
from swaglora.reporting.load import read_predictions

FIELDS = ("mutual_information", "total_entropy", "expected_entropy")


def read(path: Path) -> dict[str, np.ndarray]:
    preds = read_predictions(path)  # the report's reader: the same checks and fields
    return {k: getattr(preds, k) for k in FIELDS}


def by_entropy(inside: dict[str, np.ndarray], shift: dict[str, np.ndarray], bins: int) -> dict:
    """Overall AUROCs and MI's AUROC within ``bins`` quantile bins of the pooled total entropy."""
    pooled = np.r_[inside["total_entropy"], shift["total_entropy"]]
    edges = np.quantile(pooled, np.linspace(0, 1, bins + 1))
    which = lambda h: np.clip(np.searchsorted(edges, h, side="right") - 1, 0, bins - 1)  # noqa: E731
    b_in, b_out = which(inside["total_entropy"]), which(shift["total_entropy"])
    within = []
    for k in range(bins):
        a, b = inside["mutual_information"][b_in == k], shift["mutual_information"][b_out == k]
        within.append({"auroc": M.auroc(a, b) if len(a) and len(b) else None, "n": int(len(a) + len(b)),
                       "shift_share": len(b) / max(1, len(a) + len(b))})
    return {"overall": {k: M.auroc(inside[k], shift[k]) for k in FIELDS}, "within": within}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory (one seed) with eval/<set>/<method>/predictions.jsonl")
    parser.add_argument("--methods", required=True, help="comma-separated rows with several posterior samples")
    parser.add_argument("--test", default=None, help="in-distribution set (default: the one whose role is test)")
    parser.add_argument("--bins", type=int, default=5)
    args = parser.parse_args(argv)
    sets = {}
    for metrics in sorted((args.run / "eval").glob("*/*/metrics.json")):
        info = json.loads(metrics.read_text())
        sets.setdefault(info["eval_set"], info["role"])
    test = args.test or next(s for s, role in sets.items() if role == "test")
    shifts = [s for s, role in sets.items() if role == "shift"]
    print(f"| method | shift set | AUROC MI | AUROC entropy | AUROC expected entropy | "
          + " | ".join(f"MI AUROC in entropy bin {k + 1} (shift share)" for k in range(args.bins)) + " |")
    print("|---|---|" + "---:|" * (3 + args.bins))
    for m in [x for x in args.methods.split(",") if x]:
        inside = read(args.run / "eval" / test / m / "predictions.jsonl")
        for s in shifts:
            r = by_entropy(inside, read(args.run / "eval" / s / m / "predictions.jsonl"), args.bins)
            cells = [f"{w['auroc']:.2f} ({w['shift_share']:.0%})" if w["auroc"] is not None else "—" for w in r["within"]]
            o = r["overall"]
            print(f"| {m} | {s} | {o['mutual_information']:.3f} | {o['total_entropy']:.3f} | "
                  f"{o['expected_entropy']:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
