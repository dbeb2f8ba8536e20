"""BLoB: the KL against torch.distributions, flipout's per-example noise, the KL step, save/load, and a run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from swaglora.config import LoraSettings, ModelConfig, RunConfig, apply_overrides
from swaglora.models import add_lora, load_model
from swaglora.params import trainable_parameters
from swaglora.posterior import BLoB, load_posterior
from swaglora.posterior.blob import BLoBTraining, kl_period, kl_weight
from swaglora.scoring import Scorer


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype="float32"))
    model = add_lora(lm.model, LoraSettings(r=4, targets="q_proj,v_proj", layers="all", dropout=0.0), seed=0)
    Scorer(model, lm.tokenizer, "letter")  # adds the trainable letter head: a non-LoRA point parameter
    return model


def _random_blob(model, seed=0) -> BLoB:
    blob = BLoB(model, prior_sigma=0.3, eps=0.4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    blob.collect(model)
    blob.G = {n: torch.rand(t.shape, generator=g) + 0.1 for n, t in blob.G.items()}
    return blob


def test_variational_part_is_lora_a_only(lora_model):
    blob = BLoB(lora_model)
    names = list(trainable_parameters(lora_model))
    assert blob.variational == [n for n in names if ".lora_A." in n] and len(blob.variational) == 4
    assert any("lora_B" in n for n in names) and any("letter_head" in n for n in names)
    g = torch.cat([t.reshape(-1) for t in blob.G.values()])  # the paper's init, G ~ U(eps/sqrt 2, eps)
    assert g.min() >= 0.05 / math.sqrt(2) and g.max() <= 0.05 and g.std() > 0.003


def test_kl_matches_torch_distributions(lora_model):
    blob = _random_blob(lora_model)
    mean = blob._mean
    expected = sum(kl_divergence(Normal(mean[n].double(), blob.G[n].double() ** 2),
                                 Normal(torch.zeros(()).double(), torch.tensor(0.3, dtype=torch.float64))).sum()
                   for n in blob.variational)
    torch.testing.assert_close(blob.kl(), expected, rtol=1e-12, atol=0)
    assert float(blob.kl()) > 0


def test_kl_weights_are_the_papers_schedule():
    m = 5
    weights = [kl_weight(s, m, True) for s in range(2 * m)]
    assert weights[:m] == pytest.approx([2**i / (2 ** (m + 1) - 1) for i in range(1, m + 1)], rel=1e-15)
    assert weights[m:] == weights[:m]  # the cycle restarts
    assert kl_weight(3, m, False) == 1 / m
    assert 0 < kl_weight(2000, 3000, True) < 1e-300 or kl_weight(2000, 3000, True) == 0.0  # no overflow
    cfg = apply_overrides(RunConfig(), {"train.batch_size": 8, "blob.gamma": 8.0})
    assert kl_period(cfg, 2251, 282) == int(100 * 2251 ** (math.pi / 8) / 8)  # the code's dataset rescaling
    assert kl_period(apply_overrides(cfg, {"blob.gamma": 0.0}), 2251, 282) == 282


def test_flipout_noise_has_the_right_mean_and_variance_and_decorrelates_examples(lora_model):
    """Per example n the layer adds ``s B (dA ⊙ s_n r_n^T) x_n``: mean 0, variance
    ``s^2 sum_k B_ok^2 sum_i sigma_ki^2 x_i^2`` and no correlation between examples. The same z test has the power to
    reject the std G (instead of G^2), and per-token signs would be caught by the correlation of two tokens."""
    blob = _random_blob(lora_model, seed=1)
    name = blob.variational[0]
    blob.G = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.3 for n, t in blob.G.items()}
    training = BLoBTraining(blob, lora_model, RunConfig(), 100)  # with these G (member_training would re-initialise)
    layer, adapter, g = training.layers[0]
    assert name.startswith(next(n for n, m in lora_model.named_modules() if m is layer))
    with torch.no_grad():
        layer.lora_B[adapter].weight.copy_(torch.randn(layer.lora_B[adapter].weight.shape, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(4)).expand(2, 2, -1).contiguous()
    b, scaling = layer.lora_B[adapter].weight, layer.scaling[adapter]
    layer.train()
    with torch.no_grad():
        clean = layer(x)  # without the hook: the mean path
        with training:
            torch.manual_seed(0)
            noise = torch.stack([layer(x) - clean for _ in range(4000)])  # [S, 2 examples, 2 tokens, out]
    n = noise.shape[0]

    def z_scores(sigma):
        var = scaling**2 * (b**2) @ ((sigma**2) @ (x[0, 0] ** 2))  # [out]
        sample = noise[:, 0, 0]
        z_mean = sample.mean(0) / (var / n).sqrt()
        z_var = (sample.var(0) - var) / (var * math.sqrt(2 / (n - 1)))
        return z_mean.abs().max().item(), z_var.abs().max().item()

    z_mean, z_var = z_scores(g**2)
    assert z_mean < 5 and z_var < 5
    assert max(z_scores(g)) > 5  # power: the std parametrised as G would be rejected
    corr_examples = torch.corrcoef(torch.stack([noise[:, 0, 0, 0], noise[:, 1, 0, 0]]))[0, 1]
    corr_tokens = torch.corrcoef(torch.stack([noise[:, 0, 0, 0], noise[:, 0, 1, 0]]))[0, 1]
    assert abs(corr_examples) < 5 / math.sqrt(n)  # examples are decorrelated
    assert corr_tokens > 0.99  # one weight per example: its tokens see the same perturbation
    layer.eval()
    with torch.no_grad(), training:
        assert torch.equal(layer(x), clean)  # eval mode: no noise
    assert not layer._forward_hooks  # the hook is removed on exit


def test_kl_step_has_finite_gradient_and_moves_sigma_towards_the_prior(lora_model):
    cfg = apply_overrides(RunConfig(), {"blob.kl_reweighting": False, "blob.gamma": 0.0, "blob.kl_lr": 1e-4,
                                        "blob.prior_sigma": 0.2})
    for eps, direction in ((0.05, 1), (0.75, -1)):  # sigma = G^2 starts below / above the prior's 0.2
        blob = BLoB(lora_model, prior_sigma=0.2, eps=eps)
        training = blob.member_training(lora_model, cfg, 10, seed=0)
        training.start(1)  # M = 1: the full KL each step
        before = {n: (g**2).clone() for n, g in blob.G.items()}
        start = {n: p.detach().clone() for n, p in trainable_parameters(lora_model).items()}
        with training:
            g0 = blob.G[blob.variational[0]]
            blob.kl({n: trainable_parameters(lora_model)[n] for n in blob.variational}).backward()
            assert g0.grad is not None and torch.isfinite(g0.grad).all() and g0.grad.abs().sum() > 0
            g0.grad = None
            for step in range(20):
                training.after_step(step, 1.0)
        after = blob.sigma()
        for n in blob.variational:
            moved = (after[n] - before[n]) * direction
            assert (moved > 0).all()  # every std moved towards 0.2 ...
            assert ((after[n] - 0.2) * direction <= 1e-6).all()  # ... without overshooting it
        params = trainable_parameters(lora_model)
        a = blob.variational[0]
        assert params[a].abs().sum() < start[a].abs().sum()  # the KL shrinks A's mean towards the prior's 0
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])


def test_sampling_save_and_load_round_trip_strictly(lora_model, tmp_path):
    blob = _random_blob(lora_model, seed=2)
    draws = blob.draws(400, torch.Generator().manual_seed(0))
    a, other = blob.variational[0], next(n for n in blob.parameter_shapes if "lora_B" in n)
    stacked = torch.stack([d[a] for d in draws])
    sigma = blob.G[a] ** 2
    z = (stacked.mean(0) - blob._mean[a]) / (sigma / math.sqrt(400))
    assert z.abs().max() < 5
    assert torch.all(torch.stack([d[other] for d in draws]) == blob._mean[other])  # B is a point estimate
    assert torch.equal(blob.sample(scale=0.0)[a], blob._mean[a])  # blob-mean: A = M

    blob.save(tmp_path / "blob", metadata={"m": 1})
    loaded = load_posterior(tmp_path / "blob", model=lora_model, expected_metadata={"m": 1})
    assert isinstance(loaded, BLoB) and loaded.hparams() == blob.hparams()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in blob.state_dict().items())
    again = loaded.draws(400, torch.Generator().manual_seed(0))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(draws, again) for k in x)
    state = blob.state_dict()
    with pytest.raises(ValueError, match="BLoB"):
        loaded.load_state_dict({k: v for k, v in state.items() if not k.startswith("G/")})
    with pytest.raises(ValueError, match="shape"):
        loaded.load_state_dict({**state, f"G/{a}": torch.zeros(1, 1)})
    config = json.loads((tmp_path / "blob" / "posterior_config.json").read_text())
    assert config["method"] == "blob" and config["hparams"]["variational"] == blob.variational


def _data(tmp_path):
    from conftest import make_examples, write_jsonl

    return (write_jsonl(tmp_path / "train.jsonl", make_examples(32, 0, "tr")),
            write_jsonl(tmp_path / "test.jsonl", make_examples(16, 1, "te")),
            write_jsonl(tmp_path / "shift.jsonl", make_examples(12, 2, "sh")))


@pytest.mark.bf16
def test_run_map_and_blob_end_to_end(tmp_path, tiny_model_dir, capsys):
    from swaglora.cli import main
    from swaglora.io import load_safetensors

    train, test, shift = _data(tmp_path)
    run = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--scoring", "letter", "--data", str(train), "--test-data", str(test),
            "--shift", str(shift), "--epochs", "2", "--swag-epochs", "0", "--batch-size", "8", "--lora-r", "2", "--quiet"]
    assert main(["run", "--out", str(run), *args, "--members", "2", "--methods", "map,blob-mean,blob,blob-ensemble",
                 "--blob-samples", "3", "--blob-eps", "0.3"]) == 0
    member = run / "members" / "0"
    assert (member / "done.json").is_file() and (member / "done-blob.json").is_file()
    assert not (member / "checkpoints-blob").exists() and not (member / "checkpoints").exists()
    log = [json.loads(line) for line in (member / "train_log-blob.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["val_nll"]) for r in log)
    blob = load_posterior(member / "posteriors" / "blob")
    map_weights = load_posterior(member / "posteriors" / "map").sample()
    assert blob.hparams()["eps"] == 0.3 and set(blob.parameter_shapes) == set(map_weights)
    a = blob.variational[0]
    assert not torch.equal(blob._mean[a], map_weights[a])  # its own training run, not the MAP's weights
    initial = BLoB(blob.parameter_shapes, eps=0.3, variational=blob.variational)
    initial.reset(0)  # the init of member 0 (seed 0)
    assert torch.isfinite(blob.G[a]).all() and not torch.equal(blob.G[a], initial.G[a])  # G was trained
    assert (blob.G[a] - initial.G[a]).abs().max() < 0.05  # from that init, a few small steps
    assert load_safetensors(member / "posteriors" / "blob" / "posterior.safetensors").keys() == blob.state_dict().keys()
    metrics = {r: json.loads((run / "eval" / "test" / r / "metrics.json").read_text()) for r in ("blob", "blob-mean", "blob-ensemble")}
    assert metrics["blob"]["n_samples"] == 3 and metrics["blob-mean"]["n_samples"] == 1
    assert metrics["blob-ensemble"]["n_samples"] == 6 and metrics["blob-ensemble"]["n_members"] == 2
    assert (run / "members" / "1" / "posteriors" / "blob" / "posterior.safetensors").is_file()
    assert metrics["blob"]["nll"] != metrics["blob-mean"]["nll"]
    capsys.readouterr()

    # a run trained without BLoB: evaluate cannot fit it post hoc, and says so in one line
    other = tmp_path / "other"
    assert main(["train", "--out", str(other), *args, "--members", "1", "--methods", "map"]) == 0
    assert main(["evaluate", "--run", str(other), "--methods", "blob", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no 'blob' posterior" in err and "Traceback" not in err


@pytest.mark.bf16
def test_blob_training_killed_resumes_bitwise(tmp_path, tiny_model_dir):
    """kill -9 during a member's BLoB training (after its MAP training finished), rerun: the BLoB posterior and
    its training log are bitwise those of an uninterrupted run (LoRA dropout 0.1: flipout and dropout draws
    come from the checkpointed RNG)."""
    import signal

    from swaglora import checkpoint
    from swaglora.cli import main
    from swaglora.io import load_safetensors
    from test_resume import PLAIN, _args, _data_file, _run, _signal_when, _slow

    data = _data_file(tmp_path)
    blob_args = ["--swag-epochs", "0", "--methods", "map,blob", "--checkpoint-every", "1"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(_args(tiny_model_dir, data, reference, *blob_args)) == 0
    args = _args(tiny_model_dir, data, run, *blob_args)
    ckpts = run / "members" / "0" / "checkpoints-blob"
    steps = lambda: checkpoint.steps(ckpts)  # noqa: E731
    rc, _ = _signal_when(_slow(0.15) + args, run, tmp_path, lambda s: 3 <= s < 11, signal.SIGKILL, steps=steps)
    assert rc == -signal.SIGKILL
    member = run / "members" / "0"
    assert (member / "done.json").is_file() and not (member / "posteriors" / "blob").exists()
    rc, err = _run(PLAIN + args, tmp_path, "resume")
    assert rc == 0, err
    assert f"resuming from {ckpts}" in err
    for name in ("blob", "map"):
        got = load_safetensors(member / "posteriors" / name / "posterior.safetensors")
        want = load_safetensors(reference / "members" / "0" / "posteriors" / name / "posterior.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    log = lambda r: (r / "members" / "0" / "train_log-blob.jsonl").read_text()  # noqa: E731
    assert log(run) == log(reference) and not ckpts.exists()


def test_blob_paper_preset_and_bad_flags(tmp_path, capsys):
    from swaglora.cli import main
    from swaglora.presets import PRESETS

    cfg = apply_overrides(RunConfig(), PRESETS["blob-paper"])
    # scripts/blob/blob-llama-all.sh: eps=0.05 beta=0.2 kllr=0.01 gamma=8, --lr 1e-4, 2 GPUs x --batch-size 4,
    # --lora-r 8 --lora-alpha 16 --lora-dropout 0, --max-seq-len 300, --bayes-eval-n-samples-final 10
    assert (cfg.blob.eps, cfg.blob.prior_sigma, cfg.blob.kl_lr, cfg.blob.gamma, cfg.blob.samples) == (0.05, 0.2, 0.01, 8.0, 10)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (1e-4, 8, 8, 16.0, 0.0)
    assert cfg.model.max_length == 300 and cfg.blob.kl_reweighting
    assert (cfg.tfb.sigma_min, cfg.tfb.sigma_max, cfg.tfb.steps, cfg.tfb.expand) == (0.001, 0.015, 5, 0)  # scripts/tfblora
    assert RunConfig().tfb.expand == 6
    for flag, value in (("--blob-eps", "0"), ("--blob-prior-sigma", "-1"), ("--blob-samples", "0"), ("--blob-kl-lr", "-0.1")):
        assert main(["train", "--out", str(tmp_path / "never"), flag, value, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "blob." in err and "Traceback" not in err and not (tmp_path / "never").exists()


def test_data_loss_gradient_reaches_sigma_through_flipout(lora_model, tokenizer):
    """The NLL gradient w.r.t. G (through the flipout path of every LoRA layer) is finite and non-zero, and that
    path leaves the other trainables' gradients to the ordinary forward."""
    from conftest import make_examples
    from swaglora.data import MCQExample

    blob = BLoB(lora_model, eps=0.3)
    training = blob.member_training(lora_model, RunConfig(), 10, seed=0)
    params = trainable_parameters(lora_model)
    with torch.no_grad():  # B != 0, else the noise path B (dA x) has no gradient to G
        for n, p in params.items():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    scorer = Scorer(lora_model, tokenizer, "letter")
    examples = [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"])
                for r in make_examples(4, 3)]
    batch = scorer.batch(examples)
    lora_model.train()
    try:
        with training:
            torch.manual_seed(0)
            loss = torch.nn.functional.cross_entropy(scorer.logits(batch), batch.labels)
            loss.backward()
            grads = [g.grad for g in blob.G.values()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert all(g.abs().sum() > 0 for g in grads)
    finally:
        lora_model.eval()
        lora_model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in params.items():
                if "lora_B" in n:
                    p.zero_()
