"""Training checkpoints: everything needed to continue a run exactly, as safetensors + JSON (no pickle).

A checkpoint is a directory ``<root>/<step>/`` holding ``state.safetensors`` (every tensor) and
``state.json`` (everything else). It is written into a temporary directory that is renamed into place
only when both files are complete, so a crash while writing leaves the previous checkpoints untouched;
``state.json`` repeats the ``save_id`` stored in the tensors file's header, so mixed or damaged files
are detected on load and :func:`latest` falls back to the previous checkpoint. The newest ``keep``
checkpoints are kept.

Optimiser state is flattened by hand (``optim/<param index>/<key>`` tensors, the rest as JSON) because
``torch.save`` would pickle it.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import _fsync_directory, atomic_save_safetensors, atomic_write_json, load_safetensors, make_temp_dir, read_json

__all__ = ["Checkpoint", "save", "latest", "steps", "optimizer_state", "load_optimizer_state"]

FORMAT_VERSION = 1
TENSORS, META = "state.safetensors", "state.json"


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix/`` (prefix stripped)."""
        start = prefix + "/"
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}


def steps(root: Path) -> list[int]:
    """Steps of the checkpoint directories under ``root``, newest first (temporary directories start with '.')."""
    if not root.is_dir():
        return []
    return sorted((int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def save(root: Path, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``root/<step>`` atomically, then delete all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / str(step)
    tmp = make_temp_dir(f".tmp-{step}-", root)
    try:
        save_id = uuid.uuid4().hex
        atomic_save_safetensors(tmp / TENSORS, tensors, {"save_id": save_id})
        # written last: a complete state.json with the matching save_id marks a complete checkpoint
        atomic_write_json(tmp / META, {**meta, "format_version": FORMAT_VERSION, "step": step, "save_id": save_id})
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after resuming): replace it
            old = root / f".old-{step}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_directory(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something above failed
    for old_step in steps(root)[keep:]:
        shutil.rmtree(root / str(old_step), ignore_errors=True)
    for stale in root.glob(".*"):  # temporary directories of writes that were killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load(path: Path) -> Checkpoint:
    """Read one checkpoint directory; ValueError/FileNotFoundError when it is incomplete or damaged."""
    meta = read_json(path / META)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / META}: not a checkpoint of format {FORMAT_VERSION}")
    tensors, header = load_safetensors(path / TENSORS, with_metadata=True)
    if header.get("save_id") != meta.get("save_id"):
        raise ValueError(f"{path}: {TENSORS} and {META} come from different saves")
    return Checkpoint(int(meta["step"]), tensors, meta, path)


def latest(root: Path) -> Checkpoint | None:
    """The newest readable checkpoint under ``root`` (damaged newer ones are reported and skipped), or None."""
    for step in steps(root):
        try:
            return load(root / str(step))
        except (ValueError, FileNotFoundError, KeyError) as e:
            print(f"swaglora: skipping damaged checkpoint {root / str(step)}: {e}", file=sys.stderr)
    return None


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as (tensors ``optim/<param>/<key>``, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Inverse of :func:`optimizer_state` (JSON turned tuples into lists: restored for the groups)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in ckpt.group("optim").items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in ckpt.meta["optimizer"]["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in ckpt.meta["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
