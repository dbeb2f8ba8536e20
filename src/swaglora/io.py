"""Crash-safe file writing and strict reading (JSON and safetensors; no pickle anywhere).

Every writer goes through :func:`_atomic_replace`: the content is written to a temporary
file in the destination's directory, fsync'ed, then moved over the destination with
``os.replace`` (atomic on POSIX and Windows). If anything fails, the temporary file is
removed and a previous file at ``path`` is left untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PathLike = str | os.PathLike


def _fsync_directory(directory: Path) -> None:
    """Persist a rename on POSIX; silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_temp_dir(prefix: str, parent: PathLike) -> Path:
    """A temporary directory in ``parent`` (to be renamed into place) with the process umask's permissions,
    not mkdtemp's 0700, so finished runs can be shared like any other files."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def apply_umask(directory: PathLike) -> None:
    """Give every file under ``directory`` the process umask's permissions (safetensors writes 0600)."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def _atomic_replace(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the temp file and ``os.replace`` it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp and safetensors make 0600; give the usual permissions
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_replace(path, write)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (raises TypeError before touching the file)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses them)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"safetensors value for {name!r} is {type(t).__name__}, not a Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def atomic_save_safetensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    tensors = _unshare(tensors)
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    _atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_safetensors(
    path: PathLike, device: str | torch.device = "cpu", *, with_metadata: bool = False
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file; a truncated/corrupt file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: all mean "cannot use this file"
        raise ValueError(
            f"cannot read safetensors file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    return (tensors, metadata) if with_metadata else tensors


def read_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse JSON file {path}: {e}") from e
