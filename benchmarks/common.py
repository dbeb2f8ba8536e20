"""Shared helpers: the model (SmolLM2-135M, or a tiny random Llama for ``--quick``), data, timing, reporting.

Every benchmark measures its A and B in ONE process on the same machine, interleaved round by round
(the order rotates each round) and summarised by medians: the machine is shared and noisy, so two
numbers taken minutes apart, or always in the same order, are not comparable.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from swaglora.config import LoraSettings, ModelConfig, RunConfig, TrainConfig
from swaglora.data import MCQExample, limit
from swaglora.tasks import load_task
from swaglora.models import LoadedModel, load_model
from swaglora.members import Session, open_session

TASK = "arc_easy"
#: the demo protocol (`--preset demo`, the defaults when these benchmarks were written; README "What make demo
#: does"): cloze scoring, LoRA all-linear on the top 2 layers, the cached prefix this file measures
DEFAULT_PROTOCOL = dict(scoring="cloze", targets="all-linear", layers="top:2")
#: the paper's LoRA layout (Onal et al. 2024): r=8 on q_proj,v_proj of every layer, letter scoring
PAPER_LAYOUT = dict(scoring="letter", targets="q_proj,v_proj", layers="all")


def threads() -> int:
    """Torch threads: all cores (as ``swaglora run`` uses), or $BENCH_THREADS; GEMM peaks and model runs share it."""
    n = int(os.environ.get("BENCH_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from swaglora.models import cache_dir

    from transformers import AutoTokenizer

    cached = cache_dir() / "models" / "smollm2-135m"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return load_model(ModelConfig()).tokenizer  # builds the embedded cache once (~25 s)


def base_model(quick: bool) -> LoadedModel:
    """A fresh base model (``add_lora`` modifies it in place, so every LoRA layout needs its own).

    quick: a 4-layer, hidden-64 random Llama with SmolLM2's tokenizer (same code paths, seconds instead of minutes).
    """
    if not quick:
        return load_model(ModelConfig())
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    return LoadedModel(model=model, tokenizer=tok, name="tiny-llama", scoring="cloze")


def session(quick: bool, scoring: str, targets: str, layers: str, train_head: bool = True) -> Session:
    """Model + LoRA + scorer + lower-layer cache, exactly as ``swaglora run`` sets them up."""
    cfg = RunConfig(model=ModelConfig(scoring=scoring, train_head=train_head),
                    lora=LoraSettings(r=8, alpha=16.0, dropout=0.1, targets=targets, layers=layers),
                    train=TrainConfig(threads=threads()))
    lm = base_model(quick)
    lm.scoring = scoring  # open_session takes the scoring mode from the loaded model
    return open_session(cfg, lm=lm, with_data=False)


def examples(n: int, split: str = "train", seed: int = 0) -> list[MCQExample]:
    """A seeded subset of the bundled ARC-Easy split (the default task)."""
    return limit(load_task(TASK, split), n, seed)


def train_step(s: Session, batch_examples: list[MCQExample], optimizer: torch.optim.Optimizer, cache=None) -> None:
    """One optimiser step exactly as ``swaglora.train.fit`` does it (one process, no accumulation)."""
    batch = s.scorer.batch(batch_examples)
    cache = cache if cache is not None else s.cache
    loss = nn.functional.cross_entropy(s.scorer.top(cache.hidden(batch), batch), batch.labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each ``fn(round)`` per round; the order rotates every round so no method always runs first."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(timed(lambda: fns[k](r)))
    return times


median = statistics.median


def ratio(name: str, value: float, goal: str | None = None) -> dict:
    """A reported ratio with its goal, e.g. '>= 3' or '<= 0.02' (None: for information, no goal)."""
    ok = None
    if goal is not None:
        op, target = goal.split()
        ok = bool(value >= float(target) if op == ">=" else value <= float(target))
    return {"name": name, "value": float(value), "goal": goal or "-", "ok": ok}


def finish(bench: str, quick: bool, metrics: dict, ratios: list[dict], notes: list[str] = ()) -> dict:
    """Print the details, then the ratios LAST; return the JSON-able result."""
    print(f"\n== {bench}{' (quick: tiny model, numbers meaningless)' if quick else ''}")
    for k, v in metrics.items():
        print(f"  {k:42s} {v:.4g}" if isinstance(v, float) else f"  {k:42s} {v}")
    for note in notes:
        print(f"  note: {note}")
    for r in ratios:
        verdict = {True: "met", False: "NOT met", None: ""}[r["ok"]]
        print(f"  RATIO {r['name']:44s} {r['value']:8.3f}   goal {r['goal']:8s} {verdict}")
    return {"bench": bench, "quick": quick, "metrics": metrics, "ratios": ratios, "notes": list(notes)}


def layer_weights(layer: nn.Module) -> tuple[int, int, int]:
    """(base linear weights, LoRA weights, q/k/v base weights) of one decoder layer, in parameters.

    A linear layer with W [out, in] costs 2·out·in FLOPs per token forward (one multiply-add per weight).
    Norms, rotary embedding, activations and the attention scores themselves (4·T·hidden per token, under
    3% of a layer here at T ~ 50-180) are not counted, so achieved rates are slight underestimates.
    """
    base = lora = qkv = 0
    for name, p in layer.named_parameters():
        if p.dim() != 2:
            continue
        if "lora_" in name:
            lora += p.numel()
        else:
            base += p.numel()
            if any(k in name for k in ("q_proj", "k_proj", "v_proj")):
                qkv += p.numel()
    return base, lora, qkv
