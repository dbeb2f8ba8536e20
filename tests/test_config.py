"""Typed config: strict overrides, files, presets, and the CLI built from the same fields."""

from __future__ import annotations

import json

import pytest
import torch

from swaglora.cli import build_parser, main, resolve_config
from swaglora.config import ConfigError, RunConfig, apply_overrides, config_to_dict, load_config_file
from swaglora.presets import PRESETS


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
        ("swag.scale", "big", "swag.scale must be 'default', 'auto' or a number >= 0"),
        ("swag.scale", "-0.5", "swag.scale must be a finite number >= 0"),
        ("swag.every", "sometimes", "swag.every must be 'auto', 'epoch' or a positive integer"),
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
    assert cfg.lora.r == 4 and cfg.posterior.samples == 7 and cfg.train.epochs == 3
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


def _authors_lrs(base: float, swag_lr: float, map_epochs: int, swag_epochs: int, anneal_epochs: int, batches: int,
                 warmup_steps: float) -> list[float]:
    """The learning rate of every optimiser step of fortuinlab/swag-lora's train.py: transformers' linear schedule
    over all epochs, stepped before swag_start, then torch's SWALR (linear anneal to the SWAG lr)."""
    from torch.optim.swa_utils import SWALR
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_linear_schedule_with_warmup(opt, warmup_steps, batches * (map_epochs + swag_epochs))
    swalr = SWALR(opt, anneal_strategy="linear", anneal_epochs=anneal_epochs * batches, swa_lr=swag_lr)
    lrs = []
    for epoch in range(map_epochs + swag_epochs):
        for _ in range(batches):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            (sched if epoch < map_epochs else swalr).step()
    return lrs


def test_paper_preset_resolves_to_the_authors_settings():
    cfg = apply_overrides(RunConfig(), PRESETS["paper"])
    assert (cfg.model.scoring, cfg.model.train_head, cfg.lora.targets, cfg.lora.layers) == ("letter", True, "q_proj,v_proj", "all")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16.0, 0.1)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.weight_decay, cfg.train.warmup, cfg.train.schedule) == (6e-4, 16, 0.0, 0.06, "linear")
    assert (cfg.train.epochs, cfg.swag.epochs, cfg.swag.anneal_epochs, cfg.swag.every) == (8, 10, 5, "epoch")
    assert cfg.swag.lr == pytest.approx(cfg.train.lr / 10)  # scripts/train.bash SWAG_DIV_FACTOR=10
    assert (cfg.swag.max_rank, cfg.posterior.samples, cfg.swag.scale_setting, cfg.posterior.members) == (5, 15, 1.0, 5)
    assert cfg.swag.force_save == 5  # conf/method/swag.yaml force_save: 5
    assert (cfg.data.train_limit, cfg.data.val_limit, cfg.eval.limit, cfg.data.val_fraction) == (0, 0, 0, 0.2)


def test_linear_schedule_is_the_authors_per_step_learning_rate():
    """No warm-up: every step equals transformers' linear schedule + SWALR exactly (an independent oracle)."""
    from swaglora.train import lr_at

    cfg = apply_overrides(RunConfig(), {**PRESETS["paper"], "train.warmup": 0.0})
    batches = 7
    ours = [lr_at(s, batches, cfg) for s in range(18 * batches)]
    theirs = _authors_lrs(6e-4, 6e-5, 8, 10, 5, batches, 0)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert ours[8 * batches - 1] == pytest.approx(6e-4 * 71 / 126)  # decays towards 0 at step 126, cut off at 56
    assert ours[8 * batches] == pytest.approx(6e-4 * 70 / 126)  # SWAG starts from where the decay stopped
    assert ours[13 * batches:] == [6e-5] * (5 * batches)


def test_linear_schedule_with_warm_up_by_hand():
    from swaglora.train import lr_at

    cfg = apply_overrides(RunConfig(), {"train.schedule": "linear", "train.epochs": 2, "swag.epochs": 2, "swag.lr": 1e-4,
                                        "swag.anneal_epochs": 1, "train.lr": 1e-3, "train.warmup": 0.1})
    lrs = [lr_at(s, 10, cfg) for s in range(40)]  # 40 steps: warm-up ceil(4) steps, decay over 36 to step 40
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:20] == pytest.approx([1e-3 * (40 - s) / 36 for s in range(4, 20)])
    end = 1e-3 * 20 / 36
    assert lrs[20:30] == pytest.approx([end + i / 10 * (1e-4 - end) for i in range(10)])
    assert lrs[30:] == pytest.approx([1e-4] * 10)
    auto = apply_overrides(cfg, {"train.schedule": "auto"})  # the default: constant until SWAG, warm-up over MAP only
    assert [lr_at(s, 10, auto) for s in range(20)] == pytest.approx([5e-4, 1e-3] + [1e-3] * 18)


def test_samples_and_members_moved_to_the_posterior_section_and_old_files_still_read(tmp_path):
    from swaglora.config import PosteriorConfig

    old = tmp_path / "old.json"  # a config.json written before samples/members left the swag section
    old.write_text(json.dumps({"swag": {"samples": 7, "members": 3, "max_rank": 4}}))
    cfg = load_config_file(old)
    assert (cfg.posterior.samples, cfg.posterior.members, cfg.swag.max_rank) == (7, 3, 4)
    assert cfg.posterior.member_indices == [0, 1, 2]
    assert apply_overrides(RunConfig(), {"swag.members": 5}).posterior.members == 5
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"swag": {"samples": 7}, "posterior": {"samples": 3}}))
    with pytest.raises(ConfigError, match="swag.samples and posterior.samples are the same setting"):
        load_config_file(both)
    assert "samples" not in config_to_dict(RunConfig())["swag"] and PosteriorConfig().samples == 15
    cli = build_parser().parse_args(["run", "--swag-samples", "6", "--samples", "9"])  # old flag is an alias
    assert resolve_config(cli).posterior.samples == 9


@pytest.mark.parametrize("command", ["run", "train", "evaluate"])
def test_help_lists_every_setting(command, capsys, monkeypatch):
    """--help renders every config field's flag (a '%' in a help text must not break argparse's formatting)."""
    import types

    from swaglora.config import TFBConfig

    field = TFBConfig.__dataclass_fields__["epsilon"]
    monkeypatch.setattr(field, "metadata", types.MappingProxyType({**field.metadata, "help": "tolerance, 0.3% = 0.003"}))
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--tfb-epsilon", "--tfb-metric", "--laplace-subset", "--swag-samples", "--lora-r"):
        assert flag in out
    assert "0.3% = 0.003" in out
