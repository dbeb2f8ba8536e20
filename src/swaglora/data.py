"""Multiple-choice QA examples: loading, validation and the bundled tasks.

Every dataset swaglora touches becomes a list of :class:`MCQExample`. Sources:

* JSONL files (``.jsonl`` or ``.jsonl.gz``) in the schema below, via :func:`load_jsonl`;
* the bundled tasks (``obqa``, ``arc_easy``, ``arc_challenge``, ``cqa``, ``mmlu``) and
  MMLU subsets (``mmlu:<group or subject>``), via :func:`load_task`;
* Hugging Face hub datasets (``hf:<id>[:<config>]``), converted by :func:`convert_hf_row`.

:func:`resolve_dataset` accepts any of these spellings. JSONL schema, one object a line::

    {"id": "q1", "question": "...", "choices": ["...", "..."], "labels": ["A", "B"],
     "answer": "B", "subject": "optional"}

(``answer`` is optional only for questions to predict: ``load_jsonl(path, answers=False)``.)

Loading is all-or-nothing: any invalid line raises :class:`DataError` naming the source,
the 1-based line number and the field.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import random
import string
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "BLOB_SHIFT_SETS", "MMLU_CATEGORIES", "MMLU_GROUPS", "MMLU_SUBJECTS", "TASKS",
    "DataError", "MCQExample", "TaskInfo", "TaskSplits",
    "convert_hf_row", "hub_examples", "limit", "load_jsonl", "load_task", "mmlu_subjects", "records_to_examples",
    "resolve_dataset", "split_validation", "task_split_sizes", "task_splits",
]

logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
_REQUIRED = ("id", "question", "choices", "labels", "answer")
_ALLOWED = (*_REQUIRED, "subject")


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


def _record_to_example(obj: Any, source: str, line: int, answers: bool = True) -> MCQExample:
    """Validate one decoded record against the schema and build the example (``answers=False``: the
    ``answer`` field may be left out)."""

    def fail(message: str, field: str | None = None) -> DataError:
        return DataError(message, source=source, line=line, field=field)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {_json_type(obj)}")
    for key in obj:
        if key not in _ALLOWED:
            raise fail(f"unknown field (allowed: {', '.join(_ALLOWED)})", key)
    for key in _REQUIRED:
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


def _build(items: Iterable[tuple[int, MCQExample]], source: str) -> list[MCQExample]:
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
    return _build(((line, _record_to_example(record, source, line, answers)) for line, record in records), source)


# --------------------------------------------------------------------------- bundled tasks

@dataclass(frozen=True)
class TaskInfo:
    """A bundled task: its splits (file names) and where the data comes from."""

    name: str
    description: str
    splits: tuple[str, ...]
    source: str
    license: str


@dataclass(frozen=True)
class TaskSplits:
    """Which bundled split plays the train / validation / test role for a task."""

    train: str
    validation: str
    test: str


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("arc_challenge", "ARC-Challenge: hard grade-school science questions (3-5 options)",
             ("train", "validation", "test"), "AllenAI ARC-V1-Feb2018 (Clark et al., 2018)",
             "CC BY-SA 4.0"),
    TaskInfo("arc_easy", "ARC-Easy: grade-school science questions (3-5 options)",
             ("train", "validation", "test"), "AllenAI ARC-V1-Feb2018 (Clark et al., 2018)",
             "CC BY-SA 4.0"),
    TaskInfo("cqa", "CommonsenseQA v1.11: commonsense questions (5 options; no labelled test)",
             ("train", "validation"), "Talmor et al., 2019, random split", "MIT"),
    TaskInfo("mmlu", "MMLU: 57 subjects (4 options); evaluation only, 5 dev rows per subject",
             ("dev", "validation", "test"), "Hendrycks et al., 2021, data.tar release", "MIT"),
    TaskInfo("obqa", "OpenBookQA: elementary science questions (4 options)",
             ("train", "validation", "test"), "AllenAI OpenBookQA v1 (Mihaylov et al., 2018)",
             "Apache-2.0"),
)}

# Role -> split. CQA's public test file has no labels, so its "test" role is the validation
# split. MMLU is an evaluation task: its "train" role is the 285-row 5-shot dev split.
_TASK_SPLITS = {"cqa": TaskSplits("train", "validation", "validation"),
                "mmlu": TaskSplits("dev", "validation", "test")}

# The BLoB protocol (Wang et al., 2024): fine-tune on OBQA, evaluate under shift on these.
BLOB_SHIFT_SETS = ("arc_challenge", "arc_easy", "mmlu:college_chemistry", "mmlu:college_physics")

# The one MMLU table: subject -> (Hendrycks subcategory, Hendrycks category). Copied from
# categories.py of the official MMLU repository (hendrycks/test); categories are renamed
# "STEM" -> stem, "social sciences" -> social_sciences, "other (business, health, misc.)" -> other.
MMLU_SUBJECTS: dict[str, tuple[str, str]] = {
    "abstract_algebra": ("math", "stem"), "anatomy": ("health", "other"),
    "astronomy": ("physics", "stem"), "business_ethics": ("business", "other"),
    "clinical_knowledge": ("health", "other"), "college_biology": ("biology", "stem"),
    "college_chemistry": ("chemistry", "stem"),
    "college_computer_science": ("computer_science", "stem"),
    "college_mathematics": ("math", "stem"), "college_medicine": ("health", "other"),
    "college_physics": ("physics", "stem"), "computer_security": ("computer_science", "stem"),
    "conceptual_physics": ("physics", "stem"), "econometrics": ("economics", "social_sciences"),
    "electrical_engineering": ("engineering", "stem"),
    "elementary_mathematics": ("math", "stem"), "formal_logic": ("philosophy", "humanities"),
    "global_facts": ("other", "other"), "high_school_biology": ("biology", "stem"),
    "high_school_chemistry": ("chemistry", "stem"),
    "high_school_computer_science": ("computer_science", "stem"),
    "high_school_european_history": ("history", "humanities"),
    "high_school_geography": ("geography", "social_sciences"),
    "high_school_government_and_politics": ("politics", "social_sciences"),
    "high_school_macroeconomics": ("economics", "social_sciences"),
    "high_school_mathematics": ("math", "stem"),
    "high_school_microeconomics": ("economics", "social_sciences"),
    "high_school_physics": ("physics", "stem"),
    "high_school_psychology": ("psychology", "social_sciences"),
    "high_school_statistics": ("math", "stem"),
    "high_school_us_history": ("history", "humanities"),
    "high_school_world_history": ("history", "humanities"),
    "human_aging": ("health", "other"), "human_sexuality": ("culture", "social_sciences"),
    "international_law": ("law", "humanities"), "jurisprudence": ("law", "humanities"),
    "logical_fallacies": ("philosophy", "humanities"),
    "machine_learning": ("computer_science", "stem"), "management": ("business", "other"),
    "marketing": ("business", "other"), "medical_genetics": ("health", "other"),
    "miscellaneous": ("other", "other"), "moral_disputes": ("philosophy", "humanities"),
    "moral_scenarios": ("philosophy", "humanities"), "nutrition": ("health", "other"),
    "philosophy": ("philosophy", "humanities"), "prehistory": ("history", "humanities"),
    "professional_accounting": ("other", "other"), "professional_law": ("law", "humanities"),
    "professional_medicine": ("health", "other"),
    "professional_psychology": ("psychology", "social_sciences"),
    "public_relations": ("politics", "social_sciences"),
    "security_studies": ("politics", "social_sciences"),
    "sociology": ("culture", "social_sciences"),
    "us_foreign_policy": ("politics", "social_sciences"), "virology": ("health", "other"),
    "world_religions": ("philosophy", "humanities"),
}
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
# Finer shift groups: the subcategories above that are offered as ``mmlu:<group>``.
_SHIFT_GROUPS = ("computer_science", "engineering", "law", "health", "physics", "chemistry",
                 "math", "biology", "economics", "philosophy", "history")
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(s for s, (sub, cat) in MMLU_SUBJECTS.items() if group in (sub, cat))
    for group in (*MMLU_CATEGORIES, *_SHIFT_GROUPS)
}


def mmlu_subjects(selector: str) -> tuple[str, ...]:
    """Subjects selected by an MMLU group name or a single subject name.

    Raises:
        DataError: ``selector`` is neither a group nor a subject; lists both.
    """
    if selector in MMLU_GROUPS:
        return MMLU_GROUPS[selector]
    if selector in MMLU_SUBJECTS:
        return (selector,)
    raise DataError(f"Unknown MMLU group or subject {selector!r}. Groups: "
                    f"{', '.join(MMLU_GROUPS)}. Subjects: {', '.join(MMLU_SUBJECTS)}")


def _task_info(name: str) -> TaskInfo:
    base = name.split(":", 1)[0]
    if base not in TASKS or (":" in name and base != "mmlu"):
        raise DataError(f"Unknown task {name!r}. Available: {', '.join(sorted(TASKS))}")
    return TASKS[base]


def task_splits(name: str) -> TaskSplits:
    """Train/validation/test split names of a bundled task (``mmlu:<x>`` uses mmlu's).

    OBQA and ARC use their own three splits. CQA has no labelled test, so test is its
    validation split. MMLU is evaluation-only: train is the 285-row dev split.
    """
    info = _task_info(name)
    return _TASK_SPLITS.get(info.name, TaskSplits("train", "validation", "test"))


def _bundled_path(task: str, split: str) -> Traversable:
    return resources.files("swaglora") / "data_files" / task / f"{split}.jsonl.gz"


@functools.lru_cache(maxsize=None)
def _load_bundled(task: str, split: str) -> tuple[MCQExample, ...]:
    with resources.as_file(_bundled_path(task, split)) as path:
        return tuple(load_jsonl(path))


def load_task(name: str, split: str) -> list[MCQExample]:
    """Load a bundled task split; ``name`` may be ``mmlu:<group or subject>``.

    Args:
        name: A key of :data:`TASKS` or ``mmlu:<group|subject>``.
        split: A split of that task, or a role (``train``/``validation``/``test``)
            resolved with :func:`task_splits` (e.g. ``mmlu`` train -> ``dev``).

    Raises:
        DataError: Unknown task, subset or split; the message lists the valid ones.
    """
    info = _task_info(name)
    subjects = mmlu_subjects(name.split(":", 1)[1]) if ":" in name else None
    if split not in info.splits:
        roles = task_splits(info.name)
        if split not in ("train", "validation", "test"):
            raise DataError(f"Unknown split {split!r} for task {info.name!r}. Available: "
                            f"{', '.join(info.splits)} (or roles train, validation, test)")
        logger.info("task %s: using split %r for role %r", info.name, getattr(roles, split), split)
        split = getattr(roles, split)
    examples = _load_bundled(info.name, split)
    if subjects is not None:
        wanted = set(subjects)
        return [ex for ex in examples if ex.subject in wanted]
    return list(examples)


def task_split_sizes() -> dict[str, dict[str, int]]:
    """Row counts of every bundled task split (counts non-blank lines; no parsing)."""
    sizes: dict[str, dict[str, int]] = {}
    for name, info in sorted(TASKS.items()):
        sizes[name] = {}
        for split in info.splits:
            with resources.as_file(_bundled_path(name, split)) as path, gzip.open(path) as fh:
                sizes[name][split] = sum(1 for line in fh if line.strip())
    return sizes


# --------------------------------------------------------------------------- hub datasets

def convert_hf_row(dataset_id: str, row: Mapping[str, Any], index: int) -> MCQExample:
    """Convert and validate one hub row (``index`` is its 0-based position).

    Layouts are recognised by their keys: OpenBookQA (``question_stem``, ``choices{text,label}``,
    ``answerKey``), ARC and CommonsenseQA (``question``, ``choices{text,label}``,
    ``answerKey``; any labels such as ARC's ``"1".."5"`` are mapped to letters by position
    and the answer with them), MMLU (``question``, ``subject``, ``choices`` list, integer
    ``answer``), or rows already in our schema.

    Raises:
        DataError: The row's layout is not recognised (the message names the dataset and
            the row's keys) or the converted row is invalid.
    """
    return _record_to_example(_hf_record(dataset_id, row, index), f"hf:{dataset_id}", index + 1)


def _hf_record(dataset_id: str, row: Mapping[str, Any], index: int) -> dict[str, Any]:
    keys = set(row)
    row_id = str(row.get("id") or f"{dataset_id}/{index}")
    if keys <= set(_ALLOWED) and set(_REQUIRED) <= keys:  # already our schema
        return {k: v for k, v in row.items() if not (k == "subject" and v is None)}
    choices = row.get("choices")
    if "answerKey" in keys and isinstance(choices, Mapping) and {"text", "label"} <= set(choices):
        texts, raw_labels = list(choices["text"]), [str(label) for label in choices["label"]]
        key = str(row["answerKey"])
        if not key:
            raise DataError("row has no answer (an unlabelled test split?)",
                            source=f"hf:{dataset_id}", line=index + 1, field="answerKey")
        if key not in raw_labels:
            raise DataError(f"{key!r} is not one of labels {raw_labels}",
                            source=f"hf:{dataset_id}", line=index + 1, field="answerKey")
        labels = list(LETTERS[: len(texts)])
        question = row.get("question_stem", row.get("question"))
        return {"id": row_id, "question": question, "choices": texts, "labels": labels,
                "answer": labels[raw_labels.index(key)]}
    if {"question", "choices", "answer"} <= keys and isinstance(row["answer"], int):
        texts = list(row["choices"])
        labels = list(LETTERS[: len(texts)])
        if not 0 <= row["answer"] < len(texts):
            raise DataError(f"index {row['answer']} out of range for {len(texts)} choices",
                            source=f"hf:{dataset_id}", line=index + 1, field="answer")
        record = {"id": row_id, "question": row["question"], "choices": texts,
                  "labels": labels, "answer": labels[row["answer"]]}
        if row.get("subject"):
            record["subject"] = row["subject"]
        return record
    raise DataError(f"unrecognised row layout with keys {sorted(keys)}; supported: "
                    "allenai/openbookqa, allenai/ai2_arc, tau/commonsense_qa, cais/mmlu, "
                    "or swaglora's JSONL schema", source=f"hf:{dataset_id}", line=index + 1)


def hub_examples(dataset_id: str, rows: Iterable[Mapping[str, Any]]) -> list[MCQExample]:
    """Convert and validate hub rows (e.g. a ``datasets.Dataset``) into examples."""
    return _build(((i + 1, convert_hf_row(dataset_id, row, i)) for i, row in enumerate(rows)),
                  f"hf:{dataset_id}")


def _load_hub(spec: str, split: str) -> list[MCQExample]:
    dataset_id, _, config = spec.removeprefix("hf:").partition(":")
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError as exc:
        raise DataError(f"{spec}: the Hugging Face 'datasets' library is not installed; "
                        "run `pip install swaglora[hub]`") from exc
    try:
        rows = datasets.load_dataset(dataset_id, config or None, split=split)
    except Exception as exc:  # network, unknown id/config/split: re-raise with context
        raise DataError(f"cannot load split {split!r}: {exc}", source=spec) from exc
    return hub_examples(dataset_id, rows)


# --------------------------------------------------------------------------- specs & subsets

def resolve_dataset(spec: str, split: str) -> list[MCQExample]:
    """Load examples from a dataset spec.

    Args:
        spec: A bundled task (``obqa``), ``mmlu:<group|subject>``, a ``.jsonl``/``.jsonl.gz``
            path (``split`` is then ignored), or ``hf:<dataset id>[:<config>]``.
        split: Split (or role, for bundled tasks) to load.

    Raises:
        DataError: The spec matches nothing, or loading or validation fails.
    """
    if spec.startswith("hf:"):
        return _load_hub(spec, split)
    if spec in TASKS or spec.startswith("mmlu:"):
        return load_task(spec, split)
    if spec.endswith((".jsonl", ".jsonl.gz")) or Path(spec).exists():
        return load_jsonl(spec)
    raise DataError(f"Unknown dataset {spec!r}. Use a bundled task ({', '.join(sorted(TASKS))}),"
                    " mmlu:<group|subject>, a .jsonl/.jsonl.gz file, or hf:<id>[:<config>]")


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
