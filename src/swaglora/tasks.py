"""Where examples come from: the bundled tasks (``obqa``, ``arc_easy``, ``arc_challenge``, ``cqa``, ``mmlu``),
MMLU groups and subjects (``mmlu:<group or subject>``), BLoB's shift sets, and Hugging Face hub datasets
(``hf:<id>[:<config>]``, converted by :func:`convert_hf_row`). :func:`resolve_dataset` accepts any of these
spellings and JSONL paths (:func:`swaglora.data.load_jsonl`).
"""

from __future__ import annotations

import functools
import gzip
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import ALLOWED_FIELDS, LETTERS, REQUIRED_FIELDS, DataError, MCQExample, load_jsonl, record_to_example, validated

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "BLOB_SHIFT_SETS", "MMLU_CATEGORIES", "MMLU_GROUPS", "MMLU_SUBJECTS", "TASKS", "TaskInfo", "TaskSplits",
    "convert_hf_row", "hub_examples", "load_task", "mmlu_subjects", "resolve_dataset", "task_split_sizes",
    "task_splits",
]

logger = logging.getLogger(__name__)

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
    return record_to_example(_hf_record(dataset_id, row, index), f"hf:{dataset_id}", index + 1)


def _hf_record(dataset_id: str, row: Mapping[str, Any], index: int) -> dict[str, Any]:
    keys = set(row)
    row_id = str(row.get("id") or f"{dataset_id}/{index}")
    if keys <= set(ALLOWED_FIELDS) and set(REQUIRED_FIELDS) <= keys:  # already our schema
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
    return validated(((i + 1, convert_hf_row(dataset_id, row, i)) for i, row in enumerate(rows)),
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

