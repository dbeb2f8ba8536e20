"""Peak memory of training and evaluation, and the size of a saved SWAG posterior.

Each phase runs in a fresh subprocess (``python -m benchmarks.bench_memory --phase NAME``) so that its
peak resident set (VmHWM in /proc/self/status, the kernel's high-water mark) is its own:
  * train: default protocol, fill the lower-layer cache for the training + validation questions, then
           optimiser steps (epochs 2+ look like this; epoch 1 additionally runs the lower layers per batch);
  * eval:  default protocol, a new evaluation set with S=4 SWAG-style draws (cache fill + 4 top passes).
Each phase also reports VmHWM just after import + SmolLM2 + LoRA (the floor every phase starts from), so
the phase's own increment is visible, and the cache
size (it grows linearly with the number of distinct questions: tokens x hidden x 4 bytes).
Posterior size: a rank-5 SWAG (mean, second moment, 5 deviation rows, fp32) saved with ``SWAG.save`` for
the paper's layout (r=8 on q_proj,v_proj of all 30 layers) and for the default protocol.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import common

PHASES = ("train", "eval")  # measured in subprocesses; the posterior sizes are files, measured here


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def cache_mb(cache) -> float:
    return sum(t.numel() * t.element_size() for t in cache._store.values()) / 2**20


def posterior_mb(quick: bool, layout: dict) -> tuple[float, int]:
    from swaglora.posterior.swag import SWAG

    s = common.session(quick, **layout)
    swag = SWAG(s.model, max_rank=5)
    for _ in range(6):
        swag.collect(s.model)
    with tempfile.TemporaryDirectory() as tmp:
        swag.save(Path(tmp) / "swag")
        size = sum(f.stat().st_size for f in (Path(tmp) / "swag").iterdir())
    return size / 2**20, swag.num_params


def phase(name: str, quick: bool) -> dict:
    """Runs inside the subprocess; returns what it measured."""
    from swaglora.predict import predict_logits

    common.threads()
    s = common.session(quick, **common.DEFAULT_PROTOCOL)
    after_load = vm_hwm_mb()
    out = {"after_load_mb": after_load}
    if name == "train":
        n = 16 if quick else 100
        train, val = common.examples(n, "train"), common.examples(n // 4, "validation")
        s.cache.fill(train + val)
        opt = common.optimizer(s.model)
        s.model.train()
        for i in range(0, min(n, 80), 8):
            common.train_step(s, train[i : i + 8], opt)
        out.update(questions=len(train) + len(val), cache_mb=cache_mb(s.cache))
    elif name == "eval":
        test = common.examples(16 if quick else 100, "test")
        base = {k: v.detach().clone() for k, v in s.model.named_parameters() if v.requires_grad}
        thetas = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(4)]
        s.cache.fill(test)
        predict_logits(s.scorer, test, thetas, cache=s.cache)
        out.update(questions=len(test), cache_mb=cache_mb(s.cache))
    out["peak_mb"] = vm_hwm_mb()
    return out


def main(quick: bool = False) -> dict:
    root = Path(__file__).resolve().parent.parent
    results = {}
    for name in PHASES:
        cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--phase", name] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory phase {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    train, ev = results["train"], results["eval"]
    paper_mb, paper_d = posterior_mb(quick, {**common.PAPER_LAYOUT, "train_head": False})
    default_mb, default_d = posterior_mb(quick, common.DEFAULT_PROTOCOL)
    post = {"swag_rank5_paper_layout_mb": paper_mb, "paper_layout_D": paper_d,
            "swag_rank5_default_protocol_mb": default_mb, "default_protocol_D": default_d}
    per_100 = 100 * train["cache_mb"] / train["questions"]
    metrics = {
        "after_load_mb": train["after_load_mb"],
        "train_peak_mb": train["peak_mb"],
        "train_increment_mb": train["peak_mb"] - train["after_load_mb"],
        "eval_peak_mb": ev["peak_mb"],
        "eval_increment_mb": ev["peak_mb"] - ev["after_load_mb"],
        "cache_mb_per_100_questions": per_100,
        # make demo: 400 train + 100 validation questions + 3 evaluation sets of 150, all in one session cache
        "cache_mb_demo_estimate": per_100 * (400 + 100 + 3 * 150) / 100,
        **post,
    }
    ratios = [
        common.ratio("train peak RSS (GiB)", train["peak_mb"] / 1024),
        common.ratio("eval peak RSS (GiB)", ev["peak_mb"] / 1024),
        common.ratio("SWAG posterior MB, paper layout", post["swag_rank5_paper_layout_mb"]),
        common.ratio("SWAG posterior MB, default protocol", post["swag_rank5_default_protocol_mb"]),
    ]
    return common.finish("memory", quick, metrics, ratios, ["peaks are per fresh process (VmHWM), MiB unless noted"])


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    if "--phase" in sys.argv:
        print(json.dumps(phase(sys.argv[sys.argv.index("--phase") + 1], quick)))
    else:
        main(quick)
