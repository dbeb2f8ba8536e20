"""One contract, every registered method: collect/fit, deterministic sampling, save/load, shared prediction path."""

from __future__ import annotations

import pytest
import torch

from swaglora.config import LoraSettings, ModelConfig
from swaglora.data import MCQExample
from swaglora.models import add_lora, load_model
from swaglora.params import trainable_parameters
from swaglora.posterior import MAP, Ensemble, get_method, load_posterior, method_names
from swaglora.predict import predict_probs
from swaglora.scoring import Scorer

from conftest import make_examples


def _setup(model_dir, dtype: str, scoring: str = "cloze"):
    lm = load_model(ModelConfig(name=str(model_dir), dtype=dtype))
    model = add_lora(lm.model, LoraSettings(r=2, targets="q_proj,v_proj", layers="all", dropout=0.2), seed=0)
    scorer = Scorer(model, lm.tokenizer, scoring)
    examples = [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"])
                for r in make_examples(8, 5)]
    return model, scorer, examples


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    return _setup(tiny_model_dir, "auto")


def build(name: str, model, scorer, examples):
    """Construct, then feed a short trajectory: three weight settings, then the post-hoc fit. A mixture
    (``Ensemble``) is built of two point masses and fed through its members."""
    params = trainable_parameters(model)
    start = {k: v.detach().clone() for k, v in params.items()}
    cls = get_method(name)
    posterior = cls([MAP(model), MAP(model)]) if issubclass(cls, Ensemble) else cls(model)
    generator = torch.Generator().manual_seed(0)
    members = getattr(posterior, "members", [posterior])
    for step in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        for member in members:
            member.collect(model)

    def loss_fn(m, batch):
        b = scorer.batch(batch)
        return scorer.logits(b), b.labels

    for member in members:  # every method gets the same arguments; each uses what it needs
        member.fit(model, [examples[:4], examples[4:]], loss_fn, validation=[examples[4:], examples[:4]],
                   generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(start[k])
    return posterior


@pytest.mark.bf16
@pytest.mark.parametrize("name", method_names())
def test_contract(name, setup, tmp_path):
    model, scorer, examples = setup
    posterior = build(name, model, scorer, examples)
    params = trainable_parameters(model)
    shapes = {k: tuple(v.shape) for k, v in params.items()}

    a = posterior.draws(3, generator=torch.Generator().manual_seed(7))
    b = posterior.draws(3, generator=torch.Generator().manual_seed(7))
    members = getattr(posterior, "members", [posterior])
    point = [m.is_point_mass and not m.stochastic_forward for m in members]
    assert len(a) == sum(1 if p else 3 for p in point)  # a point mass gives one draw, anything else S = 3
    assert all({k: tuple(v.shape) for k, v in t.items()} == shapes for t in a)
    assert all(v.dtype == params[k].dtype and torch.isfinite(v).all() for t in a for k, v in t.items())
    for ta, tb in zip(a, b):
        assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the same seed gives the same draws
    other = posterior.draws(3, generator=torch.Generator().manual_seed(8))
    moved = any(not torch.equal(ta[k], to[k]) for ta, to in zip(a, other) for k in ta)
    assert moved == any(not m.is_point_mass and not m.stochastic_forward for m in members)  # random iff it samples weights

    posterior.save(tmp_path / name, metadata={"base": "tiny"})
    loaded = load_posterior(tmp_path / name, model=model, expected_metadata={"base": "tiny"})
    assert type(loaded) is type(posterior)
    c = loaded.draws(3, generator=torch.Generator().manual_seed(7))
    for ta, tc in zip(a, c):
        assert all(torch.equal(ta[k], tc[k]) for k in ta)  # the round trip is exact

    probs = predict_probs(scorer, examples, loaded, n_samples=3, generator=torch.Generator().manual_seed(1))
    assert probs.shape == (len(a), len(examples), max(e.n_choices for e in examples))
    again = predict_probs(scorer, examples, loaded, n_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(probs, again)  # the predictive is a function of the seed (dropout masks included)
    shifted = predict_probs(scorer, examples, loaded, n_samples=3, generator=torch.Generator().manual_seed(2))
    assert (not torch.equal(probs, shifted)) == (not all(point))  # and random unless every member is a point mass
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5, rtol=0)
    for i, ex in enumerate(examples):
        assert torch.all(probs[:, i, ex.n_choices:] == 0)
    if loaded.linearization() is not None:  # the linearised predictive, where a method has one
        glm = predict_probs(scorer, examples, loaded, n_samples=5, generator=torch.Generator().manual_seed(1), linearized=True)
        assert glm.shape == (5, *probs.shape[1:])
        torch.testing.assert_close(glm.sum(-1), torch.ones(glm.shape[:2]), atol=1e-5, rtol=0)
        assert all(torch.all(glm[:, i, ex.n_choices:] == 0) for i, ex in enumerate(examples))
    else:
        with pytest.raises(ValueError, match="no linearised predictive"):
            predict_probs(scorer, examples, loaded, n_samples=2, generator=torch.Generator().manual_seed(1), linearized=True)


@pytest.mark.parametrize("name", method_names())
def test_moments_stay_fp32_under_a_bf16_model(name, tiny_model_dir):
    """Mixed precision: the frozen model computes in bf16, the trainable weights (LoRA, letter head) and every
    posterior's state stay fp32, so a snapshot or a draw is never rounded to 8 significant bits."""
    model, scorer, examples = _setup(tiny_model_dir, "bfloat16", scoring="letter")
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    params = trainable_parameters(model)
    assert any("letter_head" in k for k in params) and {p.dtype for p in params.values()} == {torch.float32}
    posterior = build(name, model, scorer, examples)
    state = posterior.state_dict()
    moments = {k: v.dtype for k, v in state.items() if v.is_floating_point() and v.dim() > 0}
    assert set(moments.values()) == {torch.float32}, moments  # (scalars such as Laplace's log-likelihood are fp64)
    assert all(v.dtype in (torch.float32, torch.float64) for v in state.values() if v.is_floating_point())
    draws = posterior.draws(2, generator=torch.Generator().manual_seed(0))
    assert {v.dtype for d in draws for v in d.values()} == {torch.float32}


_OTHER_SETTINGS = {"tfb.metric": "accuracy", "tfb.epsilon": 0.02, "tfb.sigma_min": 0.002, "tfb.sigma_max": 0.03,
                   "tfb.steps": 3, "tfb.expand": 2, "laplace.subset": "last-layer", "laplace.prior_precision": 2.0,
                   "swag.max_rank": 3, "blob.prior_sigma": 0.3, "blob.eps": 0.04}


@pytest.mark.parametrize("name", [n for n in method_names() if not issubclass(get_method(n), Ensemble)])
def test_settings_are_what_build_takes_and_hparams_records(name, setup):
    """``settings(cfg)`` is how ``evaluate`` tells that a saved posterior was made under other flags: each entry
    must be the value ``build(model, cfg).hparams()`` records, under a config key with a flag, and must follow
    the config (a non-default config changes it), else the check would fire always or never."""
    from swaglora.config import RunConfig, apply_overrides, flag_of

    model = setup[0]
    cls = get_method(name)
    for cfg in (RunConfig(), apply_overrides(RunConfig(), _OTHER_SETTINGS)):
        settings = cls.settings(cfg)
        hparams = cls.build(model, cfg).hparams()
        assert {h: hparams[h] for h in settings} == {h: v for h, (v, _) in settings.items()}
        assert all(flag_of(key).startswith("--") for _, key in settings.values())
    if cls.settings(RunConfig()):
        assert cls.settings(RunConfig()) != cls.settings(apply_overrides(RunConfig(), _OTHER_SETTINGS))
