"""Temperature scaling: fitting, the calibrated model, and every path that answers with it."""

import json

import numpy as np
import pytest
import torch

from beautytag.checkpoint import load_checkpoint
from beautytag.cli import main
from beautytag.config import config_from_dict
from beautytag.export import export_onnx, parity_check, synthetic_photos
from beautytag.runtime.engine import Engine
from beautytag.runtime.onnx import ExportWrapper, onnx_metadata
from beautytag.schema import SchemaError
from beautytag.training.calibrate import calibrate, fit_temperature, nll
from beautytag.training.evaluate import evaluate

from .conftest import default_raw, make_tiny_model


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at():
    """Labels drawn from softmax(z / 2.5): the fitted temperature is near 2.5, and it lowers
    the negative log-likelihood against T = 1."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(4000, 5))
    p = torch.softmax(torch.from_numpy(z) / 2.5, -1).numpy()
    y = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.1)
    assert nll(z, y, t) < nll(z, y, 1.0) and nll(z, y, t) <= nll(z, y, t * 1.2)
    # over-cautious scores (the true temperature below 1) give T < 1
    p = torch.softmax(torch.from_numpy(z) / 0.5, -1).numpy()
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(z, y) == pytest.approx(0.5, rel=0.1)


def test_model_temperatures_must_name_class_attributes_and_be_positive():
    raw = default_raw()
    for temperatures, problem in (
        ({"function": 2.0}, "not a class attribute"),
        ({"shade": 2.0}, "not a class attribute"),
        ({"category": 0}, "must be above 0"),
        ({"category": "hot"}, "must be above 0"),
        ({"category": float("inf")}, "at most 100"),  # would tie every class
        ({"category": float("nan")}, "must be above 0"),
        (["category"], "must map class attributes to numbers"),
    ):
        with pytest.raises(SchemaError, match=problem):
            config_from_dict(raw | {"model": raw["model"] | {"temperatures": temperatures}})
    cfg = config_from_dict(raw | {"model": raw["model"] | {"temperatures": {"category": 2}}})
    assert cfg.model.temperatures == {"category": 2}


def test_activated_divides_class_logits_by_the_temperature_only(tmp_path):
    path = make_tiny_model(tmp_path / "m.pt", {"temperatures": {"category": 4.0}})
    model, _, _ = load_checkpoint(path)
    y = model(torch.zeros(2, 3, 64, 64))
    out = model.activated(y)
    torch.testing.assert_close(out["category"], torch.softmax(y["category"] / 4.0, -1))
    torch.testing.assert_close(out["color"], torch.softmax(y["color"], -1))  # none: T = 1
    torch.testing.assert_close(out["function"], torch.sigmoid(y["function"]))
    torch.testing.assert_close(out["shade"], y["shade"])


def test_calibrate_writes_a_model_with_the_same_answers_and_fitted_temperatures(datasets, tmp_path):
    src = make_tiny_model(tmp_path / "tiny.pt", limit=24)
    out = tmp_path / "cal.pt"
    report = calibrate(src, out, split="val")
    _, cfg, ckpt = load_checkpoint(out)
    single = [a.name for a in cfg.schema.attributes if a.kind == "single"]
    assert set(cfg.model.temperatures) == {n for n in single if n in report}
    for name in cfg.model.temperatures:
        r = report[name]
        assert r["temperature"] == cfg.model.temperatures[name] > 0
        assert r["nll"][1] <= r["nll"][0]  # fitted on this split: never worse on it
    # the weights are the same; only the scores of class attributes move
    before, _, _ = load_checkpoint(src)
    after, _, _ = load_checkpoint(out)
    for k, v in before.state_dict().items():
        torch.testing.assert_close(after.state_dict()[k], v)
    photos = synthetic_photos(tmp_path / "photos", n=6)
    a = [p.to_dict() for p in Engine(src).predict_files(photos)]
    b = [p.to_dict() for p in Engine(out).predict_files(photos)]
    for x, y in zip(a, b, strict=True):
        for name in single:
            assert x["attributes"][name]["label"] == y["attributes"][name]["label"]
        assert x["attributes"]["shade"] == y["attributes"]["shade"]
        assert x["attributes"]["function"] == y["attributes"]["function"]
    moved = [n for n in single if cfg.model.temperatures.get(n, 1.0) != 1.0]
    assert any(a[0]["attributes"][n]["score"] != b[0]["attributes"][n]["score"] for n in moved)
    # calibrating again composes: the temperature is that of the whole scaling
    again = calibrate(out, tmp_path / "cal2.pt", split="val")
    name = moved[0]
    assert again[name]["temperature"] == pytest.approx(report[name]["temperature"], rel=0.02)


def test_onnx_export_and_evaluate_answer_with_the_temperatures(datasets, tmp_path):
    path = make_tiny_model(tmp_path / "m.pt", {"temperatures": {"category": 0.25}}, limit=12)
    model, cfg, _ = load_checkpoint(path)
    x = torch.randn(2, 3, 64, 64)
    names = cfg.schema.names
    exported = dict(zip(names, ExportWrapper(model)(x), strict=True))
    torch.testing.assert_close(exported["category"], torch.softmax(model(x)["category"] / 0.25, -1))
    onnx = export_onnx(path, tmp_path / "m.onnx")
    photos = synthetic_photos(tmp_path / "photos", n=4)
    assert parity_check(path, onnx, photos)["max_abs_diff"] < 1e-3
    outputs = {o["name"]: o for o in onnx_metadata(onnx)["outputs"]}
    assert outputs["category"]["activation"] == "softmax of the logits / 0.25"
    assert outputs["color"]["activation"] == "softmax"
    # evaluate's probabilities are the scaled ones: a far sharper category head has many
    # more scores of 0.9 or more than the same weights at T = 1
    sharp = make_tiny_model(tmp_path / "sharp.pt", {"temperatures": {"category": 0.01}}, limit=12)
    plain = make_tiny_model(tmp_path / "plain.pt", limit=12)
    kept = [evaluate(m, split="val")["confidence"]["category"][-1]["n"] for m in (sharp, plain)]
    assert kept[0] > kept[1]


def test_cli_calibrate_refuses_to_overwrite_and_reports(datasets, tmp_path, capsys):
    src = make_tiny_model(tmp_path / "tiny.pt", limit=24)
    assert main(["calibrate", str(src), "--out", str(src)]) == 2
    assert "would overwrite the model" in capsys.readouterr().err
    assert main(["calibrate", str(src), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "must end in .pt" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "none.pt")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main(["calibrate", str(src)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and (tmp_path / "tiny-calibrated.pt").is_file()
    assert report["category"]["n"] > 0


def test_a_fit_that_runs_to_its_bound_leaves_the_temperature_and_says_so(
    datasets, tmp_path, monkeypatch, capsys
):
    import beautytag.training.calibrate as cal

    real = cal.split_outputs

    def all_right(*args, **kwargs):  # every category answer right: the NLL falls as T -> 0
        cfg, names, outputs, targets, masks = real(*args, **kwargs)
        targets["category"] = outputs["category"].argmax(1).astype(targets["category"].dtype)
        return cfg, names, outputs, targets, masks

    monkeypatch.setattr(cal, "split_outputs", all_right)
    src = make_tiny_model(tmp_path / "tiny.pt", {"temperatures": {"category": 0.5}}, limit=24)
    assert main(["calibrate", str(src), "--out", str(tmp_path / "c1.pt")]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["category"]["temperature"] == 0.5  # left as it was
    assert "category: the fit ran to its bound" in report["category"]["warning"]
    assert "warning: category: the fit ran to its bound" in err
    monkeypatch.setattr(cal, "split_outputs", real)
    path = tmp_path / "c1.pt"
    for i in range(3):  # calibrating again and again keeps a model that loads
        calibrate(path, tmp_path / f"c{i + 2}.pt", split="val")
        path = tmp_path / f"c{i + 2}.pt"
        _, cfg, _ = load_checkpoint(path)
        assert all(0.01 <= t <= 100 for t in cfg.model.temperatures.values())
