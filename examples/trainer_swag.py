"""SWAG in your own Hugging Face ``Trainer`` run, then Bayesian model averaging with swaglora.

    python examples/trainer_swag.py --model DIR --out OUT [--epochs 4] [--start-epoch 2]

Fine-tunes LoRA (q_proj, v_proj) on a toy question-answer task with ``transformers.Trainer``, collects
a SWAG posterior with :class:`swaglora.SWAGCallback` at each epoch end after ``--start-epoch`` epochs
(saved in every ``checkpoint-<step>/`` too, so ``trainer.train(resume_from_checkpoint=True)`` restores
it), and scores the choices of a new question by BMA over 10 posterior samples.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from swaglora import SWAG, SWAGCallback, bma

WORDS = ["red", "blue", "green", "stone", "river", "cloud", "apple", "metal"]


def toy_dataset(tokenizer, length: int = 24) -> list[dict[str, torch.Tensor]]:
    rows = []
    for word in WORDS * 4:
        enc = tokenizer(f"Question: Which word is {word}?\nAnswer: {word}", padding="max_length",
                        max_length=length, truncation=True, return_tensors="pt")
        ids, mask = enc.input_ids[0], enc.attention_mask[0]
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def choice_logits(model, tokenizer, question: str, choices: list[str]) -> torch.Tensor:
    """Cloze score of each choice: mean log-probability of its tokens after the question."""
    scores = []
    for choice in choices:
        q = tokenizer(question, return_tensors="pt").input_ids
        c = tokenizer(choice, add_special_tokens=False, return_tensors="pt").input_ids
        logp = torch.log_softmax(model(input_ids=torch.cat([q, c], 1)).logits[0, q.shape[1] - 1 : -1].float(), -1)
        scores.append(logp.gather(1, c[0][:, None]).mean())
    return torch.stack(scores)


def main(argv: list[str] | None = None) -> torch.Tensor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local causal-LM directory (or a hub id)")
    parser.add_argument("--out", required=True, help="Trainer output directory")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--start-epoch", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    swag = SWAG(model, max_rank=2)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(args.out, num_train_epochs=args.epochs, per_device_train_batch_size=8,
                               learning_rate=1e-3, save_strategy="epoch", report_to=[], use_cpu=True,
                               disable_tqdm=True, seed=0, logging_strategy="no"),
        train_dataset=toy_dataset(tokenizer),
        data_collator=default_data_collator,
        callbacks=[SWAGCallback(swag, start_epoch=args.start_epoch, every="epoch")],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    model.eval()
    question, choices = "Question: Which word is red?\nAnswer:", [" red", " blue", " stone"]
    probs = bma(model, swag, lambda m: choice_logits(m, tokenizer, question, choices), n_samples=10,
                generator=torch.Generator().manual_seed(0))
    print(f"SWAG from {swag.n_collected} snapshots; BMA over {probs.shape[0]} samples: "
          + ", ".join(f"{c.strip()} {p:.3f}" for c, p in zip(choices, probs.mean(0).tolist())))
    return probs


if __name__ == "__main__":
    main()
