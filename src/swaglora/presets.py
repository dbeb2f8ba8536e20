"""Named bundles of config overrides (``--preset NAME``): ``{"section.key": value}``, applied before
``--config`` files' values are overridden by flags. Each value cites where it comes from."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRESET_NOTES"]

#: Named bundles of overrides. ``paper`` is the protocol of Onal et al. (2024) for a 7B model on a GPU, as the
#: authors' code runs it (github.com/fortuinlab/swag-lora; README.md's training command, conf/config.yaml,
#: conf/method/swag.yaml, conf/model/llama_7b_hf.yaml, scripts/train.bash, scripts/evaluate_(multi)swag.bash,
#: train.py).
PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: the product's defaults until the protocol study (docs/protocol-study.md) replaced them, kept as a
    # protocol cheap enough for a 2-core CPU without AVX-512 (about 10 min, fp32): LoRA on every linear module of the
    # top 2 layers only, so the 28 frozen layers below are computed once per question and reused; S=4; seeded
    # subsets. Its numbers are not the defaults' (validation NLL 1.08 against 0.74 for the study's choice).
    "demo": {
        "lora.targets": "all-linear",
        "lora.layers": "top:2",
        "posterior.samples": 4,
        "swag.every": "25",  # as the study's base ran it (auto would collect every 15 steps on 400 questions)
        "data.train_limit": 400,
        "data.val_limit": 100,
        "eval.limit": 150,
    },
    "paper": {
        # utils/peft_utils.py trim_head_for_mcqa: the LM head trimmed to the answer letters, read at the last token
        "model.scoring": "letter",
        "model.train_head": True,  # llama_7b_hf.yaml modules_to_save: ["classifier"] (the trimmed head, fully trained)
        "lora.targets": "q_proj,v_proj",  # llama_7b_hf.yaml target_modules: ["v_proj", "q_proj"]
        "lora.layers": "all",  # peft LoraConfig over every layer
        "lora.r": 8, "lora.alpha": 16.0, "lora.dropout": 0.1,  # config.yaml lora_r, lora_alpha, lora_dropout
        "train.lr": 6e-4,  # README.md: experiment.learning_rate=6e-4
        "train.batch_size": 16,  # README.md experiment.batch_size=16; scripts/train.bash BSZ=16
        "train.weight_decay": 0.0,  # config.yaml weight_decay: 0 (AdamW, train.py)
        "train.warmup": 0.06,  # config.yaml warmup_length: 0.06 of num_epochs * batches (train.py get_lr_scheduler)
        # config.yaml scheduler: 'linear' = transformers' get_linear_schedule_with_warmup over all num_epochs,
        # stepped only before swag_start (train.py train_swag)
        "train.schedule": "linear",
        "train.epochs": 8,  # README.md method.swag_start=8 (swag.yaml swag_start: 8)
        "swag.epochs": 10,  # README.md experiment.num_epochs=18 minus swag_start=8
        "swag.lr": 6e-5,  # scripts/train.bash SWAG_LR = LR / SWAG_DIV_FACTOR (10); README.md's example uses 1e-4
        "swag.anneal_epochs": 5,  # README.md method.swag_anneal_epochs=5; swag.yaml swag_anneal_strategy 'linear' (SWALR)
        "swag.every": "epoch",  # swag.yaml swag_c_epochs: 1 (collect at each epoch end)
        "swag.max_rank": 5,
        # swag.yaml force_save: 5; train.py: keep the SWAG state of the epoch with the lowest SWA-mean validation
        # loss so far, or force-save it at epoch swag_start + force_save
        "swag.force_save": 5,  # swag.yaml swag_max_num_models: 5
        "posterior.samples": 15,  # scripts/evaluate_swag.bash NUM_SAMPLES=15
        "swag.scale": "1.0",  # scripts/evaluate_swag.bash and evaluate_multiswag.bash SWAG_SAMPLE_SCALE=1.0
        "posterior.members": 5,  # scripts/evaluate_multiswag.bash: 5 trained runs
        "data.val_fraction": 0.2,  # config.yaml val_split_size: 0.2 (a split of train where there is no validation)
        "data.train_limit": 0,
        "data.val_limit": 0,
        "eval.limit": 0,
    },
    # BLoB (Wang et al. 2024) as its authors run it on Llama-2-7B: github.com/Wang-ML-Lab/bayesian-peft,
    # scripts/blob/blob-llama-all.sh with utils/args.py, models/causallm.py and modelwrappers/blob.py. Not reproduced:
    # their step budget (--max-train-steps 5000: set --epochs to about 5000 * 8 / N for N training examples), the
    # LoRA on lm_head (--apply-classhead-lora; here the letter head is trained), AdamW eps 1e-6 (torch's 1e-8 here),
    # training without validation (here the best validation epoch is kept, as for every member).
    "blob-paper": {
        "model.scoring": "letter",  # dataset-type mcdataset: the answer letters' logits at the last token
        "model.train_head": True,
        "model.max_length": 300,  # --max-seq-len 300
        "lora.targets": "q_proj,v_proj", "lora.layers": "all",  # causallm.py target_modules (without lm_head)
        "lora.r": 8, "lora.alpha": 16.0, "lora.dropout": 0.0,  # --lora-r 8 --lora-alpha 16 --lora-dropout 0
        "train.lr": 1e-4,  # --lr 1e-4 (--opt adamw, --opt-wd default 0)
        "train.batch_size": 8,  # --batch-size 4 on each of 2 GPUs (accelerate --num_processes=2)
        "train.weight_decay": 0.0,
        "train.warmup": 0.06,  # --warmup-ratio 0.06, get_linear_schedule_with_warmup: linear decay to 0
        "blob.eps": 0.05, "blob.prior_sigma": 0.2, "blob.kl_lr": 0.01, "blob.gamma": 8.0,  # eps, beta, kllr, gamma
        "blob.kl_reweighting": True,  # --bayes-klreweighting (with --bayes-datasetrescaling: gamma > 0)
        "blob.samples": 10,  # --bayes-eval-n-samples-final 10
        "tfb.expand": 0,  # their TFB scripts (scripts/tfblora/*.sh) bisect the fixed interval [0.001, 0.015]
        "data.train_limit": 0,
        "data.val_limit": 0,
        "eval.limit": 0,
    },
}


#: What ``swaglora run --preset NAME`` prints before it starts (only presets that need a warning have one).
PRESET_NOTES: dict[str, str] = {
    "demo": ("preset demo: a cheaper protocol than the defaults (LoRA on all linear modules of the top 2 layers, "
             "S=4, seeded subsets: 400 training, 100 validation, at most 150 questions per evaluation set), sized "
             "for a 2-core CPU; the defaults (q_proj,v_proj in every layer, S=15, every question) are the protocol "
             "study's choice. Subset numbers are noisy: read them with the intervals printed under the table."),
}
