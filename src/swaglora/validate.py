"""Checks that run before a command loads model weights or writes a file.

:func:`preflight` resolves every input a command will need (output directory, device, method rows, data
files read and validated in full, LoRA targets and layers against the model's config, prompt lengths
against ``--max-length``), so bad input fails in seconds with one line and nothing written, instead of
after training. :func:`check_out_dir` is the one guard of the output directory: swaglora only ever
writes into, or deletes with ``--overwrite``, a new or empty directory or one that carries its run
marker ``swaglora_run.json``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import rundir, trajectory
from .config import ConfigError, ModelConfig, RunConfig
from .data import MCQExample
from .io import read_json
from .evaluate import requested_rows, row_unavailable
from .members import check_schedule, needed_posteriors, posthoc_unavailable, saved_settings_differ
from .posterior import CONFIG_NAME, base_rows, get_method, row, row_names
from .selection import base_examples, eval_data, training_data
from .models import EMBEDDED_MODELS, ModelError, decoder_parts, model_source, resolve_dtype, resolve_scoring
from .scoring import MAX_CHOICE_TOKENS, Scorer

__all__ = ["RUN_MARKER", "Plan", "check_abstain_risk", "check_device", "claim_dir", "check_out_dir", "check_out_file",
           "check_questions", "is_run_dir", "parse_seeds", "preflight", "recollect_source_config", "warn"]

#: Written into every directory swaglora writes; only a directory carrying it is ever written into or deleted.
RUN_MARKER = "swaglora_run.json"

#: A learning rate above this is almost certainly a typo (AdamW on LoRA: 1e-5 .. 1e-2).
LR_WARNING = 0.1


def warn(message: str) -> None:
    print(f"swaglora: warning: {message}", file=sys.stderr)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` carries swaglora's run marker with a format version."""
    marker = Path(path) / RUN_MARKER
    try:
        return marker.is_file() and isinstance(read_json(marker).get("format_version"), int)
    except (ValueError, AttributeError):  # unparsable or not a JSON object: not our marker
        return False


def check_out_dir(out: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output directory swaglora must not write into or delete; return it as a Path.

    Refused: an empty name (it would mean the current directory), the current directory or any parent of
    it, the home directory, a file, a non-empty directory without the run marker, and a place that cannot
    be written. ``overwrite`` deletes only marked directories, so it passes exactly when writing does.
    """
    text = str(out)
    if not text.strip():
        raise ConfigError(f"{flag} is empty; give the run directory (an unset shell variable?)")
    path = Path(text).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        what = "the home directory" if resolved == Path.home().resolve() else (
            "the current directory" if resolved == cwd else "a parent of the current directory")
        raise ConfigError(f"{flag} {text!r} is {what}; give a new directory for the run, e.g. runs/demo")
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"{flag} {text}: is a file, not a directory")
    if resolved.is_dir() and any(resolved.iterdir()) and not is_run_dir(resolved):
        raise ConfigError(f"{flag} {text}: not empty and not a swaglora run (no {RUN_MARKER}); swaglora writes into, "
                          "or deletes with --overwrite, only its own run directories: give a new or empty one")
    if not overwrite and is_run_dir(resolved):
        rundir.check_run_format(resolved)
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {text}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {text}: cannot write to {existing} (read-only file system or no permission)")
    return path


def claim_dir(path: Path) -> None:
    """Put the run marker into a checked output directory that lacks it, so swaglora may write into it again."""
    if not is_run_dir(path):
        rundir.write_run_marker(Path(path))


def check_device(name: str) -> None:
    """``--device``: auto, cpu, or an accelerator this machine has."""
    if name == "auto":
        return
    valid = "auto, cpu" + (f", cuda, cuda:0..{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name; valid here: {valid}") from None
    if device.type == "cpu":
        return
    if device.type == "cuda" and torch.cuda.is_available():
        if device.index is None or device.index < torch.cuda.device_count():
            return
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); valid here: {valid}")
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise ConfigError(f"--device {name}: no {device.type} device on this machine (torch {torch.__version__}); valid here: {valid}")


def parse_seeds(text: str | None) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]; None (flag not given) -> []."""
    if text is None:
        return []
    if not text.strip():
        raise ConfigError("--seeds is empty; give comma-separated integers such as 0,1,2, or leave the flag out")
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers such as 0,1,2") from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"--seeds {text!r} repeats seed {repeated[0]}; each seed is one independent run")
    return seeds


def check_out_file(out: str, flag: str = "--out") -> None:
    """A file to write (``-``: standard output): not a directory, in an existing directory that can be written."""
    if out == "-":
        return
    if not out.strip():
        raise ConfigError(f"{flag} is empty; give a file name, or - for standard output")
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {out}: is a directory; give a file name, or - for standard output")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: cannot write to {parent} (read-only file system or no permission)")


def check_abstain_risk(risk: float | None) -> None:
    if risk is not None and not 0.0 < risk < 1.0:
        raise ConfigError(f"--abstain-risk must be in (0, 1) (the error rate allowed among answered questions), got {risk}")


def check_reference(name: str | None) -> None:
    """``report --reference``: a results-table row (or its ``+ts`` row)."""
    if name is not None and name.removesuffix("+ts") not in row_names():
        raise ConfigError(f"--reference {name!r}: not a results-table row; rows: {', '.join(row_names())} (or ROW+ts)")


def _check_members(indices: list[int] | None, members: int) -> None:
    for index in indices or []:
        if not 0 <= index < members:
            raise ConfigError(f"--member-index {index}: must be in 0..{members - 1} (--members {members})")
    if indices and len(set(indices)) < len(indices):
        raise ConfigError(f"--member-index repeats a member ({indices}); give each once")


def _check_rows(cfg: RunConfig) -> list[str]:
    """The table rows; a requested row the settings cannot build is a warning, none at all an error."""
    requested = requested_rows(cfg)
    skipped = {r: why for r in requested if (why := row_unavailable(cfg, r))}
    rows = [r for r in requested if r not in skipped]
    if skipped and all(row(r).before_training for r in rows):
        raise ConfigError("none of --methods can be built with these settings: "
                          + "; ".join(f"{r} {why}" for r, why in skipped.items()))
    for r, why in skipped.items():
        warn(f"--methods {r} is skipped: it {why}")
    return rows


def _check_posteriors_can_be_made(runs: list[Path], rows: list[str]) -> None:
    """``evaluate`` fits missing post-hoc posteriors; one that only training makes (SWAG, BLoB), or a post-hoc one
    whose starting posterior (``fitted_at``) is missing, is an error here, before the model is loaded."""
    try:
        members = rundir.member_dirs(runs)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    for r in rows:
        spec = row(r)
        for member in members:
            why = None if (member / "posteriors" / spec.saved).is_dir() else posthoc_unavailable(member, spec.method)
            if why:
                raise ConfigError(f"--methods {r}: {why}")


def _check_saved_settings(cfg: RunConfig, members: list[Path], rows: list[str]) -> None:
    """A saved posterior that a row would reuse must have the settings this command asks for (``--tfb-metric``,
    ``--laplace-subset``, ``--swag-max-rank`` ...): one made with others is an error naming the flag, before any
    model is loaded, not a silent reuse. (A resumed ``run``/``train`` with other settings is refused whole by
    :func:`rundir.save_config`.)"""
    for name in sorted({row(r).saved for r in rows if not row(r).before_training}):
        for member in members:
            why = saved_settings_differ(member, name, cfg)
            if why:
                raise ConfigError(why)


def recollect_source_config(source: Path) -> RunConfig:
    """The config of ``train --recollect-from SOURCE``'s run; not a run directory is one line naming the flag."""
    if not (source / "config.json").is_file() or not is_run_dir(source):
        raise ConfigError(f"--recollect-from {source}: not a swaglora run directory (no config.json / {RUN_MARKER})")
    try:
        return rundir.load_run_config(source)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--recollect-from {source}: {e}") from None


def _check_recollect_source(cfg: RunConfig, source: Path, out: Path, members: list[int], rows: list[str],
                            n_train: int, hashes: dict[str, str]) -> None:
    """``train --recollect-from SOURCE``: SOURCE's members recorded their trajectories under settings that differ
    from these in SWAG collection settings only, every member asked for has finished with every snapshot this
    schedule collects, and each post-hoc posterior the rows need is there to copy."""
    flag = "--recollect-from"
    source_cfg = recollect_source_config(source)
    if source.resolve() == out.resolve():
        raise ConfigError(f"{flag} {source} is --out itself; give another --out")
    trajectory.check_source(source_cfg, cfg, n_train, flag)
    _check_data_unchanged(cfg, source, hashes)
    for i in members:
        member = source / "members" / str(i)
        if not (member / "done.json").is_file():
            raise ConfigError(f"{flag} {source}: member {i} has not finished training ({member / 'done.json'} is missing)")
        done = read_json(member / "done.json")
        if done.get("n_train") != n_train:
            raise ConfigError(f"{flag} {source}: member {i} was trained on {done.get('n_train')} questions, these "
                              f"settings select {n_train}")
        missing = [n for n in trajectory.snapshot_names(cfg, n_train) if not (member / trajectory.DIRNAME / n).is_file()]
        if missing:
            raise ConfigError(f"{flag} {source}: member {i} lacks {len(missing)} of the snapshots this schedule "
                              f"collects (first: {member / trajectory.DIRNAME / missing[0]})")
        for name in needed_posteriors(rows):
            cls = get_method(name)
            if cls.trajectory or cls.trains_own_member or cls.fitted_at:
                continue  # collected anew, trained after, or fitted when evaluated
            if not (member / "posteriors" / name / CONFIG_NAME).is_file():
                raise ConfigError(f"{flag} {source}: member {i} has no {name} posterior to copy (it was trained "
                                  f"without a row that needs it); add those rows to its --methods or drop them here")


def _warn_learning_rates(cfg: RunConfig) -> None:
    for flag, lr in (("--lr", cfg.train.lr), ("--swag-lr", cfg.swag.lr)):
        if lr > LR_WARNING:
            warn(f"{flag} {lr:g} is far above the usual 1e-5..1e-2 for AdamW on LoRA: training will likely "
                 "diverge or collapse to uniform probabilities")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_sha256(cfg: RunConfig, evaluating: bool) -> dict[str, str]:
    """sha256 of every data file (not bundled task or hub dataset) the command reads, by its spec."""
    specs = [cfg.data.data, *([cfg.eval.test, *cfg.eval.shift.split(",")] if evaluating else [])]
    files = [s.strip() for s in specs if s.strip() and Path(s.strip()).is_file()]
    return {f: file_sha256(f) for f in files}


def _check_data_unchanged(cfg: RunConfig, run_dir: Path, hashes: dict[str, str]) -> None:
    """A run's members were trained on ``--data``: refuse to reuse them once that file's contents changed."""
    marker = Path(run_dir) / RUN_MARKER
    if not cfg.data.data or not is_run_dir(run_dir):
        return
    saved = read_json(marker).get("data_sha256", {}).get(cfg.data.data)
    if saved is not None and saved != hashes.get(cfg.data.data):
        raise ConfigError(f"--data {cfg.data.data} changed since {run_dir} was trained on it (sha256 differs): its "
                          "members are stale; retrain with --overwrite or use another --out")


def _inspect_model(cfg: ModelConfig):
    """The model's config and tokenizer, without loading any weights; errors are one-line ModelErrors."""
    from transformers import AutoConfig, AutoTokenizer

    source = model_source(cfg.name)
    hub = isinstance(source, str)

    def load(local_only: bool):
        kwargs = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": local_only}
        return AutoConfig.from_pretrained(source, **kwargs), AutoTokenizer.from_pretrained(source, **kwargs)

    tried = "Hugging Face hub id" if hub else "local directory" if cfg.name not in EMBEDDED_MODELS else "embedded model cache"
    try:
        if hub:
            try:
                return load(local_only=True)
            except OSError:
                if not _hub_reachable():
                    raise ModelError(f"--model {cfg.name}: not in the local Hugging Face cache and the hub cannot be "
                                     "reached (offline?); download it first or give a local directory") from None
        return load(local_only=False)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"--model {cfg.name}: cannot load it (tried it as a {tried}): {first}") from None


def _hub_reachable() -> bool:
    """A quick look (5 s at most) whether the hub answers; huggingface_hub itself retries for ~30 s."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=5).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def _check_model(cfg: RunConfig, sets: list[tuple[str, list[MCQExample]]]) -> None:
    """LoRA targets and layers against the model's modules (built on the meta device: no weights), and every
    prompt against ``--max-length`` with the model's tokenizer; cut prompts are a counted warning."""
    from transformers import AutoModelForCausalLM  # transformers takes seconds to import: only when used

    config, tokenizer = _inspect_model(cfg.model)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except ValueError:
        raise ModelError(f"--model {cfg.model.name}: not a causal LM (transformers has no causal-LM class for "
                         f"model_type {getattr(config, 'model_type', '?')!r})") from None
    layers = decoder_parts(model).layers
    if cfg.lora.layers.startswith("top:") and int(cfg.lora.layers[4:]) > len(layers):
        raise ConfigError(f"--lora-layers {cfg.lora.layers}: the model has {len(layers)} layers; "
                          f"use top:1 .. top:{len(layers)} or all")
    targets = cfg.lora.target_list
    if targets != "all-linear":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)})
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ConfigError(f"--lora-targets {cfg.lora.targets!r}: {unknown[0] if unknown else 'empty'} is not a "
                              f"module of {cfg.model.name}; its layers' linear modules: {', '.join(linear)} (or all-linear)")
    scorer = Scorer(model, tokenizer, resolve_scoring(cfg.model), max_length=cfg.model.max_length, train_head=cfg.model.train_head)
    for name, examples in sets:
        try:
            encoded = scorer.encode(examples)
        except ModelError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        cut = sum(e.question_cut > 0 for e in encoded)
        if cut:
            warn(f"{name}: {cut} of {len(encoded)} questions are longer than --max-length {cfg.model.max_length} "
                 "tokens; their prompts are cut from the left (the start of the question is dropped)")
        long_choices = sum(e.choices_cut > 0 for e in encoded)
        if long_choices:
            warn(f"{name}: {long_choices} of {len(encoded)} questions have choices longer than {MAX_CHOICE_TOKENS} "
                 f"tokens; cloze scoring uses only their first {MAX_CHOICE_TOKENS} tokens")


def check_questions(cfg: RunConfig, source: str, examples: list[MCQExample]) -> None:
    """Questions to predict with a run of ``cfg``: their prompts against ``--max-length`` with the model's
    tokenizer (no weights loaded)."""
    _check_model(cfg, [(source, examples)])


@dataclass
class Plan:
    """What :func:`preflight` resolved: the table rows and the data files' content hashes."""

    rows: list[str] = field(default_factory=list)
    data_sha256: dict[str, str] = field(default_factory=dict)


def preflight(cfg: RunConfig, command: str, out: Path, *, overwrite: bool = False,
              members: list[int] | None = None, runs: list[Path] = (), recollect_from: Path | None = None) -> Plan:
    """Check everything ``command`` (run, train, evaluate = ``evaluate --run``, base = ``evaluate --model``) will need.

    Raises ConfigError, DataError or ModelError (one line each) before any weight is loaded or any file
    written; prints warnings for requests that will be partly ignored.
    """
    check_device(cfg.model.device)
    resolve_dtype(cfg.model.dtype)  # a bad SWAGLORA_AUTO_DTYPE pin is one line, here
    check_out_dir(out, overwrite)
    _check_members(members, cfg.posterior.members)
    if command == "base":
        _check_model(cfg, [(cfg.data.data or cfg.data.task, base_examples(cfg))])
        return Plan([r.name for r in base_rows()], data_sha256(cfg, evaluating=False))
    rows = _check_rows(cfg)
    _warn_learning_rates(cfg)
    train, validation = training_data(cfg)
    if command != "evaluate":
        check_schedule(cfg, len(train))
    spec = cfg.data.data or cfg.data.task
    sets = [(f"{spec} (training)", train), (f"{spec} (validation)", validation)]
    if command != "train":
        sets += [(name, examples) for name, _, examples in eval_data(cfg)]
    hashes = data_sha256(cfg, evaluating=command != "train")
    for run_dir in runs or ([] if overwrite else [out]):
        _check_data_unchanged(cfg, Path(run_dir), hashes)
    if recollect_from is not None:
        _check_recollect_source(cfg, Path(recollect_from), Path(out), members if members is not None else
                                cfg.posterior.member_indices, rows, len(train), hashes)
    if command == "evaluate":
        _check_posteriors_can_be_made([Path(r) for r in runs], rows)
        _check_saved_settings(cfg, rundir.member_dirs([Path(r) for r in runs]), rows)
    _check_model(cfg, sets)
    return Plan(rows, hashes)
