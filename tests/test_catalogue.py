"""beautytag.catalogue: resumable records, the Label Studio review loop and the HTML report."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from beautytag.catalogue.records import (
    RecordsError,
    csv_fields,
    journal_path,
    open_output,
    read_records,
)
from beautytag.catalogue.report import write_report
from beautytag.catalogue.review import (
    import_export,
    labeling_config,
    review_tasks,
    write_labels_csv,
)

from .conftest import ROOT

MODEL = "default@0123abcd"
CATEGORIES = ["Lipstick", "Mascara", "Nail Polish"]
SCHEMA = SimpleNamespace(
    attributes=[
        SimpleNamespace(name="category", kind="single", classes=CATEGORIES),
        SimpleNamespace(name="color", kind="single", classes=["Red", "Pink", "Black"]),
        SimpleNamespace(name="shade", kind="shade", classes=[]),
        SimpleNamespace(name="function", kind="multi", classes=["waterproof", "long_lasting"]),
    ]
)
FIELDS = csv_fields(SCHEMA)


def record(i: int, score: float = 0.9, label: str | None = "Lipstick") -> dict:
    """A record as predict writes it (photo p<i>.jpg)."""
    return {
        "file": f"p{i:03d}.jpg",
        "attributes": {
            "category": {"label": label, "score": score, "top": [[label, score]]},
            "color": {"label": "Red", "score": 0.5, "top": [["Red", 0.5], ["Pink", 0.3]]},
            "shade": {"lab": [40.0 + i % 3, 30.0, 10.0], "hex": "#8a3b3b"},
            "function": {"labels": [["waterproof", 0.8]], "scores": {"waterproof": 0.8}},
        },
        "error": None,
        "model": MODEL,
    }


def error_record(i: int) -> dict:
    return {"file": f"p{i:03d}.jpg", "attributes": None, "error": "not an image", "model": MODEL}


def write_all(path: Path, fmt: str, items: list[dict], **kw) -> set[str]:
    writer, done = open_output(path, fmt, fields=FIELDS, model=MODEL, **kw)
    with writer:
        for r in items:
            if r["file"] not in done:
                writer.write(r)
    return done


def assert_whole_once(path: Path, fmt: str, n: int) -> None:
    """Every photo has exactly one record, and (JSONL) every line is whole JSON."""
    if fmt == "jsonl":
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b""
        assert all(isinstance(json.loads(line), dict) for line in lines[:-1])
    files = [r["file"] for r in read_records(path)]
    assert sorted(files) == sorted(f"p{i:03d}.jpg" for i in range(n))


def test_model_id_is_name_and_short_sha256(tmp_path):
    from beautytag.runtime.engine import model_id

    weights = tmp_path / "default.pt"
    weights.write_bytes(b"weights" * 1000)
    short = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    assert model_id(weights) == f"default@{short}"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_repairs_a_torn_last_line(tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    items = [record(i) if i % 4 else error_record(i) for i in range(10)]
    write_all(out, fmt, items[:6])
    with open(out, "ab") as f:  # a record cut off mid-write (in CSV, inside a quoted cell)
        f.write(b'{"file": "p006.jpg", "attri' if fmt == "jsonl" else b'p006.jpg,"not an')
    done = write_all(out, fmt, items, resume=True)
    assert done == {f"p{i:03d}.jpg" for i in range(6)}
    assert_whole_once(out, fmt, 10)
    assert read_records(out)[:6] == read_records(out)[:6]  # stable
    back = {r["file"]: r for r in read_records(out)}
    assert back["p000.jpg"]["error"] == "not an image" and back["p000.jpg"]["attributes"] is None
    assert back["p007.jpg"]["attributes"]["category"]["label"] == "Lipstick"
    assert back["p007.jpg"]["model"] == MODEL


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_existing_output_is_refused_without_resume_or_force(tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    write_all(out, fmt, [record(0), record(1)])
    with pytest.raises(RecordsError, match="--resume .* --force") as e:
        open_output(out, fmt, fields=FIELDS)
    assert "\n" not in str(e.value)
    assert len(read_records(out)) == 2  # untouched
    write_all(out, fmt, [record(5)], force=True)
    assert [r["file"] for r in read_records(out)] == ["p005.jpg"]


def test_resume_refuses_records_of_another_model(tmp_path):
    out = tmp_path / "out.jsonl"
    write_all(out, "jsonl", [record(0)])
    with pytest.raises(RecordsError, match="default@0123abcd.*other@ffffffff"):
        open_output(out, "jsonl", resume=True, model="other@ffffffff")


def test_parquet_round_trip_and_resume(tmp_path):
    out = tmp_path / "out.parquet"
    items = [record(i, score=i / 10) for i in range(6)] + [error_record(6)]
    writer, _ = open_output(out, "parquet", model=MODEL)
    for r in items[:3]:
        writer.write(r)
    writer.close(finish=False)  # as a killed run: the journal only
    assert not out.exists() and journal_path(out).exists()
    with pytest.raises(RecordsError, match="not finished.*--resume"):
        read_records(out)
    assert write_all(out, "parquet", items[:5], resume=True) == {r["file"] for r in items[:3]}
    assert read_records(out) == items[:5] and not journal_path(out).exists()
    assert write_all(out, "parquet", items, resume=True) == {r["file"] for r in items[:5]}
    assert read_records(out) == items  # lossless, whatever the kind of answer

    import pyarrow.parquet as pq

    table = pq.read_table(out)  # flat, typed columns for data teams
    assert table.column("category_score").to_pylist()[:2] == [0.0, 0.1]
    assert table.column("function").to_pylist()[0] == ["waterproof"]
    assert table.column("shade_lab").to_pylist()[6] is None
    assert table.column("error").to_pylist()[6] == "not an image"


def test_a_full_disk_keeps_the_records_written_whole(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    writer, _ = open_output(out, "jsonl")
    writer.write(record(0))
    writer.write(record(1))
    real_write, calls = os.write, []

    def half_then_full(fd: int, data: bytes) -> int:  # a short write, then no space
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(RecordsError, match="disk full; it holds the 2 records") as e:
        writer.write(record(2))
    monkeypatch.undo()
    writer.close()
    assert len(calls) == 2 and "\n" not in str(e.value)
    assert_whole_once(out, "jsonl", 2)


def test_an_unwritable_output_is_a_one_line_error(tmp_path):
    with pytest.raises(RecordsError, match="cannot write"):
        open_output(tmp_path / "no" / "such" / "folder.jsonl", "jsonl")
    with pytest.raises(RecordsError, match="is a folder"):
        open_output(tmp_path, "jsonl")
    with pytest.raises(RecordsError, match="needs its fields"):
        open_output(tmp_path / "out.csv", "csv")


def test_a_file_that_is_not_predictions_is_a_one_line_error(tmp_path):
    cases = {
        "notes.txt": b"shopping list\nmilk\n",
        "tasks.json": b'[{"data": {"image": "a.jpg"}}]\n',
        "other.jsonl": b'{"id": 1}\n',
        "binary.bin": bytes(range(256)),
        "labels.csv": b"file_name,category\na.jpg,Lipstick\n",
    }
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "other.parquet", "missing.jsonl"]:
        with pytest.raises(RecordsError) as e:
            read_records(tmp_path / name)
        message = str(e.value)
        assert "\n" not in message and message.startswith(str(tmp_path / name)), message


PRODUCER = """
import sys, time
from types import SimpleNamespace as NS
from beautytag.catalogue.records import csv_fields, open_output

out, fmt, n, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
kinds = [("category", "single"), ("shade", "shade"), ("function", "multi")]
fields = csv_fields(NS(attributes=[NS(name=a, kind=k) for a, k in kinds]))
writer, done = open_output(out, fmt, resume=resume, fields=fields, model="default@0123abcd")
with writer:
    for i in range(n):
        file = f"p{i:03d}.jpg"
        if file in done:
            continue
        writer.write({"file": file, "model": "default@0123abcd", "error": None, "attributes": {
            "category": {"label": "Lipstick", "score": 0.5, "top": [["Lipstick", 0.5]]},
            "shade": {"lab": [50.0, 10.0, 5.0], "hex": "#8a6a60"},
            "function": {"labels": [], "scores": {"waterproof": 0.1}}}})
        if not resume:  # slow, and never past half: the kill always comes mid-run
            time.sleep(0.002 if i < n // 2 else 600)
"""


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_run_killed_with_sigkill_resumes(tmp_path, fmt):
    """A producer using the writer is killed mid-run and resumed: every photo once."""
    script, out, n = tmp_path / "producer.py", tmp_path / f"out.{fmt}", 2000
    script.write_text(PRODUCER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(script), str(out), fmt, str(n)]
    proc = subprocess.Popen([*cmd, "new"], env=env)
    written = journal_path(out) if fmt == "parquet" else out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if written.exists() and written.read_bytes().count(b"\n") > 50:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the producer ended before it was killed"
    assert 0 < len(read_records(written)) < n
    subprocess.run([*cmd, "resume"], env=env, check=True)
    assert_whole_once(out, fmt, n)


def review_records() -> list[dict]:
    return [
        record(0, 0.95),
        record(1, 0.30, "Mascara"),
        record(2, 0.55),
        record(3, 0.10, "Nail Polish"),
        record(4, 0.20, None),  # not a cosmetic: a task without a pre-filled answer
        error_record(5),
    ]


def test_review_tasks_are_label_studio_tasks_least_confident_first():
    tasks = review_tasks(review_records(), attribute="category", below=0.6)
    assert [t["data"]["file"] for t in tasks] == ["p003.jpg", "p004.jpg", "p001.jpg", "p002.jpg"]
    first = tasks[0]
    assert first["data"]["image"] == "p003.jpg"
    [prediction] = first["predictions"]
    assert prediction["model_version"] == MODEL and prediction["score"] == 0.10
    assert prediction["result"] == [
        {
            "from_name": "category",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["Nail Polish"]},
        }
    ]
    assert tasks[1]["predictions"][0]["result"] == []
    json.dumps(tasks)  # plain JSON
    local = review_tasks(review_records(), below=0.2, image_prefix="/data/local-files/?d=")
    assert [t["data"]["image"] for t in local] == ["/data/local-files/?d=p003.jpg"]
    with pytest.raises(ValueError, match="not a class attribute"):
        review_tasks(review_records(), attribute="function")
    with pytest.raises(ValueError, match="no record has an answer for 'categry'"):
        review_tasks(review_records(), attribute="categry")


def test_labeling_config_has_a_choices_group_per_class_attribute():
    view = ET.fromstring(labeling_config(SCHEMA))
    assert view.find("Image").attrib == {"name": "image", "value": "$image"}
    groups = {c.get("name"): c for c in view.iter("Choices")}
    assert list(groups) == ["category", "color", "function"]  # no shade: it is not a choice
    assert [c.get("value") for c in groups["category"]] == CATEGORIES
    assert groups["category"].get("toName") == "image"
    assert groups["function"].get("choice") == "multiple"
    assert groups["color"].get("choice") == "single-radio"
    mapping = ET.fromstring(labeling_config({"finish": ["matte", 'a "quoted" & <odd>']}))
    assert [c.get("value") for c in mapping.iter("Choice")] == ["matte", 'a "quoted" & <odd>']


def annotate(task: dict, results: list[dict], **extra) -> dict:
    """A task as Label Studio exports it once annotated."""
    annotation = {"id": 1, "result": results, "was_cancelled": False, **extra}
    return {"id": 7, **task, "annotations": [annotation]}


def test_review_round_trip_gives_a_labels_csv_that_training_reads(tmp_path):
    folder = tmp_path / "reviewed"
    folder.mkdir()
    for i in range(5):  # training checks that the listed photos are there
        Image.new("RGB", (8, 8), (200, 40, 60)).save(folder / f"p{i:03d}.jpg")
    recs = [record(i, 0.3) | {"file": str(folder / f"p{i:03d}.jpg")} for i in range(5)]
    tasks = review_tasks(recs, below=0.6)
    choices = tasks[0]["predictions"][0]["result"]  # accepted as the model said
    fixed = [{**choices[0], "value": {"choices": ["Mascara"]}}]
    function = {**choices[0], "from_name": "function", "value": {"choices": ["waterproof"]}}
    export = [
        annotate(tasks[0], choices),
        annotate(tasks[1], [*fixed, function], updated_at="2024-05-02T10:00:00Z"),
        annotate(tasks[2], choices, was_cancelled=True),
        annotate(tasks[3], []),
        tasks[4],  # never annotated
    ]
    # a second, older annotation of the same task loses to the later one
    export[1]["annotations"].insert(0, {"result": choices, "updated_at": "2024-05-01T10:00:00Z"})
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(export))
    rows, skipped = import_export(export_file, relative_to=folder)
    assert rows == [
        {"file_name": "p000.jpg", "split": "train", "category": "Lipstick"},
        {
            "file_name": "p001.jpg",
            "split": "train",
            "category": "Mascara",
            "function": "waterproof",
        },
    ]
    names = [s.split(": ")[1] for s in skipped]
    assert names == ["cancelled", "empty annotation", "not annotated"]
    write_labels_csv(rows, folder / "labels.csv", ["category", "color", "function"])
    header = (folder / "labels.csv").read_text().splitlines()[0]
    assert header == "file_name,split,category,color,function"

    from beautytag.config import load_config
    from beautytag.data import read_samples

    attributes = [
        {"name": a.name, "kind": a.kind, "sources": {"reviewed": {"column": a.name}}}
        | ({"classes": a.classes} if a.classes else {})
        for a in SCHEMA.attributes
        if a.kind != "shade"
    ]
    config = {
        "attributes": attributes,
        "data": {"root": str(tmp_path), "sources": [{"name": "reviewed", "path": "reviewed"}]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    samples = read_samples(load_config(tmp_path / "config.yaml"))
    assert [(s.path.name, s.split) for s in samples] == [
        ("p000.jpg", "train"),
        ("p001.jpg", "train"),
    ]
    assert samples[0].labels == {"category": "Lipstick", "color": None, "function": None}
    assert samples[1].labels == {"category": "Mascara", "color": None, "function": ["waterproof"]}

    with pytest.raises(ValueError, match="not a Label Studio JSON export"):
        import_export([{"image": "a.jpg"}])


def photo(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (600, 800)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


def test_report_is_one_self_contained_page(tmp_path):
    recs = [record(i, score=0.2 + i / 20) for i in range(8)]
    for i, r in enumerate(recs[:5]):
        r["file"] = photo(tmp_path / f"p{i}.jpg", (200, 40 * i, 60))
    recs[5]["file"] = str(tmp_path / "moved.jpg")  # missing: just no thumbnail
    recs[6]["attributes"]["category"]["label"] = None  # not a cosmetic
    recs[7]["attributes"]["color"]["label"] = "Pink"
    recs[7]["attributes"]["shade"] = {"lab": [80.0, 5.0, 5.0], "hex": "#d6c4c0"}
    recs += [error_record(8), error_record(9)]
    out = tmp_path / "report.html"
    write_report(recs, out, thumbnails=4)
    page = out.read_text()

    assert "10 photos: 8 tagged, 1 not a cosmetic (no category), 2 errors" in page
    assert re.search(r"<td>Lipstick</td><td class=n>7</td>", page)
    assert re.search(r"<td>Red</td><td class=n>7</td>", page)  # colour families
    assert re.search(r"<td>Pink</td><td class=n>1</td>", page)
    assert re.search(r"<td>waterproof</td><td class=n>8</td>", page)
    assert re.search(r"<td>not an image</td><td class=n>2</td>", page)
    swatch = r'class=sw style="background:(#[0-9a-f]{6})" title="[^"]*: (\d+) photo'
    assert re.findall(swatch, page) == [("#d6c4c0", "1"), ("#8a3b3b", "7")]  # lightest first
    histograms = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="(\w+)"', page)
    assert histograms == ["category", "color"]
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)"', page)
    assert [Path(alt).name for _, alt in thumbs] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    import base64
    import io

    assert max(Image.open(io.BytesIO(base64.b64decode(thumbs[0][0]))).size) <= 112
    assert not re.search(r"https?://|<script|<link", page)


def test_report_and_review_leave_matplotlib_and_torch_unimported():
    code = (
        "import sys, beautytag.catalogue.records, beautytag.catalogue.review, "
        "beautytag.catalogue.report; "
        "print(sorted(m for m in ('matplotlib', 'torch', 'pyarrow') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
