"""Adding a method is one class and one ``register`` call: a posterior defined here gets its row into a run's
table, in its declared place, with no other change to the package."""

from __future__ import annotations

import json

import pytest
import torch

from swaglora.cli import main
from swaglora.posterior import MAP, Row, load_posterior, registry
from swaglora.report import collect_results

from conftest import make_examples, write_jsonl


class ShiftedMAP(MAP):
    """A toy post-hoc posterior: the MAP weights plus ``shift`` times standard normal noise, ``shift`` from the config."""

    name = "toy-shift"
    rows = (Row("toy-shift", 45, "MAP weights plus seeded noise (a test's toy method)"),)

    def __init__(self, model, shift: float = 0.0, device=None) -> None:
        super().__init__(model, device=device)
        self.shift = float(shift)

    @classmethod
    def build(cls, model, cfg):
        return cls(model, shift=cfg.train.lr * 1000)  # any config value: the class decides what it reads

    @property
    def is_point_mass(self) -> bool:
        return False

    def sample(self, generator=None, scale=None):
        return {n: w + self.shift * torch.randn(w.shape, generator=generator, dtype=w.dtype)
                for n, w in super().sample().items()}

    def hparams(self):
        return {"shift": self.shift}


@pytest.fixture
def toy_registered():
    methods, rows = dict(registry.METHODS), dict(registry.ROWS)
    registry.register(ShiftedMAP)
    yield
    registry.METHODS.clear()
    registry.METHODS.update(methods)
    registry.ROWS.clear()
    registry.ROWS.update(rows)


def test_a_registered_toy_posterior_gets_its_row_into_the_table(tmp_path, tiny_model_dir, toy_registered):
    train = write_jsonl(tmp_path / "train.jsonl", make_examples(24, 0, "tr"))
    test = write_jsonl(tmp_path / "test.jsonl", make_examples(10, 1, "te"))
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--model", str(tiny_model_dir), "--dtype", "float32", "--data", str(train),
                 "--test-data", str(test), "--shift", "", "--methods", "map,swag,toy-shift", "--epochs", "1",
                 "--swag-epochs", "1", "--swag-every", "1", "--swag-max-rank", "2", "--members", "1",
                 "--swag-samples", "3", "--batch-size", "8", "--lora-r", "2", "--lr", "1e-3", "--quiet"]) == 0
    saved = load_posterior(run / "members" / "0" / "posteriors" / "toy-shift")
    assert isinstance(saved, ShiftedMAP) and saved.shift == pytest.approx(1.0)  # built by its own build()
    toy = json.loads((run / "eval" / "test" / "toy-shift" / "metrics.json").read_text())
    assert toy["n_samples"] == 3 and toy["n_members"] == 1
    map_ = json.loads((run / "eval" / "test" / "map" / "metrics.json").read_text())
    assert toy["nll"] != map_["nll"]  # noise of scale 1 on the LoRA weights changes the predictive
    results = collect_results([run])
    assert results["methods"] == ["zero-shot", "map", "swag", "toy-shift"]  # its declared order (45: after swag)


def test_register_refuses_a_row_name_taken_by_another_method(toy_registered):
    class Impostor(ShiftedMAP):
        name = "impostor"
        rows = (Row("map", 99, "a second 'map' row"),)

    with pytest.raises(ValueError, match="table row 'map' is already declared by 'map'"):
        registry.register(Impostor)
    assert "impostor" not in registry.METHODS


def test_a_linearised_row_needs_a_linearised_predictive(toy_registered):
    class Flat(ShiftedMAP):
        name = "flat"
        rows = (Row("flat-glm", 99, linearized=True),)

    with pytest.raises(ValueError, match="no linearised predictive"):
        registry.register(Flat)


def test_methods_default_is_the_rows_their_classes_mark():
    from swaglora.posterior import default_rows, expand_rows

    assert expand_rows("default") == ["map", "swa", "swag-diag", "swag", "multiswag", "ensemble"]
    assert [r.name for r in default_rows()] == expand_rows("default")
    assert expand_rows("all") == [r.name for r in __import__("swaglora.posterior", fromlist=["rows"]).rows()]
    assert expand_rows(" swag , map ") == ["swag", "map"]
    with pytest.raises(ValueError, match="Unknown method 'swagg'"):
        expand_rows("map,swagg")


def test_no_method_name_is_spelled_outside_the_posterior_package():
    """Adding or renaming a method touches posterior/ only: no string literal outside it names a method or a row
    (alone, or in a comma-separated list)."""
    import ast
    from pathlib import Path

    import swaglora
    from swaglora.posterior import method_names, row_names

    names = set(method_names()) | set(row_names())
    package = Path(swaglora.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if "posterior" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words = {w.strip() for w in node.value.split(",")} if "," in node.value else {node.value}
                if words & names:
                    found.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert len(list(package.rglob("*.py"))) > 20  # the scan saw the package
    # `--shift blob` names BLoB's evaluation protocol (its shift sets), a homonym of the method, not the method
    assert [f for f in found if not f.startswith("selection.py:") or not f.endswith(" 'blob'")] == []
