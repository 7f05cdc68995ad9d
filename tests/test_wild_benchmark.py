"""benchmarks/wild.py's rows file, its shipping rule and its run-folder checks, on made-up
results (no photos, no training)."""

from __future__ import annotations

import pytest
import yaml

from .test_benchmarks import load


def val(wild: float, pc: float, shade: float, false: dict[str, float] | None = None) -> dict:
    """A stored result's validation columns; `false`: each threshold's false rejection."""
    rejection = None
    if false is not None:
        by = {
            n: {
                str(round(0.05 * i, 2)): false.get(str(round(0.05 * i, 2)), 0.0)
                for i in range(1, 11)
            }
            for n in ("pc", "shades", "wild", "noncosmetic")
        }
        rejection = {"rates": {n: 0.0 for n in by}, "by_threshold": by}
    return {
        "columns": {
            "val": {
                "wild": {"accuracy": wild},
                "pc": {"accuracy": pc},
                "shades": {"median_de2000": shade},
                "rejection": rejection,
            }
        }
    }


ROWS = {
    "W1": {"description": "default", "kind": "shipped", "model": "default"},
    "W4": {"description": "+ wild, + negatives", "kind": "train", "changes": {}},
    "W5": {"description": "+ wild, + negatives, + composites", "kind": "train"},
    "W6": {"description": "WiSE-FT of W4", "kind": "wise", "of": "W4", "alpha": 0.5},
}


def test_pick_applies_the_rule_on_validation():
    report = load("wild_report")
    store = {
        "rows": {
            "W1": val(0.20, 0.80, 3.0),
            "W4|seed0": val(0.50, 0.79, 3.2, {"0.5": 0.05, "0.45": 0.04}),
            "W5|seed0": val(0.505, 0.79, 3.2, {"0.5": 0.05}),
        }
    }
    lines = report.pick(store, ROWS)
    # W5 is within 0.01 of W4: the row with fewer additions (W4, 2 against 3) ships
    assert lines[-1] == "decision: W4 replaces the default (gate threshold 0.4)"
    assert report.rule_threshold(store, "W5", ROWS["W5"]) == 0.45
    assert report.additions(ROWS["W6"], ROWS) == 3  # W4's two, and itself
    # three seeds: their mean decides; (c) the shade may rise by 0.3 at most
    store["rows"]["W4|seed1"] = val(0.395, 0.79, 3.5)
    store["rows"]["W4|seed2"] = val(0.395, 0.79, 3.5)
    store["rows"]["W5|seed0"] = val(0.52, 0.70, 3.2)
    assert report.rule_value(store, "W4", ROWS["W4"], ("val", "wild", "accuracy")) == pytest.approx(
        0.43
    )
    assert (
        report.pick(store, ROWS)[-1] == "decision: the default stays (W5, the best by (a), fails b)"
    )


def test_rows_are_checked(tmp_path):
    wild = load("wild")
    assert "W4" in wild.read_rows()  # the committed rows file
    bad = tmp_path / "rows.yaml"
    for row, problem in [
        ({"description": "x", "kind": "train", "epochs": 3}, "unknown field epochs"),
        ({"description": "x", "kind": "wise", "of": "W1", "alpha": 0.5}, "is not a"),
        ({"description": "x", "kind": "soup"}, "kind must be one of"),
    ]:
        bad.write_text(yaml.safe_dump({"W1": ROWS["W1"], "W9": row}))
        with pytest.raises(ValueError, match=problem):
            wild.read_rows(bad)


def test_train_config_and_a_run_with_other_settings(tmp_path):
    models = load("wild_models")
    row = {"changes": {"train.epochs": 3, "model.init": "default"}}
    cfg = models.train_config(row, 2, tmp_path, "W4", tmp_path / "data", quick=False)
    assert (cfg.train.epochs, cfg.train.seed, cfg.model.init) == (3, 2, "default")
    assert cfg.train.out_dir == str(tmp_path / "W4-s2")
    assert models.run_state(tmp_path / "W4-s2", cfg) == ("fresh", 0)
    (tmp_path / "W4-s2").mkdir()
    (tmp_path / "W4-s2" / "best.pt").write_bytes(b"")
    with pytest.raises(models.SkipRow, match="no last.pt"):
        models.run_state(tmp_path / "W4-s2", cfg)
