"""``python -m benchmarks [--quick] [--only NAME[,NAME...]]``: run the benchmarks, print a summary table.

Writes ``benchmarks/results.json`` (``results-quick.json`` with ``--quick``, so a smoke test never
overwrites real numbers); with ``--only`` the named entries are replaced and the others kept. Every entry records
the machine and date it was measured on; the top-level ``machine`` and ``date`` are those of the latest run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

BENCHES = ("train_step", "roofline", "swag_overhead", "bma", "memory", "eval_rows")
HERE = Path(__file__).resolve().parent


def machine() -> dict:
    """CPU model and the SIMD flags that decide fp32/bf16 GEMM speed, from /proc/cpuinfo."""
    import os

    import torch

    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model and a few examples: checks the scripts run")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    out_path = HERE / ("results-quick.json" if args.quick else "results.json")
    saved = json.loads(out_path.read_text()) if out_path.is_file() and args.only else {}
    results = saved.get("benchmarks", {})
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine()}
    for name in names:
        start = time.perf_counter()
        try:
            result = importlib.import_module(f"benchmarks.bench_{name}").main(quick=args.quick)
        except Exception:  # noqa: BLE001 - one failing benchmark must not lose the others' numbers
            traceback.print_exc()
            result = {"bench": name, "error": traceback.format_exc(limit=3), "ratios": []}
        result["seconds"] = time.perf_counter() - start
        # each entry keeps the machine and date it was measured on: --only mixes runs of different machines
        result.update(date=info["date"], machine=info["machine"])
        results[name] = result

    out_path.write_text(json.dumps({**info, "benchmarks": results}, indent=1) + "\n")

    print(f"\n== summary ({info['machine']['cpu']}, {info['machine']['cores']} cores, "
          f"{'/'.join(info['machine']['flags'])}, torch {info['machine']['torch']})")
    print(f"{'benchmark':14s} {'ratio':46s} {'value':>9s}  {'goal':8s} {'':7s} {'time':>6s}")
    failed = False
    for name in names:
        r = results[name]
        if "error" in r:
            failed = True
            print(f"{name:14s} ERROR: {r['error'].strip().splitlines()[-1]}")
        for i, x in enumerate(r["ratios"]):
            verdict = {True: "met", False: "NOT met", None: ""}[x["ok"]]
            secs = f"{r['seconds']:5.0f}s" if i == 0 else ""
            print(f"{name if i == 0 else '':14s} {x['name']:46s} {x['value']:9.3f}  {x['goal']:8s} {verdict:7s} {secs:>6s}")
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
