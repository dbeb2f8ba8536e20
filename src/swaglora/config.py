"""Typed run configuration: dataclasses, YAML/JSON files and strict overrides.

Every setting lives in one dataclass field with a ``help`` text. The command line
is generated from these fields (``cli.py``), a file given with ``--config`` fills
the same fields, and ``--set section.key=value`` overrides them. Unknown keys and
values of the wrong type are rejected with the list of valid keys, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "ModelConfig",
    "LoraSettings",
    "DataConfig",
    "TrainConfig",
    "SWAGConfig",
    "PosteriorConfig",
    "LaplaceConfig",
    "BLoBConfig",
    "TFBConfig",
    "EvalConfig",
    "RunConfig",
    "apply_overrides",
    "load_config_file",
    "config_from_dict",
    "config_to_dict",
    "flag_names",
    "flag_of",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m", "'smollm2-135m' (embedded GGUF), a local directory or a Hugging Face model id", flag="--model")
    dtype: str = _f("auto", "frozen model's dtype: float32, bfloat16, float16 or auto (on CPU bf16 only with a native bf16 matmul: x86 flag avx512_bf16/amx_bf16, elsewhere measured; $SWAGLORA_AUTO_DTYPE pins it)", flag="--dtype")
    scoring: str = _f("auto", "answer scoring: letter (the paper's), cloze (choice likelihood) or auto (per-model default)", flag="--scoring")
    train_head: bool = _f(True, "letter scoring: train a small letters x hidden head initialised from the LM head rows", flag="--train-head")
    trust_remote_code: bool = _f(False, "allow model repositories to run their own code (off unless asked for)", flag="--trust-remote-code")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (the local GPU of this process if there is one, else cpu)", flag="--device")
    max_length: int = _f(512, "truncate prompts to this many tokens (from the left of the question)", flag="--max-length")

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"model.dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.scoring not in ("auto", "letter", "cloze"):
            raise ConfigError(f"model.scoring must be auto, letter or cloze, got {self.scoring!r}")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be at least 8, got {self.max_length}")


@dataclass
class LoraSettings:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.1, "LoRA dropout probability (also the MC-dropout rate)")
    targets: str = _f("q_proj,v_proj", "comma-separated module names, or all-linear (default q_proj,v_proj: the paper's, and the protocol study's choice on validation, docs/protocol-study.md)")
    layers: str = _f("all", "which transformer layers get LoRA: all (the default: the paper's, and the protocol study's choice), or top:K (the frozen lower layers are then computed once and reused: much cheaper, less accurate)")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0 (scaling = alpha / r; 0 would train nothing), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.layers != "all":
            if not self.layers.startswith("top:") or not self.layers[4:].isdigit() or int(self.layers[4:]) < 1:
                raise ConfigError(f"lora.layers must be 'all' or 'top:K' with K >= 1, got {self.layers!r}")

    @property
    def target_list(self) -> list[str] | str:
        if self.targets == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass
class DataConfig:
    task: str = _f("arc_easy", "bundled training task (obqa, cqa, arc_easy, arc_challenge, mmlu)", flag="--task")
    data: str = _f("", "training data instead of --task: a JSONL file or hf:<dataset id>", flag="--data")
    train_limit: int = _f(0, "use at most this many training examples (0 = all, the default), a seeded subset", flag="--train-limit")
    val_limit: int = _f(0, "use at most this many validation examples (0 = all, the default)", flag="--val-limit")
    val_fraction: float = _f(0.2, "validation fraction of train when the data has no validation split", flag="--val-fraction")

    def __post_init__(self) -> None:
        if self.train_limit < 0 or self.val_limit < 0:
            raise ConfigError("data.train_limit and data.val_limit must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class TrainConfig:
    epochs: int = _f(2, "MAP training epochs (before SWAG collection starts)", flag="--epochs")
    lr: float = _f(1e-3, "peak learning rate of AdamW", flag="--lr")
    batch_size: int = _f(8, "examples per optimiser step (before accumulation)", flag="--batch-size")
    grad_accum: int = _f(1, "gradient accumulation steps", flag="--grad-accum")
    warmup: float = _f(0.06, "fraction of the schedule's steps with linear warm-up (then linear decay)", flag="--warmup")
    schedule: str = _f("auto", "MAP learning rate: auto (decay to 0 over the MAP steps, constant when SWAG follows) or linear (decay over MAP + SWAG steps, cut off where SWAG starts: the SWAG-LoRA code)", flag="--schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay", flag="--weight-decay")
    seed: int = _f(0, "seed for LoRA init, data order and sampling", flag="--seed")
    threads: int = _f(0, "torch CPU threads (0 = number of cores)", flag="--threads")
    checkpoint_every: int = _f(0, "also checkpoint every N optimiser steps (0 = only at epoch ends); rerun to resume", flag="--checkpoint-every")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1 (with 0 the MAP weights would stay at their "
                              f"initialisation, i.e. the zero-shot model), got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.threads < 0:
            raise ConfigError(f"train.threads must be >= 0 (0 = number of cores), got {self.threads}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"train.warmup must be in [0, 1), got {self.warmup}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.schedule not in ("auto", "linear"):
            raise ConfigError(f"train.schedule must be auto or linear, got {self.schedule!r}")


@dataclass
class SWAGConfig:
    epochs: int = _f(3, "epochs of SWAG collection after the MAP phase (0 = no SWAG)")
    lr: float = _f(1e-3, "SWAG-phase learning rate (constant, or annealed from the MAP lr over anneal_epochs)")
    anneal_epochs: int = _f(0, "epochs of linear anneal from the lr the MAP phase ended with to the SWAG lr (0 = constant)")
    every: str = _f("auto", "collect a snapshot every N optimiser steps, at each epoch end ('epoch'), or 'auto': every 25 steps (the protocol study's base; every 100 was not better), more often when the SWAG phase is too short for 2 * max_rank snapshots at that rate (small training sets)")
    max_rank: int = _f(5, "rank K of the low-rank covariance part (deviation rows kept)")
    force_save: int = _f(-1, "early stopping of the SWAG phase as the SWAG-LoRA code's force_save: keep the SWAG moments of the collection epoch whose SWA mean has the lowest validation NLL so far, and those of collection epoch force_save+1 (0-based, as theirs) when its mean is not better; -1 = off (keep every snapshot)")
    scale: str = _f("default", "covariance scale of every SWAG row: 'default' (each posterior's own: 0.5 for swag, 1 for swag-diag), a number, or 'auto' (chosen by validation NLL over a grid)")
    keep_trajectory: bool = _f(False, "also write the weights of every snapshot the SWAG phase collects and of each SWAG epoch's end to members/<i>/trajectory/, so that 'train --recollect-from' rebuilds the SWAG posteriors with another rank, fewer SWAG epochs, a schedule every multiple of swag.every steps or per epoch, without training again (about the adapter's size per snapshot)")

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.anneal_epochs < 0:
            raise ConfigError("swag.epochs and swag.anneal_epochs must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"swag.lr must be > 0, got {self.lr}")
        if self.every not in ("epoch", "auto") and (not self.every.isdigit() or int(self.every) < 1):
            raise ConfigError(f"swag.every must be 'auto', 'epoch' or a positive integer, got {self.every!r}")
        if self.max_rank < 0:
            raise ConfigError(f"swag.max_rank must be >= 0, got {self.max_rank}")
        if self.force_save < -1:
            raise ConfigError(f"swag.force_save must be -1 (off) or an epoch of the SWAG phase >= 0, got {self.force_save}")
        self.scale_setting  # noqa: B018 - validates

    @property
    def scale_setting(self) -> float | str | None:
        """``swag.scale`` parsed: None (each posterior's own default), ``"auto"`` or a number >= 0."""
        if self.scale in ("default", "auto"):
            return None if self.scale == "default" else "auto"
        try:
            value = float(self.scale)
        except ValueError:
            raise ConfigError(f"swag.scale must be 'default', 'auto' or a number >= 0, got {self.scale!r}") from None
        if not 0 <= value < float("inf"):
            raise ConfigError(f"swag.scale must be a finite number >= 0, got {value}")
        return value


@dataclass
class PosteriorConfig:
    """Settings every posterior method shares."""

    samples: int = _f(15, "posterior samples S per member and prediction (BMA; 15: the paper's, and the protocol study's choice over 4 and 30)", flag=("--samples", "--swag-samples"))
    members: int = _f(2, "members trained with independent seeds (MultiSWAG, deep ensembles; 2 = the fewest that give those rows: the protocol study found no significant gain from 5)", flag="--members")

    def __post_init__(self) -> None:
        if self.samples < 1 or self.members < 1:
            raise ConfigError("posterior.samples and posterior.members must be >= 1")

    @property
    def member_indices(self) -> list[int]:
        """The members a run trains and evaluates: 0 .. members-1."""
        return list(range(self.members))


@dataclass
class LaplaceConfig:
    subset: str = _f("all", "parameters under the Laplace approximation: all (every LoRA layer) or last-layer")
    prior_precision: float = _f(0.0, "precision of the prior N(theta_0, 1/lambda) (theta_0: 0 for LoRA, the initial rows for the letter head); 0 = chosen by maximising the marginal likelihood")
    glm_samples: int = _f(100, "samples of the linearised (GLM) predictive's Gaussian logits per example (cheap: no extra forward passes)")

    def __post_init__(self) -> None:
        if self.subset not in ("all", "last-layer"):
            raise ConfigError(f"laplace.subset must be 'all' or 'last-layer', got {self.subset!r}")
        if self.prior_precision < 0:
            raise ConfigError(f"laplace.prior_precision must be >= 0, got {self.prior_precision}")
        if self.glm_samples < 1:
            raise ConfigError(f"laplace.glm_samples must be >= 1, got {self.glm_samples}")


@dataclass
class BLoBConfig:
    """BLoB (Wang et al. 2024); defaults: the paper's scripts (bayesian-peft scripts/blob/blob-llama-all.sh)."""

    eps: float = _f(0.05, "initial std parameter G of every LoRA A entry ~ U(eps/sqrt(2), eps); the std is G^2 (the paper's --bayes-eps)")
    prior_sigma: float = _f(0.2, "std of the zero-mean Gaussian prior on the LoRA A entries (the paper's --bayes-beta)")
    kl_lr: float = _f(0.01, "learning rate of the plain-SGD KL step after each AdamW step, on the same warm-up/decay schedule (the paper's --bayes-kllr)")
    kl_reweighting: bool = _f(True, "KL weight 2^i/(2^(M+1)-1) at the i-th step of each cycle of M steps (else 1/M)")
    gamma: float = _f(8.0, "KL period M = 100 N^(pi/gamma) / (examples per optimiser step) (the paper's dataset rescaling); 0 = M is the steps per epoch")
    samples: int = _f(10, "draws of A per prediction (BMA) of the blob row; the blob-mean row uses the mean")

    def __post_init__(self) -> None:
        if not (self.eps > 0 and self.prior_sigma > 0):
            raise ConfigError(f"blob.eps and blob.prior_sigma must be > 0, got {self.eps} and {self.prior_sigma}")
        if not (self.kl_lr >= 0 and self.gamma >= 0):
            raise ConfigError(f"blob.kl_lr and blob.gamma must be >= 0, got {self.kl_lr} and {self.gamma}")
        if self.samples < 1:
            raise ConfigError(f"blob.samples must be >= 1, got {self.samples}")


@dataclass
class TFBConfig:
    metric: str = _f("nll", "validation metric TFB's noise search keeps within epsilon of the MAP's: nll (relative increase) or accuracy (absolute decrease)")
    epsilon: float = _f(0.0, "largest tolerated validation drop; 0 = the paper's for the metric (nll: 0.003, a relative increase of 0.3 percent; accuracy: 0.01)")
    sigma_min: float = _f(0.001, "lower end of the bisection interval of the noise std sigma (the paper's code: 0.001)")
    sigma_max: float = _f(0.015, "upper end of the bisection interval (the paper's scripts: 0.015)")
    steps: int = _f(5, "bisection steps, one validation evaluation each (the paper's scripts: 5)")
    expand: int = _f(6, "before bisecting, try sigma_max and double it while the validation tolerates it, at most this many times (0 = the paper's fixed range)")

    def __post_init__(self) -> None:
        if self.metric not in ("nll", "accuracy"):
            raise ConfigError(f"tfb.metric must be nll or accuracy, got {self.metric!r}")
        if not 0 <= self.epsilon < float("inf"):
            raise ConfigError(f"tfb.epsilon must be a finite number >= 0 (0 = the paper's), got {self.epsilon}")
        if not 0 <= self.sigma_min < self.sigma_max < float("inf"):
            raise ConfigError(f"tfb.sigma_min and tfb.sigma_max must satisfy 0 <= sigma_min < sigma_max (finite), "
                              f"got {self.sigma_min} and {self.sigma_max}")
        if self.steps < 1:
            raise ConfigError(f"tfb.steps must be >= 1, got {self.steps}")
        if self.expand < 0:
            raise ConfigError(f"tfb.expand must be >= 0 (0 = the paper's fixed range), got {self.expand}")


@dataclass
class EvalConfig:
    split: str = _f("test", "split of the training task to evaluate on", flag="--split")
    test: str = _f("", "in-distribution test set instead of the task's split (a JSONL file or hf:<id>)", flag="--test-data")
    shift: str = _f("arc_challenge,obqa", "comma-separated shift sets evaluated too (bundled task names, mmlu:<group or subject>, files; blob = BLoB's protocol: arc_challenge,arc_easy,mmlu:college_chemistry,mmlu:college_physics)", flag=("--shift", "--eval"))
    limit: int = _f(0, "evaluate at most this many examples per set (0 = all, the default), a seeded subset", flag="--eval-limit")
    batch_size: int = _f(16, "evaluation batch size", flag="--eval-batch-size")
    methods: str = _f("default", "comma-separated table rows, 'default' (MAP and the SWAG family with its ensemble baseline: `swaglora methods` marks them) or 'all'", flag="--methods")
    calibrate: str = _f("", "post-hoc calibration added as '<method>+ts' rows: '' (none) or temperature", flag="--calibrate")
    validation_only: bool = _f(False, "evaluate the rows on the validation split only, no test or shift set (for tuning and protocol studies: nothing is learnt about the test split)", flag="--validation-only")
    allow_tuning_split: bool = _f(False, "allow --split to name a split the run trains or validates on (its numbers are then optimistic)", flag="--allow-tuning-split")

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"eval.limit must be >= 0, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.calibrate not in ("", "temperature"):
            raise ConfigError(f"eval.calibrate must be '' or 'temperature', got {self.calibrate!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    swag: SWAGConfig = field(default_factory=SWAGConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)
    blob: BLoBConfig = field(default_factory=BLoBConfig)
    tfb: TFBConfig = field(default_factory=TFBConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = {f.name: f.type for f in fields(RunConfig)}

#: keys that moved to another section: files and ``--set`` written for an older version still read
MOVED_KEYS = {"swag.samples": "posterior.samples", "swag.members": "posterior.members"}


def _section_class(name: str) -> type:
    cls = {f.name: f for f in fields(RunConfig)}[name].default_factory  # type: ignore[misc]
    return cls  # type: ignore[return-value]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` to the field type, rejecting anything that does not fit."""
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(str(annotation), annotation)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


#: these sections' command-line flags carry no section prefix (``--lr``, not ``--train-lr``)
UNPREFIXED_SECTIONS = frozenset({"model", "data", "train", "eval"})


def flag_names(section: str, f: Any) -> list[str]:
    """The command-line flags of config field ``f`` of ``section`` (its own ``flag=`` or ``--[section-]name``)."""
    if "flag" in f.metadata:
        flag = f.metadata["flag"]
        return list(flag) if isinstance(flag, tuple) else [flag]
    name = f.name.replace("_", "-")
    return [f"--{name}" if section in UNPREFIXED_SECTIONS else f"--{section}-{name}"]


def flag_of(key: str) -> str:
    """The (first) command-line flag that sets config key ``"section.name"``, e.g. ``tfb.metric`` -> ``--tfb-metric``."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise KeyError(f"unknown config section in {key!r}")
    by_name = {f.name: f for f in fields(_section_class(section))}
    if name not in by_name:
        raise KeyError(f"unknown config key {key!r}")
    return flag_names(section, by_name[name])[0]


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in SECTIONS for f in fields(_section_class(s))]


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a new config with ``{"section.key": value}`` applied; unknown keys and bad types raise."""
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        key = MOVED_KEYS.get(key, key)
        section, _, name = key.partition(".")
        if section not in data or name not in data[section]:
            raise ConfigError(f"Unknown config key {key!r}. Valid keys: {', '.join(_valid_keys())}")
        data[section][name] = value
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts, with strict key and type checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    data = _moved(data)
    sections: dict[str, Any] = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}. Valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        cls = _section_class(section)
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(
                    f"{source}: unknown key {section}.{name!s}. Valid keys: {', '.join(_valid_keys())}"
                )
            label = f"{section}.{name}" if source == "config" else f"{source}: {section}.{name}"
            kwargs[name] = _coerce(label, value, hints[name])
        sections[section] = cls(**kwargs)
    return RunConfig(**sections)


def _moved(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys of :data:`MOVED_KEYS` in their new sections (a key given in both places is an error)."""
    data = {s: dict(v) if isinstance(v, dict) else v for s, v in data.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        if isinstance(data.get(old_section), dict) and old_name in data[old_section]:
            target = data.setdefault(new_section, {})
            if not isinstance(target, dict) or new_name in target:
                raise ConfigError(f"{old} and {new} are the same setting ({old} is its old name); give it once")
            target[new_name] = data[old_section].pop(old_name)
    return data


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def load_config_file(path: str | Path) -> RunConfig:
    """Read a YAML or JSON config file (nested sections) into a RunConfig."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {p} is a directory; give a YAML or JSON file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {raw[exc.start]:#x}); save the file as UTF-8") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ConfigError(f"{p}: cannot parse config: {exc}") from exc
    return config_from_dict(data, source=str(p))

