"""Why mutual information ranks in-distribution questions as *more* uncertain than shifted ones (AUROC < 0.5):
mean MI per bin of the MAP model's confidence, per evaluation set, for one row of a run.

usage: python mi_by_confidence.py RUN_DIR ROW [REF_ROW]
"""
import json
import sys
from pathlib import Path

import numpy as np

run, row = Path(sys.argv[1]), sys.argv[2]
ref = sys.argv[3] if len(sys.argv) > 3 else "map"
edges = [0.0, 0.3, 0.4, 0.5, 0.6, 1.0]
print(f"mean MI of {row} by {ref}'s confidence bin (n in parentheses); last columns: mean MI, {ref} accuracy, mean |p_{row} - p_{ref}|")
for set_dir in sorted((run / "eval").iterdir()):
    if not (set_dir / row / "predictions.jsonl").is_file() or set_dir.name == "validation":
        continue
    rows = [json.loads(l) for l in (set_dir / row / "predictions.jsonl").read_text().splitlines()]
    refs = {r["id"]: r for r in (json.loads(l) for l in (set_dir / ref / "predictions.jsonl").read_text().splitlines())}
    mi = np.array([r["mutual_information"] for r in rows])
    conf = np.array([refs[r["id"]]["confidence"] for r in rows])
    moved = np.array([np.abs(np.array(r["probs"]) - np.array(refs[r["id"]]["probs"])).sum() for r in rows])
    cells = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        cells.append(f"{mi[m].mean():.4f} ({m.sum()})" if m.any() else "-")
    acc = np.mean([refs[r["id"]]["correct"] for r in rows])
    print(f"{set_dir.name:15s} " + " | ".join(cells) + f" | {mi.mean():.4f} | {acc:.3f} | {moved.mean():.4f}")
