"""Ensemble = MultiSWAG (members SWAG) or deep ensemble (members MAP): draws, sampling, save/load."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from swaglora.io import load_safetensors
from swaglora.params import trainable_parameters
from swaglora.posterior import CONFIG_NAME, MAP, SWAG, TENSORS_NAME, Ensemble, get_method, load_posterior

from conftest import small_model


def fitted_swag(seed: int, n: int = 5, max_rank: int = 3) -> SWAG:
    model = small_model(seed=seed)
    swag = SWAG(model, max_rank=max_rank)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(n):
        with torch.no_grad():
            for p in trainable_parameters(model).values():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        swag.collect(model)
    return swag


def equal_draws(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registered():
    assert get_method("ensemble") is Ensemble


def test_one_member_ensemble_equals_member():
    swag = fitted_swag(0)
    ens = Ensemble([swag])
    assert equal_draws(ens.draws(4, gen(3)), swag.draws(4, gen(3)))
    assert equal_draws(ens.draws(4, gen(3), scale=0.2), swag.draws(4, gen(3), scale=0.2))
    assert not equal_draws(ens.draws(4, gen(3)), swag.draws(4, gen(4)))


def test_two_members_draws_are_the_concatenation():
    a, b = fitted_swag(0), fitted_swag(1)
    draws = Ensemble([a, b]).draws(3, gen(5))
    g = gen(5)  # the ensemble threads one generator through its members, in order
    expected = a.draws(3, g) + b.draws(3, g)
    assert len(draws) == 6 and equal_draws(draws, expected)
    means = [a.mean_params(), b.mean_params()]
    for i, d in enumerate(Ensemble([a, b]).draws(3, gen(5), scale=0)):
        assert all(torch.equal(d[k], means[i // 3][k]) for k in d)


def test_identical_members_give_identical_draws_per_member(tmp_path):
    swag = fitted_swag(0)
    twin = load_posterior(swag.save(tmp_path / "s"))
    ens = Ensemble([swag, twin])
    # M identical SWAGs == one SWAG drawing M*S times from the same generator
    assert equal_draws(ens.draws(3, gen(9)), swag.draws(6, gen(9)))
    # at scale 0 every member contributes exactly its mean
    at_mean = ens.draws(2, gen(9), scale=0)
    assert len(at_mean) == 4 and all(equal_draws([d], [at_mean[0]]) for d in at_mean)


def test_deep_ensemble_of_maps():
    models = [small_model(seed=s) for s in (1, 2, 3)]
    ens = Ensemble([MAP(m) for m in models])
    draws = ens.draws(10, gen(0))  # a point mass contributes one draw, whatever n_samples
    assert len(draws) == 3
    for d, m in zip(draws, models):
        assert torch.equal(d["1.weight"], m[1].weight) and torch.equal(d["1.bias"], m[1].bias)
    assert not ens.is_point_mass and Ensemble([MAP(models[0])]).is_point_mass


def test_sample_picks_members_uniformly():
    models = [small_model(seed=s) for s in (1, 2, 3, 4)]
    ens = Ensemble([MAP(m) for m in models])
    g = gen(1)
    n = 4000
    picks = []
    for _ in range(n):
        bias = ens.sample(g)["1.bias"]
        picks.append(next(i for i, m in enumerate(models) if torch.equal(bias, m[1].bias)))
    counts = np.bincount(picks, minlength=4)
    se = np.sqrt(n * 0.25 * 0.75)
    assert np.all(np.abs(counts - n / 4) < 5 * se), counts
    assert torch.equal(ens.sample(gen(2))["1.bias"], ens.sample(gen(2))["1.bias"])


def test_members_must_match():
    a = fitted_swag(0)
    other = SWAG(small_model(out=5))
    with pytest.raises(ValueError, match=r"shape of '1\.weight': \(2, 3\) in member 0 vs \(5, 3\) in member 1"):
        Ensemble([a, other])
    with pytest.raises(ValueError, match="non-empty"):
        Ensemble([])


def test_collect_into_ensemble_is_refused():
    model = small_model()
    with pytest.raises(TypeError, match="members"):
        Ensemble([SWAG(model)]).collect(model)


def test_multiswag_round_trip(tmp_path):
    a, b = fitted_swag(0), fitted_swag(1, max_rank=2)
    ens = Ensemble([a, b, MAP(small_model(seed=7))])
    directory = ens.save(tmp_path / "ens", metadata={"base_model": "tiny"})
    assert sorted(os.listdir(directory)) == ["posterior.safetensors", "posterior_config.json"]
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["method"] == "ensemble" and "n_collected" not in config
    assert [m["method"] for m in config["hparams"]["members"]] == ["swag", "swag", "map"]
    assert config["hparams"]["members"][1]["hparams"]["max_rank"] == 2
    keys = set(load_safetensors(directory / TENSORS_NAME))
    assert {"members.0.mean", "members.1.deviations", "members.2.1.weight"} <= keys
    assert all(k.startswith(("members.0.", "members.1.", "members.2.")) for k in keys)
    loaded = load_posterior(directory, model=small_model(), expected_metadata={"base_model": "tiny"})
    assert isinstance(loaded, Ensemble) and [type(m) for m in loaded.members] == [SWAG, SWAG, MAP]
    assert loaded.members[1].rank == 2 and loaded.members[0].n_collected == 5
    assert equal_draws(loaded.draws(3, gen(4)), ens.draws(3, gen(4)))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ens.state_dict().items())
    with pytest.raises(ValueError, match="shape of '1.weight'"):
        load_posterior(directory, model=small_model(out=5))


def test_load_state_dict_is_strict():
    ens = Ensemble([fitted_swag(0), fitted_swag(1)])
    state = ens.state_dict()
    with pytest.raises(ValueError, match="'members.2.mean'"):
        Ensemble([fitted_swag(0), fitted_swag(1)]).load_state_dict({**state, "members.2.mean": torch.zeros(8)})
    broken = {k: v for k, v in state.items() if k != "members.1.sq_mean"}
    with pytest.raises(ValueError, match="(?s)ensemble member 1: .*'sq_mean'"):
        Ensemble([fitted_swag(0), fitted_swag(1)]).load_state_dict(broken)


def test_from_directories(tmp_path):
    a, b = fitted_swag(0), fitted_swag(1)
    dirs = [a.save(tmp_path / "a", {"base_model": "tiny"}), b.save(tmp_path / "b", {"base_model": "tiny"})]
    ens = Ensemble.from_directories(dirs, model=small_model(), expected_metadata={"base_model": "tiny"})
    assert equal_draws(ens.draws(2, gen(1)), Ensemble([a, b]).draws(2, gen(1)))
    with pytest.raises(ValueError, match="base_model: saved='tiny', expected='big'"):
        Ensemble.from_directories(dirs, expected_metadata={"base_model": "big"})
    wide = MAP(small_model(out=5)).save(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"member 0 vs \(5, 3\) in member 1"):
        Ensemble.from_directories([dirs[0], wide])


def test_one_generator_per_member_gives_each_member_its_own_draws():
    # MultiSWAG in a run: member i draws with the generator of its own seed, so its S draws are exactly those of
    # the member's own row (the swag row is member 0 of multiswag), whatever the other members are
    a, b = fitted_swag(0), fitted_swag(1)
    ens = Ensemble([a, b])
    draws = ens.draws(3, [gen(10), gen(11)], scale=0.3)
    assert equal_draws(draws[:3], a.draws(3, gen(10), scale=0.3))
    assert equal_draws(draws[3:], b.draws(3, gen(11), scale=0.3))
    assert not equal_draws(draws, ens.draws(3, gen(10), scale=0.3))  # one shared generator: other draws for b
    with pytest.raises(ValueError, match="1 generators for an ensemble of 2 members"):
        ens.draws(3, [gen(10)])
