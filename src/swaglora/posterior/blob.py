r"""BLoB: Bayesian Low-Rank Adaptation by Backpropagation, a variational posterior trained with the LoRA.

Wang, Shi, Han, Metaxas & Wang, NeurIPS 2024, https://arxiv.org/abs/2406.11675 (Sec. 3: asymmetric
Bayesianization, the parametrisation of the variational std, the closed-form KL, Flipout); every detail below
was read in the authors' code, github.com/Wang-ML-Lab/bayesian-peft ``modelwrappers/blob.py`` (cited as
"code"), with the defaults of ``scripts/blob/blob-llama-all.sh``. (Equation numbers of the paper are not cited:
they could not be checked offline; the formulas are stated here in full.)

**Family.** For each LoRA layer :math:`\Delta W = s\,BA` (peft's ``scaling`` s) only :math:`A` is random,
entrywise independent: :math:`q(A) = \mathcal N(M, \Omega^{2})` with the std parametrised as
:math:`\Omega = G \odot G` (code: ``lora_A_rho ** 2`` for ``bayes_eps >= 0``, the branch the paper's scripts use;
the softplus branch for a negative eps is not offered). :math:`B` and every other trainable tensor (our letter
head) are point estimates. Prior :math:`p(A) = \mathcal N(0, \sigma_p^2 I)`, :math:`\sigma_p` = ``bayes_beta``
(0.2). Per entry (code ``div_posterior_prior``, here in float64 without its +1e-6 guards)::

    KL(N(mu, sigma^2) || N(0, sigma_p^2)) = log(sigma_p / sigma) + (sigma^2 + mu^2) / (2 sigma_p^2) - 1/2

**Initialisation.** :math:`M` = peft's kaiming init of ``lora_A`` (:func:`swaglora.models.init_lora`, the
member's seed), :math:`B = 0`, :math:`G \sim U(\varepsilon/\sqrt2, \varepsilon)` (code ``_wrap_lora_layer``;
:math:`\varepsilon` = ``bayes_eps`` 0.05), drawn from a generator seeded by (member seed, "blob").

**Training** (code ``BLoB.fit``), one member per seed, the whole run (not post hoc):

* the data NLL goes through a Flipout forward (Wen et al. 2018, https://arxiv.org/abs/1803.04386): per
  forward pass one :math:`E \sim \mathcal N(0, I)`, :math:`\Delta A = \Omega \odot E`, and per example n random
  signs :math:`r_n \in \{\pm1\}^{in}`, :math:`s_n \in \{\pm1\}^{r}`; the layer adds
  :math:`s\,B\,(s_n \odot (\Delta A\,(r_n \odot x_n)))`, i.e. the perturbation
  :math:`\Delta A \odot s_n r_n^\top` of example n, whose entries are :math:`\mathcal N(0, \Omega^2)` and
  uncorrelated between examples. It costs two rank-r products per layer, never a per-example weight. The
  code draws the signs per *token*; here they are per example (a sequence sees one weight, as a draw of A
  does at prediction). The noise path applies the LoRA dropout again, with its own mask, as the code does.
  AdamW updates :math:`M`, :math:`B` and the head on this NLL (the loop's optimiser, schedule and epochs);
* after each AdamW step, a plain-SGD step of rate ``kl_lr`` (code ``opt2``, on the same warm-up/linear-decay
  schedule) on :math:`\pi_i\,KL(q\|p)` for :math:`M` and :math:`G`; :math:`G` also takes its NLL gradient in
  this step (the code's ``opt2`` holds ``lora_A_rho``, its AdamW does not);
* KL weight (code ``bayes_klreweighting``): :math:`\pi_i = 2^i / (2^{M+1} - 1)` at the i-th step
  (i = 1..M) of each cycle of M optimiser steps (the code's increasing variant of Blundell et al. 2015,
  https://arxiv.org/abs/1505.05424, Eq. 9), else :math:`1/M`; with ``bayes_datasetrescaling``
  :math:`M = \lfloor 100\,N^{\pi/\gamma} / b \rfloor` for N training examples and b examples per optimiser
  step (the code's per-device batch times processes), else M = steps per epoch.

The loop's choice of the best-validation epoch (validated at the mean) applies to :math:`G` too.

**Prediction.** ``sample()`` draws :math:`A = M + \sqrt{scale}\,\Omega \odot Z` (one draw of A for every
example, as the code's ``forward_logits`` with n samples), the rest at its point value; the ``blob`` row
averages ``blob.samples`` (the paper's 10, ``bayes_eval_n_samples_final``) draws; ``blob-mean`` is
:math:`A = M` (scale 0, the code's ``--bayes-inference-notsample``); ``blob-ensemble`` is the equal-weight
mixture of every member's ``blob`` predictive.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from swaglora import distributed
from swaglora.params import Shapes, trainable_parameters
from swaglora.posterior.base import Posterior, Row, check_state_shapes, make_generator

if TYPE_CHECKING:
    from swaglora.config import RunConfig

_MARK = ".lora_A."  # peft's name of a LoRA layer's A: <module>.lora_A.<adapter>.weight


def kl_divergence(mean: Tensor, sigma: Tensor, prior_sigma: float) -> Tensor:
    """Summed ``KL(N(mean, sigma^2) || N(0, prior_sigma^2))`` over the entries, in float64."""
    mean, sigma = mean.double(), sigma.double()
    return (math.log(prior_sigma) - sigma.log() + (sigma**2 + mean**2) / (2 * prior_sigma**2) - 0.5).sum()


def kl_weight(step: int, period: int, reweighting: bool) -> float:
    """The KL weight of optimiser step ``step`` (0-based): ``2^i / (2^(M+1) - 1)`` with ``i = step % M + 1``, or ``1/M``."""
    if not reweighting:
        return 1.0 / period
    i = step % period + 1
    return math.ldexp(1.0, i - period - 1) / (1.0 - math.ldexp(1.0, -period - 1))


def kl_period(cfg: RunConfig, n_train: int, steps_per_epoch: int) -> int:
    """M, the length of a KL re-weighting cycle in optimiser steps (see the module docstring)."""
    if cfg.blob.gamma == 0:
        return max(1, steps_per_epoch)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, int(100 * n_train ** (math.pi / cfg.blob.gamma) / per_step))


class BLoB(Posterior):
    """BLoB: Gaussian LoRA A (learned mean and std G^2), point B and head, trained as its own member."""

    name = "blob"
    trains_own_member = True
    default_scale = 1.0
    rows = (
        Row("blob-mean", 95, "BLoB at the variational mean of A (no sampling)", scale=0.0, sampled=False),
        Row("blob", 96, "BLoB: variational Gaussian LoRA A trained by backprop (flipout), BMA over draws of A"),
        Row("blob-ensemble", 97, "ensemble of the members' BLoB posteriors", all_members=True),
    )

    def __init__(
        self,
        model: nn.Module | Shapes,
        prior_sigma: float = 0.2,
        eps: float = 0.05,
        variational: list[str] | None = None,
        device: str | torch.device = "cpu",
        default_scale: float | None = None,
    ) -> None:
        super().__init__(model)
        if not (prior_sigma > 0 and eps > 0):
            raise ValueError(f"prior_sigma and eps must be > 0, got {prior_sigma} and {eps}")
        if variational is None:
            variational = [n for n in self.parameter_shapes if _MARK in n]
        unknown = [n for n in variational if n not in self.parameter_shapes]
        if not variational or unknown:
            raise ValueError(f"BLoB needs LoRA A matrices among the trainable parameters (names with '{_MARK}'); "
                             f"{'unknown: ' + ', '.join(unknown) if unknown else 'there are none'}")
        self.prior_sigma, self.eps, self.variational = float(prior_sigma), float(eps), list(variational)
        self.device = torch.device(device)
        self.default_scale = float(type(self).default_scale if default_scale is None else default_scale)
        self._mean: dict[str, Tensor] | None = None
        self.G: dict[str, Tensor] = {}
        self.reset(0)

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, tuple[Any, str]]:
        return {"prior_sigma": (float(cfg.blob.prior_sigma), "blob.prior_sigma"), "eps": (float(cfg.blob.eps), "blob.eps")}

    @classmethod
    def samples_for(cls, cfg: RunConfig, row: Row) -> int:
        return cfg.blob.samples if row.sampled else 1

    def reset(self, seed: int) -> None:
        """The paper's init of the std parameters, ``G ~ U(eps/sqrt(2), eps)``, from a generator seeded by (seed, "blob")."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{self.name}/init".encode()))
        low = self.eps / math.sqrt(2)
        self.G = {n: (low + (self.eps - low) * torch.rand(self.parameter_shapes[n], generator=generator)).to(self.device)
                  for n in self.variational}

    def sigma(self) -> dict[str, Tensor]:
        """The std of every variational entry, ``G ** 2``."""
        return {n: g**2 for n, g in self.G.items()}

    def kl(self, means: Mapping[str, Tensor] | None = None) -> Tensor:
        """KL(q || p) summed over every variational entry (float64), at ``means`` (default: the collected mean)."""
        means = self._require_mean("kl") if means is None else means
        return sum(kl_divergence(means[n], g.double() ** 2, self.prior_sigma) for n, g in self.G.items())

    def collect(self, model: nn.Module) -> None:
        """Take the model's trainable weights as the variational means (A) and point values (the rest)."""
        self._mean = {n: p.detach().to(self.device, copy=True) for n, p in self._read(model).items()}

    def _require_mean(self, what: str) -> dict[str, Tensor]:
        if self._mean is None:
            raise RuntimeError(f"BLoB.{what}() called before collect(model) or load_state_dict()")
        return self._mean

    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        mean = self._require_mean("sample")
        scale = self.default_scale if scale is None else float(scale)
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be finite and >= 0, got {scale}")
        draw = {n: m.clone() for n, m in mean.items()}
        if scale == 0:
            return draw
        g = make_generator(generator)
        for n in self.variational:  # in recorded order: the draws are a function of the generator only
            z = torch.randn(self.parameter_shapes[n], generator=g, dtype=torch.float32, device=g.device).to(self.device)
            draw[n] = (mean[n] + math.sqrt(scale) * self.G[n].detach().to(self.device) ** 2 * z).to(mean[n].dtype)
        return draw

    def member_training(self, model: nn.Module, cfg: RunConfig, n_train: int, seed: int) -> BLoBTraining:
        self.reset(seed)
        return BLoBTraining(self, model, cfg, n_train)

    def hparams(self) -> dict[str, Any]:
        return {"prior_sigma": self.prior_sigma, "eps": self.eps, "variational": self.variational,
                "default_scale": self.default_scale}

    def state_dict(self) -> dict[str, Tensor]:
        mean = self._require_mean("state_dict")
        return {**{f"mean/{n}": t for n, t in mean.items()}, **{f"G/{n}": g.detach().to(self.device) for n, g in self.G.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        expected = {**{f"mean/{n}": s for n, s in self.parameter_shapes.items()},
                    **{f"G/{n}": self.parameter_shapes[n] for n in self.variational}}
        check_state_shapes(expected, state, "BLoB")
        self._mean = {n: state[f"mean/{n}"].detach().to(self.device, copy=True) for n in self.parameter_shapes}
        self.G = {n: state[f"G/{n}"].detach().to(self.device, dtype=torch.float32, copy=True) for n in self.variational}


class BLoBTraining:
    """The training hook of a BLoB member for :func:`swaglora.train.fit`: flipout on the LoRA A layers while
    installed (a context manager), the std parameters G as extra trained tensors, and the KL step after each
    optimiser step (see the module docstring)."""

    def __init__(self, posterior: BLoB, model: nn.Module, cfg: RunConfig, n_train: int) -> None:
        self.posterior, self.cfg, self.n_train = posterior, cfg, n_train
        self.params = trainable_parameters(model)
        missing = [n for n in posterior.variational if n not in self.params]
        if missing:
            raise ValueError(f"BLoB: the model has no trainable {missing[0]!r}")
        self.layers = []  # (peft LoRA layer, adapter, G)
        for name in posterior.variational:
            module_name, rest = name.rsplit(_MARK, 1)
            adapter = rest.split(".")[0]
            layer = model.get_submodule(module_name)
            lora_a = getattr(layer, "lora_A", {})
            if adapter not in lora_a or lora_a[adapter].weight is not self.params[name]:
                raise ValueError(f"BLoB: {name!r} is not the A matrix of a peft LoRA linear layer")
            posterior.G[name] = posterior.G[name].to(self.params[name].device)
            self.layers.append((layer, adapter, posterior.G[name]))
        self.steps_per_epoch = 1  # set by the loop (fit) through start()
        self._handles: list = []

    def tensors(self) -> dict[str, Tensor]:
        """The extra trained tensors (G), which the loop checkpoints and restores with the best epoch."""
        return self.posterior.G

    def start(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch

    @property
    def period(self) -> int:
        return kl_period(self.cfg, self.n_train, self.steps_per_epoch)

    def __enter__(self) -> BLoBTraining:
        for g in self.posterior.G.values():
            g.requires_grad_(True)
        for layer, adapter, g in self.layers:
            self._handles.append(layer.register_forward_hook(_flipout_hook(adapter, g)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for g in self.posterior.G.values():
            g.requires_grad_(False)
            g.grad = None

    def after_step(self, step: int, lr_scale: float) -> None:
        """The KL step after optimiser step ``step`` (0-based): SGD on ``pi * KL`` for A's mean and G (G with
        the NLL gradient it holds), at ``kl_lr * lr_scale``."""
        means = {n: self.params[n] for n in self.posterior.variational}
        weight = kl_weight(step, self.period, self.cfg.blob.kl_reweighting)
        (weight * self.posterior.kl(means)).backward()
        tensors = list(means.values()) + list(self.posterior.G.values())
        distributed.current().average_gradients(tensors)  # G's NLL part; the KL part is the same everywhere
        lr = self.cfg.blob.kl_lr * lr_scale
        with torch.no_grad():
            for t in tensors:
                if t.grad is not None:
                    t.sub_(lr * t.grad)
                t.grad = None


def _flipout_hook(adapter: str, g: Tensor):
    """A forward hook adding BLoB's flipout noise ``scaling * B (s ⊙ (dA (r ⊙ dropout(x))))`` to a peft
    ``lora.Linear``'s output in training mode (per-example signs r, s; ``dA = G^2 ⊙ E``, one E per forward).
    The draws come from torch's CPU RNG, which the training loop forks, seeds and checkpoints."""

    def hook(layer: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not layer.training or getattr(layer, "disable_adapters", False) or adapter not in layer.active_adapters:
            return None
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        x = layer.lora_dropout[adapter](args[0].to(a.dtype))
        per_example = (x.shape[0],) + (1,) * (x.dim() - 2)
        noise = (g**2 * torch.randn(a.shape).to(a.device, a.dtype))
        r = (torch.randint(0, 2, (*per_example, a.shape[1])) * 2 - 1).to(x.device, x.dtype)
        s = (torch.randint(0, 2, (*per_example, a.shape[0])) * 2 - 1).to(x.device, x.dtype)
        delta = (((x * r) @ noise.T) * s) @ b.T * layer.scaling[adapter]
        return output + delta.to(output.dtype)

    return hook
