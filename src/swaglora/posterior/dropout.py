r"""MC dropout: the MAP weights, with dropout kept active while predicting.

Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation: Representing Model Uncertainty
in Deep Learning", https://arxiv.org/abs/1506.02142 ; the LoRA baseline of Onal et al. 2024
(https://arxiv.org/abs/2405.03425) and Yang et al. 2024 (https://arxiv.org/abs/2308.13111)
uses the LoRA dropout of the fine-tuned adapter.

The predictive is :math:`p(y|x) \approx \frac1S \sum_s p(y|x, \theta_{MAP} \odot m_s)` with a
fresh Bernoulli mask :math:`m_s` per forward pass. The weights never change: ``draws(S)``
returns S copies of the MAP weights, and ``stochastic_forward = True`` tells the shared
prediction path (:func:`swaglora.predict.predict_logits`) to run the model's ``nn.Dropout``
modules in train mode (everything else in eval mode), so each copy gets its own masks. The
dropout rate is the model's own (``lora.dropout``); with rate 0 the predictive is MAP's.
"""

from __future__ import annotations

from swaglora.posterior.base import Row
from swaglora.posterior.map import MAP


class MCDropout(MAP):
    """MC dropout: S copies of the MAP weights, each forward with fresh dropout masks."""

    name = "dropout"
    stochastic_forward = True
    rows = (Row("dropout", 70, "MC dropout: MAP weights with LoRA dropout kept on while predicting"),)

    @property
    def is_point_mass(self) -> bool:
        return False  # the weights are, the predictive is not: draws(S) gives S copies
