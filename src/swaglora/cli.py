"""``swaglora`` command line: a thin layer over config, pipeline and report.

Every config field is a flag (generated from the dataclasses in ``config.py``), so the
CLI, ``--config file.yaml`` and ``--set section.key=value`` can never disagree.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import SECTIONS, ConfigError, RunConfig, apply_overrides, flag_names, load_config_file
from .presets import PRESETS

__all__ = ["main", "build_parser"]


def _add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        cls = SECTIONS[section]
        cls = cls if isinstance(cls, type) else {f.name: f for f in fields(RunConfig)}[section].default_factory
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": None,
                                      "help": f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")}
            if hints[f.name] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = hints[f.name].__name__.upper()
            flags = flag_names(section, f)
            if section == "train" and f.name == "epochs":
                flags.append("--swag-start")  # the paper's name: MAP epochs before SWAG collection starts
            group.add_argument(*flags, **kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"YAML or JSON file with nested sections ({', '.join(SECTIONS)})")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named bundle of settings (demo = the cheap protocol of make demo, paper = Onal et al. 2024, blob-paper = Wang et al. 2024)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key (repeatable); unknown keys and wrong types are rejected")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swaglora", description="SWAG / MultiSWAG posteriors over LoRA for calibrated MCQA")
    sub = parser.add_subparsers(dest="command", required=True)
    all_sections = tuple(SECTIONS)

    p = sub.add_parser("run", help="the main job: train members, evaluate every method on test and shift sets, report")
    _common(p)
    _add_config_flags(p, all_sections)
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: one run per seed under OUT/seed-<k>, reported as mean ± std")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first (only a swaglora run) instead of reusing finished members")
    p.add_argument("--abstain-risk", type=float, default=None,
                   help="choose each row's abstention threshold for this risk on validation, store it in the run (for "
                        "predict) and report its risk and coverage on every set")

    p = sub.add_parser("train", help="fine-tune LoRA members and collect their posteriors into a run directory")
    _common(p)
    _add_config_flags(p, all_sections)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--member-index", type=int, action="append", default=None,
                   help="train only this member (repeatable), e.g. one per machine; combine later with evaluate --run")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first (only a swaglora run)")
    p.add_argument("--recollect-from", default=None, metavar="RUN",
                   help="do not train: rebuild RUN's members (trained with --swag-keep-trajectory; RUN's settings are "
                        "the defaults here) with other SWAG collection settings (--swag-max-rank, fewer --swag-epochs, "
                        "--swag-every a multiple of RUN's or epoch) from their recorded snapshots, as training would have")

    p = sub.add_parser("evaluate", help="evaluate a trained run (--run) or a base model zero-shot (--model)")
    _common(p)
    _add_config_flags(p, all_sections)
    p.add_argument("--run", action="append", default=[], help="trained run directory (repeat to pool members of several runs)")
    p.add_argument("--out", help="where to write eval/ (default: the first --run)")
    p.add_argument("--abstain-risk", type=float, default=None,
                   help="choose each row's abstention threshold for this risk on validation and store it (for predict)")

    p = sub.add_parser("report", help="write report.md, results.csv/json and figures from run directories (several = seeds)")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="report directory (default: the first run's parent when several, else the run)")
    p.add_argument("--abstain-risk", type=float, default=None, help="target risk for the abstention threshold")
    p.add_argument("--reference", default=None,
                   help="row the paired differences are taken to (default: map), e.g. map-matched for SWAG against "
                        "MAP at equal training compute, or ensemble for MultiSWAG against a deep ensemble")

    p = sub.add_parser("predict", help="predict new questions (answers optional) with a trained run: probabilities, "
                                       "uncertainty and abstention, one JSON line per question")
    p.add_argument("--run", required=True, help="trained run directory")
    p.add_argument("--data", required=True, help="JSONL questions in the data schema, answer optional; - reads standard input")
    p.add_argument("--out", required=True, help="JSONL predictions; - writes standard output (only JSON there)")
    p.add_argument("--method", default=None, help="table row to predict with, or ROW+ts (default: the run's lowest validation NLL)")
    p.add_argument("--abstain-risk", type=float, default=None,
                   help="abstain where the confidence is below the threshold chosen on validation for this risk "
                        "(default: the rule stored at evaluation, if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("tasks", help="list bundled tasks with split sizes")
    sub.add_parser("methods", help="list posterior methods and table rows")
    return parser


def resolve_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    cfg = load_config_file(args.config) if getattr(args, "config", None) else (base or RunConfig())
    overrides: dict[str, Any] = {}
    if getattr(args, "preset", None):
        overrides.update(PRESETS[args.preset])
    for key, value in vars(args).items():
        if "." in key and value is not None:
            overrides[key] = value
    for item in getattr(args, "set", []) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return apply_overrides(cfg, overrides)


def _cmd_tasks() -> int:
    from .tasks import TASKS, task_split_sizes

    sizes = task_split_sizes()
    print(f"{'task':<15} {'splits':<45} description")
    for name, info in TASKS.items():
        splits = ", ".join(f"{s} {n}" for s, n in sizes[name].items())
        print(f"{name:<15} {splits:<45} {info.description}")
    print("\nAlso: mmlu:<group or subject> (e.g. mmlu:stem, mmlu:law, mmlu:college_physics), a JSONL file, or hf:<dataset id>.")
    return 0


def _cmd_methods() -> int:
    from .posterior import get_method, method_names, rows

    print("posterior methods (swaglora.posterior):")
    for name in method_names():
        doc = (get_method(name).__doc__ or "").strip().splitlines()
        print(f"  {name:<15} {doc[0] if doc else ''}")
    print("\nresults-table rows (--methods: a comma-separated list, 'all', or 'default' = the rows marked *):")
    width = max(len(row.name) for row in rows())
    for row in rows():
        print(f"{'*' if row.default else ' '} {row.name:<{width}} {row.help}")
    return 0


def _report(run_dirs: list[Path], out: Path | None, abstain_risk: float | None = None, reference: str | None = None,
            claim: bool = False) -> None:
    """Collect the runs' results (which checks them and ``reference``), then claim ``out`` if asked, then write."""
    from . import validate
    from .report import collect_results, print_table, write_report

    results = collect_results(run_dirs, reference=reference)
    if claim and out is not None:
        validate.claim_dir(out)
    target = out or (run_dirs[0] if len(run_dirs) == 1 else run_dirs[0].parent)
    path = write_report(results, target, abstain_risk=abstain_risk)
    print(print_table(results))
    print(f"\nreport: {path}")


def _print_choice(cfg: RunConfig) -> None:
    """The model, scoring, dtype and task a command will use (after preflight has validated them)."""
    from .models import resolve_scoring, runtime_info

    scoring = resolve_scoring(cfg.model)
    why = "" if cfg.model.scoring != "auto" else " (this model's default; --scoring letter|cloze to change)"
    runtime = runtime_info(cfg.model)
    print(f"model {cfg.model.name}, scoring {scoring}{why}, dtype {runtime['dtype']} on {runtime['device']}"
          f"{_dtype_reason(runtime)}, task {cfg.data.data or cfg.data.task}", file=sys.stderr)


def _print_preset(args: argparse.Namespace, file=None) -> None:
    """The warning of a preset that runs something other than the defaults (``PRESET_NOTES``), if it has one."""
    from .presets import PRESET_NOTES

    note = PRESET_NOTES.get(getattr(args, "preset", None) or "")
    if note:
        print(f"\n{note}" if file is sys.stdout else note, file=file or sys.stderr)


def _dtype_reason(runtime: dict) -> str:
    """Why ``--dtype auto`` took what it took (empty when --dtype named one)."""
    from .models import AUTO_DTYPE_ENV

    if runtime["dtype_setting"] != "auto":
        return ""
    if runtime["auto_dtype_env"]:
        return f" (auto, pinned by {AUTO_DTYPE_ENV})"
    reason = f": {runtime['auto_dtype_reason']}" if runtime.get("auto_dtype_reason") else ""
    return f" (auto{reason}; {AUTO_DTYPE_ENV}=float32|bfloat16 pins it)"


def main(argv: list[str] | None = None) -> int:
    import warnings

    # transformers/peft deprecation chatter is not actionable for users of this CLI
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"swaglora: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .models import ModelError  # torch is imported by then

        if not isinstance(exc, ModelError):
            raise  # a bug: keep its traceback
        print(f"swaglora: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: read-only, full, no permission, a file where a directory goes
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"swaglora: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"swaglora: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swaglora: interrupted; finished members and evaluations are kept", file=sys.stderr)
        return 130


def _is_main() -> bool:
    from .distributed import current

    return current().is_main


def _quiet() -> None:
    """No progress bars from transformers ("Loading weights") or the hub either."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline, validate
    from .distributed import current
    from .members import needed_posteriors, open_session, recollect_member, train_members

    if args.command == "tasks":
        return _cmd_tasks()
    if args.command == "methods":
        return _cmd_methods()
    if args.command == "report":
        validate.check_abstain_risk(args.abstain_risk)
        validate.check_reference(args.reference)
        out = validate.check_out_dir(args.out) if args.out else None
        _report([Path(r) for r in args.runs], out, args.abstain_risk, args.reference, claim=True)
        return 0
    progress = not args.quiet
    if args.quiet:
        _quiet()
    if args.command == "run":
        validate.check_abstain_risk(args.abstain_risk)
        cfg = resolve_config(args)
        seeds = validate.parse_seeds(args.seeds)
        out = validate.check_out_dir(args.out, args.overwrite)
        jobs = [(apply_overrides(cfg, {"train.seed": s}), out / f"seed-{s}") for s in seeds] or [(cfg, out)]
        plans = [validate.preflight(c, "run", d, overwrite=args.overwrite) for c, d in jobs]  # all before any work
        _print_choice(cfg)
        _print_preset(args)
        if seeds and _is_main():
            validate.claim_dir(out)  # the parent of the seed runs holds their report
        for (job_cfg, run_dir), plan in zip(jobs, plans):
            pipeline.run(job_cfg, run_dir, progress=progress, overwrite=args.overwrite, plan=plan, abstain_risk=args.abstain_risk)
        if _is_main():
            _report([d for _, d in jobs], out, args.abstain_risk)
            _print_preset(args, file=sys.stdout)  # again beside the table it qualifies
        return 0
    if args.command == "train":
        source = Path(args.recollect_from) if args.recollect_from else None
        cfg = resolve_config(args, base=_recollect_base(source) if source is not None else None)
        out = Path(args.out)
        members = args.member_index if args.member_index is not None else cfg.posterior.member_indices
        plan = validate.preflight(cfg, "train", out, overwrite=args.overwrite, members=members, recollect_from=source)
        _print_choice(cfg)
        pipeline.prepare_run_dir(cfg, out, args.overwrite, plan.data_sha256)
        session = open_session(cfg)
        if source is not None and _is_main():
            for i in members:
                if not (out / "members" / str(i) / "done.json").is_file():
                    recollect_member(session, source / "members" / str(i), out / "members" / str(i),
                                     needed_posteriors(plan.rows))
        current().wait()  # other processes (accelerate launch) find the recollected members finished
        train_members(session, out, members, plan.rows, progress=progress)
        print(f"{'recollected' if source is not None else 'trained'} members {members} into {out}")
        return 0
    if args.command == "evaluate":
        return _evaluate(args, progress)
    if args.command == "predict":
        return _predict(args, progress)
    raise AssertionError(args.command)


def _recollect_base(source: Path) -> RunConfig:
    """``train --recollect-from SOURCE``: the flags given change SOURCE's settings (it records a trajectory, the
    rebuilt run does not). A SOURCE collected with ``swag.every auto`` keeps the interval it recorded (its members'
    ``done.json``): auto would resolve anew for another rank or number of SWAG epochs, to an interval the recorded
    snapshots may not hold; ``--swag-every`` still chooses another."""
    from .io import read_json
    from .validate import recollect_source_config

    cfg = recollect_source_config(source)
    overrides: dict[str, Any] = {"swag.keep_trajectory": False}
    if cfg.swag.every == "auto":
        recorded = {read_json(p).get("swag_every") for p in sorted((source / "members").glob("*/done.json"))}
        if len(recorded) == 1 and isinstance(next(iter(recorded)), int):
            overrides["swag.every"] = str(recorded.pop())
    return apply_overrides(cfg, overrides)


def _predict(args: argparse.Namespace, progress: bool) -> int:
    """``swaglora predict``: everything is checked before the model loads; then :class:`predictor.Predictor`."""
    import json

    from . import validate
    from .data import load_jsonl
    from .io import atomic_write_text
    from .predictor import Predictor, answered_summary, plan_prediction, rule_text

    validate.check_abstain_risk(args.abstain_risk)
    validate.check_out_file(args.out)
    plan = plan_prediction(args.run, args.method, args.abstain_risk)
    examples = load_jsonl(args.data, answers=False)
    plan.check_examples(examples)
    validate.check_questions(plan.cfg, args.data, examples)
    for note in plan.notes:
        print(f"swaglora: {note}", file=sys.stderr)
    predictor = Predictor(plan, progress=progress)
    if plan.needs_threshold:
        print(f"swaglora: abstention: {rule_text(predictor.rule)}", file=sys.stderr)
    predictions, probs = predictor.predict_examples(examples)
    text = "".join(json.dumps(p.to_dict()) + "\n" for p in predictions)
    if args.out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(Path(args.out), text)
    summary = answered_summary(examples, probs, predictor.rule)
    if summary is not None:
        line = (f"{plan.method} on the {summary['n']} questions with an answer: accuracy {summary['accuracy']:.4f}  "
                f"ece {summary['ece']:.4f}  nll {summary['nll']:.4f}")
        if "risk" in summary:
            line += (f"; abstention (target risk {predictor.rule['target_risk']}): risk {summary['risk']:.4f}, "
                     f"coverage {summary['coverage']:.4f}")
        print(line, file=sys.stderr if args.out == "-" else sys.stdout)
    return 0


def _evaluate(args: argparse.Namespace, progress: bool) -> int:
    from . import evaluate, rundir, validate
    from .members import open_session

    runs = [Path(r) for r in args.run]
    validate.check_abstain_risk(args.abstain_risk)
    if runs:
        cfg = resolve_config(args, base=rundir.load_run_config(runs[0]))
        out = Path(args.out) if args.out else runs[0]
        plan = validate.preflight(cfg, "evaluate", out, runs=runs)
        _print_choice(cfg)
        validate.claim_dir(out)
        rundir.record_evaluation_runtime(out, cfg)
        session = open_session(cfg)
        evaluate.evaluate_run(session, runs, plan.rows, out, progress=progress, abstain_risk=args.abstain_risk)
        _report([out], out, args.abstain_risk)
        return 0
    # zero-shot evaluation of a base model on one data set
    if not args.out:
        raise ConfigError("evaluate needs --out DIR (and --model/--data or --task), or --run RUN_DIR")
    cfg = resolve_config(args)
    out = Path(args.out)
    validate.preflight(cfg, "base", out)
    _print_choice(cfg)
    validate.claim_dir(out)
    rundir.record_evaluation_runtime(out, cfg)
    session = open_session(cfg, with_data=False)
    results = evaluate.evaluate_base(session, out, progress=progress)
    for r in results:
        print(f"{r['eval_set']}: accuracy {r['accuracy']:.4f}  ece {r['ece']:.4f}  nll {r['nll']:.4f}  "
              f"brier {r['brier']:.4f}  n {r['n']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
