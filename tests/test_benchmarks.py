"""The accuracy benchmark's machinery, in its --quick mode on a few rows."""

import importlib.util
import json

import pytest

from .conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_accuracy_benchmark_quick_runs_and_resumes(datasets, tmp_path, capsys):
    bench = load("accuracy")
    results = tmp_path / "acc.json"
    args = [
        "--quick",
        "--data",
        str(datasets),
        "--seeds",
        "0",
        "--tables",
        "A",
        "C",
        "--only",
        "A1",
        "A3",
        "C1",
        "--results",
        str(results),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    assert bench.main(args) == 0
    store = json.loads(results.read_text())
    assert set(store["runs"]) == {
        "A1 frozen features + logistic regression|seed0",
        "A3 multi-task, no attention|seed0",
        "C1 predict the training mean colour|seed0",
    }
    a3 = store["runs"]["A3 multi-task, no attention|seed0"]
    assert 0 <= a3["metrics"]["category.accuracy"] <= 1 and a3["revision"]
    assert (
        store["runs"]["C1 predict the training mean colour|seed0"]["metrics"]["shade.median_de2000"]
        > 0
    )
    table = results.with_suffix(".md").read_text()
    assert "| A3 multi-task, no attention" in table and "Table C" in table
    capsys.readouterr()
    assert bench.main(args) == 0  # every finished run is kept and skipped
    assert "== " not in capsys.readouterr().out
