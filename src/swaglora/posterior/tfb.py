r"""TFB: Training-Free Bayesianization of a trained LoRA adapter.

Shi, Wang, Han, Zhang & Wang 2024, "Training-Free Bayesianization for Low-Rank Adapters of Large Language
Models", https://arxiv.org/abs/2412.05723 ; the authors' code: github.com/Wang-ML-Lab/bayesian-peft,
``modelwrappers/tfblora.py`` (NLL search) and ``modelwrappers/tfblora_acc.py`` (accuracy search).

**The family** (the paper's "low-rank isotropic Gaussian", as the authors' code implements it). For one
adapted layer with the trained :math:`\Delta W = BA` (``lora_B`` :math:`B \in R^{m\times r}`, ``lora_A``
:math:`A \in R^{r\times n}`), take the thin SVD :math:`B = U\,\mathrm{diag}(d)\,V^\top` and write :math:`B' = U\,\mathrm{diag}(d)`,
:math:`A' = V^\top A` (so :math:`B'A' = BA`). B stays deterministic; the entries of :math:`A'` get independent
Gaussian noise, row i with standard deviation :math:`\Omega_{ij} = \sigma_q / d_i` (σ below; ``tfblora.py``,
``_wrap_lora_layer_var_infer``: ``lora_std = beta / (D + 1e-6)`` tiled over the n columns). Then

.. math:: \Delta W_\text{draw} - BA = B'(A'_\text{draw} - A') = \sigma\, U E,\qquad E_{ij} \sim N(0, 1),

i.e. :math:`\mathrm{vec}(\Delta W) \sim N(\mathrm{vec}(BA),\ \sigma^2\, I_n \otimes UU^\top)` (columns of
:math:`\Delta W` independent, each with covariance :math:`\sigma^2 UU^\top`): isotropic noise of one std
:math:`\sigma` inside the r-dimensional column space of B, none outside it. peft multiplies the update by
``alpha / r``; the family is stated for the stored :math:`BA`, and σ is searched, so the factor only rescales σ.

We keep the stored factors (A, B) instead of rewriting them as (A', B'): a draw is
:math:`A + V_k\,\mathrm{diag}(\sigma/d_k)\,E_k` with B unchanged, the same distribution of :math:`BA`.
Directions whose singular value is numerically zero (:math:`d_i \le \max(d)\,\max(m, r)\,\epsilon_\text{float32}`,
the ``matrix_rank`` tolerance; e.g. an all-zero, never trained B) get no noise: B maps them to zero, so the
reference code's ``σ / (d_i + 1e-6)`` only adds rounding noise there. Trainable tensors that are not part of a
``lora_A``/``lora_B`` pair (the letter head) stay at their MAP value.

**The search** (the paper's variance maximisation). σ is the largest value whose predictive loses at most ε
of the MAP's validation performance, found by bisection on ``[sigma_min, sigma_max]``. Each step
evaluates the midpoint: the BMA of ``search_samples`` draws on the validation batches; accepted (drop ≤ ε)
moves the lower end up, rejected moves the upper end down. The result is the largest accepted midpoint;
0 (the MAP itself, whose drop is 0) when none was accepted. Metrics, ``drop`` of :math:`p_\sigma` against the MAP
predictive :math:`p_0` on the validation answers:

* ``nll``: relative increase :math:`(\mathrm{NLL}(p_\sigma) - \mathrm{NLL}(p_0)) / \mathrm{NLL}(p_0)`; the paper's
  scripts use ε = 0.003 (``scripts/tfblora/*.sh``: ``th=0.003``);
* ``accuracy``: absolute decrease :math:`\mathrm{acc}(p_0) - \mathrm{acc}(p_\sigma)`, ε = 0.01
  (``scripts/tfblora_acc/*.sh``: ``th=0.01``).

Search range and steps follow the scripts: ``low = 0.001``, ``high = --bayes-beta 0.015``, ``--iter 5``. That
range was set for LLaMA-scale adapters; in a first check on SmolLM2-135M's the search ended at 0.0141 of 0.015,
near the range's end, where the rule "the largest σ within ε" can be capped by the range instead of by ε. Ours therefore first tries ``high`` and doubles it while it is accepted (``expand``, default 6 doublings, up to
64 × 0.015 ≈ 1; ``expand = 0`` is the paper's fixed range), then bisects between the last accepted and the first
rejected value (:func:`bisect_sigma`).
Where we differ from the reference code, and why: it scores the predictive against the MAP's own predicted
classes on its anchor set; we use the validation split's answers (the performance the tolerance is about). It
takes the absolute change and divides the relative NLL change once more by the number of anchor examples
(which makes ε scale with the set size), and it returns the last *rejected* midpoint; we implement the stated
rule (the largest σ whose drop, a signed loss of performance, is at most ε). A σ that improves the metric
is not a drop.

The draws of every σ come from the same generator state (common random numbers: draw s at σ is σ times draw
s at σ = 1), so the searched curve is a smooth function of σ. The pipeline passes the generator of the member's
weight draws for this method (:func:`swaglora.members.draw_generator`), so with ``search_samples`` equal to
the evaluation's samples the validation metric recorded for the chosen σ is that of the evaluated ``tfb``
row. Only the validation batches are read; the training batches given to :meth:`TFB.fit` are not used.

Saved: the MAP weights (``posterior.safetensors``, as :class:`~swaglora.posterior.map.MAP`); σ, ε, the metric,
the range, the steps, the MAP's validation metric and the search trace (σ tried → metric, drop, accepted) in
``posterior_config.json``'s ``hparams``. The SVD is recomputed from B when loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swaglora import metrics
from swaglora.params import Shapes, use_params
from swaglora.posterior.base import Row, make_generator
from swaglora.posterior.map import MAP

if TYPE_CHECKING:
    from swaglora.config import RunConfig

#: the paper's tolerance per metric (the authors' scripts; see the module docstring)
PAPER_EPSILON = {"nll": 0.003, "accuracy": 0.01}


def bisect_sigma(drop: Callable[[float], float], epsilon: float, low: float, high: float, steps: int,
                 expand: int = 0) -> tuple[float, list[tuple[float, bool]]]:
    """The largest σ accepted (``drop(σ) <= epsilon``) among ``steps`` bisection midpoints of ``[low, high]``,
    or 0.0 when none was; with the trace ``[(σ, accepted), ...]`` in the order tried. Assumes ``drop`` grows
    with σ (more noise, lower performance), as the paper does.

    ``expand`` > 0: first try ``high`` itself and, while it is accepted, double it (at most ``expand`` times),
    so that a range set for another model cannot cap σ below the largest the tolerance allows; the bisection
    then runs between the last accepted and the first rejected value (an accepted bound is a candidate too).
    """
    best, trace = 0.0, []
    for _ in range(expand):
        accepted = drop(high) <= epsilon
        trace.append((high, accepted))
        if not accepted:
            break
        best, low, high = high, high, 2 * high
    for _ in range(steps):
        mid = (low + high) / 2
        accepted = drop(mid) <= epsilon
        trace.append((mid, accepted))
        if accepted:
            best, low = mid, mid
        else:
            high = mid
    return best, trace


def lora_pairs(names: Sequence[str]) -> dict[str, str]:
    """``{lora_A weight name: its lora_B weight name}`` for every peft LoRA pair among ``names``."""
    present = set(names)
    pairs = {}
    for name in names:
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner in present:
                pairs[name] = partner
    return pairs


class TFB(MAP):
    """TFB: the MAP LoRA weights with low-rank isotropic noise of std σ, σ the largest the validation tolerates."""

    name = "tfb"
    default_scale = 1.0
    rows = (Row("tfb", 95, "TFB: training-free Bayesianization, the largest low-rank isotropic noise on the LoRA "
                           "weights the validation metric tolerates"),)

    def __init__(
        self,
        model: nn.Module | Shapes,
        sigma: float = 0.0,
        metric: str = "nll",
        epsilon: float | None = None,
        sigma_min: float = 0.001,
        sigma_max: float = 0.015,
        steps: int = 5,
        expand: int = 6,
        search_samples: int = 4,
        baseline: float | None = None,
        trace: Sequence[Mapping[str, Any]] = (),
        device: str | torch.device | None = None,
        default_scale: float | None = None,
    ) -> None:
        if metric not in PAPER_EPSILON:
            raise ValueError(f"metric must be one of {', '.join(PAPER_EPSILON)}, got {metric!r}")
        epsilon = PAPER_EPSILON[metric] if epsilon is None else float(epsilon)
        if not 0 <= epsilon < math.inf:
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
        if not 0 <= sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 <= sigma_min < sigma_max (finite), got {sigma_min} and {sigma_max}")
        if not 0 <= sigma < math.inf:
            raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
        if steps < 1 or search_samples < 1:
            raise ValueError(f"steps and search_samples must be >= 1, got {steps} and {search_samples}")
        if expand < 0:
            raise ValueError(f"expand must be >= 0, got {expand}")
        self.sigma, self.metric, self.epsilon = float(sigma), metric, epsilon
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.steps, self.expand, self.search_samples = int(steps), int(expand), int(search_samples)
        self.baseline = None if baseline is None else float(baseline)
        self.trace = [dict(t) for t in trace]
        self.default_scale = float(type(self).default_scale if default_scale is None else default_scale)
        self._bases: dict[str, Tensor] = {}
        super().__init__(model, device=device)
        self.pairs = lora_pairs(list(self.parameter_shapes))
        if not self.pairs:
            raise ValueError("TFB needs peft LoRA weights (pairs of '.lora_A.' / '.lora_B.' parameters); none are trainable")

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, tuple[Any, str]]:
        """The run's ``tfb`` section (ε 0 resolved to the paper's for the metric)."""
        t = cfg.tfb
        return {"metric": (t.metric, "tfb.metric"),
                "epsilon": (float(t.epsilon or PAPER_EPSILON[t.metric]), "tfb.epsilon"),
                "sigma_min": (float(t.sigma_min), "tfb.sigma_min"), "sigma_max": (float(t.sigma_max), "tfb.sigma_max"),
                "steps": (int(t.steps), "tfb.steps"), "expand": (int(t.expand), "tfb.expand")}

    @classmethod
    def build(cls, model: nn.Module, cfg: RunConfig) -> TFB:
        """The :meth:`settings`; the search averages as many draws as the row's evaluation (``posterior.samples``).
        That count is recorded (``search_samples``) but not a setting a saved TFB must match: evaluating it with
        more draws (``--samples``) is allowed, as for every sampled row."""
        return cls(model, **{k: v for k, (v, _) in cls.settings(cfg).items()}, search_samples=cls.samples_for(cfg, cls.rows[0]))

    # ------------------------------------------------------------------ the family
    def collect(self, model: nn.Module) -> None:
        super().collect(model)
        self._bases = {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._bases = {}

    def noise_basis(self, a_name: str) -> Tensor:
        r"""``V_k diag(1/d_k)`` (float64, ``[r, k]``) of the SVD of the pair's B, numerically zero directions left
        out: a draw adds ``sigma * noise_basis @ E`` to A, :math:`E \sim N(0, I_{k\times n})`."""
        if a_name not in self._bases:
            b = self.state_dict()[self.pairs[a_name]].detach().double().cpu()
            _, d, vh = torch.linalg.svd(b, full_matrices=False)
            tol = float(d.max()) * max(b.shape) * torch.finfo(torch.float32).eps if d.numel() else 0.0
            keep = d > tol
            self._bases[a_name] = vh.T[:, keep] / d[keep]
        return self._bases[a_name]

    @property
    def is_point_mass(self) -> bool:
        return self.sigma == 0.0

    def draw(self, std: float, generator: torch.Generator) -> dict[str, Tensor]:
        """The MAP weights with noise of std ``std`` on each LoRA pair (in parameter order, one ``[k, n]``
        standard normal block per pair from ``generator``)."""
        weights = super().sample()
        if std == 0.0:
            return weights
        for a_name in self.pairs:
            basis = self.noise_basis(a_name)
            a = weights[a_name]
            e = torch.randn((basis.shape[1], a.shape[1]), generator=generator, dtype=torch.float64, device=generator.device)
            noise = (basis.to(e.device) @ e).to(a.device)
            weights[a_name] = (a.double() + std * noise).to(a.dtype)
        return weights

    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        scale = self.default_scale if scale is None else float(scale)
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        return self.draw(self.sigma * math.sqrt(scale), make_generator(generator))

    # ------------------------------------------------------------------ the search
    def fit(self, model: nn.Module, batches: Any, loss_fn: Any, *, validation: Any = None,
            generator: torch.Generator | None = None) -> None:
        """Choose σ by bisection on the ``validation`` batches only (``batches``, the training data, is not read).

        ``loss_fn(model, batch) -> (logits [B, C], labels [B])``. ``generator`` seeds the search's draws (the same
        state for every σ); None: a fixed seed (0), so a fit is always reproducible.
        """
        validation = list(validation or [])
        if not validation:
            raise ValueError("TFB chooses its noise level on validation data, but no validation batches were given")
        self.collect(model)
        state = (generator if generator is not None else torch.Generator().manual_seed(0)).get_state()
        labels: list[Tensor] = []

        def predictive(std: float) -> Tensor:
            g = torch.Generator()
            g.set_state(state)
            thetas = [self.draw(std, g) for _ in range(self.search_samples if std > 0 else 1)]
            probs = []
            for theta in thetas:
                with use_params(model, theta):
                    parts = [loss_fn(model, batch) for batch in validation]
                width = max(logits.shape[-1] for logits, _ in parts)  # batches may differ in choice count
                probs.append(torch.cat([F.pad(torch.softmax(logits.detach().double(), -1), (0, width - logits.shape[-1]))
                                        for logits, _ in parts]).cpu())
                if not labels:
                    labels.append(torch.cat([y.detach().cpu() for _, y in parts]))
            return torch.stack(probs)

        score = metrics.nll if self.metric == "nll" else metrics.accuracy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                baseline = score(metrics.predictive(predictive(0.0)), labels[0])
                values: dict[float, float] = {}

                def drop(sigma: float) -> float:
                    values[sigma] = score(metrics.predictive(predictive(sigma)), labels[0])
                    return self._drop(baseline, values[sigma])

                sigma, tried = bisect_sigma(drop, self.epsilon, self.sigma_min, self.sigma_max, self.steps, self.expand)
        finally:
            model.train(was_training)
        self.sigma, self.baseline = sigma, baseline
        self.trace = [{"sigma": s, self.metric: values[s], "drop": self._drop(baseline, values[s]), "accepted": ok}
                      for s, ok in tried]

    def _drop(self, baseline: float, value: float) -> float:
        """Performance lost at a σ against the MAP: relative NLL increase, or absolute accuracy decrease."""
        return (value - baseline) / max(baseline, 1e-12) if self.metric == "nll" else baseline - value

    def hparams(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "metric": self.metric, "epsilon": self.epsilon, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "steps": self.steps, "expand": self.expand, "search_samples": self.search_samples,
                "baseline": self.baseline, "trace": self.trace, "default_scale": self.default_scale}


class TFBOnBLoB(TFB):
    """TFB fitted at a BLoB member's variational mean instead of the MAP weights (the paper's TFB on any trained
    LoRA; ``fitted_at``): the noise family and search of :class:`TFB` around the mean of A, B and the head."""

    name = "tfb-blob"
    fitted_at = "blob"
    rows = (Row("tfb-blob", 98, "TFB at the BLoB mean: the largest low-rank isotropic noise around BLoB's variational "
                                "mean the validation metric tolerates"),)
