"""Runs that survive: kill -9, Ctrl-C, a crash while checkpointing or a NaN, then rerun the same command.

Every resumed run must end with the same MAP posterior, SWAG state, adapter and training log as an
uninterrupted run, bitwise (CPU, one thread; LoRA dropout 0.1, so the dropout RNG must be restored too), in the
dtype ``auto`` takes: fp32 in ``make test``, bf16 in its bf16 pass (one test, marked).
The interrupted runs are real ``python -m swaglora train`` processes; to make sure the signal lands in the
phase under test they sleep a little per optimiser step (``lr_at`` wrapped in the child, nothing else changed).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swaglora import checkpoint
from swaglora.cli import main
from swaglora.io import load_safetensors
from swaglora.scoring import Scorer

from conftest import make_examples, write_jsonl

STEPS_PER_EPOCH = 7  # 34 examples - 7 validation = 27 training, batch 4
MAP_STEPS = 2 * STEPS_PER_EPOCH


def _args(model_dir: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(run), "--model", str(model_dir), "--scoring", "cloze", "--data", str(data),
            "--epochs", "2", "--swag-epochs", "2", "--swag-every", "2", "--members", "1", "--batch-size", "4",
            "--lora-r", "2", "--lora-layers", "top:1", "--threads", "1", "--quiet",
            # TFB is fitted at the end of the MAP phase (a range where this tiny model gets sigma > 0)
            "--methods", "map,swa,swag-diag,swag,tfb", "--tfb-sigma-min", "0", "--tfb-sigma-max", "0.002",
            "--tfb-epsilon", "0.01", *extra]


def _slow(delay: float, progress: Path | None = None) -> list[str]:
    """``python -m swaglora`` that sleeps ``delay`` s per optimiser step, so a signal lands where the test wants it.

    With ``progress``, the child also writes the number of finished optimiser steps there before each sleep
    (``lr_at`` is called with that number just before the next step), so a test can wait for steps that no
    checkpoint records."""
    record = f"open({str(progress)!r}, 'w').write(str(a[0])), " if progress is not None else ""
    boot = (f"import sys, time, swaglora.train as t; lr_at = t.lr_at; t.lr_at = lambda *a: ({record}time.sleep({delay}), lr_at(*a))[-1]; "
            "from swaglora.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", boot]


PLAIN = [sys.executable, "-m", "swaglora"]


def _data_file(directory: Path) -> Path:
    return write_jsonl(directory / "train.jsonl", make_examples(34, 0, "tr"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _data_file(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(tiny_model_dir, data, run, "--checkpoint-every", "1")) == 0
    return run


def _ckpt_dir(run: Path) -> Path:
    return run / "members" / "0" / "checkpoints"


def _steps(run: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in _ckpt_dir(run).iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return []


def _run(cmd: list[str], tmp_path: Path, name: str) -> tuple[int, str]:
    with open(tmp_path / f"{name}.err", "w+") as err:
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=300).returncode
        err.seek(0)
        return rc, err.read()


def _finished_steps(progress: Path) -> list[int]:
    try:
        return [int(progress.read_text())]
    except (FileNotFoundError, ValueError):  # not started yet, or caught between open and write
        return []


def _signal_when(cmd: list[str], run: Path, tmp_path: Path, ready, sig: int, steps=None) -> tuple[int, str]:
    """Start ``cmd``, wait until a step from ``steps()`` (default: the checkpoint steps) satisfies ``ready``,
    send ``sig``; (exit code, stderr)."""
    steps = steps or (lambda: _steps(run))
    with open(tmp_path / "interrupted.err", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        try:
            while not any(ready(s) for s in steps()):
                assert proc.poll() is None, "training ended before the signal could be sent"
                assert time.monotonic() < deadline, "no suitable checkpoint appeared"
                time.sleep(0.01)
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        return rc, err.read()


def _artifacts(run: Path) -> dict[str, torch.Tensor]:
    member = run / "members" / "0"
    out = {}
    for name in ("map", "swag", "swag-diag", "tfb"):
        out.update({f"{name}/{k}": v for k, v in load_safetensors(member / "posteriors" / name / "posterior.safetensors").items()})
    out.update({f"adapter/{k}": v for k, v in load_safetensors(member / "adapter" / "adapter_model.safetensors").items()})
    return out


def assert_same_as_reference(run: Path, reference: Path) -> None:
    got, want = _artifacts(run), _artifacts(reference)
    assert got.keys() == want.keys()
    assert {"swag/mean", "swag/sq_mean", "swag/deviations", "swag/n"} <= set(got)
    for key in want:
        assert torch.equal(got[key], want[key]), key  # bitwise
    log = lambda r: (r / "members" / "0" / "train_log.jsonl").read_text()  # noqa: E731
    assert log(run) == log(reference)
    tfb = lambda r: json.loads((r / "members" / "0" / "posteriors" / "tfb" / "posterior_config.json").read_text())["hparams"]  # noqa: E731
    assert tfb(run) == tfb(reference) and tfb(run)["sigma"] > 0  # the same sigma and search trace
    assert (run / "members" / "0" / "done.json").is_file()
    assert not _ckpt_dir(run).exists()  # removed once the member is done


def test_reference_run_collects_snapshots(reference):
    swag = load_safetensors(reference / "members" / "0" / "posteriors" / "swag" / "posterior.safetensors")
    assert int(swag["n"]) == 2 * STEPS_PER_EPOCH // 2


def test_kill_during_map_phase_resumes_bitwise(tmp_path, tiny_model_dir, data, reference):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run, "--checkpoint-every", "1")
    rc, _ = _signal_when(_slow(0.15) + args, run, tmp_path, lambda s: 3 <= s < MAP_STEPS - 3, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    newest = checkpoint.latest(_ckpt_dir(run))
    assert newest is not None and not newest.meta["map_done"] and newest.step < MAP_STEPS
    # a damaged newest checkpoint (e.g. a disk problem) is skipped: resume from the one before
    (newest.path / "state.safetensors").write_bytes(b"\0" * 16)
    rc, err = _run(PLAIN + args, tmp_path, "resume")
    assert rc == 0, err
    assert "skipping damaged checkpoint" in err and f"resuming from {_ckpt_dir(run) / str(newest.step - 1)}" in err
    assert_same_as_reference(run, reference)


@pytest.mark.bf16
def test_kill_during_swag_collection_resumes_bitwise(tmp_path, tiny_model_dir, data, reference):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run, "--checkpoint-every", "1")
    rc, _ = _signal_when(_slow(0.15) + args, run, tmp_path, lambda s: s >= MAP_STEPS + 3, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    newest = checkpoint.latest(_ckpt_dir(run))
    assert newest.meta["map_done"] and int(newest.tensors["collector/0/n"]) >= 1  # killed while collecting
    rc, err = _run(PLAIN + args, tmp_path, "resume")
    assert rc == 0, err
    assert_same_as_reference(run, reference)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_rerun_resumes(tmp_path, tiny_model_dir, data, reference):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run)  # checkpoints only at epoch ends: Ctrl-C must write its own
    progress = tmp_path / "progress"  # wait until the child is past the epoch-end checkpoint, inside epoch 2
    rc, err = _signal_when(_slow(0.15, progress) + args, run, tmp_path, lambda s: s >= STEPS_PER_EPOCH + 1,
                           signal.SIGINT, steps=lambda: _finished_steps(progress))
    assert rc == 130, err
    assert "interrupted after optimiser step" in err and "again to resume" in err
    step = int(err.split("interrupted after optimiser step ")[1].split(";")[0])
    assert _steps(run)[-1] == step > STEPS_PER_EPOCH
    assert checkpoint.latest(_ckpt_dir(run)).step == step
    rc, err = _run(PLAIN + args, tmp_path, "resume")
    assert rc == 0, err
    assert_same_as_reference(run, reference)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, data, reference, monkeypatch, capsys):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run, "--checkpoint-every", "1")
    calls = []
    real = checkpoint.atomic_write_json

    def failing(path, obj):  # the tensors of checkpoint 4 are already written when this fails
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(checkpoint, "atomic_write_json", failing)
    assert main(args) == 2  # one line, no traceback: the file system's error
    assert "swaglora: error: disk full (simulated)" in capsys.readouterr().err
    monkeypatch.undo()
    assert sorted(p.name for p in _ckpt_dir(run).iterdir()) == ["2", "3"]  # no half-written directory left
    assert checkpoint.latest(_ckpt_dir(run)).step == 3
    assert main(args) == 0
    assert_same_as_reference(run, reference)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, data, monkeypatch, capsys):
    run = tmp_path / "run"
    real_top, calls = Scorer.top, []

    def top(self, hidden, batch):
        logits = real_top(self, hidden, batch)
        if self.model.training:
            calls.append(1)
            if len(calls) == 5:  # the loss of optimiser step 5 is NaN
                return logits * float("nan")
        return logits

    monkeypatch.setattr(Scorer, "top", top)
    assert main(_args(tiny_model_dir, data, run, "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "optimiser step 5" in err and "the checkpoint of step 4 is kept" in err
    last = checkpoint.latest(_ckpt_dir(run))
    assert last.step == 4 and _steps(run) == [3, 4]
    assert all(torch.isfinite(v).all() for k, v in last.tensors.items() if k.startswith("param/"))
    assert not (run / "members" / "0" / "done.json").exists()


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(3, 2)
        opt.step()
    tensors, meta = checkpoint.optimizer_state(opt)
    checkpoint.save(tmp_path, 2, tensors, {"optimizer": meta})
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    checkpoint.load_optimizer_state(again, checkpoint.latest(tmp_path))
    a, b = opt.state_dict(), again.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["state"][0][key], b["state"][0][key])
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.rglob("*"))
