"""Never lose a user's files, reject every bad input before work starts, never show a traceback (issue 10).

Bad input must fail with exit code 2 and one ``swaglora: error:`` line, before the model's weights are loaded
or any training step runs (``no_work`` makes both fail loudly) and without writing anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from swaglora import io, members, rundir, selection, validate
from swaglora.cli import main

from conftest import make_examples, write_jsonl


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    long_choices = make_examples(6, 3, "lc")
    long_choices[2]["choices"] = [" ".join(["stone"] * 80)] * len(long_choices[2]["choices"])
    bad = make_examples(5, 4, "bd")
    bad[2]["answer"] = "Z"
    return {
        "train": write_jsonl(d / "train.jsonl", make_examples(32, 0, "tr")),
        "test": write_jsonl(d / "test.jsonl", make_examples(16, 1, "te")),
        "shift": write_jsonl(d / "shift.jsonl", make_examples(12, 2, "sh")),
        "long": write_jsonl(d / "long.jsonl", long_choices),
        "bad": write_jsonl(d / "bad.jsonl", bad),
    }


def tiny_args(model_dir, files) -> list[str]:
    return ["--model", str(model_dir), "--scoring", "cloze", "--dtype", "float32", "--data", str(files["train"]),
            "--test-data", str(files["test"]), "--shift", str(files["shift"]), "--epochs", "1", "--swag-epochs", "2",
            "--swag-every", "2", "--members", "2", "--swag-samples", "2", "--swag-max-rank", "2", "--batch-size", "8",
            "--lora-r", "2", "--eval-limit", "8", "--quiet"]


@pytest.fixture
def no_work(monkeypatch):
    """Loading model weights or a training step fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input reached model loading or training")

    monkeypatch.setattr(members, "load_model", forbidden)
    monkeypatch.setattr(members, "fit", forbidden)


def one_error(capsys, code: int, expected: str) -> str:
    """The command failed with exit code 2 and a single error line containing ``expected``, no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("swaglora: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


# ------------------------------------------------------------------ data loss

def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_model_dir, files, capsys, no_work):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes")
    (user / "sub" / "thesis.tex").write_text("chapter 1")
    before = snapshot(user)
    for command in ("train", "run"):
        code = main([command, *tiny_args(tiny_model_dir, files), "--out", str(user), "--overwrite"])
        one_error(capsys, code, "not empty and not a swaglora run (no swaglora_run.json); swaglora writes into, "
                                "or deletes with --overwrite, only its own run directories")
        code = main([command, *tiny_args(tiny_model_dir, files), "--out", str(user)])
        one_error(capsys, code, "not a swaglora run")
    assert snapshot(user) == before


def test_a_run_with_other_settings_is_refused_naming_each_value(tmp_path, tiny_model_dir, files, capsys, no_work):
    """Resuming into a run made with other result-changing settings names each setting with both values (e.g. a
    run trained when swag.every was 25 by default, resumed where it is auto); evaluation settings may differ."""
    from swaglora.cli import build_parser, resolve_config
    from swaglora.config import apply_overrides

    run = tmp_path / "run"
    args = ["train", *tiny_args(tiny_model_dir, files), "--out", str(run)]
    cfg = resolve_config(build_parser().parse_args(args))
    rundir.save_config(apply_overrides(cfg, {"swag.every": "3", "lora.r": 4, "eval.limit": 5}), run)
    before = snapshot(run)
    line = one_error(capsys, main(args), "holds a run with a different config (lora.r: 4 there, 2 here; swag.every: '3' "
                                         "there, '2' here); give the same settings, another --out or --overwrite")
    assert "eval.limit" not in line
    assert snapshot(run) == before
    # a run trained when swag.every's default was 25, resumed with the default auto: the hint says what to give
    old = tmp_path / "old"
    at = args.index("--swag-every")
    auto = args[:at] + args[at + 2:-1] + [str(old)]
    rundir.save_config(apply_overrides(resolve_config(build_parser().parse_args(auto)), {"swag.every": "25"}), old)
    one_error(capsys, main(auto), "(swag.every: '25' there, 'auto' here); give the same settings (--swag-every 25 for "
                                  "a run trained when 25 was the default)")
    # only an evaluation setting differs: accepted, and the config file now carries it
    rundir.save_config(apply_overrides(cfg, {"swag.every": "3", "lora.r": 4, "eval.limit": 7}), run)
    assert json.loads((run / "config.json").read_text())["eval"]["limit"] == 7


def test_overwrite_refuses_a_marker_without_format_version(tmp_path, tiny_model_dir, files, capsys, no_work):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "swaglora_run.json").write_text('{"hello": 1}')
    (fake / "notes.txt").write_text("keep")
    code = main(["train", *tiny_args(tiny_model_dir, files), "--out", str(fake), "--overwrite"])
    one_error(capsys, code, "not a swaglora run")
    assert (fake / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("out", ["", " ", ".", "..", "/", "~", "HOME"])
def test_out_may_not_be_empty_cwd_a_parent_root_or_home(tmp_path, tiny_model_dir, files, capsys, monkeypatch, no_work, out):
    repo = tmp_path / "home" / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "README.md").write_text("my project")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(repo)
    before = snapshot(tmp_path)
    out = str(tmp_path / "home") if out == "HOME" else out
    code = main(["run", *tiny_args(tiny_model_dir, files), "--out", out, "--overwrite"])
    message = one_error(capsys, code, "--out")
    assert any(w in message for w in ("is empty", "the current directory", "a parent of the current directory",
                                      "the home directory"))
    assert snapshot(tmp_path) == before


def test_a_foreign_model_directory_keeps_its_config_json(tmp_path, tiny_model_dir, files, capsys, no_work):
    model_copy = tmp_path / "hf-model"
    shutil.copytree(tiny_model_dir, model_copy)
    before = snapshot(model_copy)
    for extra in (["--device", "tpu"], [], ["--overwrite"]):
        code = main(["train", *tiny_args(tiny_model_dir, files), "--out", str(model_copy), *extra])
        one_error(capsys, code, "--device 'tpu'" if extra == ["--device", "tpu"] else "not a swaglora run")
    assert snapshot(model_copy) == before


def test_out_pointing_at_a_file_or_below_one(tmp_path, tiny_model_dir, files, capsys, no_work):
    target = tmp_path / "results.txt"
    target.write_text("keep")
    one_error(capsys, main(["train", *tiny_args(tiny_model_dir, files), "--out", str(target)]), "is a file, not a directory")
    one_error(capsys, main(["train", *tiny_args(tiny_model_dir, files), "--out", str(target / "run")]), "is a file, not a directory")
    assert target.read_text() == "keep"


def test_out_that_cannot_be_written(tmp_path, tiny_model_dir, files, capsys, monkeypatch, no_work):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    code = main(["train", *tiny_args(tiny_model_dir, files), "--out", str(tmp_path / "run")])
    one_error(capsys, code, f"cannot write to {tmp_path} (read-only file system or no permission)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_os_errors_while_writing_are_one_line(tmp_path, tiny_model_dir, files, capsys, monkeypatch, no_work, err):
    def fail(path, obj):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(rundir, "atomic_write_json", fail)
    code = main(["train", *tiny_args(tiny_model_dir, files), "--out", str(tmp_path / "run")])
    one_error(capsys, code, f"{os.strerror(err)}")


# ------------------------------------------------------------------ every bad input before work starts

BAD_RUN_INPUT = [
    (["--shift", "nosuch"], "Unknown dataset 'nosuch'"),
    (["--shift", "mmlu:nosuch"], "Unknown MMLU group or subject 'nosuch'"),
    (["--shift", "BAD"], "bad.jsonl:3: field 'answer': 'Z' is not one of labels"),
    (["--test-data", "missing.jsonl"], "file not found"),
    (["--data", "BAD"], "bad.jsonl:3: field 'answer'"),
    (["--data", "DIR"], "is a directory; give a .jsonl"),
    (["--config", "DIR"], "is a directory; give a YAML or JSON file"),
    (["--test-data", "LONG", "--max-length", "64"], "lc2' (line 3): its choices alone take"),
    (["--abstain-risk", "2"], "--abstain-risk must be in (0, 1)"),
    (["--abstain-risk", "0"], "--abstain-risk must be in (0, 1)"),
    (["--lora-targets", "nosuch"], "--lora-targets 'nosuch': nosuch is not a module"),
    (["--lora-layers", "top:100"], "--lora-layers top:100: the model has 2 layers; use top:1 .. top:2 or all"),
    (["--weight-decay", "-1"], "train.weight_decay must be >= 0"),
    (["--eval-batch-size", "0"], "eval.batch_size must be >= 1"),
    (["--threads", "-1"], "train.threads must be >= 0"),
    (["--lora-alpha", "0"], "lora.alpha must be > 0"),
    (["--epochs", "0"], "train.epochs must be >= 1"),
    (["--methods", "multiswag,ensemble", "--members", "1"], "none of --methods can be built with these settings: "
                                                          "multiswag needs --members 2 or more"),
    (["--seeds", "0,0"], "--seeds '0,0' repeats seed 0"),
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", "a,b"], "--seeds 'a,b': expected comma-separated integers"),
    (["--model", "/nonexistent"], "--model '/nonexistent' does not exist"),
    (["--model", "DIR"], "directory has no config.json"),
    (["--device", "tpu"], "--device 'tpu' is not a device name; valid here: auto, cpu"),
    (["--device", "cuda:7"], "--device cuda:7"),
]


@pytest.mark.parametrize("extra, expected", BAD_RUN_INPUT, ids=[" ".join(a) for a, _ in BAD_RUN_INPUT])
def test_bad_input_fails_before_any_work(tmp_path, tiny_model_dir, files, capsys, no_work, extra, expected):
    names = {"BAD": str(files["bad"]), "LONG": str(files["long"]), "DIR": str(tmp_path / "data")}
    extra = [names.get(a, a) for a in extra]
    out = tmp_path / "run"
    one_error(capsys, main(["run", *tiny_args(tiny_model_dir, files), *extra, "--out", str(out)]), expected)
    assert not out.exists()


def test_cuda_without_cuda(tmp_path, tiny_model_dir, files, capsys, no_work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["run", *tiny_args(tiny_model_dir, files), "--device", "cuda", "--out", str(tmp_path / "run")])
    one_error(capsys, code, "--device cuda: no cuda device on this machine")


@pytest.mark.parametrize("extra, expected", [
    (["--task", "nosuch", "--data", "", "--test-data", ""], "Unknown task 'nosuch'"),
    (["--task", "obqa", "--data", "", "--test-data", "", "--split", "nosuch"], "Unknown split 'nosuch' for task 'obqa'"),
])
def test_bad_task_and_split(tmp_path, tiny_model_dir, files, capsys, no_work, extra, expected):
    out = tmp_path / "run"
    one_error(capsys, main(["run", *tiny_args(tiny_model_dir, files), *extra, "--out", str(out)]), expected)
    assert not out.exists()


@pytest.mark.parametrize("index", ["-1", "2"])
def test_member_index_out_of_range(tmp_path, tiny_model_dir, files, capsys, no_work, index):
    code = main(["train", *tiny_args(tiny_model_dir, files), "--member-index", index, "--out", str(tmp_path / "run")])
    one_error(capsys, code, f"--member-index {index}: must be in 0..1 (--members 2)")
    assert not (tmp_path / "run").exists()


def test_hub_id_offline_fails_fast_in_one_line(tmp_path, tiny_model_dir, files, capsys, monkeypatch, no_work):
    monkeypatch.setattr(validate, "_hub_reachable", lambda: False)
    code = main(["run", *tiny_args(tiny_model_dir, files), "--model", "nosuch-org/nosuch-model", "--out", str(tmp_path / "r")])
    one_error(capsys, code, "--model nosuch-org/nosuch-model: not in the local Hugging Face cache and the hub cannot be reached")


def test_evaluate_zero_shot_checks_before_loading(tmp_path, tiny_model_dir, files, capsys, no_work):
    out = tmp_path / "zs"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--data", str(files["long"]), "--max-length", "64",
                 "--out", str(out), "--quiet"])
    one_error(capsys, code, "its choices alone take")
    assert not out.exists()


def test_report_rejects_bad_risk_and_foreign_out(tmp_path, capsys):
    one_error(capsys, main(["report", str(tmp_path), "--abstain-risk", "1.5"]), "--abstain-risk must be in (0, 1)")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my report")
    one_error(capsys, main(["report", str(tmp_path), "--out", str(tmp_path / "mine")]), "not a swaglora run")
    assert (tmp_path / "mine" / "report.md").read_text() == "my report"


# ------------------------------------------------------------------ warnings: what will (not) happen

def test_warnings_say_what_is_skipped_or_cut(tmp_path, tiny_model_dir, files, capsys):
    from swaglora.cli import build_parser, resolve_config

    args = build_parser().parse_args(["run", *tiny_args(tiny_model_dir, files), "--members", "1", "--lr", "1e6",
                                      "--max-length", "12", "--out", str(tmp_path / "r")])
    plan = validate.preflight(resolve_config(args), "run", tmp_path / "r")
    err = capsys.readouterr().err
    assert plan.rows == ["zero-shot", "map", "swa", "swag-diag", "swag"]
    assert "--methods multiswag is skipped: it needs --members 2 or more (--members is 1)" in err
    assert "--methods ensemble is skipped" in err
    assert "--lr 1e+06 is far above the usual" in err
    # "Question: Which word is <w>?\nAnswer:" is longer than 12 tokens minus the choices for every question
    n_train = len(selection.training_data(resolve_config(args))[0])
    assert f"{files['train']} (training): {n_train} of {n_train} questions are longer than --max-length 12" in err
    assert not (tmp_path / "r").exists()


def test_long_choices_are_a_counted_warning(tmp_path, tiny_model_dir, files, capsys):
    rows = make_examples(5, 5, "ch")
    rows[1]["choices"][0] = " ".join(["river"] * 70)  # about 70 tokens: more than the 64 cloze scores
    rows[3]["choices"][1] = " ".join(["cloud"] * 90)
    path = write_jsonl(tmp_path / "longchoice.jsonl", rows)
    from swaglora.cli import build_parser, resolve_config

    args = build_parser().parse_args(["evaluate", "--model", str(tiny_model_dir), "--scoring", "cloze",
                                      "--data", str(path), "--out", str(tmp_path / "o")])
    validate.preflight(resolve_config(args), "base", tmp_path / "o")
    assert f"{path}: 2 of 5 questions have choices longer than 64 tokens; cloze scoring uses only their first 64" \
        in capsys.readouterr().err


# ------------------------------------------------------------------ real runs: stale data, damaged posteriors, permissions

def test_changed_data_damaged_posteriors_and_permissions(tmp_path, tiny_model_dir, files, capsys):
    old_umask = os.umask(0o027)
    try:
        run = tmp_path / "run"
        args = [*tiny_args(tiny_model_dir, files), "--members", "1", "--methods", "map,swag", "--out", str(run)]
        assert main(["train", *args]) == 0
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")}
        assert {m for p, m in modes.items() if p.is_file()} == {0o640}
        assert {m for p, m in modes.items() if p.is_dir()} == {0o750}
    finally:
        os.umask(old_umask)
    marker = json.loads((run / "swaglora_run.json").read_text())
    assert marker["format_version"] == rundir.RUN_FORMAT_VERSION
    assert marker["data_sha256"] == {str(files["train"]): hashlib.sha256(files["train"].read_bytes()).hexdigest()}
    capsys.readouterr()

    # the same training file, edited: the finished member is stale
    rows = make_examples(32, 0, "tr")
    rows[0]["question"] = "Which word is edited?"
    write_jsonl(files["train"], rows)
    before = snapshot(run)
    one_error(capsys, main(["train", *args]), f"--data {files['train']} changed since {run} was trained on it")
    one_error(capsys, main(["evaluate", "--run", str(run), "--quiet"]), "changed since")
    assert snapshot(run) == before
    assert main(["train", *args, "--overwrite"]) == 0  # retrains on the new contents
    done = json.loads((run / "members" / "0" / "done.json").read_text())
    assert done["n_train"] == len(selection.training_data(rundir.load_run_config(run))[0])

    # a LoRA of another shape: one line, before any row is evaluated
    capsys.readouterr()
    message = one_error(capsys, main(["evaluate", "--run", str(run), "--lora-r", "4", "--quiet"]), "do not match")
    assert "more difference(s)" in message
    assert not (run / "eval").exists()

    # a truncated posterior file of the last row: found before the first row is evaluated
    tensors = run / "members" / "0" / "posteriors" / "swag" / "posterior.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    one_error(capsys, main(["evaluate", "--run", str(run), "--quiet"]), "cannot read safetensors file")
    assert not (run / "eval").exists()


def test_nan_loss_message_does_not_invent_a_checkpoint(tmp_path, tiny_model_dir, files, capsys, monkeypatch):
    import math
    import types

    from swaglora import train

    nan_math = types.SimpleNamespace(**{k: getattr(math, k) for k in dir(math) if not k.startswith("_")})
    nan_math.isfinite = lambda x: False  # every loss of this training is "non-finite"
    monkeypatch.setattr(train, "math", nan_math)
    code = main(["train", *tiny_args(tiny_model_dir, files), "--members", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite loss" in err and "no checkpoint was written" in err and "Traceback" not in err


def test_quiet_silences_the_loading_weights_bar(tmp_path, tiny_model_dir, files, capfd):
    code = main(["evaluate", "--model", str(tiny_model_dir), "--data", str(files["test"]), "--out", str(tmp_path / "zs"),
                 "--quiet"])
    assert code == 0
    assert "Loading weights" not in capfd.readouterr().err
    assert json.loads((tmp_path / "zs" / "swaglora_run.json").read_text())["format_version"] == 1
    # the zero-shot directory is ours now: evaluating into it again is allowed
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(files["test"]), "--out", str(tmp_path / "zs"),
                 "--quiet"]) == 0


def test_genuine_bugs_keep_their_traceback(tmp_path, tiny_model_dir, files, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(members, "open_session", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *tiny_args(tiny_model_dir, files), "--out", str(tmp_path / "run")])


def test_io_temp_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(io.make_temp_dir(".x-", tmp_path).stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_seeds_are_all_checked_before_the_first_one_trains(tmp_path, tiny_model_dir, files, capsys):
    out = tmp_path / "seeds"
    args = ["run", *tiny_args(tiny_model_dir, files), "--members", "1", "--methods", "map", "--swag-epochs", "0",
            "--seeds", "0,1", "--out", str(out)]
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "notes.txt").write_text("mine")
    one_error(capsys, main(args), f"--out {out}: not empty and not a swaglora run")  # the parent is not ours
    rundir.write_run_marker(out)  # as an earlier `run --seeds` leaves it
    one_error(capsys, main(args), f"--out {out / 'seed-1'}: not empty and not a swaglora run")
    assert sorted(p.name for p in out.iterdir()) == ["seed-1", "swaglora_run.json"]  # seed 0 was not trained first
    (out / "seed-1" / "notes.txt").unlink()
    assert main(args) == 0
    assert validate.is_run_dir(out) and all(validate.is_run_dir(out / f"seed-{s}") for s in (0, 1))
    assert (out / "report.md").is_file()
    assert main(["report", str(out / "seed-0"), str(out / "seed-1"), "--out", str(tmp_path / "rep")]) == 0
    assert main(["report", str(out / "seed-0"), str(out / "seed-1"), "--out", str(tmp_path / "rep")]) == 0  # ours now
    assert (tmp_path / "rep" / "report.md").is_file()


def test_a_model_that_is_not_a_causal_lm_is_one_line(tmp_path, tiny_model_dir, files, capsys, no_work):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    code = main(["run", *tiny_args(tiny_model_dir, files), "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "r")])
    one_error(capsys, code, "BertLMHeadModel is not a Llama-style causal LM")
    assert not (tmp_path / "r").exists()
