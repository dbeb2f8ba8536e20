"""Packed cloze scoring equals C separate passes; the lower-layer cache is exact; letter scoring uses the letter rows."""

from __future__ import annotations

import pytest
import torch

from swaglora.config import LoraSettings, ModelConfig
from swaglora.data import MCQExample
from swaglora.models import add_lora, load_model
from swaglora.scoring import HiddenCache, Scorer, letter_token_ids

from conftest import make_examples


def _examples(n=6, seed=0):
    return [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"]) for r in make_examples(n, seed)]


#: What bf16 compute promises: 8 significant bits, so a result agrees to one rounding (eps = 2^-7) of its size.
BF16 = {"atol": 1e-5, "rtol": torch.finfo(torch.bfloat16).eps}


def tolerance(model, **fp32) -> dict:
    """The fp32 tolerance given, or bf16's when the model computes in bf16."""
    return fp32 if model.dtype == torch.float32 else BF16


@pytest.fixture(params=["float32", "bfloat16"])
def lora_model(request, tiny_model_dir):
    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype=request.param))
    model = add_lora(lm.model, LoraSettings(r=4, targets="all-linear", layers="top:1", dropout=0.0), seed=0)
    with torch.no_grad():  # non-zero lora_B so that LoRA changes the function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return lm, model


def naive_cloze(model, tok, ex: MCQExample) -> list[float]:
    """One full forward per choice: mean log-likelihood of ' choice' after the question (log-softmax in fp32, as
    the scorer: in bf16 it would round log-probabilities near -11 to steps of 2^-4)."""
    q = tok(f"Question: {ex.question}\nAnswer:", add_special_tokens=False).input_ids
    scores = []
    for choice in ex.choices:
        c = tok(f" {choice}", add_special_tokens=False).input_ids
        logp = model(input_ids=torch.tensor([q + c])).logits.float().log_softmax(-1)[0]
        scores.append(sum(logp[len(q) - 1 + j, c[j]].item() for j in range(len(c))) / len(c))
    return scores


def test_packed_cloze_equals_separate_passes(lora_model):
    lm, model = lora_model
    scorer = Scorer(model, lm.tokenizer, "cloze")
    examples = _examples(6)
    with torch.no_grad():
        logits = scorer.logits(scorer.batch(examples))
        for i, ex in enumerate(examples):
            expected = torch.tensor(naive_cloze(model, lm.tokenizer, ex))
            torch.testing.assert_close(logits[i, : ex.n_choices].double(), expected.double(), **tolerance(model, atol=1e-5, rtol=1e-5))
            assert torch.isinf(logits[i, ex.n_choices :]).all()


def test_hidden_cache_is_exact_and_reused(lora_model):
    lm, model = lora_model
    scorer = Scorer(model, lm.tokenizer, "cloze")
    assert scorer.split == 1  # LoRA only on the top layer of two: layer 0 is frozen
    cache = HiddenCache(scorer)
    examples = _examples(8)
    with torch.no_grad():
        full = scorer.logits(scorer.batch(examples))
        first = scorer.top(cache.hidden(scorer.batch(examples[:5])), scorer.batch(examples[:5]))
        assert len(cache) == 5
        mixed = examples[3:8]  # 2 cached, 3 new, different padding width
        second = scorer.top(cache.hidden(scorer.batch(mixed)), scorer.batch(mixed))
        assert len(cache) == 8
    torch.testing.assert_close(first, full[:5], **tolerance(model, atol=1e-5, rtol=0))
    torch.testing.assert_close(second, full[3:8], **tolerance(model, atol=1e-5, rtol=0))


def test_letter_scoring_reads_letter_rows_at_last_position(lora_model):
    lm, model = lora_model
    scorer = Scorer(model, lm.tokenizer, "letter", train_head=True)
    examples = _examples(4)
    with torch.no_grad():
        logits = scorer.logits(scorer.batch(examples))
        for i, ex in enumerate(examples):
            prompt = f"Question: {ex.question}\n" + "".join(f"{l}. {c}\n" for l, c in zip(ex.labels, ex.choices)) + "Answer:"
            ids = lm.tokenizer(prompt, add_special_tokens=False).input_ids
            full = model(input_ids=torch.tensor([ids])).logits[0, -1]
            letters = letter_token_ids(lm.tokenizer)[: ex.n_choices]
            # the model's own logits are rounded to its dtype; the letter head computes in fp32
            torch.testing.assert_close(logits[i, : ex.n_choices], full[letters].float(), **tolerance(model, atol=1e-4, rtol=1e-4))
    head = model.get_base_model().letter_head
    assert head.weight.requires_grad and head.weight.shape == (26, 64) and head.weight.dtype == torch.float32


def test_letter_tokens_of_the_real_tokenizer(tokenizer):
    assert letter_token_ids(tokenizer)[:4] == [330, 389, 340, 422]  # " A", " B", " C", " D" in SmolLM2


def test_letter_scoring_refuses_multi_token_letters():
    from swaglora.models import ModelError

    class SplitTokenizer:
        def __call__(self, text, add_special_tokens=False):
            class Out:
                input_ids = [1, 2]
            return Out()

    with pytest.raises(ModelError, match="one token"):
        letter_token_ids(SplitTokenizer())
