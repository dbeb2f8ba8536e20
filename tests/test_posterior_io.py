"""Saving/loading posteriors (strict), atomic writes, corrupt files, the registry, PEFT models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import swaglora
import swaglora.io as sio
from swaglora.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, load_safetensors, read_json
from swaglora.params import trainable_parameters, unflatten, use_params
from swaglora.posterior import (
    CONFIG_NAME,
    MAP,
    METHODS,
    SWAG,
    TENSORS_NAME,
    Posterior,
    SWAGDiag,
    get_method,
    load_posterior,
    method_names,
    register,
)

from conftest import small_model


def fit(posterior: Posterior, model: nn.Module, n: int = 6, seed: int = 1) -> Posterior:
    params = trainable_parameters(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.no_grad():
            for p in params.values():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        posterior.collect(model)
    return posterior


def same_state(a: Posterior, b: Posterior) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def same_draws(a: Posterior, b: Posterior, n: int = 3, seed: int = 0) -> bool:
    da = a.draws(n, torch.Generator().manual_seed(seed))
    db = b.draws(n, torch.Generator().manual_seed(seed))
    return len(da) == len(db) and all(torch.equal(x[k], y[k]) for x, y in zip(da, db) for k in x)


@pytest.fixture
def saved_swag(tmp_path):
    model = small_model()
    swag = fit(SWAG(model, max_rank=3), model)
    directory = swag.save(tmp_path / "swag", metadata={"base_model": "tiny", "lora_r": 2})
    return model, swag, directory


def test_swag_round_trip_exact(saved_swag):
    model, swag, directory = saved_swag
    assert sorted(os.listdir(directory)) == ["posterior.safetensors", "posterior_config.json"]
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["method"] == "swag" and config["n_collected"] == 6
    assert config["parameters"] == {"1.weight": [2, 3], "1.bias": [2]}
    assert config["parameter_order"] == ["1.weight", "1.bias"]
    assert config["metadata"] == {"base_model": "tiny", "lora_r": 2}
    assert config["library_version"] == swaglora.__version__
    assert config["hparams"] == {"max_rank": 3, "var_clamp": 1e-30, "dtype": "float32", "default_scale": 0.5}
    loaded = load_posterior(directory, model=model, expected_metadata={"base_model": "tiny"})
    assert type(loaded) is SWAG and loaded.n_collected == 6 and loaded.rank == 3
    assert loaded.hparams() == swag.hparams() and loaded.state.next_row == swag.state.next_row
    assert same_state(swag, loaded) and same_draws(swag, loaded)
    assert SWAG.load(directory).n_collected == 6


def test_map_and_diag_round_trip(tmp_path):
    model = small_model()
    for post in (MAP(model), fit(SWAGDiag(model, dtype=torch.float64), model)):
        directory = post.save(tmp_path / post.name)
        loaded = load_posterior(directory, model=model)
        assert type(loaded) is type(post) and same_state(post, loaded) and same_draws(post, loaded)
    map_draws = MAP(model).draws(5)
    assert len(map_draws) == 1 and torch.equal(map_draws[0]["1.weight"], model[1].weight)


def test_refuses_different_shapes(saved_swag):
    _, _, directory = saved_swag
    with pytest.raises(ValueError, match=r"shape of '1\.weight': \(2, 3\) in saved posterior .* vs \(5, 3\)"):
        load_posterior(directory, model=small_model(out=5))


def test_refuses_different_names(saved_swag):
    _, _, directory = saved_swag
    with pytest.raises(ValueError, match="without trainable parameters"):
        load_posterior(directory, model=small_model().requires_grad_(False))
    with pytest.raises(ValueError) as err:
        load_posterior(directory, model=small_model(train_first=True))
    assert "'1.weight'" in str(err.value) and "'0.weight'" in str(err.value)


def test_refuses_different_method(saved_swag, tmp_path):
    model, _, directory = saved_swag
    with pytest.raises(ValueError, match="saved posterior method is 'swag', expected 'map'"):
        MAP.load(directory)
    MAP(model).save(tmp_path / "map")
    with pytest.raises(ValueError, match="'map', expected 'swag'"):
        SWAG.load(tmp_path / "map")


def test_refuses_different_rank(saved_swag):
    model, swag, directory = saved_swag
    with pytest.raises(ValueError, match=r"max_rank: saved=3, expected=5"):
        load_posterior(directory, expected_hparams={"max_rank": 5})
    assert load_posterior(directory, expected_hparams={"max_rank": 3}).rank == 3
    with pytest.raises(ValueError, match="rank 3 but this SWAG has max_rank=5"):
        SWAG(model, max_rank=5).load_state_dict(swag.state_dict())
    config = json.loads((directory / CONFIG_NAME).read_text())  # config says rank 4, tensors hold 3 rows
    config["hparams"]["max_rank"] = 4
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank 3 but this SWAG has max_rank=4"):
        load_posterior(directory)


def test_load_state_dict_is_strict(saved_swag):
    model, swag, _ = saved_swag
    state = swag.state_dict()
    with pytest.raises(ValueError, match="'extra'"):
        SWAG(model, max_rank=3).load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="'sq_mean'"):
        SWAG(model, max_rank=3).load_state_dict({k: v for k, v in state.items() if k != "sq_mean"})
    with pytest.raises(ValueError, match="inconsistent SWAG counters"):
        SWAG(model, max_rank=3).load_state_dict({**state, "next_row": torch.tensor(2)})
    with pytest.raises(ValueError, match=r"'1\.bias'"):
        MAP(model).load_state_dict({"1.weight": torch.zeros(2, 3)})


def test_refuses_different_metadata(saved_swag):
    _, _, directory = saved_swag
    with pytest.raises(ValueError) as err:
        load_posterior(directory, expected_metadata={"base_model": "other", "lora_r": 2, "seed": 1})
    message = str(err.value)
    assert "base_model: saved='tiny', expected='other'" in message
    assert "seed: saved='<missing>', expected=1" in message
    assert "lora_r" not in message  # equal keys are not reported
    assert load_posterior(directory, expected_metadata={"lora_r": 2}).n_collected == 6


def test_refuses_newer_format_version(saved_swag):
    _, _, directory = saved_swag
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["format_version"] = 2
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 2.*up to format_version 1"):
        load_posterior(directory)


def test_refuses_unknown_method_in_config(saved_swag):
    _, _, directory = saved_swag
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["method"] = "laplace-kfac"
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(KeyError, match="Unknown method 'laplace-kfac'"):
        load_posterior(directory)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.999])
def test_truncated_safetensors_is_a_clear_error(saved_swag, keep):
    _, _, directory = saved_swag
    path = directory / TENSORS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*posterior\.safetensors"):
        load_posterior(directory)


def test_tensors_from_another_save_are_detected(saved_swag, tmp_path):
    model, _, directory = saved_swag
    other = fit(SWAG(model, max_rank=3), model, seed=9).save(tmp_path / "other")
    (directory / TENSORS_NAME).write_bytes((other / TENSORS_NAME).read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        load_posterior(directory)


def test_missing_and_corrupt_config(saved_swag, tmp_path):
    _, _, directory = saved_swag
    with pytest.raises(FileNotFoundError, match="posterior_config.json"):
        load_posterior(tmp_path / "nowhere")
    (directory / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot parse JSON file .*posterior_config\.json"):
        load_posterior(directory)


def test_save_rejects_non_json_metadata(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="JSON"):
        MAP(model).save(tmp_path / "m", metadata={"bad": object()})
    assert not (tmp_path / "m" / CONFIG_NAME).exists()


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_json(path, {"version": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"version": 2})
    monkeypatch.undo()
    assert read_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["config.json"]
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert read_json(path) == {"version": 1} and os.listdir(tmp_path) == ["config.json"]
    atomic_write_text(path, '{"version": 3}')
    assert read_json(path) == {"version": 3}
    assert json.loads(path.read_text()) == {"version": 3}


def test_atomic_safetensors_failure_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(path, {"a": torch.arange(4.0)}, metadata={"k": "v"})

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(sio, "save_file", half_then_fail)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save_safetensors(path, {"a": torch.zeros(100)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["t.safetensors"]
    tensors, meta = load_safetensors(path, with_metadata=True)
    assert torch.equal(tensors["a"], torch.arange(4.0)) and meta["k"] == "v"


def test_safetensors_views_of_one_storage_are_saved(tmp_path):
    base = torch.arange(6.0)
    unflat = unflatten(base, {"x": (2, 2), "y": (2,)})
    atomic_save_safetensors(tmp_path / "v.safetensors", unflat)
    loaded = load_safetensors(tmp_path / "v.safetensors")
    assert torch.equal(loaded["x"], unflat["x"]) and torch.equal(loaded["y"], torch.tensor([4.0, 5.0]))


def test_registry():
    assert method_names() == ["blob", "dropout", "ensemble", "laplace", "map", "map-matched", "swag", "swag-diag", "tfb", "tfb-blob"] == sorted(METHODS)
    assert get_method("swag") is SWAG and get_method("swag-diag") is SWAGDiag
    with pytest.raises(KeyError) as err:
        get_method("swg")
    assert str(err.value) == "Unknown method 'swg'. Available: blob, dropout, ensemble, laplace, map, map-matched, swag, swag-diag, tfb, tfb-blob"
    with pytest.raises(ValueError, match="Unknown method"):
        get_method("swg")
    with pytest.raises(ValueError, match="already registered"):

        class Impostor(MAP):
            name = "swag"

        register(Impostor)
    assert register(SWAG) is SWAG  # re-registering the same class is harmless


def tiny_lora_model(r: int = 2):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    base = transformers.LlamaForCausalLM(config)
    return peft.get_peft_model(base, peft.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))


def test_peft_lora_only_lora_params_tracked_and_saved(tmp_path):
    model = tiny_lora_model()
    params = trainable_parameters(model)
    assert len(params) == 8 and all("lora_A" in n or "lora_B" in n for n in params)
    assert sum(p.numel() for p in params.values()) == 2 * (2 * 32 + 32 * 2) + 2 * (2 * 32 + 16 * 2)
    n_all = sum(p.numel() for p in model.parameters())
    swag = fit(SWAG(model, max_rank=2), model, n=3)
    assert swag.num_params == 448 < n_all
    directory = swag.save(tmp_path / "lora_swag", metadata={"base_model": "tiny-llama"})
    assert sorted(os.listdir(directory)) == ["posterior.safetensors", "posterior_config.json"]
    assert load_safetensors(directory / TENSORS_NAME)["mean"].shape == (448,)
    config = read_json(directory / CONFIG_NAME)
    assert set(config["parameters"]) == set(params)
    map_dir = MAP(model).save(tmp_path / "lora_map")
    assert set(load_safetensors(map_dir / TENSORS_NAME)) == set(params)
    loaded = load_posterior(directory, model=model)
    assert same_draws(swag, loaded)
    with pytest.raises(ValueError, match=r"shape of .*lora_A.*\(2, 32\) in saved posterior .* vs \(4, 32\)"):
        load_posterior(directory, model=tiny_lora_model(r=4))
    theta = loaded.sample(torch.Generator().manual_seed(0))
    name = next(iter(theta))
    before = params[name].detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    with use_params(model, theta):
        assert torch.equal(params[name], theta[name])
        logits = model(input_ids=ids).logits
    assert torch.equal(params[name], before) and torch.isfinite(logits).all()
