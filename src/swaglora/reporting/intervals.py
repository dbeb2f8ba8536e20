"""Bootstrap intervals of every method's metrics and of its differences to the reference row, per set."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import metrics as M
from ..posterior import reference_row
from .load import _n_samples, _Run


#: Bootstrap resamples of the questions behind every interval (paired across methods, pooled over seeds).
N_BOOT, INTERVAL_LEVEL = 1000, 0.95


def _aligned(runs: list[_Run], s: str, m: str, answers: dict[str, str], width: int) -> list[np.ndarray] | None:
    """The predictive of ``m`` on ``s`` in every run, rows in the order of ``answers`` (question id -> answer);
    None if a run scored other questions or other answers."""
    ids, out = list(answers), []
    for r in runs:
        p = r.entries[(s, m)].preds
        order = {row["id"]: i for i, row in enumerate(p.rows)}
        if len(order) != len(ids) or any(answers.get(row["id"]) != row["answer"] for row in p.rows):
            return None
        probs = np.zeros((len(ids), max(width, p.probs.shape[1])))
        probs[:, : p.probs.shape[1]] = p.probs[[order[i] for i in ids]]
        out.append(probs)
    return out


def reference_name(reference: str | None = None) -> str | None:
    """The row differences are taken to: ``reference``, else the registry's reference row (the fine-tuned point
    estimate, ``map``)."""
    if reference is not None:
        return reference
    row = reference_row()
    return row.name if row is not None else None


def _intervals(runs: list[_Run], methods: list[str], sets: list[str], notes: list[str],
               reference: str | None = None) -> list[dict[str, Any]]:
    """Per set: :func:`metrics.paired_bootstrap` of every method that has predictions on it in every run,
    with the questions aligned by id; differences are to :func:`reference_name` where it is present."""
    out: list[dict[str, Any]] = []
    for s in sets:
        have = [m for m in methods if all((s, m) in r.entries and r.entries[(s, m)].preds for r in runs)]
        if not have:
            continue
        first = runs[0].entries[(s, have[0])].preds
        answers = {row["id"]: row["answer"] for row in first.rows}
        labels = np.asarray([row["labels"].index(row["answer"]) for row in first.rows])
        predictives = {m: _aligned(runs, s, m, answers, first.probs.shape[1]) for m in have}
        if any(v is None for v in predictives.values()):
            notes.append(f"{s}: methods or seeds were scored on different questions or answers; no intervals for {s}.")
            continue
        width = max(p.shape[1] for v in predictives.values() for p in v)
        predictives = {m: [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in v] for m, v in predictives.items()}
        ref = reference_name(reference) if reference_name(reference) in predictives else None
        result = M.paired_bootstrap(predictives, labels, reference=ref, n_boot=N_BOOT, level=INTERVAL_LEVEL, seed=0)
        out.append({"eval_set": s, "n": len(answers), "n_boot": N_BOOT, "level": INTERVAL_LEVEL, "reference": ref,
                    "methods": [{"method": m, **result[m]} for m in have]})
    return out


def _ids(runs: list[_Run], s: str, m: str) -> list[list[str]]:
    return [[row["id"] for row in r.entries[(s, m)].preds.rows] for r in runs]


def _ood_intervals(runs: list[_Run], methods: list[str], ref_set: str | None, shifts: list[str],
                   fields: dict[str, str], notes: list[str], reference: str | None = None) -> list[dict[str, Any]]:
    """Per shift set: :func:`metrics.paired_ood_bootstrap` of every method's OOD scores against the
    in-distribution test set ``ref_set`` (``fields``: score name -> predictions field; the total entropy always,
    the others for methods with several posterior samples), with both sets' questions aligned by id across
    runs; differences are to the total entropy of :func:`reference_name` (MAP's) where it is present."""
    out: list[dict[str, Any]] = []
    if ref_set is None:
        return out
    for s in shifts:
        have = [m for m in methods if all(r.entries.get((x, m)) is not None and r.entries[(x, m)].preds is not None
                                          for r in runs for x in (ref_set, s))]
        if not have:
            continue
        order_in, order_out = _ids(runs[:1], ref_set, have[0])[0], _ids(runs[:1], s, have[0])[0]
        if any(sorted(ids) != sorted(order) for m in have for x, order in ((ref_set, order_in), (s, order_out))
               for ids in _ids(runs, x, m)):
            notes.append(f"{s}: methods or seeds were scored on different questions; no OOD intervals for {s}.")
            continue
        scores: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for m in have:
            multi = any(_n_samples(r.entries[(x, m)]) > 1 for r in runs for x in (ref_set, s))
            for name, fld in fields.items():
                if name != "entropy" and not multi:
                    continue
                pairs = []
                for r in runs:
                    pair = []
                    for x, order in ((ref_set, order_in), (s, order_out)):
                        p = r.entries[(x, m)].preds
                        where = {row["id"]: i for i, row in enumerate(p.rows)}
                        pair.append(getattr(p, fld)[[where[i] for i in order]])
                    pairs.append((pair[0], pair[1]))
                scores[f"{m}\t{name}"] = pairs
        name = reference_name(reference)
        ref = f"{name}\tentropy" if f"{name}\tentropy" in scores else None
        result = M.paired_ood_bootstrap(scores, reference=ref, n_boot=N_BOOT, level=INTERVAL_LEVEL, seed=0)
        out.append({"eval_set": s, "reference_set": ref_set, "n_in": len(order_in), "n_out": len(order_out),
                    "n_boot": N_BOOT, "level": INTERVAL_LEVEL, "reference": ref and name,
                    "rows": [{"method": k.split("\t")[0], "score": k.split("\t")[1], **v} for k, v in result.items()]})
    return out
