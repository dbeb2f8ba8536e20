"""Rendering collected results: report.md, results.csv and the terminal table (number format in :mod:`swaglora.report`)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .. import metrics as M
from ..posterior import reference_row
from .collect import DECIMALS, BASE_METRICS, COVERAGES, OOD_SCORES, OOD_STATS, SELECTIVE_METRICS




METRIC_LABELS = {
    "accuracy": "ACC", "ece": "ECE", "nll": "NLL", "brier": "Brier", "n": "N", "seconds": "Seconds",
    "aurc": "AURC", **{f"acc@{round(c * 100)}": f"Acc@{round(c * 100)}%" for c in COVERAGES},
    "abstain_threshold": "Threshold", "abstain_risk": "Risk", "abstain_coverage": "Coverage",
}
QUESTION_CHARS = 120


def format_number(x: float | None) -> str:
    """The report's number rule: ``f"{x:.4f}"``; ``None`` / non-finite -> ``"n/a"``."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{DECIMALS}f}"


def format_cell(stat: dict[str, Any] | None) -> str:
    """``mean`` (one seed) or ``mean ± std`` (several seeds); ``"—"`` for a missing entry."""
    if not stat:
        return "—"
    if stat["mean"] is None:
        return "n/a"
    if stat["n_seeds"] > 1:
        return f"{format_number(stat['mean'])} ± {format_number(stat['std'])}"
    return format_number(stat["mean"])


def _interval_cell(d: dict[str, Any], signed: bool = False) -> str:
    value = f"{d['value']:+.{DECIMALS}f}" if signed else format_number(d["value"])
    star = " *" if d.get("significant") else ""
    return f"{value} [{d['lo']:.{DECIMALS}f}, {d['hi']:.{DECIMALS}f}]{star}"


def _reference_label(name: str | None) -> str:
    """How the text names the row differences are taken to: MAP for the default (the registry's reference row)."""
    default = reference_row()
    return "MAP" if name is None or (default is not None and name == default.name) else f"`{name}`"


def interval_tables(results: dict[str, Any]) -> list[str]:
    """The markdown section "Intervals and differences to MAP" (or to ``--reference``): per evaluation set, every
    method's 95% bootstrap intervals and its paired difference to the reference (empty when ``results`` has no
    intervals)."""
    intervals = results.get("intervals") or []
    if not intervals:
        return []
    first = intervals[0]
    ref = _reference_label(next((b["reference"] for b in intervals if b["reference"]), None))
    L = [f"## Intervals and differences to {ref}", "",
         f"{round(first['level'] * 100)}% percentile intervals from {first['n_boot']} bootstrap resamples of the "
         "questions of each set; the same resamples for every method (paired) and every seed (a resample's "
         f"value is the mean over seeds). `Δ` = method − {ref} on the same resamples; `*` marks a difference "
         "whose interval excludes 0. The interval covers the choice of questions, not the training seed "
         "(see the ± std of the main table for that).", ""]
    for block in intervals:
        L += [f"### `{block['eval_set']}` ({block['n']} questions)", ""]
        header = ["Method"] + [METRIC_LABELS[k] for k in M.BOOTSTRAP_METRICS]
        if block["reference"]:
            header += [f"Δ {METRIC_LABELS[k]}" for k in M.BOOTSTRAP_METRICS]
        rows = []
        for d in block["methods"]:
            row = [_md_escape(d["method"])] + [_interval_cell(d[k]) for k in M.BOOTSTRAP_METRICS]
            if block["reference"]:
                row += [_interval_cell(d[f"{k}_diff"], signed=True) if f"{k}_diff" in d else "—"
                        for k in M.BOOTSTRAP_METRICS]
            rows.append(row)
        L += _md_table(header, rows)
    return L


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, dict[str, Any]]]:
    out = []
    for m in results["methods"]:
        for s in results["eval_sets"]:
            for k, st in results["metrics"].get(m, {}).get(s, {}).items():
                out.append((m, s, results["sets"][s]["role"], k, st))
    return out


def _csv_text(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "eval_set", "role", "metric", "mean", "std", "n_seeds"])
    for m, s, role, k, st in _rows(results):
        w.writerow([m, s, role, k, "" if st["mean"] is None else repr(st["mean"]),
                    "" if st["std"] is None else repr(st["std"]), st["n_seeds"]])
    return buf.getvalue()


def _md_escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> list[str]:
    """Markdown table; the first ``left`` columns are left-aligned text, the rest right-aligned."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(rows_i) + " |" for rows_i in rows]
    return lines + [""]


def _metric_table(results: dict[str, Any], sets: Sequence[str], keys: Sequence[str],
                  methods: Sequence[str] | None = None) -> list[str]:
    methods = results["methods"] if methods is None else methods
    header = ["Method"] + [f"{s} {METRIC_LABELS[k]}" for s in sets for k in keys]
    rows = []
    for m in methods:
        d = results["metrics"].get(m, {})
        rows.append([_md_escape(m)] + [format_cell(d.get(s, {}).get(k)) for s in sets for k in keys])
    return _md_table(header, rows)


def _ood_table(results: dict[str, Any], shifts: Sequence[str]) -> list[str]:
    header = ["Method", "Score"] + [f"{s} {lab}" for s in shifts for lab in OOD_STATS.values()]
    rows = []
    for m in results["methods"]:
        d = results["metrics"].get(m, {})
        for score, (_, label) in OOD_SCORES.items():
            if not any(f"ood_auroc_{score}" in d.get(s, {}) for s in shifts):
                continue
            rows.append([_md_escape(m), label] + [format_cell(d.get(s, {}).get(f"ood_{st}_{score}"))
                                                  for s in shifts for st in OOD_STATS])
    return _md_table(header, rows, left=2)


def _ood_interval_table(results: dict[str, Any]) -> list[str]:
    """AUROC with its bootstrap interval per shift set, and its paired difference to the reference's (MAP's) total
    entropy AUROC."""
    blocks = results.get("ood_intervals") or []
    if not blocks:
        return []
    first, labels = blocks[0], {k: lab for k, (_, lab) in OOD_SCORES.items()}
    ref = f"the AUROC of {_reference_label(first['reference'])}'s total entropy" if first["reference"] else None
    L = [f"AUROC with {round(first['level'] * 100)}% intervals from {first['n_boot']} bootstrap resamples of the "
         "questions of both sets (the in-distribution and the shift set resampled independently; the same resamples "
         "for every method, score and seed)" + (f"; `Δ` = AUROC − {ref} on the same resamples, `*` where its "
                                                "interval excludes 0." if ref else "."), ""]
    header = ["Method", "Score"]
    for b in blocks:
        header += [f"{b['eval_set']} AUROC"] + ([f"{b['eval_set']} Δ AUROC"] if b["reference"] else [])
    by_key = [{(d["method"], d["score"]): d for d in b["rows"]} for b in blocks]
    rows = []
    for m, score in dict.fromkeys(k for keyed in by_key for k in keyed):
        row = [_md_escape(m), labels.get(score, score)]
        for b, keyed in zip(blocks, by_key):
            d = keyed.get((m, score))
            row.append(_interval_cell(d["auroc"]) if d else "—")
            if b["reference"]:
                row.append(_interval_cell(d["auroc_diff"], signed=True) if d and "auroc_diff" in d else "—")
        rows.append(row)
    return L + _md_table(header, rows, left=2)


def _distribution(row: dict[str, Any]) -> str:
    labels = row.get("labels") or [chr(ord("A") + i) for i in range(len(row["probs"]))]
    return " · ".join(f"{_md_escape(lab)} {p:.2f}" for lab, p in zip(labels, row["probs"]))


def _truncate(text: Any, n: int = QUESTION_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _environment(results: dict[str, Any]) -> list[str]:
    """The "Run environment" section: what each run computed in, besides its config (swaglora_run.json)."""
    rows = []
    for path, seed, rt in zip(results["runs"], results["seeds"], results["runtime"]):
        if not rt:
            rows.append([f"`{_md_escape(path)}`", str(seed)] + ["not recorded"] + [""] * 4)
            continue
        rows.append([f"`{_md_escape(path)}`", str(seed), _md_escape(rt.get("dtype")), _md_escape(rt.get("device")),
                     _md_escape(rt.get("torch")), _md_escape(" ".join(rt.get("cpu_flags") or []) or "—"),
                     _md_escape(_auto_dtype_why(rt))])
    return ["## Run environment", ""] + _md_table(
        ["Run", "Seed", "dtype", "Device", "torch", "CPU SIMD flags", "why this dtype"], rows, left=7)


def _auto_dtype_why(rt: dict) -> str:
    """Why ``--dtype auto`` took the recorded dtype ("" when --dtype named it); runs from before the CPU-flag
    decision recorded only the measured bf16 / fp32 speed."""
    if rt.get("dtype_setting") not in (None, "auto"):
        return "--dtype"
    if rt.get("auto_dtype_env"):
        return "pinned by SWAGLORA_AUTO_DTYPE"
    if rt.get("auto_dtype_reason"):
        return rt["auto_dtype_reason"]
    speed = rt.get("bf16_speedup")
    return "" if speed is None else f"measured: bf16 matmul {speed:.2f}x fp32's speed"


def _markdown(results: dict[str, Any], figures: dict[str, Any]) -> str:
    L = (_md_head(results) + _md_results(results) + _md_ood_and_selective(results) + _md_abstention(results)
         + _md_figures(results, figures) + _md_uncertain(results))
    return "\n".join(L).rstrip() + "\n"


def _md_head(results: dict[str, Any]) -> list[str]:
    """Title, runs, the number rule, the run environment and the notes."""
    seeds = results["seeds"]
    L = ["# swaglora evaluation report", ""]
    L.append(f"Runs ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: "
             f"{', '.join(str(s) for s in seeds)}):")
    L += [f"- `{p}`" for p in results["runs"]] + [""]
    L.append(f"Numbers: every metric is printed as `f\"{{x:.{DECIMALS}f}}\"` of the value in "
             "`results.json`; cells read `mean ± std` (sample std over seeds) when an entry has "
             "several seeds, `n/a` for a missing/undefined value, `—` when the method has no "
             "result on that set. Full-precision values are in `results.csv` / `results.json`.")
    L.append("")
    L += _environment(results)
    if results["notes"]:
        L += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in results["notes"]] + [""]
    return L


def _md_results(results: dict[str, Any]) -> list[str]:
    """Evaluation sets, main results, validation split, samples per method and intervals."""
    sets, roles = results["eval_sets"], {s: results["sets"][s]["role"] for s in results["eval_sets"]}
    main_sets = [s for s in sets if roles[s] in ("test", "shift")]
    val_sets = [s for s in sets if roles[s] == "validation"]
    L: list[str] = []
    L += ["## Evaluation sets", ""]
    L += _md_table(["Set", "Role", "Examples", "Methods"],
                   [[_md_escape(s), roles[s], "" if results["sets"][s]["n"] is None else str(results["sets"][s]["n"]),
                     str(sum(1 for m in results["methods"] if s in results["metrics"].get(m, {})))]
                    for s in sets], left=2)

    L += ["## Main results", "",
          "Accuracy (ACC, higher is better), expected calibration error (ECE, 15 bins), negative "
          "log-likelihood (NLL) and Brier score (lower is better) on the in-distribution test set "
          "and the shifted sets.", ""]
    L += _metric_table(results, main_sets, BASE_METRICS)
    if val_sets:
        L += ["### Validation split", ""] + _metric_table(results, val_sets, BASE_METRICS)
    L += ["### Posterior samples per method", ""]
    L += _md_table(["Method", "Samples"], [[_md_escape(m), str(results["n_samples"][m])] for m in results["methods"]])
    L += interval_tables(results)
    L += _md_costs(results)
    return L


def _md_costs(results: dict[str, Any]) -> list[str]:
    """Training time, evaluation time and posterior size per row (mean ± std over seeds)."""
    costs = results.get("costs") or {}
    if not costs:
        return []
    L = ["## Cost", "",
         "Training: seconds of the training runs of the members a row's posterior comes from (rows of one member "
         "share its run, MAP and SWAG phases together; a method that trains its own member has its own; the "
         "first training of a process also fills the lower-layer cache). Evaluation: seconds of the row on every "
         "set, post-hoc fitting included (predictions shared with an earlier row are not counted again). "
         "Posterior: the saved files the row loads, MB.", ""]
    rows = [[_md_escape(m), format_cell(c["train_seconds"]), format_cell(c["eval_seconds"]), format_cell(c["posterior_mb"])]
            for m, c in costs.items()]
    return L + _md_table(["Method", "Training s", "Evaluation s", "Posterior MB"], rows)


def _md_ood_and_selective(results: dict[str, Any]) -> list[str]:
    sets, roles = results["eval_sets"], {s: results["sets"][s]["role"] for s in results["eval_sets"]}
    shifts = [s for s in sets if roles[s] == "shift"]
    ref = results["reference_test_set"]
    L: list[str] = []
    L += ["## OOD detection", ""]
    if ref is not None and shifts:
        L += [f"Each shift set (positive) against the in-distribution test set `{ref}`; higher "
              "score = more OOD. AUROC and AUPR: higher is better; FPR@95TPR: lower is better. "
              "MI (epistemic) and expected-entropy (aleatoric) rows exist only for methods with "
              "several posterior samples.", ""]
        L += _ood_table(results, shifts)
        L += _ood_interval_table(results)
    else:
        L += ["No OOD evaluation (needs a test set and at least one shift set).", ""]

    L += ["## Selective prediction", "",
          "AURC (area under the risk-coverage curve, lower is better) and accuracy on the most "
          "confident 50/80/90% of each set (confidence = max predictive probability).", ""]
    L += _metric_table(results, sets, SELECTIVE_METRICS)
    return L


def _md_abstention(results: dict[str, Any]) -> list[str]:
    sets, val = results["eval_sets"], results["validation_set"]
    L: list[str] = []
    risk = results.get("abstain_risk")
    if risk is not None:
        L += ["## Abstention", ""]
        if val is None:
            L += ["No validation set: abstention thresholds cannot be chosen, so no rows.", ""]
        else:
            L += [f"Target risk {format_number(risk)}: per method and seed the lowest confidence "
                  f"threshold whose selective risk on `{val}` is at most the target; its risk and "
                  "coverage on each set.", ""]
            header = ["Method", f"{val} Threshold"] + [f"{s} {METRIC_LABELS[k]}" for s in sets
                                                       for k in ("abstain_risk", "abstain_coverage")]
            rows = []
            for m in results["methods"]:
                d = results["metrics"].get(m, {})
                if "abstain_threshold" not in d.get(val, {}):
                    continue
                rows.append([_md_escape(m), format_cell(d[val]["abstain_threshold"])]
                            + [format_cell(d.get(s, {}).get(k)) for s in sets
                               for k in ("abstain_risk", "abstain_coverage")])
            L += _md_table(header, rows)
    return L


def _md_figures(results: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    ref = results["reference_test_set"]
    L: list[str] = []
    L += ["## Figures", ""]
    if not (figures.get("reliability") or figures.get("risk_coverage") or figures.get("entropy")):
        L += ["No figures: they need predictions on an in-distribution test set.", ""]
    if figures.get("reliability"):
        L += [f"### Reliability diagrams (`{ref}`, pooled over seeds)", ""]
        L += [f"![reliability {m}]({p})" for m, p in figures["reliability"].items()] + [""]
    if figures.get("risk_coverage"):
        L += [f"### Risk-coverage curves (`{ref}`, pooled over seeds)", "",
              f"![risk-coverage]({figures['risk_coverage']})", ""]
    if figures.get("entropy"):
        L += [f"### Predictive entropy: `{ref}` vs shift sets (pooled over seeds)", ""]
        L += [f"![entropy {m}]({p})" for m, p in figures["entropy"].items()] + [""]
    return L


def _md_uncertain(results: dict[str, Any]) -> list[str]:
    L: list[str] = []
    uq = results.get("uncertain_questions")
    if uq:
        L += ["## The ten most uncertain test questions", "",
              f"Highest predictive entropy on `{uq['eval_set']}` for `{uq['method']}` "
              f"({results['n_samples'][uq['method']]} samples), seed {uq['seed']}.", ""]
        L += _md_table(["#", "Question", "Predicted distribution", "Prediction", "Answer", "Entropy"],
                       [[str(i + 1), _md_escape(_truncate(q.get("question"))), _distribution(q),
                         _md_escape(q.get("prediction")), _md_escape(q.get("answer")),
                         format_number(q["total_entropy"])] for i, q in enumerate(uq["questions"])], left=5)
    return L


def print_table(results: dict[str, Any]) -> str:
    """Compact plain-text table: one line per (eval set, method) with ACC / ECE / NLL / Brier."""
    sets, methods = results["eval_sets"], results["methods"]
    header = ["set", "role", "method"] + [METRIC_LABELS[k] for k in BASE_METRICS]
    rows = []
    for s in sets:
        for m in methods:
            d = results["metrics"].get(m, {}).get(s)
            if d is None:
                continue
            rows.append([s, results["sets"][s]["role"], m] + [format_cell(d.get(k)) for k in BASE_METRICS])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    n = len(results["seeds"])

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        out.append(line(r))
        prev = r[0]
    out.append(f"({n} seed{'s' if n != 1 else ''}; mean ± sample std when several)")
    for block in results.get("intervals") or []:
        out += ["", f"{block['eval_set']}: {block['n']} questions; {round(block['level'] * 100)}% intervals over "
                    f"the questions (bootstrap, paired" + (f", Δ = method − {_reference_label(block['reference'])}"
                                                           if block["reference"] else "") + ")"]
        for d in block["methods"]:
            cells = [f"{METRIC_LABELS[k]} {_interval_cell(d[k])}" for k in ("accuracy", "nll")]
            cells += [f"Δ{METRIC_LABELS[k]} {_interval_cell(d[f'{k}_diff'], signed=True)}"
                      for k in ("accuracy", "nll") if f"{k}_diff" in d]
            out.append(f"  {d['method']:<{max(len(m) for m in methods)}}  " + "  ".join(cells))
    return "\n".join(out)
