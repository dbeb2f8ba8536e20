"""The cost of evaluating every table row against issue 13's goal: the evaluation of a run with all methods should
take no more than 2x the MAP row's evaluation plus the cache fill.

Default protocol (cloze, LoRA all-linear on the top 2 layers), N ARC-Easy test questions, one member's posteriors
built without training (SWAG from perturbed snapshots, Laplace's KFAC fitted on 32 training questions at the
initial weights), S=4 samples, 2 members for the mixture rows:
  * fill: the lower-layer cache for the N questions (every row reads it);
  * each row's predict_probs with a warm cache, as evaluate.py runs it: ``multiswag`` and ``ensemble`` only pay
    for their second member (member 0's predictions are the ``swag`` and ``map`` rows', computed once);
  * the ratio (fill + all rows) / (fill + 2 x map) against the goal (<= 1), and the number of top-layer passes
    the rows need (a sampled row costs S passes: the work is compute-bound, see bench_roofline/bench_bma), which
    bounds what any implementation can reach without fewer samples.
"""

from __future__ import annotations

import torch

from . import common
from swaglora.posterior import MAP, SWAG, Laplace, MCDropout, SWAGDiag
from swaglora.predict import predict_probs
from swaglora.scoring import HiddenCache

S = 4


def _swag(cls, model, seed: int):
    post = cls(model, max_rank=5) if cls is SWAG else cls(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(6):
            for p, p0 in zip(params, start):
                p.copy_(p0 + 0.01 * torch.randn(p.shape, generator=g))
            post.collect(model)
        for p, p0 in zip(params, start):
            p.copy_(p0)
    return post


def main(quick: bool = False) -> dict:
    n = 24 if quick else 400
    s = common.session(quick, **common.DEFAULT_PROTOCOL)
    exs = common.examples(n, split="test")
    model = s.model
    laplace = Laplace(model)
    train = common.examples(32, split="train")
    laplace.collect(model)

    def loss_fn(m, examples):
        batch = s.scorer.batch(examples)
        return s.scorer.top(s.cache.hidden(batch), batch), batch.labels

    laplace.fit(model, [train[i : i + 8] for i in range(0, len(train), 8)], loss_fn)
    rows = {  # row -> (posterior, samples, scale, linearized); the second member of the mixture rows only
        "map": (MAP(model), 1, None, False),
        "swa": (_swag(SWAG, model, 0), 1, 0.0, False),
        "swag-diag": (_swag(SWAGDiag, model, 0), S, None, False),
        "swag": (_swag(SWAG, model, 0), S, None, False),
        "multiswag (member 1)": (_swag(SWAG, model, 1), S, None, False),
        "ensemble (member 1)": (MAP(model), 1, None, False),
        "dropout": (MCDropout(model), S, None, False),
        "laplace": (laplace, 100, None, True),
        "laplace-sample": (laplace, S, None, False),
    }
    for post in rows.values():
        if isinstance(post[0], (MAP, MCDropout)):
            post[0].collect(model)
    fill_times, row_times = [], {k: [] for k in rows}
    for r in range(1 if quick else 2):
        cache = HiddenCache(s.scorer)
        fill_times.append(common.timed(lambda: cache.fill(exs, 16)))  # noqa: B023
        for name, (post, samples, scale, linearized) in rows.items():
            g = torch.Generator().manual_seed(r)
            row_times[name].append(common.timed(lambda: predict_probs(  # noqa: B023
                s.scorer, exs, post, samples, g, cache=cache, batch_size=16, scale=scale, linearized=linearized)))  # noqa: B023
    fill = common.median(fill_times)
    secs = {k: common.median(v) for k, v in row_times.items()}
    total = fill + sum(secs.values())
    goal = fill + 2 * secs["map"]
    passes = {"map": 1, "swa": 1, "swag-diag": S, "swag": S, "multiswag (member 1)": S, "ensemble (member 1)": 1,
              "dropout": S, "laplace-sample": S}
    metrics = {"questions": n, "fill seconds": fill, **{f"{k} seconds": v for k, v in secs.items()},
               "all rows + fill seconds": total, "goal seconds (fill + 2 x map)": goal,
               "top-layer passes of the sampled rows": sum(passes.values()),
               "laplace (linearised) / map": secs["laplace"] / secs["map"]}
    notes = ["the goal counts two top-layer passes; the rows need about "
             f"{sum(passes.values())} passes plus the linearised predictive's C backward passes, so at the "
             "roofline's efficiency the goal is out of reach without fewer samples or fewer sampled rows"]
    return common.finish("eval_rows", quick, metrics, [common.ratio("(fill + all rows) / (fill + 2 x map)", total / goal, "<= 1")], notes)
