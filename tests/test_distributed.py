"""Data-parallel training with ``accelerate launch``: 2 CPU processes give the single-process result.

Each process takes half of every global batch (the last batch of an epoch, 3 examples, splits 1 + 2, so the
loss weighting of unequal shards is exercised too) and gradients are averaged before each step. With LoRA
dropout 0 the only difference to one process is the order of floating-point sums: equal within 1e-5 in fp32.
(BLoB's flipout signs are drawn per process shard, so its members match only because its std is tiny here.)

``accelerate launch --cpu --num_processes 2`` starts a single process unless ``mpirun`` is used; on a machine
without CUDA ``--multi_gpu`` starts the processes (torchrun) and swaglora then runs them on CPU with gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swaglora.cli import main
from swaglora.io import load_safetensors

from conftest import make_examples, write_jsonl

NOT_STARTED = ("DistNetworkError", "RendezvousConnectionError", "RendezvousError", "Address family not supported",
               "Cannot assign requested address", "ProcessGroupGloo")


def _args(model_dir: Path, data: Path, run: Path) -> list[str]:
    return ["train", "--out", str(run), "--model", str(model_dir), "--scoring", "cloze", "--data", str(data),
            "--epochs", "1", "--swag-epochs", "2", "--swag-every", "2", "--members", "1", "--batch-size", "4",
            "--lora-r", "2", "--lora-layers", "top:1", "--lora-dropout", "0", "--threads", "1", "--quiet",
            "--checkpoint-every", "5", "--dtype", "float32",
            # BLoB members too, with a std (eps^2 <= 1e-6) too small for flipout's draws to matter at 1e-5
            "--methods", "map,swag,blob", "--blob-eps", "0.001"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(run: Path) -> dict[str, torch.Tensor]:
    member = run / "members" / "0"
    out = {}
    for name in ("map", "swag", "blob"):
        out.update({f"{name}/{k}": v for k, v in load_safetensors(member / "posteriors" / name / "posterior.safetensors").items()})
    out.update({f"adapter/{k}": v for k, v in load_safetensors(member / "adapter" / "adapter_model.safetensors").items()})
    return out


def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    data = write_jsonl(tmp_path / "train.jsonl", make_examples(34, 0, "tr"))  # 27 train: batches 4 x 6 + 3
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(_args(tiny_model_dir, data, single)) == 0

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-config.yaml"),
           "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "swaglora", *_args(tiny_model_dir, data, multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0 and any(marker in proc.stderr for marker in NOT_STARTED):
        pytest.skip(f"accelerate launch cannot start 2 processes here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name in ("checkpoints", "checkpoints-blob"):  # written (by the main process only), removed when done
        assert not (multi / "members" / "0" / name).exists()
    got, want = _state(multi), _state(single)
    assert got.keys() == want.keys() and int(got["swag/n"]) == int(want["swag/n"]) == 7  # SWAG steps 8..21, every 2nd
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    # the logged training loss is the global batch's, as with one process
    log = lambda r: [json.loads(line) for line in (r / "members" / "0" / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["train_loss"] for r in log(multi)] == pytest.approx([r["train_loss"] for r in log(single)], abs=1e-6)
    assert [r["val_nll"] for r in log(multi)] == pytest.approx([r["val_nll"] for r in log(single)], abs=1e-5)
