"""How close swaglora's training and evaluation come to this machine's matmul peak.

Peak: measured fp32 (and bf16) GEMM GFLOP/s of a large square matmul and of a 4096x576x1536 one (the
shape of SmolLM2's MLP projections on a 4096-token batch). bf16 is reported for information only: on an
AVX2-only CPU it has no native kernels and is far slower than fp32 (so it is never used by default).

Achieved: USEFUL model FLOPs (real tokens only; padding is counted as waste) per second of wall time, for
the default protocol (cloze, LoRA all-linear on the top K=2 layers). Per real token and layer, with P the
layer's base linear weights and R its LoRA weights (see ``common.layer_weights``):
  * forward: 2P + 2R;
  * training backward: 2P (input gradients through the frozen weights; frozen weights get no weight
    gradient) + 4R (input and weight gradients of the LoRA matrices); minus 2·P_qkv in the lowest trainable
    layer, whose q/k/v inputs are the cached hidden states and need no gradient;
  * output head at each scored position (cloze: one per choice token): 2·H·V forward, +2·H·V backward.
So training counts ~2x the forward FLOPs, not the usual 6N of full fine-tuning (which would inflate the
rate by ~1.5x). Attention scores (~4·T·H per token per layer, <3% here) are not counted.
Phases: training steps (epochs after the first: top K layers from the cache), evaluation of a new set
(all layers, no cache) and evaluation with a warm cache (top K layers + head only, as for every posterior sample).
"""

from __future__ import annotations

import torch

from . import common
from swaglora.predict import predict_logits


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    return 2 * m * k * n / common.median([common.timed(lambda: a @ b) for _ in range(reps)]) / 1e9


def model_flops(s, exs, train: bool, layers: str) -> float:
    """Useful FLOPs of one pass over ``exs`` (see module docstring); layers: 'all' or 'top'."""
    parts = s.scorer.parts
    enc = s.scorer.encode(exs)
    tokens = sum(len(e.input_ids) for e in enc)
    scored = sum(len(e.pred_pos) for e in enc)
    hidden, vocab = parts.lm_head.weight.shape[1], parts.lm_head.weight.shape[0]
    per_token = 0
    run = range(s.scorer.split, len(parts.layers)) if layers == "top" else range(len(parts.layers))
    for i in run:
        base, lora, qkv = common.layer_weights(parts.layers[i])
        per_token += 2 * base + 2 * lora
        if train:
            per_token += 2 * base + 4 * lora - (2 * qkv if i == s.scorer.split else 0)
    return tokens * per_token + scored * 2 * hidden * vocab * (2 if train else 1)


def main(quick: bool = False) -> dict:
    n_threads = common.threads()
    rounds = 2 if quick else 3
    big, rows, small, reps = (256, 512, 128, 2) if quick else (2048, 4096, 1024, 5)
    peaks = {
        f"gemm_fp32_{big}^3_gflops": gemm_gflops(big, big, big, torch.float32, reps),
        f"gemm_fp32_{rows}x576x1536_gflops": gemm_gflops(rows, 576, 1536, torch.float32, reps),
        # bf16 is 8-30x slower on AVX2-only CPUs: a smaller size keeps this to a few seconds
        f"gemm_bf16_{small}^3_gflops": gemm_gflops(small, small, small, torch.bfloat16, 3),
    }
    peak = max(peaks[f"gemm_fp32_{big}^3_gflops"], peaks[f"gemm_fp32_{rows}x576x1536_gflops"])

    s = common.session(quick, **common.DEFAULT_PROTOCOL)
    n = 16 if quick else 48
    train, test = common.examples(n, "train"), common.examples(n, "test")
    s.cache.fill(train + test)
    opt = common.optimizer(s.model)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    batches = [[train[i] for i in order[j : j + 8]] for j in range(0, n, 8)]
    theta = [{k: v.detach().clone() for k, v in s.model.named_parameters() if v.requires_grad}]

    def train_epoch(_):
        s.model.train()
        for b in batches:
            common.train_step(s, b, opt)

    fns = {
        "train_epoch": train_epoch,  # one epoch after the first: top layers, cached lower layers
        "eval_new_set": lambda _: predict_logits(s.scorer, test, theta, cache=None),  # all layers
        "eval_cached": lambda _: predict_logits(s.scorer, test, theta, cache=s.cache),  # top layers + head
    }
    fns["train_epoch"](0)  # warm-up
    times = {k: common.median(v) for k, v in common.interleave(fns, rounds).items()}
    flops = {
        "train_epoch": model_flops(s, train, train=True, layers="top"),
        "eval_new_set": model_flops(s, test, train=False, layers="all"),
        "eval_cached": model_flops(s, test, train=False, layers="top"),
    }
    rate = {k: flops[k] / times[k] / 1e9 for k in fns}
    padded = sum(max(len(e.input_ids) for e in s.scorer.encode(b)) * len(b) for b in batches)
    real = sum(len(e.input_ids) for e in s.scorer.encode(train))
    metrics = {
        "threads": n_threads,
        **peaks,
        "peak_fp32_gflops": peak,
        **{f"{k}_gflop": flops[k] / 1e9 for k in fns},
        **{f"{k}_s": times[k] for k in fns},
        **{f"{k}_gflops": rate[k] for k in fns},
        "train_padding_fraction": 1 - real / padded,
    }
    ratios = [common.ratio(f"achieved/peak {k}", rate[k] / peak, ">= 0.6") for k in fns]
    return common.finish("roofline", quick, metrics, ratios,
                         ["useful FLOPs only (padding, attention scores, norms and softmax are not counted)"])


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
