"""Training throughput (examples/s): the paper's way of computing the loss vs swaglora's.

(a) reference, written the way the paper's code works: fp32, ``model(input_ids, attention_mask).logits``
    (the full-vocabulary head at EVERY position), every example padded to the longest one of the whole
    training set (the usual preprocessing: tokenize the dataset once with ``padding=True``), left padding,
    loss = cross-entropy of the last position's logits over the answer-letter tokens. Letter format:
    question + lettered choices + "Answer:". LoRA r=8 on q_proj,v_proj of all layers.
(b) swaglora, the SAME model and LoRA layout, letter scoring: last position only, letter rows of the head
    only, dynamic padding, ``Scorer.top(cache.hidden(batch))`` (LoRA reaches layer 0, so the cache holds
    nothing: this is the like-for-like comparison).
(c) swaglora's default protocol (cloze, LoRA all-linear on the top 2 layers): epochs after the first,
    the lower 28 layers come from the filled ``HiddenCache``.

All three run on the same batches of the same questions, one batch each per round, interleaved.
"""

from __future__ import annotations

import torch
from torch import nn

from . import common

BATCH = 8  # train.batch_size default


def reference_data(tokenizer, dataset, letter_ids):
    """Tokenize the whole training set once, padded to its longest example (left padding: answer at -1)."""
    prompts = [f"Question: {ex.question}\n" + "".join(f"{l}. {c}\n" for l, c in zip(ex.labels, ex.choices)) + "Answer:"
               for ex in dataset]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    n_choices = torch.tensor([ex.n_choices for ex in dataset])
    labels = torch.tensor([ex.answer_index for ex in dataset])
    return enc.input_ids, enc.attention_mask, n_choices, labels, torch.tensor(letter_ids)


def reference_step(model, data, rows, optimizer) -> None:
    ids, mask, n_choices, labels, letters = data
    logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits  # [B, T, V] fp32: every position, every token
    c = int(n_choices[rows].max())
    answer = logits[:, -1, letters[:c]]
    answer = answer.masked_fill(torch.arange(c)[None, :] >= n_choices[rows][:, None], float("-inf"))
    loss = nn.functional.cross_entropy(answer, labels[rows])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(quick: bool = False) -> dict:
    common.threads()
    rounds = 2 if quick else 4
    dataset = common.examples(32 if quick else 400)  # the default protocol's 400 training questions
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i * BATCH : (i + 1) * BATCH] for i in range(rounds)]
    batches.append(order[rounds * BATCH : rounds * BATCH + 2])  # a short warm-up batch: (a) takes ~10 s per batch of 8

    # (a) and (b) share one model with the paper's LoRA layout; train_head=False so both train exactly the LoRA weights
    paper = common.session(quick, train_head=False, **common.PAPER_LAYOUT)
    paper.model.train()
    ref_data = reference_data(paper.scorer.tokenizer, dataset, paper.scorer.letter_head.token_ids)
    paper.scorer.encode(dataset)  # both sides tokenize up front; (b) still collates (dynamic padding) every step
    opt_a, opt_b = common.optimizer(paper.model), common.optimizer(paper.model)

    default = common.session(quick, **common.DEFAULT_PROTOCOL)
    default.model.train()
    used = [dataset[i] for b in batches for i in b]
    default.cache.fill(used)  # epoch 1 filled the cache; every later epoch looks like this
    opt_c = common.optimizer(default.model)

    def pick(r):
        return [dataset[i] for i in batches[r]]

    fns = {
        "a_reference": lambda r: reference_step(paper.model, ref_data, batches[r], opt_a),
        "b_swaglora_same_lora": lambda r: common.train_step(paper, pick(r), opt_b),
        "c_default_protocol": lambda r: common.train_step(default, pick(r), opt_c),
    }
    for fn in fns.values():  # warm-up (first-call overheads) on the extra batch
        fn(rounds)
    times = common.interleave(fns, rounds)

    rate = {k: BATCH * len(v) / sum(v) for k, v in times.items()}
    # ratios per round (same batch, measured back to back), then the median over rounds
    per_round = {k: [ta / tb for ta, tb in zip(times["a_reference"], times[k])] for k in times}
    metrics = {
        "reference_padded_length": int(ref_data[0].shape[1]),
        "swaglora_letter_mean_length": sum(len(e.input_ids) for e in paper.scorer.encode(dataset)) / len(dataset),
        "cache_lower_layers": default.scorer.split,
        **{f"{k}_examples_per_s": v for k, v in rate.items()},
        **{f"{k}_median_step_s": common.median(v) for k, v in times.items()},
        "rounds": rounds,
    }
    ratios = [
        common.ratio("train b/a (same LoRA, swaglora scoring)", common.median(per_round["b_swaglora_same_lora"]), ">= 3"),
        common.ratio("train c/a (default protocol, cached)", common.median(per_round["c_default_protocol"]), ">= 3"),
    ]
    return common.finish("train_step", quick, metrics, ratios)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
