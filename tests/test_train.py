"""Training on a user's own small folder of photos: the cases that used to fail late or
silently (no real photos needed)."""

import json
import math

import pytest
import torch
from PIL import Image

import beautytag.training.train as training
from beautytag.config import config_from_dict

train = training.train


def own_folder(tmp_path, rows: list[str], classes=("Lipstick", "Mascara"), **train_cfg):
    """A config for `tmp_path`/photos: one 40 x 40 photo per row `name,category,split`."""
    folder = tmp_path / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        name = row.split(",")[0]
        Image.new("RGB", (40, 40), (40 * (i % 6), 90, 160)).save(folder / name)
    (folder / "labels.csv").write_text("file_name,category,split\n" + "\n".join(rows) + "\n")
    attribute = {"name": "category", "kind": "single", "classes": list(classes)}
    source = {"name": "mine", "path": "photos"}
    out = str(tmp_path / "run")
    raw = {
        "model": {"weights": "none", "attention": "none", "image_size": 32},
        "attributes": [attribute | {"sources": {"mine": {"column": "category"}}}],
        "data": {"root": str(tmp_path), "augment": False, "sources": [source]},
        "train": {"epochs": 1, "freeze_epochs": 0, "batch_size": 4, "out_dir": out} | train_cfg,
    }
    return config_from_dict(raw)


def photos(n: int, split: str, labelled: bool = True) -> list[str]:
    label = lambda i: ("Lipstick", "Mascara")[i % 2] if labelled else ""  # noqa: E731
    return [f"{split}{i}.jpg,{label(i)},{split}" for i in range(n)]


def epochs_logged(cfg) -> list[dict]:
    with open(f"{cfg.train.out_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_batches_without_any_label_are_skipped_not_a_crash(tmp_path):
    # 12 unlabelled training photos first, then 4 labelled: most batches have no label at all
    labelled = [r.replace(",tr", ",train") for r in photos(4, "tr")]
    cfg = own_folder(tmp_path, photos(12, "train", labelled=False) + labelled + photos(4, "val"))
    train(cfg, progress=False)
    assert epochs_logged(cfg)[0]["train_loss"] > 0


def test_a_batch_larger_than_the_training_photos_still_trains(tmp_path):
    cfg = own_folder(tmp_path, photos(70, "train") + photos(4, "val"), batch_size=128)
    train(cfg, progress=False)
    record = epochs_logged(cfg)[0]
    assert record["images_per_s"] > 0 and record["train_loss"] > 0  # 0 steps before


def test_no_validation_photos_is_an_error_before_training(tmp_path):
    cfg = own_folder(tmp_path, photos(8, "train") + photos(2, "Test"))
    with pytest.raises(ValueError, match="no validation images: check .* train / val / test"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_refuses_a_model_of_other_classes_and_says_when_there_is_nothing(tmp_path, capsys):
    rows = photos(8, "train") + photos(4, "val")
    cfg = own_folder(tmp_path, rows)
    train(cfg, resume=True, progress=False)  # nothing to resume: starts, and says so
    assert "nothing to resume" in capsys.readouterr().out
    assert len(epochs_logged(cfg)) == 1
    other = own_folder(tmp_path, rows, classes=("Lipstick", "Mascara", "Other"), epochs=2)
    with pytest.raises(ValueError, match="cannot resume, its model differs .*heads.category"):
        train(other, resume=True, progress=False)


def test_a_photo_in_both_training_and_validation_is_reported(tmp_path, capsys):
    rows = photos(8, "train") + photos(4, "val") + ["train0.jpg,Lipstick,val"]
    train(own_folder(tmp_path, rows), progress=False)
    out = capsys.readouterr().out
    assert "warning: photos in both the training and the validation split" in out
    assert "flatter validation: 1, e.g." in out
    assert "train0.jpg" in out
    train(own_folder(tmp_path / "clean", photos(8, "train") + photos(4, "val")), progress=False)
    assert "warning" not in capsys.readouterr().out


def test_a_run_whose_validation_is_never_finite_fails_and_does_not_pass_off_an_earlier_best(
    tmp_path, monkeypatch
):
    cfg = own_folder(tmp_path, photos(8, "train") + photos(4, "val"))
    train(cfg, progress=False)  # an earlier run in the same folder
    earlier = (tmp_path / "run" / "best.pt").read_bytes()
    cfg.model.init = str(tmp_path / "run" / "best.pt")  # fine-tuned from it, into its folder
    monkeypatch.setattr(training, "validate", lambda *a, **k: (math.nan, {}))  # diverged
    with pytest.raises(ValueError, match="no best.pt \\(the best.pt there is an earlier run's"):
        train(cfg, progress=False)
    assert (tmp_path / "run" / "best.pt").read_bytes() == earlier  # kept: it was the start


def interrupted(monkeypatch, epoch: int, before_saving: bool):
    """Make training stop by Ctrl-C when it writes last.pt after `epoch` (0-based)."""
    save = training.save_checkpoint

    def saving(path, model, cfg, extra=None, **kwargs):
        stop = path.name == "last.pt" and extra["epoch"] == epoch
        if stop and before_saving:
            raise KeyboardInterrupt
        save(path, model, cfg, extra, **kwargs)
        if stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", saving)
    return lambda: monkeypatch.setattr(training, "save_checkpoint", save)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_interrupted_and_resumed_run_is_the_uninterrupted_one(tmp_path, monkeypatch, workers):
    rows = photos(16, "train") + photos(4, "val")
    straight = own_folder(tmp_path / "a", rows, epochs=3, workers=workers)
    train(straight, progress=False)
    cut = own_folder(tmp_path / "b", rows, epochs=3, workers=workers)
    undo = interrupted(monkeypatch, epoch=1, before_saving=workers == 0)  # or while saving
    with pytest.raises(KeyboardInterrupt):
        train(cut, progress=False)
    undo()
    train(cut, resume=True, progress=False)
    assert [r["epoch"] for r in epochs_logged(cut)] == [1, 2, 3]  # epoch 2 logged once
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_class_with_no_training_photo_is_reported(tmp_path, capsys):
    rows = photos(8, "train") + photos(4, "val")
    train(own_folder(tmp_path, rows, classes=("Lipstik", "Mascara")), progress=False)
    out = capsys.readouterr().out
    assert "warning: category classes with no training photo (a typo in the config" in out
    assert out.count("Lipstik") == 1


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"garbage, not a checkpoint", "not a beautytag checkpoint"),
        (None, "not a last.pt that `beautytag train` writes (no criterion)"),  # a best.pt
    ],
)
def test_resume_from_a_garbage_last_pt_is_a_one_line_error(tmp_path, capsys, content, problem):
    import yaml

    from beautytag.cli import main

    cfg = own_folder(tmp_path, photos(4, "train") + photos(2, "val"))
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    if content is None:  # a real checkpoint, but without the training state
        from beautytag.checkpoint import save_checkpoint
        from beautytag.nn.net import BeautyTagNet

        save_checkpoint(last, BeautyTagNet(cfg, pretrained=False), cfg)
    else:
        last.write_bytes(content)
    assert main(["train", str(config), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"beautytag train: error: {last}: ") and problem in err
    assert "\n" not in err and "Traceback" not in err
