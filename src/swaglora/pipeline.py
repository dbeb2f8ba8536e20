"""The one train/evaluate pipeline that every method goes through.

config -> data (:mod:`selection`) -> model + LoRA -> train members, collecting posteriors (:mod:`members`) ->
save (:mod:`rundir`) -> draw S parameter sets per table row -> predict on every evaluation set -> metrics
files (:mod:`evaluate`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import validate
from .config import RunConfig
from .distributed import current
from .evaluate import evaluate_run
from .members import open_session, train_members
from .rundir import save_config

__all__ = ["run", "prepare_run_dir"]


def run(cfg: RunConfig, run_dir: Path, progress: bool = True, overwrite: bool = False,
        plan: validate.Plan | None = None, abstain_risk: float | None = None) -> list[dict]:
    """The main job: train the members, evaluate every row on every set, write the results.

    ``plan``: what :func:`swaglora.validate.preflight` returned for this job (checked here when None);
    ``abstain_risk``: store each row's abstention threshold for this risk (:func:`evaluate.evaluate_run`).
    """
    dist = current()
    plan = plan or validate.preflight(cfg, "run", run_dir, overwrite=overwrite)
    rows = plan.rows
    prepare_run_dir(cfg, run_dir, overwrite, plan.data_sha256)
    session = open_session(cfg)
    train_members(session, run_dir, cfg.posterior.member_indices, rows, progress=progress)
    if not dist.is_main:  # under accelerate launch: training is data parallel, evaluation runs once
        return []
    return evaluate_run(session, [run_dir], rows, run_dir, progress=progress, abstain_risk=abstain_risk)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, overwrite: bool, data_sha256: dict[str, str] | None = None) -> None:
    """``--overwrite`` and the config file, done by the main process only (others wait for it).

    Only a directory carrying the run marker is ever deleted or written into (:func:`validate.check_out_dir`).
    """
    dist = current()
    if dist.is_main:
        validate.check_out_dir(run_dir, overwrite)
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        save_config(cfg, run_dir, data_sha256)
    dist.wait()
