"""Typed config: strict overrides, files, presets, and the CLI built from the same fields."""

from __future__ import annotations

import json

import pytest

from swaglora.cli import build_parser, main, resolve_config
from swaglora.config import PRESETS, ConfigError, RunConfig, apply_overrides, load_config_file


def test_overrides_are_typed():
    cfg = apply_overrides(RunConfig(), {"train.lr": "3e-4", "lora.r": "16", "model.train_head": "false"})
    assert cfg.train.lr == 3e-4 and cfg.lora.r == 16 and cfg.model.train_head is False


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.lrr", 1.0, "Unknown config key 'train.lrr'. Valid keys:"),
        ("nosection.x", 1, "Unknown config key"),
        ("lora.r", "eight", "lora.r: expected an integer, got 'eight'"),
        ("lora.r", 2.5, "lora.r: expected an integer"),
        ("train.lr", "fast", "train.lr: expected a number"),
        ("model.train_head", "maybe", "expected a boolean"),
        ("train.lr", 0, "train.lr must be > 0, got 0"),
        ("train.lr", -1e-3, "train.lr must be > 0"),
        ("train.epochs", 0, "train.epochs must be >= 1"),
        ("train.weight_decay", -1, "train.weight_decay must be >= 0"),
        ("train.threads", -1, "train.threads must be >= 0"),
        ("eval.batch_size", 0, "eval.batch_size must be >= 1"),
        ("lora.alpha", 0, "lora.alpha must be > 0"),
        ("swag.lr", 0.0, "swag.lr must be > 0"),
        ("swag.max_rank", -2, "swag.max_rank must be >= 0"),
        ("swag.scale", "big", "swag.scale must be a number >= 0 or 'auto'"),
        ("swag.every", "sometimes", "swag.every must be 'epoch' or a positive integer"),
        ("lora.layers", "bottom:3", "lora.layers must be 'all' or 'top:K'"),
        ("lora.dropout", 1.5, "lora.dropout must be in [0, 1)"),
        ("model.scoring", "guess", "model.scoring must be auto, letter or cloze"),
    ],
)
def test_bad_values_are_rejected_with_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), {key: value})
    assert message in str(err.value)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), {"swag.rank": 3})
    assert "swag.max_rank" in str(err.value) and "train.lr" in str(err.value)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.0002\nswag:\n  max_rank: 3\n")
    cfg = load_config_file(tmp_path / "c.yaml")
    assert cfg.train.lr == 2e-4 and cfg.swag.max_rank == 3 and cfg.lora.r == RunConfig().lora.r
    (tmp_path / "c.json").write_text(json.dumps({"lora": {"r": "x"}}))
    with pytest.raises(ConfigError, match="c.json.*lora.r"):
        load_config_file(tmp_path / "c.json")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "extra.yaml").write_text("training:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'training'"):
        load_config_file(tmp_path / "extra.yaml")


def test_cli_flags_file_set_and_preset_compose(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.0002\n")
    args = build_parser().parse_args(
        ["train", "--out", "x", "--config", str(tmp_path / "c.yaml"), "--preset", "paper", "--lora-r", "4",
         "--set", "swag.samples=7", "--swag-start", "3"]
    )
    cfg = resolve_config(args)
    assert cfg.lora.r == 4 and cfg.swag.samples == 7 and cfg.train.epochs == 3
    assert cfg.swag.lr == PRESETS["paper"]["swag.lr"] and cfg.model.scoring == "letter"
    assert cfg.train.lr == PRESETS["paper"]["train.lr"]  # the preset overrides the file; flags override both


def test_cli_reports_bad_config_cleanly(capsys):
    assert main(["train", "--out", "x", "--set", "train.nope=1"]) == 2
    assert "Unknown config key 'train.nope'" in capsys.readouterr().err
    assert main(["train", "--out", "x", "--set", "novalue"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err


def test_unknown_method_row_lists_available(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "--methods", "swg", "--quiet"]) == 2
    assert "Unknown method 'swg'. Available: zero-shot, map" in capsys.readouterr().err
