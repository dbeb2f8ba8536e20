"""Predictions are kept in ``eval/.predictions/``: an interrupted evaluation resumes (what it finished is read
back, the rest predicted) and ends with the files of an evaluation that was never stopped; an evaluation run
again predicts only rows it has not predicted; a changed setting or a damaged file is predicted again, never read
stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import swaglora.evaluate as evaluate
from swaglora.cli import main
from swaglora.rundir import PREDICTION_STORE

from conftest import make_examples, write_jsonl

METHODS = "map,swa,swag,multiswag,ensemble,dropout"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("evalresume")
    train = write_jsonl(d / "train.jsonl", make_examples(24, 0, "tr"))
    test = write_jsonl(d / "test.jsonl", make_examples(10, 1, "te"))
    shift = write_jsonl(d / "shift.jsonl", make_examples(8, 2, "sh"))
    common = ["--model", str(tiny_model_dir), "--scoring", "cloze", "--data", str(train), "--test-data", str(test),
              "--shift", str(shift), "--epochs", "1", "--swag-epochs", "2", "--swag-every", "2", "--members", "2",
              "--swag-samples", "3", "--swag-max-rank", "2", "--batch-size", "8", "--lora-r", "2",
              "--lora-layers", "top:1", "--methods", METHODS, "--quiet"]
    run = d / "run"
    assert main(["train", "--out", str(run), *common]) == 0
    return run, ["--calibrate", "temperature"]


class _Counting:
    """``evaluate.row_probs`` that counts its calls and raises KeyboardInterrupt (Ctrl-C) on call ``stop_at``."""

    def __init__(self, monkeypatch, stop_at: int | None = None) -> None:
        self.calls, self.stop_at, self.real = 0, stop_at, evaluate.row_probs
        monkeypatch.setattr(evaluate, "row_probs", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def _evaluate(run: Path, out: Path, extra: list[str]) -> int:
    return main(["evaluate", "--run", str(run), "--out", str(out), *extra, "--quiet"])


def _files(out: Path) -> dict[str, object]:
    """Every evaluation file: predictions byte for byte, metrics without their wall-clock time and reuse count."""
    files: dict[str, object] = {}
    for f in sorted((out / "eval").rglob("*")):
        if f.suffix == ".jsonl":
            files[str(f.relative_to(out))] = f.read_bytes()
        elif f.name == "metrics.json":
            files[str(f.relative_to(out))] = {k: v for k, v in json.loads(f.read_text()).items()
                                               if k not in ("seconds", "reused_predictions")}
    return files


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory) -> tuple[Path, int]:
    run, extra = trained
    out = tmp_path_factory.mktemp("reference") / "eval"
    with pytest.MonkeyPatch.context() as mp:
        counting = _Counting(mp)
        assert _evaluate(run, out, extra) == 0
    return out, counting.calls


def test_every_prediction_is_made_once_and_kept(trained, reference, tmp_path, monkeypatch):
    out, calls = reference
    # 3 sets x (zero-shot; map, swag and dropout of member 0; map and swag of member 1; swa) = 21 predictions:
    # multiswag and ensemble reuse their members' (the swag and map rows' draws), nothing is predicted twice
    assert calls == 3 * 7
    assert len(list((out / "eval" / PREDICTION_STORE).glob("*.safetensors"))) == calls
    rows = {p.name for p in (out / "eval" / "test").iterdir()}
    assert rows == {name + ts for name in ["zero-shot", *METHODS.split(",")] for ts in ("", "+ts")}
    metrics = json.loads((out / "eval" / "test" / "swag" / "metrics.json").read_text())
    assert metrics["reused_predictions"] == 0 and metrics["seconds"] > 0
    # the same evaluation again, into a copy: nothing is predicted, the files are the same; a row read back has
    # no cost to report (its seconds are null)
    run, extra = trained
    again = tmp_path / "again"
    shutil.copytree(out, again)
    counting = _Counting(monkeypatch)
    assert _evaluate(run, again, extra) == 0
    assert counting.calls == 0
    assert _files(again) == _files(out)
    metrics = json.loads((again / "eval" / "test" / "swag" / "metrics.json").read_text())
    assert metrics["reused_predictions"] == 3 and metrics["seconds"] is None


def test_interrupted_evaluation_resumes_to_the_same_files(trained, reference, tmp_path, monkeypatch):
    run, extra = trained
    ref_out, total = reference
    out = tmp_path / "eval"
    _Counting(monkeypatch, stop_at=6)  # Ctrl-C during the 6th prediction: 5 are finished
    assert _evaluate(run, out, extra) == 130
    stored = sorted((out / "eval" / PREDICTION_STORE).glob("*.safetensors"))
    assert len(stored) == 5
    stored[0].write_bytes(stored[0].read_bytes()[:40])  # one cut short (a crash while it was written)
    resumed = _Counting(monkeypatch)
    assert _evaluate(run, out, extra) == 0
    assert resumed.calls == total - 4  # the 4 intact ones are read back, the damaged one is predicted again
    assert _files(out) == _files(ref_out)


def test_a_changed_setting_is_predicted_again(trained, reference, tmp_path, monkeypatch):
    run, extra = trained
    _, total = reference
    out = tmp_path / "eval"
    _Counting(monkeypatch, stop_at=6)
    assert _evaluate(run, out, extra) == 130
    assert len(list((out / "eval" / PREDICTION_STORE).glob("*.safetensors"))) == 5
    again = _Counting(monkeypatch)
    # the evaluation batch size changes the floating-point order of a prediction: nothing stored is its result
    assert _evaluate(run, out, [*extra, "--eval-batch-size", "3"]) == 0
    assert again.calls == total
    # the rows shown (--methods, --calibrate) are not part of a prediction: interrupted, then fewer rows
    other = tmp_path / "other"
    _Counting(monkeypatch, stop_at=7)  # rows in order: zero-shot and map (3 sets each) are finished
    assert _evaluate(run, other, extra) == 130
    fewer = _Counting(monkeypatch)
    assert _evaluate(run, other, ["--methods", "map,swag"]) == 0
    assert fewer.calls == 3  # only swag's 3 sets are predicted


def test_a_new_set_predicts_only_that_set(trained, reference, tmp_path, monkeypatch):
    """Sets are in a prediction's key by name and content, not by the flags that chose them: evaluating first
    without the shift set, then with it, predicts the shift set only, and gives the reference files."""
    run, extra = trained
    ref_out, total = reference
    out = tmp_path / "eval"
    first = _Counting(monkeypatch)
    assert _evaluate(run, out, [*extra, "--shift", ""]) == 0
    assert first.calls == 2 * 7  # validation and test
    assert not (out / "eval" / "shift").exists()
    second = _Counting(monkeypatch)
    assert _evaluate(run, out, extra) == 0
    assert second.calls == 7
    assert _files(out) == _files(ref_out)
