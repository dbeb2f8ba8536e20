"""The dtype decision is pinnable, bf16 keeps what it promises, training stays fp32 where it must, runs record it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from swaglora import models
from swaglora.cli import main
from swaglora.config import ConfigError, LoraSettings, ModelConfig
from swaglora.data import MCQExample
from swaglora.models import AUTO_DTYPE_ENV, SIMD_FLAGS, add_lora, load_model, resolve_dtype, runtime_info
from swaglora.params import trainable_parameters
from swaglora.report import collect_results
from swaglora.scoring import Scorer

from conftest import make_examples, write_jsonl

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: bf16 keeps 8 significant bits


def _examples(n: int, seed: int = 0) -> list[MCQExample]:
    return [MCQExample(r["id"], r["question"], tuple(r["choices"]), tuple(r["labels"]), r["answer"]) for r in make_examples(n, seed)]


def test_the_environment_pins_what_auto_resolves_to(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "bf16_speedup_on_cpu", lambda: pytest.fail("a pinned auto must not measure"))
    for value, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16), (" bfloat16\n", torch.bfloat16)):
        monkeypatch.setenv(AUTO_DTYPE_ENV, value)
        assert resolve_dtype("auto") == want
        assert resolve_dtype("float32") == torch.float32  # an explicit --dtype is never overridden
    # unset: on x86 the CPU's flags decide, without a timing (which swings with the machine's load); elsewhere the
    # measured bf16 speed does (AVX-512-bf16 ~2x faster, AVX2 ~20x slower)
    for value in ("", None):
        if value is None:
            monkeypatch.delenv(AUTO_DTYPE_ENV)
        else:
            monkeypatch.setenv(AUTO_DTYPE_ENV, value)
        monkeypatch.setattr(models, "bf16_speedup_on_cpu", lambda: pytest.fail("x86 flags decide without measuring"))
        for flags, want, why in ((["avx2", "fma", "avx512f", "avx512_bf16"], torch.bfloat16, "cpu flag avx512_bf16"),
                                 (["avx2", "amx_bf16"], torch.bfloat16, "cpu flag amx_bf16"),
                                 (["avx2", "fma"], torch.float32, "x86 without avx512_bf16/amx_bf16"),
                                 (["avx2", "avx512f", "avx512bw"], torch.float32, "x86 without avx512_bf16/amx_bf16")):
            monkeypatch.setattr(models, "_cpuinfo", lambda f=flags: ("some x86", f))
            assert resolve_dtype("auto") == want
            assert models.cpu_auto_dtype() == (want, why)
        for flags in ([], ["asimd", "bf16"]):  # no /proc/cpuinfo, or Arm: measured
            monkeypatch.setattr(models, "_cpuinfo", lambda f=flags: (None, f))
            for speedup, want in ((2.0, torch.bfloat16), (1.1, torch.float32), (0.05, torch.float32)):
                monkeypatch.setattr(models, "bf16_speedup_on_cpu", lambda s=speedup: s)
                assert resolve_dtype("auto") == want
                assert models.cpu_auto_dtype()[1] == f"measured: bf16 matmul {speedup:.2f}x fp32's speed"


def test_the_measured_speedup_is_the_ratio_of_the_fastest_rounds(monkeypatch):
    """A busy CPU stalls some rounds: the fastest round of each dtype is the measurement (a fake clock: each matmul
    costs its dtype's time; the first round's bf16 matmuls stall). Emulated bf16 stops after two rounds."""
    import time

    real_matmul = torch.Tensor.__matmul__
    for bf16_cost, stall, want in ((0.25, 50.0, 4.0), (20.0, 0.0, 0.05)):
        clock = {"t": 0.0, "calls": 0}

        def fake_matmul(self, other, bf16_cost=bf16_cost, stall=stall):
            clock["calls"] += 1  # calls 1-2 warm up; round 1 is fp32 calls 3-5 then bf16 calls 6-8
            bf16 = self.dtype == torch.bfloat16
            clock["t"] += (bf16_cost if bf16 else 1.0) + (stall if bf16 and 6 <= clock["calls"] <= 8 else 0.0)
            return real_matmul(self, other)

        monkeypatch.setattr(torch.Tensor, "__matmul__", fake_matmul)
        monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
        monkeypatch.setattr(models, "_BF16_SPEEDUP", None)
        assert models.bf16_speedup_on_cpu() == pytest.approx(want)
        assert clock["calls"] == (2 + 5 * 6 if bf16_cost < 1 else 2 + 2 * 6)


@pytest.mark.parametrize("value", ["fp16", "float16", "bf16", "auto"])
def test_a_bad_pin_is_one_clear_error_before_anything_is_written(value, tmp_path, tiny_model_dir, tiny_jsonl, monkeypatch, capsys):
    monkeypatch.setenv(AUTO_DTYPE_ENV, value)
    with pytest.raises(ConfigError, match="use float32 or bfloat16"):
        resolve_dtype("float32")  # checked even where it would not be used: a typo never waits for `auto`
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--model", str(tiny_model_dir), "--data", str(tiny_jsonl), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"swaglora: error: {AUTO_DTYPE_ENV}={value!r} is not a dtype --dtype auto can take: use float32 or "
                   "bfloat16 (or unset it to decide by this machine)"]
    assert not run.exists()


@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_bf16_choice_probabilities_agree_with_fp32(tiny_model_dir, scoring):
    """What bf16 compute promises for the same weights: choice probabilities within one bf16 eps of fp32's, and
    the same answer wherever fp32's top two choices are further apart than that."""
    examples = _examples(12, 3)
    probs = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype=dtype))
        model = add_lora(lm.model, LoraSettings(r=2, layers="top:1", dropout=0.0), seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # the same non-zero LoRA in both dtypes
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
            scorer = Scorer(model, lm.tokenizer, scoring)
            probs[dtype] = torch.softmax(scorer.logits(scorer.batch(examples)), -1)
    fp32, bf16 = probs["float32"], probs["bfloat16"]
    assert fp32.dtype == bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() <= BF16_EPS
    top2 = fp32.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * BF16_EPS
    assert clear.sum() >= len(examples) // 2  # the check below has something to check
    assert torch.equal(bf16.argmax(-1)[clear], fp32.argmax(-1)[clear])


def test_a_small_adamw_step_changes_the_letter_head_under_bf16(tiny_model_dir):
    """A bf16 letter head would lose every update below half a bf16 ULP of its weights (lr 1e-5 vs ~3e-5 and more
    for |w| >= 2^-7); the fp32 head keeps them, and AdamW's state is fp32 too."""
    lm = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"))
    model = add_lora(lm.model, LoraSettings(r=2, layers="top:1", dropout=0.0), seed=0)
    scorer = Scorer(model, lm.tokenizer, "letter", train_head=True)
    params = trainable_parameters(model)
    head = model.get_base_model().letter_head.weight
    assert {p.dtype for p in params.values()} == {torch.float32} and any(p is head for p in params.values())
    before = head.detach().clone()
    optimizer = torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.0)
    batch = scorer.batch(_examples(16))
    torch.nn.functional.cross_entropy(scorer.logits(batch), batch.labels).backward()
    optimizer.step()
    assert {t.dtype for state in optimizer.state.values() for t in state.values() if t.is_floating_point()} == {torch.float32}
    rows = int(batch.n_choices.max())  # only the rows of letters that occur get a gradient
    big = before[:rows].abs() >= 2**-7
    assert big.sum() > 0.5 * big.numel()
    moved = head.detach()[:rows][big]
    assert (moved != before[:rows][big]).all()  # every one of these weights took its update ...
    assert torch.equal(moved.bfloat16(), before[:rows][big].bfloat16())  # ... which bf16 storage would have lost


def _cpu_flags_oracle() -> list[str]:
    path = Path("/proc/cpuinfo")
    words = set(path.read_text().split()) if path.is_file() else set()
    return [f for f in SIMD_FLAGS if f in words]


def test_runtime_info_records_the_measured_decision(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_BF16_SPEEDUP", 0.0537)  # as measured on an AVX2-only CPU
    info = runtime_info(ModelConfig())
    monkeypatch.setattr(models, "_cpuinfo", lambda: ("some Arm CPU", ["asimd"]))  # not x86: measured
    info = runtime_info(ModelConfig())
    assert info == {"dtype": "float32", "dtype_setting": "auto", "auto_dtype_env": None,
                    "auto_dtype_reason": "measured: bf16 matmul 0.05x fp32's speed", "device": "cpu",
                    "cpu": "some Arm CPU", "cpu_flags": ["asimd"], "torch": torch.__version__, "bf16_speedup": 0.05}
    monkeypatch.setattr(models, "_cpuinfo", lambda: ("some x86", ["avx2", "avx512_bf16"]))
    assert runtime_info(ModelConfig())["auto_dtype_reason"] == "cpu flag avx512_bf16"
    assert runtime_info(ModelConfig(dtype="float32"))["auto_dtype_reason"] is None  # --dtype named it
    assert runtime_info(ModelConfig(dtype="bfloat16"))["dtype"] == "bfloat16"


@pytest.mark.bf16
def test_a_run_records_prints_and_reports_its_dtype(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The dtype `auto` took (here pinned by the environment, as in the test suite), the device, the CPU's SIMD
    flags and torch go to swaglora_run.json, stderr and report.md; they are not config, so a rerun under another
    dtype is not refused as a changed config."""
    pinned = models.os.environ[AUTO_DTYPE_ENV]
    data = write_jsonl(tmp_path / "train.jsonl", make_examples(20, 0, "tr"))
    test = write_jsonl(tmp_path / "test.jsonl", make_examples(8, 1, "te"))
    run = tmp_path / "run"
    args = ["run", "--out", str(run), "--model", str(tiny_model_dir), "--data", str(data), "--test-data", str(test),
            "--shift", str(test), "--scoring", "letter", "--epochs", "1", "--swag-epochs", "0", "--members", "1", "--methods", "map",
            "--batch-size", "8", "--lora-r", "2", "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"dtype {pinned} on cpu (auto, pinned by {AUTO_DTYPE_ENV})" in err
    runtime = json.loads((run / "swaglora_run.json").read_text())["runtime"]
    assert runtime == {"dtype": pinned, "dtype_setting": "auto", "auto_dtype_env": pinned, "auto_dtype_reason": None,
                       "device": "cpu",
                       "cpu": runtime["cpu"], "cpu_flags": _cpu_flags_oracle(), "torch": torch.__version__,
                       "bf16_speedup": None}
    report = (run / "report.md").read_text()
    flags = " ".join(_cpu_flags_oracle()) or "—"
    assert "## Run environment" in report
    assert f"| `{run}` | 0 | {pinned} | cpu | {torch.__version__} | {flags} | pinned by SWAGLORA_AUTO_DTYPE |" in report
    assert json.loads((run / "results.json").read_text())["runtime"] == [runtime]

    other = "bfloat16" if pinned == "float32" else "float32"
    monkeypatch.setenv(AUTO_DTYPE_ENV, other)
    # an evaluation records the runtime its numbers are computed under, in another --out or beside the training's
    for out in (tmp_path / "elsewhere", run):
        assert main(["evaluate", "--run", str(run), "--out", str(out), "--methods", "map", "--quiet"]) == 0
        marker = json.loads((out / "swaglora_run.json").read_text())
        assert marker["evaluation_runtime"] == {**runtime, "dtype": other, "auto_dtype_env": other}
        assert marker.get("runtime", runtime) == runtime  # the training's, where there is one, is kept
        assert f"| `{out}` | 0 | {other} | cpu |" in (out / "report.md").read_text()
    assert main(args) == 0  # finished member kept, the config unchanged: the runtime is a fact, not a setting
    assert json.loads((run / "swaglora_run.json").read_text())["runtime"]["dtype"] == other

    # seeds computed in different dtypes: the report says so
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    marker = json.loads((copy / "swaglora_run.json").read_text())
    marker["runtime"]["dtype"] = pinned
    (copy / "swaglora_run.json").write_text(json.dumps(marker))
    notes = collect_results([run, copy])["notes"]
    assert f"The runs computed in different dtypes ({', '.join(sorted([pinned, other]))})" in " ".join(notes)
    assert not any("dtypes" in n for n in collect_results([run, run])["notes"])
