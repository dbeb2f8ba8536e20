"""TFB: the paper's noise family, sigma = 0 is the MAP, the bisection, validation-only search, save/load, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from swaglora.cli import main
from swaglora.posterior import MAP, TFB, load_posterior
from swaglora.posterior.tfb import bisect_sigma

from conftest import make_examples, write_jsonl

A, B = "layer.lora_A.default.weight", "layer.lora_B.default.weight"


def _factors(m: int = 5, r: int = 3, n: int = 4, singular=(3.0, 1.0, 0.25), seed: int = 0):
    """B = U diag(singular) V^T with known factors (m > r, so U U^T is a proper projector), A random."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    b = u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    return u, b, a


def _tfb(a: torch.Tensor, b: torch.Tensor, **kwargs) -> TFB:
    post = TFB({A: tuple(a.shape), B: tuple(b.shape)}, **kwargs)
    post.load_state_dict({A: a.float(), B: b.float()})
    return post


def _delta_w(post: TFB, n_draws: int, seed: int) -> torch.Tensor:
    """``[S, m*n]``: the sampled update B A_draw - B A, rows of the m x n matrix concatenated."""
    g = torch.Generator().manual_seed(seed)
    mean = post.state_dict()
    b, a = mean[B].double(), mean[A].double()
    return torch.stack([(b @ (post.sample(g)[A].double() - a)).flatten() for _ in range(n_draws)])


@pytest.mark.parametrize("singular", [(3.0, 1.0, 0.25), (2.0, 0.5, 0.0)])
def test_noise_family_has_the_papers_covariance(singular):
    """Cov(vec dW) = sigma^2 (U_k U_k^T kron I_n) (rows of dW flattened): isotropic std sigma inside the column space
    of B, nothing outside it, whatever B's singular values; a zero singular value is a direction with no noise."""
    sigma, n_draws = 0.2, 20000
    u, b, a = _factors(singular=singular)
    post = _tfb(a, b, sigma=sigma)
    dw = _delta_w(post, n_draws, seed=1)
    k = sum(s > 0 for s in singular)
    expected = sigma**2 * torch.kron(u[:, :k] @ u[:, :k].T, torch.eye(a.shape[1], dtype=torch.float64))
    empirical = torch.cov(dw.T)
    # standard error of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / N) <= sqrt(2) sigma^2 / sqrt(N)
    # (the diagonal of a projector is <= 1); 5 standard errors over 400 entries: a false alarm has p < 1e-3
    tol = 5 * math.sqrt(2) * sigma**2 / math.sqrt(n_draws)
    assert (empirical - expected).abs().max() < tol
    assert dw.mean(0).abs().max() < 5 * sigma / math.sqrt(n_draws)
    # power: the plausible wrong families are far outside the tolerance: the same std sigma on every entry of A
    # (no 1/d_i), and isotropic noise on all of dW (not only B's column space)
    d2 = torch.diag(torch.tensor(singular, dtype=torch.float64) ** 2)
    wrong_a = sigma**2 * torch.kron(u @ d2 @ u.T, torch.eye(a.shape[1], dtype=torch.float64))
    wrong_w = sigma**2 * torch.eye(expected.shape[0], dtype=torch.float64)
    for wrong in (wrong_a, wrong_w):
        assert (empirical - wrong).abs().max() > 10 * tol
    assert torch.equal(post.sample(torch.Generator().manual_seed(2))[B], b.float())  # B stays deterministic


def test_scale_multiplies_the_covariance():
    u, b, a = _factors()
    post = _tfb(a, b, sigma=0.1)
    one = post.sample(torch.Generator().manual_seed(4))[A].double() - a.float().double()
    four = post.sample(torch.Generator().manual_seed(4), scale=4.0)[A].double() - a.float().double()
    torch.testing.assert_close(four, 2 * one, rtol=1e-5, atol=1e-7)  # std sqrt(scale) * sigma, the same normals


def test_sigma_zero_is_the_map_exactly(tiny_model_dir):
    from swaglora.config import LoraSettings, ModelConfig
    from swaglora.data import MCQExample
    from swaglora.models import add_lora, load_model
    from swaglora.params import trainable_parameters
    from swaglora.predict import predict_probs
    from swaglora.scoring import Scorer

    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype="float32"))
    model = add_lora(lm.model, LoraSettings(r=2, targets="q_proj,v_proj", layers="all"), seed=0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    scorer = Scorer(model, lm.tokenizer, "cloze")
    examples = [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"])
                for r in make_examples(6, 3)]
    weights = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    zero = TFB(model)  # sigma = 0 until fitted
    assert zero.is_point_mass and len(zero.draws(4, torch.Generator().manual_seed(0))) == 1
    assert all(torch.equal(zero.sample()[k], weights[k]) for k in weights)
    fitted = TFB(model, sigma=0.3)
    assert all(torch.equal(fitted.sample(torch.Generator().manual_seed(1), scale=0.0)[k], weights[k]) for k in weights)
    assert any(not torch.equal(fitted.sample(torch.Generator().manual_seed(1))[k], weights[k]) for k in weights)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(predict_probs(scorer, examples, zero, 4, gen()), predict_probs(scorer, examples, MAP(model), 4, gen()))


def test_bisection_returns_the_largest_accepted_sigma_by_hand():
    """drop(sigma) = sigma, epsilon = 0.3 on [0, 1], 5 steps, by hand: 0.5 no, 0.25 yes, 0.375 no, 0.3125 no,
    0.28125 yes -> 0.28125, the largest midpoint <= 0.3 (and within 1/32 of it)."""
    sigma, trace = bisect_sigma(lambda s: s, 0.3, 0.0, 1.0, 5)
    assert trace == [(0.5, False), (0.25, True), (0.375, False), (0.3125, False), (0.28125, True)]
    assert sigma == 0.28125
    assert bisect_sigma(lambda s: 1 + s, 0.3, 0.0, 1.0, 3) == (0.0, [(0.5, False), (0.25, False), (0.125, False)])
    assert bisect_sigma(lambda s: -s, 0.0, 0.0, 1.0, 3)[0] == 0.875  # everything accepted: the top midpoint


def test_expansion_finds_the_largest_sigma_above_the_range_by_hand():
    """drop(sigma) = sigma - 0.1, epsilon 0 (accept sigma <= 0.1), the paper's range [0.001, 0.015]: without
    expansion the answer is capped near 0.015. With it, by hand: 0.015 yes, 0.03 yes, 0.06 yes, 0.12 no; then
    bisection of [0.06, 0.12]: 0.09 yes, 0.105 no, 0.0975 yes, 0.10125 no, 0.099375 yes -> 0.099375."""
    drop = lambda s: s - 0.1  # noqa: E731
    capped, _ = bisect_sigma(drop, 0.0, 0.001, 0.015, 5)
    assert capped == pytest.approx(0.015 - 0.014 / 32)
    sigma, trace = bisect_sigma(drop, 0.0, 0.001, 0.015, 5, expand=6)
    assert [s for s, _ in trace] == pytest.approx([0.015, 0.03, 0.06, 0.12, 0.09, 0.105, 0.0975, 0.10125, 0.099375])
    assert [ok for _, ok in trace] == [True, True, True, False, True, False, True, False, True]
    assert sigma == pytest.approx(0.099375)
    # a bound the tolerance rejects costs one evaluation and leaves the paper's bisection as it was
    sigma, trace = bisect_sigma(lambda s: s - 0.01, 0.0, 0.001, 0.015, 5, expand=6)
    assert trace[0] == (0.015, False) and len(trace) == 6
    assert (sigma, trace[1:]) == bisect_sigma(lambda s: s - 0.01, 0.0, 0.001, 0.015, 5)
    # expansion exhausted (all accepted): bisection between the last tried and its double
    sigma, trace = bisect_sigma(lambda s: -1.0, 0.0, 0.001, 0.015, 2, expand=2)
    assert [s for s, _ in trace] == pytest.approx([0.015, 0.03, 0.045, 0.0525]) and sigma == pytest.approx(0.0525)
    with pytest.raises(ValueError, match="expand"):
        TFB({A: (3, 4), B: (5, 3)}, expand=-1)


class _Layer(nn.Module):
    """A LoRA pair named as peft names it (``lora_A.default.weight``, ``lora_B.default.weight``)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(a.shape[1], a.shape[0], bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(b.shape[1], b.shape[0], bias=False)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(a)
            self.lora_B["default"].weight.copy_(b)


class _Toy(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.layer = _Layer(a, b)


def _quadratic_loss(a0: torch.Tensor, b: torch.Tensor, seen: list):
    """Two choices, the answer's logit -k ||B (A - A_map)||_F^2 (k from the example), the other 0: NLL grows
    with the noise. Records every example it is given."""

    def loss_fn(model, batch):
        seen.extend(name for name, _ in batch)
        dw = b.double() @ (model.layer.lora_A["default"].weight.double() - a0.double())
        logits = torch.stack([torch.stack([-k * (dw**2).sum(), torch.zeros((), dtype=torch.float64)]) for _, k in batch])
        return logits, torch.zeros(len(batch), dtype=torch.long)

    return loss_fn


def test_search_hits_the_analytic_threshold_on_validation_only():
    """One draw per sigma (search_samples=1): ||B dA||^2 = sigma^2 q with q = ||E||^2 of the first normal block of
    the generator, so the NLL log(1 + exp(k sigma^2 q)) of one example exceeds (1 + eps) log 2 exactly above
    sigma* = sqrt(log(2^(1+eps) - 1) / (k q)). The search must return the largest midpoint below sigma*, within the
    bisection's resolution, having read only validation examples."""
    _, b, a = _factors(r=3, singular=(3.0, 1.0, 0.25))
    model, seen = _Toy(a, b), []
    eps, k, steps = 0.05, 40.0, 8
    post = TFB(model, epsilon=eps, sigma_min=0.0, sigma_max=1.0, steps=steps, search_samples=1)
    loss_fn = _quadratic_loss(a.float(), b.float(), seen)
    train = [[("train-0", 1000.0), ("train-1", 1000.0)]]
    post.fit(model, train, loss_fn, validation=[[("val-0", k)]], generator=torch.Generator().manual_seed(11))
    q = float((torch.randn((3, a.shape[1]), generator=torch.Generator().manual_seed(11), dtype=torch.float64) ** 2).sum())
    threshold = math.sqrt(math.log(2 ** (1 + eps) - 1) / (k * q))
    assert 0 < post.sigma <= threshold < post.sigma + 1.0 / 2**steps
    assert set(seen) == {"val-0"}  # the training batches were never scored
    assert post.baseline == pytest.approx(math.log(2))
    assert [t["accepted"] for t in post.trace] == [t["sigma"] <= threshold for t in post.trace]
    for t in post.trace:  # the recorded metric is the analytic one
        nll = min(math.log1p(math.exp(k * t["sigma"] ** 2 * q)), -math.log(1e-12))  # metrics.nll caps at p = 1e-12
        assert t["nll"] == pytest.approx(nll, rel=1e-4)
    # other training data, same validation: the same sigma; other validation: another sigma (the search reads it)
    again = TFB(model, epsilon=eps, sigma_min=0.0, sigma_max=1.0, steps=steps, search_samples=1)
    again.fit(model, [[("other", 1.0)]], loss_fn, validation=[[("val-0", k)]], generator=torch.Generator().manual_seed(11))
    assert again.sigma == post.sigma and again.trace == post.trace
    other = TFB(model, epsilon=eps, sigma_min=0.0, sigma_max=1.0, steps=steps, search_samples=1)
    other.fit(model, train, loss_fn, validation=[[("val-1", 4 * k)]], generator=torch.Generator().manual_seed(11))
    assert other.sigma < post.sigma
    assert torch.equal(model.layer.lora_A["default"].weight, a.float())  # the model's weights are back at the MAP


def test_accuracy_metric_and_missing_validation():
    _, b, a = _factors()
    model = _Toy(a, b)
    loss_fn = _quadratic_loss(a.float(), b.float(), [])
    post = TFB(model, metric="accuracy", sigma_min=0.0, sigma_max=1.0, steps=3, search_samples=2)
    assert post.epsilon == 0.01  # the paper's accuracy tolerance
    # the answer's logit is <= 0 = the other's, and the tie at sigma = 0 goes to index 0 (the answer): accuracy 1
    # at the MAP, 0 with any noise, so every midpoint is rejected and sigma is 0
    post.fit(model, [], loss_fn, validation=[[("v", 1.0)]], generator=torch.Generator().manual_seed(0))
    assert post.baseline == 1.0 and post.sigma == 0.0 and all(t["accuracy"] == 0.0 and t["drop"] == 1.0 for t in post.trace)
    with pytest.raises(ValueError, match="validation"):
        post.fit(model, [[("t", 1.0)]], loss_fn)


def test_save_load_round_trip_keeps_sigma_epsilon_and_trace(tmp_path):
    _, b, a = _factors()
    model = _Toy(a, b)
    post = TFB(model, epsilon=0.1, sigma_min=0.0, sigma_max=0.5, steps=4, search_samples=2)
    post.fit(model, [], _quadratic_loss(a.float(), b.float(), []), validation=[[("v", 3.0)]],
             generator=torch.Generator().manual_seed(2))
    assert post.sigma > 0
    post.save(tmp_path / "tfb", metadata={"m": 1})
    config = json.loads((tmp_path / "tfb" / "posterior_config.json").read_text())
    hp = config["hparams"]
    assert config["method"] == "tfb" and hp["sigma"] == post.sigma and hp["epsilon"] == 0.1 and hp["metric"] == "nll"
    assert hp["trace"][0]["sigma"] == 0.5 and hp["expand"] == 6  # the upper bound first (expansion) ...
    rejected = next(i for i, t in enumerate(hp["trace"]) if not t["accepted"])  # ... doubled until rejected,
    assert len(hp["trace"]) == rejected + 1 + 4  # then 4 bisection steps
    assert all(set(t) == {"sigma", "nll", "drop", "accepted"} for t in hp["trace"])
    loaded = load_posterior(tmp_path / "tfb", model=model, expected_metadata={"m": 1})
    assert isinstance(loaded, TFB) and loaded.hparams() == post.hparams()
    for x, y in zip(post.draws(3, torch.Generator().manual_seed(9)), loaded.draws(3, torch.Generator().manual_seed(9))):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError):  # strict: another model's shapes are refused
        load_posterior(tmp_path / "tfb", model=_Toy(torch.zeros(2, 4), torch.zeros(5, 2)))
    with pytest.raises(ValueError, match="TFB"):
        loaded.load_state_dict({A: a.float()})
    with pytest.raises(ValueError, match="lora_A"):
        TFB({"head.weight": (2, 3)})


# ---------------------------------------------------------------- the command line
@pytest.fixture
def data_files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", make_examples(32, 0, "tr")),
            write_jsonl(tmp_path / "test.jsonl", make_examples(16, 1, "te")))


def _args(model_dir, data_files):
    train, test = data_files
    return ["--model", str(model_dir), "--scoring", "cloze", "--data", str(train), "--test-data", str(test), "--shift", "",
            "--epochs", "1", "--swag-epochs", "0", "--members", "1", "--swag-samples", "3", "--batch-size", "8",
            "--lora-r", "2", "--tfb-sigma-min", "0", "--tfb-sigma-max", "0.002", "--tfb-epsilon", "0.01", "--quiet"]


def test_run_with_tfb_and_evaluate_adds_it_to_a_run_without(tmp_path, tiny_model_dir, data_files):
    """``run --methods map,tfb`` fits TFB after training; ``evaluate --methods tfb`` on a run trained without it fits
    the same posterior (same MAP weights, validation data and seeded draws); the validation NLL the search recorded
    for the chosen sigma is the evaluated row's (the search uses the evaluation's draws)."""
    args = _args(tiny_model_dir, data_files)
    with_tfb, without = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--out", str(with_tfb), *args, "--methods", "map,tfb", "--calibrate", "temperature"]) == 0
    assert {p.name for p in (with_tfb / "eval" / "test").iterdir()} == {"zero-shot", "zero-shot+ts", "map", "map+ts", "tfb", "tfb+ts"}
    saved = load_posterior(with_tfb / "members" / "0" / "posteriors" / "tfb")
    hp = saved.hparams()
    assert hp["search_samples"] == 3 and hp["sigma_max"] == 0.002 and hp["expand"] == 6
    assert hp["trace"][0]["sigma"] == 0.002 and 6 <= len(hp["trace"]) <= 11  # the bound tried first, then 5 steps
    assert hp["sigma"] == max([t["sigma"] for t in hp["trace"] if t["accepted"]], default=0.0)
    validation = json.loads((with_tfb / "eval" / "validation" / "tfb" / "metrics.json").read_text())
    chosen = [t for t in hp["trace"] if t["sigma"] == hp["sigma"]]
    if chosen:
        assert validation["nll"] == pytest.approx(chosen[0]["nll"], abs=1e-5)
    else:
        assert hp["sigma"] == 0.0
        map_nll = json.loads((with_tfb / "eval" / "validation" / "map" / "metrics.json").read_text())["nll"]
        assert validation["nll"] == pytest.approx(map_nll, abs=1e-6)

    assert main(["train", "--out", str(without), *args, "--methods", "map"]) == 0
    assert not (without / "members" / "0" / "posteriors" / "tfb").exists()
    assert main(["evaluate", "--run", str(without), "--methods", "tfb"]) == 0
    added = load_posterior(without / "members" / "0" / "posteriors" / "tfb")
    assert added.hparams() == hp
    assert all(torch.equal(added.state_dict()[k], saved.state_dict()[k]) for k in saved.state_dict())
    assert json.loads((without / "eval" / "test" / "tfb" / "metrics.json").read_text())["nll"] == pytest.approx(
        json.loads((with_tfb / "eval" / "test" / "tfb" / "metrics.json").read_text())["nll"], abs=1e-6)


def test_tfb_at_the_blob_mean(tmp_path, tiny_model_dir, data_files, capsys):
    """``tfb-blob``: TFB fitted at a BLoB member's variational mean. ``run --methods map,tfb-blob`` trains the BLoB
    member it needs and fits TFB there: the posterior's point weights are BLoB's mean bit for bit, and its
    sigma = 0 draws are that point. ``evaluate --methods tfb-blob`` on a run without BLoB is refused before the
    model is loaded, naming what is missing; ``evaluate --methods tfb-blob`` on the finished run refits the same."""
    from swaglora.posterior import BLoB

    args = _args(tiny_model_dir, data_files)
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), *args, "--methods", "map,tfb-blob"]) == 0
    posteriors = run / "members" / "0" / "posteriors"
    blob, fitted = load_posterior(posteriors / "blob"), load_posterior(posteriors / "tfb-blob")
    assert isinstance(blob, BLoB) and type(fitted).__name__ == "TFBOnBLoB"
    mean, point = blob.sample(scale=0.0), fitted.state_dict()
    assert set(point) == set(mean) and all(torch.equal(point[k], mean[k]) for k in mean)
    map_weights = load_posterior(posteriors / "map").state_dict()  # not the MAP: BLoB's mean differs from it
    assert any(not torch.equal(map_weights[k], point[k]) for k in point)
    assert (run / "eval" / "test" / "tfb-blob" / "metrics.json").is_file()
    hp = fitted.hparams()
    assert hp["sigma"] == max([t["sigma"] for t in hp["trace"] if t["accepted"]], default=0.0)

    plain = tmp_path / "plain"
    assert main(["train", "--out", str(plain), *args, "--methods", "map"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(plain), "--methods", "tfb-blob"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fitted at the 'blob' posterior" in err[0] and "train the run again with blob" in err[0]
    assert not (plain / "eval").exists()

    import shutil
    shutil.rmtree(posteriors / "tfb-blob")
    assert main(["evaluate", "--run", str(run), "--methods", "tfb-blob"]) == 0
    again = load_posterior(posteriors / "tfb-blob")
    assert again.hparams() == hp and all(torch.equal(again.state_dict()[k], point[k]) for k in point)


@pytest.mark.parametrize("flags, message", [
    (["--tfb-metric", "ece"], "tfb.metric"),
    (["--tfb-sigma-min", "0.5", "--tfb-sigma-max", "0.2"], "sigma_min"),
    (["--tfb-steps", "0"], "tfb.steps"),
    (["--tfb-epsilon", "-1"], "tfb.epsilon"),
])
def test_bad_tfb_flags_are_one_line(tmp_path, tiny_model_dir, data_files, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_args(tiny_model_dir, data_files), "--methods", "tfb", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_evaluate_refuses_to_reuse_a_tfb_fitted_with_other_settings(tmp_path, tiny_model_dir, data_files, capsys, monkeypatch):
    """A TFB saved with the NLL criterion is not silently reused by ``evaluate --tfb-metric accuracy``: a one-line
    error names the flag, the saved and the asked value, before the model is loaded, and nothing is written. The
    same settings (or another sample count) reuse it. The remedy the message gives (a copy of the run without the
    saved TFB) fits a TFB with the accuracy criterion and leaves the original run as it was."""
    import shutil

    from swaglora import members

    args = _args(tiny_model_dir, data_files)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *args, "--methods", "map,tfb"]) == 0
    saved_dir = run / "members" / "0" / "posteriors" / "tfb"
    before = {p.name: p.read_bytes() for p in saved_dir.iterdir()}
    assert json.loads((saved_dir / "posterior_config.json").read_text())["hparams"]["metric"] == "nll"

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as m:
        m.setattr(members, "load_model", forbidden)
        capsys.readouterr()
        for flags, named in ((["--tfb-metric", "accuracy"], "--tfb-metric 'nll' (this command: 'accuracy')"),
                             (["--tfb-epsilon", "0.02"], "--tfb-epsilon 0.01 (this command: 0.02)"),
                             (["--tfb-steps", "2", "--tfb-expand", "0"], "--tfb-steps 5 (this command: 2), --tfb-expand 6 (this command: 0)")):
            assert main(["evaluate", "--run", str(run), "--methods", "tfb", *flags, "--quiet"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and named in err[0] and str(saved_dir) in err[0] and "copy the run" in err[0], err
    assert not (run / "eval").exists()
    assert {p.name: p.read_bytes() for p in saved_dir.iterdir()} == before

    assert main(["evaluate", "--run", str(run), "--methods", "tfb", "--samples", "2", "--quiet"]) == 0  # not a TFB setting
    assert {p.name: p.read_bytes() for p in saved_dir.iterdir()} == before

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "members" / "0" / "posteriors" / "tfb")
    assert main(["evaluate", "--run", str(copy), "--methods", "tfb", "--tfb-metric", "accuracy", "--quiet"]) == 0
    refit = json.loads((copy / "members" / "0" / "posteriors" / "tfb" / "posterior_config.json").read_text())["hparams"]
    assert refit["metric"] == "accuracy" and refit["epsilon"] == 0.01
    assert all("accuracy" in t and "nll" not in t for t in refit["trace"])
    assert {p.name: p.read_bytes() for p in saved_dir.iterdir()} == before
