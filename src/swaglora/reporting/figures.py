"""Figures of collected results: reliability diagrams, risk-coverage curves, entropy histograms (PNG)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics as M
from ..io import atomic_write_bytes
from .load import _Preds, _Run, _raw_runs
from .render import format_number


N_BINS = 15


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _pooled(runs: list[_Run], s: str, m: str) -> list[_Preds]:
    return [r.entries[(s, m)].preds for r in runs if (s, m) in r.entries and r.entries[(s, m)].preds]


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _new_figure(w: float = 5.0, h: float = 4.5, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib is slow to import: only to draw
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _file_names(methods: list[str]) -> dict[str, str]:
    """A distinct file-name-safe name per method."""
    names: dict[str, str] = {}
    for m in methods:
        base, k = _safe_name(m), 1
        while (name := base if k == 1 else f"{base}-{k}") in names.values():
            k += 1
        names[m] = name
    return names


def _reliability(m: str, ref: str, ps: list[_Preds], path: Path) -> None:
    c = max(p.probs.shape[1] for p in ps)
    probs = np.concatenate([np.pad(p.probs, ((0, 0), (0, c - p.probs.shape[1]))) for p in ps])
    correct = np.concatenate([p.correct for p in ps])
    # labels consistent with the stored correctness (only argmax == label matters for bins)
    pred = probs.argmax(1)
    labels = np.where(correct > 0.5, pred, (pred + 1) % max(c, 2))
    b = M.reliability_bins(probs, labels, N_BINS)
    e = M.ece(probs, labels, N_BINS)
    fig, (ax,) = _new_figure()
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
    _save_fig(fig, path)


def _entropy_histograms(results: dict[str, Any], runs: list[_Run], m: str, ref: str, ps: list[_Preds],
                        shifts: list[str], path: Path) -> None:
    fields = [("total_entropy", "predictive entropy (nats)")]
    if results["n_samples"].get(m, 1) > 1:
        fields.append(("mutual_information", "mutual information (nats)"))
    fig, axes = _new_figure(5.0 * len(fields), 4.0, len(fields))
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
    _save_fig(fig, path)


def _figures(results: dict[str, Any], fig_dir: Path) -> dict[str, Any]:
    ref = results["reference_test_set"]
    out: dict[str, Any] = {"reliability": {}, "entropy": {}, "risk_coverage": None}
    if ref is None:
        return out
    runs = _raw_runs(results)
    shifts = [s for s in results["eval_sets"] if results["sets"][s]["role"] == "shift"]
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = _file_names(results["methods"])
    rc_fig, (rc_ax,) = _new_figure(6.0, 4.5)
    any_rc = False
    for m in results["methods"]:
        ps = _pooled(runs, ref, m)
        if not ps:
            continue
        _reliability(m, ref, ps, fig_dir / f"reliability_{names[m]}.png")
        out["reliability"][m] = f"figures/reliability_{names[m]}.png"
        cov, risk = M.risk_coverage(np.concatenate([p.confidence for p in ps]), np.concatenate([p.correct for p in ps]))
        aurc = results["metrics"].get(m, {}).get(ref, {}).get("aurc")
        rc_ax.plot(cov.numpy(), risk.numpy(), label=m if aurc is None else f"{m} (AURC {format_number(aurc['mean'])})")
        any_rc = True
        _entropy_histograms(results, runs, m, ref, ps, shifts, fig_dir / f"entropy_{names[m]}.png")
        out["entropy"][m] = f"figures/entropy_{names[m]}.png"
    if any_rc:
        rc_ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="risk (error rate)",
                  title=f"Risk-coverage on {ref} (pooled over seeds)")
        rc_ax.legend(fontsize=8)
        _save_fig(rc_fig, fig_dir / "risk_coverage.png")
        out["risk_coverage"] = "figures/risk_coverage.png"
    return out
