"""Evaluating a run: the table rows it asks for, and every row on every evaluation set through
:func:`predict.predict_probs`, with temperature scaling on top where asked; the files are :mod:`rundir`'s.
Every prediction is kept in ``eval/.predictions/`` (:class:`SampleStore`): an interrupted evaluation resumes, and
a later one predicts only what it has not predicted before."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import metrics
from .calibration import apply_temperature, fit_temperature
from ._version import __version__
from .config import RunConfig, config_to_dict
from .data import MCQExample
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from .members import Session, add_posthoc_posterior, draw_generator
from .models import runtime_info
from .params import trainable_parameters
from .posterior import Ensemble, Posterior, Row, base_rows, expand_rows, get_method, load_posterior, row
from .predict import predict_logits, predict_probs
from .rundir import PREDICTION_STORE, RESULT_NEUTRAL, member_dirs, set_dir_name, write_abstention, write_eval
from .selection import base_examples, check_eval_split, eval_data

__all__ = ["SCALE_GRID", "requested_rows", "row_unavailable", "table_rows", "eval_sets", "draw_generator",
           "member_posterior", "row_probs", "temperature_scale", "abstention_rule", "evaluate_run", "evaluate_base",
           "SampleStore"]


#: ``--swag-scale auto`` chooses among these covariance scales by validation NLL.
SCALE_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def requested_rows(cfg: RunConfig) -> list[str]:
    """zero-shot and the rows of ``--methods``, in order; an unknown name raises ValueError."""
    rows = [base.name for base in base_rows()] + expand_rows(cfg.eval.methods)
    check_eval_split(cfg)  # every command that trains or evaluates a run asks for its rows first
    return list(dict.fromkeys(rows))


def row_unavailable(cfg: RunConfig, name: str) -> str | None:
    """Why a table row cannot be built with these settings, or None."""
    spec = row(name)
    if cfg.swag.epochs == 0 and get_method(spec.method).trajectory:
        return "needs SWAG epochs (--swag-epochs is 0)"
    if cfg.posterior.members < 2 and spec.all_members:
        return f"needs --members 2 or more (--members is {cfg.posterior.members})"
    return None


def table_rows(cfg: RunConfig) -> list[str]:
    """The rows of the results table: the requested ones these settings can build."""
    return [r for r in requested_rows(cfg) if row_unavailable(cfg, r) is None]


def check_posteriors(session: Session, members: list[Path], rows: list[str]) -> None:
    """Load every saved posterior the rows use, of every member, before any row is evaluated: a damaged file
    or a run of another base model or LoRA setup fails at once."""
    for member in members:
        for name in sorted({row(r).saved for r in rows}):
            if (member / "posteriors" / name).is_dir():
                load_posterior(member / "posteriors" / name, model=session.model, expected_metadata=session.metadata)


def eval_sets(session: Session) -> list[tuple[str, str, list[MCQExample]]]:
    """(name, role, examples) for validation, the in-distribution test split and every shift set."""
    return [("validation", "validation", session.validation), *eval_data(session.cfg)]


def member_posterior(session: Session, member: Path, spec: Row) -> Posterior:
    """The saved posterior a row uses of one member (a post-hoc one is fitted first when the member lacks it),
    checked against the session's model and metadata."""
    directory = member / "posteriors" / spec.saved
    if not directory.is_dir():
        add_posthoc_posterior(session, member, spec.method)
    return load_posterior(directory, model=session.model, expected_metadata=session.metadata)


def row_probs(session: Session, posterior: Posterior, seeds: list[int], spec: Row, examples: list[MCQExample], n: int,
              scale: float | None, set_name: str, progress: Any = None) -> torch.Tensor:
    """Sample probabilities ``[S, N, C]`` of a row whose posterior is built from the members of ``seeds``: weights
    drawn per member seed (the same for every set), in-forward randomness from the generator of ``set_name``."""
    weights = [draw_generator(seed, spec.saved) for seed in seeds]
    return predict_probs(session.scorer, examples, posterior, n, weights if len(weights) > 1 else weights[0],
                         forward_generator=draw_generator(seeds[0], spec.saved, set_name),
                         cache=session.cache, batch_size=session.cfg.eval.batch_size, scale=scale,
                         linearized=spec.linearized, progress=progress)


def evaluate_run(session: Session, run_dirs: list[Path], rows: list[str], out_dir: Path, progress: bool = True,
                 abstain_risk: float | None = None) -> list[dict]:
    """Evaluate every table row on every evaluation set with the shared prediction path.

    A row's posterior is one member's saved posterior, or the equal-weight :class:`Ensemble` of every member's
    (MultiSWAG, deep ensembles); either goes through :func:`predict.predict_probs`. Member ``i``'s weights are
    drawn with :func:`draw_generator` of its own seed (the same weights for every set), so the ``swag`` row and
    member 0 of ``multiswag`` are the same S draws. A row samples with its posterior's own default scale unless
    the row fixes one (``Row.scale``) or the user set ``swag.scale`` for posteriors that take it.
    ``abstain_risk``: also choose each row's abstention threshold for this risk on the validation set and store
    it (:func:`rundir.write_abstention`).
    """
    members = member_dirs(run_dirs)
    check_posteriors(session, members, rows)
    sets = [(n, r, ex) for n, r, ex in eval_sets(session) if ex]
    bar = tqdm(desc="evaluate", disable=not progress, leave=False, unit="ex")
    store = SampleStore(session, out_dir)
    evaluation = _RowEvaluation(session, members, sets, out_dir, bar, abstain_risk, store)
    results = [result for name in rows for result in evaluation.write_row(row(name))]
    bar.close()
    return results


class SampleStore:
    """The sample probabilities ``[S, N, C]`` of every prediction an evaluation makes, one safetensors file per
    (members, posterior, draws, scale, set) in ``eval/.predictions/``, written as soon as it is computed. An
    evaluation that is killed, crashes or is stopped and then run again reads them instead of predicting again,
    and ends with the same files as one that was never stopped (a prediction is a function of its key only: its
    weight and in-forward draws come from generators seeded by the key, :func:`draw_generator`); a later
    evaluation of the same run with more rows (``--methods``), more sets (``--shift``) or ``--calibrate`` predicts
    only what is new.

    A file's name is the sha256 of everything its probabilities depend on: the run's config (less the settings
    that only choose which rows and sets to evaluate, and :data:`rundir.RESULT_NEUTRAL`), the resolved dtype and
    device, the torch and swaglora versions, the base model and LoRA (``Session.metadata``), each member's ``done.json``
    and saved posterior files (by content), the examples of the set (by content) and the row's draws. When any
    of these differs the file is simply not found, so a stale prediction is never read; deleting the directory
    only costs the time to predict again.
    """

    #: settings that choose which rows and sets to evaluate, not what a prediction is (a set's questions are in
    #: the key by content), and the result-neutral ones
    IGNORED = {f"eval.{k}" for k in ("methods", "calibrate", "shift", "test", "split", "limit", "validation_only",
                                     "allow_tuning_split")} | RESULT_NEUTRAL

    def __init__(self, session: Session, out_dir: Path) -> None:
        config = {f"{section}.{k}": v for section, values in config_to_dict(session.cfg).items() for k, v in values.items()}
        runtime = runtime_info(session.cfg.model)
        self.base = {"config": {k: v for k, v in config.items() if k not in self.IGNORED},
                     "runtime": {k: runtime[k] for k in ("dtype", "device", "torch")},
                     "library_version": __version__, "model": session.metadata}
        self.directory = Path(out_dir) / "eval" / PREDICTION_STORE
        self._digests: dict[Any, str] = {}
        self.hits = 0

    def member(self, member: Path, saved: str) -> str:
        """The sha256 of a member's ``done.json`` and of the files of its saved posterior ``saved``."""
        if (member, saved) not in self._digests:
            h = hashlib.sha256((member / "done.json").read_bytes())
            directory = member / "posteriors" / saved
            for f in sorted(p for p in directory.iterdir() if p.is_file()):
                h.update(f.name.encode() + b"\0" + f.read_bytes())
            self._digests[member, saved] = h.hexdigest()
        return self._digests[member, saved]

    def examples(self, set_name: str, examples: list[MCQExample]) -> str:
        """The sha256 of the examples of ``set_name`` (one list per set in an evaluation)."""
        key = ("set", set_name)
        if key not in self._digests:
            text = json.dumps([[ex.id, ex.question, list(ex.choices), list(ex.labels), ex.answer, ex.subject]
                               for ex in examples])
            self._digests[key] = hashlib.sha256(text.encode()).hexdigest()
        return self._digests[key]

    def get(self, key: dict[str, Any], compute: Any) -> torch.Tensor:
        """The stored probabilities of ``key``, or ``compute()``'s, stored before they are returned."""
        text = json.dumps({**self.base, **key}, sort_keys=True, default=str)
        path = self.directory / f"{hashlib.sha256(text.encode()).hexdigest()}.safetensors"
        if path.is_file():
            try:
                tensors, meta = load_safetensors(path, with_metadata=True)
                if meta.get("key") == text:
                    self.hits += 1
                    return tensors["probs"]
            except (ValueError, KeyError) as e:  # a file cut short by the interruption: predict again
                print(f"swaglora: ignoring {path} ({e}); predicting again", file=sys.stderr)
        probs = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path, {"probs": probs}, metadata={"key": text})
        return probs


class _RowEvaluation:
    """The table rows of one evaluation: posteriors of the members, the auto scale, predictions, files."""

    def __init__(self, session: Session, members: list[Path], sets: list, out_dir: Path, bar: Any,
                 abstain_risk: float | None = None, store: SampleStore | None = None) -> None:
        self.session, self.cfg, self.members, self.sets, self.out_dir, self.bar = session, session.cfg, members, sets, out_dir, bar
        self.abstain_risk = abstain_risk
        self.store = store if store is not None else SampleStore(session, out_dir)
        self.seeds = [int(read_json(m / "done.json")["seed"]) for m in members]
        self.chosen: dict[tuple, float] = {}
        self.memo: dict[tuple, torch.Tensor] = {}  # (member, posterior, S, scale, set) -> probabilities [S, N, C]

    def predict(self, posterior: Posterior, used: range, spec: Row, examples: list[MCQExample], n: int,
                scale: float | None, set_name: str, progress: Any = None) -> torch.Tensor:
        """Through the :class:`SampleStore`: predicted once, also across an interruption."""
        seeds = [self.seeds[i] for i in used]
        key = {"members": [self.store.member(self.members[i], spec.saved) for i in used], "seeds": seeds,
               "posterior": spec.saved, "linearized": spec.linearized, "stochastic": posterior.stochastic_forward,
               "draws": 1 if posterior.is_point_mass and not posterior.stochastic_forward else n, "scale": scale,
               "set": set_name, "examples": self.store.examples(set_name, examples)}
        return self.store.get(key, lambda: row_probs(self.session, posterior, seeds, spec, examples, n, scale,
                                                     set_name, progress))

    def member_probs(self, index: int, posterior: Posterior, spec: Row, examples: list[MCQExample], n: int,
                     scale: float | None, set_name: str) -> torch.Tensor:
        """One member's sample probabilities, computed once per (member, posterior, S, scale, set): the ``swag`` row
        and member 0 of ``multiswag`` (and ``map`` and member 0 of ``ensemble``) are the same draws, predicted once."""
        draws = 1 if posterior.is_point_mass else n  # a point mass gives one draw whatever S (map and ensemble)
        key = (index, spec.saved, draws, scale, set_name)
        if key not in self.memo:
            self.memo[key] = self.predict(posterior, range(index, index + 1), spec, examples, n, scale, set_name, self.bar)
        return self.memo[key]

    def auto_scale(self, spec: Row, n: int) -> float:
        """``--swag-scale auto``: the scale of the grid with the lowest validation NLL (member 0, with the draws
        its evaluation uses)."""
        key = (spec.saved, n)
        if key not in self.chosen:
            validation = [(set_name, ex) for set_name, role, ex in self.sets if role == "validation"]
            if not validation:
                raise ValueError("--swag-scale auto needs a validation set")
            set_name, examples = validation[0]
            labels = torch.tensor([ex.answer_index for ex in examples])
            posterior = member_posterior(self.session, self.members[0], spec)
            # through the memo: the row's own validation predictions at the chosen scale are not computed again
            scores = {scale: metrics.nll(metrics.predictive(self.member_probs(0, posterior, spec, examples, n, scale, set_name)), labels)
                      for scale in SCALE_GRID}
            self.chosen[key] = min(scores, key=scores.get)
            atomic_write_json(self.out_dir / "eval" / f"scale-{spec.saved}.json", {"grid_nll": scores, "chosen": self.chosen[key]})
        return self.chosen[key]

    def write_row(self, spec: Row) -> list[dict]:
        """Predict the row on every set (and its temperature-scaled variant), write and return the results."""
        cfg, method = self.cfg, get_method(spec.method)
        n, scale, setting = method.samples_for(cfg, spec), spec.scale, cfg.swag.scale_setting
        if scale is None and spec.sampled and method.takes_swag_scale:
            scale = self.auto_scale(spec, n) if setting == "auto" else setting
        used = range(len(self.members)) if spec.all_members else range(1)
        start, hits = time.perf_counter(), self.store.hits
        parts = [member_posterior(self.session, self.members[i], spec) for i in used]
        posterior = Ensemble(parts) if spec.all_members else parts[0]
        if posterior.stochastic_forward or spec.linearized:  # in-forward randomness: one generator for the row
            probs = {set_name: self.predict(posterior, used, spec, examples, n, scale, set_name, self.bar)
                     for set_name, _, examples in self.sets}
        else:  # the mixture's draws are its members' draws in turn (Ensemble.draws), so its predictions are theirs
            probs = {set_name: torch.cat([self.member_probs(i, parts[i], spec, examples, n, scale, set_name) for i in used])
                     for set_name, _, examples in self.sets}
        reused = self.store.hits - hits  # predictions read back from an earlier evaluation: no cost to report
        common = {"n_members": len(used), "scale": (scale if scale is not None else parts[0].default_scale) if spec.sampled else spec.scale,
                  "seconds": None if reused else time.perf_counter() - start, "reused_predictions": reused,
                  "seed": cfg.train.seed}
        variants = [(spec.name, probs, {})]
        if cfg.eval.calibrate == "temperature":
            variants.append((f"{spec.name}+ts", *_temperature_scaled(probs, self.sets)))
        results = []
        for label, set_probs, extra in variants:
            for set_name, role, examples in self.sets:
                info = {"method": label, "eval_set": set_name, "role": role, "n_samples": set_probs[set_name].shape[0],
                        **common, **extra}
                out = self.out_dir / "eval" / set_dir_name(set_name) / label
                results.append(write_eval(out, examples, set_probs[set_name], info))
                if role == "validation":
                    write_abstention(out, self.abstention(set_probs[set_name], examples))
        return results

    def abstention(self, probs: torch.Tensor, examples: list[MCQExample]) -> dict | None:
        """The abstention rule for ``--abstain-risk`` chosen on these validation predictions (None: not asked)."""
        return None if self.abstain_risk is None else abstention_rule(probs, examples, self.abstain_risk)


def abstention_rule(probs: torch.Tensor, examples: list[MCQExample], risk: float) -> dict:
    """The abstention rule for ``risk`` chosen on sample probabilities ``[S, N, C]`` of answered ``examples``
    (:func:`metrics.abstention_rule` of the predictive's confidence and correctness)."""
    confidence, prediction = metrics.predictive(probs).max(-1)
    return metrics.abstention_rule(confidence, prediction == torch.tensor([ex.answer_index for ex in examples]), risk)


def _bma_log_probs(probs: torch.Tensor, examples: list[MCQExample]) -> torch.Tensor:
    """``log`` of the BMA predictive ``[N, C]`` of sample probabilities ``[S, N, C]``: ``-inf`` exactly at the
    absent choices (beyond an example's choice count), present ones at least ``log`` of the smallest normal
    float, so that fitting and applying a temperature see the same choices."""
    present = torch.arange(probs.shape[-1])[None, :] < torch.tensor([ex.n_choices for ex in examples])[:, None]
    log_pred = metrics.predictive(probs).double().clamp_min(torch.finfo(torch.float64).tiny).log()
    return log_pred.masked_fill(~present, float("-inf"))


def _temperature_scaled(probs: dict[str, torch.Tensor], sets) -> tuple[dict[str, torch.Tensor], dict]:
    """Temperature scaling on top of any method: one T fitted on the validation predictive by NLL
    (logits = log of the BMA-averaged probabilities, absent choices ``-inf``), applied to every set."""
    validation = [(name, ex) for name, role, ex in sets if role == "validation"]
    if not validation:
        raise ValueError("--calibrate temperature needs a validation set")
    name, examples = validation[0]
    labels = torch.tensor([ex.answer_index for ex in examples])
    temperature = fit_temperature(_bma_log_probs(probs[name], examples), labels)
    scaled = {set_name: temperature_scale(probs[set_name], set_examples, temperature) for set_name, _, set_examples in sets}
    return scaled, {"temperature": temperature}


def temperature_scale(probs: torch.Tensor, examples: list[MCQExample], temperature: float) -> torch.Tensor:
    """The ``+ts`` variant of sample probabilities ``[S, N, C]``: softmax of the log BMA predictive divided by
    ``temperature``, as one sample ``[1, N, C]``."""
    return torch.softmax(apply_temperature(_bma_log_probs(probs, examples), temperature), -1)[None].float()


def evaluate_base(session: Session, out_dir: Path, progress: bool = True) -> list[dict]:
    """Zero-shot evaluation of the base model (LoRA at init is the identity) on ``--data`` or ``--task/--split``;
    writes ``out_dir/metrics.json`` and ``out_dir/predictions.jsonl``."""
    cfg = session.cfg
    spec = cfg.data.data or cfg.data.task
    examples = base_examples(cfg)
    thetas = [{k: v.detach().clone() for k, v in trainable_parameters(session.model).items()}]
    logits = predict_logits(session.scorer, examples, thetas, cache=session.cache, batch_size=cfg.eval.batch_size)
    info = {"method": base_rows()[0].name, "eval_set": spec, "role": "test", "n_samples": 1, "n_members": 1, "scale": None,
            "seconds": None, "seed": cfg.train.seed, "model": session.lm.name, "scoring": session.scorer.mode}
    return [write_eval(out_dir, examples, torch.softmax(logits, -1), info)]
