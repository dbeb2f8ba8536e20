"""Tests for swaglora.data: JSONL validation, bundled tasks, MMLU subsets, hub rows, splits."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from swaglora import data, tasks
from swaglora.data import DataError, MCQExample

BUNDLE = Path(data.__file__).parent / "data_files"
SHARED_CANDIDATES = (Path(__file__).resolve().parents[2] / "shared" / "data",
                     Path("/work/shared/data"))
SHARED = next((p for p in SHARED_CANDIDATES if p.is_dir()), None)

# Row counts from src/swaglora/data_files/README.md.
EXPECTED_SIZES = {
    "obqa": {"train": 4957, "validation": 500, "test": 500},
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
    "cqa": {"train": 9741, "validation": 1221},
    "mmlu": {"dev": 285, "validation": 1531, "test": 14042},
}
# Choices-per-question counts for ARC from the same README.
EXPECTED_ARC_CHOICES = {
    ("arc_easy", "train"): {4: 2241, 3: 6, 5: 4},
    ("arc_easy", "validation"): {4: 567, 3: 1, 5: 2},
    ("arc_easy", "test"): {4: 2365, 3: 7, 5: 4},
    ("arc_challenge", "train"): {4: 1117, 3: 1, 5: 1},
    ("arc_challenge", "validation"): {4: 295, 3: 3, 5: 1},
    ("arc_challenge", "test"): {4: 1165, 3: 4, 5: 3},
}


def row(i: int = 0, n: int = 4, **overrides: object) -> dict:
    """A valid record with ``n`` choices, updated by ``overrides``."""
    record = {"id": f"q{i}", "question": f"Question {i}?",
              "choices": [f"option {k}" for k in range(n)],
              "labels": [chr(ord("A") + k) for k in range(n)], "answer": "B"}
    record.update(overrides)
    return record


def write(tmp_path: Path, lines: list[object], name: str = "data.jsonl") -> Path:
    """Write records (dicts are JSON-encoded, strings written raw) one per line."""
    path = tmp_path / name
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, bad: object, **kwargs: object) -> str:
    """Load a file whose line 3 is ``bad`` (line 2 blank) and return the error message."""
    path = write(tmp_path, [row(0), "", bad, row(9)], **kwargs)
    with pytest.raises(DataError) as info:
        data.load_jsonl(path)
    return str(info.value)


def assert_located(message: str, line: int, field: str | None) -> None:
    assert "data.jsonl" in message
    assert f":{line}:" in message
    if field is not None:
        assert f"field '{field}'" in message


# --------------------------------------------------------------------------- load_jsonl errors

def test_malformed_json(tmp_path):
    msg = load_error(tmp_path, '{"id": "x", "question": ')
    assert_located(msg, 3, None)
    assert "malformed JSON" in msg and "Expecting value" in msg


def test_line_not_an_object(tmp_path):
    msg = load_error(tmp_path, "[1, 2, 3]")
    assert_located(msg, 3, None)
    assert "expected a JSON object, got array" in msg


@pytest.mark.parametrize("field", ["id", "question", "choices", "labels", "answer"])
def test_missing_field(tmp_path, field):
    bad = row(1)
    del bad[field]
    msg = load_error(tmp_path, bad)
    assert_located(msg, 3, field)
    assert "missing" in msg


@pytest.mark.parametrize(("field", "value", "expected", "got"), [
    ("id", 7, "string", "integer"),
    ("question", None, "string", "null"),
    ("choices", "A or B", "array", "string"),
    ("labels", {"A": 1}, "array", "object"),
    ("answer", 1, "string", "integer"),
    ("subject", ["x"], "string", "array"),
])
def test_wrong_type(tmp_path, field, value, expected, got):
    msg = load_error(tmp_path, row(1, **{field: value}))
    assert_located(msg, 3, field)
    assert f"expected {expected}, got {got}" in msg


def test_wrong_item_type_in_choices(tmp_path):
    msg = load_error(tmp_path, row(1, choices=["a", 2, "c", "d"]))
    assert_located(msg, 3, "choices")
    assert "item 1 expected string, got integer" in msg


@pytest.mark.parametrize("field", ["id", "question"])
def test_empty_string_field(tmp_path, field):
    msg = load_error(tmp_path, row(1, **{field: "  "}))
    assert_located(msg, 3, field)
    assert "empty" in msg


def test_empty_choice(tmp_path):
    msg = load_error(tmp_path, row(1, choices=["a", "", "c", "d"]))
    assert_located(msg, 3, "choices")
    assert "item 1 is empty" in msg


def test_unknown_extra_field(tmp_path):
    msg = load_error(tmp_path, row(1, fact="the sun is hot"))
    assert_located(msg, 3, "fact")
    assert "unknown field" in msg


def test_labels_choices_length_mismatch(tmp_path):
    msg = load_error(tmp_path, row(1, labels=["A", "B", "C"]))
    assert_located(msg, 3, "labels")
    assert "3 labels for 4 choices" in msg


def test_too_few_choices(tmp_path):
    msg = load_error(tmp_path, row(1, n=1, answer="A"))
    assert_located(msg, 3, "choices")
    assert "1 choices" in msg and "between 2 and 26" in msg


def test_too_many_choices(tmp_path):
    bad = row(1, choices=[f"c{k}" for k in range(27)], labels=[f"L{k}" for k in range(27)])
    msg = load_error(tmp_path, bad)
    assert_located(msg, 3, "choices")
    assert "27 choices" in msg


@pytest.mark.parametrize("labels", [["1", "2", "3", "4"], ["B", "A", "C", "D"], ["a", "b", "c", "d"]])
def test_labels_not_letters_in_order(tmp_path, labels):
    msg = load_error(tmp_path, row(1, labels=labels, answer=labels[0]))
    assert_located(msg, 3, "labels")
    assert "['A', 'B', 'C', 'D']" in msg


def test_answer_not_in_labels(tmp_path):
    msg = load_error(tmp_path, row(1, answer="E"))
    assert msg == "{}:3: field 'answer': 'E' is not one of labels ['A', 'B', 'C', 'D']".format(
        tmp_path / "data.jsonl")


def test_duplicate_id_names_both_lines(tmp_path):
    msg = load_error(tmp_path, row(0))
    assert_located(msg, 3, "id")
    assert "duplicate id 'q0'" in msg and "lines 1 and 3" in msg


def test_error_has_attributes(tmp_path):
    path = write(tmp_path, [row(0), row(1, answer="Z")])
    with pytest.raises(DataError) as info:
        data.load_jsonl(path)
    assert (info.value.source, info.value.line, info.value.field) == (str(path), 2, "answer")
    assert isinstance(info.value, ValueError)


def test_error_in_gz_file_is_located(tmp_path):
    msg = load_error(tmp_path, row(1, answer="E"), name="data.jsonl.gz")
    assert_located(msg, 3, "answer")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="data.jsonl.*no examples"):
        data.load_jsonl(path)


def test_file_not_found(tmp_path):
    path = tmp_path / "missing" / "data.jsonl"
    with pytest.raises(DataError) as info:
        data.load_jsonl(path)
    assert "not found" in str(info.value) and str(path) in str(info.value)


def test_not_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_text(json.dumps(row(0)) + "\n")
    with pytest.raises(DataError, match="data.jsonl.gz.*cannot read"):
        data.load_jsonl(path)


# --------------------------------------------------------------------------- load_jsonl success

def test_mixed_choice_counts_load(tmp_path):
    records = [row(0, n=3), row(1, n=4, answer="D"), row(2, n=5, answer="E", subject="s")]
    path = write(tmp_path, ["", *records, "   ", ""])
    examples = data.load_jsonl(path)
    assert [ex.n_choices for ex in examples] == [3, 4, 5]
    assert [ex.answer_index for ex in examples] == [1, 3, 4]
    assert examples[2].subject == "s" and examples[0].subject is None
    assert examples[1] == MCQExample("q1", "Question 1?", ("option 0", "option 1", "option 2",
                                     "option 3"), ("A", "B", "C", "D"), "D")
    assert isinstance(examples[0].choices, tuple)


def test_gz_and_plain_identical(tmp_path):
    records = [row(i, n=2 + i % 4) for i in range(10)]
    plain = data.load_jsonl(write(tmp_path, records, name="x.jsonl"))
    packed = data.load_jsonl(write(tmp_path, records, name="x.jsonl.gz"))
    assert plain == packed and len(plain) == 10


def test_example_is_frozen_and_checked():
    ex = MCQExample("a", "q", ["x", "y"], ["A", "B"], "A")
    assert ex.choices == ("x", "y")
    with pytest.raises(AttributeError):
        ex.answer = "B"  # type: ignore[misc]
    with pytest.raises(ValueError):
        MCQExample("a", "q", ("x", "y"), ("A", "B"), "C")


# --------------------------------------------------------------------------- bundled tasks

def test_task_registry():
    assert sorted(tasks.TASKS) == ["arc_challenge", "arc_easy", "cqa", "mmlu", "obqa"]
    for name, info in tasks.TASKS.items():
        assert info.name == name and info.description and info.source and info.license
        assert set(info.splits) == set(EXPECTED_SIZES[name])


def test_task_split_sizes_match_readme():
    assert tasks.task_split_sizes() == EXPECTED_SIZES


@pytest.mark.parametrize(("task", "split"),
                         [(t, s) for t, splits in EXPECTED_SIZES.items() for s in splits])
def test_every_bundled_split_loads(task, split):
    examples = tasks.load_task(task, split)
    assert len(examples) == EXPECTED_SIZES[task][split]
    assert all(isinstance(ex, MCQExample) for ex in examples)
    assert all((ex.subject is not None) == (task == "mmlu") for ex in examples)
    if (task, split) in EXPECTED_ARC_CHOICES:
        assert Counter(ex.n_choices for ex in examples) == EXPECTED_ARC_CHOICES[task, split]
    elif task != "mmlu" or split != "test":
        assert {ex.n_choices for ex in examples} == {5 if task == "cqa" else 4}


def test_bundled_readme_exists():
    text = (BUNDLE / "README.md").read_text()
    for word in ("Apache-2.0", "CC BY-SA 4.0", "MIT", "shared", "compressed", "14042"):
        assert word in text


@pytest.mark.skipif(SHARED is None, reason="shared data folder not available")
def test_bundled_files_equal_shared_originals():
    originals = sorted(SHARED.glob("*/*.jsonl"))
    bundled = sorted(BUNDLE.glob("*/*.jsonl.gz"))
    assert [p.relative_to(SHARED) for p in originals] == [
        p.relative_to(BUNDLE).with_suffix("") for p in bundled]
    for original, packed in zip(originals, bundled):
        assert gzip.decompress(packed.read_bytes()) == original.read_bytes(), packed


def test_task_splits_roles():
    for name in ("obqa", "arc_easy", "arc_challenge"):
        assert tasks.task_splits(name) == tasks.TaskSplits("train", "validation", "test")
    assert tasks.task_splits("cqa") == tasks.TaskSplits("train", "validation", "validation")
    assert tasks.task_splits("mmlu") == tasks.TaskSplits("dev", "validation", "test")
    assert tasks.task_splits("mmlu:physics") == tasks.task_splits("mmlu")
    assert len(tasks.load_task("mmlu", "train")) == 285
    assert len(tasks.load_task("cqa", "test")) == 1221


def test_unknown_task_lists_available():
    with pytest.raises(DataError) as info:
        tasks.load_task("x", "train")
    assert str(info.value) == "Unknown task 'x'. Available: arc_challenge, arc_easy, cqa, mmlu, obqa"
    with pytest.raises(DataError, match="Unknown task"):
        tasks.task_splits("squad")


def test_unknown_split_lists_available():
    with pytest.raises(DataError) as info:
        tasks.load_task("cqa", "dev")
    assert "Unknown split 'dev'" in str(info.value) and "train, validation" in str(info.value)


# --------------------------------------------------------------------------- MMLU subsets

def test_mmlu_categories_partition_all_subjects():
    subjects = {ex.subject for ex in tasks.load_task("mmlu", "test")}
    assert len(subjects) == 57 and subjects == set(tasks.MMLU_SUBJECTS)
    in_categories = [s for c in tasks.MMLU_CATEGORIES for s in tasks.MMLU_GROUPS[c]]
    assert sorted(in_categories) == sorted(subjects)  # each exactly once
    assert set(tasks.MMLU_CATEGORIES) == {"stem", "humanities", "social_sciences", "other"}


def test_mmlu_finer_groups():
    finer = ("computer_science", "engineering", "law", "health", "physics", "chemistry", "math",
             "biology", "economics", "philosophy", "history")
    for group in finer:
        assert tasks.MMLU_GROUPS[group], group
        assert set(tasks.MMLU_GROUPS[group]) <= set(tasks.MMLU_SUBJECTS)
    assert tasks.MMLU_GROUPS["physics"] == ("astronomy", "college_physics", "conceptual_physics",
                                           "high_school_physics")
    assert tasks.MMLU_GROUPS["law"] == ("international_law", "jurisprudence", "professional_law")
    assert "college_physics" in tasks.MMLU_GROUPS["stem"]
    assert "professional_law" in tasks.MMLU_GROUPS["humanities"]


def test_mmlu_single_subject():
    examples = tasks.resolve_dataset("mmlu:college_physics", "test")
    assert len(examples) == 102 and {ex.subject for ex in examples} == {"college_physics"}


def test_mmlu_group_selects_its_subjects():
    examples = tasks.load_task("mmlu:chemistry", "validation")
    assert {ex.subject for ex in examples} == {"college_chemistry", "high_school_chemistry"}


def test_unknown_mmlu_subset_lists_valid():
    with pytest.raises(DataError) as info:
        tasks.resolve_dataset("mmlu:astrology", "test")
    msg = str(info.value)
    assert "astrology" in msg and "stem" in msg and "college_physics" in msg


def test_blob_shift_sets_resolve():
    assert tasks.BLOB_SHIFT_SETS == ("arc_challenge", "arc_easy", "mmlu:college_chemistry",
                                    "mmlu:college_physics")
    assert [len(tasks.resolve_dataset(s, "test")) for s in tasks.BLOB_SHIFT_SETS] == [
        1172, 2376, 100, 102]


# --------------------------------------------------------------------------- resolve_dataset

def test_resolve_path_ignores_split(tmp_path):
    path = write(tmp_path, [row(0), row(1)], name="mine.jsonl.gz")
    assert len(tasks.resolve_dataset(str(path), "whatever")) == 2


def test_resolve_unknown_spec():
    with pytest.raises(DataError, match="Unknown dataset 'nope'.*obqa"):
        tasks.resolve_dataset("nope", "test")


def test_resolve_hub_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match=r"pip install swaglora\[hub\]"):
        tasks.resolve_dataset("hf:allenai/openbookqa:main", "test")


# --------------------------------------------------------------------------- hub rows

def test_hub_openbookqa_row():
    hub_row = {"id": "7-980", "question_stem": "The sun is responsible for",
               "choices": {"text": ["puppies", "plants sprouting", "rain", "ice"],
                           "label": ["A", "B", "C", "D"]}, "answerKey": "B"}
    ex = tasks.convert_hf_row("allenai/openbookqa", hub_row, 0)
    assert ex == MCQExample("7-980", "The sun is responsible for",
                            ("puppies", "plants sprouting", "rain", "ice"),
                            ("A", "B", "C", "D"), "B")


def test_hub_arc_numeric_labels():
    hub_row = {"id": "MCAS_1", "question": "Which is a gas?",
               "choices": {"text": ["rock", "steam", "ice"], "label": ["1", "2", "3"]},
               "answerKey": "2"}
    ex = tasks.convert_hf_row("allenai/ai2_arc", hub_row, 5)
    assert ex.labels == ("A", "B", "C") and ex.answer == "B" and ex.answer_index == 1
    assert ex.choices == ("rock", "steam", "ice")


def test_hub_arc_letter_labels_five_choices():
    hub_row = {"id": "m2", "question": "q?",
               "choices": {"text": list("vwxyz"), "label": list("ABCDE")}, "answerKey": "E"}
    assert tasks.convert_hf_row("allenai/ai2_arc", hub_row, 0).answer_index == 4


def test_hub_commonsense_qa_row():
    hub_row = {"id": "075e", "question": "Where are you likely to find a hamburger?",
               "question_concept": "hamburger",
               "choices": {"label": list("ABCDE"),
                           "text": ["fast food restaurant", "pizza", "ground up dead cows",
                                    "mouth", "cow carcus"]}, "answerKey": "A"}
    ex = tasks.convert_hf_row("tau/commonsense_qa", hub_row, 0)
    assert ex.n_choices == 5 and ex.answer == "A" and ex.id == "075e"


def test_hub_commonsense_qa_unlabelled_test_row():
    hub_row = {"id": "t", "question": "q", "question_concept": "c",
               "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": ""}
    with pytest.raises(DataError, match="hf:tau/commonsense_qa:1: field 'answerKey'"):
        tasks.convert_hf_row("tau/commonsense_qa", hub_row, 0)


def test_hub_mmlu_row():
    hub_row = {"question": "2+2?", "subject": "elementary_mathematics",
               "choices": ["3", "4", "5", "6"], "answer": 1}
    ex = tasks.convert_hf_row("cais/mmlu", hub_row, 3)
    assert ex.answer == "B" and ex.subject == "elementary_mathematics" and ex.id == "cais/mmlu/3"


def test_hub_our_schema_row():
    ex = tasks.convert_hf_row("me/mine", {**row(0), "subject": None}, 0)
    assert ex == MCQExample("q0", "Question 0?", ("option 0", "option 1", "option 2", "option 3"),
                            ("A", "B", "C", "D"), "B")


def test_hub_unknown_layout():
    with pytest.raises(DataError) as info:
        tasks.convert_hf_row("someone/squad", {"context": "c", "question": "q", "answers": {}}, 4)
    msg = str(info.value)
    assert "someone/squad" in msg and ":5:" in msg and "['answers', 'context', 'question']" in msg


def test_hub_examples_rejects_duplicates():
    rows = [row(0), row(1), row(0)]
    with pytest.raises(DataError, match="hf:me/mine:3: field 'id': duplicate id 'q0'"):
        tasks.hub_examples("me/mine", rows)


# --------------------------------------------------------------------------- splits & subsets

def _examples(n: int) -> list[MCQExample]:
    return [MCQExample(f"q{i}", "q", ("a", "b"), ("A", "B"), "A") for i in range(n)]


def test_split_validation_reproducible_disjoint_20_percent():
    examples = _examples(100)
    train, val = data.split_validation(examples, fraction=0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert {e.id for e in train}.isdisjoint({e.id for e in val})
    assert {e.id for e in train} | {e.id for e in val} == {e.id for e in examples}
    assert data.split_validation(examples, 0.2, seed=3) == (train, val)
    assert data.split_validation(examples, 0.2, seed=4)[1] != val
    assert [e.id for e in train] == sorted((e.id for e in train), key=lambda s: int(s[1:]))


def test_split_validation_does_not_touch_global_random():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    data.split_validation(_examples(10), seed=0)
    data.limit(_examples(10), 5, seed=0)
    assert random.random() == expected


def test_split_validation_rejects_bad_input():
    with pytest.raises(ValueError):
        data.split_validation(_examples(10), fraction=1.0)
    with pytest.raises(ValueError):
        data.split_validation(_examples(1))
    assert [len(p) for p in data.split_validation(_examples(2))] == [1, 1]


def test_limit():
    examples = _examples(50)
    assert data.limit(examples, None, seed=0) == examples
    assert data.limit(examples, 80, seed=0) == examples
    subset = data.limit(examples, 10, seed=1)
    assert len(subset) == 10 and len({e.id for e in subset}) == 10
    assert data.limit(examples, 10, seed=1) == subset
    assert data.limit(examples, 10, seed=2) != subset
    assert data.limit(examples, 0, seed=0) == []


def test_resolve_hub_spec_with_fake_datasets(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        return [{"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = tasks.resolve_dataset("hf:cais/mmlu:college_physics", "test")
    assert calls == [("cais/mmlu", "college_physics", "test")]
    assert examples[0].answer == "B" and examples[0].id == "cais/mmlu/0"
    tasks.resolve_dataset("hf:someone/mine", "train")
    assert calls[-1] == ("someone/mine", None, "train")


def test_directory_given_as_data_file_says_so(tmp_path):
    (tmp_path / "mydata").mkdir()
    for spec in (tmp_path / "mydata", str(tmp_path / "mydata")):
        with pytest.raises(DataError, match="mydata: is a directory; give a .jsonl"):
            tasks.resolve_dataset(str(spec), "train")


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(row(0)) + "\n\n").encode() + json.dumps(row(1)).encode("latin-1").replace(b"Question", b"Qu\xe9stion") + b"\n")
    with pytest.raises(DataError) as info:
        data.load_jsonl(path)
    assert_located(str(info.value), 3, None)
    assert "not UTF-8" in str(info.value) and "byte 0xe9 at column 29" in str(info.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row(0)) + "\n" + json.dumps(row(1)) + "\n").encode())
    examples = data.load_jsonl(path)
    assert [ex.id for ex in examples] == ["q0", "q1"] and examples[0].question == "Question 0?"


# --------------------------------------------------------------------------- questions to predict

def test_answer_is_optional_only_for_questions_to_predict(tmp_path):
    unanswered = {k: v for k, v in row(1).items() if k != "answer"}
    path = write(tmp_path, [row(0), unanswered])
    with pytest.raises(DataError, match="data.jsonl:2: field 'answer': missing required field"):
        data.load_jsonl(path)
    first, second = data.load_jsonl(path, answers=False)
    assert (first.answer, first.answer_index, second.answer) == ("B", 1, None)
    with pytest.raises(ValueError, match="has no answer"):
        second.answer_index
    # everything else is validated as strictly, with file and line
    bad = write(tmp_path, [unanswered, {**unanswered, "id": "q2", "answer": "E"}], name="bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'answer': 'E' is not one of labels"):
        data.load_jsonl(bad, answers=False)


def test_dash_reads_standard_input(tmp_path, monkeypatch):
    import io
    import sys

    text = json.dumps(row(0)) + "\n\n" + '{"id": "q1", "question": \n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    with pytest.raises(DataError, match="<stdin>:3: malformed JSON"):
        data.load_jsonl("-", answers=False)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((json.dumps(row(0)) + "\n").encode())))
    assert [ex.id for ex in data.load_jsonl("-")] == ["q0"]
