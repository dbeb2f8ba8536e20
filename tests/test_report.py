"""Tests for swaglora.report on synthetic evaluation directories (2 seeds, 3 methods, 4 sets)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from swaglora import metrics as M
from swaglora import report as R

METHODS = {"map": 1, "swag": 8, "map+ts": 1}  # method -> n_samples
SETS = [("arc_easy:val", "validation"), ("arc_easy", "test"), ("arc_challenge", "shift"), ("mmlu:stem", "shift")]
SEEDS = (0, 1)
N = 40
LETTERS = "ABCD"
RISK = 0.3


def set_dir(name: str) -> str:
    return name.replace(":", "_")


def make_run(root: Path, seed: int, methods: dict[str, int] = METHODS, sets=SETS) -> Path:
    run = root / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"seed": seed}, "eval": {"shift": "arc_challenge,mmlu:stem"}}))
    for si, (name, role) in enumerate(sets):
        g = np.random.default_rng(si)  # the same questions and answers in every seed's run
        n_choices = np.where(np.arange(N) % 5 == 0, 3, 4)  # some questions have 3 choices
        labels = np.asarray([g.integers(0, c) for c in n_choices])
        for mi, (method, s) in enumerate(methods.items()):
            gm = np.random.default_rng(1000 * seed + 100 * si + mi)
            conc = 5.0 if role == "shift" else 1.0  # shift: flatter
            samples = np.zeros((s, N, 4))
            for i in range(N):
                c = n_choices[i]
                base = gm.dirichlet(np.full(c, conc))
                base[labels[i]] += 0.6 if role != "shift" else 0.1  # informative in-distribution
                base /= base.sum()
                samples[:, i, :c] = gm.dirichlet(base * 20 + 0.05, size=s)
            probs = samples.mean(0)
            u = M.uncertainty(samples)
            d = run / "eval" / set_dir(name) / method
            d.mkdir(parents=True)
            lines = []
            for i in range(N):
                c = n_choices[i]
                pred = int(probs[i].argmax())
                lines.append(json.dumps({
                    "id": f"{name}-{i}", "question": f"Question {i} of {name}? " + "very long words " * (i % 7) * 3,
                    "probs": probs[i, :c].tolist(), "labels": list(LETTERS[:c]), "answer": LETTERS[labels[i]],
                    "prediction": LETTERS[pred], "confidence": float(probs[i].max()),
                    "correct": bool(pred == labels[i]), "total_entropy": float(u["total_entropy"][i]),
                    "expected_entropy": float(u["expected_entropy"][i]),
                    "mutual_information": float(u["mutual_information"][i]),
                }))
            (d / "predictions.jsonl").write_text("\n".join(lines) + "\n")
            y = torch.as_tensor(labels)
            summ = M.summarize(torch.as_tensor(probs), y)
            (d / "metrics.json").write_text(json.dumps({
                **{k: summ[k] for k in ("accuracy", "ece", "nll", "brier", "n")},
                "method": method, "eval_set": name, "role": role, "n_samples": s, "scale": 0.5,
                "seconds": 1.0 + seed + mi, "seed": seed}))
    return run


def read_preds(run: Path, name: str, method: str) -> dict[str, np.ndarray]:
    rows = [json.loads(x) for x in (run / "eval" / set_dir(name) / method / "predictions.jsonl").read_text().splitlines()]
    return {k: np.asarray([float(r[k]) for r in rows]) for k in
            ("confidence", "correct", "total_entropy", "expected_entropy", "mutual_information")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = [make_run(root, s) for s in SEEDS]
    results = R.collect_results(runs)
    out = root / "report"
    report = R.write_report(results, out, abstain_risk=RISK)
    return runs, results, out, report


def parse_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables as (header, rows); cells split on unescaped '|'."""
    def cells(line: str) -> list[str]:
        parts, cur, esc = [], "", False
        for ch in line.strip()[1:-1]:
            if esc:
                cur += ch
                esc = False
            elif ch == "\\":
                cur += ch
                esc = True
            elif ch == "|":
                parts.append(cur.strip())
                cur = ""
            else:
                cur += ch
        return parts + [cur.strip()]

    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append((cells(block[0]), [cells(x) for x in block[2:]]))
            block = []
    return tables


def split_header(h: str, sets) -> tuple[str, str]:
    for s in sets:
        if h.startswith(s + " "):
            return s, h[len(s) + 1:]
    raise AssertionError(f"unexpected column {h!r}")


LABEL_TO_KEY = {v: k for k, v in R.METRIC_LABELS.items()}


# ------------------------------------------------------------------------------ tests
def test_files_exist_and_pngs_are_valid(built):
    import matplotlib.image as mpimg

    _, results, out, report = built
    assert report == out / "report.md"
    for f in ("report.md", "results.csv", "results.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    names = {f"reliability_{m}.png" for m in ("map", "swag", "map_ts")} | {
        f"entropy_{m}.png" for m in ("map", "swag", "map_ts")} | {"risk_coverage.png"}
    assert {p.name for p in (out / "figures").iterdir()} == names
    md = report.read_text()
    for name in names:
        p = out / "figures" / name
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        img = mpimg.imread(str(p))
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 200
        assert img.std() > 0.01  # not blank
        assert f"](figures/{name})" in md
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_markdown_numbers_equal_json(built):
    _, _, out, report = built
    res = json.loads((out / "results.json").read_text())
    md = report.read_text()
    tables = parse_tables(md)
    sets = res["eval_sets"]
    checked = 0
    seen_kinds = set()
    interval_sets = list(res["intervals"])
    for header, rows in tables:
        if header[:2] == ["Set", "Role"]:
            for s, role, n, _ in rows:
                assert res["sets"][s]["role"] == role and int(n) == res["sets"][s]["n"] == N
            seen_kinds.add("sets")
            continue
        if header[:2] == ["Run", "Seed"]:  # these runs were written without swaglora_run.json
            assert [r[1] for r in rows] == [str(x) for x in res["seeds"]] and res["runtime"] == [None] * len(rows)
            assert all(r[2] == "not recorded" for r in rows)
            continue
        if header == ["Method", "Samples"]:
            for m, s in rows:
                assert int(s) == res["n_samples"][m] == METHODS[m]
            continue
        if header[0] == "#":
            seen_kinds.add("uncertain")
            qs = res["uncertain_questions"]["questions"]
            assert len(rows) == len(qs) == 10
            for row, q in zip(rows, qs):
                assert row[5] == R.format_number(q["total_entropy"])
                assert row[2] == " · ".join(f"{lab} {p:.2f}" for lab, p in zip(q["labels"], q["probs"]))
                assert row[4] == q["answer"] and len(row[1]) <= 120
            continue
        assert header[0] == "Method", header
        if header[1] == "ACC":  # an interval table: one per test/shift set, in results.json order
            block = interval_sets.pop(0)
            s, by_method = block["eval_set"], {d["method"]: d for d in block["methods"]}
            assert [row[0] for row in rows] == list(by_method)
            for row in rows:
                for h, cell in zip(header[1:], row[1:]):
                    diff = h.startswith("Δ ")
                    key = LABEL_TO_KEY[h.removeprefix("Δ ")] + ("_diff" if diff else "")
                    if key not in by_method[row[0]]:
                        assert cell == "—" and row[0] == "map"
                        continue
                    d = by_method[row[0]][key]
                    value = f"{d['value']:+.4f}" if diff else f"{d['value']:.4f}"
                    star = " *" if d.get("significant") else ""
                    assert cell == f"{value} [{d['lo']:.4f}, {d['hi']:.4f}]{star}"
                    assert d["lo"] <= d["value"] <= d["hi"] or diff
                    if not diff:  # the bootstrap's point value is the seed mean of the stored metric
                        assert d["value"] == pytest.approx(res["metrics"][row[0]][s][key]["mean"], abs=1e-9)
                    checked += 1
            seen_kinds.add("intervals")
            continue
        ood = header[1] == "Score"
        score_labels = {lab: k for k, (_, lab) in R.OOD_SCORES.items()}
        if ood and " [" in rows[0][2]:  # AUROC intervals: one column pair (AUROC, Δ AUROC) per shift set
            blocks = {b["eval_set"]: b for b in res["ood_intervals"]}
            assert len(header) == 2 + 2 * len(blocks)
            for row in rows:
                for h, cell in zip(header[2:], row[2:]):
                    s, label = split_header(h, sets)
                    d = next(d for d in blocks[s]["rows"] if (d["method"], d["score"]) == (row[0], score_labels[row[1]]))
                    if label == "Δ AUROC" and row[0] == "map" and row[1] == "entropy (total)":
                        assert cell == "—" and "auroc_diff" not in d
                        continue
                    d = d["auroc_diff"] if label == "Δ AUROC" else d["auroc"]
                    value = f"{d['value']:+.4f}" if label == "Δ AUROC" else f"{d['value']:.4f}"
                    assert cell == f"{value} [{d['lo']:.4f}, {d['hi']:.4f}]" + (" *" if d.get("significant") else "")
                    if label == "AUROC":  # the point value is the seed mean of the stored AUROC
                        assert d["value"] == pytest.approx(res["metrics"][row[0]][s][f"ood_auroc_{score_labels[row[1]]}"]["mean"], abs=1e-9)
                    checked += 1
            seen_kinds.add("ood intervals")
            continue
        first = 2 if ood else 1
        for row in rows:
            m = row[0]
            for h, cell in zip(header[first:], row[first:]):
                s, label = split_header(h, sets)
                if ood:
                    stat = {v: k for k, v in R.OOD_STATS.items()}[label]
                    key = f"ood_{stat}_{score_labels[row[1]]}"
                    seen_kinds.add("ood")
                elif label == "Threshold":
                    key = "abstain_threshold"
                    seen_kinds.add("abstain")
                else:
                    key = LABEL_TO_KEY[label]  # base, selective, abstain_risk / abstain_coverage
                st = res["metrics"][m][s][key]
                if st["n_seeds"] > 1:
                    assert cell == f"{R.format_number(st['mean'])} ± {R.format_number(st['std'])}"
                else:
                    assert cell == R.format_number(st["mean"])
                checked += 1
    assert seen_kinds == {"sets", "uncertain", "ood", "ood intervals", "abstain", "intervals"} and not interval_sets
    # main (3x2x4) + val (3x4) + OOD (map, map+ts: 1 row; swag: 3 rows; 2 sets x 3) + sel (3x4x4) + abst
    assert checked >= 24 + 12 + 5 * 6 + 48 + 3 * 9
    assert f"Target risk {R.format_number(RISK)}" in md


def test_csv_agrees_with_json(built):
    _, _, out, _ = built
    res = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "eval_set", "role", "metric", "mean", "std", "n_seeds"]
    n_json = sum(len(d) for sets in res["metrics"].values() for d in sets.values())
    assert len(rows) == n_json
    for r in rows:
        st = res["metrics"][r["method"]][r["eval_set"]][r["metric"]]
        assert r["role"] == res["sets"][r["eval_set"]]["role"]
        assert (None if r["mean"] == "" else float(r["mean"])) == st["mean"]
        assert (None if r["std"] == "" else float(r["std"])) == st["std"]
        assert int(r["n_seeds"]) == st["n_seeds"]


def test_mean_std_equal_numpy_and_stored_values(built):
    runs, results, _, _ = built
    assert results["seeds"] == list(SEEDS) and results["methods"] == ["map", "map+ts", "swag"]
    assert results["eval_sets"] == [s for s, _ in SETS]
    for m, sets in results["metrics"].items():
        for s, d in sets.items():
            for k, st in d.items():
                assert st["seeds"] == list(SEEDS) and st["n_seeds"] == 2
                if any(v is None for v in st["values"]):
                    assert st["mean"] is None
                    continue
                v = np.asarray(st["values"])
                assert st["mean"] == float(np.mean(v)) and st["std"] == float(np.std(v, ddof=1))
    for run, seed in zip(runs, SEEDS):
        for s, _ in SETS:
            for m in METHODS:
                stored = json.loads((run / "eval" / set_dir(s) / m / "metrics.json").read_text())
                for k in ("accuracy", "ece", "nll", "brier"):
                    assert results["metrics"][m][s][k]["values"][SEEDS.index(seed)] == stored[k]


def test_ood_and_selective_by_hand(built):
    runs, results, _, _ = built
    for i, run in enumerate(runs):
        for m in METHODS:
            p_in = read_preds(run, "arc_easy", m)
            for s in ("arc_challenge", "mmlu:stem"):
                p_out = read_preds(run, s, m)
                d = results["metrics"][m][s]
                assert d["ood_auroc_entropy"]["values"][i] == M.auroc(p_in["total_entropy"], p_out["total_entropy"])
                assert d["ood_aupr_entropy"]["values"][i] == M.aupr(p_in["total_entropy"], p_out["total_entropy"])
                assert d["ood_fpr95_entropy"]["values"][i] == M.fpr_at_tpr(p_in["total_entropy"], p_out["total_entropy"])
                if METHODS[m] > 1:
                    assert d["ood_auroc_mi"]["values"][i] == M.auroc(p_in["mutual_information"], p_out["mutual_information"])
                    assert d["ood_auroc_aleatoric"]["values"][i] == M.auroc(p_in["expected_entropy"], p_out["expected_entropy"])
            for s, _ in SETS:
                p = read_preds(run, s, m)
                d = results["metrics"][m][s]
                assert d["aurc"]["values"][i] == M.aurc(p["confidence"], p["correct"])
                assert d["acc@80"]["values"][i] == M.accuracy_at_coverage(p["confidence"], p["correct"], 0.8)
    # shift sets are built to be more uncertain: OOD detection by entropy beats chance
    assert results["metrics"]["swag"]["mmlu:stem"]["ood_auroc_entropy"]["mean"] > 0.6


def test_mi_rows_only_for_multi_sample_methods(built):
    _, results, _, report = built
    for m, s in METHODS.items():
        keys = set(results["metrics"][m]["arc_challenge"])
        assert "ood_auroc_entropy" in keys
        has_mi = {"ood_auroc_mi", "ood_aupr_mi", "ood_fpr95_mi", "ood_auroc_aleatoric"} <= keys
        assert has_mi == (s > 1)
        assert not any("_mi" in k or "aleatoric" in k for k in keys) or s > 1
    ood = next(t for t in parse_tables(report.read_text()) if t[0][1] == "Score")
    rows = [(r[0], r[1]) for r in ood[1]]
    assert rows == [("map", "entropy (total)"), ("map+ts", "entropy (total)"), ("swag", "entropy (total)"),
                    ("swag", "MI (epistemic)"), ("swag", "expected entropy (aleatoric)")]


def test_abstention_threshold_reaches_target_risk(built):
    runs, _, out, _ = built
    res = json.loads((out / "results.json").read_text())
    assert res["abstain_risk"] == RISK
    for i, run in enumerate(runs):
        for m in METHODS:
            val = read_preds(run, "arc_easy:val", m)
            t = res["metrics"][m]["arc_easy:val"]["abstain_threshold"]["values"][i]
            assert t is not None
            assert t == M.abstention_threshold(val["confidence"], val["correct"], RISK)
            risk, cov = M.selective_risk(val["confidence"], val["correct"], t)
            assert risk <= RISK and cov > 0
            assert res["metrics"][m]["arc_easy:val"]["abstain_risk"]["values"][i] == risk
            for s in ("arc_easy", "arc_challenge", "mmlu:stem"):
                p = read_preds(run, s, m)
                r2, c2 = M.selective_risk(p["confidence"], p["correct"], t)
                assert res["metrics"][m][s]["abstain_risk"]["values"][i] == r2
                assert res["metrics"][m][s]["abstain_coverage"]["values"][i] == c2


def test_uncertain_questions_from_first_seed_of_most_sampled_method(built):
    runs, results, _, report = built
    uq = results["uncertain_questions"]
    assert (uq["method"], uq["seed"], uq["eval_set"]) == ("swag", 0, "arc_easy")
    ent = read_preds(runs[0], "arc_easy", "swag")["total_entropy"]
    assert [q["total_entropy"] for q in uq["questions"]] == sorted(ent.tolist(), reverse=True)[:10]
    assert "## The ten most uncertain test questions" in report.read_text()


def test_print_table(built):
    _, results, _, _ = built
    text = R.print_table(results)
    lines = text.splitlines()
    assert lines[0].split() == ["set", "role", "method", "ACC", "ECE", "NLL", "Brier"]
    st = results["metrics"]["swag"]["arc_easy"]["accuracy"]
    assert R.format_cell(st) in text and " ± " in R.format_cell(st)
    for s, _ in SETS:
        assert sum(1 for line in lines if line.startswith(s + " ")) == len(METHODS)
    # the intervals beside the table: set sizes, and ACC / NLL intervals with the difference to MAP
    assert f"arc_easy: {N} questions; 95% intervals over the questions" in text
    swag = next(d for d in results["intervals"][0]["methods"] if d["method"] == "swag")
    acc, dnll = swag["accuracy"], swag["nll_diff"]
    expected = (f"ACC {acc['value']:.4f} [{acc['lo']:.4f}, {acc['hi']:.4f}]" + (" *" if acc.get("significant") else ""),
                f"ΔNLL {dnll['value']:+.4f} [{dnll['lo']:.4f}, {dnll['hi']:.4f}]" + (" *" if dnll["significant"] else ""))
    assert any(line.startswith("  swag ") and all(e in line for e in expected) for line in lines)


def test_empty_run_dir_error(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_run"):
        R.collect_results([empty])
    with pytest.raises(ValueError, match="does_not_exist"):
        R.collect_results([tmp_path / "does_not_exist"])
    with pytest.raises(ValueError, match="no run directories"):
        R.collect_results([])


def test_missing_validation_and_missing_method(tmp_path):
    sets = [x for x in SETS if x[1] != "validation"]
    a = make_run(tmp_path, 0, sets=sets)
    b = make_run(tmp_path, 1, methods={"map": 1, "swag": 8}, sets=sets)  # map+ts missing on seed 1
    results = R.collect_results([b, a], abstain_risk=RISK)  # runs get sorted by seed
    assert results["seeds"] == [0, 1] and results["validation_set"] is None
    assert not any(k in R.ABSTAIN_METRICS for sets_ in results["metrics"].values()
                   for d in sets_.values() for k in d)
    notes = " ".join(results["notes"])
    assert "no validation set" in notes and "map+ts is missing on seed(s) [1]" in notes
    st = results["metrics"]["map+ts"]["arc_easy"]["accuracy"]
    assert st["n_seeds"] == 1 and st["std"] == 0.0 and st["seeds"] == [0]
    report = R.write_report(results, tmp_path / "out")
    md = report.read_text()
    assert "No validation set: abstention thresholds cannot be chosen" in md
    assert "Threshold" not in md
    row = next(r for h, rows in parse_tables(md) if h[0] == "Method" and "arc_easy ACC" in h
               for r in rows if r[0] == "map+ts")
    assert row[1] == R.format_number(st["mean"])  # one seed: no "± std"


def test_report_from_results_json_rereads_runs(built, tmp_path):
    _, _, out, _ = built
    res = json.loads((out / "results.json").read_text())
    report = R.write_report(res, tmp_path / "again")
    assert (tmp_path / "again" / "figures" / "risk_coverage.png").is_file()
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == res
    assert report.read_text() == (out / "report.md").read_text()


def test_unreachable_target_risk_gives_na_threshold(tmp_path):
    run = make_run(tmp_path, 0, methods={"map": 1, "swag": 8})
    f = run / "eval" / set_dir("arc_easy:val") / "map" / "predictions.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    top = max(range(len(rows)), key=lambda i: rows[i]["confidence"])
    rows[top]["correct"] = False  # the most confident validation answer is wrong: risk 0 unreachable
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = R.collect_results(run, abstain_risk=0.0)
    st = results["metrics"]["map"]["arc_easy:val"]["abstain_threshold"]
    assert st["values"] == [None] and st["mean"] is None and R.format_cell(st) == "n/a"
    assert results["metrics"]["map"]["arc_easy"]["abstain_coverage"]["values"] == [0.0]
    assert any("abstains on everything" in n for n in results["notes"])
    md = R.write_report(results, tmp_path / "out").read_text()
    row = next(r for h, rows in parse_tables(md) if "arc_easy:val Threshold" in h for r in rows if r[0] == "map")
    assert row[1] == "n/a"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]["map"]["arc_easy:val"][
        "abstain_threshold"]["mean"] is None
    assert R.format_number(float("inf")) == "n/a" and R.format_number(0.123456) == "0.1235"


def test_intervals_refuse_runs_scored_on_different_answers(tmp_path):
    runs = [make_run(tmp_path, s) for s in SEEDS]
    path = runs[1] / "eval" / "arc_challenge" / "swag" / "predictions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[3]["answer"] = "B" if rows[3]["answer"] != "B" else "A"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = R.collect_results(runs)
    assert [b["eval_set"] for b in results["intervals"]] == ["arc_easy", "mmlu:stem"]
    assert any("arc_challenge: methods or seeds were scored on different questions or answers" in n
               for n in results["notes"])
    block = results["intervals"][0]
    assert block["n"] == N and block["reference"] == "map" and [d["method"] for d in block["methods"]] == list(
        R.collect_results(runs)["methods"])


def _hand_run(root: Path, seed: int, entropies: dict[str, list[float]], confidence: list[float], correct: list[bool]) -> Path:
    """One method (``map``, one sample) on a 4-question test set and a 4-question shift set, with the stored
    uncertainty fields set to the given numbers (the report reads them as they are)."""
    run = root / f"hand{seed}"
    for name, role in (("in", "test"), ("out", "shift")):
        d = run / "eval" / name / "map"
        d.mkdir(parents=True)
        lines = [json.dumps({"id": f"{name}{i}", "question": "q", "probs": [c, 1 - c], "labels": ["A", "B"],
                             "answer": "A" if ok else "B", "prediction": "A", "confidence": c, "correct": ok,
                             "total_entropy": h, "expected_entropy": h, "mutual_information": 0.0})
                 for i, (h, c, ok) in enumerate(zip(entropies[name], confidence, correct))]
        (d / "predictions.jsonl").write_text("\n".join(lines) + "\n")
        (d / "metrics.json").write_text(json.dumps({"accuracy": 0.75, "ece": 0.1, "nll": 0.5, "brier": 0.2, "n": 4,
                                                    "method": "map", "eval_set": name, "role": role, "n_samples": 1,
                                                    "seed": seed}))
    return run


def test_report_cells_computed_by_hand(tmp_path):
    # OOD AUROC by entropy = the fraction of (in, out) pairs where the shift question is more uncertain:
    # seed 0: 0.25 beats 2 of the 4 in-distribution entropies, 0.35 beats 3, 0.5 and 0.6 beat 4: 13/16;
    # seed 1: 0.05 beats none, the others 4 each: 12/16. Mean 0.78125, sample std 0.0625/sqrt(2) = 0.0441942.
    # Accuracy on the 50% most confident test questions (confidences 0.9, 0.8 first; correct 1, 0) = 0.5.
    inside = [0.1, 0.2, 0.3, 0.4]
    confidence, correct = [0.9, 0.8, 0.6, 0.55], [True, False, True, True]
    runs = [_hand_run(tmp_path, 0, {"in": inside, "out": [0.25, 0.35, 0.5, 0.6]}, confidence, correct),
            _hand_run(tmp_path, 1, {"in": inside, "out": [0.05, 0.5, 0.6, 0.7]}, confidence, correct)]
    report = R.write_report(R.collect_results(runs), tmp_path / "report")
    tables = parse_tables(report.read_text())
    ood = next(t for t in tables if t[0][:2] == ["Method", "Score"])
    assert ood[0][2] == "out AUROC" and ood[1][0][:3] == ["map", "entropy (total)", "0.7812 ± 0.0442"]
    selective = next(t for t in tables if "in Acc@50%" in t[0])
    assert selective[1][0][selective[0].index("in Acc@50%")] == "0.5000 ± 0.0000"
    # AUROC's bootstrap interval: its value is the seed mean above; questions are paired by id, so a run whose
    # shift predictions are stored in another order gives the same interval
    block = R.collect_results(runs)["ood_intervals"]
    assert [(b["eval_set"], b["reference_set"], b["n_in"], b["n_out"], b["reference"]) for b in block] == [("out", "in", 4, 4, "map")]
    (entry,) = block[0]["rows"]
    assert (entry["method"], entry["score"]) == ("map", "entropy") and "auroc_diff" not in entry
    assert entry["auroc"]["value"] == 0.78125 and entry["auroc"]["lo"] < 0.78125 < entry["auroc"]["hi"] <= 1
    f = runs[1] / "eval" / "out" / "map" / "predictions.jsonl"
    f.write_text("\n".join(reversed(f.read_text().splitlines())) + "\n")
    assert R.collect_results(runs)["ood_intervals"][0]["rows"][0]["auroc"] == entry["auroc"]


def test_interval_values_equal_the_stored_metrics_for_tiny_probabilities(tmp_path):
    from swaglora.data import MCQExample
    from swaglora.rundir import write_eval

    examples = [MCQExample(f"q{i}", f"question {i}", ("a", "b", "c"), ("A", "B", "C"), "ABC"[i % 3]) for i in range(6)]
    probs = torch.full((1, 6, 3), 0.5, dtype=torch.float64)
    probs[0, :, 2] = 1e-9  # the answer of q2 and q5 gets a probability far below 1e-6
    probs[0, :, :2] = (1 - 1e-9) / 2
    for method in ("map", "swag"):
        stored = write_eval(tmp_path / "run" / "eval" / "t" / method, examples, probs,
                            {"method": method, "eval_set": "t", "role": "test", "n_samples": 1, "seed": 0})
    block = R.collect_results([tmp_path / "run"])["intervals"][0]
    nll = next(d for d in block["methods"] if d["method"] == "map")["nll"]["value"]
    assert nll == pytest.approx(stored["nll"], rel=1e-12)
    assert stored["nll"] == pytest.approx((4 * math.log(2 / (1 - 1e-9)) - 2 * math.log(1e-9)) / 6, rel=1e-9)  # by hand


def test_cost_table_by_hand(tmp_path):
    """Training seconds, evaluation seconds and posterior size per row, from hand-made member files: ``swag``
    uses member 0's training run and posterior, ``multiswag`` both members', ``blob`` member 0's own training
    (``done-blob.json``); ``+ts`` rows get no line of their own; the base model costs no training."""
    methods = {"zero-shot": 1, "map": 1, "swag": 4, "multiswag": 4, "blob": 4, "map+ts": 1}
    runs = [make_run(tmp_path, seed, methods) for seed in (0, 1)]
    sizes = {"init": 10_000, "map": 1_000, "swag": 5_000, "blob": 2_000}
    for k, run in enumerate(runs):
        for i, train_seconds in enumerate((100.0 + k, 120.0)):
            member = run / "members" / str(i)
            for name, size in sizes.items():
                (member / "posteriors" / name).mkdir(parents=True)
                (member / "posteriors" / name / "posterior.safetensors").write_bytes(b"x" * size)
                (member / "posteriors" / name / "posterior_config.json").write_bytes(b"{}" + b" " * 998)
            (member / "done.json").write_text(json.dumps({"seed": k, "seconds": train_seconds}))
            (member / "done-blob.json").write_text(json.dumps({"seed": k, "seconds": 30.0 * (i + 1)}))
    results = R.collect_results(runs)
    costs = results["costs"]
    assert list(costs) == ["zero-shot", "map", "swag", "multiswag", "blob"]
    mi = {m: i for i, m in enumerate(methods)}  # make_run's metrics.json seconds: 1 + seed + method index
    want = {"zero-shot": (0.0, 0.0, 0.011), "map": (100.0, 101.0, 0.002), "swag": (100.0, 101.0, 0.006),
            "multiswag": (220.0, 221.0, 0.012), "blob": (30.0, 30.0, 0.003)}
    for m, (train0, train1, mb) in want.items():
        assert costs[m]["train_seconds"]["values"] == [train0, train1]
        assert costs[m]["eval_seconds"]["values"] == [1.0 + mi[m], 2.0 + mi[m]]
        assert costs[m]["posterior_mb"]["values"] == pytest.approx([mb, mb])
    report = R.write_report(results, tmp_path / "report").read_text()
    table = next(t for t in parse_tables(report) if t[0] == ["Method", "Training s", "Evaluation s", "Posterior MB"])
    assert table[1][3] == ["multiswag", "220.5000 ± 0.7071", f"{4.5:.4f} ± 0.7071", "0.0120 ± 0.0000"]

    # a row trained but not evaluated in a run (its posterior is there, its metrics are not) costs nothing there
    late = make_run(tmp_path / "late", 2, {m: s for m, s in methods.items() if m != "blob"})
    shutil.copytree(runs[1] / "members", late / "members")
    costs = R.collect_results([runs[1], late])["costs"]
    assert costs["blob"]["train_seconds"]["seeds"] == [1]
    assert costs["blob"]["train_seconds"]["values"] == [30.0] and costs["map"]["train_seconds"]["seeds"] == [1, 2]


def _readme_tables():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_copy_the_report_numbers(built):
    """scripts/readme_tables.py: every cell is the results.json value at 3 decimals (mean ± std over the two seeds),
    the paired Δ to MAP with its interval and star, the best mean of a column in bold."""
    _, results, out, _ = built
    text = _readme_tables().tables(json.loads((out / "results.json").read_text()))
    tables = parse_tables(text)
    main_table = tables[0]
    assert main_table[0] == ["method", "ACC", "ECE", "NLL", "Brier", "AURC", "Δ ACC", "Δ ECE", "Δ NLL", "Δ Brier", "Δ AURC"]
    by_method = {r[0]: r for r in main_table[1]}
    for m in ("map", "swag"):
        nll = results["metrics"][m]["arc_easy"]["nll"]
        want = f"{nll['mean']:.3f} ± {nll['std']:.3f}"
        assert by_method[m][3].strip("*") == want
    best = min(results["metrics"][m]["arc_easy"]["nll"]["mean"] for m in results["methods"])
    assert sum(r[3].startswith("**") for r in main_table[1]) >= 1
    assert any(r[3] == f"**{best:.3f} ± {results['metrics'][r[0]]['arc_easy']['nll']['std']:.3f}**" for r in main_table[1])
    block = next(b for b in results["intervals"] if b["eval_set"] == "arc_easy")
    d = next(x for x in block["methods"] if x["method"] == "swag")["nll_diff"]
    star = " *" if d["significant"] else ""
    assert by_method["swag"][8] == f"{d['value']:+.3f} [{d['lo']:.3f}, {d['hi']:.3f}]{star}".replace("-", "−")
    assert by_method["map"][8] == "—"
    assert [t[0][1:3] for t in tables[1:]] == [["arc_challenge ACC", "arc_challenge NLL"],
                                                ["arc_challenge AUROC (entropy)", "Δ"]]
    ood = {r[0]: r for r in tables[2][1]}
    d = next(x for b in results["ood_intervals"] if b["eval_set"] == "arc_challenge" for x in b["rows"]
             if (x["method"], x["score"]) == ("swag", "mi"))["auroc_diff"]
    star = " *" if d["significant"] else ""
    assert ood["swag"][4] == f"{d['value']:+.3f} [{d['lo']:.3f}, {d['hi']:.3f}]{star}".replace("-", "−")
    assert ood["map"][2] == "—" and ood["map"][4] == "—"  # MAP is the reference, and has no MI


def test_readme_tables_side_by_side_per_seed(built, tmp_path, capsys):
    """scripts/readme_tables.py with one results.json per seed: each column is that seed's own paired Δ to MAP
    (value, interval, star), in the order given; files whose reference row differs are refused."""
    runs, _, _, _ = built
    module = _readme_tables()
    one = [R.collect_results([run]) for run in runs]
    tables = parse_tables(module.side_by_side(one, ["s0", "s1"], ["map", "swag"]))
    header, rows = tables[0]
    assert header[1:3] == ["Δ ACC s0", "Δ ACC s1"] and header[5:7] == ["Δ NLL s0", "Δ NLL s1"]
    by_method = {r[0]: r for r in rows}
    assert by_method["map"][5] == "—"
    for col, res in zip((5, 6), one):
        block = next(b for b in res["intervals"] if b["eval_set"] == "arc_easy")
        d = next(x for x in block["methods"] if x["method"] == "swag")["nll_diff"]
        star = " *" if d["significant"] else ""
        assert by_method["swag"][col] == f"{d['value']:+.3f} [{d['lo']:.3f}, {d['hi']:.3f}]{star}".replace("-", "−")
    assert by_method["swag"][5] != by_method["swag"][6]  # two seeds, two different differences
    header, rows = tables[1]
    assert header[1:] == ["arc_challenge Δ NLL s0", "arc_challenge Δ NLL s1", "mmlu:stem Δ NLL s0", "mmlu:stem Δ NLL s1",
                          "arc_challenge Δ AUROC (entropy) s0", "arc_challenge Δ AUROC (entropy) s1",
                          "mmlu:stem Δ AUROC (entropy) s0", "mmlu:stem Δ AUROC (entropy) s1"]
    d = next(x for b in one[1]["ood_intervals"] if b["eval_set"] == "mmlu:stem" for x in b["rows"]
             if (x["method"], x["score"]) == ("swag", "entropy"))["auroc_diff"]
    assert rows[1][8].startswith(f"{d['value']:+.3f} [".replace("-", "−"))
    with pytest.raises(ValueError, match="reference differ"):
        module.side_by_side([one[0], R.collect_results([runs[1]], reference="swag")], ["s0", "s1"])
    # the command line: default labels are the files' seeds
    paths = []
    for i, res in enumerate(one):
        R.write_report(res, tmp_path / f"r{i}", abstain_risk=RISK)
        paths.append(tmp_path / f"r{i}" / "results.json")
    assert module.main([*map(str, paths), "--methods", "map,swag"]) == 0
    assert "Δ NLL seed 0 | Δ NLL seed 1" in capsys.readouterr().out


def test_report_reference_takes_every_paired_difference_to_another_row(built, tmp_path, capsys):
    """``swaglora report --reference swag``: every Δ (test and shift intervals, OOD AUROC) is to swag, on the same
    resamples as the default report (so Δ(m, swag) = Δ(m, map) − Δ(swag, map) on every resample: the point values
    and, for a shift in location, the values agree); an unknown or unevaluated row stops before anything is written."""
    from swaglora.cli import main

    runs, results, _, _ = built
    out = tmp_path / "vs-swag"
    assert main(["report", *map(str, runs), "--reference", "swag", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {b["reference"] for b in res["intervals"]} == {"swag"} and {b["reference"] for b in res["ood_intervals"]} == {"swag"}
    for block, default in zip(res["intervals"], results["intervals"]):
        by_m = {d["method"]: d for d in block["methods"]}
        base = {d["method"]: d for d in default["methods"]}
        assert "nll_diff" not in by_m["swag"] and "nll_diff" in by_m["map"]
        for k in M.BOOTSTRAP_METRICS:  # value differences recombine exactly; the intervals are the same resamples'
            assert by_m["map"][f"{k}_diff"]["value"] == pytest.approx(-base["swag"][f"{k}_diff"]["value"], abs=1e-12)
            assert by_m["map"][f"{k}_diff"]["lo"] == pytest.approx(-base["swag"][f"{k}_diff"]["hi"], abs=1e-12)
            assert by_m["swag"][k] == base["swag"][k]  # the marginal intervals do not depend on the reference
    md = (out / "report.md").read_text()
    assert "## Intervals and differences to `swag`" in md and "`Δ` = method − `swag`" in md
    assert "the AUROC of `swag`'s total entropy" in md
    capsys.readouterr()
    for bad, message in (("mapp", "not a results-table row"), ("blob", "the runs have no 'blob' results")):
        assert main(["report", *map(str, runs), "--reference", bad, "--out", str(tmp_path / bad)]) != 0
        assert message in capsys.readouterr().err and not (tmp_path / bad).exists()


def test_mi_by_entropy_script_by_hand(tmp_path, capsys):
    """scripts/mi_by_entropy.py: 2 entropy bins split at the pooled median 0.5. Low bin: the shift question's MI
    0.2 beats both in-distribution MIs (0.1, 0.0): AUROC 1; high bin: 0.3 beats neither 0.5 nor 0.4: AUROC 0;
    overall MI: 0.2 and 0.3 each beat 2 of 4: 0.5; entropy: 0.15 beats 1, 0.85 beats 3: 0.5."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mi_by_entropy", Path(__file__).resolve().parents[1] / "scripts" / "mi_by_entropy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def arrays(h, mi):
        h, mi = np.asarray(h, float), np.asarray(mi, float)
        return {"total_entropy": h, "mutual_information": mi, "expected_entropy": h - mi}

    r = module.by_entropy(arrays([0.1, 0.2, 0.8, 0.9], [0.1, 0.0, 0.5, 0.4]), arrays([0.15, 0.85], [0.2, 0.3]), bins=2)
    assert [w["auroc"] for w in r["within"]] == [1.0, 0.0] and [w["n"] for w in r["within"]] == [3, 3]
    assert r["overall"]["mutual_information"] == 0.5 and r["overall"]["total_entropy"] == 0.5
    # end to end on a run directory: one table row per method and shift set
    for s, role, h, mi in (("t", "test", [0.1, 0.2, 0.8, 0.9], [0.1, 0.0, 0.5, 0.4]), ("o", "shift", [0.15, 0.85], [0.2, 0.3])):
        d = tmp_path / "run" / "eval" / s / "swag"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"eval_set": s, "role": role}))
        (d / "predictions.jsonl").write_text("".join(json.dumps({
            "id": f"{s}{i}", "question": "q", "labels": ["A", "B"], "answer": "A", "prediction": "A", "probs": [0.6, 0.4],
            "confidence": 0.6, "correct": True, "total_entropy": a, "mutual_information": b, "expected_entropy": a - b})
            + "\n" for i, (a, b) in enumerate(zip(h, mi))))
    assert module.main([str(tmp_path / "run"), "--methods", "swag", "--bins", "2"]) == 0
    rows = parse_tables(capsys.readouterr().out)[0][1]
    assert rows == [["swag", "o", "0.500", "0.500", rows[0][4], "1.00 (33%)", "0.00 (33%)"]]


def test_pairs_table_script_takes_each_difference_from_the_report_with_that_reference(built, capsys):
    """scripts/pairs_table.py: the cell of pair a:b is ``report --reference b``'s Δ of a; a:b and b:a mirror."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pairs_table", Path(__file__).resolve().parents[1] / "scripts" / "pairs_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs, results, _, _ = built
    header, rows = module.pair_rows(runs, [("swag", "map"), ("map", "swag")])
    assert header[:6] == ["a − b", "arc_easy Δ ACC", "arc_easy Δ ECE", "arc_easy Δ NLL", "arc_easy Δ Brier", "arc_easy Δ AURC"]
    d = next(x for x in results["intervals"][0]["methods"] if x["method"] == "swag")["nll_diff"]
    star = " *" if d["significant"] else ""
    assert rows[0][3] == f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{star}".replace("-", "−")
    mirror = R.collect_results(runs, reference="swag")
    e = next(x for x in mirror["intervals"][0]["methods"] if x["method"] == "map")["nll_diff"]
    assert e["value"] == pytest.approx(-d["value"], abs=1e-12) and e["lo"] == pytest.approx(-d["hi"], abs=1e-12)
    ood = next(b for b in results["ood_intervals"] if b["eval_set"] == "arc_challenge")
    f = next(x for x in ood["rows"] if (x["method"], x["score"]) == ("swag", "entropy"))["auroc_diff"]
    assert rows[0][header.index("arc_challenge Δ AUROC (entropy)")].startswith(f"{f['value']:+.3f}".replace("-", "−"))
    assert module.main([*map(str, runs), "--pairs", "swag:map"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| swag − map | ")


def _compare_runs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_preds(run: Path, rows: list[tuple[str, str, list[float]]]) -> Path:
    d = run / "eval" / "validation" / "swag"
    d.mkdir(parents=True)
    (d / "predictions.jsonl").write_text("".join(json.dumps({
        "id": q, "question": "q", "labels": ["A", "B"], "answer": ans, "prediction": "A" if p[0] >= p[1] else "B",
        "probs": p, "confidence": max(p), "correct": float(("A" if p[0] >= p[1] else "B") == ans),
        "total_entropy": 0.0, "expected_entropy": 0.0, "mutual_information": 0.0}) + "\n" for q, ans, p in rows))
    return run


def test_compare_runs_script_by_hand(tmp_path, capsys):
    """scripts/compare_runs.py: B's file lists the questions in another order; aligned by id, the probability of
    the answer is A (0.5, 0.8, 0.6), B (0.8, 0.5, 0.9): Δ NLL = mean(−ln .8 + ln .5, −ln .5 + ln .8, −ln .9 + ln .6)
    by hand, and each resample's Δ NLL is the count-weighted mean of the per-question differences."""
    module = _compare_runs()
    a = _write_preds(tmp_path / "a", [("q1", "A", [0.5, 0.5]), ("q2", "B", [0.2, 0.8]), ("q3", "A", [0.6, 0.4])])
    b = _write_preds(tmp_path / "b", [("q3", "A", [0.9, 0.1]), ("q1", "A", [0.8, 0.2]), ("q2", "B", [0.5, 0.5])])
    res = module.compare([a], [b], "validation", "swag", ("a", "b"), n_boot=1000)
    per_q = np.array([-math.log(0.8) + math.log(0.5), -math.log(0.5) + math.log(0.8), -math.log(0.9) + math.log(0.6)])
    d = res["b"]["nll_diff"]
    assert d["value"] == pytest.approx(per_q.mean(), abs=1e-12)
    assert res["a"]["nll"]["value"] == pytest.approx(-(math.log(0.5) + math.log(0.8) + math.log(0.6)) / 3, abs=1e-12)
    counts = M.bootstrap_counts(3, 1000, 0).numpy()
    boot = counts @ per_q / 3
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert (d["lo"], d["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    # accuracy: A predicts A on q1 (tie → A, right), B on q2 (right), A on q3 (right): 1; B: right, B on q2 tie →
    # A (wrong), right: 2/3
    assert res["a"]["accuracy"]["value"] == pytest.approx(1.0) and res["b"]["accuracy"]["value"] == pytest.approx(2 / 3)
    assert module.main(["--a", str(a), "--b", str(b), "--row", "swag", "--labels", "lr,lr/10"]) == 0
    out = capsys.readouterr().out
    assert "| NLL |" in out and f"{per_q.mean():+.4f}".replace("-", "−") in out
    # other questions or another answer: refused, naming the file
    c = _write_preds(tmp_path / "c", [("q1", "A", [0.5, 0.5]), ("q2", "B", [0.2, 0.8])])
    with pytest.raises(ValueError, match="other questions"):
        module.compare([a], [c], "validation", "swag")
    e = _write_preds(tmp_path / "e", [("q1", "B", [0.5, 0.5]), ("q2", "B", [0.2, 0.8]), ("q3", "A", [0.6, 0.4])])
    with pytest.raises(ValueError, match="another answer"):
        module.compare([a], [e], "validation", "swag")
    with pytest.raises(SystemExit):
        module.main(["--a", str(a), "--b", str(tmp_path / "missing"), "--row", "swag"])
    assert "no such file" in capsys.readouterr().err


def test_swag_spread_script_by_hand(tmp_path, capsys):
    """scripts/swag_spread.py against numpy: four snapshots, K=3 (the ring buffer wraps once); Σ diag is the sum
    of the snapshots' population variances, Σ low-rank ‖D‖²_F/(K−1) over the rows held, ‖mean − MAP‖ the L2
    distance of the mean from the MAP weights saved beside it; the training log's epochs in order."""
    import importlib.util

    from conftest import small_model
    from swaglora.params import trainable_parameters, unflatten
    from swaglora.posterior import MAP, SWAG

    spec = importlib.util.spec_from_file_location("swag_spread", Path(__file__).resolve().parents[1] / "scripts" / "swag_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    model = small_model()
    params = trainable_parameters(model)
    member = tmp_path / "run" / "members" / "0"
    map_vector = torch.tensor([1.0, -1, 0.5, 2, 0, 0, 3, -2], dtype=torch.float64)

    def put(vector):
        with torch.no_grad():
            for name, value in unflatten(vector.float(), params).items():
                params[name].copy_(value)

    put(map_vector)
    MAP(model).save(member / "posteriors" / "map")
    thetas = map_vector + torch.tensor([[0.0] * 8, [1.0, 0, 0, 0, 0, 0, 0, 1], [0, 2.0, 0, 0, 1, 0, 0, 0], [0.5] * 8], dtype=torch.float64)
    swag = SWAG(model, max_rank=3, dtype=torch.float64)
    deviations = []
    for i, theta in enumerate(thetas):
        put(theta)
        swag.collect(model)
        deviations.append((theta.float().double() - thetas[: i + 1].float().double().mean(0)).numpy())
    swag.save(member / "posteriors" / "swag")
    (member / "train_log.jsonl").write_text(
        json.dumps({"epoch": 1, "train_loss": 0.9, "val_nll": 0.8}) + "\n" + json.dumps({"epoch": 2, "train_loss": 0.5, "val_nll": 0.75}) + "\n")

    s = module.spread(member)
    ref = thetas.float().double().numpy()
    held = np.stack(deviations[1:])  # rows 1, 2 and row 0 overwritten by snapshot 3: the last three deviations
    assert (s["n"], s["rank"]) == (4, 3)
    assert s["diag"] == pytest.approx(ref.var(axis=0).sum(), rel=1e-9)
    assert s["lowrank"] == pytest.approx((held**2).sum() / 2, rel=1e-9)
    assert s["shift"] == pytest.approx(np.linalg.norm(ref.mean(0) - map_vector.float().double().numpy()), rel=1e-9)
    assert (s["val_nll"], s["train_loss"]) == ([0.8, 0.75], [0.9, 0.5])
    assert module.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "| 4 (3) |" in out and "0.800 → 0.750" in out and f"{ref.var(axis=0).sum():.4g}" in out
    # fewer snapshots than the rank: K' = n rows held, divisor K' - 1 (2 snapshots: 1); one snapshot: no low-rank part
    for n in (2, 1):
        few = tmp_path / f"few{n}" / "members" / "0"
        swag = SWAG(model, max_rank=3, dtype=torch.float64)
        for theta in thetas[1 : 1 + n]:
            put(theta)
            swag.collect(model)
        swag.save(few / "posteriors" / "swag")
        s = module.spread(few)
        part = thetas[1 : 1 + n].float().double().numpy()
        assert (s["n"], s["rank"]) == (n, n) and math.isnan(s["shift"]) and s["val_nll"] == []
        assert s["diag"] == pytest.approx(part.var(axis=0).sum(), rel=1e-9, abs=1e-12)
        # 2 snapshots: rows t1 - t1 = 0 and t2 - (t1 + t2)/2; Σ low-rank = ‖(t2 - t1)/2‖²
        assert s["lowrank"] == pytest.approx(((part[-1] - part[0]) ** 2).sum() / 4 if n == 2 else 0.0, rel=1e-9)
    with pytest.raises(SystemExit):
        module.main([str(tmp_path)])
    assert "no members/*/posteriors/swag" in capsys.readouterr().err
