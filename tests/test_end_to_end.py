"""The whole pipeline on the tiny model through the CLI: train, evaluate, files, metrics recomputed from predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swaglora import metrics
from swaglora.cli import main
from swaglora.config import RunConfig, apply_overrides
from swaglora.posterior import load_posterior

from conftest import make_examples, write_jsonl


@pytest.fixture
def data_files(tmp_path):
    return (
        write_jsonl(tmp_path / "train.jsonl", make_examples(32, 0, "tr")),
        write_jsonl(tmp_path / "test.jsonl", make_examples(16, 1, "te")),
        write_jsonl(tmp_path / "shift.jsonl", make_examples(12, 2, "sh")),
    )


def _common(model_dir, data_files, scoring="cloze"):
    train, test, shift = data_files
    return ["--model", str(model_dir), "--scoring", scoring, "--data", str(train), "--test-data", str(test),
            "--shift", str(shift), "--epochs", "1", "--swag-epochs", "2", "--swag-every", "2", "--members", "2",
            "--swag-samples", "3", "--swag-max-rank", "3", "--batch-size", "8", "--lora-r", "2", "--quiet"]


def recompute(pred_file: Path) -> dict:
    rows = [json.loads(line) for line in pred_file.read_text().splitlines()]
    c = max(len(r["probs"]) for r in rows)
    probs = torch.zeros(len(rows), c, dtype=torch.float64)
    for i, r in enumerate(rows):
        probs[i, : len(r["probs"])] = torch.tensor(r["probs"], dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)  # probabilities are stored rounded to 6 decimals
    labels = torch.tensor([r["labels"].index(r["answer"]) for r in rows])
    return metrics.summarize(probs, labels)


@pytest.mark.bf16
@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_train_then_evaluate(tmp_path, tiny_model_dir, data_files, scoring):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *_common(tiny_model_dir, data_files, scoring)]) == 0
    for member in ("0", "1"):
        d = run / "members" / member
        assert (d / "done.json").is_file()
        assert (d / "adapter" / "adapter_model.safetensors").is_file()
        assert not (d / "adapter" / "model.safetensors").exists()  # never the base model
        for name in ("init", "map", "swag", "swag-diag"):
            assert sorted(p.name for p in (d / "posteriors" / name).iterdir()) == ["posterior.safetensors", "posterior_config.json"]
        log = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        assert [r["phase"] for r in log] == ["fit", "collect", "collect"]
    swag = load_posterior(run / "members" / "0" / "posteriors" / "swag")
    assert swag.n_collected == 4 // 2 * 2  # 4 steps per epoch x 2 epochs, every 2 steps
    assert (run / "config.json").is_file()

    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    rows = {p.name for p in (run / "eval" / "test").iterdir()}
    assert rows == {"zero-shot", "map", "swa", "swag-diag", "swag", "multiswag", "ensemble"}
    for set_dir in ("validation", "test", "shift"):
        for row in rows:
            out = run / "eval" / set_dir / row
            saved = json.loads((out / "metrics.json").read_text())
            again = recompute(out / "predictions.jsonl")
            for key in ("accuracy", "ece", "nll", "brier"):
                assert saved[key] == pytest.approx(again[key], abs=2e-5), (set_dir, row, key)
            assert saved["n"] == again["n"]
    multiswag = json.loads((run / "eval" / "test" / "multiswag" / "metrics.json").read_text())
    assert multiswag["n_samples"] == 6 and multiswag["n_members"] == 2
    swa = [json.loads(l) for l in (run / "eval" / "test" / "swa" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["mutual_information"] == 0.0 for r in swa)  # one draw: no epistemic part


@pytest.mark.bf16
def test_training_changes_the_model_and_is_reproducible(tmp_path, tiny_model_dir, data_files):
    args = _common(tiny_model_dir, data_files)
    assert main(["train", "--out", str(tmp_path / "a"), *args, "--members", "1"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), *args, "--members", "1"]) == 0
    pa = load_posterior(tmp_path / "a" / "members" / "0" / "posteriors" / "swag").state_dict()
    pb = load_posterior(tmp_path / "b" / "members" / "0" / "posteriors" / "swag").state_dict()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    init = load_posterior(tmp_path / "a" / "members" / "0" / "posteriors" / "init").sample()
    trained = load_posterior(tmp_path / "a" / "members" / "0" / "posteriors" / "map").sample()
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_finished_members_are_not_retrained(tmp_path, tiny_model_dir, data_files):
    run = tmp_path / "run"
    args = _common(tiny_model_dir, data_files)
    assert main(["train", "--out", str(run), *args, "--members", "1"]) == 0
    stamp = (run / "members" / "0" / "done.json").stat().st_mtime_ns
    assert main(["train", "--out", str(run), *args, "--members", "1"]) == 0
    assert (run / "members" / "0" / "done.json").stat().st_mtime_ns == stamp


def test_zero_shot_evaluate_writes_metrics_and_predictions(tmp_path, tiny_model_dir, data_files, capsys):
    out = tmp_path / "zs"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data_files[1]), "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert set(["accuracy", "ece", "nll", "brier", "n"]) <= set(saved)
    assert saved["n"] == 16
    again = recompute(out / "predictions.jsonl")
    assert saved["nll"] == pytest.approx(again["nll"], abs=2e-5)
    assert "accuracy" in capsys.readouterr().out


def test_changed_config_on_existing_run_is_refused(tmp_path, tiny_model_dir, data_files, capsys):
    run = tmp_path / "run"
    args = _common(tiny_model_dir, data_files)
    assert main(["train", "--out", str(run), *args, "--members", "1"]) == 0
    assert main(["train", "--out", str(run), *args, "--members", "1", "--lr", "0.5"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_swag_scale_auto_picks_the_grid_scale_with_lowest_validation_nll(tmp_path, tiny_model_dir, data_files):
    import numpy as np

    from swaglora.evaluate import SCALE_GRID, draw_generator
    from swaglora.members import open_session
    from swaglora.rundir import load_run_config
    from swaglora.predict import predict_probs

    run = tmp_path / "run"
    args = _common(tiny_model_dir, data_files)
    assert main(["train", "--out", str(run), *args, "--members", "1"]) == 0
    assert main(["evaluate", "--run", str(run), "--swag-scale", "auto", "--methods", "swag", "--quiet"]) == 0
    choice = json.loads((run / "eval" / "scale-swag.json").read_text())
    # the oracle: member 0's SWAG draws at each grid scale (seeded as the evaluation seeds them), their validation
    # predictive averaged in float64, NLL = -mean log p(answer), written out here rather than taken from metrics
    cfg = load_run_config(run)
    session = open_session(cfg)
    member = run / "members" / "0"
    swag = load_posterior(member / "posteriors" / "swag")
    seed = json.loads((member / "done.json").read_text())["seed"]
    answers = np.array([ex.answer_index for ex in session.validation])
    oracle = {}
    for scale in SCALE_GRID:
        probs = predict_probs(session.scorer, session.validation, swag, cfg.posterior.samples, draw_generator(seed, "swag"),
                              batch_size=cfg.eval.batch_size, scale=scale).double().numpy()
        predictive = probs.mean(0)
        oracle[scale] = float(-np.log(predictive[np.arange(len(answers)), answers]).mean())
    grid = {float(k): v for k, v in choice["grid_nll"].items()}
    assert grid == pytest.approx(oracle, abs=1e-5)
    assert len(set(np.round(list(oracle.values()), 3))) > 1  # the grid matters here: the choice is not a tie
    assert oracle[choice["chosen"]] == pytest.approx(min(oracle.values()), abs=1e-6)
    assert json.loads((run / "eval" / "test" / "swag" / "metrics.json").read_text())["scale"] == choice["chosen"]


@pytest.mark.bf16
def test_run_every_method_with_temperature_scaling_and_report(tmp_path, tiny_model_dir, data_files):
    from swaglora.posterior import row_names

    run = tmp_path / "run"
    args = _common(tiny_model_dir, data_files)
    assert main(["run", "--out", str(run), *args, "--methods", "all", "--calibrate", "temperature", "--laplace-glm-samples", "50"]) == 0
    rows = {p.name for p in (run / "eval" / "test").iterdir()}
    assert rows == set(row_names()) | {f"{r}+ts" for r in row_names()}
    for row in row_names():
        base = json.loads((run / "eval" / "validation" / row / "metrics.json").read_text())
        scaled = json.loads((run / "eval" / "validation" / f"{row}+ts" / "metrics.json").read_text())
        assert scaled["nll"] <= base["nll"] + 1e-9, row  # fitted on validation: never worse there
        assert scaled["temperature"] > 0
    dropout = json.loads((run / "eval" / "test" / "dropout" / "metrics.json").read_text())
    assert dropout["n_samples"] == 3
    laplace = json.loads((run / "eval" / "test" / "laplace" / "metrics.json").read_text())
    assert laplace["n_samples"] == 50 and laplace["scale"] == 1.0  # the linearised predictive's logit samples
    sampled = json.loads((run / "eval" / "test" / "laplace-sample" / "metrics.json").read_text())
    assert sampled["n_samples"] == 3 and sampled["nll"] != laplace["nll"]
    for name in ("report.md", "results.csv", "results.json"):
        assert (run / name).is_file()
    assert any((run / "figures").glob("*.png"))


def test_members_trained_separately_are_combined_by_evaluate(tmp_path, tiny_model_dir, data_files):
    args = _common(tiny_model_dir, data_files)
    assert main(["train", "--out", str(tmp_path / "a"), *args, "--member-index", "0"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), *args, "--member-index", "1"]) == 0
    out = tmp_path / "combined"
    assert main(["evaluate", "--run", str(tmp_path / "a"), "--run", str(tmp_path / "b"), "--out", str(out),
                 "--methods", "multiswag,ensemble", "--quiet"]) == 0
    multiswag = json.loads((out / "eval" / "test" / "multiswag" / "metrics.json").read_text())
    assert multiswag["n_members"] == 2 and multiswag["n_samples"] == 6
    # the pooled ensemble is the mixture of the two members' MAP predictions
    assert main(["evaluate", "--run", str(tmp_path / "a"), "--out", str(tmp_path / "ea"), "--methods", "map", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(tmp_path / "b"), "--out", str(tmp_path / "eb"), "--methods", "map", "--quiet"]) == 0
    read = lambda d: [json.loads(l)["probs"] for l in (d / "eval" / "test" / "map" / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    pa, pb = read(tmp_path / "ea"), read(tmp_path / "eb")
    mixed = [json.loads(l)["probs"] for l in (out / "eval" / "test" / "ensemble" / "predictions.jsonl").read_text().splitlines()]
    for x, y, m in zip(pa, pb, mixed):
        assert m == pytest.approx([(u + v) / 2 for u, v in zip(x, y)], abs=2e-6)


def test_evaluate_fits_missing_posthoc_methods_on_a_finished_run(tmp_path, tiny_model_dir, data_files):
    run = tmp_path / "run"
    args = _common(tiny_model_dir, data_files)
    assert main(["train", "--out", str(run), *args, "--members", "1", "--methods", "map,swag"]) == 0
    posteriors = run / "members" / "0" / "posteriors"
    assert not (posteriors / "laplace").exists() and not (posteriors / "dropout").exists()
    assert main(["evaluate", "--run", str(run), "--methods", "laplace,dropout", "--quiet"]) == 0
    assert (posteriors / "laplace" / "posterior.safetensors").is_file()
    # Laplace is centred on the member's MAP weights
    from swaglora.posterior import load_posterior

    laplace = load_posterior(posteriors / "laplace").mean_params()
    map_weights = load_posterior(posteriors / "map").sample()
    assert all(torch.allclose(laplace[k].float(), map_weights[k].float()) for k in map_weights)
    assert json.loads((run / "eval" / "test" / "laplace" / "metrics.json").read_text())["n"] == 16


def test_blob_shift_protocol_expands_to_its_four_sets(tiny_model_dir):
    from swaglora.config import RunConfig, apply_overrides
    from swaglora.evaluate import eval_sets
    from swaglora.members import open_session

    cfg = apply_overrides(RunConfig(), {"model.name": str(tiny_model_dir), "data.task": "obqa", "eval.shift": "blob,obqa",
                                        "eval.limit": 5, "data.train_limit": 10, "data.val_limit": 5,
                                        "swag.epochs": 0})
    names = [(name, role) for name, role, _ in eval_sets(open_session(cfg))]
    assert names == [("validation", "validation"), ("obqa", "test"), ("arc_challenge", "shift"), ("arc_easy", "shift"),
                     ("mmlu:college_chemistry", "shift"), ("mmlu:college_physics", "shift")]


def test_each_swag_row_samples_with_its_posteriors_default_scale_unless_the_user_sets_one(tmp_path, tiny_model_dir, data_files):
    run = tmp_path / "run"
    args = [*_common(tiny_model_dir, data_files), "--dtype", "float32", "--members", "1"]
    assert main(["train", "--out", str(run), *args, "--methods", "swag-diag,swag"]) == 0
    assert json.loads((run / "config.json").read_text())["swag"]["scale"] == "default"
    assert main(["evaluate", "--run", str(run), "--methods", "swa,swag-diag,swag", "--quiet"]) == 0
    scale = lambda row: json.loads((run / "eval" / "test" / row / "metrics.json").read_text())["scale"]  # noqa: E731
    assert (scale("swag-diag"), scale("swag"), scale("swa")) == (1.0, 0.5, 0.0)  # Maddox et al.; Onal et al.; the mean
    default_nll = json.loads((run / "eval" / "test" / "swag-diag" / "metrics.json").read_text())["nll"]
    assert main(["evaluate", "--run", str(run), "--methods", "swag-diag,swag", "--swag-scale", "0.3", "--quiet"]) == 0
    assert (scale("swag-diag"), scale("swag")) == (0.3, 0.3)
    assert json.loads((run / "eval" / "test" / "swag-diag" / "metrics.json").read_text())["nll"] != default_nll


def test_predictions_do_not_depend_on_how_the_run_directory_is_spelled(tmp_path, tiny_model_dir, data_files, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    args = [*_common(tiny_model_dir, data_files), "--dtype", "float32", "--members", "1"]
    assert main(["train", "--out", "runs/a", *args, "--methods", "swag-diag,swag,dropout,laplace-sample"]) == 0
    shutil.copytree("runs/a", "moved/b")
    spellings = ["runs/a", "./runs/a/", str(tmp_path / "runs" / "a"), "moved/b"]
    for i, spelling in enumerate(spellings):
        assert main(["evaluate", "--run", spelling, "--out", f"e{i}", "--methods", "swag-diag,swag,dropout,laplace-sample", "--quiet"]) == 0
    for row in ("swag-diag", "swag", "dropout", "laplace-sample"):
        for set_name in ("validation", "test", "shift"):
            files = [(tmp_path / f"e{i}" / "eval" / set_name / row / "predictions.jsonl").read_bytes() for i in range(len(spellings))]
            assert all(f == files[0] for f in files), (row, set_name)


@pytest.mark.parametrize("split", ["validation", "train"])
def test_evaluating_on_a_split_the_run_tunes_on_is_refused_before_training(tmp_path, tiny_model_dir, split, capsys):
    run = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--task", "arc_easy", "--split", split, "--quiet"]
    assert main(["run", "--out", str(run), *args]) == 2
    assert "--allow-tuning-split" in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written or loaded
    assert main(["train", "--out", str(run), *args]) == 2 and not run.exists()


def test_the_tuning_split_guard_names_only_splits_the_run_trains_or_validates_on(capsys):
    from swaglora.config import ConfigError
    from swaglora.selection import check_eval_split

    cfg = lambda **kw: apply_overrides(RunConfig(), kw)  # noqa: E731
    check_eval_split(cfg(**{"eval.split": "test"}))
    check_eval_split(cfg(**{"data.task": "cqa", "eval.split": "validation"}))  # CQA's test role is its validation split
    with pytest.raises(ConfigError, match="'validation' that the run trains or validates on"):
        check_eval_split(cfg(**{"data.task": "obqa", "eval.split": "validation"}))
    with pytest.raises(ConfigError, match="'dev'"):  # mmlu's train role
        check_eval_split(cfg(**{"data.task": "mmlu", "eval.split": "train"}))
    check_eval_split(cfg(**{"eval.split": "validation", "eval.allow_tuning_split": True}))
    assert "WARNING" in capsys.readouterr().err


def test_a_question_gets_the_same_weight_sampled_probabilities_in_every_set(tmp_path, tiny_model_dir, data_files):
    train, test, shift = data_files
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    # the shift set repeats three test questions (other ids, other order) among its own
    mixed = [dict(rows[5], id="again-5"), *make_examples(4, 7, "x"), dict(rows[0], id="again-0"), dict(rows[9], id="again-9")]
    write_jsonl(shift, mixed)
    run = tmp_path / "run"
    args = [*_common(tiny_model_dir, data_files), "--dtype", "float32", "--members", "1"]
    assert main(["run", "--out", str(run), *args, "--methods", "swag,laplace-sample", "--overwrite"]) == 0
    for row in ("swag", "laplace-sample"):
        read = lambda s: {p["id"]: p for p in map(json.loads, (run / "eval" / s / row / "predictions.jsonl").read_text().splitlines())}  # noqa: E731
        in_test, in_shift = read("test"), read("shift")
        for k in (5, 0, 9):
            a, b = in_test[rows[k]["id"]], in_shift[f"again-{k}"]
            assert a["probs"] == b["probs"] and a["mutual_information"] == b["mutual_information"]
            assert a["mutual_information"] > 0  # really sampled: the draws disagree


def test_multiswag_row_equals_the_ensemble_through_predict_probs(tmp_path, tiny_model_dir, data_files, capsys):
    """The table computes a mixture row from its members' predictions (each predicted once, shared with the
    single-member row); that is exactly the Ensemble's predictive through predict_probs with one generator per
    member. Run with ``--preset demo`` (make demo's): its placement is used, flags given after it win, and it says
    before it starts and under the table that it is not the defaults."""
    from swaglora.evaluate import draw_generator
    from swaglora.members import open_session
    from swaglora.posterior import Ensemble
    from swaglora.predict import predict_probs
    from swaglora.rundir import load_run_config
    from swaglora.selection import eval_data

    run = tmp_path / "run"
    assert main(["run", "--preset", "demo", "--out", str(run), *_common(tiny_model_dir, data_files), "--methods", "swag,multiswag",
                 "--dtype", "float32"]) == 0
    from swaglora.presets import PRESET_NOTES

    printed = capsys.readouterr()
    assert PRESET_NOTES["demo"] in printed.err  # before it starts
    table = printed.out.index("95% intervals over the questions")
    assert printed.out.index(PRESET_NOTES["demo"]) > table  # and under the table with its intervals
    cfg = load_run_config(run)
    assert (cfg.lora.layers, cfg.lora.targets, cfg.posterior.samples, cfg.data.train_limit) == ("top:2", "all-linear", 3, 400)
    session = open_session(cfg)
    members = [run / "members" / str(i) for i in range(2)]
    ensemble = Ensemble([load_posterior(m / "posteriors" / "swag") for m in members])
    seeds = [json.loads((m / "done.json").read_text())["seed"] for m in members]
    test = next(ex for name, _, ex in eval_data(cfg) if name == "test")
    probs = predict_probs(session.scorer, test, ensemble, cfg.posterior.samples,
                          [draw_generator(s, "swag") for s in seeds], batch_size=cfg.eval.batch_size, scale=0.5)
    def read(row: str) -> list[list[float]]:  # each question's probabilities over its own choices
        return [json.loads(line)["probs"] for line in (run / "eval" / "test" / row / "predictions.jsonl").read_text().splitlines()]

    assert probs.shape[0] == 2 * cfg.posterior.samples
    for saved, expected in ((read("multiswag"), probs.mean(0)), (read("swag"), probs[: cfg.posterior.samples].mean(0))):
        assert len(saved) == len(test)
        for got, want in zip(saved, expected):
            assert got == pytest.approx(want[: len(got)].tolist(), abs=1e-6) and float(want[len(got):].sum()) == 0.0
