"""The "not a cosmetic" gate (model.gate): its config, the threshold rule, and every path that
answers with null labels for a photo it rejects."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from beautytag.checkpoint import load_checkpoint
from beautytag.cli import main
from beautytag.config import config_from_dict, load_config
from beautytag.export import export_onnx, synthetic_photos
from beautytag.runtime.engine import Engine
from beautytag.runtime.gate import GRID, choose_threshold, rejection_rates
from beautytag.schema import SchemaError
from beautytag.serve.app import create_app
from beautytag.serve.settings import ServeSettings
from beautytag.training.calibrate import calibrate_gate

from .conftest import default_raw, make_tiny_model

GATE = {"attribute": "cosmetic", "accept": "yes", "threshold": 0.5}
CLASS_ATTRIBUTES = ("category", "color", "finish")


def with_gate(gate: object) -> dict:
    raw = default_raw()
    return raw | {"model": raw["model"] | {"gate": gate}}


# --- config -------------------------------------------------------------------------------


def test_default_config_has_the_gate():
    cfg = config_from_dict(default_raw())
    assert cfg.model.gate == GATE
    assert cfg.to_dict()["model"]["gate"] == GATE  # saved with the model


@pytest.mark.parametrize(
    ("gate", "problem"),
    [
        ("cosmetic", "model.gate must be a mapping"),
        (
            {"attribute": "cosmetic", "accept": "yes", "level": 1},
            r"model.gate: unknown keys \['level'\]",
        ),
        ({"accept": "yes"}, "model.gate.attribute must name a single-label attribute"),
        ({"attribute": "lipstick", "accept": "yes"}, "got 'lipstick'"),
        ({"attribute": "function", "accept": "waterproof"}, "model.gate.attribute must name"),
        ({"attribute": "shade", "accept": "yes"}, "model.gate.attribute must name"),
        ({"attribute": "cosmetic", "accept": "maybe"}, "model.gate.accept must be one of cosmetic"),
        ({"attribute": "cosmetic", "accept": 1}, "model.gate.accept must be one of"),
        ({"attribute": "cosmetic", "accept": "yes", "threshold": 0}, "threshold must be in"),
        ({"attribute": "cosmetic", "accept": "yes", "threshold": 1}, "threshold must be in"),
        ({"attribute": "cosmetic", "accept": "yes", "threshold": "high"}, "threshold must be in"),
        ({"attribute": "cosmetic", "accept": "yes", "threshold": True}, "threshold must be in"),
        ({"attribute": "cosmetic", "accept": "yes", "threshold": float("nan")}, "threshold"),
    ],
)
def test_a_bad_gate_is_an_error_naming_the_key(gate, problem):
    with pytest.raises(SchemaError, match=problem):
        config_from_dict(with_gate(gate), where="my.yaml")


def test_gate_defaults_and_errors_from_a_file(tmp_path):
    cfg = config_from_dict(with_gate({"attribute": "cosmetic", "accept": "YES"}))
    assert cfg.model.gate == GATE  # the class as the schema spells it; threshold 0.5
    assert config_from_dict(with_gate({})).model.gate == {}
    raw = default_raw()
    raw["attributes"] = [a for a in raw["attributes"] if a["name"] != "cosmetic"]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SchemaError, match=r"^.*mine.yaml: model.gate.attribute must name") as e:
        load_config(path)
    assert "\n" not in str(e.value)


# --- the threshold rule ---------------------------------------------------------------------


def scores(*groups: tuple[str, bool, list[float]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    p, accepted, sources = [], [], []
    for source, cosmetic, values in groups:
        p += values
        accepted += [cosmetic] * len(values)
        sources += [source] * len(values)
    return np.array(p), np.array(accepted), sources


def test_the_rule_takes_the_highest_threshold_that_rejects_at_most_3_percent_of_each_source():
    # shop: 1 % of its photos below 0.03, 3 % below 0.13; wild: 3 % at 0.30, a 4th at 0.41
    p, accepted, sources = scores(
        ("shop", True, [0.02, 0.12, 0.12] + [0.9] * 97),
        ("wild", True, [0.30, 0.30, 0.30, 0.41] + [0.95] * 96),
        ("others", False, [0.1] * 50 + [0.6] * 50),  # negatives never count
    )
    assert GRID == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    assert choose_threshold(p, accepted, sources) == 0.4  # 0.45 would reject 4 % of wild
    rates = rejection_rates(p, accepted, sources, 0.4)
    assert rates["sources"] == {
        "shop": {"n": 100, "rejected": 0.03},
        "wild": {"n": 100, "rejected": 0.03},
    }
    assert rates["negatives"] == {"n": 100, "rejected": 0.5}
    # a score equal to the threshold is accepted: 0.30 is not rejected at 0.30
    assert rejection_rates(p, accepted, sources, 0.3)["sources"]["wild"]["rejected"] == 0.0
    # every cosmetic scored high: the highest, 0.5
    assert choose_threshold(*scores(("shop", True, [0.99] * 10))) == 0.5


def test_the_rule_falls_back_to_005_when_no_threshold_qualifies():
    p, accepted, sources = scores(
        ("shop", True, [0.9] * 100), ("wild", True, [0.01] * 10 + [0.9] * 90)
    )
    assert choose_threshold(p, accepted, sources) == 0.05
    assert rejection_rates(p, accepted, sources, 0.05)["sources"]["wild"]["rejected"] == 0.1


def test_a_gate_without_labels_is_calibrated_on_every_photo_as_a_cosmetic():
    """Fine-tuning on your own photos keeps the default's gate, which they do not label: the
    threshold is chosen with every validation photo taken as of the accepted class."""
    schema = config_from_dict(default_raw()).schema
    yes = schema["cosmetic"].classes.index("yes")
    p_yes = np.array([0.9] * 95 + [0.42] * 5)  # 5 % of the photos between 0.4 and 0.45
    probs = np.zeros((100, 2))
    probs[:, yes], probs[:, 1 - yes] = p_yes, 1 - p_yes
    outputs, targets = {"cosmetic": probs}, {"cosmetic": np.zeros(100)}
    masks = {"cosmetic": np.zeros(100)}  # nobody labels it
    report = calibrate_gate(GATE, schema, outputs, targets, masks, ["mine"] * 100)
    assert report["threshold"] == 0.4 and report["sources"]["mine"] == {"n": 100, "rejected": 0}
    assert "taken as cosmetic = yes" in report["note"]
    masks = {"cosmetic": np.ones(100)}  # labelled, all "no": nothing to calibrate on
    targets = {"cosmetic": np.full(100, 1 - yes)}
    report = calibrate_gate(GATE, schema, outputs, targets, masks, ["mine"] * 100)
    assert report["threshold"] == 0.5 and "threshold left at 0.5" in report["warning"]


# --- answering ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return synthetic_photos(tmp_path_factory.mktemp("photos"), n=3)


@pytest.fixture(scope="module")
def rejecting(tmp_path_factory):
    """A tiny model whose gate sees P(yes) = 0.22 for every photo: below its 0.5."""
    return make_tiny_model(tmp_path_factory.mktemp("gate") / "no.pt", cosmetic=0.22)


@pytest.fixture(scope="module")
def accepting(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gate") / "yes.pt", cosmetic=0.9)


def assert_rejected(attributes: dict) -> None:
    """Null labels, tags and shade, the scores kept; the gate's own answer as usual."""
    assert attributes["cosmetic"]["label"] == "no"
    assert attributes["cosmetic"]["score"] == pytest.approx(0.78, abs=1e-3)
    for name in CLASS_ATTRIBUTES:
        a = attributes[name]
        assert a["label"] is None and a["score"] == a["top"][0][1] and len(a["top"]) == 3
    assert attributes["function"]["labels"] is None and len(attributes["function"]["scores"]) == 6
    assert attributes["shade"] == {"lab": None, "hex": None}


def assert_answered(attributes: dict, cosmetic: str = "yes") -> None:
    assert attributes["cosmetic"]["label"] == cosmetic  # the gate's own answer, as usual
    for name in CLASS_ATTRIBUTES:
        assert attributes[name]["label"] == attributes[name]["top"][0][0]
    assert isinstance(attributes["function"]["labels"], list)
    assert attributes["shade"]["hex"].startswith("#") and len(attributes["shade"]["lab"]) == 3


def test_engine_nulls_the_answers_of_a_photo_below_the_threshold(rejecting, accepting, photos):
    for backend in ("torch", "onnxruntime"):
        [pred] = Engine(rejecting, backend=backend).predict_files(photos[:1])
        assert pred["category"].label is None and pred["shade"].hex is None
        assert pred["function"].labels is None
        assert_rejected(pred.to_dict()["attributes"])
        [pred] = Engine(accepting, backend=backend).predict_files(photos[:1])
        assert_answered(pred.to_dict()["attributes"])
    # the same weights under a lower threshold: answered
    low = make_tiny_model(rejecting.with_name("low.pt"), {"gate": GATE | {"threshold": 0.2}}, 0.22)
    answer = next(Engine(low).predict_files(photos[:1])).to_dict()["attributes"]
    assert_answered(answer, cosmetic="no")  # its top class, yet P(yes) = 0.22 passes 0.2


def test_exported_models_keep_the_gate(rejecting, photos, tmp_path):
    onnx = export_onnx(rejecting, tmp_path / "no.onnx")
    engine = Engine(onnx)
    assert engine.backend.name == "onnxruntime" and engine.cfg.model.gate == GATE
    for pred in engine.predict_files(photos):
        assert_rejected(pred.to_dict()["attributes"])


def test_predict_writes_null_json_and_empty_csv_and_parquet_cells(
    rejecting, photos, tmp_path, capsys
):
    assert main(["predict", "--model", str(rejecting), str(photos[0])]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert_rejected(json.loads(line)["attributes"])
    out = tmp_path / "tags.csv"
    assert main(["predict", "--model", str(rejecting), *map(str, photos), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    for row in rows:
        assert row["error"] == "" and row["cosmetic"] == "no"
        assert row["category"] == row["color"] == row["finish"] == row["function"] == ""
        assert row["shade"] == row["shade_lab"] == "" and float(row["category_score"]) > 0
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "tags.parquet"
    assert main(["predict", "--model", str(rejecting), *map(str, photos), "-o", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["category"] for r in table] == [None] * 3 and table[0]["category_score"] > 0
    assert table[0]["function"] is None and table[0]["shade"] is None
    assert table[0]["shade_lab"] is None and table[0]["cosmetic"] == "no"


def test_the_service_answers_null_labels_and_documents_them(rejecting, accepting, photos):
    data = photos[0].read_bytes()
    for model, check in ((rejecting, assert_rejected), (accepting, assert_answered)):
        engine = Engine(model, backend="torch")
        with TestClient(create_app(engine, ServeSettings())) as client:
            r = client.post("/v1/predict", files=[("file", ("a.jpg", data, "image/jpeg"))])
            assert r.status_code == 200
            [result] = r.json()["results"]
            check(result["attributes"])
            assert result == next(engine.predict_items([("a.jpg", data)])).to_dict()
            assert client.get("/healthz").json()["gate"] == GATE
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"type": "null"} in spec["ClassAnswer"]["properties"]["label"]["anyOf"]
    assert {"type": "null"} in spec["TagsAnswer"]["properties"]["labels"]["anyOf"]
    assert {"type": "null"} in spec["ShadeAnswer"]["properties"]["hex"]["anyOf"]
    assert "not a cosmetic" in spec["ClassAnswer"]["properties"]["label"]["description"]


# --- calibration and evaluation ------------------------------------------------------------


def test_calibrate_sets_the_threshold_by_the_rule(datasets, tmp_path, capsys):
    """P(yes) is 0.22 for every photo (its temperature cannot move it above 0.5: the fit runs
    to its bound and leaves it): 0.20 is the highest threshold that rejects none."""
    src = make_tiny_model(tmp_path / "tiny.pt", cosmetic=0.22, limit=16)
    out = tmp_path / "cal.pt"
    assert main(["calibrate", str(src), "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    gate = json.loads(stdout)["gate"]
    assert gate["threshold"] == 0.2 and gate["previous"] == 0.5
    assert set(gate["sources"]) == {"fashion", "shades", "wild"}  # the cosmetics sources
    assert all(r["n"] > 0 and r["rejected"] == 0.0 for r in gate["sources"].values())
    assert gate["negatives"]["n"] > 0 and gate["negatives"]["rejected"] == 0.0  # others
    assert "val split: gate cosmetic = yes: threshold 0.2; rejected: fashion 0.0% of" in err
    _, cfg, _ = load_checkpoint(out)
    assert cfg.model.gate == GATE | {"threshold": 0.2}
    photo = synthetic_photos(tmp_path / "p", n=1)
    assert next(Engine(src).predict_files(photo))["category"].label is None
    assert next(Engine(out).predict_files(photo))["category"].label is not None


def test_evaluate_reports_what_the_gate_rejects(datasets, tmp_path):
    from beautytag.training.evaluate import evaluate

    src = make_tiny_model(tmp_path / "tiny.pt", cosmetic=0.22, limit=8)
    report = evaluate(src, "test", tmp_path / "ev")
    gate = report["gate"]
    assert gate["threshold"] == 0.5 and gate["sources"]["wild"]["rejected"] == 1.0
    assert gate["negatives"]["rejected"] == 1.0
    assert (
        "Not a cosmetic: gate cosmetic = yes: threshold 0.5"
        in (tmp_path / "ev" / "report.md").read_text()
    )


def test_a_search_index_holds_rejected_photos_that_no_filter_or_shade_matches(
    rejecting, accepting, photos, tmp_path
):
    from beautytag.search import Index

    preds = [next(Engine(m).predict_files(photos[:1])) for m in (rejecting, accepting)]
    records = [p.to_dict()["attributes"] for p in preds]
    label = records[1]["category"]["label"]
    vectors = np.eye(2, 8, dtype=np.float32)
    index = Index.create(
        tmp_path / "idx", "tiny@00000000", 8, vocabulary=Engine(accepting).vocabulary()
    )
    index.add(["no.jpg", "yes.jpg"], vectors, records)
    index.save()
    index = Index.open(tmp_path / "idx")
    [hits] = index.search(vectors[0], top_k=2)  # found by photo, its nulls as they were
    assert hits[0].file == "no.jpg" and hits[0].attributes == records[0]
    [hits] = index.search(vectors[0], top_k=2, where={"category": label})
    assert [h.file for h in hits] == ["yes.jpg"]
    for tag in records[1]["function"]["scores"]:  # the rejected photo has no tag to match
        has = tag in [t for t, _ in records[1]["function"]["labels"]]
        assert index.count({"function": tag}) == int(has)
    shade = index.search_shade(records[1]["shade"]["hex"], top_k=2)
    assert [h.file for h in shade] == ["yes.jpg"]


def test_training_ends_saying_what_the_gate_rejects(datasets, tmp_path, capsys):
    """train.calibrate and train.final_report: the threshold chosen on validation and the
    shares it rejects on the validation and test splits, one line each."""
    from beautytag.training.fine_tune import calibrate_best, final_report

    best = make_tiny_model(tmp_path / "best.pt", cosmetic=0.22, limit=16)
    _, cfg, _ = load_checkpoint(best)
    calibrate_best(best, cfg)
    final_report(tmp_path, cfg, "cpu")
    out = capsys.readouterr().out
    assert "validation split: gate cosmetic = yes: threshold 0.2; rejected: fashion 0.0% of" in out
    line = next(x for x in out.splitlines() if x.startswith("test split: gate"))
    assert "threshold 0.2;" in line and "wild 0.0% of" in line and "negatives 0.0% of" in line
    report = json.loads((tmp_path / "test-report" / "report.json").read_text())
    assert report["gate"]["threshold"] == 0.2
