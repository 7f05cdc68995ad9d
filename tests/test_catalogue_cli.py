"""The catalogue from the command line (issue 36): predict -o resumable (killed with SIGKILL,
interrupted with Ctrl-C), refusing to overwrite, --from-list, Parquet, Ray; review and report."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from beautytag.catalogue.records import read_records
from beautytag.cli import main
from beautytag.runtime.engine import model_id

from .conftest import ROOT, default_raw

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
MODEL_ID = re.compile(r"tiny@[0-9a-f]{8}")


def photos(folder: Path, n: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> Path:
    """`n` small photos of different colours in `folder`."""
    folder.mkdir(exist_ok=True)
    suffix = ".png" if fmt == "PNG" else ".jpg"
    for i in range(n):
        colour = (i * 37 % 256, 255 - i * 11 % 256, i * 101 % 256)
        Image.new("RGB", size, colour).save(folder / f"p{i:03d}{suffix}", format=fmt)
    return folder


def lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, each of which must be whole JSON."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a torn last line"
    return [json.loads(line) for line in data.splitlines()]


def test_predict_killed_with_sigkill_resumes_every_photo_once(tiny_model, tmp_path):
    folder = photos(tmp_path / "photos", 40, size=(640, 480), fmt="PNG")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "beautytag.cli", "predict", "--model", str(tiny_model)]
    cmd += ["--batch-size", "1", "--tta-flip", "-o", str(out), str(folder)]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"predict ended before the kill: {proc.stderr.read()}"
    proc.stderr.close()
    first = len(read_records(out))
    assert 0 < first < 40
    again = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"resuming: {first} of the photos already in", again.stderr)
    records = lines(out)
    assert sorted(r["file"] for r in records) == [str(p) for p in sorted(folder.iterdir())]
    assert all(r["error"] is None and r["attributes"]["category"]["label"] for r in records)
    assert {r["model"] for r in records} == {model_id(tiny_model)}


def test_predict_refuses_an_existing_output_before_predicting(
    tiny_model, tmp_path, capsys, monkeypatch
):
    folder = photos(tmp_path / "photos", 3)
    out = tmp_path / "out.jsonl"
    out.write_text('{"file": "earlier.jpg", "attributes": null, "error": "x"}\n')
    before = out.read_bytes()
    from beautytag.runtime.engine import Engine

    def never(*_a, **_k):
        raise AssertionError("predicted before refusing")

    with monkeypatch.context() as m:
        m.setattr(Engine, "predict_items", never)
        assert main(["predict", "--model", str(tiny_model), "-o", str(out), str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists: use --resume" in err and "--force" in err
    assert out.read_bytes() == before
    # a mistyped input (no photos) never touches the output, even with --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--force", "-o", str(out), str(empty)]) == 2
    assert "no photos found in" in capsys.readouterr().err and out.read_bytes() == before
    run = ["predict", "--model", str(tiny_model), "-o", str(out), str(folder)]
    assert main([*run, "--force"]) == 0
    assert [Path(r["file"]).name for r in lines(out)] == ["p000.jpg", "p001.jpg", "p002.jpg"]
    assert all(MODEL_ID.fullmatch(r["model"]) for r in lines(out))
    assert main([*run, "--resume"]) == 0  # nothing left to do
    assert len(lines(out)) == 3


def test_predict_from_list_on_standard_input(tiny_model, tmp_path, capsys, monkeypatch):
    folder = photos(tmp_path / "photos", 4)
    listed = [folder / "p002.jpg", folder / "p000.jpg", folder / "missing.jpg"]
    stdin = io.StringIO("\n".join(map(str, listed)) + "\n\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["predict", "--model", str(tiny_model), "--from-list", "-"]) == 1  # missing
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in out] == list(map(str, listed))
    assert out[2]["error"] == "file not found" and out[0]["error"] is None
    (tmp_path / "list.txt").write_text(f"{folder}\n")  # a folder in a list is walked
    assert (
        main(["predict", "--model", str(tiny_model), "--from-list", str(tmp_path / "list.txt")])
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_predict_csv_and_parquet_outputs_resume(tiny_model, tmp_path, capsys):
    folder = photos(tmp_path / "photos", 4)
    for name in ("out.csv", "out.parquet"):
        out = tmp_path / name
        run = ["predict", "--model", str(tiny_model), "-o", str(out)]
        assert main([*run, str(folder / "p000.jpg"), str(folder / "p001.jpg")]) == 0
        assert main([*run, "--resume", str(folder)]) == 0
        records = read_records(out)
        assert [Path(r["file"]).name for r in records] == [f"p{i:03d}.jpg" for i in range(4)]
        assert all(MODEL_ID.fullmatch(r["model"]) for r in records)
    header = (tmp_path / "out.csv").read_text().splitlines()[0]
    assert header.startswith("file,error,model,category,category_score")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("category_score").type == "double"
    assert main(["predict", "--format", "parquet", str(folder)]) == 2  # needs -o
    assert "needs -o FILE" in capsys.readouterr().err


def test_predict_interrupted_keeps_a_resumable_output(tiny_model, tmp_path, capsys, monkeypatch):
    """The first Ctrl-C: the record in hand is written whole, the run stops with 130."""
    folder = photos(tmp_path / "photos", 6)
    out = tmp_path / "out.jsonl"
    from beautytag.runtime.engine import Engine

    real = Engine.predict_items

    def interrupted_after_two(self, items, workers=2):
        for i, prediction in enumerate(real(self, items, workers)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)  # arrives while the record is in hand
            yield prediction

    run = ["predict", "--model", str(tiny_model), "--batch-size", "1", "-o", str(out), str(folder)]
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background
    with monkeypatch.context() as m:
        m.setattr(Engine, "predict_items", interrupted_after_two)
        assert main(run) == 130
    assert "run again with --resume to finish" in capsys.readouterr().err
    assert [Path(r["file"]).name for r in lines(out)] == ["p000.jpg", "p001.jpg"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    assert main([*run, "--resume"]) == 0
    assert len(lines(out)) == 6


def test_progress_bar_only_when_asked(tmp_path, capsys):
    from beautytag.catalogue.batch import write_records
    from beautytag.catalogue.records import open_output

    records = [{"file": f"p{i}.jpg", "attributes": None, "error": "x"} for i in range(3)]
    for progress in (False, True):
        writer, _ = open_output(tmp_path / f"{progress}.jsonl")
        with writer:
            written = write_records(records, writer, 3, progress=progress)
        assert (written.count, written.errors, written.interrupted) == (3, 3, False)
        err = capsys.readouterr().err
        assert ("3/3" in err and "img/s" in err) if progress else err == ""


def test_review_and_report_from_the_command_line(tiny_model, tmp_path, capsys):
    folder = photos(tmp_path / "photos", 5)
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(tiny_model), "-o", str(preds), str(folder)]) == 0
    capsys.readouterr()
    tasks_file = tmp_path / "tasks.json"
    review = ["review", str(preds), "-o", str(tasks_file), "--model", str(tiny_model)]
    assert main([*review, "--below", "1"]) == 0  # a random model: every answer is doubtful
    config, err = capsys.readouterr()
    assert config.startswith("<View>") and '<Choices name="category"' in config
    assert "5 tasks" in err
    tasks = json.loads(tasks_file.read_text())
    scores = [t["predictions"][0]["score"] for t in tasks]
    assert len(tasks) == 5 and scores == sorted(scores)
    assert all(MODEL_ID.fullmatch(t["predictions"][0]["model_version"]) for t in tasks)
    # reviewed in Label Studio: the first accepted, the second corrected, the rest skipped
    first = tasks[0]["predictions"][0]["result"]
    fixed = [{**first[0], "value": {"choices": ["Mascara"]}}]
    export = [
        {"id": 1, **tasks[0], "annotations": [{"result": first, "was_cancelled": False}]},
        {"id": 2, **tasks[1], "annotations": [{"result": fixed}]},
        {"id": 3, **tasks[2], "annotations": []},
    ]
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(export))
    labels = folder / "labels.csv"
    back = ["review", "--import", str(export_file), "-o", str(labels), "--model", str(tiny_model)]
    assert main(back) == 0
    assert "skipped " in capsys.readouterr().err
    from beautytag.config import config_from_dict
    from beautytag.data import read_samples

    attributes = [  # the model's attributes, each read from its labels.csv column
        {k: v for k, v in a.items() if k != "sources"}
        | {"sources": {"mine": {"column": a["name"]}}}
        for a in default_raw()["attributes"]
        if a["kind"] != "shade"
    ]
    data = {"root": str(tmp_path), "sources": [{"name": "mine", "path": "photos"}]}
    cfg = config_from_dict({"attributes": attributes, "data": data})
    samples = read_samples(cfg)
    assert [s.path for s in samples] == [
        Path(tasks[0]["data"]["file"]),
        Path(tasks[1]["data"]["file"]),
    ]
    assert samples[1].labels["category"] == "Mascara" and samples[1].split == "train"

    page = tmp_path / "report.html"
    assert main(["report", str(preds), "-o", str(page)]) == 0
    html = page.read_text()
    assert "5 photos: 5 tagged" in html and "data:image/png;base64," in html
    assert main(["report", str(export_file), "-o", str(page)]) == 2  # not predictions
    assert capsys.readouterr().err.count("\n") == 2  # the report line, then the one-line error


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install 'beautytag[ray]' to run predict --ray's test)",
)
def test_predict_on_a_local_ray_cluster_answers_as_a_plain_run(tiny_model, tmp_path):
    folder = photos(tmp_path / "photos", 5)
    (folder / "p002.jpg").write_text("not an image")
    out = tmp_path / "ray.jsonl"
    out.write_text("")  # resumable too: an empty output to resume
    cmd = [sys.executable, "-m", "beautytag.cli", "predict", "--model", str(tiny_model), "--ray"]
    cmd += ["--ray-workers", "2", "--batch-size", "2", "--resume", "-o", str(out), str(folder)]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # one photo failed
    from beautytag.runtime.engine import Engine

    plain = [p.to_dict() for p in Engine(tiny_model).predict_files(folder)]
    got = lines(out)
    assert [r["file"] for r in got] == [r["file"] for r in plain]  # in input order
    assert {r["model"] for r in got} == {model_id(tiny_model)}
    for a, b in zip(got, plain, strict=True):
        assert a["error"] == b["error"]
        if b["attributes"] is None:
            assert a["attributes"] is None
            continue
        for name, want in b["attributes"].items():
            have = a["attributes"][name]
            if "label" in want:
                assert have["label"] == want["label"]
                assert have["score"] == pytest.approx(want["score"], abs=1e-3)
            elif "lab" in want:
                assert have["lab"] == pytest.approx(want["lab"], abs=0.05)
            else:
                assert have["scores"] == pytest.approx(want["scores"], abs=1e-3)
