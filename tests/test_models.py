"""Model loading: the embedded SmolLM2 cache, errors that say what was tried, LoRA placement."""

from __future__ import annotations

import pytest
import torch

from swaglora import models
from swaglora.config import LoraSettings, ModelConfig
from swaglora.models import ModelError, add_lora, load_model
from swaglora.params import trainable_parameters


def test_missing_local_model_path_says_what_was_tried(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))


def test_lora_top_k_layers_only(tiny_model_dir):
    lm = load_model(ModelConfig(name=str(tiny_model_dir)))
    model = add_lora(lm.model, LoraSettings(r=2, targets="all-linear", layers="top:1"), seed=3)
    names = list(trainable_parameters(model))
    assert names and all(".layers.1." in n for n in names)
    assert {n.split(".")[-3] for n in names} == {"lora_A", "lora_B"}
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ModelError, match="more layers"):
        add_lora(load_model(ModelConfig(name=str(tiny_model_dir))).model, LoraSettings(layers="top:5"), seed=0)


def test_lora_init_is_seeded_without_global_rng(tiny_model_dir):
    a = add_lora(load_model(ModelConfig(name=str(tiny_model_dir))).model, LoraSettings(r=2), seed=7)
    b = add_lora(load_model(ModelConfig(name=str(tiny_model_dir))).model, LoraSettings(r=2), seed=7)
    c = add_lora(load_model(ModelConfig(name=str(tiny_model_dir))).model, LoraSettings(r=2), seed=8)
    pa, pb, pc = (trainable_parameters(m) for m in (a, b, c))
    name = next(n for n in pa if "lora_A" in n)
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])


def test_init_lora_puts_every_trainable_back_including_the_letter_head(tiny_model_dir):
    """A fresh member starts from the same place as a freshly built model: LoRA A as add_lora's seeded draw, B zero,
    the letter head at the LM-head rows of the letters."""
    from swaglora.scoring import Scorer

    lm = load_model(ModelConfig(name=str(tiny_model_dir)))
    model = add_lora(lm.model, LoraSettings(r=2), seed=7)
    scorer = Scorer(model, lm.tokenizer, "letter")
    fresh = {k: v.clone() for k, v in trainable_parameters(model).items()}
    head = next(k for k in fresh if "letter_head" in k)
    lm_rows = model.get_base_model().lm_head.weight[scorer.letter_head.token_ids]
    assert torch.equal(fresh[head], lm_rows.float())
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(1.0)
    models.init_lora(model, 7)
    after = trainable_parameters(model)
    assert sorted(after) == sorted(fresh) and all(torch.equal(after[k], fresh[k]) for k in fresh)
    assert all(not after[k].any() for k in after if "lora_B" in k)


@pytest.mark.slow
def test_embedded_model_cache_is_atomic_and_exact(tmp_path, monkeypatch):
    """A killed first run leaves no half cache; the cache reloads with outputs identical to the GGUF model."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SWAGLORA_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "smollm2-135m"

    # 1. a first run that dies while writing the cache: nothing is left behind
    real_load = AutoModelForCausalLM.from_pretrained

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("killed while dequantizing")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        models._cached_embedded("smollm2-135m")
    assert not target.exists()
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", real_load)

    # 2. the real first run writes the cache; the second one reads it (fp32, as the GGUF reference: exact)
    lm = load_model(ModelConfig(dtype="float32"))
    assert (target / "model.safetensors").is_file() and (target / "swaglora_cache.json").is_file()
    folder, filename = models._embedded_path("smollm2-135m")
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    ids = torch.tensor([[21350, 42, 330, 389, 340]])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, gguf(input_ids=ids).logits)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    again = load_model(ModelConfig(dtype="float32"))
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert lm.scoring == again.scoring == "cloze"  # the embedded model's default: it cannot bind answer letters
    assert again.model.config.num_hidden_layers == 30
