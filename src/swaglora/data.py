"""Multiple-choice QA examples: the :class:`MCQExample` record, its validation, JSONL files, and seeded
subsets and validation splits. Where examples come from (bundled tasks, MMLU groups, the hub) is
:mod:`swaglora.tasks`.

JSONL files (``.jsonl`` or ``.jsonl.gz``, or ``-`` for standard input) are read by :func:`load_jsonl`;
schema, one object a line::

    {"id": "q1", "question": "...", "choices": ["...", "..."], "labels": ["A", "B"],
     "answer": "B", "subject": "optional"}

(``answer`` is optional only for questions to predict: ``load_jsonl(path, answers=False)``.)

Loading is all-or-nothing: any invalid line raises :class:`DataError` naming the source,
the 1-based line number and the field.
"""

from __future__ import annotations

import gzip
import json
import random
import string
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ALLOWED_FIELDS", "LETTERS", "REQUIRED_FIELDS", "DataError", "MCQExample", "limit", "load_jsonl",
           "record_to_example", "records_to_examples", "split_validation", "validated"]

LETTERS = string.ascii_uppercase
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
REQUIRED_FIELDS = ("id", "question", "choices", "labels", "answer")
ALLOWED_FIELDS = (*REQUIRED_FIELDS, "subject")


class DataError(ValueError):
    """Invalid or unavailable data; the message names source, 1-based line and field.

    Example: ``data.jsonl:7: field 'answer': 'E' is not one of labels ['A', 'B', 'C', 'D']``.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.message, self.source, self.line, self.field = message, source, line, field
        where = "".join(f"{p}:" for p in (source, line) if p is not None)
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where} {what}{message}" if where else f"{what}{message}")


@dataclass(frozen=True)
class MCQExample:
    """One multiple-choice question; ``labels`` are always ``A, B, C, ...``; ``answer`` is None only for a
    question to predict whose answer is unknown."""

    id: str
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer: str | None
    subject: str | None = None
    line: int | None = field(default=None, compare=False)  # 1-based line of its source file (for messages)

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.choices) != len(self.labels) or (self.answer is not None and self.answer not in self.labels):
            raise ValueError(f"inconsistent MCQExample {self.id!r}: {len(self.choices)} choices, "
                             f"labels {list(self.labels)}, answer {self.answer!r}")

    @property
    def answer_index(self) -> int:
        """0-based position of the correct choice (ValueError when the answer is unknown)."""
        if self.answer is None:
            raise ValueError(f"question {self.id!r} has no answer")
        return self.labels.index(self.answer)

    @property
    def n_choices(self) -> int:
        """Number of answer options."""
        return len(self.choices)


# --------------------------------------------------------------------------- validation

def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def record_to_example(obj: Any, source: str, line: int, answers: bool = True) -> MCQExample:
    """Validate one decoded record against the schema and build the example (``answers=False``: the
    ``answer`` field may be left out)."""

    def fail(message: str, field: str | None = None) -> DataError:
        return DataError(message, source=source, line=line, field=field)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {_json_type(obj)}")
    for key in obj:
        if key not in ALLOWED_FIELDS:
            raise fail(f"unknown field (allowed: {', '.join(ALLOWED_FIELDS)})", key)
    for key in REQUIRED_FIELDS:
        if key not in obj and (answers or key != "answer"):
            raise fail("missing required field", key)
    for key, kind in (("id", "string"), ("question", "string"), ("choices", "array"),
                      ("labels", "array"), ("answer", "string"), ("subject", "string")):
        if key in obj and _json_type(obj[key]) != kind:
            raise fail(f"expected {kind}, got {_json_type(obj[key])}", key)
    for key in ("id", "question", "subject"):
        if key in obj and not obj[key].strip():
            raise fail("must not be empty", key)
    choices, labels, answer = obj["choices"], obj["labels"], obj.get("answer")
    for key, items in (("choices", choices), ("labels", labels)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise fail(f"item {i} expected string, got {_json_type(item)}", key)
    for i, choice in enumerate(choices):
        if not choice.strip():
            raise fail(f"item {i} is empty", "choices")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise fail(f"{len(choices)} choices; need between {MIN_CHOICES} and {MAX_CHOICES}",
                   "choices")
    if len(labels) != len(choices):
        raise fail(f"{len(labels)} labels for {len(choices)} choices", "labels")
    if labels != list(LETTERS[: len(choices)]):
        raise fail(f"{labels} must be {list(LETTERS[: len(choices)])} (letters in order)",
                   "labels")
    if answer is not None and answer not in labels:
        raise fail(f"{answer!r} is not one of labels {labels}", "answer")
    return MCQExample(id=obj["id"], question=obj["question"], choices=tuple(choices),
                      labels=tuple(labels), answer=answer, subject=obj.get("subject"), line=line)


def validated(items: Iterable[tuple[int, MCQExample]], source: str) -> list[MCQExample]:
    """Collect validated ``(line, example)`` pairs; reject duplicate ids and empty input."""
    examples: list[MCQExample] = []
    first_line: dict[str, int] = {}
    for line, example in items:
        if example.id in first_line:
            raise DataError(f"duplicate id {example.id!r} (lines {first_line[example.id]} and "
                            f"{line})", source=source, line=line, field="id")
        first_line[example.id] = line
        examples.append(example)
    if not examples:
        raise DataError("no examples (the file is empty or has only blank lines)", source=source)
    return examples


def _read_lines(path: Path, source: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line, text)`` for the non-blank lines of a .jsonl(.gz) file, or of standard input
    for the path ``-``."""
    if str(path) == "-":
        yield from _decoded(sys.stdin.buffer, source)
        return
    if path.is_dir():
        raise DataError("is a directory; give a .jsonl or .jsonl.gz file", source=source)
    if not path.is_file():
        raise DataError(f"file not found: {path.resolve()}", source=source)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            yield from _decoded(handle, source)
    except (OSError, EOFError) as exc:  # bad gzip, truncated
        raise DataError(f"cannot read file: {exc}", source=source) from exc


def _decoded(handle: Iterable[bytes], source: str) -> Iterator[tuple[int, str]]:
    for line, raw in enumerate(handle, start=1):
        try:  # a UTF-8 byte order mark at the start of the file is allowed
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text (byte {raw[exc.start]:#x} at column {exc.start + 1}); "
                            "save the file as UTF-8", source=source, line=line) from None
        if text.strip():
            yield line, text


def load_jsonl(path: str | Path, answers: bool = True) -> list[MCQExample]:
    """Load and validate a ``.jsonl`` or ``.jsonl.gz`` file of MCQA examples.

    Args:
        path: File in the schema described in the module docstring; ``-`` reads standard input.
        answers: False for questions to predict: ``answer`` may then be left out (None).

    Returns:
        The examples in file order (blank lines skipped).

    Raises:
        DataError: The file is missing, unreadable, empty, or any line is invalid.
    """
    source = "<stdin>" if str(path) == "-" else str(path)
    return records_to_examples(_records(Path(path), source), source, answers)


def _records(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    for line, text in _read_lines(path, source):
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc}", source=source, line=line) from exc


def records_to_examples(records: Iterable[tuple[int, Any]], source: str, answers: bool = True) -> list[MCQExample]:
    """Validate decoded ``(1-based line, record)`` pairs as :func:`load_jsonl` does (``answers=False``:
    ``answer`` optional) and build the examples; errors name ``source`` and the line."""
    return validated(((line, record_to_example(record, source, line, answers)) for line, record in records), source)


def split_validation(train: Sequence[MCQExample], fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[MCQExample], list[MCQExample]]:
    """Hold out a seeded, reproducible ``fraction`` of ``train`` as validation.

    Both parts keep the input order. At least one example goes to each part.

    Raises:
        ValueError: ``fraction`` not in (0, 1) or fewer than 2 examples.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(train) < 2:
        raise ValueError(f"need at least 2 examples to split, got {len(train)}")
    n_val = min(max(1, round(len(train) * fraction)), len(train) - 1)
    held = set(random.Random(seed).sample(range(len(train)), n_val))
    return ([ex for i, ex in enumerate(train) if i not in held],
            [ex for i, ex in enumerate(train) if i in held])


def limit(examples: Sequence[MCQExample], n: int | None,
          seed: int = 0) -> list[MCQExample]:
    """A seeded random subset of ``n`` examples, in seeded-shuffled order.

    Returns all examples, in their original order, when ``n`` is None or ``n >= len``.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return random.Random(seed).sample(list(examples), n)
