"""Evaluation metrics: pure functions of probability tensors.

Conventions
-----------
* Per-sample probabilities have shape ``[S, N, C]`` (``S`` posterior samples, ``N``
  examples, ``C`` = max number of choices); a predictive distribution is ``[N, C]``.
  Questions with fewer than ``C`` choices carry probability exactly 0 in the padded
  slots, so no mask is needed: padded slots never win the argmax, add 0 to the Brier
  score and contribute ``0 * log 0 = 0`` to entropies.
* ``labels`` is an integer tensor ``[N]`` holding the index of the correct choice.
* Inputs may be float32/float64 tensors (anything ``torch.as_tensor`` accepts); all
  computation is float64. Scalar metrics return Python floats, per-example quantities
  return float64 tensors. Invalid inputs raise ``ValueError``.

Definitions (``p`` = predictive ``[N, C]``, ``y`` = labels, natural logs)
-----------------------------------------------------------------------
* predictive:  ``p = mean_s p_s`` (Bayesian model averaging of probabilities).
* accuracy:    ``mean_i [argmax_c p_ic == y_i]`` (ties: lowest index wins).
* nll:         ``mean_i -log max(p_{i,y_i}, 1e-12)``; the clamp caps a zero
  probability on the correct answer at ``-log 1e-12 ~= 27.63`` nats.
* brier:       ``mean_i sum_c (p_ic - onehot(y_i)_c)^2`` (range [0, 2]).
* ece:         ``sum_b (n_b / N) |acc_b - conf_b|`` over ``n_bins`` equal-width bins
  of top-class confidence; bin ``b`` is ``(b/n_bins, (b+1)/n_bins]``, the first bin
  also contains 0, so a confidence of exactly 1.0 falls in the last bin.
* uncertainty: ``total = H[mean_s p_s]``, ``expected = mean_s H[p_s]`` (aleatoric),
  ``mutual_information = max(total - expected, 0)`` (epistemic; >= 0 by Jensen,
  the clamp only removes rounding), with ``H[q] = -sum_c q_c log q_c``.
* OOD detection (OOD = positive class, higher score = more OOD):
  ``auroc`` = P(s_out > s_in) + 0.5 P(s_out == s_in) (Mann-Whitney U);
  ``aupr`` = average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct
  thresholds (as ``sklearn.metrics.average_precision_score``);
  ``fpr_at_tpr`` = fraction of in-distribution scores ``>= t`` where ``t`` is the
  largest threshold flagging at least a fraction ``tpr`` of the OOD examples.
* Selective prediction: examples sorted by confidence, descending (stable sort, so
  ties keep input order). ``risk_coverage`` gives, for k = 1..N, coverage ``k/N`` and
  risk = error rate among the k most confident; ``aurc`` = mean risk over k.
* Intervals: :func:`paired_bootstrap` resamples *questions* with replacement (the same
  resamples for every method and seed, so differences between methods are paired) and
  reports percentile intervals of each metric and of each method's difference to a
  reference method. A resample is a vector of counts ``w`` (how often each question was
  drawn, ``sum w = N``); accuracy, NLL and Brier are then ``sum_i w_i t_i / N`` of their
  per-question terms, and ECE is ``sum_b |sum_{i in b} w_i (hit_i - conf_i)| / N``
  (a question's bin does not depend on the resample), so every resample is exact and the
  whole bootstrap is one matrix product. AURC on a resample is the AURC of the materialised
  resample (the copies of a question are adjacent in the confidence order), computed from
  cumulative counts. :func:`paired_ood_bootstrap` does the same for OOD AUROC, resampling
  the in-distribution and the shift set's questions independently (weighted Mann-Whitney).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "predictive", "accuracy", "nll", "brier", "ece", "reliability_bins", "summarize",
    "entropy", "uncertainty", "auroc", "aupr", "fpr_at_tpr", "risk_coverage", "aurc",
    "accuracy_at_coverage", "abstention_threshold", "selective_risk", "abstention_rule",
    "BOOTSTRAP_METRICS", "bootstrap_counts", "resampled_metrics", "paired_bootstrap",
    "resampled_auroc", "paired_ood_bootstrap",
]

NLL_EPS = 1e-12
SUM_TOL = 1e-3


# --------------------------------------------------------------------------- validation
def _as_tensor(x: Any) -> Tensor:
    """``x`` as a tensor; Python floats become float64 (``torch.as_tensor`` would round them to float32)."""
    if isinstance(x, Tensor):
        return x.detach()
    t = torch.as_tensor(x)
    return torch.as_tensor(x, dtype=torch.float64) if t.is_floating_point() else t


def _float64(x: Any, name: str) -> Tensor:
    t = _as_tensor(x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t


_SHAPES = {1: "[C]", 2: "[N, C]", 3: "[S, N, C]"}


def _probs(probs: Any, ndims: tuple[int, ...] = (2,), name: str = "probs") -> Tensor:
    p = _float64(probs, name)
    if p.dim() not in ndims or p.numel() == 0:
        want = " or ".join(_SHAPES[d] for d in ndims)
        raise ValueError(f"{name} must be a non-empty {want} tensor, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must be finite and non-negative; min value {p.min().item():.6g}")
    err = (p.sum(-1) - 1).abs()
    if (err > SUM_TOL).any():
        idx = tuple(int(i) for i in torch.nonzero(err > SUM_TOL)[0])
        raise ValueError(f"{name} must sum to 1 over the last dim (tol {SUM_TOL}); "
                         f"sum at index {idx} is {p.sum(-1)[idx].item():.6g}")
    return p


def _probs_labels(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    p = _probs(probs)
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if y.shape != p.shape[:1]:
        raise ValueError(f"labels shape {tuple(y.shape)} does not match probs shape "
                         f"{tuple(p.shape)}; expected ({p.shape[0]},)")
    y = y.long()
    bad = (y < 0) | (y >= p.shape[1])
    if bad.any():
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}]; got {y[bad][0].item()}")
    return p, y


def _vector(x: Any, name: str) -> Tensor:
    t = _as_tensor(x)
    t = _float64(t if t.is_floating_point() else t.double(), name)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    return t


def _conf_correct(confidence: Any, correct: Any) -> tuple[Tensor, Tensor]:
    c, k = _vector(confidence, "confidence"), _vector(correct, "correct")
    if c.shape != k.shape:
        raise ValueError(f"confidence shape {tuple(c.shape)} != correct shape {tuple(k.shape)}")
    if ((k != 0) & (k != 1)).any():
        raise ValueError(f"correct must be boolean/0-1; got value {k[(k != 0) & (k != 1)][0].item()}")
    return c, k


# ----------------------------------------------------------------- predictive metrics
def predictive(sample_probs: Any) -> Tensor:
    """Bayesian model average ``mean_s p_s`` of ``[S, N, C]`` probs (``[N, C]`` passes through).

    Returns:
        float64 tensor ``[N, C]``.
    """
    p = _probs(sample_probs, (2, 3), "sample_probs")
    return p.mean(0) if p.dim() == 3 else p


def accuracy(probs: Any, labels: Any) -> float:
    """Top-1 accuracy ``mean_i [argmax_c p_ic == y_i]`` for probs ``[N, C]``, labels ``[N]``."""
    p, y = _probs_labels(probs, labels)
    return (p.argmax(-1) == y).double().mean().item()


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood ``mean_i -log max(p_{i,y_i}, 1e-12)`` (nats)."""
    p, y = _probs_labels(probs, labels)
    return -p.gather(1, y[:, None]).clamp_min(NLL_EPS).log().mean().item()


def brier(probs: Any, labels: Any) -> float:
    """Multiclass Brier score ``mean_i sum_c (p_ic - onehot(y_i)_c)^2``."""
    p, y = _probs_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return (p - onehot).pow(2).sum(-1).mean().item()


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, list]:
    """Per-bin statistics of top-class confidence for reliability diagrams.

    Bin ``b`` covers ``(b/n_bins, (b+1)/n_bins]`` (the first bin also contains 0).

    Returns:
        Dict of lists of length ``n_bins``: ``lower``, ``upper`` (bin edges), ``count``
        (ints), ``confidence`` (mean top-class confidence) and ``accuracy``; the last two
        are ``nan`` for empty bins.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p, y = _probs_labels(probs, labels)
    conf, pred = p.max(-1)
    hit = (pred == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    csum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    asum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, hit)
    return {
        "lower": edges[:-1].tolist(), "upper": edges[1:].tolist(),
        "count": [int(c) for c in count.tolist()],
        "confidence": (csum / count).tolist(), "accuracy": (asum / count).tolist(),
    }


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b/N) |acc_b - conf_b|`` (L1, equal-width bins).

    Uses the binning of :func:`reliability_bins`; for confidences not exactly on a bin
    edge it equals ``torchmetrics`` ``MulticlassCalibrationError(norm='l1')``.
    """
    b = reliability_bins(probs, labels, n_bins)
    n = sum(b["count"])
    return math.fsum(c / n * abs(a - f) for c, a, f in zip(b["count"], b["accuracy"], b["confidence"]) if c)


def summarize(probs: Any, labels: Any) -> dict[str, float | int]:
    """``accuracy``, ``ece``, ``nll``, ``brier`` and ``n`` for ``[N, C]`` or ``[S, N, C]`` probs.

    ``[S, N, C]`` inputs are reduced with :func:`predictive` first.
    """
    p = predictive(probs)
    return {"accuracy": accuracy(p, labels), "ece": ece(p, labels), "nll": nll(p, labels),
            "brier": brier(p, labels), "n": int(p.shape[0])}


# ---------------------------------------------------------------------- uncertainty
def entropy(probs: Any) -> Tensor:
    """Shannon entropy ``-sum_c p_c log p_c`` over the last dim (``0 log 0 = 0``), in nats."""
    return _entropy(_probs(probs, (1, 2, 3)))


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def uncertainty(sample_probs: Any) -> dict[str, Tensor]:
    """Entropy decomposition of ``[S, N, C]`` samples (``[N, C]`` is treated as ``S = 1``).

    Returns:
        Dict of float64 tensors ``[N]``: ``total_entropy`` ``H[mean_s p_s]``,
        ``expected_entropy`` ``mean_s H[p_s]`` (aleatoric) and ``mutual_information``
        ``max(total - expected, 0)`` (epistemic; exactly 0 when ``S = 1``).
    """
    p = _probs(sample_probs, (2, 3), "sample_probs")
    p = p[None] if p.dim() == 2 else p
    total = _entropy(p.mean(0))
    expected = _entropy(p).mean(0)
    return {"total_entropy": total, "expected_entropy": expected,
            "mutual_information": (total - expected).clamp_min(0.0)}


# -------------------------------------------------------------------- OOD detection
def _ood(scores_in: Any, scores_out: Any) -> tuple[Tensor, Tensor]:
    """Sorted (descending) scores and OOD indicator of the pooled set."""
    s_in, s_out = _vector(scores_in, "scores_in"), _vector(scores_out, "scores_out")
    s = torch.cat([s_in, s_out])
    is_out = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)])
    order = torch.sort(s, descending=True, stable=True).indices
    return s[order], is_out[order]


def auroc(scores_in: Any, scores_out: Any) -> float:
    """AUROC with OOD positive: ``P(s_out > s_in) + 0.5 P(s_out == s_in)`` (tie-averaged ranks)."""
    s_in, s_out = _vector(scores_in, "scores_in"), _vector(scores_out, "scores_out")
    s = torch.cat([s_in, s_out])
    _, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    avg_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties averaged
    n_in, n_out = len(s_in), len(s_out)
    u = avg_rank[inv][n_in:].sum() - n_out * (n_out + 1) / 2
    return (u / (n_in * n_out)).item()


def aupr(scores_in: Any, scores_out: Any) -> float:
    """Average precision with OOD positive: ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds."""
    s, pos = _ood(scores_in, scores_out)
    last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # end of each tie group
    tp = pos.cumsum(0)[last]
    k = torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
    recall = tp / tp[-1]
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * tp / k).sum().item()


def fpr_at_tpr(scores_in: Any, scores_out: Any, tpr: float = 0.95) -> float:
    """FPR at the largest threshold ``t`` with ``mean(s_out >= t) >= tpr``: ``mean(s_in >= t)``."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in, s_out = _vector(scores_in, "scores_in"), _vector(scores_out, "scores_out")
    ranked = torch.sort(s_out, descending=True).values
    frac = torch.arange(1, len(ranked) + 1, dtype=torch.float64) / len(ranked)
    t = ranked[int(torch.searchsorted(frac, torch.tensor([tpr], dtype=torch.float64)))]
    return (s_in >= t).double().mean().item()


# -------------------------------------------------------------- selective prediction
def risk_coverage(confidence: Any, correct: Any) -> tuple[Tensor, Tensor]:
    """Risk-coverage curve: coverage ``k/N`` and error rate of the ``k`` most confident, k=1..N.

    Returns:
        ``(coverage, risk)`` float64 tensors of shape ``[N]``.
    """
    c, k = _conf_correct(confidence, correct)
    err = 1 - k[torch.sort(c, descending=True, stable=True).indices]
    n = torch.arange(1, len(c) + 1, dtype=torch.float64)
    return n / len(c), err.cumsum(0) / n


def aurc(confidence: Any, correct: Any) -> float:
    """Area under the risk-coverage curve: mean of the risk over ``k = 1..N``."""
    return risk_coverage(confidence, correct)[1].mean().item()


def accuracy_at_coverage(confidence: Any, correct: Any, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage * N)`` most confident examples, ``0 < coverage <= 1``."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    _, risk = risk_coverage(confidence, correct)
    k = max(1, math.ceil(coverage * len(risk) - 1e-9))  # tolerate e.g. 0.6 * 5 = 3.0000000001
    return 1.0 - risk[k - 1].item()


def selective_risk(confidence: Any, correct: Any, threshold: float) -> tuple[float, float]:
    """``(risk, coverage)`` when predicting only where ``confidence >= threshold``.

    The risk of an empty selection is 0.0 (with coverage 0.0).
    """
    c, k = _conf_correct(confidence, correct)
    keep = c >= threshold
    m = int(keep.sum())
    return ((1 - k[keep]).sum().item() / m if m else 0.0), m / len(c)


def abstention_threshold(confidence: Any, correct: Any, target_risk: float) -> float:
    """Smallest threshold ``t`` with ``selective_risk(confidence, correct, t)[0] <= target_risk``.

    Candidates are the observed confidence values, so the result maximises coverage
    subject to the risk constraint. Returns ``inf`` (abstain on everything) if none works.
    """
    if not 0 <= target_risk <= 1:
        raise ValueError(f"target_risk must be in [0, 1], got {target_risk}")
    c, k = _conf_correct(confidence, correct)
    c, order = torch.sort(c, descending=True)
    k = k[order]
    errs = (1 - k).cumsum(0)
    last = torch.cat([c[1:] != c[:-1], torch.tensor([True])])  # all ties included
    n = torch.arange(1, len(c) + 1, dtype=torch.float64)
    ok = torch.nonzero(last & (errs / n <= target_risk)).flatten()
    return c[ok[-1]].item() if len(ok) else math.inf


def abstention_rule(confidence: Any, correct: Any, target_risk: float) -> dict[str, Any]:
    """The abstention rule for ``target_risk`` chosen on these examples and what it achieves on them:
    ``{"target_risk", "threshold" (None: no threshold reaches the target, abstain on everything), "risk",
    "coverage", "n"}`` from :func:`abstention_threshold` and :func:`selective_risk`."""
    threshold = abstention_threshold(confidence, correct, target_risk)
    risk, coverage = selective_risk(confidence, correct, threshold)
    return {"target_risk": float(target_risk), "threshold": threshold if math.isfinite(threshold) else None,
            "risk": risk, "coverage": coverage, "n": int(_vector(confidence, "confidence").numel())}


# ------------------------------------------------------------------------- intervals
#: Metrics :func:`paired_bootstrap` resamples (lower is better for all but accuracy).
BOOTSTRAP_METRICS = ("accuracy", "ece", "nll", "brier", "aurc")


def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> Tensor:
    """``[n_boot, n]`` float64 counts of ``n_boot`` resamples of ``n`` questions with replacement.

    Drawn from a generator seeded by ``seed`` only, so every method and seed of a comparison
    can be scored on the same resamples.
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (n_boot, n), generator=generator)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n_boot, n, dtype=torch.float64))


def resampled_metrics(probs: Any, labels: Any, counts: Any, n_bins: int = 15) -> dict[str, Tensor]:
    """Each metric of :data:`BOOTSTRAP_METRICS` on every resample given by ``counts`` ``[B, N]``.

    Row ``b`` equals the metric of the materialised resample (question ``i`` repeated
    ``counts[b, i]`` times), computed without materialising it. Returns ``[B]`` tensors.
    """
    p, y = _probs_labels(probs, labels)
    w = _float64(counts, "counts")
    if w.dim() != 2 or w.shape[1] != p.shape[0]:
        raise ValueError(f"counts must be [B, {p.shape[0]}], got shape {tuple(w.shape)}")
    conf, pred = p.max(-1)
    hit = (pred == y).double()
    total = w.sum(1)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(p.shape[0], n_bins, dtype=torch.float64)
    gap[torch.arange(p.shape[0]), bins] = hit - conf
    return {
        "accuracy": w @ hit / total,
        "ece": (w @ gap).abs().sum(1) / total,
        "nll": w @ -p.gather(1, y[:, None]).squeeze(1).clamp_min(NLL_EPS).log() / total,
        "brier": w @ (p - onehot).pow(2).sum(-1) / total,
        "aurc": _resampled_aurc(conf, hit, w),
    }


def _resampled_aurc(conf: Tensor, hit: Tensor, w: Tensor) -> Tensor:
    """:func:`aurc` of each materialised resample ``w`` ``[B, N]``. In the stable descending order of the
    materialised resample the copies of a question are adjacent (same confidence, consecutive positions), so
    its m-th copy sits at position ``n_i + m`` with ``e_i + m * err_i`` errors up to it, ``n_i`` / ``e_i`` being
    the copies / errors of the questions before it."""
    order = torch.sort(conf, descending=True, stable=True).indices
    err, w = 1 - hit[order], w[:, order]
    n_before = w.cumsum(1) - w
    e_before = (w * err).cumsum(1) - w * err
    risk_sum = torch.zeros(w.shape[0], dtype=torch.float64)
    for m in range(1, int(w.max().item()) + 1):
        risk_sum += ((w >= m) * (e_before + m * err) / (n_before + m)).sum(1)
    return risk_sum / w.sum(1)


def resampled_auroc(scores_in: Any, scores_out: Any, counts_in: Any, counts_out: Any) -> Tensor:
    """:func:`auroc` of every pair of resamples, ``counts_in`` ``[B, N_in]`` and ``counts_out`` ``[B, N_out]``
    (question i drawn ``counts[b, i]`` times), without materialising them: the weighted Mann-Whitney statistic
    ``sum_j v_j (W(s_in < s_j) + W(s_in == s_j) / 2) / (sum w * sum v)``. Returns ``[B]``."""
    s_in, s_out = _vector(scores_in, "scores_in"), _vector(scores_out, "scores_out")
    w, v = _float64(counts_in, "counts_in"), _float64(counts_out, "counts_out")
    if w.dim() != 2 or v.dim() != 2 or w.shape != (v.shape[0], len(s_in)) or v.shape[1] != len(s_out):
        raise ValueError(f"counts must be [B, {len(s_in)}] and [B, {len(s_out)}], got {tuple(w.shape)} and {tuple(v.shape)}")
    order = torch.sort(s_in).indices
    ranked = s_in[order]
    cum = torch.cat([w.new_zeros(w.shape[0], 1), w[:, order].cumsum(1)], 1)  # [B, N_in + 1]
    below = cum[:, torch.searchsorted(ranked, s_out, right=False)]
    equal = cum[:, torch.searchsorted(ranked, s_out, right=True)] - below
    return (v * (below + equal / 2)).sum(1) / (w.sum(1) * v.sum(1))


def paired_bootstrap(predictives: dict[str, list[Any]], labels: Any, reference: str | None = None,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """Percentile intervals over resampled questions, paired across methods and pooled over seeds.

    Args:
        predictives: method -> one ``[N, C]`` predictive per seed, all on the same ``N``
            questions (same order) with the same ``labels``.
        reference: the method differences are taken to (``None``: no differences).
        n_boot, level, seed: number of resamples, interval level, resampling seed.

    Returns:
        ``{method: {metric: {"value", "lo", "hi"}, f"{metric}_diff": {"value", "lo", "hi",
        "significant"}}}``. ``value`` is the mean over seeds on the original questions; a
        resample's statistic is the mean over seeds on that resample; a difference is
        ``method - reference`` on the same resample and is ``significant`` when its interval
        excludes 0.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if reference is not None and reference not in predictives:
        raise ValueError(f"reference method {reference!r} is not among {sorted(predictives)}")
    y = torch.as_tensor(labels)
    counts = bootstrap_counts(len(y), n_boot, seed)
    ones = torch.ones(1, len(y), dtype=torch.float64)
    point, boot = {}, {}
    for method, per_seed in predictives.items():
        if not per_seed:
            raise ValueError(f"method {method!r} has no predictions")
        point[method] = {m: torch.stack([resampled_metrics(p, y, ones)[m] for p in per_seed]).mean().item()
                         for m in BOOTSTRAP_METRICS}
        runs = [resampled_metrics(p, y, counts) for p in per_seed]
        boot[method] = {m: torch.stack([r[m] for r in runs]).mean(0) for m in BOOTSTRAP_METRICS}
    return _percentile_intervals(point, boot, reference, BOOTSTRAP_METRICS, level)


def _percentile_intervals(point: dict[str, dict[str, float]], boot: dict[str, dict[str, Tensor]], reference: str | None,
                          keys: tuple[str, ...], level: float) -> dict[str, dict[str, dict[str, float]]]:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in point:
        out[method] = {}
        for m in keys:
            lo, hi = torch.quantile(boot[method][m], q).tolist()
            out[method][m] = {"value": point[method][m], "lo": lo, "hi": hi}
            if reference is not None and method != reference:
                lo, hi = torch.quantile(boot[method][m] - boot[reference][m], q).tolist()
                out[method][f"{m}_diff"] = {"value": point[method][m] - point[reference][m], "lo": lo, "hi": hi,
                                            "significant": bool(lo > 0 or hi < 0)}
    return out


def paired_ood_bootstrap(scores: dict[Any, list[tuple[Any, Any]]], reference: Any = None, n_boot: int = 1000,
                         level: float = 0.95, seed: int = 0) -> dict[Any, dict[str, dict[str, float]]]:
    """Percentile intervals of OOD AUROC over resampled questions, paired across scores and pooled over seeds.

    Args:
        scores: name (any hashable: the report uses ``(method, score)``) -> one ``(scores_in, scores_out)``
            pair per seed, every pair on the same in-distribution and shift questions (same order).
        reference: the name differences are taken to (``None``: no differences).

    The in-distribution questions are resampled with ``bootstrap_counts(N_in, n_boot, seed)`` and the shift
    set's, independently, with ``bootstrap_counts(N_out, n_boot, seed + 1)``; the same resamples for every name
    and seed. Returns ``{name: {"auroc": {"value", "lo", "hi"}, "auroc_diff": {..., "significant"}}}`` as
    :func:`paired_bootstrap`.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if reference is not None and reference not in scores:
        raise ValueError(f"reference score {reference!r} is not among {sorted(scores)}")
    if not scores or any(not pairs for pairs in scores.values()):
        raise ValueError("every score needs (scores_in, scores_out) of at least one seed")
    n_in, n_out = (len(_vector(x, "scores")) for x in next(iter(scores.values()))[0])
    counts_in, counts_out = bootstrap_counts(n_in, n_boot, seed), bootstrap_counts(n_out, n_boot, seed + 1)
    point = {k: {"auroc": sum(auroc(a, b) for a, b in pairs) / len(pairs)} for k, pairs in scores.items()}
    boot = {k: {"auroc": torch.stack([resampled_auroc(a, b, counts_in, counts_out) for a, b in pairs]).mean(0)}
            for k, pairs in scores.items()}
    return _percentile_intervals(point, boot, reference, ("auroc",), level)
