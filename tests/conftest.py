"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small MCQA files."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

from swaglora.models import AUTO_DTYPE_ENV, EMBEDDED_MODELS, cache_dir

# `--dtype auto` must not depend on this machine's CPU (it takes bf16 where bf16 matmul is faster): the suite runs it
# as float32, in this process and in the subprocesses it starts. The bf16 pass of .ci/run sets the variable itself.
if not os.environ.get(AUTO_DTYPE_ENV):
    os.environ[AUTO_DTYPE_ENV] = "float32"


def smollm2_tokenizer():
    """The SmolLM2 tokenizer: from the dequantized cache when present, else from the GGUF file (~8 s)."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "models" / "smollm2-135m"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    package, filename = EMBEDDED_MODELS["smollm2-135m"]
    folder = Path(importlib.util.find_spec(package).origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file=filename)


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, hidden-64 random Llama saved as a local HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def small_model(out: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, train_first: bool = False):
    """Linear(4, 3) -> Linear(3, out) with random weights; only one layer is trainable (the second by
    default), so selection by ``requires_grad`` matters. With out=2: D = 6 + 2 = 8 tracked numbers."""
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, out))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    model.requires_grad_(False)
    model[0 if train_first else 1].requires_grad_(True)
    return model


def make_examples(n: int, seed: int = 0, prefix: str = "q") -> list[dict]:
    """Synthetic questions with a learnable pattern: the answer is the choice that repeats a word of the question."""
    rng = random.Random(seed)
    words = ["red", "blue", "green", "stone", "river", "cloud", "apple", "metal", "glass", "sand", "wind", "fire"]
    rows = []
    for i in range(n):
        n_choices = rng.choice([3, 4, 4, 5])
        key = rng.choice(words)
        others = rng.sample([w for w in words if w != key], n_choices - 1)
        answer = rng.randrange(n_choices)
        choices = others[:answer] + [key] + others[answer:]
        labels = [chr(65 + j) for j in range(n_choices)]
        rows.append({"id": f"{prefix}{i}", "question": f"Which word is {key}?", "choices": choices,
                     "labels": labels, "answer": labels[answer]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_examples(40))
