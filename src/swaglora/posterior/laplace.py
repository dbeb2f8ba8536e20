r"""Laplace-LoRA: a Kronecker-factored (KFAC) Laplace approximation around the MAP weights.

Yang et al. 2024, "Bayesian Low-rank Adaptation for Large Language Models" (ICLR),
https://arxiv.org/abs/2308.13111 ; KFAC: Martens & Grosse 2015, https://arxiv.org/abs/1503.05671 ;
KFAC with weight sharing ("expand"): Eschenhagen et al. 2023, https://arxiv.org/abs/2311.00636 ;
evidence: MacKay 1992, Immer et al. 2021, https://arxiv.org/abs/2104.04975 .

Posterior :math:`N(\theta_{MAP}, \text{scale}\cdot P^{-1})`, :math:`P = H + \lambda I`, with H the GGN
of the summed NLL. For softmax cross-entropy the GGN is the Fisher under the model's own
predictive, :math:`H = \sum_n \sum_c p_{nc}\, g_{nc} g_{nc}^\top` with :math:`g_{nc}` the gradient
of :math:`-\log p_c(x_n)`; the sum over the C choices is done *exactly* (C backward passes per
batch, weighted by :math:`\sqrt{p_{nc}}`), not with sampled labels.

KFAC, per linear map :math:`y = Wx\,(+b)` (``nn.Linear``, so peft's ``lora_A``/``lora_B``, and any
module holding a trainable 2-D ``weight`` whose forward is checked to equal
``F.linear(x, weight, bias)``, e.g. the letter head). With inputs :math:`a_{nt}` (a trailing 1 when
the bias is trainable) and output gradients :math:`g_{nct}` at the positions t where the map is
applied (positions count as extra data, "KFAC-expand")::

    A = (1/M) sum_{n,t} a a^T      G = (1/N) sum_{n,c,t} p_nc g g^T      H_W ~= N * G (x) A

(W flattened row by row, :math:`\mathrm{vec}(g a^\top) = g \otimes a`); M counts positions whose
output gradient is non-zero for some choice (padding is left out). For one example at one
position this is the exact GGN block. Other trainable tensors get the exact diagonal of H
(one backward pass per example and choice: slow, meant for small leftovers). Blocks between
layers are dropped.

Prior :math:`N(\theta_0, \lambda^{-1} I)` on what fine-tuning moves, as Laplace-LoRA: :math:`\theta_0 = 0`
for the LoRA weights, and the initial value for a parameter whose module says where it starts with
``prior_mean() -> {local name: tensor}`` (the letter head: the LM-head rows of the letters). Numbers
without curvature (output rows of a linear map whose output gradient is always zero, e.g. the head rows of
letters beyond the data's choice count; diagonal entries with :math:`h = 0`) carry no information from the
data and are left out of the prior and the posterior: they stay at the MAP value and do not enter the
evidence. The layout in ``posterior_config.json`` records the rows kept (``rows``, for maps where some are
left out) and the parameters with a non-zero prior mean (``prior_mean``). Log evidence (Laplace) over the
D kept numbers::

    log Z(lam) = log p(D|theta) - lam/2 ||theta - theta_0||^2 + D/2 log lam - 1/2 sum_k log(e_k + lam)

with :math:`e_k` the eigenvalues of H (:math:`N\gamma_i\alpha_j` per layer, :math:`h_k` for the
diagonal part). ``prior_precision=None`` maximises it over a grid :math:`10^{-4}..10^{8}` (4 per
decade) refined by golden-section search on :math:`\log\lambda`; its stationary point is MacKay's
:math:`\lambda\|\theta\|^2 = \sum_k e_k/(e_k+\lambda)`. A number fixes :math:`\lambda`.

Sampling, with :math:`A = Q_A\,\mathrm{diag}(\alpha)Q_A^\top`, :math:`G = Q_G\,\mathrm{diag}(\gamma)Q_G^\top` (G over the kept rows)::

    W = W_MAP + sqrt(scale) * Q_G (Z / sqrt(N gamma alpha^T + lam)) Q_A^T,   Z ~ N(0, I_{out x in})

Memory: :math:`\sum_\text{layers}(in^2 + out^2 + in + out)` floats (in counts the bias column), plus the
diagonal part and the MAP weights; never a D x D matrix (SmolLM2-135M, r=8 on q,v of 30
layers: 3.1e7 floats, 124 MB in float32). ``subset="last-layer"`` covers only the last
trainable block in model order (the top decoder layer's adapters, or the letter head if
trained); the rest stays at MAP.

Why not laplace-torch 0.3: it fits a wrapped PEFT LM fed by a DataLoader of (tensor, label), but
not our head: curvlinops refuses the letter head's raw weight, asdl silently leaves it out and
then fails to sample; it also wants its own torch; so the KFAC is computed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swaglora.posterior.base import Posterior, Row, check_state_shapes, make_generator

if TYPE_CHECKING:
    from swaglora.config import RunConfig

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_GRID = torch.logspace(-4, 8, 49, dtype=torch.float64)  # 4 per decade
_KRON_KEYS = ("A_eigvals", "A_eigvecs", "G_eigvals", "G_eigvecs")


def _close(y: Tensor, ref: Tensor) -> bool:
    tol = max(1e-3, 8 * torch.finfo(y.dtype).eps)  # bf16 models: a few units of rounding
    y, ref = y.detach(), ref.detach()
    return y.shape == ref.shape and bool(torch.allclose(y, ref, rtol=tol, atol=tol * float(ref.abs().max())))


class Laplace(Posterior):
    """Laplace-LoRA: KFAC Laplace around the MAP, prior precision by marginal likelihood, linearised or sampled predictive."""

    name = "laplace"
    default_scale = 1.0
    linearized_predictive = True
    rows = (
        Row("laplace", 80, "Laplace-LoRA: KFAC curvature at the MAP weights, linearised (GLM) predictive", linearized=True),
        Row("laplace-sample", 90, "Laplace-LoRA with the predictive sampled in weight space"),
    )

    def __init__(
        self,
        model: nn.Module | Mapping[str, Any],
        prior_precision: float | None = None,
        subset: str = "all",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        default_scale: float | None = None,
        layout: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in _DTYPES.values():
            raise ValueError(f"Laplace factors must be float32 or float64, got {dtype}")
        if subset not in ("all", "last-layer"):
            raise ValueError(f"subset must be 'all' or 'last-layer', got {subset!r}")
        if prior_precision is not None and not (0 < prior_precision < math.inf):
            raise ValueError(f"prior_precision must be positive and finite (or None: marginal likelihood), got {prior_precision}")
        self.fixed_prior = None if prior_precision is None else float(prior_precision)
        self.subset, self.dtype, self.device = subset, dtype, torch.device(device)
        self.default_scale = float(type(self).default_scale if default_scale is None else default_scale)
        self.layout = self._check_layout(layout) if layout is not None else None
        self._mean: dict[str, Tensor] | None = None
        self._kron: dict[str, dict[str, Tensor]] = {}  # weight name -> eigendecompositions of A and G
        self._diag: dict[str, Tensor] = {}  # name -> diagonal of H (a sum over the data)
        self._prior_mean: dict[str, Tensor] = {}  # name -> prior mean where it is not zero
        self.prior_precision, self.n_data, self.log_likelihood = math.nan, 0, math.nan
        if isinstance(model, nn.Module):
            self.collect(model)

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, tuple[Any, str]]:
        """The run's ``laplace`` section: the subset and the fixed prior precision (None: marginal likelihood)."""
        return {"subset": (cfg.laplace.subset, "laplace.subset"),
                "prior_precision": (float(cfg.laplace.prior_precision) or None, "laplace.prior_precision")}

    @classmethod
    def samples_for(cls, cfg: RunConfig, row: Row) -> int:
        """The linearised predictive's logit samples cost no forward pass, so it takes many (``laplace.glm_samples``)."""
        return cfg.laplace.glm_samples if row.linearized else super().samples_for(cfg, row)

    # ------------------------------------------------------------------ layout
    def _check_layout(self, layout: Mapping[str, Any]) -> dict[str, Any]:
        kron = [(str(w), None if b is None else str(b)) for w, b in layout["kron"]]
        diag = [str(n) for n in layout["diag"]]
        names = [w for w, _ in kron] + [b for _, b in kron if b] + diag
        if any(n not in self.parameter_shapes for n in names) or len(set(names)) < len(names):
            raise ValueError(f"Laplace layout names unknown or repeated parameters: {names}")
        for w, b in kron:
            shape = self.parameter_shapes[w]
            if len(shape) != 2 or (b and self.parameter_shapes[b] != shape[:1]):
                raise ValueError(f"Laplace layout: {w!r} {shape} is not a linear weight (bias {b!r})")
        rows = {str(w): [int(i) for i in r] for w, r in layout.get("rows", {}).items()}  # older posteriors: every row
        for w, r in rows.items():
            if w not in dict(kron) or r != sorted(set(r)) or any(not 0 <= i < self.parameter_shapes[w][0] for i in r):
                raise ValueError(f"Laplace layout: rows of {w!r} must be increasing row indices of a kron weight, got {r}")
        prior_mean = [str(n) for n in layout.get("prior_mean", [])]
        if any(n not in names for n in prior_mean):
            raise ValueError(f"Laplace layout: prior_mean names parameters outside the posterior: {prior_mean}")
        return {"kron": [list(x) for x in kron], "diag": diag, "rows": rows, "prior_mean": prior_mean}

    def _rows(self, w: str) -> list[int]:
        """Output rows of kron weight ``w`` that the posterior covers (those with curvature)."""
        return self.layout["rows"].get(w, list(range(self.parameter_shapes[w][0])))

    def _covered(self, model: nn.Module) -> list[str]:
        """Trainable names the posterior covers: all, or those of the last trainable block."""
        names = list(self.parameter_shapes)
        if self.subset == "all":
            return names
        modules = dict(model.named_modules())
        owner = names[-1].rpartition(".")[0]
        parts, prefix = owner.split(".") if owner else [], owner
        for i in range(1, len(parts) + 1):  # outermost ancestor that is an entry of an nn.ModuleList
            if isinstance(modules.get(".".join(parts[: i - 1])), nn.ModuleList):
                prefix = ".".join(parts[:i])
                break
        return [n for n in names if (n.startswith(prefix + ".") if prefix else "." not in n)]

    # ------------------------------------------------------------------ fitting
    def collect(self, model: nn.Module) -> None:
        self._mean = {n: p.detach().to(self.device, copy=True) for n, p in self._read(model).items()}

    def fit(self, model: nn.Module, batches: Any, loss_fn: Any, *, validation: Any = None,
            generator: torch.Generator | None = None) -> None:
        """KFAC of the GGN at the model's current (MAP) weights over ``batches``; then the prior precision.

        ``loss_fn(model, batch) -> (logits [B, C], labels [B])``; absent choices may be ``-inf``. Deterministic and
        on the training data only: ``validation`` and ``generator`` are not used.
        """
        self.collect(model)
        params, modules = self._read(model), dict(model.named_modules())
        owners: dict[str, list[str]] = {}
        for n in self._covered(model):
            owners.setdefault(n.rpartition(".")[0], []).append(n)
        self._prior_mean = {}
        for mod, names in owners.items():
            means = modules[mod].prior_mean() if callable(getattr(modules[mod], "prior_mean", None)) else {}
            for n in names:
                if n.rpartition(".")[2] in means:
                    self._prior_mean[n] = means[n.rpartition(".")[2]].detach().to(self.device, copy=True)
        plan, diag, checked = {}, [], set()  # plan: module -> (weight name, trainable bias name)
        for mod, names in owners.items():
            attrs, w = {n.rpartition(".")[2]: n for n in names}, getattr(modules[mod], "weight", None)
            if "weight" in attrs and set(attrs) <= {"weight", "bias"} and w.dim() == 2:
                plan[mod] = (attrs["weight"], attrs.get("bias"))
                if isinstance(modules[mod], nn.Linear):
                    checked.add(mod)
            else:
                diag += names
        calls: dict[str, list[tuple[Tensor, Tensor]]] = {m: [] for m in plan}
        hook = lambda m: lambda _, args, out: calls[m].append((args[0].detach(), out))  # noqa: E731
        handles = [modules[m].register_forward_hook(hook(m)) for m in plan]
        acc = {m: [0.0, 0.0, 0] for m in plan}  # A sum, G sum, positions M
        hdiag = {n: torch.zeros_like(params[n], dtype=self.dtype) for n in diag}
        n_data, loglik, was_training = 0, 0.0, model.training
        model.eval()
        try:
            for batch in batches:
                for c in calls.values():
                    c.clear()
                with torch.enable_grad():
                    logits, labels = loss_fn(model, batch)
                for m in [m for m in plan if m not in checked and calls[m]]:  # a linear map? else diagonal
                    mod = modules[m]
                    b = mod.bias if isinstance(getattr(mod, "bias", None), Tensor) else None
                    ok = all(x.is_floating_point() and x.shape[-1] == mod.weight.shape[1]
                             and _close(y, F.linear(x, mod.weight, b)) for x, y in calls[m])
                    checked.add(m)
                    if not ok:
                        w_name, b_name = plan.pop(m)
                        diag += [w_name] + ([b_name] if b_name else [])
                        hdiag.update({k: torch.zeros_like(params[k], dtype=self.dtype) for k in diag if k not in hdiag})
                logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
                p = logp.detach().exp()
                loglik += float(logp.detach().gather(1, labels.view(-1, 1).to(logits.device)).sum())
                n_data += p.shape[0]
                self._accumulate(logits, p, plan, calls, acc, [params[n] for n in hdiag], hdiag)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if n_data == 0:
            raise ValueError("Laplace.fit: no data (batches was empty)")
        self._finish(plan, acc, hdiag, n_data, loglik)

    def _accumulate(self, logits, p, plan, calls, acc, dparams, hdiag) -> None:
        recs = [(m, x, y) for m in plan for x, y in calls[m]]
        used = [torch.zeros(x.shape[:-1].numel(), dtype=torch.bool, device=x.device) for _, x, _ in recs]
        eye = torch.eye(p.shape[1], device=p.device)
        for c in range(p.shape[1]):
            if not (p[:, c] > 0).any():
                continue  # an absent choice everywhere
            dz = (p[:, c].sqrt()[:, None] * (p - eye[c])).to(logits.dtype)  # sqrt(p_c) * d(-log p_c)/dz
            grads = torch.autograd.grad(logits, [y for *_, y in recs], dz, retain_graph=True, allow_unused=True) if recs else []
            for i, ((m, _, y), g) in enumerate(zip(recs, grads)):
                if g is not None:
                    g = g.reshape(-1, y.shape[-1]).to(self.dtype)
                    acc[m][1] = acc[m][1] + g.T @ g
                    used[i] |= (g != 0).any(1)
            for n in range(p.shape[0]) if dparams else ():
                if p[n, c] > 0:
                    gs = torch.autograd.grad(logits[n], dparams, dz[n], retain_graph=True, allow_unused=True)
                    for h, g in zip(hdiag.values(), gs):
                        if g is not None:
                            h += g.to(self.dtype) ** 2
        for (m, x, _), u in zip(recs, used):
            a = x.reshape(-1, x.shape[-1]).to(self.dtype)[u]
            if plan[m][1] is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
            acc[m][0] = acc[m][0] + a.T @ a
            acc[m][2] += int(u.sum())

    def _finish(self, plan, acc, hdiag, n_data, loglik) -> None:
        self._kron, self.n_data, self.log_likelihood, rows = {}, n_data, loglik, {}
        for m, (w, b) in plan.items():
            out, inp = self.parameter_shapes[w][0], self.parameter_shapes[w][1] + (b is not None)
            a_sum, g_sum, count = acc[m]
            a = a_sum / max(count, 1) if count else torch.zeros(inp, inp, dtype=self.dtype)
            g = g_sum / n_data if torch.is_tensor(g_sum) else torch.zeros(out, out, dtype=self.dtype)
            live = torch.diagonal(g) > 0  # a row whose output gradient is always zero has no curvature
            if not live.all():
                rows[w] = live.nonzero().flatten().tolist()
                g = g[live][:, live]
            (av, aq), (gv, gq) = torch.linalg.eigh(a.to(self.device)), torch.linalg.eigh(g.to(self.device))
            self._kron[w] = dict(zip(_KRON_KEYS, (av.clamp(min=0), aq.contiguous(), gv.clamp(min=0), gq.contiguous())))
        self._diag = {n: h.to(self.device) for n, h in hdiag.items()}
        covered = {n for pair in plan.values() for n in pair if n} | set(hdiag)
        self.layout = self._check_layout({"kron": list(plan.values()), "diag": list(hdiag), "rows": rows,
                                          "prior_mean": [n for n in self._prior_mean if n in covered]})
        self._prior_mean = {n: self._prior_mean[n] for n in self.layout["prior_mean"]}
        self.prior_precision = self.fixed_prior if self.fixed_prior is not None else self.optimize_prior_precision()

    # ------------------------------------------------------------------ evidence
    def _eigenvalues(self) -> Tensor:
        """All eigenvalues of H over the covered parameters (float64), D numbers."""
        parts = [self.n_data * torch.outer(k["G_eigvals"], k["A_eigvals"]).reshape(-1) for k in self._kron.values()]
        return torch.cat([t.double().cpu() for t in parts + [h[h > 0] for h in self._diag.values()]])

    def _prior_distance_sq(self) -> float:
        """``||theta - theta_0||^2`` over the numbers with curvature (the rows kept, diagonal entries h > 0)."""
        def delta(n: str) -> Tensor:
            d = self._mean[n].double()
            return d - self._prior_mean[n].to(d) if n in self._prior_mean else d

        total = 0.0
        for w, b in self.layout["kron"]:
            rows = self._rows(w)
            total += float((delta(w)[rows] ** 2).sum()) + (float((delta(b)[rows] ** 2).sum()) if b else 0.0)
        for n, h in self._diag.items():
            total += float((delta(n)[h > 0] ** 2).sum())
        return total

    def log_evidence(self, prior_precision: float, eigenvalues: Tensor | None = None) -> float:
        """Laplace log marginal likelihood of the fitted data at ``prior_precision``."""
        self._require_mean_and_curvature("log_evidence")
        e = self._eigenvalues() if eigenvalues is None else eigenvalues
        lam = float(prior_precision)
        sq = self._prior_distance_sq()
        return self.log_likelihood - lam / 2 * sq + e.numel() / 2 * math.log(lam) - float(torch.log(e + lam).sum()) / 2

    def optimize_prior_precision(self) -> float:
        """The prior precision maximising :meth:`log_evidence` (grid, then golden-section search)."""
        e = self._eigenvalues()
        f = lambda log_lam: self.log_evidence(math.exp(log_lam), e)  # noqa: E731
        grid = _GRID.log().tolist()
        i = max(range(len(grid)), key=lambda j: f(grid[j]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        r = (math.sqrt(5) - 1) / 2
        for _ in range(40):  # golden-section search on log lambda
            x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
            lo, hi = (lo, x2) if f(x1) >= f(x2) else (x1, hi)
        return math.exp((lo + hi) / 2)

    # ------------------------------------------------------------------ sampling and state
    def _require_mean_and_curvature(self, what: str) -> None:
        if self._mean is None or self.layout is None or self.n_data < 1:
            raise RuntimeError(f"Laplace.{what}() called before fit(model, batches, loss_fn) or load_state_dict()")

    def _require_fit(self, what: str) -> None:
        self._require_mean_and_curvature(what)
        if not math.isfinite(self.prior_precision):
            raise RuntimeError(f"Laplace.{what}() called before fit(model, batches, loss_fn) or load_state_dict()")

    def mean_params(self) -> dict[str, Tensor]:
        self._require_fit("mean_params")
        return {n: w.clone() for n, w in self._mean.items()}

    def sample(self, generator: torch.Generator | None = None, scale: float | None = None) -> dict[str, Tensor]:
        theta = self.mean_params()
        scale = self.default_scale if scale is None else float(scale)
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be finite and >= 0, got {scale}")
        if scale == 0:
            return theta
        g, lam = make_generator(generator), self.prior_precision
        randn = lambda *s: torch.randn(*s, generator=g, dtype=self.dtype, device=g.device).to(self.device)  # noqa: E731
        for w, b in self.layout["kron"]:
            k, rows = self._kron[w], self._rows(w)
            std = (self.n_data * torch.outer(k["G_eigvals"], k["A_eigvals"]) + lam).rsqrt()
            delta = math.sqrt(scale) * k["G_eigvecs"] @ (randn(*std.shape) * std) @ k["A_eigvecs"].T
            theta[w] = theta[w].to(self.dtype)
            theta[w][rows] += delta[:, : self.parameter_shapes[w][1]]
            if b:
                theta[b] = theta[b].to(self.dtype)
                theta[b][rows] += delta[:, -1]
        for n, h in self._diag.items():
            theta[n] = theta[n].to(self.dtype) + math.sqrt(scale) * randn(*h.shape) * (h + lam).rsqrt() * (h > 0)
        return theta

    # ------------------------------------------------------------------ linearised predictive
    def linearization(self) -> tuple[list[tuple[str, str | None]], list[str]]:
        self._require_fit("linearization")
        return [(w, b) for w, b in self.layout["kron"]], list(self.layout["diag"])

    def linearization_point(self) -> dict[str, Tensor]:
        return self.mean_params()

    def logit_covariance(self, jacobians: Mapping[str, Tensor], scale: float | None = None) -> Tensor:
        r"""GLM predictive covariance :math:`\text{scale}\cdot J P^{-1} J^\top` per example, ``[B, C, C]``.

        Per KFAC block, in the eigenbasis of G and A: :math:`\sum_{oi} \tilde J_{c,oi} \tilde J_{d,oi} /
        (N\gamma_o\alpha_i + \lambda)` with :math:`\tilde J = Q_G^\top J Q_A` (J over the kept rows); the diagonal part
        divides by :math:`h + \lambda` (entries with h = 0 are left out). Uncovered parameters
        (``subset="last-layer"``) have no variance.
        """
        self._require_fit("logit_covariance")
        scale = self.default_scale if scale is None else float(scale)
        lam, cov = self.prior_precision, None
        for w, b in self.layout["kron"]:
            k, rows = self._kron[w], self._rows(w)
            j = jacobians[w].to(device=self.device, dtype=self.dtype)[:, :, rows]
            if b:
                j = torch.cat([j, jacobians[b].to(device=self.device, dtype=self.dtype)[:, :, rows, None]], -1)
            rotated = k["G_eigvecs"].T @ j @ k["A_eigvecs"]
            var = (self.n_data * torch.outer(k["G_eigvals"], k["A_eigvals"]) + lam).reciprocal()
            part = torch.einsum("bcoi,bdoi->bcd", rotated * var, rotated)
            cov = part if cov is None else cov + part
        for n, h in self._diag.items():
            j = jacobians[n].to(device=self.device, dtype=self.dtype).flatten(2)
            part = torch.einsum("bcp,bdp->bcd", j * ((h > 0) / (h + lam)).reshape(-1), j)
            cov = part if cov is None else cov + part
        return scale * cov

    def hparams(self) -> dict[str, Any]:
        dtype = next(k for k, v in _DTYPES.items() if v == self.dtype)
        return {"prior_precision": self.fixed_prior, "subset": self.subset, "dtype": dtype,
                "default_scale": self.default_scale, "layout": self.layout}

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"mean.{n}": s for n, s in self.parameter_shapes.items()}
        for w, b in self.layout["kron"]:
            out, inp = len(self._rows(w)), self.parameter_shapes[w][1] + (b is not None)
            shapes.update(dict(zip((f"kfac.{w}.{k}" for k in _KRON_KEYS), ((inp,), (inp, inp), (out,), (out, out)))))
        shapes.update({f"diag.{n}": self.parameter_shapes[n] for n in self.layout["diag"]})
        shapes.update({f"prior_mean.{n}": self.parameter_shapes[n] for n in self.layout["prior_mean"]})
        return {**shapes, "prior_precision": (), "n_data": (), "log_likelihood": ()}

    def state_dict(self) -> dict[str, Tensor]:
        self._require_fit("state_dict")
        state = {f"mean.{n}": w for n, w in self._mean.items()}
        state.update({f"kfac.{w}.{k}": v for w, kr in self._kron.items() for k, v in kr.items()})
        state.update({f"diag.{n}": h for n, h in self._diag.items()})
        state.update({f"prior_mean.{n}": m for n, m in self._prior_mean.items()})
        scalar = lambda v, dt=torch.float64: torch.tensor(v, dtype=dt)  # noqa: E731
        return {**state, "prior_precision": scalar(self.prior_precision), "n_data": scalar(self.n_data, torch.int64),
                "log_likelihood": scalar(self.log_likelihood)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if self.layout is None:
            raise ValueError("this Laplace has no layout (hparams of a fitted posterior): nothing to load into")
        check_state_shapes(self._expected_shapes(), state, "Laplace")
        lam, n = float(state["prior_precision"]), int(state["n_data"])
        if not (0 < lam < math.inf) or n < 1:
            raise ValueError(f"invalid Laplace state: prior_precision={lam}, n_data={n}")
        cast = lambda t: t.detach().to(dtype=self.dtype, device=self.device, copy=True)  # noqa: E731
        self._mean = {n: state[f"mean.{n}"].detach().to(self.device, copy=True) for n in self.parameter_shapes}
        self._kron = {w: {k: cast(state[f"kfac.{w}.{k}"]) for k in _KRON_KEYS} for w, _ in self.layout["kron"]}
        self._diag = {n: cast(state[f"diag.{n}"]) for n in self.layout["diag"]}
        self._prior_mean = {n: state[f"prior_mean.{n}"].detach().to(self.device, copy=True) for n in self.layout["prior_mean"]}
        self.prior_precision, self.n_data, self.log_likelihood = lam, n, float(state["log_likelihood"])
