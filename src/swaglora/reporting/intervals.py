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
        order = _order(p.rows, ids)
        if order is None or any(answers.get(row["id"]) != row["answer"] for row in p.rows):
            return None
        probs = np.zeros((len(ids), max(width, p.probs.shape[1])))
        probs[:, : p.probs.shape[1]] = p.probs[order]
        out.append(probs)
    return out


def _order(rows: list[dict[str, Any]], ids: list[str]) -> list[int] | None:
    """The positions of ``ids`` among the prediction ``rows`` (question ids), or None if the rows are other questions."""
    where = {row["id"]: i for i, row in enumerate(rows)}
    if len(where) != len(ids) or any(i not in where for i in ids):
        return None
    return [where[i] for i in ids]


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
        name = reference_name(reference)
        ref = name if name in predictives else None
        result = M.paired_bootstrap(predictives, labels, reference=ref, n_boot=N_BOOT, level=INTERVAL_LEVEL, seed=0)
        out.append({"eval_set": s, "n": len(answers), "n_boot": N_BOOT, "level": INTERVAL_LEVEL, "reference": ref,
                    "methods": [{"method": m, **result[m]} for m in have]})
    return out


def _ood_intervals(runs: list[_Run], methods: list[str], ref_set: str | None, shifts: list[str],
                   fields: dict[str, str], notes: list[str], reference: str | None = None) -> list[dict[str, Any]]:
    """Per shift set: :func:`metrics.paired_ood_bootstrap` of every method's OOD scores against the
    in-distribution test set ``ref_set`` (``fields``: score name -> predictions field; the total entropy always,
    the others for methods with several posterior samples), with both sets' questions aligned by id across
    runs; differences are to the total entropy of :func:`reference_name` (MAP's) where it is present."""
    out: list[dict[str, Any]] = []
    if ref_set is None:
        return out
    name = reference_name(reference)
    for s in shifts:
        have = [m for m in methods if all(r.entries.get((x, m)) is not None and r.entries[(x, m)].preds is not None
                                          for r in runs for x in (ref_set, s))]
        if not have:
            continue
        ids = {x: [row["id"] for row in runs[0].entries[(x, have[0])].preds.rows] for x in (ref_set, s)}
        orders = {(k, x, m): _order(r.entries[(x, m)].preds.rows, ids[x]) for k, r in enumerate(runs) for x in ids for m in have}
        if any(o is None for o in orders.values()):
            notes.append(f"{s}: methods or seeds were scored on different questions; no OOD intervals for {s}.")
            continue
        scores: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
        for m in have:
            multi = any(_n_samples(r.entries[(x, m)]) > 1 for r in runs for x in ids)
            for score, fld in fields.items():
                if score == "entropy" or multi:
                    scores[(m, score)] = [tuple(getattr(r.entries[(x, m)].preds, fld)[orders[(k, x, m)]]
                                                for x in (ref_set, s)) for k, r in enumerate(runs)]
        ref = (name, "entropy") if (name, "entropy") in scores else None
        result = M.paired_ood_bootstrap(scores, reference=ref, n_boot=N_BOOT, level=INTERVAL_LEVEL, seed=0)
        out.append({"eval_set": s, "reference_set": ref_set, "n_in": len(ids[ref_set]), "n_out": len(ids[s]),
                    "n_boot": N_BOOT, "level": INTERVAL_LEVEL, "reference": ref and name,
                    "rows": [{"method": m, "score": score, **v} for (m, score), v in result.items()]})
    return out
