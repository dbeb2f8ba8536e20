"""The training protocol's choices: which MAP epoch is kept, and SWAG's early stopping (``swag.force_save``).
(The learning rate of every step is tested in test_config.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from swaglora.cli import main
from swaglora.posterior import load_posterior
from swaglora.train import _swa_choice

from conftest import make_examples, write_jsonl


def test_force_save_rule_follows_the_swag_lora_code_by_hand():
    """train.py of fortuinlab/swag-lora: save when the SWA mean's validation loss beats the best so far, else
    force-save at epoch swag_start + force_save; the last save wins."""
    nll = [1.0, 0.9, 0.95, 0.97, 0.8, 1.2]
    best, kept, choices = float("inf"), None, []
    for epoch, value in enumerate(nll):
        choice = _swa_choice(value, best, epoch, force_save=3)
        choices.append(choice)
        if choice is not None:
            kept, best = epoch, min(best, value)
    assert choices == ["best", "best", None, "forced", "best", None]
    assert kept == 4  # 0.8 at epoch 4 beats 0.9 although epoch 3 was forced
    # never better after the first epoch: the forced epoch is kept
    assert [_swa_choice(v, 0.5, e, 2) for e, v in enumerate([0.6, 0.7, 0.9, 0.8])] == [None, None, "forced", None]


@pytest.fixture
def run_args(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", make_examples(40, 0, "tr"))
    test = write_jsonl(tmp_path / "test.jsonl", make_examples(12, 1, "te"))
    return ["--model", str(tiny_model_dir), "--scoring", "cloze", "--data", str(train), "--test-data", str(test),
            "--shift", "", "--batch-size", "8", "--lora-r", "2", "--members", "1", "--samples", "2", "--dtype", "float32",
            "--quiet"]


def _val_nll(run, posterior: str) -> float:
    """The validation NLL of a saved posterior's mean weights, computed here from the run's session."""
    from swaglora import metrics
    from swaglora.members import open_session
    from swaglora.predict import predict_logits
    from swaglora.rundir import load_run_config

    session = open_session(load_run_config(run))
    theta = load_posterior(run / "members" / "0" / "posteriors" / posterior).sample(scale=0.0)
    logits = predict_logits(session.scorer, session.validation, [theta], batch_size=8)
    labels = torch.tensor([ex.answer_index for ex in session.validation])
    return metrics.nll(torch.softmax(logits[0], -1), labels)


def test_map_is_the_epoch_with_the_lowest_validation_nll(tmp_path, run_args):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *run_args, "--epochs", "4", "--lr", "0.05", "--swag-epochs", "0",
                 "--methods", "map"]) == 0
    log = [json.loads(line) for line in (run / "members" / "0" / "train_log.jsonl").read_text().splitlines()]
    val = [r["val_nll"] for r in log]
    assert len(val) == 4 and len(set(val)) == 4
    assert _val_nll(run, "map") == pytest.approx(min(val), abs=1e-6)
    assert all(_val_nll(run, "map") != pytest.approx(v, abs=1e-6) for v in val if v != min(val))


def test_swag_early_stop_keeps_the_moments_of_the_chosen_epoch(tmp_path, run_args):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *run_args, "--epochs", "1", "--lr", "0.05", "--swag-epochs", "4",
                 "--swag-lr", "0.05", "--swag-every", "epoch", "--swag-max-rank", "1", "--swag-force-save", "1",
                 "--methods", "swag"]) == 0
    member = run / "members" / "0"
    log = [json.loads(line) for line in (member / "train_log.jsonl").read_text().splitlines()]
    swag_epochs = [r for r in log if r["phase"] == "collect"]
    assert len(swag_epochs) == 4 and all("val_swa_nll" in r for r in swag_epochs)
    # the rule, replayed from the logged SWA-mean NLLs
    best, kept = float("inf"), None
    for i, r in enumerate(swag_epochs):
        if r["val_swa_nll"] < best or i == 1:
            kept, best = r["epoch"], min(best, r["val_swa_nll"])
        assert (r["swag_kept"] is not None) == (kept == r["epoch"])
    assert json.loads((member / "done.json").read_text())["kept_swag_epoch"] == kept
    swag = load_posterior(member / "posteriors" / "swag")
    assert swag.n_collected == kept - 1  # one snapshot per SWAG epoch, up to the kept one
    assert _val_nll(run, "swag") == pytest.approx(next(r["val_swa_nll"] for r in swag_epochs if r["epoch"] == kept), abs=1e-6)


def test_force_save_off_keeps_every_snapshot(tmp_path, run_args):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *run_args, "--epochs", "1", "--swag-epochs", "3", "--swag-every", "epoch",
                 "--swag-max-rank", "1", "--methods", "swag"]) == 0
    log = [json.loads(line) for line in (run / "members" / "0" / "train_log.jsonl").read_text().splitlines()]
    assert all("val_swa_nll" not in r for r in log)
    assert load_posterior(run / "members" / "0" / "posteriors" / "swag").n_collected == 3


def test_compute_matched_map_trains_as_long_as_map_plus_swag_and_keeps_its_best_epoch(tmp_path, run_args):
    from swaglora.posterior import get_method
    from swaglora.rundir import load_run_config
    from swaglora.schedule import lr_at

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *run_args, "--epochs", "1", "--swag-epochs", "2", "--swag-every", "epoch",
                 "--swag-max-rank", "1", "--lr", "0.05", "--methods", "map,map-matched,swag,multiswag", "--members", "2"]) == 0
    member = run / "members" / "0"
    # map-matched has no ensemble row: member 1 (for multiswag) trains its own run only, not a second matched MAP
    assert (run / "members" / "1" / "done.json").is_file() and not (run / "members" / "1" / "done-map-matched.json").exists()
    assert (member / "done-map-matched.json").is_file()
    main_log = [json.loads(line) for line in (member / "train_log.jsonl").read_text().splitlines()]
    log = [json.loads(line) for line in (member / "train_log-map-matched.jsonl").read_text().splitlines()]
    assert len(log) == len(main_log) == 3 and all(r["phase"] == "fit" for r in log)  # 1 MAP + 2 SWAG epochs
    cfg = get_method("map-matched").member_config(load_run_config(run))
    steps = -(-json.loads((member / "done.json").read_text())["n_train"] // 8)  # optimiser steps per epoch, batch 8
    assert [r["lr"] for r in log] == pytest.approx([lr_at(steps * (e + 1) - 1, steps, cfg) for e in range(3)])
    assert log[-1]["lr"] < log[0]["lr"] < 0.05  # its own schedule decays over the whole run
    val = [r["val_nll"] for r in log]
    assert _val_nll(run, "map-matched") == pytest.approx(min(val), abs=1e-6)
    assert _val_nll(run, "map") == pytest.approx(main_log[0]["val_nll"], abs=1e-6)  # map: the MAP phase's epoch


def test_a_method_trains_its_own_member_for_every_member_only_when_a_row_mixes_them():
    from swaglora.members import own_member_indices

    assert own_member_indices("map-matched", ["zero-shot", "map", "map-matched", "ensemble"], [0, 1, 2]) == [0]
    assert own_member_indices("blob", ["zero-shot", "blob", "tfb-blob"], [0, 1]) == [0]
    assert own_member_indices("blob", ["zero-shot", "blob", "blob-ensemble"], [0, 1]) == [0, 1]
    assert own_member_indices("blob", ["zero-shot", "blob-ensemble"], [1]) == [1]  # a process training member 1 only
    assert own_member_indices("map-matched", ["zero-shot", "map-matched"], [1, 2]) == []  # member 0's process trains it
    assert own_member_indices("map-matched", ["zero-shot", "ensemble-matched"], [0, 1]) == [0, 1]
