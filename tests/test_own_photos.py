"""Fine-tuning a model on your own photos (configs/own_photos.yaml): the starting model's
other attributes are kept, a model is measured on the attributes your labels share with it,
and a run ends with its test report beside the starting model's, calibrated. Tiny models at
32 px on drawn photos: plumbing, not accuracy."""

from __future__ import annotations

import copy
import json

import torch
import yaml
from PIL import Image

from beautytag.checkpoint import load_checkpoint, save_checkpoint
from beautytag.config import config_from_dict
from beautytag.nn.net import BeautyTagNet
from beautytag.training.evaluate import evaluate
from beautytag.training.train import build_run, read_datasets, train

MODEL = {"weights": "none", "attention": "none", "image_size": 32}
START_CLASSES = ["Lipstick", "Mascara", "Other"]


def start_model(tmp_path) -> str:
    """A random starting model with category, shade and finish (as the shipped default has
    them, with a calibrated finish)."""
    raw = {
        "model": MODEL | {"temperatures": {"finish": 1.5}},
        "attributes": [
            {"name": "category", "kind": "single", "classes": START_CLASSES},
            {"name": "shade", "kind": "shade", "weight": 0.5},
            {"name": "finish", "kind": "single", "classes": ["matte", "gloss"], "weight": 0.5},
        ],
        "data": {"root": "../shared/datasets"},
    }
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    path = tmp_path / "start.pt"
    save_checkpoint(path, BeautyTagNet(cfg, pretrained=False), cfg)
    return str(path)


def own_raw(tmp_path, init: str, classes=("Lipstick", "Mascara"), **train_cfg) -> dict:
    """A config for a folder of 40 x 40 photos that labels only the category: 8 training,
    4 validation and 4 test photos (Lipstick and Mascara in turn)."""
    folder = tmp_path / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for i in range(n):
            colour = (200, 30, 60) if i % 2 == 0 else (20, 20, 20)
            Image.new("RGB", (40, 40), colour).save(folder / f"{split}{i}.jpg")
            rows.append(f"{split}{i}.jpg,{('Lipstick', 'Mascara')[i % 2]},{split}")
    (folder / "labels.csv").write_text("file_name,category,split\n" + "\n".join(rows) + "\n")
    category = {"name": "category", "kind": "single", "classes": list(classes)}
    return {
        "model": MODEL | {"init": init},
        "attributes": [category | {"sources": {"mine": {"column": "category"}}}],
        "data": {
            "root": str(tmp_path),
            "augment": False,
            "sources": [{"name": "mine", "path": "photos"}],
        },
        "train": {
            "epochs": 1,
            "freeze_epochs": 0,
            "batch_size": 4,
            "out_dir": str(tmp_path / "run"),
            "final_report": False,
            "calibrate": False,
        }
        | train_cfg,
    }


def heads(model: BeautyTagNet, name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(f"heads.{name}.")}


def test_fine_tuning_keeps_the_starting_models_other_attributes(tmp_path, capsys):
    start = start_model(tmp_path)
    result = train(config_from_dict(own_raw(tmp_path, start)), progress=False)
    out = capsys.readouterr().out
    assert f"kept from {start}: shade, finish" in out
    assert "finish classes with no training photo" not in out  # unlabelled by design
    assert result["kept"] == ["shade", "finish"]
    theirs, _, _ = load_checkpoint(start)
    best, cfg, _ = load_checkpoint(result["best"])
    assert cfg.schema.names == ["category", "shade", "finish"]
    assert [a.kind for a in cfg.schema.attributes] == ["single", "shade", "single"]
    assert cfg.schema["finish"].classes == ["matte", "gloss"]
    assert cfg.schema["finish"].weight == 0.5 and not cfg.schema["finish"].sources
    assert cfg.model.temperatures == {"finish": 1.5}  # its calibration kept too
    for name in ("shade", "finish"):  # no label reaches them: their heads are the start's
        ours, start_heads = heads(best, name), heads(theirs, name)
        assert ours and all(torch.equal(ours[k], start_heads[k]) for k in start_heads)


def test_the_kept_heads_start_as_the_starting_models(tmp_path):
    from beautytag.checkpoint import keep_start_attributes

    start = start_model(tmp_path)
    cfg = keep_start_attributes(config_from_dict(own_raw(tmp_path, start)))[0]
    run = build_run(cfg, read_datasets(cfg)[0], torch.device("cpu"))
    theirs = load_checkpoint(start)[0]
    for name in ("shade", "finish"):
        start_heads = heads(theirs, name)
        assert all(torch.equal(heads(run.model, name)[k], v) for k, v in start_heads.items())


def test_keep_attributes_false_drops_them(tmp_path, capsys):
    raw = own_raw(tmp_path, start_model(tmp_path))
    raw["model"]["keep_attributes"] = False
    result = train(config_from_dict(raw), progress=False)
    assert "kept from" not in capsys.readouterr().out
    assert load_checkpoint(result["best"])[1].schema.names == ["category"]


def test_a_kept_head_that_cannot_load_is_a_warning(tmp_path, capsys):
    raw = own_raw(tmp_path, start_model(tmp_path))
    raw["model"]["backbone"] = "resnet18"  # other features: the kept heads cannot load
    train(config_from_dict(raw), progress=False)
    out = capsys.readouterr().out
    assert "warning: model.backbone is 'resnet18'" in out
    assert "warning: the heads of shade, finish did not load" in out


def test_evaluate_measures_only_what_the_config_shares_with_the_model(tmp_path, capsys):
    from beautytag.cli import main

    start = start_model(tmp_path)
    raw = own_raw(tmp_path, start, classes=("lipstick", "Mascara", "Blush"))
    result = evaluate(start, "test", tmp_path / "eval", config_from_dict(raw))
    assert list(result["metrics"]) == ["category"] and result["metrics"]["category"]["n"] == 4
    assert result["not_compared"] == {
        "category": "photos of classes the model lacks left out: Blush",
        "shade": "the config does not label it",
        "finish": "the config does not label it",
    }
    # the model's other classes are possible (wrong) answers; the config's names are used
    assert result["per_class"]["category"][0]["class"] in ("lipstick", "Mascara", "Other")
    assert "- shade: the config does not label it" in (tmp_path / "eval/report.md").read_text()
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cli-eval"
    assert main(["evaluate", start, "--config", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not measured: finish: the config does not label it" in err
    assert json.loads((out / "report.json").read_text())["metrics"]["category"]["n"] == 4


def test_shared_classes_are_mapped_by_name_and_tags_restricted(tmp_path):
    import numpy as np

    from beautytag.schema import parse_schema
    from beautytag.training.evaluate import shared_answers

    model = parse_schema(
        [
            {"name": "category", "kind": "single", "classes": ["A", "B", "C"]},
            {"name": "function", "kind": "multi", "classes": ["x", "y"]},
            {"name": "finish", "kind": "single", "classes": ["m", "g"]},
        ]
    )
    data = parse_schema(
        [
            {"name": "category", "kind": "single", "classes": ["c", "Z", "a"]},
            {"name": "function", "kind": "multi", "classes": ["y", "w"]},
            {"name": "finish", "kind": "multi", "classes": ["m", "g"]},
        ]
    )
    outputs = {
        "category": np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]),
        "function": np.array([[0.9, 0.2], [0.1, 0.8], [0.5, 0.5]]),
        "finish": np.zeros((3, 2)),
    }
    targets = {
        "category": np.array([0, 2, 1]),  # c, a, Z (the model has no Z)
        "function": np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
        "finish": np.zeros((3, 2)),
    }
    masks = {k: np.ones(3, dtype=bool) for k in targets}
    schema, why, outs, tgts, msks = shared_answers(model, data, outputs, targets, masks)
    assert schema.names == ["category", "function"]
    assert schema["category"].classes == ["c", "a", "B"]  # shared, then the model's other
    assert outs["category"].tolist() == [[0.7, 0.1, 0.2], [0.1, 0.6, 0.3], [0.3, 0.2, 0.5]]
    assert tgts["category"][:2].tolist() == [0, 1] and msks["category"].tolist() == [1, 1, 0]
    assert schema["function"].classes == ["y"]
    assert outs["function"].tolist() == [[0.2], [0.8], [0.5]]
    assert tgts["function"].tolist() == [[1.0], [0.0], [0.0]]
    assert why == {
        "category": "photos of classes the model lacks left out: Z",
        "function": "photos of classes the model lacks left out: w",
        "finish": "a multi attribute in the config, single in the model",
    }


def test_a_run_ends_with_both_test_reports_and_a_calibrated_best(tmp_path, capsys):
    start = start_model(tmp_path)
    raw = own_raw(tmp_path, start)
    del raw["train"]["final_report"], raw["train"]["calibrate"]  # the defaults: on
    result = train(config_from_dict(copy.deepcopy(raw)), progress=False)
    out = capsys.readouterr().out
    run = tmp_path / "run"
    ours = json.loads((run / "test-report" / "report.json").read_text())
    theirs = json.loads((run / "start-test-report" / "report.json").read_text())
    assert ours["metrics"]["category"]["n"] == theirs["metrics"]["category"]["n"] == 4
    assert ours["images"] == theirs["images"] == 4  # the same photos
    assert result["test_report"] == str(run / "test-report" / "report.md")
    assert f"test split, 4 photos: this run | {start} (the starting model)" in out
    line = next(x for x in out.splitlines() if x.startswith("  category: n 4 | 4; accuracy "))
    assert line.count("|") == 3 and "macro-F1" in line  # n, accuracy, macro-F1 of both
    assert "calibrated" in out
    cfg = load_checkpoint(result["best"])[1]
    assert "category" in cfg.model.temperatures and cfg.model.temperatures["finish"] == 1.5
    assert set(result["temperatures"]) == {"category"}


def test_the_end_of_run_steps_can_be_turned_off_and_need_a_test_split(tmp_path, capsys):
    raw = own_raw(tmp_path, start_model(tmp_path))  # final_report and calibrate off
    result = train(config_from_dict(raw), progress=False)
    assert "test_report" not in result and not (tmp_path / "run" / "test-report").exists()
    assert load_checkpoint(result["best"])[1].model.temperatures == {"finish": 1.5}
    capsys.readouterr()
    del raw["train"]["final_report"]
    (tmp_path / "photos" / "labels.csv").write_text(
        (tmp_path / "photos" / "labels.csv").read_text().replace(",test", ",val")
    )
    result = train(config_from_dict(raw), progress=False)
    assert "no test photos: no final report" in capsys.readouterr().out
