"""Bayesian model averaging, the same for every posterior method.

``predict_probs`` draws S parameter sets from a posterior *once* per evaluation (the
same draws for every batch), loads each into the model in turn and collects the
per-sample choice probabilities ``[S, N, C]``. Metrics average probabilities (not
logits) over S, so accuracy, NLL and mutual information all come from one predictive.

The frozen lower layers do not depend on the draw: their output comes from a
``HiddenCache`` and is computed once per example, so S samples cost the top layers S
times and the bottom layers once.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .data import MCQExample
from .params import use_params
from .posterior import Posterior
from .scoring import HiddenCache, Scorer

__all__ = ["predict_probs", "predict_logits", "dropout_active"]


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


def _order_by_length(scorer: Scorer, examples: list[MCQExample]) -> list[int]:
    """Evaluation order: sorted by packed length, so batches need little padding."""
    encoded = scorer.encode(examples)
    return sorted(range(len(examples)), key=lambda i: len(encoded[i].input_ids))


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
    cache = cache if cache is not None else HiddenCache(scorer, enabled=False)
    n = len(examples)
    c = max(ex.n_choices for ex in examples)
    out = torch.full((len(thetas), n, c), float("-inf"))
    order = _order_by_length(scorer, examples)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    model = scorer.model
    with dropout_active(model, stochastic):
        for rows in batches:
            batch = scorer.batch([examples[i] for i in rows])
            hidden = cache.hidden(batch)
            idx = torch.tensor(rows)
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
            if progress is not None:
                progress.update(len(rows))
    return out


def _state_for(generator: torch.Generator) -> torch.Tensor:
    """A fresh RNG state derived from ``generator`` (advances it), for code that only uses the global RNG."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed).get_state()


def predict_probs(
    scorer: Scorer,
    examples: list[MCQExample],
    posterior: Posterior,
    n_samples: int,
    generator: torch.Generator,
    cache: HiddenCache | None = None,
    batch_size: int = 16,
    scale: float | None = None,
    temperature: float = 1.0,
    progress=None,
) -> torch.Tensor:
    """Per-sample probabilities ``[S, N, C]`` (padded choices have probability 0)."""
    thetas = posterior.draws(n_samples, generator=generator, scale=scale)
    logits = predict_logits(
        scorer,
        examples,
        thetas,
        cache=cache,
        batch_size=batch_size,
        stochastic=posterior.stochastic_forward,
        dropout_generator=generator,
        progress=progress,
    )
    return torch.softmax(logits / temperature, dim=-1)
