"""``beautytag index`` / ``beautytag search`` and the service's search endpoints, with the tiny
model and generated photos."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from beautytag.checkpoint import default_model_path
from beautytag.cli import main
from beautytag.color import delta_e2000
from beautytag.runtime.engine import Engine, model_id
from beautytag.search import Index
from beautytag.search.commands import index_photos
from beautytag.search.index import MANIFEST
from beautytag.serve import search as serve_search
from beautytag.serve.app import create_app
from beautytag.serve.settings import ServeSettings

from .conftest import make_tiny_model

COLOURS = [(200, 30, 60), (30, 160, 60), (40, 60, 200), (240, 200, 40), (120, 40, 160)]


def photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    """`n` generated photos: a coloured product on white, of differing colours and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        img = Image.new("RGB", (60 + 4 * i, 80), (255, 255, 255))
        colour = COLOURS[i % len(COLOURS)]
        img.paste(
            Image.new("RGB", (30, 50 - i), tuple(c // (1 + i // 5) for c in colour)), (15, 15)
        )
        path = folder / f"p{i:02d}.jpg"
        img.save(path, quality=95)
        out.append(path)
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """An index of 12 photos made by the tiny model: (index folder, photo folder, photos)."""
    root = tmp_path_factory.mktemp("search")
    files = photos(root / "photos", 12)
    code = main(
        ["index", str(root / "photos"), "-o", str(root / "index"), "--model", str(tiny_model)]
    )
    assert code == 0
    return root / "index", root / "photos", files


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_index_resume_remove_and_search(tiny_model, tmp_path, capsys):
    files = photos(tmp_path / "a", 6)
    index_dir = tmp_path / "index"
    code, out, err = run(capsys, "index", tmp_path / "a", "-o", index_dir, "--model", tiny_model)
    summary = json.loads(out)
    assert code == 0 and summary["count"] == summary["added"] == 6
    assert summary["kind"] == "flat" and "flat (exact search)" in err
    manifest = json.loads((index_dir / MANIFEST).read_text())
    engine = Engine(tiny_model)
    assert manifest["model"] == engine.model_id and manifest["model"].startswith("tiny@")
    assert manifest["vocabulary"]["category"][0] == "Perfume and Body Mist"
    # without --resume an existing index is not touched
    code, _, err = run(capsys, "index", tmp_path / "a", "-o", index_dir, "--model", tiny_model)
    assert code == 2 and "--resume" in err
    # --resume adds the new photos only
    photos(tmp_path / "a", 3, start=6)
    code, out, _ = run(
        capsys, "index", tmp_path / "a", "-o", index_dir, "--model", tiny_model, "--resume"
    )
    summary = json.loads(out)
    assert (code, summary["added"], summary["skipped_indexed"], summary["count"]) == (0, 3, 6, 9)
    # remove, by file
    code, out, _ = run(capsys, "index", "-o", index_dir, "--remove", files[0], "nope.jpg")
    assert (code, json.loads(out)["removed"], json.loads(out)["count"]) == (0, 1, 8)
    code, out, _ = run(
        capsys, "search", index_dir, files[1], files[0], "--model", tiny_model, "--top-k", "3"
    )
    first, second = lines(out)
    assert code == 0 and first["query"] == str(files[1])
    assert first["results"][0]["file"] == str(files[1].absolute())
    assert first["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert len(first["results"]) == 3 and set(first["results"][0]) >= {
        "file",
        "score",
        "attributes",
    }
    assert "shade" in first["results"][0]["attributes"]
    assert all(r["file"] != str(files[0].absolute()) for r in second["results"])


def test_a_large_index_is_ivf_and_reports_its_recall(tiny_model, tmp_path):
    photos(tmp_path / "p", 8)
    log = io.StringIO()
    summary, failed = index_photos(
        [str(tmp_path / "p")], str(tmp_path / "i"), str(tiny_model), chunk=3, exact_max=4, log=log
    )
    assert (failed, summary["kind"], summary["count"]) == (0, "ivf", 8)
    assert (summary["nlist"], summary["nprobe"], summary["recall_at_10"]) == (1, 1, 1.0)
    assert "IVF (approximate: nlist 1, nprobe 1), recall@10 1.0" in log.getvalue()
    assert log.getvalue().count("photos/s") == 3  # a save after each chunk of 3
    manifest = json.loads((tmp_path / "i" / MANIFEST).read_text())
    assert manifest["kind"] == "ivf" and manifest["ivf"]["tuned_count"] == 8
    photos(tmp_path / "p", 2, start=8)  # --resume adds to the IVF index, --remove takes out
    summary, _ = index_photos(
        [str(tmp_path / "p")], str(tmp_path / "i"), str(tiny_model), resume=True, log=log
    )
    assert (summary["added"], summary["skipped_indexed"], summary["kind"]) == (2, 8, "ivf")
    manifest = json.loads((tmp_path / "i" / MANIFEST).read_text())
    assert (manifest["count"], manifest["ivf"]["tuned_count"]) == (10, 10)  # nprobe chosen again
    (tmp_path / "p" / "p09.jpg").rename(tmp_path / "kept.jpg")  # not removed with the folder
    summary, _ = index_photos([], str(tmp_path / "i"), remove=[str(tmp_path / "p")], log=log)
    assert (summary["removed"], summary["count"], summary["kind"]) == (9, 1, "flat")


def test_embeddings_come_with_the_predictions_in_every_backend(tiny_model, tmp_path):
    x = torch.randn(3, 3, 64, 64)
    engine = Engine(tiny_model)
    emb, answers = engine.embed_tensors(x)
    assert emb.shape == (3, engine.embedding_dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert [a["category"] for a in answers] == [a["category"] for a in engine.predict_tensors(x)]
    with torch.no_grad():
        plain = torch.nn.functional.normalize(engine.model.embed(x), dim=1).numpy()
    assert np.allclose(emb, plain, atol=1e-5)
    onnx = Engine(tiny_model, backend="onnxruntime")  # ONNX answers, the kept torch model embeds
    emb_onnx, answers_onnx = onnx.embed_tensors(x)
    assert np.allclose(emb_onnx, emb, atol=1e-4)
    assert [a["category"].label for a in answers_onnx] == [a["category"].label for a in answers]
    exported = Engine(next(Path(onnx.backend.tmp.name).glob("*.onnx")))
    with pytest.raises(ValueError, match="embeddings need the PyTorch checkpoint"):
        exported.embed_tensors(x)


def test_bad_photos_are_reported_and_skipped(tiny_model, tmp_path, capsys):
    photos(tmp_path / "p", 2)
    (tmp_path / "p" / "broken.jpg").write_bytes(b"not a photo")
    code, out, err = run(
        capsys, "index", tmp_path / "p", "-o", tmp_path / "i", "--model", tiny_model
    )
    assert code == 1, err
    assert json.loads(out)["failed"] == 1 and json.loads(out)["count"] == 2
    assert "broken.jpg" in err
    code, out, _ = run(capsys, "search", tmp_path / "i", tmp_path / "p", "--model", tiny_model)
    assert code == 1 and [bool(line.get("error")) for line in lines(out)] == [True, False, False]


def test_filtered_search_returns_k_results(built, tiny_model, capsys):
    index_dir, _, files = built
    index = Index.open(index_dir)
    categories = [index.get(i).attributes["category"]["label"] for i in range(len(index))]
    # the least common predicted category: a top-k cut after the search would miss it
    rare = min(set(categories), key=categories.count)
    k = categories.count(rare)
    code, out, _ = run(
        capsys,
        "search", index_dir, files[0], "--model", tiny_model,
        "--top-k", k, "--where", f"category={rare.upper()}",
    )  # fmt: skip
    [line] = lines(out)
    assert code == 0 and len(line["results"]) == k
    assert {r["attributes"]["category"]["label"] for r in line["results"]} == {rare}


def test_shade_search_ranks_by_delta_e(built, capsys):
    index_dir, _, _ = built
    target = Index.open(index_dir).get(4).attributes["shade"]
    code, out, _ = run(capsys, "search", index_dir, "--shade", target["hex"], "--top-k", 5)
    [line] = lines(out)
    scores = [r["score"] for r in line["results"]]
    assert code == 0 and len(scores) == 5 and scores == sorted(scores)
    labs = np.array([r["attributes"]["shade"]["lab"] for r in line["results"]])
    assert np.allclose(delta_e2000(labs, np.array(line["query"]["lab"])), scores, atol=1e-3)
    code, out, _ = run(capsys, "search", index_dir, "--shade", ",".join(map(str, target["lab"])))
    assert lines(out)[0]["results"][0]["id"] == 4


def test_search_uses_the_index_s_shipped_model(tmp_path, built, capsys):
    _, _, files = built
    made_by = model_id(default_model_path())  # e.g. default@cbe12438
    Index.create(tmp_path / "d", made_by, Engine("default").embedding_dim)  # 128: projected
    for extra in ([], ["--model", made_by]):  # the index's model, or its id as --model
        code, out, err = run(capsys, "search", tmp_path / "d", files[0], *extra)
        assert (code, lines(out)[0]["results"]) == (0, []), err


def test_bad_input_is_one_clear_line(built, tiny_model, tmp_path, capsys):
    index_dir, _, files = built
    cases = [
        (["search", tmp_path / "none", files[0]], "no index at"),
        (["search", tmp_path / "none", "--shade", "#ff0000"], "no index at"),
        (["search", index_dir, files[0], "--where", "colour=Red"], "valid: category, color"),
        (["search", index_dir, "--shade", "#f00", "--where", "category=Shoes"], "valid: Perfume"),
        (["search", index_dir, "--shade", "reddish"], "give #rrggbb or L,a,b"),
        (["search", index_dir], "one of the two"),
        (["index", "-o", tmp_path / "none", "--remove", "x.jpg"], "no index at"),
    ]
    other = make_tiny_model(tmp_path / "other.pt", model={"dropout": 0.3})
    cases.append((["search", index_dir, files[0], "--model", other], "was made by model tiny@"))
    Index.create(tmp_path / "small", Engine(tiny_model).model_id, 16)
    cases.append((["search", tmp_path / "small", files[0]], "holds embeddings of 16 values"))
    for argv, message in cases:
        if "--model" not in argv and argv[0] == "search" and "--shade" not in argv:
            argv = [*argv, "--model", tiny_model]
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)


@pytest.fixture(scope="module")
def client(built, tiny_model):
    index_dir, _, _ = built
    engine = Engine(tiny_model)
    app = create_app(engine, ServeSettings(), Index.open(index_dir, model=engine.model_id))
    with TestClient(app) as c:
        yield c


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


def test_service_search_by_photo_and_shade(client, built):
    _, _, files = built
    assert client.get("/healthz").json()["search"] is True
    r = client.post("/v1/search?top_k=4", files={"file": ("q.jpg", jpeg(files[2]))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["file"] == "q.jpg" and "category" in body["query"]["attributes"]
    assert len(body["results"]) == 4 and body["results"][0]["file"] == files[2].name
    label = body["results"][0]["attributes"]["category"]["label"]
    r = client.post(
        "/v1/search", params={"where": f"category={label}"}, content=jpeg(files[2])
    )  # the raw body works too
    assert r.status_code == 200
    assert {h["attributes"]["category"]["label"] for h in r.json()["results"]} == {label}
    r = client.get("/v1/search", params={"shade": "#c81e3c", "top_k": 3})
    scores = [h["score"] for h in r.json()["results"]]
    assert r.status_code == 200 and len(scores) == 3 and scores == sorted(scores)
    for params in ({"shade": "pink"}, {"shade": "#fff", "where": "nope=1"}):
        r = client.get("/v1/search", params=params)
        assert r.status_code == 422 and "valid" in r.json()["detail"] or "#rrggbb" in r.text
    r = client.post("/v1/search", files={"file": ("x.jpg", b"not an image")})
    assert r.status_code == 415
    r = client.request("OPTIONS", "/v1/search")
    assert r.status_code == 405 and {"GET", "POST"} <= set(r.headers["allow"].split(", "))


def test_thumbnails_by_id_only(client, built, monkeypatch):
    r = client.get("/v1/thumbnail/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) <= serve_search.THUMBNAIL_PX
    reads = []
    monkeypatch.setattr(serve_search, "thumbnail_jpeg", lambda f: reads.append(f) or b"")
    for path in (
        "/v1/thumbnail/..%2F..%2Fetc%2Fpasswd",
        "/v1/thumbnail/../../etc/passwd",
        "/v1/thumbnail/%2Fetc%2Fpasswd",
        "/v1/thumbnail/abc",
        "/v1/thumbnail/3.0",
        "/v1/thumbnail/-1",
        "/v1/thumbnail/99999",
        "/v1/thumbnail/99999999999999999999999999",
    ):
        r = client.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code)
    assert reads == []


def test_without_an_index_search_answers_404(tiny_model):
    with TestClient(create_app(Engine(tiny_model), ServeSettings())) as c:
        assert c.get("/healthz").json()["search"] is False
        for r in (
            c.post("/v1/search", content=b"x"),
            c.get("/v1/search", params={"shade": "#fff"}),
            c.get("/v1/thumbnail/1"),
        ):
            assert r.status_code == 404 and "--index" in r.json()["detail"]
        spec = c.get("/openapi.json").json()["paths"]
        for path, method in (
            ("/v1/search", "post"),
            ("/v1/search", "get"),
            ("/v1/thumbnail/{id}", "get"),
        ):
            assert "no search index" in spec[path][method]["responses"]["404"]["description"]


async def wait_for(condition, timeout: float = 10.0) -> None:
    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.005)


def held_app(built, tiny_model, settings: ServeSettings, delay: float = 0.0):
    """An app whose shade searches wait for `gate` (and then `delay` s) in the model thread;
    `started` is set when one waits."""
    engine = Engine(tiny_model)
    index = Index.open(built[0], model=engine.model_id)
    gate, started = threading.Event(), threading.Event()
    search_shade = index.search_shade

    def held(*args):
        started.set()
        gate.wait(10)
        time.sleep(delay)
        return search_shade(*args)

    index.search_shade = held
    return create_app(engine, settings, index), gate, started


def test_search_is_503_with_retry_after_when_the_queue_is_full(built, tiny_model):
    app, gate, started = held_app(built, tiny_model, ServeSettings(queue_size=1))
    shade = {"params": {"shade": "#c81e3c"}}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = asyncio.create_task(c.get("/v1/search", **shade))
            await wait_for(started.is_set)  # the model thread holds the first search
            second = await c.get("/v1/search", **shade)
            photo = await c.post("/v1/search", content=jpeg(built[2][0]))
            bad = await c.get("/v1/search", params={"shade": "#c81e3c", "where": "nope=1"})
            gate.set()
            first, after = await first, await c.get("/v1/search", **shade)
            spec = (await c.get("/openapi.json")).json()["paths"]["/v1/search"]
            await app.state.batcher.stop()
            return first, second, photo, bad, after, spec

    first, second, photo, bad, after, spec = asyncio.run(scenario())
    for busy in (second, photo):
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["detail"] == "server busy: queue full"
    assert bad.status_code == 422  # a bad request is told so, busy or not
    assert first.status_code == 200 and after.status_code == 200
    assert all("503" in spec[method]["responses"] for method in ("get", "post"))


SHADE = {"params": {"shade": "#c81e3c"}}


def behind_a_search(app, started, send) -> list[httpx.Response]:
    """A search whose time is learnt first, another while `send(client)` is sent behind it,
    and `send(client)` again once nothing is ahead: the four answers in that order."""

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            learnt = await c.get("/v1/search", **SHADE)  # the time per search is learnt here
            started.clear()
            running = asyncio.create_task(c.get("/v1/search", **SHADE))
            await wait_for(started.is_set)
            behind = await send(c)
            running = await running
            alone = await send(c)  # nothing ahead: admitted
            await app.state.batcher.stop()
            return [learnt, running, behind, alone]

    return asyncio.run(scenario())


def test_search_is_503_when_the_searches_ahead_would_outlast_the_timeout(built, tiny_model):
    """0.5 s a search: one ahead and this one (1 s) do not fit in half of a 1.6 s timeout."""
    app, gate, started = held_app(built, tiny_model, ServeSettings(timeout_s=1.6), delay=0.5)
    gate.set()
    answers = behind_a_search(app, started, lambda c: c.get("/v1/search", **SHADE))
    assert [r.status_code for r in answers] == [200, 200, 503, 200]
    assert answers[2].headers["retry-after"] == "1"
    assert "s of searches and images ahead" in answers[2].json()["detail"]


def test_predictions_wait_for_the_searches_ahead_of_them(built, tiny_model):
    """Searches and predictions share the model thread: with a 0.9 s search running, one
    image would wait past half of a 1.6 s timeout, so /v1/predict answers 503 at once."""
    app, gate, started = held_app(built, tiny_model, ServeSettings(timeout_s=1.6), delay=0.9)
    gate.set()
    photo = {"files": {"file": ("a.jpg", jpeg(built[2][0]), "image/jpeg")}}
    answers = behind_a_search(app, started, lambda c: c.post("/v1/predict", **photo))
    assert [r.status_code for r in answers] == [200, 200, 503, 200]
    assert answers[2].headers["retry-after"] == "1" and "ahead" in answers[2].json()["detail"]


def test_a_search_longer_than_the_timeout_is_504(built, tiny_model):
    app, gate, started = held_app(built, tiny_model, ServeSettings(timeout_s=0.3))
    with TestClient(app) as c:
        t0 = time.perf_counter()
        r = c.get("/v1/search", params={"shade": "#c81e3c"})
        gate.set()
        assert r.status_code == 504 and r.json()["detail"] == "request took longer than 0.3 s"
        assert time.perf_counter() - t0 < 3 and started.is_set()
        assert c.get("/v1/search", params={"shade": "#c81e3c"}).status_code == 200
