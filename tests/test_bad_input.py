"""Bad input that is not covered next to its module: each gives a clear error and writes nothing half-done.

(The other cases of the issue's list are tested beside their code: data validation in test_data.py,
config keys/types/values in test_config.py, posterior mismatches and corrupt safetensors in
test_posterior_io.py, multi-token letters in test_scoring.py, missing model paths in test_models.py,
NaN loss / SIGINT / crash during a checkpoint write in test_resume.py.)
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from swaglora import io
from swaglora.cli import main
from swaglora.config import ModelConfig, RunConfig, apply_overrides
from swaglora.models import ModelError, load_model
from swaglora.members import check_schedule

from conftest import make_examples, write_jsonl


def test_swag_rank_larger_than_the_snapshots_collected():
    cfg = apply_overrides(RunConfig(), {"swag.max_rank": 10, "swag.epochs": 2, "swag.every": "epoch"})
    with pytest.raises(ValueError, match=r"swag.max_rank=10 is larger than the 2 snapshots"):
        check_schedule(cfg, n_train=400)
    check_schedule(apply_overrides(cfg, {"swag.max_rank": 2}), n_train=400)  # fits: no error


def test_model_without_a_causal_lm_head(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="not a causal LM checkpoint"):
        load_model(ModelConfig(name=str(tmp_path / "bert")))


def test_run_directory_from_a_newer_format_version(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "swaglora_run.json").write_text(json.dumps({"format_version": 99}))
    data = write_jsonl(tmp_path / "d.jsonl", make_examples(20))
    assert main(["train", "--out", str(run), "--model", str(tiny_model_dir), "--data", str(data), "--quiet"]) == 2
    assert "run format 99, newer than" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["swaglora_run.json"]  # nothing written
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 2
    assert "newer than" in capsys.readouterr().err


def test_evaluate_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--quiet"]) == 2
    assert "not a swaglora run directory" in capsys.readouterr().err


def test_disk_full_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    io.atomic_write_json(target, {"accuracy": 0.5})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        io.atomic_write_json(target, {"accuracy": 0.9})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_unknown_task_lists_valid_ones(tmp_path, tiny_model_dir, capsys):
    assert main(["evaluate", "--model", str(tiny_model_dir), "--task", "obqq", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Unknown task 'obqq'" in err and "arc_easy" in err
