"""Using a trained run on new questions: ``swaglora.load(run_dir, method=None)`` returns a :class:`Predictor`;
``swaglora predict`` is a thin layer over it.

A row is predicted exactly as its evaluation predicted it (:mod:`evaluate`): the same posterior (one member's, or
the :class:`Ensemble` of every member's), the same number of samples, scale and temperature (read from the row's
validation ``metrics.json`` when the run was evaluated, else from the run's config as evaluation would choose
them), and the same weight draws (:func:`evaluate.draw_generator` of each member's seed). So a question of an
evaluation set, predicted in the same batches (the set's file as input), gets exactly the probabilities of that
set's ``predictions.jsonl`` (bit-equal in float32). Randomness inside a forward pass (MC-dropout masks, the
linearised Laplace predictive's logit samples) comes from the generator of the set named :data:`PREDICT_SET`:
the same answers for the same input, but not the draws of an evaluation set, so those rows agree with the
evaluation files only in distribution.

:func:`plan_prediction` reads and checks everything in the run directory before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import metrics
from .config import RunConfig, apply_overrides
from .data import LETTERS, DataError, MCQExample, records_to_examples
from .evaluate import abstention_rule, member_posterior, row_probs, row_unavailable, temperature_scale
from .io import read_json
from .posterior import CONFIG_NAME, Ensemble, Row, base_rows, get_method, row, row_names
from .rundir import ABSTENTION_NAME, load_run_config, member_dirs, prediction_rows, set_dir_name
from .scoring import HiddenCache
from .selection import training_data
from .validate import RUN_MARKER

__all__ = ["PREDICT_SET", "Prediction", "PredictPlan", "Predictor", "plan_prediction", "load", "answered_summary",
           "rule_text"]

#: The set name whose generator draws the in-forward randomness of ``predict`` (MC dropout, linearised Laplace).
PREDICT_SET = "predict"
_TS = "+ts"  # the temperature-scaled variant of a row


@dataclass(frozen=True)
class Prediction:
    """One question's prediction. ``mutual_information`` is None for a single-sample predictive; ``abstain`` is
    True when the run's abstention rule holds back the answer (``confidence < threshold``, or always when no
    threshold reached the target risk on validation: ``threshold`` None); without a rule it is False."""

    id: str | None
    probs: list[float]
    labels: list[str]
    prediction: str
    confidence: float
    entropy: float
    mutual_information: float | None
    abstain: bool
    threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON line of ``swaglora predict`` (``mutual_information`` only where the method has several samples)."""
        out = asdict(self)
        if self.mutual_information is None:
            del out["mutual_information"]
        return out


@dataclass
class PredictPlan:
    """What :func:`plan_prediction` resolved from a run directory, before any model is loaded."""

    run_dir: Path
    cfg: RunConfig
    method: str  # the row, possibly "<row>+ts"
    spec: Row
    members: list[Path]  # the members the row's posterior is built from
    seeds: list[int]
    n: int  # samples per member
    scale: float | None
    temperature: float | None
    abstain_risk: float | None
    rule: dict | None  # the stored abstention rule for abstain_risk (None: compute it on validation, or no rule)
    max_choices: int | None  # letter scoring: the most choices the run was fine-tuned on
    notes: list[str] = field(default_factory=list)  # what was chosen and why, for the user
    train: list[MCQExample] = field(default_factory=list)  # the run's data, loaded only when needed
    validation: list[MCQExample] = field(default_factory=list)

    @property
    def needs_threshold(self) -> bool:
        return self.abstain_risk is not None and self.rule is None

    def check_examples(self, examples: list[MCQExample]) -> None:
        """Refuse a question with more choices than the run's letter head was fine-tuned on."""
        if self.max_choices is None:
            return
        for ex in examples:
            if ex.n_choices > self.max_choices:
                where = f" (line {ex.line})" if ex.line is not None else ""
                raise DataError(f"question {ex.id!r}{where} has {ex.n_choices} choices, but {self.run_dir} was fine-tuned "
                                f"on questions with at most {self.max_choices} (letter scoring: the head rows of letters "
                                f"after {LETTERS[self.max_choices - 1]} were never trained)", field="choices")


def _validation_records(run_dir: Path) -> dict[str, dict]:
    """row -> the validation ``metrics.json`` of the run's evaluation."""
    records = {}
    for path in sorted((run_dir / "eval" / set_dir_name("validation")).glob("*/metrics.json")):
        record = read_json(path)
        if isinstance(record, dict) and record.get("role") == "validation":
            records[str(record.get("method") or path.parent.name)] = record
    return records


def _default_method(run_dir: Path, records: dict[str, dict]) -> tuple[str, str]:
    scored = {m: r["nll"] for m, r in records.items() if isinstance(r.get("nll"), (int, float))}
    if not scored:
        raise ValueError(f"{run_dir} has no evaluated rows (eval/validation/<row>/metrics.json) to choose a method "
                         "from; evaluate the run (swaglora evaluate --run RUN) or name a row with --method")
    best = min(scored, key=scored.get)
    return best, f"method {best}: the lowest validation NLL ({scored[best]:.4f}) of the run's {len(scored)} evaluated rows"


def _sampling(cfg: RunConfig, run_dir: Path, spec: Row, record: dict | None, n_members: int) -> tuple[int, float | None]:
    """Samples per member and scale: those of the row's evaluation when it was evaluated with these members, else
    as evaluation chooses them from the config (``--swag-scale auto``: the scale the evaluation stored)."""
    if record is not None and record.get("n_members") == n_members:
        return max(1, int(record["n_samples"]) // n_members), record.get("scale")
    method = get_method(spec.method)
    scale, setting = spec.scale, cfg.swag.scale_setting
    if scale is None and spec.sampled and method.takes_swag_scale:
        if setting == "auto":
            chosen = run_dir / "eval" / f"scale-{spec.saved}.json"
            if not chosen.is_file():
                raise ValueError(f"{run_dir}: row {spec.name} uses --swag-scale auto, which is chosen when the row is "
                                 f"evaluated ({chosen} is missing); evaluate it first")
            setting = float(read_json(chosen)["chosen"])
        scale = setting
    return method.samples_for(cfg, spec), scale


def _as_evaluated(run_dir: Path, cfg: RunConfig) -> RunConfig:
    """``--dtype auto`` resolves per machine; predict takes the dtype the run resolved (``swaglora_run.json``), so
    its probabilities are the evaluation's on any machine."""
    marker = run_dir / RUN_MARKER
    dtype = (read_json(marker).get("runtime") or {}).get("dtype") if marker.is_file() else None
    return apply_overrides(cfg, {"model.dtype": dtype}) if cfg.model.dtype == "auto" and dtype else cfg


def _scoring(member: Path) -> str | None:
    config = member / "posteriors" / base_rows()[0].saved / CONFIG_NAME
    return read_json(config).get("metadata", {}).get("scoring") if config.is_file() else None


def plan_prediction(run_dir: str | Path, method: str | None = None, abstain_risk: float | None = None) -> PredictPlan:
    """Resolve the row, its members, samples, scale, temperature and abstention rule from ``run_dir``, and load
    the run's data where needed (a post-hoc posterior to fit, a threshold to choose on validation). Raises
    ValueError / FileNotFoundError / DataError (one line each) for a missing run, an unknown row, a row the run
    cannot provide, or data it no longer finds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    cfg = _as_evaluated(run_dir, load_run_config(run_dir))
    members = member_dirs([run_dir])
    records = _validation_records(run_dir)
    notes = []
    if method is None:
        method, note = _default_method(run_dir, records)
        notes.append(note)
    base = method.removesuffix(_TS)
    try:
        spec = row(base)
    except ValueError:
        raise ValueError(f"unknown method {method!r}; rows: {', '.join(row_names())} (and <row>{_TS} where the run "
                         "was evaluated with --calibrate temperature)") from None
    why = row_unavailable(cfg, base)
    if why:
        raise ValueError(f"{run_dir} has no row {base}: it {why}")
    used = members if spec.all_members else members[:1]
    needs_fit = [m for m in used if not (m / "posteriors" / spec.saved).is_dir()]
    if needs_fit and get_method(spec.method).trajectory:
        raise ValueError(f"{run_dir} has no row {base}: {needs_fit[0]} has no '{spec.saved}' posterior and it can only "
                         "be collected during training; retrain with it in --methods")
    temperature = None
    if method != base:
        temperature = (records.get(method) or {}).get("temperature")
        if temperature is None:
            raise ValueError(f"{run_dir} has no temperature for {method} (eval/validation/{method}/metrics.json); "
                             f"evaluate the run with --calibrate temperature")
    n, scale = _sampling(cfg, run_dir, spec, records.get(base), len(used))
    rule = _stored_rule(run_dir, method, abstain_risk, notes)
    done = read_json(members[0] / "done.json")
    letter = _scoring(members[0]) == "letter"
    plan = PredictPlan(run_dir=run_dir, cfg=cfg, method=method, spec=spec, members=used,
                       seeds=[int(read_json(m / "done.json")["seed"]) for m in used], n=n, scale=scale,
                       temperature=temperature, abstain_risk=abstain_risk if rule is None else rule["target_risk"],
                       rule=rule, max_choices=done.get("max_choices") if letter else None, notes=notes)
    if needs_fit or plan.needs_threshold or (letter and plan.max_choices is None):
        plan.train, plan.validation = training_data(cfg)
        if letter and plan.max_choices is None:
            plan.max_choices = max(ex.n_choices for ex in plan.train)
    return plan


def _stored_rule(run_dir: Path, method: str, risk: float | None, notes: list[str]) -> dict | None:
    """The abstention rule the evaluation stored for ``method`` (any risk when ``risk`` is None)."""
    path = run_dir / "eval" / set_dir_name("validation") / method / ABSTENTION_NAME
    stored = read_json(path) if path.is_file() else None
    if stored is not None and (risk is None or stored.get("target_risk") == risk):
        notes.append(f"abstention: {rule_text(stored)}, stored at evaluation")
        return stored
    if risk is not None:
        notes.append(f"abstention: no threshold stored for risk {risk} in {path.parent}; choosing it on the run's "
                     "validation split (re-predicting it)")
    return None


def rule_text(rule: dict) -> str:
    """An abstention rule in words."""
    threshold = "none (no threshold reaches it: abstain on every question)" if rule["threshold"] is None else f"{rule['threshold']:.6g}"
    return (f"threshold {threshold} for risk {rule['target_risk']} on validation (risk {rule['risk']:.4f}, "
            f"coverage {rule['coverage']:.4f} of {rule['n']})")


class Predictor:
    """A run's row, loaded once, predicting new questions (see the module docstring)."""

    def __init__(self, plan: PredictPlan, lm: Any = None, progress: bool = False) -> None:
        from .members import open_session

        self.plan, self.method, self.progress = plan, plan.method, progress
        self.session = open_session(plan.cfg, lm=lm, with_data=False)
        self.session.train, self.session.validation = plan.train, plan.validation
        parts = [member_posterior(self.session, m, plan.spec) for m in plan.members]
        self.posterior = Ensemble(parts) if plan.spec.all_members else parts[0]
        self.rule = plan.rule
        if plan.needs_threshold:
            self.rule = self._choose_rule(plan.abstain_risk)

    @property
    def threshold(self) -> float | None:
        return None if self.rule is None else self.rule["threshold"]

    def _probs(self, examples: list[MCQExample], set_name: str) -> torch.Tensor:
        """Sample probabilities ``[S, N, C]`` as the evaluation computes them (``+ts``: one temperature-scaled
        sample), with a progress bar on standard error when asked."""
        self.session.cache = HiddenCache(self.session.scorer)  # per call: no memory kept between calls
        with tqdm(total=len(examples), desc=set_name, unit="q", disable=not self.progress, leave=False) as bar:
            probs = row_probs(self.session, self.posterior, self.plan.seeds, self.plan.spec, examples, self.plan.n,
                              self.plan.scale, set_name, bar)
        return probs if self.plan.temperature is None else temperature_scale(probs, examples, self.plan.temperature)

    def _choose_rule(self, risk: float) -> dict:
        """The threshold for ``risk`` on the run's validation split, predicted exactly as its evaluation did."""
        return abstention_rule(self._probs(self.plan.validation, "validation"), self.plan.validation, risk)

    def predict_examples(self, examples: list[MCQExample]) -> tuple[list[Prediction], torch.Tensor]:
        """Predictions and the sample probabilities ``[S, N, C]`` of validated examples."""
        self.plan.check_examples(examples)
        probs = self._probs(examples, PREDICT_SET)
        several = probs.shape[0] > 1
        out = []
        for r in prediction_rows(examples, probs):
            threshold = self.threshold
            abstain = self.rule is not None and (threshold is None or r["confidence"] < threshold)
            out.append(Prediction(id=r["id"], probs=r["probs"], labels=r["labels"], prediction=r["prediction"],
                                  confidence=r["confidence"], entropy=r["total_entropy"],
                                  mutual_information=r["mutual_information"] if several else None,
                                  abstain=abstain, threshold=threshold))
        return out, probs

    def predict_batch(self, items: list[dict[str, Any]]) -> list[Prediction]:
        """Predict dicts with ``question`` and ``choices`` (optional: ``id``, ``labels`` (default A, B, ...),
        ``answer``, ``subject``), validated as a JSONL line is; one batch through the lower-layer cache. A
        prediction's ``id`` is None where its dict had none."""
        records = []
        for i, item in enumerate(items):
            record = dict(item) if isinstance(item, dict) else item
            if isinstance(record, dict):
                record.setdefault("id", str(i))
                if isinstance(record.get("choices"), (list, tuple)):
                    record["choices"] = list(record["choices"])
                    record.setdefault("labels", list(LETTERS[: len(record["choices"])]))
            records.append((i + 1, record))
        predictions, _ = self.predict_examples(records_to_examples(records, "predict_batch", answers=False))
        return [replace(p, id=None) if "id" not in item else p for p, item in zip(predictions, items)]

    def predict(self, question: str, choices: list[str], id: str | None = None) -> Prediction:
        """Predict one question."""
        item = {"question": question, "choices": choices, **({} if id is None else {"id": id})}
        return self.predict_batch([item])[0]


def load(run_dir: str | Path, method: str | None = None, abstain_risk: float | None = None, lm: Any = None,
         progress: bool = False) -> Predictor:
    """A :class:`Predictor` for a row of a trained run (``method=None``: the row with the lowest validation NLL).

    Strict: a run written by a newer swaglora, or whose saved posteriors belong to another base model, LoRA setup
    or scoring than the run's config loads, is refused (ValueError). ``abstain_risk``: the abstention rule for
    this risk (the stored one, else chosen on the run's validation split); None: the rule stored at evaluation,
    if any. ``lm``: an already loaded ``models.LoadedModel`` of the run's base model, to share it.
    """
    if abstain_risk is not None and not 0 < abstain_risk < 1:
        raise ValueError(f"abstain_risk must be in (0, 1), got {abstain_risk}")
    return Predictor(plan_prediction(run_dir, method, abstain_risk), lm=lm, progress=progress)


def answered_summary(examples: list[MCQExample], probs: torch.Tensor, rule: dict | None) -> dict[str, Any] | None:
    """accuracy, ece, nll, brier, n on the questions that carry an answer, and (with an abstention ``rule``) the
    realised risk and coverage of the rule there; None when no question has an answer."""
    answered = [i for i, ex in enumerate(examples) if ex.answer is not None]
    if not answered:
        return None
    sample = probs[:, answered]
    labels = torch.tensor([examples[i].answer_index for i in answered])
    summary: dict[str, Any] = metrics.summarize(sample, labels)
    if rule is not None:
        confidence, prediction = metrics.predictive(sample).max(-1)
        threshold = math.inf if rule["threshold"] is None else rule["threshold"]
        summary["risk"], summary["coverage"] = metrics.selective_risk(confidence, prediction == labels, threshold)
    return summary
