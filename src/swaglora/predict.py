"""Bayesian model averaging, the same for every posterior method.

``predict_probs`` draws S parameter sets from a posterior *once* per evaluation (the
same draws for every batch), loads each into the model in turn and collects the
per-sample choice probabilities ``[S, N, C]``. Metrics average probabilities (not
logits) over S, so accuracy, NLL and mutual information all come from one predictive.

The frozen lower layers do not depend on the draw: their output comes from a
``HiddenCache`` and is computed once per example, so S samples cost the top layers S
times and the bottom layers once.

Posteriors that offer it (Laplace) can instead be averaged through the *linearised* model
(``predict_logits_linearized``, the GLM predictive of Laplace-LoRA): one forward pass and C
backward passes per batch give each example's logits f and Jacobian J at the posterior mean;
the logits are then Gaussian, N(f, J Sigma J^T), and S samples of them cost nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .data import MCQExample
from .jacobians import per_example_jacobians
from .params import use_params
from .posterior import Posterior
from .scoring import HiddenCache, Scorer

__all__ = ["predict_probs", "predict_logits", "predict_logits_linearized", "dropout_active", "bma"]


@contextmanager
def dropout_active(model: nn.Module, active: bool):
    """Switch the model's dropout modules to train mode (MC dropout) and everything back afterwards."""
    was_training = model.training
    model.eval()
    if active:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.train()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def bma(model: nn.Module, posterior: Posterior, logits_fn, n_samples: int, generator: torch.Generator | None = None,
        scale: float | None = None) -> torch.Tensor:
    """Bayesian model averaging for any model and any scoring: ``softmax(logits_fn(model))`` under each of
    ``n_samples`` posterior draws, stacked ``[S, ...]`` (``.mean(0)`` is the predictive).

    ``logits_fn(model)`` returns logits over the last dimension (e.g. one per answer choice). The draws are
    loaded into the model with :func:`use_params` and the model's own weights come back afterwards; the
    model runs in eval mode (with dropout on for MC dropout).
    """
    thetas = posterior.draws(n_samples, generator=generator, scale=scale)
    out = []
    with dropout_active(model, posterior.stochastic_forward):
        for theta in thetas:
            with use_params(model, theta):
                out.append(torch.softmax(logits_fn(model).float(), -1))
    return torch.stack(out)


def _length_sorted_batches(scorer: Scorer, examples: list[MCQExample], cache: HiddenCache | None, batch_size: int,
                           progress=None):
    """``(row indices, batch, lower-layer hidden states)`` in order of packed length, so batches need little padding."""
    cache = cache if cache is not None else HiddenCache(scorer, enabled=False)
    encoded = scorer.encode(examples)
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(examples), batch_size):
        rows = order[start : start + batch_size]
        batch = scorer.batch([examples[i] for i in rows])
        yield torch.tensor(rows), batch, cache.hidden(batch)
        if progress is not None:
            progress.update(len(rows))


@torch.no_grad()
def predict_logits(
    scorer: Scorer,
    examples: list[MCQExample],
    thetas: list[dict[str, torch.Tensor]],
    cache: HiddenCache | None = None,
    batch_size: int = 16,
    stochastic: bool = False,
    dropout_generator: torch.Generator | None = None,
    progress=None,
) -> torch.Tensor:
    """Choice logits ``[S, N, C]`` of the model under each parameter set in ``thetas`` (``-inf`` = absent choice)."""
    c = max(ex.n_choices for ex in examples)
    out = torch.full((len(thetas), len(examples), c), float("-inf"))
    model = scorer.model
    with dropout_active(model, stochastic):
        for idx, batch, hidden in _length_sorted_batches(scorer, examples, cache, batch_size, progress):
            for s, theta in enumerate(thetas):
                with use_params(model, theta):
                    if stochastic and dropout_generator is not None:
                        # dropout masks come from the global RNG inside torch; fork it so runs are seeded locally
                        with torch.random.fork_rng(devices=[]):
                            torch.random.default_generator.set_state(_state_for(dropout_generator))
                            logits = scorer.top(hidden, batch)
                    else:
                        logits = scorer.top(hidden, batch)
                out[s, idx, : logits.shape[1]] = logits.float().cpu()
    return out


def predict_logits_linearized(
    scorer: Scorer,
    examples: list[MCQExample],
    posterior: Posterior,
    n_samples: int,
    generator: torch.Generator,
    cache: HiddenCache | None = None,
    batch_size: int = 16,
    scale: float | None = None,
    progress=None,
) -> torch.Tensor:
    """Choice logits ``[S, N, C]`` sampled from the linearised predictive ``N(f, J Sigma J^T)`` per example.

    ``f`` and ``J`` are taken at ``posterior.linearization_point()``; ``Sigma`` (times ``scale``) is the
    posterior's covariance over the parameters ``posterior.linearization()`` names. ``scale=0`` gives the
    mean's logits in every sample. Noise comes from ``generator`` only, drawn after all batches.
    """
    layout = posterior.linearization()
    if layout is None:
        raise ValueError(f"{type(posterior).__name__} has no linearised predictive; use predict_logits")
    linear, other = layout
    n = len(examples)
    c = max(ex.n_choices for ex in examples)
    means = torch.full((n, c), float("-inf"), dtype=torch.float64)
    covs = torch.zeros(n, c, c, dtype=torch.float64)
    model = scorer.model
    with dropout_active(model, False), use_params(model, posterior.linearization_point()):
        for idx, batch, hidden in _length_sorted_batches(scorer, examples, cache, batch_size, progress):
            logits, jac = per_example_jacobians(model, lambda: scorer.top(hidden, batch), linear, other)  # noqa: B023
            k = logits.shape[1]
            means[idx, :k] = logits.double().cpu()
            covs[idx, :k, :k] = posterior.logit_covariance(jac, scale=scale).double().cpu()
    values, vectors = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
    root = vectors * values.clamp(min=0).sqrt()[:, None, :]  # root @ root^T = covariance
    noise = torch.randn(n_samples, n, c, generator=generator, dtype=torch.float64)
    return (means[None] + torch.einsum("ncd,snd->snc", root, noise)).float()


def _state_for(generator: torch.Generator) -> torch.Tensor:
    """A fresh RNG state derived from ``generator`` (advances it), for code that only uses the global RNG."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed).get_state()


def predict_probs(
    scorer: Scorer,
    examples: list[MCQExample],
    posterior: Posterior,
    n_samples: int,
    generator: torch.Generator | Sequence[torch.Generator],
    cache: HiddenCache | None = None,
    batch_size: int = 16,
    scale: float | None = None,
    temperature: float = 1.0,
    progress=None,
    linearized: bool = False,
    forward_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample probabilities ``[S, N, C]`` (padded choices have probability 0).

    ``generator`` draws the weights (an :class:`Ensemble` also takes one generator per member);
    ``forward_generator`` (default: ``generator``) the randomness inside a forward pass: MC-dropout masks and
    the linearised predictive's logit samples. ``linearized=True``: through the linearised model
    (``predict_logits_linearized``), for posteriors that have it.
    """
    common = {"cache": cache, "batch_size": batch_size, "progress": progress}
    forward = generator if forward_generator is None else forward_generator
    if linearized:
        logits = predict_logits_linearized(scorer, examples, posterior, n_samples, forward, scale=scale, **common)
    else:
        thetas = posterior.draws(n_samples, generator=generator, scale=scale)
        logits = predict_logits(scorer, examples, thetas, stochastic=posterior.stochastic_forward,
                                dropout_generator=forward, **common)
    return torch.softmax(logits / temperature, dim=-1)
