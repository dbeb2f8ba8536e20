"""`swaglora predict` and `swaglora.load` on a tiny-model run: the evaluation's probabilities, the stored
abstention rule, metrics with answers, standard input/output, and bad input refused before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swaglora
from swaglora import members, metrics
from swaglora.cli import main

from conftest import make_examples, write_jsonl

RISK = 0.5  # stored at evaluation
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _up_to_four(rows: list[dict]) -> list[dict]:
    return [r for r in rows if len(r["choices"]) <= 4]


def _without_answers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "answer"} for r in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """Two members, letter scoring, trained on questions of at most 4 choices; evaluated with temperature scaling
    and the abstention rule for RISK stored."""
    d = tmp_path_factory.mktemp("predict")
    write_jsonl(d / "train.jsonl", _up_to_four(make_examples(96, 0, "tr")))
    write_jsonl(d / "test.jsonl", _up_to_four(make_examples(30, 1, "te")))
    run = d / "run"
    common = ["--model", str(tiny_model_dir), "--scoring", "letter", "--dtype", "float32", "--data", str(d / "train.jsonl"),
              "--test-data", str(d / "test.jsonl"), "--shift", "", "--epochs", "2", "--lr", "0.01", "--swag-epochs", "2",
              "--swag-every", "2", "--members", "2", "--swag-samples", "3", "--swag-max-rank", "2", "--batch-size", "8",
              "--lora-r", "2", "--lora-targets", "all-linear", "--lora-layers", "top:2", "--quiet"]  # the placement the oracle was made for (the defaults then): with q,v only the tiny run misses RISK
    assert main(["train", "--out", str(run), *common]) == 0
    assert main(["evaluate", "--run", str(run), "--calibrate", "temperature", "--abstain-risk", str(RISK), "--quiet"]) == 0
    return run


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _predict(run: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def questions(run) -> Path:
    """The run's test set without its answers."""
    rows = _lines(run.parent / "test.jsonl")
    return write_jsonl(run.parent / "questions.jsonl", _without_answers(rows))


@pytest.mark.parametrize("method", ["multiswag", "swag", "map", "swag+ts"])
def test_predictions_equal_the_evaluation_set_bit_for_bit(run, questions, tmp_path, capsys, method):
    out = tmp_path / "out.jsonl"
    assert _predict(run, questions, out, "--method", method) == 0
    captured = capsys.readouterr()
    assert "accuracy" not in captured.out + captured.err  # no answers, no metrics
    got, evaluated = _lines(out), _lines(run / "eval" / "test" / method / "predictions.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in evaluated]
    for g, e in zip(got, evaluated):
        assert g["probs"] == e["probs"]  # exact: same posterior, samples, scale, draws and batches in float32
        assert (g["prediction"], g["confidence"], g["entropy"]) == (e["prediction"], e["confidence"], e["total_entropy"])
        assert g.get("mutual_information") == (e["mutual_information"] if method in ("multiswag", "swag") else None)
        assert set(g) >= {"id", "probs", "labels", "prediction", "confidence", "entropy", "abstain", "threshold"}


def test_stored_threshold_is_used_and_its_realised_risk_reported(run, tmp_path, capsys):
    method = "multiswag"
    stored = json.loads((run / "eval" / "validation" / method / "abstention.json").read_text())
    val = _lines(run / "eval" / "validation" / method / "predictions.jsonl")
    # oracle: the smallest observed validation confidence whose answered set has error rate <= RISK
    conf = sorted({r["confidence"] for r in val}, reverse=True)
    ok = [t for t in conf if (lambda kept: sum(not r["correct"] for r in kept) / len(kept) <= RISK)(
        [r for r in val if r["confidence"] >= t])]
    assert ok, "the tiny run should reach the target risk on validation"
    assert stored["threshold"] == min(ok) and stored["target_risk"] == RISK and stored["n"] == len(val)
    kept = [r for r in val if r["confidence"] >= min(ok)]
    assert stored["coverage"] == len(kept) / len(val)
    assert stored["risk"] == sum(not r["correct"] for r in kept) / len(kept)

    out = tmp_path / "out.jsonl"
    assert _predict(run, run.parent / "test.jsonl", out, "--method", method) == 0  # with answers; rule not named
    printed = capsys.readouterr()
    assert "stored at evaluation" in printed.err
    got = _lines(out)
    assert all(r["threshold"] == stored["threshold"] for r in got)
    assert [r["abstain"] for r in got] == [r["confidence"] < stored["threshold"] for r in got]
    test = _lines(run / "eval" / "test" / method / "predictions.jsonl")
    answered = [r for r in test if r["confidence"] >= stored["threshold"]]
    risk = sum(not r["correct"] for r in answered) / len(answered) if answered else 0.0
    assert f"risk {risk:.4f}, coverage {len(answered) / len(test):.4f}" in printed.out


def test_metrics_with_answers_are_those_of_metrics_py_and_of_the_evaluation(run, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _predict(run, run.parent / "test.jsonl", out, "--method", "swag") == 0
    printed = capsys.readouterr().out
    got = _lines(out)
    labels = ["ABCD".index(r["answer"]) for r in _lines(run.parent / "test.jsonl")]
    probs = torch.zeros(len(got), 4, dtype=torch.float64)
    for i, r in enumerate(got):
        probs[i, : len(r["probs"])] = torch.tensor(r["probs"], dtype=torch.float64)
    mine = metrics.summarize(probs, torch.tensor(labels))
    saved = json.loads((run / "eval" / "test" / "swag" / "metrics.json").read_text())
    for key in ("accuracy", "ece", "nll"):
        assert mine[key] == pytest.approx(saved[key], abs=1e-12)
        assert f"{key} {saved[key]:.4f}" in printed
    assert f"the {len(got)} questions with an answer" in printed


def test_default_method_is_the_lowest_validation_nll(run, questions, tmp_path, capsys):
    nll = {p.parent.name: json.loads(p.read_text())["nll"] for p in (run / "eval" / "validation").glob("*/metrics.json")}
    best = min(nll, key=nll.get)
    out = tmp_path / "out.jsonl"
    assert _predict(run, questions, out) == 0
    assert f"method {best}: the lowest validation NLL ({nll[best]:.4f})" in capsys.readouterr().err
    assert [r["probs"] for r in _lines(out)] == [r["probs"] for r in _lines(run / "eval" / "test" / best / "predictions.jsonl")]


def test_a_risk_without_stored_threshold_is_chosen_on_validation(run, questions, tmp_path, capsys):
    risk = 0.6
    out = tmp_path / "out.jsonl"
    assert _predict(run, questions, out, "--method", "swag", "--abstain-risk", str(risk)) == 0
    assert "no threshold stored for risk 0.6" in capsys.readouterr().err
    val = _lines(run / "eval" / "validation" / "swag" / "predictions.jsonl")
    expected = metrics.abstention_threshold([r["confidence"] for r in val], [r["correct"] for r in val], risk)
    assert expected != min(r["confidence"] for r in val)  # a threshold that abstains somewhere
    assert all(r["threshold"] == expected for r in _lines(out))  # the re-predicted validation is the evaluation's


def test_standard_input_and_output_compose_in_a_pipe(run, questions, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    text = questions.read_text()
    done = subprocess.run([sys.executable, "-m", "swaglora", "predict", "--run", str(run), "--data", "-", "--out", "-",
                           "--method", "multiswag"], input=text, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]  # nothing but JSON on standard output
    evaluated = _lines(run / "eval" / "test" / "multiswag" / "predictions.jsonl")
    assert [r["probs"] for r in got] == [r["probs"] for r in evaluated]
    assert "predict" in done.stderr  # the progress bar went to standard error


def test_python_api_predicts_like_the_command_line(run, questions, tmp_path):
    p = swaglora.load(run, method="multiswag")
    rows = _lines(questions)
    batch = p.predict_batch(rows)
    evaluated = _lines(run / "eval" / "test" / "multiswag" / "predictions.jsonl")
    assert [b.probs for b in batch] == [r["probs"] for r in evaluated]
    assert [b.id for b in batch] == [r["id"] for r in rows]
    assert all(b.threshold == batch[0].threshold for b in batch)
    one = p.predict(question=rows[0]["question"], choices=rows[0]["choices"])
    assert one.id is None and one.labels == rows[0]["labels"]
    assert one.probs == pytest.approx(batch[0].probs, abs=1e-6)  # alone in its batch: equal up to float rounding
    assert sum(one.probs) == pytest.approx(1.0, abs=1e-6) and one.prediction == one.labels[max(range(len(one.probs)), key=one.probs.__getitem__)]
    assert one.mutual_information is not None and one.mutual_information >= 0
    with pytest.raises(ValueError, match="predict_batch:1: field 'choices'"):
        p.predict_batch([{"question": "q?", "choices": ["only one"]}])


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def test_load_refuses_a_run_of_another_base_model_lora_setup_or_format(run, tmp_path, tiny_model_dir):
    from transformers import LlamaForCausalLM

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    model = LlamaForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(other)
    copy = _copy(run, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["name"] = str(other)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base_model"):
        swaglora.load(copy, method="swag")

    config["model"]["name"] = str(tiny_model_dir)
    config["lora"]["alpha"] = config["lora"]["alpha"] * 2  # same shapes, another LoRA setup
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lora"):
        swaglora.load(copy, method="swag")

    marker = json.loads((copy / "swaglora_run.json").read_text())
    (copy / "swaglora_run.json").write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(ValueError, match="run format 99"):
        swaglora.load(copy, method="swag")


@pytest.fixture
def no_model(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bad input reached model loading")

    monkeypatch.setattr(members, "load_model", forbidden)


def _one_error(capsys, code: int, expected: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("swaglora: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err


def _bad_data(tmp_path: Path, run: Path, case: str) -> Path:
    rows = _without_answers(_lines(run.parent / "test.jsonl"))[:3]
    path = tmp_path / "bad.jsonl"
    if case == "malformed":
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-3] + "\n")
    elif case == "missing":
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({k: v for k, v in rows[1].items() if k != "choices"}) + "\n")
    elif case == "five":
        five = {"id": "x5", "question": "Which?", "choices": ["a", "b", "c", "d", "e"], "labels": list("ABCDE")}
        write_jsonl(path, [rows[0], rows[1], five])
    elif case == "answer":
        write_jsonl(path, [rows[0], {**rows[1], "answer": "Z"}])
    return path


@pytest.mark.parametrize(("case", "expected"), [
    ("malformed", "bad.jsonl:2: malformed JSON"),
    ("missing", "bad.jsonl:2: field 'choices': missing required field"),
    ("answer", "bad.jsonl:2: field 'answer': 'Z' is not one of labels"),
    ("five", "question 'x5' (line 3) has 5 choices, but"),
])
def test_bad_questions_fail_before_the_model_loads(run, tmp_path, capsys, no_model, case, expected):
    _one_error(capsys, _predict(run, _bad_data(tmp_path, run, case), tmp_path / "out.jsonl", "--method", "swag"), expected)
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_runs_methods_and_flags_fail_before_the_model_loads(run, questions, tmp_path, capsys, no_model):
    out = tmp_path / "out.jsonl"
    _one_error(capsys, _predict(tmp_path / "nowhere", questions, out), "no such run directory")
    _one_error(capsys, _predict(run, questions, out, "--method", "swagg"), "unknown method 'swagg'; rows: ")
    _one_error(capsys, _predict(run, questions, out, "--method", "swag", "--abstain-risk", "1.5"), "--abstain-risk must be in (0, 1)")
    _one_error(capsys, _predict(run, questions, tmp_path, "--method", "swag"), "is a directory")
    _one_error(capsys, _predict(run, tmp_path / "missing.jsonl", out, "--method", "swag"), "file not found")
    copy = _copy(run, tmp_path)
    shutil.rmtree(copy / "members" / "1" / "posteriors" / "swag")
    _one_error(capsys, _predict(copy, questions, out, "--method", "multiswag"),
               "has no 'swag' posterior and it can only be collected during training")
    shutil.rmtree(copy / "eval" / "validation" / "swag+ts")
    _one_error(capsys, _predict(copy, questions, out, "--method", "swag+ts"), "has no temperature for swag+ts")
    shutil.rmtree(copy / "eval")
    _one_error(capsys, _predict(copy, questions, out), "has no evaluated rows")
    assert not out.exists()


def test_an_evaluation_without_the_risk_removes_the_stale_rule(run, questions, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    assert main(["evaluate", "--run", str(copy), "--methods", "swag", "--quiet"]) == 0
    assert not (copy / "eval" / "validation" / "swag" / "abstention.json").exists()
    assert (copy / "eval" / "validation" / "multiswag" / "abstention.json").exists()  # not re-evaluated: still valid
    capsys.readouterr()
    out = tmp_path / "out.jsonl"
    assert _predict(copy, questions, out, "--method", "swag") == 0
    assert "abstention" not in capsys.readouterr().err
    assert all(r["abstain"] is False and r["threshold"] is None for r in _lines(out))  # no rule, no abstention
