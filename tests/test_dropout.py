"""MC dropout through the shared prediction path: p=0 is MAP; p>0 is stochastic but seeded."""

from __future__ import annotations

import pytest
import torch

from swaglora.config import LoraSettings, ModelConfig
from swaglora.data import MCQExample
from swaglora.models import add_lora, load_model
from swaglora.params import trainable_parameters
from swaglora.posterior import MAP, MCDropout, get_method, load_posterior
from swaglora.predict import predict_logits, predict_probs
from swaglora.scoring import Scorer

from conftest import make_examples


def examples(n: int = 5) -> list[MCQExample]:
    return [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"]) for r in make_examples(n, 2)]


def gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest difference over the present (finite) choices."""
    present = torch.isfinite(x)
    assert torch.equal(present, torch.isfinite(y))
    return float((x - y)[present].abs().max())


def scorer_with_dropout(model_dir, p: float) -> Scorer:
    lm = load_model(ModelConfig(name=str(model_dir)))
    model = add_lora(lm.model, LoraSettings(r=4, targets="q_proj,v_proj", dropout=p), seed=0)
    with torch.no_grad():  # lora_B starts at zero: LoRA (and its dropout) would change nothing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return Scorer(model, lm.tokenizer, "letter", train_head=True)


def test_draws_are_map_copies_and_round_trip(tmp_path, tiny_model_dir):
    scorer = scorer_with_dropout(tiny_model_dir, 0.3)
    post = get_method("dropout")(scorer.model)
    assert isinstance(post, MCDropout) and post.stochastic_forward and not post.is_point_mass
    params = trainable_parameters(scorer.model)
    draws = post.draws(4, torch.Generator().manual_seed(0))
    assert len(draws) == 4 and all(torch.equal(d[n], params[n]) for d in draws for n in params)
    assert len(MAP(scorer.model).draws(4)) == 1
    loaded = load_posterior(post.save(tmp_path / "dropout"), model=scorer.model)
    assert isinstance(loaded, MCDropout) and all(torch.equal(loaded.sample()[n], params[n]) for n in params)


def test_zero_dropout_predictive_equals_map(tiny_model_dir):
    scorer = scorer_with_dropout(tiny_model_dir, 0.0)
    exs = examples()
    map_logits = predict_logits(scorer, exs, MAP(scorer.model).draws(1))
    post = MCDropout(scorer.model)
    mc = predict_logits(scorer, exs, post.draws(3, torch.Generator().manual_seed(0)), stochastic=True,
                        dropout_generator=torch.Generator().manual_seed(1))
    assert mc.shape[0] == 3
    for s in range(3):
        torch.testing.assert_close(mc[s], map_logits[0], rtol=0, atol=1e-6)
    probs = predict_probs(scorer, exs, post, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs.mean(0), torch.softmax(map_logits[0], -1), rtol=0, atol=1e-6)


def test_dropout_forwards_differ_but_are_seeded(tiny_model_dir):
    scorer = scorer_with_dropout(tiny_model_dir, 0.5)
    model, exs = scorer.model, examples()
    post = MCDropout(model)
    thetas = post.draws(2, torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    model.train()
    run = lambda seed: predict_logits(scorer, exs, thetas, stochastic=True,  # noqa: E731
                                      dropout_generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(torch.get_rng_state(), rng) and all(m.training for m in model.modules())  # state restored
    assert torch.equal(a, b)  # same generator seed: same masks
    assert gap(a[0], a[1]) > 1e-3  # two samples: different masks
    assert gap(a, c) > 1e-3
    # without stochastic_forward the model runs in eval mode: MAP's logits, every time
    map_logits = predict_logits(scorer, exs, MAP(model).draws(1))
    torch.testing.assert_close(predict_logits(scorer, exs, thetas[:1]), map_logits, rtol=0, atol=0)
    assert gap(a[0], map_logits[0]) > 1e-3
    # the shared BMA path uses the posterior's stochastic_forward flag and the given generator
    p1 = predict_probs(scorer, exs, post, 3, torch.Generator().manual_seed(3))
    p2 = predict_probs(scorer, exs, post, 3, torch.Generator().manual_seed(3))
    assert p1.shape[0] == 3 and torch.equal(p1, p2) and (p1[0] - p1[1]).abs().max() > 1e-4
    assert torch.allclose(p1.sum(-1), torch.ones(p1.shape[:2]), atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_dropout_modules_are_what_predict_switches(tiny_model_dir, p):
    scorer = scorer_with_dropout(tiny_model_dir, p)
    n_dropout = sum(isinstance(m, torch.nn.Dropout) and "lora_dropout" in n for n, m in scorer.model.named_modules())
    assert n_dropout == (0 if p == 0 else 4)  # peft uses nn.Identity for p=0; q,v in each of 2 layers
