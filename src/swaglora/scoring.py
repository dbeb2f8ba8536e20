"""Turn multiple-choice questions into one logit per choice, cheaply.

Two scoring modes share one interface: ``Scorer.logits(batch) -> [B, C]`` (absent
choices are ``-inf``), so ``softmax`` gives a probability vector over the choices.

``letter`` (the paper's): ``Question: ...\\nA. ...\\nB. ...\\nAnswer:``. Only the last
position's hidden state goes through the output head, and only through the rows of the
answer letters (a small ``26 x hidden`` head initialised from the LM head, trainable
with ``--train-head``). No full-vocabulary logits at all.

``cloze`` (lm-evaluation-harness's multiple-choice style): the score of choice ``i`` is
the mean per-token log-likelihood of ``" " + choice_i`` as the continuation of
``Question: ...\\nAnswer:`` (length-normalised by the number of choice tokens), and
the probabilities are the softmax of these scores over the choices. The question is
run once: the question and all its choices are *packed* into one sequence
``[question][choice 1][choice 2]...`` with an attention mask that lets each choice see
the question and itself only, and position ids that restart after the question for
every choice. That is exactly C separate passes, at the cost of one. The full
vocabulary head is applied only at the positions that predict choice tokens.

Frozen prefix: with LoRA on the top K layers only, the lower layers are identical for
every epoch, posterior sample and ensemble member. ``bottom()`` computes their output
and ``top()`` the rest, so ``HiddenCache`` can compute the lower part once per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data import MCQExample
from .models import ModelError, decoder_parts

__all__ = ["Encoded", "Batch", "Scorer", "HiddenCache", "LetterHead", "LETTERS"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def key(ex: MCQExample) -> tuple:
    """What scoring depends on: the text, not the id."""
    return (ex.question, ex.choices)
MAX_CHOICE_TOKENS = 64


@dataclass
class Encoded:
    """One example as a packed token sequence."""

    input_ids: list[int]
    position_ids: list[int]
    segment: list[int]  # 0 = question, i = choice i (1-based)
    pred_pos: list[int]  # cloze: packed positions whose output predicts a choice token
    pred_tok: list[int]  # cloze: the token predicted there
    pred_choice: list[int]  # cloze: which choice (0-based) that token belongs to
    n_choices: int
    label: int
    question_cut: int = 0  # tokens dropped from the start of the question (prompt) to fit max_length
    choices_cut: int = 0  # cloze: choices cut to their first MAX_CHOICE_TOKENS tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, 1, T, T] additive attention mask
    lengths: torch.Tensor  # [B]
    n_choices: torch.Tensor  # [B]
    labels: torch.Tensor  # [B]
    pred_batch: torch.Tensor  # [P] cloze predictions: batch row
    pred_pos: torch.Tensor  # [P]
    pred_tok: torch.Tensor  # [P]
    pred_choice: torch.Tensor  # [P]
    choice_len: torch.Tensor  # [B, C] number of tokens of each choice (cloze)
    keys: list[tuple]  # content keys (question, choices): identical questions share cached work

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


class LetterHead(nn.Module):
    """``26 x hidden`` output head over the answer letters, initialised from the LM head rows.

    Its weight is float32 whatever the model's dtype (mixed precision: a bf16 weight would lose every
    optimiser update below half a bf16 ULP, ~1e-4 at its magnitude); it takes float32 hidden states."""

    def __init__(self, lm_head_weight: torch.Tensor, letter_ids: list[int], trainable: bool) -> None:
        super().__init__()
        self.token_ids = list(letter_ids)
        dtype = torch.promote_types(lm_head_weight.dtype, torch.float32)  # at least fp32: fp32 under a bf16 model
        weight = lm_head_weight[letter_ids].detach().to(dtype, copy=True)
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.register_buffer("initial_weight", self.weight.detach().clone(), persistent=False)

    @torch.no_grad()
    def reset_trainable(self) -> None:
        """Back to the LM-head rows it was built from (a fresh member; see ``models.init_lora``)."""
        self.weight.copy_(self.initial_weight)

    def prior_mean(self) -> dict[str, torch.Tensor]:
        """Where a Laplace prior on the head is centred: its initial value, the LM-head rows of the letters
        (fine-tuning moves the head away from them; see ``posterior/laplace.py``)."""
        return {"weight": self.initial_weight}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


def letter_token_ids(tokenizer, n: int = 26) -> list[int]:
    """Token ids of " A", " B", ...; each letter must be a single token."""
    ids = []
    for letter in LETTERS[:n]:
        toks = tokenizer(f" {letter}", add_special_tokens=False).input_ids
        if len(toks) != 1:
            raise ModelError(
                f"letter scoring needs ' {letter}' to be one token, but this tokenizer splits it into {toks}; use --scoring cloze"
            )
        ids.append(toks[0])
    return ids


class Scorer:
    """Scores batches of MCQ examples with a (LoRA-wrapped) decoder LM."""

    def __init__(self, model: nn.Module, tokenizer, mode: str, max_length: int = 512, train_head: bool = True) -> None:
        if mode not in ("letter", "cloze"):
            raise ValueError(f"scoring mode must be 'letter' or 'cloze', got {mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode
        self.max_length = max_length
        self.parts = decoder_parts(model)
        self.prefix_ids = tokenizer("", add_special_tokens=True).input_ids  # [BOS] or []
        self._encoded: dict[tuple, Encoded] = {}
        if mode == "letter":
            if not hasattr(self._base, "letter_head"):
                ids = letter_token_ids(tokenizer)
                self._base.letter_head = LetterHead(self.parts.lm_head.weight, ids, train_head)
            self.letter_head: LetterHead = self._base.letter_head
        self.split = self._first_trainable_layer()

    @property
    def _base(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def _first_trainable_layer(self) -> int:
        """Index of the lowest layer with trainable parameters: everything below it is frozen."""
        if any(p.requires_grad for p in self.parts.embed_tokens.parameters()):
            return 0
        for i, layer in enumerate(self.parts.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.parts.layers)

    # ------------------------------------------------------------------ encoding
    def encode(self, examples: list[MCQExample]) -> list[Encoded]:
        """Tokenize once; results are cached by content (ids may repeat across datasets)."""
        todo = list({key(ex): ex for ex in examples if key(ex) not in self._encoded}.values())
        if todo:
            if self.mode == "letter":
                prompts = [
                    f"Question: {ex.question}\n" + "".join(f"{l}. {c}\n" for l, c in zip(ex.labels, ex.choices)) + "Answer:"
                    for ex in todo
                ]
                q_ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
                heads = self.tokenizer([f"Question: {ex.question}\n" for ex in todo], add_special_tokens=False).input_ids
                for ex, q, head in zip(todo, q_ids, heads):  # the choices and "Answer:" are never cut
                    self._encoded[key(ex)] = self._pack(ex, q, [], keep=max(0, len(q) - len(head)))
            else:
                q_ids = self.tokenizer([f"Question: {ex.question}\nAnswer:" for ex in todo], add_special_tokens=False).input_ids
                flat = [f" {c}" for ex in todo for c in ex.choices]
                c_ids = self.tokenizer(flat, add_special_tokens=False).input_ids
                at = 0
                for ex, q in zip(todo, q_ids):
                    full = c_ids[at : at + ex.n_choices]
                    at += ex.n_choices
                    encoded = self._pack(ex, q, [c[:MAX_CHOICE_TOKENS] for c in full])
                    encoded.choices_cut = sum(len(c) > MAX_CHOICE_TOKENS for c in full)
                    self._encoded[key(ex)] = encoded
        return [self._encoded[key(ex)] for ex in examples]

    def _pack(self, ex: MCQExample, question: list[int], choices: list[list[int]], keep: int = 0) -> Encoded:
        """``keep``: tokens at the end of ``question`` that must not be cut (letter scoring: the choices)."""
        if any(len(c) == 0 for c in choices):
            raise ModelError(f"example {ex.id!r}: a choice tokenizes to nothing")
        fixed = sum(len(c) for c in choices) + keep
        budget = self.max_length - len(self.prefix_ids) - sum(len(c) for c in choices)
        if budget < keep + 1:
            where = f" (line {ex.line})" if ex.line is not None else ""
            raise ModelError(f"question {ex.id!r}{where}: its choices alone take {fixed} tokens, "
                             f"more than --max-length {self.max_length} allows; raise --max-length")
        q = self.prefix_ids + question[-budget:]  # keep the end of the question, next to "Answer:"
        ids, pos, seg = list(q), list(range(len(q))), [0] * len(q)
        pred_pos, pred_tok, pred_choice = [], [], []
        for i, c in enumerate(choices):
            start = len(ids)
            for j, tok in enumerate(c):
                # token j of choice i is predicted by the output at the previous position of that choice,
                # or by the last question token for j == 0
                pred_pos.append(len(q) - 1 if j == 0 else start + j - 1)
                pred_tok.append(tok)
                pred_choice.append(i)
            ids += c
            pos += range(len(q), len(q) + len(c))
            seg += [i + 1] * len(c)
        label = -1 if ex.answer is None else ex.answer_index  # -1: a question to predict, never in a loss
        return Encoded(ids, pos, seg, pred_pos, pred_tok, pred_choice, ex.n_choices, label,
                       question_cut=max(0, len(question) - budget))

    def collate(self, encoded: list[Encoded], keys: list[tuple] | None = None) -> Batch:
        """Pad to the longest sequence in the batch (dynamic padding) and build the packed attention mask."""
        b, t = len(encoded), max(len(e.input_ids) for e in encoded)
        c = max(e.n_choices for e in encoded)
        input_ids = torch.full((b, t), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        position_ids = torch.zeros((b, t), dtype=torch.long)
        segment = torch.full((b, t), -1, dtype=torch.long)
        choice_len = torch.zeros((b, c), dtype=torch.long)
        pb, pp, pt, pc = [], [], [], []
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[i, :n] = torch.tensor(e.input_ids)
            position_ids[i, :n] = torch.tensor(e.position_ids)
            segment[i, :n] = torch.tensor(e.segment)
            pb += [i] * len(e.pred_pos)
            pp += e.pred_pos
            pt += e.pred_tok
            pc += e.pred_choice
            if e.pred_choice:
                choice_len[i] = torch.bincount(torch.tensor(e.pred_choice), minlength=c)
        seg_q, seg_k = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
        allowed |= torch.eye(t, dtype=torch.bool)  # padding rows attend to themselves (no all-masked softmax rows)
        dtype = self.parts.embed_tokens.weight.dtype
        mask = torch.zeros((b, 1, t, t), dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        device = self.parts.embed_tokens.weight.device
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return Batch(
            input_ids=input_ids.to(device),
            position_ids=position_ids.to(device),
            mask=mask.to(device),
            lengths=as_long([len(e.input_ids) for e in encoded]),
            n_choices=as_long([e.n_choices for e in encoded]),
            labels=as_long([e.label for e in encoded]),
            pred_batch=as_long(pb),
            pred_pos=as_long(pp),
            pred_tok=as_long(pt),
            pred_choice=as_long(pc),
            choice_len=choice_len.to(device),
            keys=list(keys) if keys is not None else [(i,) for i in range(b)],
        )

    def batch(self, examples: list[MCQExample]) -> Batch:
        return self.collate(self.encode(examples), [key(ex) for ex in examples])

    # ------------------------------------------------------------------ forward
    def _run_layers(self, hidden: torch.Tensor, batch: Batch, layers) -> torch.Tensor:
        if len(layers) == 0:
            return hidden
        cos_sin = self.parts.rotary_emb(hidden, batch.position_ids)
        for layer in layers:
            out = layer(hidden, attention_mask=batch.mask, position_ids=batch.position_ids, position_embeddings=cos_sin)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def bottom(self, batch: Batch) -> torch.Tensor:
        """Hidden states after the frozen lower layers, ``[B, T, H]``."""
        hidden = self.parts.embed_tokens(batch.input_ids)
        return self._run_layers(hidden, batch, self.parts.layers[: self.split])

    def top(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Choice logits ``[B, C]`` from the lower layers' output (absent choices are ``-inf``)."""
        hidden = self._run_layers(hidden, batch, self.parts.layers[self.split :])
        c = int(batch.n_choices.max())
        absent = torch.arange(c, device=hidden.device)[None, :] >= batch.n_choices[:, None]
        if self.mode == "letter":
            # inference-time economy: only the last position, and only the answer-letter rows of the head
            last = hidden[torch.arange(batch.size, device=hidden.device), batch.lengths - 1]
            logits = self.letter_head(self.parts.norm(last).to(self.letter_head.weight.dtype))[:, :c]
        else:
            h = self.parts.norm(hidden[batch.pred_batch, batch.pred_pos])
            logp = torch.log_softmax(self.parts.lm_head(h).float(), dim=-1)
            tok_logp = logp.gather(1, batch.pred_tok[:, None]).squeeze(1)
            sums = torch.zeros(batch.size * c, dtype=tok_logp.dtype, device=hidden.device).index_add(
                0, batch.pred_batch * c + batch.pred_choice, tok_logp
            )
            logits = sums.view(batch.size, c) / batch.choice_len.clamp(min=1)
        return logits.masked_fill(absent, float("-inf"))

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.top(self.bottom(batch), batch)


class HiddenCache:
    """Lower-layer outputs per example (content key), computed once and reused (exact: those layers are frozen)."""

    def __init__(self, scorer: Scorer, enabled: bool = True) -> None:
        self.scorer = scorer
        self.enabled = enabled and scorer.split > 0
        self._store: dict[str, torch.Tensor] = {}

    def hidden(self, batch: Batch) -> torch.Tensor:
        if not self.enabled:
            return self.scorer.bottom(batch)
        missing = [i for i, key in enumerate(batch.keys) if key not in self._store]
        if missing:
            fresh = self.scorer.bottom(batch if len(missing) == batch.size else _select(batch, missing))
            for j, i in enumerate(missing):
                self._store[batch.keys[i]] = fresh[j, : int(batch.lengths[i])].clone()
        weight = self.scorer.parts.embed_tokens.weight
        out = torch.zeros(batch.size, batch.input_ids.shape[1], weight.shape[1], dtype=weight.dtype, device=weight.device)
        for i, key in enumerate(batch.keys):
            h = self._store[key]
            out[i, : h.shape[0]] = h
        return out

    def fill(self, examples: list[MCQExample], batch_size: int = 16) -> None:
        """Compute the lower layers for all ``examples`` up front, in length-sorted batches (little padding)."""
        if not self.enabled:
            return
        encoded = self.scorer.encode(examples)
        todo = sorted((i for i, ex in enumerate(examples) if key(ex) not in self._store), key=lambda i: len(encoded[i].input_ids))
        for start in range(0, len(todo), batch_size):
            self.hidden(self.scorer.batch([examples[i] for i in todo[start : start + batch_size]]))

    def __len__(self) -> int:
        return len(self._store)


def _select(batch: Batch, rows: list[int]) -> Batch:
    """A sub-batch of the given rows (same padding width, so the stored states are unaffected)."""
    device = batch.input_ids.device
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    keep = torch.isin(batch.pred_batch, idx)
    remap = torch.full((batch.size,), -1, dtype=torch.long, device=device)
    remap[idx] = torch.arange(len(rows), device=device)
    return Batch(
        input_ids=batch.input_ids[idx],
        position_ids=batch.position_ids[idx],
        mask=batch.mask[idx],
        lengths=batch.lengths[idx],
        n_choices=batch.n_choices[idx],
        labels=batch.labels[idx],
        pred_batch=remap[batch.pred_batch[keep]],
        pred_pos=batch.pred_pos[keep],
        pred_tok=batch.pred_tok[keep],
        pred_choice=batch.pred_choice[keep],
        choice_len=batch.choice_len[idx],
        keys=[batch.keys[i] for i in rows],
    )
