"""Bayesian model averaging with S=8 samples, and what the lower-layer cache buys.

Default protocol (cloze, LoRA all-linear on the top K=2 of L=30 layers), S=8 draws from a SWAG posterior:
  * bma_warm:   ``predict_logits`` with the 8 draws and a warm ``HiddenCache``;
  * singles:    8 separate ``predict_logits`` calls with one draw each, same warm cache.
    Ratio (i) bma_warm / singles: the S-sample loop costs no more than S single evaluations (goal <= 1.05).
  * bma_cold:   the real cost on a NEW evaluation set: fill the cache (lower layers once), then the 8 draws;
  * no_cache:   one evaluation with the cache off (all L layers); S of them = S x this (they cost the same,
    so one is timed per round and multiplied by S). Ratio (ii) S x no_cache / bma_cold is the prefix-sharing
    speed-up; its FLOP prediction is S(L + h) / ((L - K) + S(K + h)) with h the output head's cost in
    layer-equivalents (the head is applied at every scored position per sample, cached or not).
Training: epoch 1 fills the cache (lower layers) and trains the top; later epochs train the top only.
    Ratio (iii) (fill + top epoch) / top epoch is the per-epoch speed-up of epochs 2+.
Multi-sample batching, without src changes: ``torch.func.vmap`` over ``functional_call`` runs the S draws
of a batch in one pass (base-weight GEMMs S times taller, LoRA as batched matmuls; attention falls back to
a per-sample loop inside vmap). Ratio (iv) bma_warm / bma_vmap; the outputs are checked against the
sequential ones.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap

from . import common
from .bench_roofline import model_flops
from swaglora.posterior.swag import SWAG
from swaglora.predict import predict_logits
from swaglora.scoring import HiddenCache

S = 8


def draws(s, n: int) -> list[dict]:
    """S draws from a SWAG posterior fitted to a few perturbed copies of the LoRA weights (no training needed)."""
    swag = SWAG(s.model, max_rank=5)
    params = [p for p in s.model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for _ in range(6):
            for p, p0 in zip(params, start):
                p.copy_(p0 + 0.01 * torch.randn(p.shape, generator=g))
            swag.collect(s.model)
        for p, p0 in zip(params, start):
            p.copy_(p0)
    return swag.draws(n, generator=g)


class _Top(nn.Module):
    """``scorer.top`` as a module whose parameters are the model's, so ``functional_call`` can swap them."""

    def __init__(self, scorer) -> None:
        super().__init__()
        self.scorer, self.model = scorer, scorer.model

    def forward(self, hidden, batch):
        return self.scorer.top(hidden, batch)


@torch.no_grad()
def bma_vmap(s, exs, thetas, cache, batch_size: int = 16) -> torch.Tensor:
    """Like ``predict_logits`` (same length-sorted batches), with all draws of a batch in one vmapped pass."""
    top = _Top(s.scorer)
    stacked = {f"model.{k}": torch.stack([t[k] for t in thetas]) for k in thetas[0]}
    order = sorted(range(len(exs)), key=lambda i: len(s.scorer.encode([exs[i]])[0].input_ids))
    out = torch.full((len(thetas), len(exs), max(e.n_choices for e in exs)), float("-inf"))
    s.model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # attention's per-sample fallback
        for i in range(0, len(exs), batch_size):
            rows = order[i : i + batch_size]
            batch = s.scorer.batch([exs[r] for r in rows])
            hidden = cache.hidden(batch)
            logits = vmap(lambda th: functional_call(top, th, (hidden, batch)))(stacked)
            out[:, torch.tensor(rows), : logits.shape[2]] = logits.float().cpu()
    return out


def main(quick: bool = False) -> dict:
    common.threads()
    rounds = 2
    s = common.session(quick, **common.DEFAULT_PROTOCOL)
    test = common.examples(16 if quick else 32, "test")
    train = common.examples(16 if quick else 48, "train")
    thetas = draws(s, S)
    warm = HiddenCache(s.scorer)
    warm.fill(test)
    opt = common.optimizer(s.model)
    batches = [train[i : i + 8] for i in range(0, len(train), 8)]

    def bma_cold(_):
        cache = HiddenCache(s.scorer)  # a new evaluation set: nothing cached yet
        cache.fill(test)
        predict_logits(s.scorer, test, thetas, cache=cache)

    def top_epoch(_, cache):
        s.model.train()
        for b in batches:
            common.train_step(s, b, opt, cache)

    train_cache = HiddenCache(s.scorer)
    train_cache.fill(train)
    fns = {
        "bma_warm": lambda _: predict_logits(s.scorer, test, thetas, cache=warm),
        "singles": lambda _: [predict_logits(s.scorer, test, [t], cache=warm) for t in thetas],
        "bma_vmap": lambda _: bma_vmap(s, test, thetas, warm),
        "bma_cold": bma_cold,
        "no_cache_single": lambda _: predict_logits(s.scorer, test, thetas[:1], cache=None),
        "train_fill": lambda _: HiddenCache(s.scorer).fill(train),  # epoch 1's extra work
        "train_top_epoch": lambda r: top_epoch(r, train_cache),  # every epoch's training work
    }
    # warm-up, and the check that the vmapped draws give the sequential logits
    same = torch.allclose(bma_vmap(s, test, thetas, warm), predict_logits(s.scorer, test, thetas, cache=warm), atol=1e-4)
    times = common.interleave(fns, rounds)
    med = {k: common.median(v) for k, v in times.items()}

    layers = len(s.scorer.parts.layers)
    k = layers - s.scorer.split
    unit = one_layer_flops(s, test)  # one decoder layer's forward over the test set
    head = (model_flops(s, test, train=False, layers="top") - k * unit) / unit  # the head, in layer-equivalents
    predicted = S * (layers + head) / ((layers - k) + S * (k + head))
    per_round = lambda a, b, f=1.0: common.median([f * x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    metrics = {
        "samples_S": S,
        "layers_L": layers,
        "trainable_top_K": k,
        "head_cost_in_layers_h": head,
        **{f"{name}_s": v for name, v in med.items()},
        "predicted_prefix_speedup": predicted,
        "vmap_matches_sequential": same,
        "eval_examples": len(test),
        "train_examples": len(train),
    }
    ratios = [
        common.ratio("(i) bma_warm / (S x single, cached)", per_round("bma_warm", "singles"), "<= 1.05"),
        common.ratio("(ii) S x no-cache / bma_cold (speed-up)", per_round("no_cache_single", "bma_cold", S)),
        common.ratio("(iii) train epoch 1 / epoch 2+ (speed-up)",
                     common.median([(f + t) / t for f, t in zip(times["train_fill"], times["train_top_epoch"])])),
        common.ratio("(iv) bma sequential / vmap-batched (speed-up)", per_round("bma_warm", "bma_vmap")),
    ]
    return common.finish("bma", quick, metrics, ratios)


def one_layer_flops(s, exs) -> float:
    """Forward FLOPs of ONE decoder layer (the top one) over ``exs``: the unit of the speed-up prediction."""
    base, lora, _ = common.layer_weights(s.scorer.parts.layers[-1])
    return sum(len(e.input_ids) for e in s.scorer.encode(exs)) * 2 * (base + lora)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
