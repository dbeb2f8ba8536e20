"""MAP at SWAG's training compute: the baseline that makes "SWAG beats MAP" a statement at equal training cost.

The ``map`` row is the best validation epoch of the MAP phase, which is where SWAG starts; SWAG then trains
``swag.epochs`` more epochs. ``map-matched`` trains member 0 (the one its row uses; see
``members.own_member_indices``) again from the same LoRA init and data order (the member's seed) for
``train.epochs + swag.epochs`` epochs, the same number of optimiser steps as MAP + SWAG, with its own
schedule (warm-up, then linear decay to 0 over the whole run, ``schedule.lr_at`` with no SWAG phase), and
keeps the best validation epoch over all of them. ``ensemble-matched`` mixes every member's ``map-matched``
weights (each member trained again), the deep ensemble at the training compute of MultiSWAG.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from swaglora.posterior.base import Row
from swaglora.posterior.map import MAP

if TYPE_CHECKING:
    from swaglora.config import RunConfig


class MatchedMAP(MAP):
    """Point mass at the best validation epoch of a MAP training as long as MAP + SWAG (its own member)."""

    name = "map-matched"
    trains_own_member = True
    rows = (Row("map-matched", 12, "MAP trained as long as MAP + SWAG (same epochs and optimiser steps, lr decaying to 0, "
                "best validation epoch): the compute-matched baseline", sampled=False),
            Row("ensemble-matched", 62, "deep ensemble of the members' map-matched weights: the ensemble at MultiSWAG's "
                "training compute", all_members=True, sampled=False))

    @classmethod
    def member_config(cls, cfg: RunConfig) -> RunConfig:
        return replace(cfg, train=replace(cfg.train, epochs=cfg.train.epochs + cfg.swag.epochs), swag=replace(cfg.swag, epochs=0))

    def member_training(self, model: nn.Module, cfg: RunConfig, n_train: int, seed: int) -> Any:
        return None  # plain training: no hook
