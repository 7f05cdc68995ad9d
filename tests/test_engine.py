import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beautytag.checkpoint import SHIPPED_MODELS, default_model_path, resolve_model
from beautytag.cli import main
from beautytag.images import ImageError, load_image
from beautytag.runtime.engine import Engine, expand_paths


@pytest.fixture
def photo_folder(tmp_path):
    """Good photos and every kind of bad file, side by side."""
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (60, 80), (200, 30, 60)).save(d / "a_good.jpg")
    Image.new("RGBA", (50, 50), (0, 0, 255, 128)).save(d / "b_png_named.jpg", format="PNG")
    Image.new("CMYK", (40, 40), (0, 200, 100, 0)).save(d / "c_cmyk.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 10)).save(buf, format="JPEG")
    (d / "d_truncated.jpg").write_bytes(buf.getvalue()[:500])
    (d / "e_text.jpg").write_text("this is not an image")
    (d / "f_empty.png").write_bytes(b"")
    Image.new("L", (30, 30), 128).save(d / "g_grey.webp", format="WEBP")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


def test_batch_prediction_reports_bad_files_and_keeps_the_rest(tiny_model, photo_folder):
    engine = Engine(tiny_model, batch_size=3)
    files = expand_paths([photo_folder])
    assert [f.name for f in files] == [
        "a_good.jpg",
        "b_png_named.jpg",
        "c_cmyk.jpg",
        "d_truncated.jpg",
        "e_text.jpg",
        "f_empty.png",
        "g_grey.webp",
    ]
    results = [
        r.to_dict() for r in engine.predict_files([photo_folder, photo_folder / "missing.jpg"])
    ]
    assert [r["file"].split("/")[-1] for r in results] == [f.name for f in files] + ["missing.jpg"]
    errors = {r["file"].split("/")[-1]: r["error"] for r in results}
    assert errors["a_good.jpg"] is None and errors["b_png_named.jpg"] is None
    assert errors["c_cmyk.jpg"] is None and errors["g_grey.webp"] is None
    assert "truncated" in errors["d_truncated.jpg"]
    assert "not an image" in errors["e_text.jpg"] and "not an image" in errors["f_empty.png"]
    assert errors["missing.jpg"] == "file not found"
    good = results[0]["attributes"]
    assert set(good) == {"category", "cosmetic", "color", "shade", "finish", "function"}
    cat = good["category"]
    assert cat["label"] == cat["top"][0][0] and len(cat["top"]) == 3
    assert 0 <= cat["score"] <= 1 and cat["top"][0][1] >= cat["top"][1][1]
    assert good["shade"]["hex"].startswith("#") and len(good["shade"]["lab"]) == 3
    assert set(good["function"]["scores"]) == {
        "sun_protection",
        "waterproof",
        "long_lasting",
        "moisturising",
        "anti_ageing",
        "brightening",
    }
    assert all(r["attributes"] is None for r in results if r["error"])


def test_same_image_same_answer_whatever_the_batch(tiny_model, photo_folder):
    a = [r.to_dict() for r in Engine(tiny_model, batch_size=1).predict_files([photo_folder])]
    b = [r.to_dict() for r in Engine(tiny_model, batch_size=16).predict_files([photo_folder])]
    for x, y in zip(a, b, strict=True):
        if x["attributes"]:
            assert x["attributes"]["category"]["label"] == y["attributes"]["category"]["label"]
            assert x["attributes"]["shade"]["lab"] == pytest.approx(
                y["attributes"]["shade"]["lab"], abs=0.05
            )


def test_cli_predict_jsonl_and_csv(tiny_model, photo_folder, capsys, tmp_path):
    # a skipped photo makes the exit status 1; the others are still all written
    assert main(["predict", "--model", str(tiny_model), str(photo_folder)]) == 1
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 7 and sum(r["error"] is not None for r in lines) == 3
    assert "7 images (3 skipped with errors)" in err and "images/s" in err
    assert main(["predict", "--model", str(tiny_model), str(photo_folder / "a_good.jpg")]) == 0
    assert "1 image (0 skipped with errors)" in capsys.readouterr().err
    csv_path = tmp_path / "out.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_model),
                "--format",
                "csv",
                "-o",
                str(csv_path),
                str(photo_folder / "a_good.jpg"),
                str(photo_folder / "e_text.jpg"),
            ]
        )
        == 1
    )
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith(
        "file,error,model,category,category_score,cosmetic,cosmetic_score,color"
    )
    assert len(rows) == 3 and "not an image" in rows[2]


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope.pt"), "x.jpg"]) == 2
    assert "model file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {attention: magic}\nattributes: []\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "Traceback" not in err


def test_cli_predict_output_problems_are_one_line_and_never_lose_a_photo(
    tiny_model, photo_folder, capsys, tmp_path
):
    photo = photo_folder / "a_good.jpg"
    before = photo.read_bytes()
    run = ["predict", "--model", str(tiny_model)]
    assert main([*run, str(photo), "-o", str(photo)]) == 2  # would overwrite the photo
    assert "would overwrite a photo to predict" in capsys.readouterr().err
    assert photo.read_bytes() == before
    assert main([*run, str(photo), "-o", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err
    assert main([*run, str(photo), ""]) == 2  # would walk the current folder
    assert "an empty path was given" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # no photos found: nothing written, exit 2 (issue 36)
    assert main([*run, "--format", "csv", str(tmp_path / "empty")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no photos found in" in err


def test_cli_predict_writes_a_file_name_that_is_not_utf8_as_its_bytes(tiny_model, tmp_path):
    odd = Path(tmp_path.joinpath("b").__fspath__() + "\udcff.jpg")  # the bytes b"b\xff.jpg"
    Image.new("RGB", (60, 80), (200, 30, 60)).save(odd, format="JPEG")
    out = tmp_path / "out.csv"
    assert (
        main(["predict", "--model", str(tiny_model), "--format", "csv", "-o", str(out), str(odd)])
        == 0
    )
    assert b"b\xff.jpg," in out.read_bytes()


def test_engine_checks_its_counts_and_threshold(tiny_model):
    for kwargs, name in (
        ({"top_k": 0}, "top_k"),
        ({"batch_size": 0}, "batch_size"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"top_k": 2.5}, "top_k must be a whole number"),
        ({"batch_size": "8"}, "batch_size must be a whole number"),
        ({"threshold": None}, "threshold must be a number"),
    ):
        with pytest.raises(ValueError, match=name):
            Engine(tiny_model, **kwargs)
    engine = Engine(tiny_model, top_k=np.int64(2), batch_size=np.int64(4), threshold=np.float32(1))
    assert (engine.top_k, engine.batch_size, engine.threshold) == (2, 4, 1.0)  # numpy's numbers


def test_shipped_models_by_name(photo_folder, tmp_path, monkeypatch):
    """`--model accurate` finds the packaged file; a real file of that name wins."""
    assert resolve_model(None) == resolve_model("default") == default_model_path()
    sizes = {}
    for name in SHIPPED_MODELS:
        engine = Engine(name)
        assert engine.model_path == default_model_path(name) and engine.model_path.is_file()
        sizes[name] = engine.cfg.model.image_size
        result = next(engine.predict_files([photo_folder / "a_good.jpg"])).to_dict()
        assert result["error"] is None and result["attributes"]["shade"]["hex"].startswith("#")
    assert sizes["accurate"] > sizes["default"]  # the fast default sees smaller inputs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "accurate").write_bytes(b"")
    assert resolve_model("accurate") == Path("accurate")


def test_shipped_default_model_predicts_offline(photo_folder):
    path = default_model_path()
    assert path.is_file(), "the default model must ship inside the package"
    assert path.stat().st_size < 20 * 1024 * 1024
    result = next(Engine().predict_files([photo_folder / "a_good.jpg"])).to_dict()
    assert result["error"] is None and result["attributes"]["category"]["label"]


def test_predict_tta_flip_answers_the_same_for_a_photo_and_its_mirror(tiny_model, tmp_path, capsys):
    img = Image.new("RGB", (64, 64), (220, 30, 60))
    img.paste((20, 40, 200), (0, 0, 24, 64))  # a blue band on the left only
    img.save(tmp_path / "photo.png")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")
    photos = [str(tmp_path / "photo.png"), str(tmp_path / "mirror.png")]

    def answers(*flags):
        assert main(["predict", "--model", str(tiny_model), *flags, *photos]) == 0
        return [json.loads(line)["attributes"] for line in capsys.readouterr().out.splitlines()]

    plain = answers()
    assert plain[0]["category"]["top"] != plain[1]["category"]["top"]
    photo, mirror = answers("--tta-flip")
    for a, b in zip(photo["category"]["top"], mirror["category"]["top"], strict=True):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=2e-4)
    assert photo["shade"]["lab"] == pytest.approx(mirror["shade"]["lab"], abs=0.02)
    assert photo["category"]["top"] != plain[0]["category"]["top"]  # averaged, not one view


def test_engine_predicts_one_path_images_and_bytes_and_reports_other_items(tiny_model, tmp_path):
    photo = tmp_path / "a.jpg"
    Image.new("RGB", (60, 80), (200, 30, 60)).save(photo)
    engine = Engine(tiny_model)
    (one,) = [
        p.to_dict() for p in engine.predict_files(str(photo))
    ]  # one path, not one per character
    assert one["file"] == str(photo) and one["error"] is None
    items = [
        ("image", Image.open(photo)),
        ("bytes", photo.read_bytes()),
        ("array", [[0, 0, 0]]),
        ("long", tmp_path / ("x" * 300 + ".jpg")),  # longer than the file system allows
    ]
    image, data, array, long = [p.to_dict() for p in engine.predict_items(items)]
    assert image["attributes"] == data["attributes"] == one["attributes"]
    assert array["error"] == "expected a file path, bytes or a PIL image, got list"
    assert long["error"].startswith("unreadable") and long["attributes"] is None
    (too_long,) = [p.to_dict() for p in engine.predict_files([tmp_path / ("x" * 300 + ".jpg")])]
    assert too_long["error"].startswith("unreadable")
    big = tmp_path / "big.jpg"
    Image.new("RGB", (8000, 6000), (200, 30, 60)).save(big)  # 48 megapixels
    lazy = Image.open(big)  # not decoded yet: the engine's threads decode it
    results = list(Engine(tiny_model, batch_size=1).predict_items([("a", lazy), ("b", lazy)]))
    assert [r.error for r in results] == [None, None]  # as it is: over 40 MP, one decode
    assert results[0].attributes == results[1].attributes


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_folder_walk_keeps_dangling_links_and_reports_unreadable_folders(
    tmp_path, monkeypatch, capsys
):
    """A dangling .jpg link (and a FIFO named .jpg) is listed, so that loading gives it an
    error record; a subfolder that cannot be read is a warning, not silently skipped."""
    d = tmp_path / "photos"
    (d / "locked").mkdir(parents=True)
    (d / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(d / "sub" / "a.jpg")
    (d / "b.jpg").symlink_to(d / "gone.jpg")
    (d / "c.jpg").symlink_to(d / "sub" / "a.jpg")
    (d / "dir.jpg").symlink_to(d / "sub")  # a folder, whatever its name: not walked into
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "d.jpg")
    scandir = os.scandir

    def locked(path):  # what reading a folder without permission does (root may read all)
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    names = [f.relative_to(d).as_posix() for f in expand_paths(d)]
    assert names == ["b.jpg", "c.jpg", *(["d.jpg"] if hasattr(os, "mkfifo") else []), "sub/a.jpg"]
    assert capsys.readouterr().err == (
        f"warning: {d / 'locked'}: folder not read (Permission denied); its photos are left out\n"
    )
    with pytest.raises(ImageError, match="b.jpg: file not found"):  # an error record
        load_image(d / "b.jpg")
