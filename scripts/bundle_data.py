#!/usr/bin/env python
"""Copy the project's shared MCQA data into the package as gzip files.

Usage::

    python scripts/bundle_data.py /work/shared/data [--dest src/swaglora/data_files]

Every ``<source>/<task>/<split>.jsonl`` becomes
``<dest>/<task>/<split>.jsonl.gz``. The bytes are not changed: the
decompressed file is identical to the source, line for line. The gzip header
has no file name and a zero timestamp, so rerunning the script on the same
input gives byte-identical archives (no spurious git diffs).

The attribution file ``<dest>/README.md`` is written by hand and is not
touched here.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
from pathlib import Path

DEFAULT_DEST = Path(__file__).resolve().parents[1] / "src" / "swaglora" / "data_files"


def compress(data: bytes) -> bytes:
    """Gzip ``data`` at level 9 with a reproducible header (no name, mtime 0)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buffer.getvalue()


def bundle(source: Path, dest: Path) -> list[tuple[str, int, int]]:
    """Compress every ``<task>/<split>.jsonl`` under ``source`` into ``dest``.

    Args:
        source: Folder with one sub-folder per task holding ``<split>.jsonl`` files.
        dest: Package data folder to write ``<task>/<split>.jsonl.gz`` into.

    Returns:
        One ``(relative path, rows, compressed bytes)`` tuple per file written.
    """
    files = sorted(source.glob("*/*.jsonl"))
    if not files:
        raise SystemExit(f"no <task>/<split>.jsonl files under {source}")
    written = []
    for src in files:
        data = src.read_bytes()
        packed = compress(data)
        if gzip.decompress(packed) != data:  # paranoia: the round trip must be exact
            raise SystemExit(f"round trip failed for {src}")
        out = dest / src.parent.name / (src.name + ".gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(packed)
        rows = sum(1 for line in data.splitlines() if line.strip())
        written.append((str(out.relative_to(dest)), rows, len(packed)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="shared data folder (e.g. /work/shared/data)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"default: {DEFAULT_DEST}")
    args = parser.parse_args(argv)
    total = 0
    for rel, rows, size in bundle(args.source, args.dest):
        total += size
        print(f"{rel:40s} {rows:6d} rows {size / 1e6:7.2f} MB")
    print(f"{'total':40s} {'':11s} {total / 1e6:7.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
