"""Laplace-LoRA: KFAC against the dense GGN (torch.func), evidence, sampling law, save/load, PEFT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from swaglora.params import trainable_parameters, use_params
from swaglora.posterior import Laplace, get_method, load_posterior


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(n: int, seed: int = 1, d: int = 3, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def loss_fn(model, batch):
    return model(batch[0]), batch[1]


def batched(x, y, size: int):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def fitted(model, x, y, size: int = 2, **kw) -> Laplace:
    post = Laplace(model, dtype="float64", **kw)
    post.fit(model, batched(x, y, size), loss_fn)
    return post


def dense_ggn(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """sum_n J_nᵀ (diag p - p pᵀ) J_n over the flattened ``names`` (in that order), by per-example jacobians."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = 0
    for xi in x:
        f = lambda ps: functional_call(model, {**params, **ps}, (xi[None],))[0]  # noqa: B023, E731
        jac = jacrev(f)({n: params[n] for n in names})
        j = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1)
        p = torch.softmax(f({}), 0)
        total = total + j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
    return total


def factors(post: Laplace, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    k = post.state_dict()
    rebuild = lambda f: k[f"kfac.{weight}.{f}_eigvecs"] @ torch.diag(k[f"kfac.{weight}.{f}_eigvals"]) @ k[f"kfac.{weight}.{f}_eigvecs"].T  # noqa: E731
    return rebuild("A"), rebuild("G")


def kfac_block(post: Laplace, weight: str) -> torch.Tensor:
    """N·(G⊗A) in the order of [W | b] flattened row by row."""
    a, g = factors(post, weight)
    return post.n_data * torch.kron(g, a)


def augmented_order(out: int, inp: int) -> torch.Tensor:
    """Indices into [W.flatten(), b] giving the row-major order of the augmented matrix [W | b]."""
    return torch.tensor([j for o in range(out) for j in [*range(o * inp, (o + 1) * inp), out * inp + o]])


def dense_block(model, x, weight: str, bias: str) -> torch.Tensor:
    out, inp = dict(model.named_parameters())[weight].shape
    h, idx = dense_ggn(model, x, [weight, bias]), augmented_order(out, inp)
    return h[idx][:, idx]


def test_kfac_is_the_exact_ggn_for_one_example():
    model = mlp()
    x, y = data(1)
    post = fitted(model, x, y)
    assert post.layout == {"kron": [["0.weight", "0.bias"], ["2.weight", "2.bias"]], "diag": [], "rows": {}, "prior_mean": []}
    assert post.n_data == 1
    for w, b in post.layout["kron"]:
        dense = dense_block(model, x, w, b)
        assert dense.norm() > 1e-3
        torch.testing.assert_close(kfac_block(post, w), dense, rtol=1e-10, atol=1e-12)


def test_kfac_is_close_for_many_examples_and_does_not_depend_on_batching():
    model = mlp()
    x, y = data(12)
    posts = [fitted(model, x, y, size) for size in (1, 5, 12)]
    for w, _ in posts[0].layout["kron"]:
        for other in posts[1:]:  # per-example weighting inside a batch: batch size changes nothing
            for f1, f2 in zip(factors(posts[0], w), factors(other, w)):
                torch.testing.assert_close(f1, f2, rtol=1e-9, atol=1e-12)
    post = posts[0]
    dense = dense_block(model, x, "2.weight", "2.bias")
    rel = lambda k: float((k - dense).norm() / dense.norm())  # noqa: E731
    assert rel(kfac_block(post, "2.weight")) < 0.1
    a, g = factors(post, "2.weight")
    assert rel(post.n_data * torch.kron(a, g)) > 0.5  # swapped factors: the check has power
    assert rel(torch.kron(g, a)) > 0.5  # without the factor N
    # first layer (behind a nonlinearity): a rougher but still useful approximation
    first = dense_block(model, x, "0.weight", "0.bias")
    assert float((kfac_block(post, "0.weight") - first).norm() / first.norm()) < 0.5


class Positions(nn.Module):
    """Linear map over T positions where only position 0 reaches the logits (the rest is 'padding')."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, x):  # x [B, T, 3]
        return self.lin(x)[:, 0]


def test_positions_without_gradient_are_left_out():
    torch.manual_seed(0)
    model = Positions()
    x, y = data(5)
    padded = torch.cat([x[:, None], 10 * torch.randn(5, 4, 3, dtype=torch.float64)], 1)
    a = Laplace(model, dtype="float64")
    a.fit(model, batched(padded, y, 2), loss_fn)
    b = Laplace(model, dtype="float64")
    b.fit(model, batched(x[:, None], y, 2), loss_fn)
    for f1, f2 in zip(factors(a, "lin.weight"), factors(b, "lin.weight")):
        torch.testing.assert_close(f1, f2, rtol=1e-10, atol=1e-12)


class Head(nn.Module):
    """A raw-parameter linear map, like swaglora.scoring.LetterHead."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w)

    def forward(self, h):
        return h @ self.weight.T


class Squash(nn.Module):
    """A 2-D weight that is not a linear map: must fall back to the diagonal."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w)

    def forward(self, h):
        return torch.tanh(h @ self.weight.T)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.gain = nn.Parameter(1 + 0.3 * r(3))  # elementwise: diagonal
        self.squash = Squash(r(4, 3))
        self.head = Head(r(3, 4))

    def forward(self, x):
        return self.head(self.squash(self.gain * x))


def test_raw_weight_head_is_kfac_and_other_tensors_get_the_exact_diagonal():
    model = Mixed()
    x, y = data(7)
    post = fitted(model, x, y, size=3)
    assert post.layout == {"kron": [["head.weight", None]], "diag": ["gain", "squash.weight"], "rows": {}, "prior_mean": []}
    names = ["gain", "squash.weight"]
    exact = torch.diagonal(dense_ggn(model, x, names))
    got = torch.cat([post.state_dict()[f"diag.{n}"].reshape(-1) for n in names])
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    one = fitted(model, x[:1], y[:1])
    torch.testing.assert_close(kfac_block(one, "head.weight"), dense_ggn(model, x[:1], ["head.weight"]), rtol=1e-10, atol=1e-12)


def dense_log_evidence(post: Laplace, model, lam: float) -> float:
    blocks = [kfac_block(post, w) for w, _ in post.layout["kron"]]
    h = torch.block_diag(*blocks)
    theta = torch.cat([torch.cat([dict(model.named_parameters())[w].detach(), dict(model.named_parameters())[b].detach()[:, None]], 1).reshape(-1)
                       for w, b in post.layout["kron"]])
    d = theta.numel()
    logdet = torch.logdet(h + lam * torch.eye(d, dtype=h.dtype))
    return post.log_likelihood - lam / 2 * float(theta @ theta) + d / 2 * math.log(lam) - float(logdet) / 2


def test_prior_precision_maximises_the_marginal_likelihood():
    model = mlp()
    x, y = data(20)
    post = fitted(model, x, y, size=8)
    lam = post.prior_precision
    assert 0 < lam < math.inf and lam not in (1e-4, 1e8)
    with torch.no_grad():
        assert post.log_likelihood == pytest.approx(float(torch.log_softmax(model(x), 1)[torch.arange(20), y].sum()), rel=1e-12)
    for probe in (lam / 3, lam, 3 * lam):
        assert post.log_evidence(probe) == pytest.approx(dense_log_evidence(post, model, probe), rel=1e-9)
    assert post.log_evidence(lam) > max(post.log_evidence(lam * 1.05), post.log_evidence(lam / 1.05))
    # stationary point: MacKay's lam·||θ||² = effective number of parameters
    e = post._eigenvalues()
    theta_sq = sum(float((p.detach() ** 2).sum()) for p in model.parameters())
    assert lam * theta_sq == pytest.approx(float((e / (e + lam)).sum()), rel=1e-5)
    fixed = fitted(model, x, y, prior_precision=2.5)
    assert fixed.prior_precision == 2.5 and fixed.hparams()["prior_precision"] == 2.5


def test_huge_prior_precision_collapses_to_map():
    model = mlp()
    x, y = data(8)
    post = fitted(model, x, y, prior_precision=1e12)
    with torch.no_grad():
        map_probs = torch.softmax(model(x), 1)
        for theta in post.draws(3, torch.Generator().manual_seed(0)):
            with use_params(model, theta):
                torch.testing.assert_close(torch.softmax(model(x), 1), map_probs, rtol=0, atol=1e-5)
    loose = fitted(model, x, y, prior_precision=1.0)
    with torch.no_grad(), use_params(model, loose.sample(torch.Generator().manual_seed(0))):
        assert (torch.softmax(model(x), 1) - map_probs).abs().max() > 1e-2
    exact = post.sample(torch.Generator().manual_seed(0), scale=0)
    assert all(torch.equal(exact[n], p) for n, p in trainable_parameters(model).items())


def max_z_scores(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    n = samples.shape[0]
    mean_z = np.abs(samples.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    d = np.diag(cov)
    cov_z = np.abs(np.cov(samples, rowvar=False) - cov) / np.sqrt((np.outer(d, d) + cov**2) / n)
    return float(mean_z.max()), float(cov_z.max())


def test_sample_covariance_matches_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2)).double()
    x, y = data(6, d=2, c=2)
    post = fitted(model, x, y, prior_precision=0.5, default_scale=0.7)
    cov = 0.7 * torch.linalg.inv(kfac_block(post, "0.weight") + 0.5 * torch.eye(6, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    draws = [post.sample(g) for _ in range(20000)]
    samples = torch.stack([torch.cat([d["0.weight"], d["0.bias"][:, None]], 1).reshape(-1) for d in draws]).numpy()
    mean = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach().reshape(-1).numpy()
    mean_z, cov_z = max_z_scores(samples, mean, cov.numpy())
    assert mean_z < 5 and cov_z < 5, (mean_z, cov_z)
    assert max(max_z_scores(samples, mean, 2 * cov.numpy())) > 5
    a, gf = factors(post, "0.weight")
    swapped = 0.7 * torch.linalg.inv(post.n_data * torch.kron(a, gf) + 0.5 * torch.eye(6, dtype=torch.float64))
    assert max(max_z_scores(samples, mean, swapped.numpy())) > 5


def test_sampling_uses_only_the_generator_and_last_layer_subset():
    model = mlp()
    x, y = data(6)
    post = fitted(model, x, y, subset="last-layer")
    assert post.layout == {"kron": [["2.weight", "2.bias"]], "diag": [], "rows": {}, "prior_mean": []}
    state = torch.get_rng_state()
    a, b = post.sample(torch.Generator().manual_seed(1)), post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[n], b[n]) for n in a)
    params = trainable_parameters(model)
    assert torch.equal(a["0.weight"], params["0.weight"]) and torch.equal(a["0.bias"], params["0.bias"])
    assert not torch.equal(a["2.weight"], params["2.weight"])
    with pytest.raises(ValueError, match="subset"):
        Laplace(model, subset="first")
    with pytest.raises(RuntimeError, match="before fit"):
        Laplace(model).sample()


def test_save_load_round_trip(tmp_path):
    model = Mixed()
    x, y = data(5)
    post = fitted(model, x, y)
    post.save(tmp_path / "la", metadata={"k": 1})
    loaded = load_posterior(tmp_path / "la", model=model, expected_metadata={"k": 1})
    assert isinstance(loaded, Laplace) and get_method("laplace") is Laplace
    assert loaded.hparams() == post.hparams() and loaded.prior_precision == post.prior_precision
    sa, sb = post.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    da, db = post.draws(2, torch.Generator().manual_seed(4)), loaded.draws(2, torch.Generator().manual_seed(4))
    assert all(torch.equal(p[n], q[n]) for p, q in zip(da, db) for n in p)
    bad = dict(sa)
    del bad["kfac.head.weight.A_eigvals"]
    with pytest.raises(ValueError, match="A_eigvals"):
        loaded.load_state_dict(bad)
    with pytest.raises(ValueError, match="no layout"):
        Laplace(post.parameter_shapes).load_state_dict(sa)


# ---------------------------------------------------------------------- a tiny PEFT LoRA Llama
def tiny_lora_llama(with_head: bool = False):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from swaglora.scoring import LetterHead

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero, which would make lora_A's curvature vanish
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    if with_head:
        base = model.get_base_model()
        base.letter_head = LetterHead(base.lm_head.weight, CHOICES, trainable=True)
    return model


CHOICES = [10, 11, 12, 13]


def llama_loss(model, batch):
    ids, labels = batch
    if hasattr(model.get_base_model(), "letter_head"):
        out = model(input_ids=ids, output_hidden_states=True)
        return model.get_base_model().letter_head(out.hidden_states[-1][:, -1]), labels
    return model(input_ids=ids).logits[:, -1, CHOICES], labels


def llama_batches(n: int = 6, size: int = 3):
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 64, (n, 5), generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(ids[i : i + size], labels[i : i + size]) for i in range(0, n, size)]


def test_peft_lora_llama():
    model = tiny_lora_llama()
    params = trainable_parameters(model)
    post = Laplace(model)
    model.train()
    post.fit(model, llama_batches(), llama_loss)
    assert all(m.training for m in model.modules())  # fit runs in eval mode and restores the mode
    assert [w for w, _ in post.layout["kron"]] == [n for n in params if n.endswith("weight")] and len(params) == 8
    assert post.layout["diag"] == [] and post.n_data == 6 and 0 < post.prior_precision < math.inf
    a, g = factors(post, next(n for n in params if "lora_A" in n))
    assert a.shape == (32, 32) and g.shape == (2, 2) and torch.linalg.eigvalsh(g).max() > 0
    theta = post.sample(torch.Generator().manual_seed(0))
    assert set(theta) == set(params) and all(not torch.equal(theta[n], params[n]) for n in params)
    with torch.no_grad(), use_params(model, theta):
        assert torch.isfinite(llama_loss(model, llama_batches()[0])[0]).all()
    last = Laplace(model, subset="last-layer")
    last.fit(model, llama_batches(), llama_loss)
    assert {w.split(".layers.")[1][0] for w, _ in last.layout["kron"]} == {"1"} and len(last.layout["kron"]) == 4
    theta = last.sample(torch.Generator().manual_seed(0))
    assert all(torch.equal(theta[n], params[n]) for n in params if ".layers.0." in n)


def test_peft_letter_head_is_the_last_layer_and_exact_for_one_example():
    model = tiny_lora_llama(with_head=True)
    post = Laplace(model, subset="last-layer", dtype="float64")
    batch = llama_batches(1, 1)
    post.fit(model, batch, llama_loss)
    head = "base_model.model.letter_head.weight"
    assert post.layout == {"kron": [[head, None]], "diag": [], "rows": {}, "prior_mean": [head]}
    with torch.no_grad():
        h = model(input_ids=batch[0][0], output_hidden_states=True).hidden_states[-1][0, -1].double()
        p = torch.softmax(llama_loss(model, batch[0])[0][0].double(), 0)
    a, g = factors(post, "base_model.model.letter_head.weight")
    torch.testing.assert_close(a, torch.outer(h, h), rtol=1e-5, atol=1e-6)  # logits = W h: GGN = Λ ⊗ h hᵀ
    torch.testing.assert_close(g, torch.diag(p) - torch.outer(p, p), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- linearised (GLM) predictive
def reference_jacobians(model, x, names, absent=None):
    """{name: [N, C, *shape]} by jacrev on one example at a time (no hooks)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = {n: [] for n in names}
    for xi in x:
        jac = jacrev(lambda ps: functional_call(model, {**params, **ps}, (xi[None],))[0])({n: params[n] for n in names})  # noqa: B023
        for n in names:
            out[n].append(jac[n])
    return {n: torch.stack(v) for n, v in out.items()}


def test_per_example_jacobians_match_jacrev_for_linear_maps_and_other_tensors():
    from swaglora.jacobians import per_example_jacobians

    model = Mixed()
    x, _ = data(5)
    logits, jac = per_example_jacobians(model, lambda: model(x), [("head.weight", None)], ["gain", "squash.weight"])
    want = reference_jacobians(model, x, ["head.weight", "gain", "squash.weight"])
    torch.testing.assert_close(logits, model(x).detach())
    for n in want:
        torch.testing.assert_close(jac[n].double(), want[n], rtol=1e-5, atol=1e-6)
    mlp_model = mlp()
    pairs = [("0.weight", "0.bias"), ("2.weight", "2.bias")]

    def masked():  # choice 2 absent for examples 1 and 3
        out = mlp_model(x)
        return out.masked_fill(torch.tensor([[False, False, i in (1, 3)] for i in range(5)]), float("-inf"))

    _, jac = per_example_jacobians(mlp_model, masked, pairs)
    want = reference_jacobians(mlp_model, x, [n for p in pairs for n in p])
    for n in want:
        want[n][[1, 3], 2] = 0
        torch.testing.assert_close(jac[n].double(), want[n], rtol=1e-5, atol=1e-6)


def test_per_example_jacobians_of_a_peft_llama_sum_over_positions():
    from swaglora.jacobians import per_example_jacobians

    model = tiny_lora_llama().eval()
    ids, _ = llama_batches(4, 4)[0]
    params = trainable_parameters(model)
    pairs = [(n, None) for n in params]
    _, jac = per_example_jacobians(model, lambda: llama_loss(model, (ids, None))[0], pairs)
    for i in range(len(ids)):  # one example at a time, one backward pass per choice
        for c in range(len(CHOICES)):
            grads = torch.autograd.grad(llama_loss(model, (ids[i : i + 1], None))[0][0, c], list(params.values()))
            for n, g in zip(params, grads):
                torch.testing.assert_close(jac[n][i, c], g, rtol=1e-4, atol=1e-6)


def test_logit_covariance_is_j_sigma_jt_with_the_dense_kfac_posterior():
    model = mlp()
    x, y = data(9)
    post = fitted(model, x, y, size=4, prior_precision=0.8, default_scale=1.0)
    pairs = [("0.weight", "0.bias"), ("2.weight", "2.bias")]
    assert post.linearization() == (pairs, [])
    want = reference_jacobians(model, x, [n for p in pairs for n in p])
    cov = post.logit_covariance(want, scale=0.6)
    blocks = [kfac_block(post, w) for w, _ in pairs]
    sigma = 0.6 * torch.linalg.inv(torch.block_diag(*blocks) + 0.8 * torch.eye(sum(b.shape[0] for b in blocks), dtype=torch.float64))
    j = torch.cat([torch.cat([want[w], want[b][..., None]], -1).flatten(2) for w, b in pairs], -1)  # [N, C, D] in [W | b] row order
    torch.testing.assert_close(cov, j @ sigma @ j.transpose(1, 2), rtol=1e-9, atol=1e-12)
    mixed = Mixed()
    post = fitted(mixed, x, y, prior_precision=2.0)  # a KFAC head and diagonal leftovers
    jm = reference_jacobians(mixed, x, ["head.weight", "gain", "squash.weight"])
    diag = torch.cat([post.state_dict()[f"diag.{n}"].reshape(-1) for n in ("gain", "squash.weight")])
    sigma = torch.linalg.inv(torch.block_diag(kfac_block(post, "head.weight"), torch.diag(diag)) + 2.0 * torch.eye(12 + 3 + 12, dtype=torch.float64))
    j = torch.cat([jm[n].flatten(2) for n in ("head.weight", "gain", "squash.weight")], -1)
    torch.testing.assert_close(post.logit_covariance(jm), j @ sigma @ j.transpose(1, 2), rtol=1e-9, atol=1e-12)


def test_linearised_predictive_samples_n_f_jsjt_on_the_scorer(tiny_model_dir):
    from swaglora.config import LoraSettings, ModelConfig
    from swaglora.data import MCQExample
    from swaglora.jacobians import per_example_jacobians
    from swaglora.models import add_lora, load_model
    from swaglora.predict import predict_logits, predict_logits_linearized
    from swaglora.scoring import Scorer

    from conftest import make_examples

    lm = load_model(ModelConfig(name=str(tiny_model_dir)))
    model = add_lora(lm.model, LoraSettings(r=2, targets="q_proj,v_proj", layers="all"), seed=0).eval()  # LoRA dropout off
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without Jacobians
        for n, p in trainable_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    scorer = Scorer(model, lm.tokenizer, "cloze")
    examples = [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"])
                for r in make_examples(6, 3)]
    assert len({ex.n_choices for ex in examples}) > 1  # some choices are absent (padding to the widest)
    post = Laplace(model, prior_precision=1.0)
    post.fit(model, [scorer.batch(examples[:3]), scorer.batch(examples[3:])], lambda m, b: (scorer.top(scorer.bottom(b), b), b.labels))
    mean = predict_logits(scorer, examples, [post.mean_params()])[0]
    at_mean = predict_logits_linearized(scorer, examples, post, 3, torch.Generator().manual_seed(0), scale=0.0)
    torch.testing.assert_close(at_mean, mean.expand(3, -1, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(at_mean[0]), torch.isinf(mean))  # absent choices stay -inf
    draws = predict_logits_linearized(scorer, examples, post, 4000, torch.Generator().manual_seed(1), batch_size=4)
    again = predict_logits_linearized(scorer, examples, post, 4000, torch.Generator().manual_seed(1), batch_size=2)
    torch.testing.assert_close(draws, again, rtol=1e-4, atol=1e-4)  # batching does not matter (float32 padding noise)
    k = next(i for i, ex in enumerate(examples) if ex.n_choices == max(e.n_choices for e in examples))
    batch = scorer.batch(examples[k : k + 1])
    with use_params(model, post.mean_params()):
        _, jac = per_example_jacobians(model, lambda: scorer.top(scorer.bottom(batch), batch), *post.linearization())
    cov = post.logit_covariance(jac)[0].double()
    assert torch.linalg.eigvalsh(cov).max() > 1e-4  # a real spread, which the samples must reproduce
    sample, centre = draws[:, k].double().numpy(), mean[k].double().numpy()
    mean_z, cov_z = max_z_scores(sample, centre, cov.numpy())
    assert mean_z < 5 and cov_z < 5, (mean_z, cov_z)
    assert max(max_z_scores(sample, centre, 2 * cov.numpy())) > 5


# ---------------------------------------------------------------------- prior on what fine-tuning moves
class HeadOnOne(nn.Module):
    """The letter head read on a constant hidden state 1 (hidden size 1), logits of the first ``c`` letters."""

    def __init__(self, lm_rows: torch.Tensor, c: int, moved: torch.Tensor):
        super().__init__()
        from swaglora.scoring import LetterHead

        self.c = c
        self.letter_head = LetterHead(lm_rows, list(range(lm_rows.shape[0])), trainable=True)
        with torch.no_grad():
            self.letter_head.weight[:c, 0] += moved  # fine-tuning moved the rows of the letters in use only

    def forward(self, x):
        return self.letter_head(x)[:, : self.c]


def head_posterior(lm_rows: torch.Tensor, c: int, moved: torch.Tensor, n: int = 10) -> tuple[Laplace, HeadOnOne]:
    model = HeadOnOne(lm_rows, c, moved)
    x, y = torch.ones(n, 1, dtype=torch.float64), torch.arange(n) % c
    return fitted(model, x, y, size=4), model


def test_prior_precision_by_hand_on_the_heads_change_from_its_initial_rows():
    """Two letters, hidden state 1: H = N (diag p - p pᵀ) has eigenvalues e = 2 N p(1 - p) and 0, and the prior
    is centred on the initial rows, so the evidence's stationary point is λ s (e + λ) = e with s = ||Δ||²:
    λ = (-e s + sqrt(e² s² + 4 e s)) / (2 s)."""
    lm_rows = torch.tensor([[0.3], [-0.2]], dtype=torch.float64)
    post, _ = head_posterior(lm_rows, 2, torch.tensor([0.5, -0.5], dtype=torch.float64))
    p = torch.sigmoid(torch.tensor(0.8 - (-0.7))).item()
    e, s = 2 * 10 * p * (1 - p), 0.5
    assert post.prior_precision == pytest.approx((-e * s + math.sqrt(e * e * s * s + 4 * e * s)) / (2 * s), rel=1e-6)


def test_prior_precision_ignores_head_rows_without_curvature():
    """26 letter rows with large pretrained values, 3 in use: λ equals that of the 3-row head, and the unused
    rows stay at their MAP value in every draw and add no logit variance."""
    g = torch.Generator().manual_seed(3)
    lm_rows = 3.0 * torch.randn(26, 1, generator=g, dtype=torch.float64)
    moved = torch.tensor([0.4, -0.1, -0.3], dtype=torch.float64)
    full, model = head_posterior(lm_rows, 3, moved)
    trimmed, _ = head_posterior(lm_rows[:3], 3, moved)
    name = "letter_head.weight"
    assert full.layout["rows"] == {name: [0, 1, 2]} and full.layout["prior_mean"] == [name] and trimmed.layout["rows"] == {}
    assert full.prior_precision == pytest.approx(trimmed.prior_precision, rel=1e-9)
    assert full.log_evidence(2.0) == pytest.approx(trimmed.log_evidence(2.0), rel=1e-12)
    mean = model.letter_head.weight.detach()
    for theta in full.draws(4, torch.Generator().manual_seed(0)):
        assert torch.equal(theta[name][3:], mean[3:]) and not torch.equal(theta[name][:3], mean[:3])
    jac = {name: torch.randn(2, 26, 26, 1, generator=g, dtype=torch.float64)}  # [B, C, *shape]
    cov = full.logit_covariance(jac)
    jac[name][:, :, 3:] = 0
    torch.testing.assert_close(cov, full.logit_covariance(jac), rtol=0, atol=0)


def test_saved_posterior_keeps_the_rows_and_the_prior_mean(tmp_path):
    g = torch.Generator().manual_seed(4)
    post, model = head_posterior(2.0 * torch.randn(26, 1, generator=g, dtype=torch.float64), 4, torch.full((4,), 0.2, dtype=torch.float64))
    post.save(tmp_path / "lp")
    loaded = load_posterior(tmp_path / "lp", model=model)
    assert loaded.layout == post.layout and loaded.prior_precision == post.prior_precision
    assert loaded.log_evidence(1.5) == pytest.approx(post.log_evidence(1.5), rel=1e-12)
    a, b = post.sample(torch.Generator().manual_seed(1)), loaded.sample(torch.Generator().manual_seed(1))
    assert all(torch.equal(a[n], b[n]) for n in a)


class RecordingBar:
    """The two calls PassBar makes on a tqdm bar, recorded."""

    def __init__(self):
        self.calls = []

    def reset(self, total=None):
        self.calls.append(("reset", total))

    def update(self, n=1):
        self.calls.append(("update", n))


def test_a_fit_through_the_progress_list_is_the_same_fit_and_counts_each_pass():
    from swaglora.members import PassBar

    model = mlp()
    x, y = data(12)
    plain = fitted(model, x, y, 5)
    bar = RecordingBar()
    post = Laplace(model, dtype="float64")
    batches = batched(x, y, 5)
    post.fit(model, PassBar(batches, bar), loss_fn)
    for w, _ in plain.layout["kron"]:  # the wrapper changes nothing in the fit
        for f1, f2 in zip(factors(plain, w), factors(post, w)):
            torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    assert bar.calls == [("reset", 3)] + [("update", 1)] * 3  # 12 examples in batches of 5: one pass of 3
    again = PassBar(batches, bar)
    for _ in range(2):  # each pass yields the same batches and restarts the bar
        assert all(a is b for a, b in zip(again, batches, strict=True))
    assert bar.calls[4:] == ([("reset", 3)] + [("update", 1)] * 3) * 2
