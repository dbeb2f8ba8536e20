"""SWAGCallback inside a Hugging Face Trainer: when snapshots are taken, what they hold, checkpoints and resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from swaglora import SWAG, SWAGCallback, load_posterior, trainable_parameters, use_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import trainer_swag  # noqa: E402  (the README's example, run as a test)


class Recorder(TrainerCallback):
    """Independent record of the trainable weights after every optimiser step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append((state.global_step, state.epoch, {k: v.detach().clone() for k, v in trainable_parameters(model).items()}))


class StopAfterEpoch(TrainerCallback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch) == self.epoch:
            control.should_training_stop = True


def make_trainer(model_dir: Path, out: Path, callbacks, epochs: int = 3, accum: int = 1, n_rows: int = 16):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws the LoRA init from the global RNG: the same init in every run
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    args = TrainingArguments(str(out), num_train_epochs=epochs, per_device_train_batch_size=4, gradient_accumulation_steps=accum,
                             learning_rate=5e-3, save_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=trainer_swag.toy_dataset(tokenizer)[:n_rows],
                      data_collator=default_data_collator, callbacks=callbacks(model))
    return trainer, model


def test_step_snapshots_are_the_weights_after_the_due_optimiser_steps_with_accumulation(tiny_model_dir, tmp_path):
    recorder, made = Recorder(), {}

    def callbacks(model):
        made["swag"] = SWAG(model, max_rank=3)
        made["cb"] = SWAGCallback(made["swag"], start_epoch=1, every=2)
        return [recorder, made["cb"]]

    trainer, model = make_trainer(tiny_model_dir, tmp_path / "out", callbacks, epochs=3, accum=2)  # 4 batches = 2 steps/epoch
    trainer.train()
    assert [s for s, _, _ in recorder.steps] == [1, 2, 3, 4, 5, 6]  # one on_step_end per optimiser step
    due = [s for s, epoch, _ in recorder.steps if s % 2 == 0 and epoch > 1]
    assert made["cb"].collected_at == due == [4, 6]
    oracle = SWAG(model, max_rank=3)  # fed the recorded weights of the due steps
    for s, _, weights in recorder.steps:
        if s in due:
            with use_params(model, weights):
                oracle.collect(model)
    for k, v in oracle.state_dict().items():
        assert torch.equal(v, made["swag"].state_dict()[k]), k
    # independent of SWAG's update rule: the mean is the plain average of the two snapshots
    snaps = [torch.cat([w.flatten() for w in weights.values()]) for s, _, weights in recorder.steps if s in due]
    assert torch.allclose(made["swag"].state_dict()["mean"], (snaps[0] + snaps[1]) / 2, atol=1e-7)
    assert not torch.equal(snaps[0], snaps[1])


def test_checkpoints_hold_the_posterior_and_resume_restores_it(tiny_model_dir, tmp_path):
    def run(out: Path, stop: int | None = None, resume: bool = False):
        made = {}

        def callbacks(model):
            made["swag"] = SWAG(model, max_rank=2)
            return [SWAGCallback(made["swag"], start_epoch=1, every="epoch")] + ([StopAfterEpoch(stop)] if stop else [])

        trainer, _ = make_trainer(tiny_model_dir, out, callbacks, epochs=4)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return made["swag"]

    full = run(tmp_path / "full")
    assert full.n_collected == 3  # epochs 2, 3, 4
    saved = load_posterior(tmp_path / "full" / "checkpoint-16")  # 4 steps per epoch: epoch 4 ends at step 16
    assert saved.n_collected == 3 and all(torch.equal(v, full.state_dict()[k]) for k, v in saved.state_dict().items())
    assert load_posterior(tmp_path / "full" / "checkpoint-8").n_collected == 1
    assert not (tmp_path / "full" / "checkpoint-4" / "posterior_config.json").exists()  # nothing collected yet

    half = run(tmp_path / "cut", stop=2)
    assert half.n_collected == 1 and not (tmp_path / "cut" / "checkpoint-12").exists()
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.n_collected == 3
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_without_a_saved_posterior_is_refused(tiny_model_dir, tmp_path):
    def plain(model):
        return [StopAfterEpoch(2)]

    trainer, _ = make_trainer(tiny_model_dir, tmp_path / "out", plain, epochs=3)
    trainer.train()
    trainer, _ = make_trainer(tiny_model_dir, tmp_path / "out", lambda m: [SWAGCallback(SWAG(m), start_epoch=1)], epochs=3)
    with pytest.raises(ValueError, match="holds no posterior_config.json"):
        trainer.train(resume_from_checkpoint=True)


def test_bad_arguments():
    swag = SWAG({"w": (2,)})
    for every in (0, -1, "steps", 1.5, True):
        with pytest.raises(ValueError, match="every must be"):
            SWAGCallback(swag, every=every)
    with pytest.raises(ValueError, match="start_epoch"):
        SWAGCallback(swag, start_epoch=-1)


def test_readme_example_runs_and_predicts_by_bma(tiny_model_dir, tmp_path, capsys):
    probs = trainer_swag.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--epochs", "3",
                               "--start-epoch", "1"])
    assert probs.shape == (10, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(10))
    assert probs.std(0).max() > 0  # the 10 draws differ: a posterior, not a point
    assert "SWAG from 2 snapshots" in capsys.readouterr().out
