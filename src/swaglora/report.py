"""Turn finished evaluation directories (one per seed) into tables, figures and a report.

Input: run directories as :mod:`swaglora.rundir` describes them (``config.json``, ``swaglora_run.json``
and ``eval/<set>/<method>/{metrics.json,predictions.jsonl}``). ``role`` is ``validation``, ``test``
(in-distribution) or ``shift`` (OOD). The work is done in :mod:`swaglora.reporting` (load, collect, render,
figures); this module is its public API.

Public API
----------
* :func:`collect_results` reads the runs and returns a dict (``results``) holding, per
  ``(method, eval_set, metric)``, the per-seed values and their mean / sample std
  (``std = 0`` with one seed). Metrics: the stored ``accuracy``, ``ece``, ``nll``,
  ``brier``, ``n``, ``seconds``; derived from the predictions: selective prediction
  (``aurc``, ``acc@50``, ``acc@80``, ``acc@90``) on every set, OOD detection
  (``ood_{auroc,aupr,fpr95}_{entropy,mi,aleatoric}``, stored under the shift set; ``mi``
  and ``aleatoric`` only for methods with ``n_samples > 1``) of every shift set against
  the in-distribution test set, and, with ``abstain_risk``, abstention
  (``abstain_threshold`` under the validation set; ``abstain_risk`` and
  ``abstain_coverage`` under the validation, test and shift sets).
* :func:`write_report` writes ``report.md``, ``results.csv``, ``results.json`` and PNG
  figures under ``figures/`` (every file atomically) and returns the path of ``report.md``.
* :func:`print_table` renders a compact plain-text table for the terminal.
* :func:`interval_tables` renders report.md's section of bootstrap intervals and paired differences to MAP.

Number format (report.md)
-------------------------
Every metric number in report.md is ``format_number(x) == f"{x:.4f}"`` of the exact
value in results.json (``mean`` and ``std``); a cell is ``"<mean>"`` when the entry has
one seed and ``"<mean> ± <std>"`` with several; a missing / non-finite value (e.g. an
abstention threshold of ``inf``, stored as ``null``) is ``"n/a"``. Integer counts
(examples, samples, seeds) are printed as integers. In the "most uncertain questions"
table the predictive distribution is shown with ``f"{p:.2f}"`` per choice and the
entropy with the 4-decimal rule. results.csv stores the full-precision values
(``repr`` of the float, as in results.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write_json, atomic_write_text
from .reporting.collect import ABSTAIN_METRICS, BASE_METRICS, COVERAGES, OOD_SCORES, OOD_STATS, SELECTIVE_METRICS, _public, add_abstention, collect_results
from .reporting.render import DECIMALS, METRIC_LABELS, _csv_text, _markdown, format_cell, format_number, interval_tables, print_table
from .reporting.figures import _figures
from .reporting.load import _raw_runs

__all__ = [
    "collect_results", "write_report", "print_table", "interval_tables", "add_abstention", "format_number", "format_cell",
    "DECIMALS", "METRIC_LABELS", "BASE_METRICS", "SELECTIVE_METRICS", "OOD_STATS",
    "OOD_SCORES", "ABSTAIN_METRICS", "COVERAGES",
]


def write_report(results: dict[str, Any], out_dir: str | Path, abstain_risk: float | None = None) -> Path:
    """Write ``report.md``, ``results.csv``, ``results.json`` and ``figures/*.png`` to ``out_dir``.

    Args:
        results: output of :func:`collect_results` (or its ``results.json``; the run
            directories listed in it are then re-read for the figures).
        out_dir: created if needed.
        abstain_risk: target risk for the abstention table (computed here if ``results``
            does not already hold it for this target); ``None`` keeps what ``results`` has.

    Returns:
        Path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "_raw": _raw_runs(results)}  # the caller's dict is left untouched
    if abstain_risk is not None and results.get("abstain_risk") != float(abstain_risk):
        results = add_abstention(results, abstain_risk)
    figures = _figures(results, out_dir / "figures")
    public = _public(results)
    atomic_write_json(out_dir / "results.json", public)
    atomic_write_text(out_dir / "results.csv", _csv_text(public))
    report = out_dir / "report.md"
    atomic_write_text(report, _markdown(public, figures))
    return report
