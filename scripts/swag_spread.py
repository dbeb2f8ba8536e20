"""How wide each member's SWAG posterior is, how far its mean moved from MAP, and how the SWAG phase trained.

    python scripts/swag_spread.py runs/arce-lr1/seed-0 runs/arce-lr10/seed-0

For every ``RUN/members/M`` with a saved SWAG posterior (``posteriors/swag``) prints, from the saved files alone
(no model is loaded):

* snapshots collected and the rank K' held;
* Σ diag: the trace of the diagonal part, Σ_i (E[θ_i²] − E[θ_i]²) over all LoRA parameters;
* Σ low-rank: the trace of the low-rank part, ‖D‖²_F / (K' − 1) (D: the K' deviation rows held);
* ‖mean − MAP‖: the L2 distance of the SWA mean from the MAP weights (``posteriors/map``);
* the validation NLL of the training iterate and the training loss after each epoch (``train_log.jsonl``).

A sample at scale s has covariance s·(Σ_diag + Σ_low-rank) around the mean (the paper's ½ is the default s = 0.5),
so the traces compare the spread of two protocols at one scale. Markdown on standard output.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from swaglora.params import flatten
from swaglora.posterior import load_posterior


def spread(member: Path) -> dict:
    swag = load_posterior(member / "posteriors" / "swag")
    mean, k = swag.state.mean.double(), swag.rank
    out = {
        "n": swag.n_collected, "rank": k,
        "diag": float(swag.variance().double().sum()),
        "lowrank": float((swag.state.deviations[:k].double() ** 2).sum() / (k - 1)) if k >= 2 else 0.0,
        "shift": math.nan, "val_nll": [], "train_loss": [],
    }
    map_dir = member / "posteriors" / "map"
    if (map_dir / "posterior_config.json").is_file():
        weights = load_posterior(map_dir).state_dict()
        out["shift"] = float((mean - flatten({n: weights[n] for n in swag.parameter_shapes}, torch.float64)).norm())
    log = member / "train_log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if "val_nll" in row:
                out["val_nll"].append(row["val_nll"])
            if "train_loss" in row:
                out["train_loss"].append(row["train_loss"])
    return out


def members(run: Path) -> list[Path]:
    found = sorted(p.parents[2] for p in run.glob("members/*/posteriors/swag/posterior_config.json"))
    if not found:
        raise ValueError(f"{run}: no members/*/posteriors/swag (is this a run directory with a SWAG posterior?)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (one seed each)")
    args = parser.parse_args(argv)
    try:
        table = [(run, m, spread(m)) for run in args.runs for m in members(run)]
    except ValueError as exc:
        parser.error(str(exc))
    print("| run | member | snapshots (K') | Σ diag | Σ low-rank | ‖mean − MAP‖ | iterate val NLL per epoch | training loss per epoch |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for run, m, s in table:
        arrow = lambda xs, f: " → ".join(format(x, f) for x in xs) or "–"  # noqa: E731
        print(f"| {run} | {m.name} | {s['n']} ({s['rank']}) | {s['diag']:.4g} | {s['lowrank']:.4g} | {s['shift']:.4g} "
              f"| {arrow(s['val_nll'], '.3f')} | {arrow(s['train_loss'], '.2f')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
