"""Tests for swaglora.metrics against torchmetrics / sklearn / hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from swaglora import metrics as M


def dirichlet(seed: int, shape: tuple[int, ...], alpha: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full(shape, alpha, dtype=torch.float64), generator=g)
    return x / x.sum(-1, keepdim=True)


def labels_for(seed: int, n: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed + 1000))


# ------------------------------------------------------------------- tiny hand example
# p = [[.9,.1],[.65,.35],[.25,.75]], y = [0,1,1]
#   argmax = [0,0,1] -> correct = [T,F,T]                     accuracy = 2/3
#   NLL   = -(log .9 + log .35 + log .75) / 3
#   Brier = ((.1^2+.1^2) + (.65^2+.65^2) + (.25^2+.25^2)) / 3 = (.02+.845+.125)/3 = .33
#   ECE (15 bins of width 1/15): confidences .9, .65, .75 fall in bins 13, 9, 11 (all
#     different), so ECE = (|1-.9| + |0-.65| + |1-.75|) / 3 = 1/3
#   ECE (1 bin): |acc - mean conf| = |2/3 - 2.3/3| = 0.1
TINY_P = torch.tensor([[0.9, 0.1], [0.65, 0.35], [0.25, 0.75]])
TINY_Y = torch.tensor([0, 1, 1])


def test_tiny_hand_example():
    assert M.accuracy(TINY_P, TINY_Y) == pytest.approx(2 / 3)
    assert M.nll(TINY_P, TINY_Y) == pytest.approx(-(math.log(0.9) + math.log(0.35) + math.log(0.75)) / 3, rel=1e-6)
    assert M.brier(TINY_P, TINY_Y) == pytest.approx(0.33, rel=1e-6)
    assert M.ece(TINY_P, TINY_Y) == pytest.approx(1 / 3, rel=1e-6)
    assert M.ece(TINY_P, TINY_Y, n_bins=1) == pytest.approx(0.1, rel=1e-5)
    s = M.summarize(TINY_P, TINY_Y)
    assert set(s) == {"accuracy", "ece", "nll", "brier", "n"}
    assert s["n"] == 3 and isinstance(s["n"], int)
    assert all(isinstance(s[k], float) for k in ("accuracy", "ece", "nll", "brier"))
    assert s["brier"] == pytest.approx(0.33, rel=1e-6)


def test_nll_clamps_zero_probability():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    y = torch.tensor([1, 0])
    assert M.nll(p, y) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)


# ---------------------------------------------------------------- reference libraries
@pytest.mark.parametrize("seed,n,c,alpha", [(0, 500, 4, 1.0), (1, 1000, 5, 0.3), (2, 200, 2, 2.0), (3, 777, 10, 0.1)])
def test_against_torchmetrics(seed, n, c, alpha):
    p = dirichlet(seed, (n, c), alpha)
    y = labels_for(seed, n, c)
    acc = MulticlassAccuracy(num_classes=c, average="micro")(p, y).item()
    ece = MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1")(p, y).item()
    assert M.accuracy(p, y) == pytest.approx(acc, abs=1e-6)  # torchmetrics returns float32
    assert M.ece(p, y) == pytest.approx(ece, abs=1e-6)  # torchmetrics works in float32
    assert M.ece(p.float(), y) == pytest.approx(ece, abs=1e-6)
    # small alphas produce p < 1e-12, where the documented clamp applies
    assert M.nll(p, y) == pytest.approx(F.nll_loss(p.clamp_min(1e-12).log(), y).item(), rel=1e-10)
    if p.gather(1, y[:, None]).min() > 1e-12:
        assert M.nll(p, y) == pytest.approx(F.nll_loss(p.log(), y).item(), rel=1e-10)
    loop = sum(sum((p[i, k].item() - (k == y[i].item())) ** 2 for k in range(c)) for i in range(n)) / n
    assert M.brier(p, y) == pytest.approx(loop, rel=1e-10)


def test_ece_bin_edges():
    # n_bins=4 gives exact edges 0,.25,.5,.75,1. Bins are (lo, hi]; 0.5 belongs to bin 1.
    p = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.8, 0.2], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1])
    b = M.reliability_bins(p, y, n_bins=4)
    assert b["lower"] == [0.0, 0.25, 0.5, 0.75] and b["upper"] == [0.25, 0.5, 0.75, 1.0]
    assert b["count"] == [0, 1, 1, 2]
    assert math.isnan(b["confidence"][0]) and math.isnan(b["accuracy"][0])
    assert b["confidence"][3] == pytest.approx(0.9) and b["accuracy"][3] == pytest.approx(0.5)
    # ECE = 1/4*|1-.5| + 1/4*|0-.75| + 2/4*|.5-.9| = .125 + .1875 + .2
    assert M.ece(p, y, n_bins=4) == pytest.approx(0.5125)


@pytest.mark.parametrize(
    "p,y,ours,tm",
    [
        # confidence 1.0 shares the last bin with .9: |.5 - .95| = .45.  torchmetrics puts 1.0
        # in an extra bin of its own: .5*|0-1| + .5*|1-.9| = .55
        ([[1.0, 0.0], [0.9, 0.1]], [1, 0], 0.45, 0.55),
        # 0.5 is in (.25,.5], 0.6 in (.5,.75]: .5*|0-.5| + .5*|1-.6| = .45.  torchmetrics uses
        # [lo, hi) bins, putting both in [.5,.75): |.5 - .55| = .05
        ([[0.5, 0.5], [0.6, 0.4]], [1, 0], 0.45, 0.05),
    ],
)
def test_ece_edge_convention_differs_from_torchmetrics(p, y, ours, tm):
    """Documented deviation: only for confidences lying exactly on a bin edge (incl. 1.0)."""
    p, y = torch.tensor(p), torch.tensor(y)
    assert M.ece(p, y, n_bins=4) == pytest.approx(ours)
    assert MulticlassCalibrationError(num_classes=2, n_bins=4, norm="l1")(p, y).item() == pytest.approx(tm)


def test_reliability_bins_consistent_with_ece():
    p, y = dirichlet(5, (300, 4), 0.5), labels_for(5, 300, 4)
    b = M.reliability_bins(p, y)
    assert len(b["count"]) == 15 and sum(b["count"]) == 300
    hand = sum(n / 300 * abs(a - c) for n, a, c in zip(b["count"], b["accuracy"], b["confidence"]) if n)
    assert M.ece(p, y) == pytest.approx(hand)


def test_predictive_and_summarize_use_mean_of_probs():
    sp = dirichlet(6, (7, 50, 4), 0.5)
    y = labels_for(6, 50, 4)
    pred = M.predictive(sp)
    assert pred.shape == (50, 4) and pred.dtype == torch.float64
    assert torch.allclose(pred, sp.mean(0))
    assert torch.equal(M.predictive(pred), pred)
    # averaging logits would give a different predictive
    assert not torch.allclose(pred, torch.softmax(sp.log().mean(0), -1))
    assert M.summarize(sp, y) == M.summarize(sp.mean(0), y)


# ---------------------------------------------------------------------- padded choices
def test_padded_slots_match_unpadded_hand_computation():
    g = torch.Generator().manual_seed(7)
    sizes = [3, 4, 3, 3, 4, 4, 3, 4, 3, 4] * 5
    s_samples = 3
    rows = [dirichlet(100 + i, (s_samples, k), 0.7) for i, k in enumerate(sizes)]
    y = torch.tensor([int(torch.randint(0, k, (1,), generator=g)) for k in sizes])
    padded = torch.stack([F.pad(r, (0, 4 - r.shape[1])) for r in rows], dim=1)  # [S, N, 4]
    assert padded.shape == (s_samples, len(sizes), 4)
    preds = [r.mean(0) for r in rows]
    n = len(sizes)
    acc = sum(int(q.argmax()) == int(t) for q, t in zip(preds, y)) / n
    nll = -sum(math.log(q[t]) for q, t in zip(preds, y)) / n
    brier = sum(float(((q - F.one_hot(t, len(q))) ** 2).sum()) for q, t in zip(preds, y)) / n
    s = M.summarize(padded, y)
    assert s["accuracy"] == pytest.approx(acc) and s["nll"] == pytest.approx(nll) and s["brier"] == pytest.approx(brier)
    conf = torch.tensor([float(q.max()) for q in preds])
    hit = torch.tensor([float(int(q.argmax()) == int(t)) for q, t in zip(preds, y)])
    ece = 0.0
    for b in range(15):
        m = (conf > b / 15) & (conf <= (b + 1) / 15)
        if m.any():
            ece += m.sum().item() / n * abs(hit[m].mean().item() - conf[m].mean().item())
    assert s["ece"] == pytest.approx(ece)

    def h(q):
        return -float((q * q.log()).sum())  # unpadded vectors: no zeros

    u = M.uncertainty(padded)
    tot = torch.tensor([h(q) for q in preds], dtype=torch.float64)
    exp = torch.tensor([sum(h(r[j]) for j in range(s_samples)) / s_samples for r in rows], dtype=torch.float64)
    assert torch.allclose(u["total_entropy"], tot) and torch.allclose(u["expected_entropy"], exp)
    assert torch.allclose(u["mutual_information"], tot - exp)


# ------------------------------------------------------------- entropy decomposition
def test_entropy_values():
    assert M.entropy(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(math.log(2))
    assert M.entropy(torch.tensor([[1.0, 0.0]])).tolist() == [0.0]


@pytest.mark.parametrize("seed,s", [(0, 2), (1, 10), (2, 30)])
def test_uncertainty_decomposition(seed, s):
    sp = dirichlet(seed, (s, 200, 5), 0.4)
    u = M.uncertainty(sp)
    assert all(v.shape == (200,) for v in u.values())
    assert torch.allclose(u["total_entropy"], u["expected_entropy"] + u["mutual_information"], atol=1e-12, rtol=0)
    assert (u["mutual_information"] >= 0).all() and (u["mutual_information"] > 1e-3).any()
    assert (u["total_entropy"] <= math.log(5) + 1e-12).all()


def test_mutual_information_zero_cases_and_disagreement():
    p = dirichlet(3, (1, 40, 4))
    assert torch.equal(M.uncertainty(p)["mutual_information"], torch.zeros(40, dtype=torch.float64))
    assert torch.equal(M.uncertainty(p[0])["mutual_information"], torch.zeros(40, dtype=torch.float64))
    same = dirichlet(4, (1, 1000, 4)).expand(7, 1000, 4)
    mi = M.uncertainty(same)["mutual_information"]
    # mean of 7 identical rows is not bit-exact, so total - expected is ~ +-1e-16: clamped at 0
    assert (mi >= 0).all() and mi.max().item() < 1e-12
    dis = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident samples that disagree
    u = M.uncertainty(dis)
    assert u["expected_entropy"].item() == 0.0
    assert u["mutual_information"].item() == pytest.approx(math.log(2))


# ------------------------------------------------------------------------ OOD metrics
def _sk_fpr(s_in, s_out, tpr):
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    fpr, tprs, _ = roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
    return fpr[np.searchsorted(tprs, tpr, side="left")]


@pytest.mark.parametrize("seed", range(6))
def test_ood_against_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(5, 300, size=2)
    s_in = np.round(rng.normal(0, 1, n_in), 1)  # rounding creates many ties
    s_out = np.round(rng.normal(0.7, 1, n_out), 1)
    if seed == 0:
        s_in, s_out = rng.integers(0, 3, n_in).astype(float), rng.integers(1, 4, n_out).astype(float)
    y = np.r_[np.zeros(n_in), np.ones(n_out)]
    s = np.r_[s_in, s_out]
    t_in, t_out = torch.from_numpy(s_in), torch.from_numpy(s_out)
    if seed % 2:  # float32 inputs: compare with sklearn on the same (float32-rounded) values
        t_in, t_out = t_in.float(), t_out.float()
        s = np.r_[t_in.numpy(), t_out.numpy()].astype(np.float64)
    assert M.auroc(t_in, t_out) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.aupr(t_in, t_out) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    for tpr in (0.5, 0.8, 0.95, 1.0):
        assert M.fpr_at_tpr(t_in, t_out, tpr) == pytest.approx(_sk_fpr(s_in, s_out, tpr), abs=1e-12)


def test_ood_extremes():
    a, b = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])
    assert M.auroc(a, b) == 1.0 and M.aupr(a, b) == 1.0 and M.fpr_at_tpr(a, b) == 0.0
    assert M.auroc(b, a) == 0.0 and M.fpr_at_tpr(b, a) == 1.0
    assert M.aupr(b, a) == pytest.approx(average_precision_score([0, 0, 1, 1, 1], [0.5, 0.9, 0.1, 0.2, 0.3]))
    assert M.auroc(torch.ones(4), torch.ones(3)) == 0.5
    # hand: in=[1,2], out=[2,3]: pairs (2>1),(2=2 -> .5),(3>1),(3>2) -> 3.5/4
    assert M.auroc([1.0, 2.0], [2.0, 3.0]) == 0.875
    # 20 OOD scores 1..20: 95% -> 19 flagged -> threshold 2; in-scores >= 2 are {2, 5} of 4
    assert M.fpr_at_tpr([0.0, 1.5, 2.0, 5.0], torch.arange(1.0, 21.0)) == 0.5


# --------------------------------------------------------------- selective prediction
# sorted by confidence: .9 ok, .8 wrong, .7 ok, .6 ok, .5 wrong
#   risk at k=1..5: 0, 1/2, 1/3, 1/4, 2/5 ; AURC = (0+.5+1/3+.25+.4)/5 = 0.29666...
CONF = torch.tensor([0.6, 0.9, 0.5, 0.8, 0.7])
CORRECT = torch.tensor([True, True, False, False, True])


def test_risk_coverage_hand():
    cov, risk = M.risk_coverage(CONF, CORRECT)
    assert torch.allclose(cov, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert torch.allclose(risk, torch.tensor([0, 1 / 2, 1 / 3, 1 / 4, 2 / 5], dtype=torch.float64))
    assert M.aurc(CONF, CORRECT) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25 + 0.4) / 5)
    assert M.aurc(CONF, CORRECT.long()) == M.aurc(CONF, CORRECT.float())


def test_accuracy_at_coverage_hand():
    assert M.accuracy_at_coverage(CONF, CORRECT, 0.2) == 1.0
    assert M.accuracy_at_coverage(CONF, CORRECT, 0.3) == 0.5  # ceil(1.5) = 2
    assert M.accuracy_at_coverage(CONF, CORRECT, 0.6) == pytest.approx(2 / 3)
    assert M.accuracy_at_coverage(CONF, CORRECT, 0.8) == 0.75
    assert M.accuracy_at_coverage(CONF, CORRECT, 1.0) == pytest.approx(0.6)


def test_abstention_threshold_hand():
    assert M.abstention_threshold(CONF, CORRECT, 0.0) == pytest.approx(0.9)
    assert M.abstention_threshold(CONF, CORRECT, 0.25) == pytest.approx(0.6)  # not .8 (risk .5)
    assert M.abstention_threshold(CONF, CORRECT, 0.4) == pytest.approx(0.5)
    assert M.abstention_threshold(CONF, torch.zeros(5), 0.1) == math.inf
    assert M.selective_risk(CONF, CORRECT, math.inf) == (0.0, 0.0)
    risk, cov = M.selective_risk(CONF, CORRECT, 0.6)
    assert risk == pytest.approx(0.25) and cov == pytest.approx(0.8)


@pytest.mark.parametrize("seed", range(8))
def test_abstention_threshold_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    conf = torch.from_numpy(np.round(rng.uniform(0.2, 1.0, n), 2))  # ties
    correct = torch.from_numpy(rng.uniform(size=n) < conf.numpy())
    for target in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        t = M.abstention_threshold(conf, correct, target)
        risk, cov = M.selective_risk(conf, correct, t)
        assert risk <= target
        valid = []  # brute force over every threshold that yields a distinct selected set
        for cand in sorted(set(conf.tolist())) + [math.inf]:
            keep = conf >= cand
            r = (~correct[keep]).sum().item() / keep.sum().item() if keep.any() else 0.0
            assert M.selective_risk(conf, correct, cand) == pytest.approx((r, keep.float().mean().item()))
            if r <= target:
                valid.append((keep.sum().item() / n, cand))
        best_cov = max(c for c, _ in valid)
        assert cov == pytest.approx(best_cov)
        assert t == min(cand for c, cand in valid if c == best_cov)


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: M.accuracy(TINY_P, torch.tensor([0, 1])), "(2,)"),
        (lambda: M.nll(TINY_P, torch.tensor([0, 2, 1])), "got 2"),
        (lambda: M.brier(TINY_P, torch.tensor([0, -1, 1])), "got -1"),
        (lambda: M.ece(TINY_P, torch.tensor([0.0, 1.0, 1.0])), "integer"),
        (lambda: M.ece(torch.tensor([[0.5, 0.4], [0.5, 0.5]]), torch.tensor([0, 1])), "0.9"),
        (lambda: M.nll(torch.tensor([[1.2, -0.2]]), torch.tensor([0])), "non-negative"),
        (lambda: M.accuracy(torch.ones(3, 2, 2) / 2, torch.tensor([0, 1, 0])), "(3, 2, 2)"),
        (lambda: M.predictive(torch.ones(2, 2, 2, 2) / 2), "(2, 2, 2, 2)"),
        (lambda: M.uncertainty(torch.tensor([[[0.7, 0.7]]])), "1.4"),
        (lambda: M.ece(TINY_P, TINY_Y, n_bins=0), "n_bins"),
        (lambda: M.auroc(torch.ones(2, 2), torch.ones(3)), "(2, 2)"),
        (lambda: M.aupr(torch.tensor([]), torch.ones(3)), "(0,)"),
        (lambda: M.fpr_at_tpr(torch.ones(2), torch.ones(3), tpr=1.5), "1.5"),
        (lambda: M.auroc(torch.tensor([0.1, float("nan")]), torch.ones(3)), "NaN"),
        (lambda: M.aurc(CONF, CORRECT[:4]), "(4,)"),
        (lambda: M.aurc(CONF, torch.tensor([1, 0, 2, 1, 0])), "2"),
        (lambda: M.accuracy_at_coverage(CONF, CORRECT, 0.0), "0.0"),
        (lambda: M.abstention_threshold(CONF, CORRECT, -0.1), "-0.1"),
    ],
)
def test_validation_errors(call, fragment):
    with pytest.raises(ValueError) as e:
        call()
    assert fragment in str(e.value)


def test_accepts_float32_and_float64_equally():
    p, y = dirichlet(9, (100, 3)), labels_for(9, 100, 3)
    s64, s32 = M.summarize(p, y), M.summarize(p.float(), y)
    for k in ("accuracy", "ece", "nll", "brier"):
        assert s32[k] == pytest.approx(s64[k], abs=1e-5)


# ------------------------------------------------------------------ paired bootstrap
def _random_predictive(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), -1), torch.randint(c, (n,), generator=g)


def test_resampled_metrics_equal_the_metrics_of_the_materialised_resample():
    p, y = _random_predictive(50, 4, 0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(50, (3, 50), generator=g)
    counts = torch.stack([torch.bincount(i, minlength=50) for i in idx]).double()
    got = M.resampled_metrics(p, y, counts)
    for b in range(3):
        q, t = p[idx[b]], y[idx[b]]
        tm = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(q.float(), t).item()
        assert got["ece"][b].item() == pytest.approx(tm, abs=1e-5)  # independent oracle
        assert got["ece"][b].item() == pytest.approx(M.ece(q, t), abs=1e-12)
        assert got["accuracy"][b].item() == pytest.approx(M.accuracy(q, t), abs=1e-12)
        assert got["nll"][b].item() == pytest.approx(M.nll(q, t), abs=1e-12)
        assert got["brier"][b].item() == pytest.approx(M.brier(q, t), abs=1e-12)
        conf, hit = q.max(-1).values, (q.argmax(-1) == t).double()
        assert got["aurc"][b].item() == pytest.approx(M.aurc(conf, hit), abs=1e-12)


def test_resampled_aurc_with_tied_confidences_and_by_hand():
    # confidences .9 (right), .6 (wrong), .6 (right); resample counts [2, 0, 1]: the materialised resample is
    # .9 R, .9 R, .6 R -> risks 0, 0, 0 -> AURC 0; counts [0, 2, 1] -> .6 W, .6 W, .6 R (ties in input order)
    # -> risks 1, 1, 2/3 -> AURC 8/9; counts [1, 1, 1] -> .9 R, .6 W, .6 R -> 0, 1/2, 1/3 -> 5/18
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    counts = torch.tensor([[2, 0, 1], [0, 2, 1], [1, 1, 1]], dtype=torch.float64)
    assert M.resampled_metrics(p, y, counts)["aurc"].tolist() == pytest.approx([0.0, 8 / 9, 5 / 18], abs=1e-15)
    # many ties: equal to aurc of the materialised resample in question order (repeat_interleave keeps it)
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randint(0, 3, (60, 3), generator=g).double(), -1)  # few distinct confidences
    y = torch.randint(3, (60,), generator=g)
    counts = M.bootstrap_counts(60, 5, seed=2)
    got = M.resampled_metrics(p, y, counts)["aurc"]
    for b in range(5):
        idx = torch.repeat_interleave(torch.arange(60), counts[b].long())
        q, t = p[idx], y[idx]
        assert got[b].item() == pytest.approx(M.aurc(q.max(-1).values, (q.argmax(-1) == t).double()), abs=1e-12)


def test_resampled_auroc_against_weighted_sklearn_with_ties():
    g = torch.Generator().manual_seed(4)
    s_in = torch.round(torch.randn(80, generator=g, dtype=torch.float64) * 2) / 2  # ties within and across sets
    s_out = torch.round((torch.randn(50, generator=g, dtype=torch.float64) + 0.7) * 2) / 2
    w, v = M.bootstrap_counts(80, 6, seed=0), M.bootstrap_counts(50, 6, seed=1)
    got = M.resampled_auroc(s_in, s_out, w, v)
    for b in range(6):
        y = np.r_[np.zeros(80), np.ones(50)]
        oracle = roc_auc_score(y, np.r_[s_in.numpy(), s_out.numpy()], sample_weight=np.r_[w[b].numpy(), v[b].numpy()])
        assert got[b].item() == pytest.approx(oracle, abs=1e-12)
    ones = M.resampled_auroc(s_in, s_out, torch.ones(1, 80, dtype=torch.float64), torch.ones(1, 50, dtype=torch.float64))
    assert ones.item() == pytest.approx(M.auroc(s_in, s_out), abs=1e-15)
    with pytest.raises(ValueError, match="counts must be"):
        M.resampled_auroc(s_in, s_out, w[:, :10], v)


def test_paired_ood_bootstrap_pairs_scores_and_pools_seeds():
    g = torch.Generator().manual_seed(5)
    s_in, s_out = torch.randn(300, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64) + 0.6
    noisy_in = s_in + 2 * torch.randn(300, generator=g, dtype=torch.float64)
    noisy_out = s_out + 2 * torch.randn(200, generator=g, dtype=torch.float64)
    out = M.paired_ood_bootstrap({"map": [(s_in, s_out)], "exp": [(s_in.exp(), s_out.exp())],
                                  "noisy": [(noisy_in, noisy_out)], "pooled": [(s_in, s_out), (noisy_in, noisy_out)]},
                                 reference="map", n_boot=500)
    # a monotone transform ranks alike on every resample: exactly no difference
    assert out["exp"]["auroc_diff"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    assert out["map"]["auroc"]["value"] == pytest.approx(M.auroc(s_in, s_out), abs=1e-15)
    assert out["map"]["auroc"]["lo"] < out["map"]["auroc"]["value"] < out["map"]["auroc"]["hi"]
    noisy = out["noisy"]["auroc_diff"]
    assert noisy["value"] < 0 and noisy["hi"] < 0 and noisy["significant"]  # noise hides the shift
    pooled = out["pooled"]["auroc"]["value"]
    assert pooled == pytest.approx((M.auroc(s_in, s_out) + M.auroc(noisy_in, noisy_out)) / 2, abs=1e-15)
    with pytest.raises(ValueError, match="reference score 'swag'"):
        M.paired_ood_bootstrap({"map": [(s_in, s_out)]}, reference="swag")


def test_ood_bootstrap_spread_matches_the_sampling_spread_of_auroc():
    """The bootstrap's standard deviation of AUROC estimates its sampling standard deviation: over 300 fresh
    datasets of 150 in / 100 out Gaussian scores (shift 1), AUROC's std is about 0.035; the bootstrap of one
    dataset must agree within 25% (at this size the bootstrap std itself varies by about 10%)."""
    g = torch.Generator().manual_seed(6)
    fresh = torch.tensor([M.auroc(torch.randn(150, generator=g, dtype=torch.float64),
                                  torch.randn(100, generator=g, dtype=torch.float64) + 1) for _ in range(300)])
    s_in, s_out = torch.randn(150, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64) + 1
    boot = M.resampled_auroc(s_in, s_out, M.bootstrap_counts(150, 2000, seed=0), M.bootstrap_counts(100, 2000, seed=1))
    assert 0.02 < fresh.std().item() < 0.05
    assert boot.std().item() == pytest.approx(fresh.std().item(), rel=0.25)


def test_bootstrap_counts_are_resamples_and_seeded():
    counts = M.bootstrap_counts(7, 500, seed=3)
    assert counts.shape == (500, 7) and (counts.sum(1) == 7).all() and (counts >= 0).all()
    assert torch.equal(counts, M.bootstrap_counts(7, 500, seed=3))
    assert not torch.equal(counts, M.bootstrap_counts(7, 500, seed=4))
    # each question is drawn Binomial(7, 1/7) times: mean 1, variance 6/7
    assert counts.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert counts.var().item() == pytest.approx(6 / 7, abs=0.08)


def test_bootstrap_interval_of_accuracy_matches_the_hand_computed_distribution():
    # 4 questions, 3 answered correctly: a resample's accuracy is K/4 with K ~ Binomial(4, 3/4), so
    # P(K <= 0) = 1/256, P(K <= 1) = 13/256 = 5.1%, P(K <= 3) = 175/256 = 68.4%: the 2.5% quantile is
    # 1/4 and the 97.5% quantile is 1; the bootstrap variance is (3/4)(1/4)/4 = 0.046875.
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    out = M.paired_bootstrap({"map": [p]}, y, n_boot=20000, seed=0)["map"]["accuracy"]
    assert out["value"] == 0.75 and out["lo"] == 0.25 and out["hi"] == 1.0
    acc = M.resampled_metrics(p, y, M.bootstrap_counts(4, 20000, seed=0))["accuracy"]
    assert acc.mean().item() == pytest.approx(0.75, abs=0.01)
    assert acc.var().item() == pytest.approx(0.046875, rel=0.05)


def test_paired_differences_and_pooling_over_seeds():
    p, y = _random_predictive(400, 4, 5)
    tempered = torch.softmax(p.log() / 2, -1)  # the same ranking, flatter: a different NLL on every question
    out = M.paired_bootstrap({"map": [p, p], "same": [p, p], "flat": [tempered, tempered]}, y, reference="map", n_boot=400)
    same = out["same"]
    for m in M.BOOTSTRAP_METRICS:
        assert same[f"{m}_diff"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
        assert out["same"][m] == out["map"][m]
    assert "accuracy_diff" not in out["map"]
    # same argmax on every question: the accuracy difference is exactly 0 on every resample
    assert out["flat"]["accuracy_diff"]["lo"] == out["flat"]["accuracy_diff"]["hi"] == 0.0
    diff = out["flat"]["nll_diff"]
    assert diff["value"] == pytest.approx(M.nll(tempered, y) - M.nll(p, y), abs=1e-12)
    assert diff["lo"] <= diff["value"] <= diff["hi"] and diff["significant"]
    # pairing: the paired interval of the difference is narrower than the two marginal intervals combined
    width = lambda d: d["hi"] - d["lo"]  # noqa: E731
    assert width(diff) < width(out["flat"]["nll"]) + width(out["map"]["nll"])
    # pooling: the value is the mean over seeds
    pooled = M.paired_bootstrap({"map": [p, tempered]}, y, reference=None, n_boot=50)["map"]["nll"]["value"]
    assert pooled == pytest.approx((M.nll(p, y) + M.nll(tempered, y)) / 2, abs=1e-12)


def test_paired_bootstrap_validation():
    p, y = _random_predictive(10, 3, 0)
    with pytest.raises(ValueError, match="reference method 'map'"):
        M.paired_bootstrap({"swag": [p]}, y, reference="map")
    with pytest.raises(ValueError, match="level"):
        M.paired_bootstrap({"map": [p]}, y, level=1.5)


def test_python_floats_keep_float64_precision():
    """A list of Python floats (e.g. confidences read back from predictions.jsonl) is not rounded to float32."""
    confidence = [0.3021935323874156, 0.2]
    assert M.abstention_threshold(confidence, [True, False], 0.0) == 0.3021935323874156
    assert M.selective_risk(confidence, [True, False], 0.3021935323874156) == (0.0, 0.5)
