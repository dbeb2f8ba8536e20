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


def test_auto_snapshot_interval_by_hand():
    """swag.every auto: 25 steps when the SWAG phase then collects >= 2K snapshots, else floor(SWAG steps / 2K)."""
    from swaglora import trajectory
    from swaglora.config import RunConfig, apply_overrides
    from swaglora.members import check_schedule

    cfg = RunConfig()  # batch 8, 3 SWAG epochs, K=5, 2 MAP epochs
    assert cfg.swag.every == "auto"
    # (questions, steps per epoch = ceil(n/8), interval, snapshots among steps 2*spe+1 .. 5*spe)
    for n, spe, every, count in [(2251, 282, 25, 34), (665, 84, 25, 10), (664, 83, 24, 11), (400, 50, 15, 10),
                                 (100, 13, 3, 13), (40, 5, 1, 15), (9, 2, 1, 6)]:
        assert trajectory.steps_per_epoch(cfg, n) == spe
        assert trajectory.collect_every(cfg, n) == every, n
        names = trajectory.snapshot_names(cfg, n)
        assert names == [trajectory.step_name(s) for s in range(2 * spe + 1, 5 * spe + 1) if s % every == 0]
        assert len(names) == count and (count >= 2 * 5 or n == 9)
        check_schedule(cfg, n)  # the defaults train on any of these
    with pytest.raises(ValueError, match=r"larger than the 3 snapshots .*swag.every=auto, 1 steps per epoch on 8"):
        check_schedule(cfg, 8)
    # a fixed interval is used as given (and refused where it cannot fill the rank), epoch ends as before
    assert trajectory.collect_every(apply_overrides(cfg, {"swag.every": "25"}), 400) == 25
    with pytest.raises(ValueError, match="larger than the 4 snapshots"):
        check_schedule(apply_overrides(cfg, {"swag.every": "25"}), 240)
    assert trajectory.collect_every(apply_overrides(cfg, {"swag.every": "epoch"}), 400) is None
    # the rank sets the target: K=20 on 2,251 questions wants 40 snapshots: every 846 // 40 = 21 steps
    assert trajectory.collect_every(apply_overrides(cfg, {"swag.max_rank": 20}), 2251) == 21
    assert trajectory.collect_every(apply_overrides(cfg, {"swag.max_rank": 0}), 2251) == 25
    # recollection compares the resolved intervals: auto (15 on 400 questions) is not a multiple of a recorded 2
    # ... but is of a recorded 5, and a recorded auto resolves the same way
    src = apply_overrides(cfg, {"swag.keep_trajectory": True, "swag.every": "2"})
    why = trajectory.recollect_differences(src, cfg, 400)
    assert why == ["--swag-every auto (15 steps) is not a multiple of the 2 steps it recorded"]
    assert trajectory.recollect_differences(apply_overrides(src, {"swag.every": "5"}), cfg, 400) == []
    assert trajectory.recollect_differences(apply_overrides(src, {"swag.every": "auto"}), apply_overrides(cfg, {"swag.every": "30"}), 400) == []


def test_recollecting_an_auto_run_keeps_the_interval_it_recorded(tmp_path):
    """A source collected with swag.every auto: its recollection keeps the recorded interval (done.json), because
    auto would resolve anew for another rank (K=20 on 400 questions: 150 // 40 = 3, not a multiple of 15)."""
    from swaglora import cli, rundir
    from swaglora.config import RunConfig, apply_overrides

    source = tmp_path / "source"
    rundir.save_config(apply_overrides(RunConfig(), {"swag.keep_trajectory": True}), source)
    for i in (0, 1):
        (source / "members" / str(i)).mkdir(parents=True)
        (source / "members" / str(i) / "done.json").write_text(json.dumps({"n_train": 400, "swag_every": 15}))
    cfg = cli._recollect_base(source)
    assert (cfg.swag.every, cfg.swag.keep_trajectory) == ("15", False)
    assert trajectory_differences(source, apply_overrides(cfg, {"swag.max_rank": 20})) == []
    assert trajectory_differences(source, apply_overrides(cfg, {"swag.every": "auto", "swag.max_rank": 20})) == [
        "--swag-every auto (3 steps) is not a multiple of the 15 steps it recorded"]
    # members that disagree (or an older done.json without the field): auto stays, resolved as before
    (source / "members" / "1" / "done.json").write_text(json.dumps({"n_train": 400}))
    assert cli._recollect_base(source).swag.every == "auto"


def trajectory_differences(source, cfg):
    from swaglora import trajectory
    from swaglora.rundir import load_run_config

    return trajectory.recollect_differences(load_run_config(source), cfg, 400)


def test_auto_snapshot_interval_in_training(tmp_path, run_args):
    """A small training set under the default swag.every: 32 training questions (40, 20% held out), batch 8: 4
    steps per epoch; 1 MAP + 2 SWAG epochs, K=2 -> every 8 // 4 = 2 steps -> steps 6, 8, 10, 12: 4 snapshots;
    done.json records the interval used. A fixed 25 collects none and is refused before training."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *run_args, "--epochs", "1", "--swag-epochs", "2", "--swag-max-rank", "2",
                 "--methods", "swag"]) == 0
    done = json.loads((run / "members" / "0" / "done.json").read_text())
    assert (done["n_train"], done["swag_every"]) == (32, 2)
    assert load_posterior(run / "members" / "0" / "posteriors" / "swag").n_collected == 4
    assert main(["train", "--out", str(tmp_path / "fixed"), *run_args, "--epochs", "1", "--swag-epochs", "2",
                 "--swag-max-rank", "2", "--swag-every", "25", "--methods", "swag"]) != 0
    assert not (tmp_path / "fixed" / "members" / "0" / "done.json").exists()


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
