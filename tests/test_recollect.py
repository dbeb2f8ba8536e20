"""``swag.keep_trajectory`` and ``train --recollect-from``: a member collected anew from a recorded trajectory is,
bit for bit, the member that training with those collection settings makes (fp32), and a source it cannot be
derived from is refused before the model loads, naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_examples, write_jsonl
from swaglora import members as members_module
from swaglora.cli import main
from swaglora.io import load_safetensors

METHODS = "map,swa,swag,multiswag,swag-diag,dropout"


@pytest.fixture
def data_files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", make_examples(32, 0, "tr")),
            write_jsonl(tmp_path / "test.jsonl", make_examples(16, 1, "te")))


def _args(model_dir: Path, data_files) -> list[str]:
    train, test = data_files
    return ["--model", str(model_dir), "--scoring", "cloze", "--data", str(train), "--test-data", str(test), "--shift", "",
            "--epochs", "1", "--members", "2", "--samples", "3", "--batch-size", "8", "--lora-r", "2",
            "--methods", METHODS, "--dtype", "float32", "--quiet"]


def _tensors(member: Path, name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(member / "posteriors" / name / "posterior.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# (collection flags of the run trained directly, snapshots it collects of the recorded 26-question member:
#  4 steps per epoch, MAP epoch 1 = steps 1-4)
DERIVED = [
    (["--swag-epochs", "2", "--swag-every", "4", "--swag-max-rank", "2"], 2),  # fewer epochs, every 2nd snapshot, K 2
    (["--swag-epochs", "3", "--swag-every", "epoch", "--swag-max-rank", "2"], 3),  # per epoch
    (["--swag-epochs", "3", "--swag-every", "2", "--swag-max-rank", "6"], 6),  # every snapshot, a larger K
]


def test_recollected_members_equal_members_trained_with_those_settings(tmp_path, tiny_model_dir, data_files):
    args = _args(tiny_model_dir, data_files)
    source = tmp_path / "source"
    assert main(["train", "--out", str(source), *args, "--swag-epochs", "3", "--swag-every", "2", "--swag-max-rank", "4",
                 "--swag-keep-trajectory"]) == 0
    recorded = sorted(p.name for p in (source / "members" / "0" / "trajectory").iterdir())
    # SWAG steps 5-16 (global): every 2nd step, and the three SWAG epoch ends
    assert recorded == [f"epoch-{e:04d}.safetensors" for e in (2, 3, 4)] + [f"step-{s:08d}.safetensors" for s in range(6, 17, 2)]
    for i, (flags, snapshots) in enumerate(DERIVED):
        trained, derived = tmp_path / f"trained{i}", tmp_path / f"derived{i}"
        assert main(["train", "--out", str(trained), *args, *flags]) == 0
        assert main(["train", "--out", str(derived), *args, *flags, "--recollect-from", str(source)]) == 0
        for m in ("0", "1"):
            a, b = trained / "members" / m, derived / "members" / m
            for name in ("swag", "swag-diag", "map", "dropout"):
                assert _same(_tensors(a, name), _tensors(b, name)), (flags, m, name)
            assert _same(load_safetensors(a / "adapter" / "adapter_model.safetensors"),
                         load_safetensors(b / "adapter" / "adapter_model.safetensors"))
            saved = json.loads((b / "posteriors" / "swag" / "posterior_config.json").read_text())
            assert saved["n_collected"] == snapshots and saved["hparams"]["max_rank"] == int(flags[-1])
            assert json.loads((b / "done.json").read_text())["recollected"]["snapshots"] == snapshots
            assert not (b / "trajectory").exists()
            logged = [json.loads(line)["epoch"] for line in (b / "train_log.jsonl").read_text().splitlines()]
            assert logged == list(range(1, 2 + int(flags[1])))
        assert not _same(_tensors(trained / "members" / "0", "swag"), _tensors(source / "members" / "0", "swag"))
    # the source's settings are the defaults of a recollection: only the collection flags need to be given
    short = tmp_path / "short"
    assert main(["train", "--out", str(short), "--recollect-from", str(source), *DERIVED[0][0], "--quiet"]) == 0
    assert json.loads((short / "config.json").read_text()) == json.loads((tmp_path / "derived0" / "config.json").read_text())
    for m in ("0", "1"):
        assert _same(_tensors(short / "members" / m, "swag"), _tensors(tmp_path / "trained0" / "members" / m, "swag"))
    # the same draws and predictions from either: evaluate both on the test split
    for run in (tmp_path / "trained0", tmp_path / "derived0"):
        assert main(["evaluate", "--run", str(run), "--methods", "swag,multiswag", "--quiet"]) == 0
    for row in ("swag", "multiswag"):
        files = [(run / "eval" / "test" / row / "predictions.jsonl").read_bytes() for run in (tmp_path / "trained0", tmp_path / "derived0")]
        assert files[0] == files[1] and files[0]


def test_recollect_refuses_what_the_trajectory_cannot_give(tmp_path, tiny_model_dir, data_files, capsys, monkeypatch):
    args = [*_args(tiny_model_dir, data_files), "--swag-max-rank", "2"]
    plain, source = tmp_path / "plain", tmp_path / "source"
    assert main(["train", "--out", str(plain), *args, "--swag-epochs", "2", "--swag-every", "2", "--methods", "map,swag"]) == 0
    assert main(["train", "--out", str(source), *args, "--swag-epochs", "2", "--swag-every", "2", "--methods", "map,swag",
                 "--swag-keep-trajectory"]) == 0

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded")

    cases = [
        (plain, ["--swag-epochs", "2", "--swag-every", "2"], "trained without --swag-keep-trajectory"),
        (source, ["--swag-epochs", "2", "--swag-every", "3"], "--swag-every 3 is not a multiple of the 2"),
        (source, ["--swag-epochs", "3", "--swag-every", "2"], "--swag-epochs 3 is more than the 2"),
        (source, ["--swag-epochs", "2", "--swag-every", "2", "--lr", "0.002"], "--lr is 0.001 there, 0.002 here"),
        (source, ["--swag-epochs", "2", "--swag-every", "2", "--swag-lr", "0.0001"], "--swag-lr is 0.001 there"),
        (source, ["--swag-epochs", "2", "--swag-every", "2", "--swag-force-save", "0"], "--swag-force-save"),
        (source, ["--swag-epochs", "2", "--swag-every", "2", "--members", "3"], "--members 3 is more than its 2"),
        (source, ["--swag-epochs", "2", "--swag-every", "2", "--methods", "map,swag,dropout"], "no dropout posterior to copy"),
        (tmp_path / "nothing", ["--swag-epochs", "2", "--swag-every", "2"], "not a swaglora run directory"),
    ]
    with monkeypatch.context() as m:
        m.setattr(members_module, "load_model", forbidden)
        for k, (src, flags, named) in enumerate(cases):
            out = tmp_path / f"out{k}"
            capsys.readouterr()
            code = main(["train", "--out", str(out), *args, "--methods", "map,swag", *flags, "--recollect-from", str(src)])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and "--recollect-from" in err[0] and named in err[0], (flags, err)
            assert not out.exists()
