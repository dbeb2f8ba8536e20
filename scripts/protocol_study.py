"""The protocol study (issue 13): which SWAG protocol gives the best-calibrated answers on the embedded model,
chosen on the validation split only, then confirmed with 3 seeds and tested once.

Stages (each skips the runs that are already done, so an interrupted study continues where it stopped):

1. ``screen``: one seed, one factor at a time around the base protocol. A *training* factor (SWAG learning rate,
   snapshot schedule, rank K, SWAG epochs, LoRA placement, early stopping) trains one run per value; the *members*
   factor trains one run with the most members, starting from the base run's member 0, and scores each smaller
   count on a copy of its first members; an *evaluation* factor (samples S, covariance scale) re-evaluates the
   base run; a *collection* factor (snapshot schedule, rank K, SWAG epochs) costs no training: one run of the base
   protocol with the most SWAG epochs records its SWAG-phase trajectory (``--swag-keep-trajectory``) and every
   value's run, the base protocol's included, is rebuilt from it with ``train --recollect-from`` (bit for bit what
   training with those settings gives; tests/test_recollect.py). Every run is scored with
   ``swaglora evaluate --validation-only``: the test split is never loaded. A factor's value with the lowest
   validation NLL of the factor's row (``swag``, or ``multiswag`` for members) is adopted only when its paired
   bootstrap difference to the base value excludes 0; otherwise the base value stays.
2. ``confirm``: the base protocol, the protocol made of the adopted values and any ``--candidate`` (e.g. the
   product's defaults, chosen by the study of another task), with ``--seeds`` (3 by default), one member each (the
   score, ``swag``, is member 0's), again on validation only; the adopted member count joins the chosen protocol
   afterwards. Each candidate's paired difference to the chosen one and ``swag`` − ``map`` within each candidate,
   pooled over the seeds, are recorded with their intervals. A candidate equal to the base or the screened protocol
   is not run twice.
3. ``test``: the chosen protocol (the lowest mean validation NLL over seeds), evaluated once on the full test and
   shift splits.
4. ``report``: ``docs/protocol-study.md`` (one table and one plot per factor, the stage times, the choice, the test
   results) and ``study.json`` in the output directory.

One command re-runs everything: ``make study`` (= ``python scripts/protocol_study.py --out runs/study``).
``--grid tiny`` with ``--model DIR --data FILE --test-data FILE`` is the small grid the tests run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from swaglora.cli import main as swaglora
from swaglora.config import SWAGConfig
from swaglora.io import atomic_write_json, atomic_write_text

LR = 1e-3  # the base protocol's MAP learning rate (the product default)

#: The protocol the screen varies around: the product's defaults before this study chose new ones (LoRA on every
#: linear module of the top 2 layers, S=4; now ``--preset demo`` with the full splits), pinned so that the study
#: re-runs the same whatever the defaults are now. Prepended to the base flags; a base flag given later wins.
BASE_PROTOCOL = ["--lora-targets", "all-linear", "--lora-layers", "top:2", "--samples", "4"]

#: factor -> (row whose validation NLL scores it, kind, [(label, CLI flags)]). The first value of every factor is
#: the base protocol's (no flags: BASE_PROTOCOL plus the study's base flags), so its run is shared. Kinds:
#: train (a run per value), collect (rebuilt from the recorded trajectory), members, eval (the base run evaluated
#: with other flags).
FACTORS: dict[str, tuple[str, str, list[tuple[str, list[str]]]]] = {
    "swag_lr": ("swag", "train", [("lr (1e-3)", []), ("lr/3", ["--swag-lr", str(LR / 3)]), ("lr/10", ["--swag-lr", str(LR / 10)])]),
    "snapshots": ("swag", "collect", [("every 25 steps", []), ("every 100 steps", ["--swag-every", "100"]),
                                      ("per epoch, 6 SWAG epochs", ["--swag-every", "epoch", "--swag-epochs", "6"])]),
    "rank": ("swag", "collect", [("K=5", []), ("K=10", ["--swag-max-rank", "10"]), ("K=20", ["--swag-max-rank", "20"])]),
    "swag_epochs": ("swag", "collect", [("3", []), ("6", ["--swag-epochs", "6"])]),
    "early_stop": ("swag", "train", [("off", []), ("force_save 1", ["--swag-force-save", "1"])]),
    # one run with the most members (its member 0 copied from the base run, whose seed and settings it shares), each
    # smaller count a copy of its first members; a MultiSWAG of one member is SWAG: the base run's swag row scores "1"
    "members": ("multiswag", "members", [("1", []), ("2", ["--members", "2"]), ("5", ["--members", "5"])]),
    "samples": ("swag", "eval", [("S=4", []), ("S=15", ["--samples", "15"]), ("S=30", ["--samples", "30"])]),
    "scale": ("swag", "eval", [("0.5 (swag's default)", []), ("1", ["--swag-scale", "1"]), ("2", ["--swag-scale", "2"]),
                               ("4", ["--swag-scale", "4"])]),
    # last: by far the dearest (no lower-layer cache for the paper's placement), so a stopped screen has the rest
    "placement": ("swag", "train", [("top 2, all linear", []),
                                    ("top 8, all linear", ["--lora-layers", "top:8"]),
                                    ("all, q_proj+v_proj", ["--lora-layers", "all", "--lora-targets", "q_proj,v_proj"])]),
}

#: the tests' grid (for their base flags --swag-every 2 --swag-max-rank 2 on 4 steps per epoch, 3 SWAG epochs): one
#: training factor, three collection factors, one evaluation factor, two values each, and members 1, 2, 3
TINY = {
    "swag_lr": FACTORS["swag_lr"][:2] + (FACTORS["swag_lr"][2][:2],),
    "snapshots": ("swag", "collect", [("every 2 steps", []), ("per epoch", ["--swag-every", "epoch"])]),
    "rank": ("swag", "collect", [("K=2", []), ("K=3", ["--swag-max-rank", "3"])]),
    "swag_epochs": ("swag", "collect", [("3", []), ("4", ["--swag-epochs", "4"])]),
    "members": ("multiswag", "members", [("1", []), ("2", ["--members", "2"]), ("3", ["--members", "3"])]),
    "scale": FACTORS["scale"][:2] + (FACTORS["scale"][2][:2],),
}


def _flags(values: list[tuple[str, list[str]]], label: str) -> list[str]:
    return next(f for lab, f in values if lab == label)


class Study:
    def __init__(self, out: Path, base: list[str], factors: dict, seeds: list[int], state: Path | None = None,
                 candidates: dict[str, dict[str, str]] | None = None) -> None:
        self.out, self.base, self.factors, self.seeds = out, base, factors, seeds
        self.candidates = candidates or {}  # more protocols for the confirmation: name -> {factor: label} over the base
        self.state_path = state or out / "study.json"
        # what the test stage leaves (each seed's evaluation, the pooled report) lies beside the state file, so a
        # study whose state is committed keeps its test predictions too (a few MB), and its test stage can span
        # sessions; the trained runs and the screen's evaluations stay in ``out``
        self.kept = self.state_path.parent
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"runs": {}, "stages": {}}

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, self.state)

    def _train_flags(self, choice: dict[str, str]) -> list[str]:
        """The base flags plus the flags of each training factor's chosen value (none for base values)."""
        return list(self.base) + [f for name, label in choice.items() if self.factors[name][1] in ("train", "collect", "members")
                                  for f in _flags(self.factors[name][2], label)]

    def _collectable(self, choice: dict[str, str]) -> bool:
        """Whether ``choice``'s run can be rebuilt from the recorded trajectory: it differs from the base protocol in
        collection factors only."""
        return all(self.factors[name][1] in ("collect", "eval") or not _flags(self.factors[name][2], label)
                   for name, label in choice.items())

    def _base_epochs(self) -> int:
        return int(_last(self.base, "--swag-epochs", SWAGConfig().epochs))

    def _source_flags(self) -> list[str]:
        """The run that records the trajectory: the base protocol with the most SWAG epochs any collection value asks."""
        epochs = [self._base_epochs()]
        epochs += [_last(flags, "--swag-epochs", 0) for _, kind, values in self.factors.values() if kind == "collect"
                   for _, flags in values]
        return list(self.base) + ["--swag-epochs", str(max(int(e) for e in epochs)), "--swag-keep-trajectory"]

    def _train_dir(self, train_flags: list[str], seed: int) -> Path:
        return self.out / "runs" / f"{_slug(train_flags)}-seed{seed}"

    @staticmethod
    def _copy_members(source: Path, dest: Path, copied: int, members: int) -> None:
        """Make ``dest`` a run of ``members`` members holding ``source``'s first ``copied`` finished ones: its run
        marker, and its config with the member count changed (so ``train`` resumes ``dest`` and trains only the
        missing members; member ``i``'s training depends on the seed and ``i`` only). Written beside ``dest`` and
        renamed into place; predictions do not depend on where a run lies."""
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "members").mkdir(parents=True)
        shutil.copy2(source / "swaglora_run.json", tmp / "swaglora_run.json")
        for i in range(copied):
            shutil.copytree(source / "members" / str(i), tmp / "members" / str(i))
        config = json.loads((source / "config.json").read_text())
        config["posterior"]["members"] = members
        atomic_write_json(tmp / "config.json", config)
        tmp.rename(dest)

    def _eval_flags(self, choice: dict[str, str]) -> list[str]:
        return [f for name, label in choice.items() if self.factors[name][1] == "eval" for f in _flags(self.factors[name][2], label)]

    def _trained(self, train_dir: Path, train_flags: list[str], seed: int, collect: bool = False) -> None:
        """Train ``train_dir`` unless every member its config names has finished; ``collect``: rebuild it from the
        trajectory recorded by the source run (:meth:`_source_flags`, trained first) instead."""
        config = train_dir / "config.json"
        members = json.loads(config.read_text())["posterior"]["members"] if config.is_file() else 0
        if not members or not all((train_dir / "members" / str(i) / "done.json").is_file() for i in range(members)):
            source: list[str] = []
            if collect:  # the recording run's settings are the defaults of a recollection: the base's SWAG epochs
                source_dir = self._train_dir(self._source_flags(), seed)  # first, then this run's flags
                self._trained(source_dir, self._source_flags(), seed)
                source = ["--recollect-from", str(source_dir), "--swag-epochs", str(self._base_epochs())]
            code = swaglora(["train", "--out", str(train_dir), "--seed", str(seed), *source, *train_flags, "--quiet"])
            if code:
                raise SystemExit(f"{'recollecting' if collect else 'training'} {train_dir} failed ({code})")

    def run(self, key: str, train_flags: list[str], eval_flags: list[str], seed: int, validation_only: bool = True,
            members_from: list[str] | None = None, collect: bool = False, need_files: bool = False) -> dict:
        """Train (once per training setting and seed) and evaluate; returns the rows' validation (or test) metrics.

        ``members_from``: the train flags of a run with more members: evaluate a copy of its first members (the
        count that ``train_flags`` asks for) instead of training this setting on its own. ``collect``: rebuild the
        run from the recorded trajectory (:meth:`_trained`). ``need_files``: the caller reads the run's predictions,
        so a recorded run whose evaluation directory is missing (a state file carried to another machine) is run
        again; otherwise its record (the metrics) is enough."""
        record = self.state["runs"].get(key)
        if record is not None and (not need_files or (Path(record["eval_dir"]) / "results.json").is_file()):
            return record  # a recorded run whose files are gone (another machine's state) is redone when they are needed
        start = time.perf_counter()
        if members_from is None:
            train_dir = self._train_dir(train_flags, seed)
            self._trained(train_dir, train_flags, seed, collect)
        else:
            source = self._train_dir(members_from, seed)
            self._trained(source, members_from, seed)
            count = _members(train_flags)
            train_dir = source.with_name(f"{source.name}-first{count}")  # a copy of its first members
            if not (train_dir / "config.json").is_file():
                self._copy_members(source, train_dir, count, count)
        trained = time.perf_counter() - start
        eval_dir = (self.kept if key.startswith("test/") else self.out / "eval") / key
        code = swaglora(["evaluate", "--run", str(train_dir), "--out", str(eval_dir), *eval_flags, "--quiet",
                         *(["--validation-only"] if validation_only else [])])
        if code:
            raise SystemExit(f"evaluating {train_dir} into {eval_dir} failed ({code})")
        results = json.loads((eval_dir / "results.json").read_text())
        metrics: dict[str, dict] = {}  # set -> row -> metric -> value (one seed: the mean is the value)
        for method, sets in results["metrics"].items():
            for eval_set, values in sets.items():
                metrics.setdefault(eval_set, {})[method] = {k: values[k]["mean"] for k in ("accuracy", "ece", "nll", "brier")}
        record = {"train_dir": str(train_dir), "eval_dir": str(eval_dir), "seed": seed, "metrics": metrics,
                  "seconds": time.perf_counter() - start, "train_seconds": trained}
        self.state["runs"][key] = record
        self._save()
        return record

    def screen(self) -> dict[str, str]:
        """One seed, one factor at a time. A factor's value with the lowest validation NLL of the factor's row is
        adopted only when its paired bootstrap difference to the base value (same validation questions resampled for
        both) excludes 0; otherwise the base value stays: one seed's noise does not change a default."""
        start = time.perf_counter()
        base = {name: values[0][0] for name, (_, _, values) in self.factors.items()}
        best, lowest, diffs = {}, {}, {}
        done = self.state.setdefault("screened_factors", {})  # factor -> its finished result, saved as each ends
        finished = self.state["stages"].get("screen")  # a state written before factors were saved one by one
        for name in finished["best"] if finished else ():
            done.setdefault(name, {"best": finished["best"][name], "lowest": finished["lowest"][name],
                                   "differences": finished["differences"][name]})
        for name, (row, kind, values) in self.factors.items():
            if name in done:  # its differences need no files: a study resumed elsewhere skips the factor
                best[name], lowest[name], diffs[name] = done[name]["best"], done[name]["lowest"], done[name]["differences"]
                continue
            scores, records = {}, {}
            largest = None
            if kind == "members":  # one run with the most members, started with the base run's member 0
                largest = self._train_flags({**base, name: max(values, key=lambda v: _members(v[1]))[0]})
                base_dir = self._train_dir(self._train_flags(base), self.seeds[0])
                self._trained(base_dir, self._train_flags(base), self.seeds[0], collect=self._collectable(base))
                start_dir = self._train_dir(largest, self.seeds[0])
                if not start_dir.exists():  # the base run's member 0 is this run's: copy it, train the others
                    self._copy_members(base_dir, start_dir, 1, _members(largest))
            for label, flags in values:
                choice = {**base, name: label}
                shared = largest if largest is not None and flags and _members(flags) != _members(largest) else None
                records[label] = self.run(f"screen/{name}/{_slug([label])}", self._train_flags(choice),
                                          self._eval_flags(choice), self.seeds[0], members_from=shared,
                                          collect=shared is None and self._collectable(choice), need_files=True)
                scores[label] = _score(records[label], row)
            lowest[name] = min(scores, key=scores.get)
            diffs[name] = _differences(records, row, values[0][0])
            best[name] = lowest[name] if diffs[name].get(lowest[name], {}).get("significant") else values[0][0]
            done[name] = {"best": best[name], "lowest": lowest[name], "differences": diffs[name]}
            self._save()
        self.state["stages"]["screen"] = {"seconds": self._stage_seconds("screen", start), "best": best, "lowest": lowest,
                                          "differences": diffs, "base": base}
        self._save()
        return best

    def _stage_seconds(self, stage: str, start: float) -> float:
        """The stage's time over every call that worked on it: a call that finds the stage done adds its own few
        seconds to the recorded time instead of replacing it."""
        return self.state["stages"].get(stage, {}).get("seconds", 0.0) + time.perf_counter() - start

    def _member_factor(self) -> str | None:
        return next((name for name, (_, kind, _) in self.factors.items() if kind == "members"), None)

    def confirm(self) -> dict[str, str]:
        """The base protocol and the screen's combination with every seed; the lower mean validation NLL of the
        ``swag`` row wins. Both train the base's member count (``swag`` is member 0's posterior: more members would
        not change the score); the screen's member count is then added to the chosen protocol."""
        start = time.perf_counter()
        stage = self.state["stages"]["screen"]
        members = self._member_factor()
        screened = {**stage["best"], **({members: stage["base"][members]} if members else {})}
        candidates = {"base": stage["base"]}
        if screened != stage["base"]:
            candidates["screened"] = screened
        for name, values in self.candidates.items():  # e.g. the product's defaults, chosen by another task's study
            choice = {**stage["base"], **values, **({members: stage["base"][members]} if members else {})}
            if choice not in candidates.values():
                candidates[name] = choice
        means, records = {}, {}
        for name, choice in candidates.items():
            records[name] = [self.run(f"confirm/{name}/seed{seed}", self._train_flags(choice), self._eval_flags(choice),
                                      seed) for seed in self.seeds]
            means[name] = sum(_score(r, "swag") for r in records[name]) / len(self.seeds)
        chosen = min(means, key=means.get)
        choice = {**candidates[chosen], **({members: stage["best"][members]} if members else {})}
        diffs, vs_map = _pooled_differences(records, "swag", chosen), _swag_minus_map(records)
        before = self.state["stages"].get("confirm") or {}
        if diffs is None and before.get("candidates") == candidates:  # carried elsewhere: keep what the files gave
            diffs, vs_map = before.get("differences"), before.get("swag_minus_map")
        self.state["stages"]["confirm"] = {"seconds": self._stage_seconds("confirm", start), "mean_validation_nll": means,
                                           "chosen": chosen, "choice": choice, "candidates": candidates,
                                           "differences": diffs, "swag_minus_map": vs_map}
        self._save()
        return choice

    def test(self) -> None:
        """The chosen protocol on the test and shift splits, once per seed; then the product's report over the
        seeds (``swaglora report``: pooled bootstrap intervals, paired differences to MAP, OOD detection,
        selective prediction) in ``test-report`` beside the state file (by default ``<out>``)."""
        start = time.perf_counter()
        choice = self.state["stages"]["confirm"]["choice"]
        records = [self.run(f"test/seed{seed}", self._train_flags(choice), self._eval_flags(choice), seed,
                            validation_only=False, need_files=True) for seed in self.seeds]
        code = swaglora(["report", *(r["eval_dir"] for r in records), "--out", str(self.test_report_dir)])
        if code:
            raise SystemExit(f"reporting the test runs into {self.test_report_dir} failed ({code})")
        self.state["stages"]["test"] = {"seconds": self._stage_seconds("test", start), "report": str(self.test_report_dir)}
        self._save()

    @property
    def test_report_dir(self) -> Path:
        return self.kept / "test-report"


def _last(flags: list[str], flag: str, default):
    """The value of the last ``flag`` in a flag list, else ``default``."""
    values = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == flag]
    return values[-1] if values else default


def _members(flags: list[str]) -> int:
    """The member count a flag list asks for (the last ``--members``; 1 without one, the study's base)."""
    return int(_last(flags, "--members", 1))


def _score(record: dict, row: str) -> float:
    """The validation NLL of ``row`` (``multiswag`` of one member is the ``swag`` row)."""
    validation = record["metrics"]["validation"]
    return validation[row if row in validation else "swag"]["nll"]


def _validation_predictive(record: dict, row: str):
    """``row``'s validation predictive of one evaluated run: ids, ``[N, C]`` probabilities (padded with zeros to the
    most choices, as the report reads them), labels. ``multiswag`` of one member is the ``swag`` row."""
    import torch

    from swaglora.reporting.load import read_predictions

    folder = Path(record["eval_dir"]) / "eval" / "validation"
    preds = read_predictions(folder / (row if (folder / row).is_dir() else "swag") / "predictions.jsonl")
    labels = torch.tensor([r["labels"].index(r["answer"]) for r in preds.rows])
    return [r["id"] for r in preds.rows], torch.from_numpy(preds.probs), labels


def _pooled_differences(records: dict[str, list[dict]], row: str, reference: str) -> dict[str, dict] | None:
    """Each protocol's validation NLL of ``row`` minus the ``reference`` protocol's, pooled over the seeds
    (``_paired_differences``); ``None`` when a run's predictions are not on this machine (a confirmation resumed from
    a carried state file needs only the recorded metrics to choose)."""
    if not all((Path(r["eval_dir"]) / "results.json").is_file() for runs in records.values() for r in runs):
        return None
    return _paired_differences(records, row, reference)


def _paired_differences(records: dict[str, list[dict]], row: str, reference: str) -> dict[str, dict]:
    """Each protocol's validation NLL of ``row`` minus the ``reference`` protocol's, pooled over the seeds (the mean
    over seeds of the per-seed difference), with a 95% interval by bootstrap over the validation questions, paired
    (the same resamples for every protocol and seed; where each seed has its own seeded validation split, over the
    (seed, question) pairs, whose mean is the mean over seeds for splits of equal size):
    {protocol: {value, lo, hi, significant}}. ``records``: each protocol's runs, one per seed, in the same seed
    order."""
    from swaglora.metrics import paired_bootstrap
    import torch

    loaded = {name: [_validation_predictive(r, row) for r in runs] for name, runs in records.items()}
    for i, (ids, _, _) in enumerate(loaded[reference]):  # each seed's questions are the same for every protocol
        if any(runs[i][0] != ids for runs in loaded.values()):
            raise SystemExit(f"the {row} rows of {sorted(records)} are not on the same validation questions")
    first = loaded[reference][0][0]
    if all(ids == first for ids, _, _ in loaded[reference]):  # one validation split (e.g. an official one)
        boot = paired_bootstrap({name: [v[1] for v in runs] for name, runs in loaded.items()},
                                loaded[reference][0][2], reference=reference)
    else:  # a seeded split per seed: the units resampled are (seed, question) pairs, still the same for every protocol
        width = max(v[1].shape[1] for runs in loaded.values() for v in runs)

        def joined(runs: list) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(v[1], (0, width - v[1].shape[1])) for v in runs])

        boot = paired_bootstrap({name: [joined(runs)] for name, runs in loaded.items()},
                                torch.cat([v[2] for v in loaded[reference]]), reference=reference)
    return {name: boot[name]["nll_diff"] for name in records if name != reference}


def _swag_minus_map(records: dict[str, list[dict]]) -> dict[str, dict] | None:
    """Does SWAG beat the MAP adapter it is built around? For each protocol, ``swag`` minus ``map`` on validation,
    pooled over its seeds, for every bootstrap metric (accuracy, ECE, NLL, Brier, AURC), with paired 95% intervals
    (metrics.paired_bootstrap: the same resampled questions for both rows and every seed); ``None`` when a run's
    predictions are not on this machine. Protocols whose seeds have different validation questions are left out."""
    from swaglora.metrics import BOOTSTRAP_METRICS, paired_bootstrap

    if not all((Path(r["eval_dir"]) / "results.json").is_file() for runs in records.values() for r in runs):
        return None
    out = {}
    for name, runs in records.items():
        swag, map_ = [_validation_predictive(r, "swag") for r in runs], [_validation_predictive(r, "map") for r in runs]
        if any(v[0] != swag[0][0] for v in swag + map_):
            continue
        boot = paired_bootstrap({"map": [v[1] for v in map_], "swag": [v[1] for v in swag]}, swag[0][2], reference="map")
        out[name] = {m: boot["swag"][f"{m}_diff"] for m in BOOTSTRAP_METRICS}
    return out


def _differences(records: dict[str, dict], row: str, reference: str) -> dict[str, dict]:
    """The screen's one-seed case of ``_paired_differences``: each value's validation NLL minus the ``reference``
    value's, with a 95% interval by paired bootstrap over the validation questions: {label: {value, lo, hi,
    significant}}."""
    return _paired_differences({label: [r] for label, r in records.items()}, row, reference)


def _slug(flags: list[str]) -> str:
    """A directory name for a flag list: readable, and a hash of the whole list (so long lists never collide)."""
    text = "_".join(f.lstrip("-") for f in flags[-4:]) or "base"
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:60]
    return f"{readable}-{hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:10]}"


def write_report(study: Study, path: Path) -> Path:
    """``path`` (markdown) and one figure per factor next to it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    state, runs = study.state, study.state["runs"]
    figures = path.with_suffix("")  # docs/protocol-study.md -> docs/protocol-study/ (one folder per report)
    figures.mkdir(parents=True, exist_ok=True)
    task = _last(study.base, "--task", None)
    lines = ["# Protocol study" + (f" ({task})" if task else ""), "", f"Base flags: `{' '.join(study.base)}`; seeds {study.seeds}. Every choice below is "
             "made on the validation split; the test split is used once, in the last table. The screen (one seed, one "
             "factor at a time) adopts a factor's lowest-NLL value only when its paired bootstrap difference to the "
             "base value (1,000 resamples of the validation questions, the same for every value) excludes 0, marked *; "
             "the interval covers the questions, not the posterior's sampling noise or the seed.", ""]
    screen = state["stages"].get("screen", {})
    for name, (row, kind, values) in study.factors.items():
        rows = [(label, runs.get(f"screen/{name}/{_slug([label])}")) for label, _ in values]
        rows = [(label, r) for label, r in rows if r is not None]
        if not rows:
            continue
        diffs = screen.get("differences", {}).get(name) or (_differences(dict(rows), row, rows[0][0]) if
                                                             rows[0][0] == values[0][0] and len(rows) > 1 else {})
        lines += [f"## {name} ({kind} factor, scored by the `{row}` row)", "",
                  f"| value | val NLL | Δ NLL to {values[0][0]} [95% CI] | val ECE | val ACC | MAP val NLL | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in rows:
            v = r["metrics"]["validation"]
            shown = row if row in v else "swag"
            mark = (" **(adopted)**" if screen.get("best", {}).get(name) == label != values[0][0] else
                    " (lowest, not adopted)" if screen.get("lowest", {}).get(name) == label != screen.get("best", {}).get(name)
                    else "")
            d = diffs.get(label)
            delta = (f"{d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]{' *' if d['significant'] else ''}" if d else "")
            lines.append(f"| {label}{mark} | {v[shown]['nll']:.4f} | {delta} | {v[shown]['ece']:.4f} | "
                         f"{v[shown]['accuracy']:.4f} | {v['map']['nll']:.4f} | {r['seconds']:.0f} |")
        lines += ["", f"![{name}]({figures.name}/{name}.png)", ""]
        fig = Figure(figsize=(4, 3))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        scores = [_score(r, row) for _, r in rows]
        # each value's score with the 95% interval of its paired difference to the base value, drawn around it
        below = [diffs[lab]["value"] - diffs[lab]["lo"] if lab in diffs else 0.0 for lab, _ in rows]
        above = [diffs[lab]["hi"] - diffs[lab]["value"] if lab in diffs else 0.0 for lab, _ in rows]
        ax.errorbar(range(len(rows)), scores, yerr=[below, above], fmt="o-", capsize=3,
                    label=f"{row} (95% CI of Δ to {values[0][0]})")
        ax.plot(range(len(rows)), [r["metrics"]["validation"]["map"]["nll"] for _, r in rows], "s--", label="map")
        ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=20, fontsize=7)
        ax.set_ylabel("validation NLL")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figures / f"{name}.png", dpi=100)
    confirm = state["stages"].get("confirm")
    confirm_runs = sorted(k for k in runs if k.startswith("confirm/"))
    if confirm_runs:
        screened = {k: v for k, v in screen.get("best", {}).items() if v != screen.get("base", {}).get(k)}
        lines += ["## Confirmation" + ("" if confirm else " (in progress)"), "",
                  f"`base`: the base protocol; `screened`: the base with the screen's adopted values "
                  f"(`{json.dumps(screened)}`; the member count is added after the confirmation). Validation split, "
                  "every seed:", "", "| protocol | seed | swag NLL | swag ECE | swag ACC | MAP NLL | MAP ECE | MAP ACC | minutes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in confirm_runs:
            r, (_, name, seed) = runs[key], key.split("/")
            v = r["metrics"]["validation"]
            lines.append(f"| {name} | {seed.removeprefix('seed')} | {v['swag']['nll']:.4f} | {v['swag']['ece']:.4f} | "
                         f"{v['swag']['accuracy']:.4f} | {v['map']['nll']:.4f} | {v['map']['ece']:.4f} | "
                         f"{v['map']['accuracy']:.4f} | {r['seconds'] / 60:.1f} |")
        lines.append("")
    if confirm:
        extra = {k: v for k, v in confirm.get("candidates", {}).items() if k not in ("base", "screened")}
        lines += [f"`{k}`: `{json.dumps({f: lab for f, lab in v.items() if lab != screen['base'].get(f)})}` over the base."
                  for k, v in extra.items()] + ([""] if extra else [])
        diffs = confirm.get("differences") or {}
        lines += [f"| protocol | mean validation NLL (swag) | Δ to {confirm['chosen']}, pooled over seeds [95% CI] |",
                  "|---|---:|---|"]
        lines += [f"| {k} | {v:.4f} | " + (f"{diffs[k]['value']:+.4f} [{diffs[k]['lo']:+.4f}, {diffs[k]['hi']:+.4f}]"
                                            f"{'*' if diffs[k]['significant'] else ''}" if k in diffs else "") + " |"
                  for k, v in confirm["mean_validation_nll"].items()]
        lines += ["", "(paired bootstrap over the validation questions, the same resamples for every protocol and seed; "
                  "* the interval excludes 0)"] if diffs else []
        vs_map = confirm.get("swag_minus_map") or {}
        if vs_map:
            names = ("accuracy", "ece", "nll", "brier", "aurc")
            lines += ["", "Does SWAG beat its own MAP? `swag` − `map` on validation, pooled over the seeds, with paired 95% "
                      "intervals (* excludes 0; lower is better except for ACC):", "",
                      "| protocol | " + " | ".join(f"Δ {dict(accuracy='ACC', brier='Brier').get(m, m.upper())}" for m in names) + " |",
                      "|---|" + "---|" * len(names)]
            lines += [f"| {k} | " + " | ".join(f"{d[m]['value']:+.4f} [{d[m]['lo']:+.4f}, {d[m]['hi']:+.4f}]"
                                               f"{'*' if d[m]['significant'] else ''}" for m in names) + " |"
                      for k, d in vs_map.items()]
        lines += ["", f"Chosen: **{confirm['chosen']}**: `{json.dumps(confirm['choice'])}`", ""]
        if confirm.get("note"):  # e.g. a confirmation whose records were restored by hand from an earlier report
            lines += [f"Note: {confirm['note']}", ""]
    tests = [runs[k] for k in sorted(runs) if k.startswith("test/")]
    if tests:
        sets = sorted({s for r in tests for s in r["metrics"] if s != "validation"})
        lines += ["## Test results of the chosen protocol", "", "| seed | set | method | ACC | ECE | NLL |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['seed']} | {s} | {m} | {v['accuracy']:.4f} | {v['ece']:.4f} | {v['nll']:.4f} |"
                  for r in tests for s in sets for m, v in r["metrics"].get(s, {}).items()]
        lines.append("")
    if "test" in state["stages"]:
        # pooled over the seeds, with the intervals of every metric and the paired differences to MAP (the same
        # resampled questions for every method and seed), as the test stage's `swaglora report` computed them
        from swaglora.report import interval_tables

        report_dir = Path(state["stages"]["test"]["report"])
        pooled = interval_tables(json.loads((report_dir / "results.json").read_text()))
        lines += [line.replace("## Intervals", "### Intervals", 1).replace("### `", "#### `", 1) if line.startswith("#") else line
                  for line in pooled]
        lines += [f"Full report over the seeds (OOD detection, selective prediction, figures): `{report_dir}/report.md`.", ""]
    # a stage's time is the sum of its runs' (each run's training, or its recollection or copy, and its evaluation,
    # as recorded when it finished): correct across interrupted and resumed processes, which the stage's own clock
    # is not; the work of an interrupted training's unfinished epoch is not counted
    times: dict[str, list[float]] = {}
    for key, record in runs.items():
        times.setdefault(key.split("/")[0], []).append(record["seconds"])
    lines += ["## Time per stage", "", "Sum of the stage's runs (training or recollection, and evaluation), as each "
              "recorded it; a training interrupted and resumed counts from its last resume.", "",
              "| stage | runs | minutes |", "|---|---:|---:|"]
    lines += [f"| {k} | {len(v)} | {sum(v) / 60:.1f} |" for k, v in times.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _parse_candidates(given: list[str], factors: dict, parser: argparse.ArgumentParser) -> dict[str, dict[str, str]]:
    """``--candidate NAME=JSON`` values, checked against the grid before anything runs."""
    candidates: dict[str, dict[str, str]] = {}
    for text in given:
        name, sep, spec = text.partition("=")
        if not sep or not name or name in ("base", "screened") or name in candidates or "/" in name:
            parser.error(f"--candidate {text!r}: expected NAME=JSON with a new name other than base and screened")
        try:
            values = json.loads(spec)
        except json.JSONDecodeError as err:
            parser.error(f"--candidate {name}: the values are not JSON ({err})")
        if not isinstance(values, dict) or not values:
            parser.error(f"--candidate {name}: expected a JSON object of factor: value")
        for factor, label in values.items():
            if factor not in factors:
                parser.error(f"--candidate {name}: unknown factor {factor!r} (the grid's: {', '.join(factors)})")
            labels = [lab for lab, _ in factors[factor][2]]
            if label not in labels:
                parser.error(f"--candidate {name}: {factor} has no value {label!r} (its values: {labels})")
        candidates[name] = values
    return candidates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/study", help="study directory (resumable)")
    parser.add_argument("--stage", default="all", choices=["screen", "confirm", "test", "report", "all"])
    parser.add_argument("--seeds", default="0,1,2", help="confirm/test seeds; the screen uses the first")
    parser.add_argument("--grid", default="full", choices=["full", "tiny"])
    parser.add_argument("--report", default="docs/protocol-study.md")
    parser.add_argument("--state", type=Path, default=None,
                        help="the study's state file (every finished run's metrics, each stage's choice; default "
                             "OUT/study.json). Kept in the repository, it carries a study across machines: finished "
                             "runs are not redone, except those whose predictions a later step reads")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=JSON",
                        help="one more protocol for the confirmation, as factor values over the base, e.g. "
                             "'defaults={\"placement\": \"all, q_proj+v_proj\", \"samples\": \"S=15\"}' (the "
                             "product's defaults, chosen on another task); repeatable")
    args, base = parser.parse_known_args(argv)
    factors = TINY if args.grid == "tiny" else FACTORS
    candidates = _parse_candidates(args.candidate, factors, parser)
    if not base:  # the study's protocol: full ARC-Easy train (2,251) and validation (570) splits
        base = ["--task", "arc_easy", "--train-limit", "0", "--val-limit", "0", "--eval-limit", "0", "--members", "1",
                "--methods", "map,swag,multiswag"]
    base = BASE_PROTOCOL + base
    study = Study(Path(args.out), base, factors, [int(s) for s in args.seeds.split(",")], args.state, candidates)
    stages = ["screen", "confirm", "test", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        start = time.perf_counter()
        if stage == "report":
            print(f"report: {write_report(study, Path(args.report))}")
        else:
            getattr(study, stage)()
        print(f"stage {stage}: {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
