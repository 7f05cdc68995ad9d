"""The HTTP service: shapes, every error status, micro-batching, metrics, explanations."""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from beautytag.checkpoint import load_checkpoint
from beautytag.cli import build_parser, main
from beautytag.runtime.engine import Engine
from beautytag.runtime.explain import gradcam
from beautytag.serve.app import create_app
from beautytag.serve.settings import ServeSettings

from .conftest import make_tiny_model


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(tiny_model)


def jpeg(color=(200, 30, 60), size=(60, 80), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


class Wrapped:
    """An engine that records batch sizes and can be slowed down or held at a gate."""

    def __init__(self, engine: Engine, delay: float = 0.0, gate: threading.Event | None = None):
        self._engine = engine
        self.delay = delay
        self.gate = gate
        self.sizes: list[int] = []
        self.called = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def predict_tensors(self, x):
        self.sizes.append(len(x))
        self.called.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        return self._engine.predict_tensors(x)


@pytest.fixture
def make_client(engine) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(eng: Any = None, **settings: Any) -> TestClient:
        client = TestClient(create_app(eng or engine, ServeSettings(**settings)))
        clients.append(client.__enter__())
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "application/octet-stream")) for name, data in items]


def test_healthz_and_page(client, engine):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["image_size"] == 64 and h.json()["explain"] is True
    assert h.json()["model"] == engine.model_path.name  # the file's name, not its path
    assert [a["name"] for a in h.json()["attributes"]] == engine.schema.names
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/predict" in page.text and "v1/explain" in page.text and "<script>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # offline: no CDN
    for path in ("/", "/healthz"):  # load balancers and health checkers probe with HEAD
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""


def test_predict_one_file_matches_the_engine(client, engine):
    data = jpeg()
    r = client.post("/v1/predict", files=files(("a.jpg", data)))
    assert r.status_code == 200
    expected = next(engine.predict_items([("a.jpg", data)])).to_dict()
    assert r.json() == {"results": [expected]}
    assert expected["error"] is None and set(expected["attributes"]) == set(engine.schema.names)


def test_predict_raw_body(client, engine):
    data = jpeg((10, 120, 200), fmt="PNG")
    r = client.post("/v1/predict", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200
    assert r.json() == {"results": [next(engine.predict_items([("<body>", data)])).to_dict()]}
    r = client.post("/v1/predict?filename=x.png", content=data)
    assert r.json()["results"][0]["file"] == "x.png"


def test_predict_several_files_keeps_order_and_reports_bad_ones(client, engine):
    items = [("a.jpg", jpeg((200, 0, 0))), ("b.png", jpeg((0, 200, 0), fmt="PNG"))]
    items += [("c.jpg", jpeg((0, 0, 200)))]
    r = client.post("/v1/predict", files=files(*items))
    assert r.status_code == 200
    assert r.json() == {"results": [p.to_dict() for p in engine.predict_items(items)]}

    mixed = [items[0], ("bad.jpg", b"not an image at all"), ("cut.jpg", jpeg()[:300])]
    r = client.post("/v1/predict", files=files(*mixed))
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["file"] for x in res] == ["a.jpg", "bad.jpg", "cut.jpg"]
    assert res[0]["error"] is None and res[0]["attributes"]
    assert "not an image" in res[1]["error"] and res[1]["attributes"] is None
    assert "truncated" in res[2]["error"] and res[2]["attributes"] is None


def test_bad_images_are_4xx_with_the_reason(client):
    r = client.post("/v1/predict", files=files(("notes.jpg", b"hello")))
    assert r.status_code == 415 and r.json()["detail"].startswith("notes.jpg: not an image")
    r = client.post("/v1/predict", files=files(("cut.jpg", jpeg(size=(300, 300))[:500])))
    assert r.status_code == 422 and "cut.jpg: truncated" in r.json()["detail"]
    r = client.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n garbage")
    assert r.status_code in (415, 422) and r.json()["detail"].startswith("<body>: ")
    r = client.post("/v1/predict", files=files(("a", b"x"), ("b", b"")))
    assert r.status_code == 415 and "a: " in r.json()["detail"] and "b: " in r.json()["detail"]
    # the service is still fine
    assert client.post("/v1/predict", files=files(("ok.jpg", jpeg()))).status_code == 200


def test_no_file_is_400(client):
    assert client.post("/v1/predict").status_code == 400
    r = client.post("/v1/predict", files={"picture": ("a.jpg", jpeg(), "image/jpeg")})
    assert r.status_code == 400 and "file" in r.json()["detail"]
    r = client.post("/v1/predict", data={"file": "just text"}, files={"x": ("x", b"", "a/b")})
    assert r.status_code == 400


def test_api_key(make_client):
    c = make_client(api_key="s3cret")
    img = files(("a.jpg", jpeg()))
    assert c.post("/v1/predict", files=img).status_code == 401
    r = c.post("/v1/predict", files=img, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert c.post("/v1/predict", files=img, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/metrics").status_code == 401
    assert c.post("/v1/explain", content=jpeg()).status_code == 401
    assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    c = make_client(api_key="clé")  # a key beyond ASCII: as curl sends it (its UTF-8 bytes)
    key = {"X-API-Key": "clé".encode()}
    assert c.post("/v1/predict", files=img, headers=key).status_code == 200
    assert c.post("/v1/predict", files=img, headers={"X-API-Key": "cle"}).status_code == 401


def test_body_too_large_is_413(make_client):
    c = make_client(max_request_bytes=2000)
    big = jpeg(size=(200, 200)) + b"\0" * 3000
    r = c.post("/v1/predict", files=files(("big.jpg", big)))  # has Content-Length
    assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["detail"]
    r = c.post("/v1/predict", content=big)
    assert r.status_code == 413

    def chunks():  # no Content-Length: caught while reading
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    r = c.post("/v1/predict", content=chunks(), headers={"content-type": "image/jpeg"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["detail"]
    assert c.post("/v1/predict", content=jpeg(size=(20, 20))).status_code == 200


def test_too_many_pixels_is_413(make_client):
    c = make_client(max_pixels=1000)
    r = c.post("/v1/predict", files=files(("huge.png", jpeg(size=(40, 40), fmt="PNG"))))
    assert r.status_code == 413 and r.json()["detail"].startswith("huge.png: too many pixels")
    assert c.post("/v1/predict", content=jpeg(size=(20, 20))).status_code == 200


def test_timeout_is_504(make_client, engine):
    c = make_client(Wrapped(engine, delay=1.0), timeout_s=0.2)
    t0 = time.perf_counter()
    r = c.post("/v1/predict", files=files(("a.jpg", jpeg())))
    assert r.status_code == 504 and "longer than 0.2 s" in r.json()["detail"]
    assert time.perf_counter() - t0 < 0.9


async def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.005)


def one_while_another_runs(
    app: Any,
    first: list,
    second: list,
    third: list,
    running: Callable[[], bool],
    between: Callable[[], None] = lambda: None,
    pause: float = 0.0,
) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
    """The answers to three /v1/predict requests of these files: the first alone, then
    (after `between()`) the second, and the third once `running()` holds for the second and
    `pause` seconds have passed."""

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answers = [await c.post("/v1/predict", files=first)]
            between()
            in_flight = asyncio.create_task(c.post("/v1/predict", files=second))
            await _wait_for(running)
            await asyncio.sleep(pause)
            answers.append(await c.post("/v1/predict", files=third))
            answers.insert(1, await in_flight)
            await app.state.batcher.stop()
            return tuple(answers)

    return asyncio.run(scenario())


def test_queue_full_is_503_with_retry_after(engine):
    gate = threading.Event()
    slow = Wrapped(engine, gate=gate)
    app = create_app(slow, ServeSettings(queue_size=1, max_batch=1, max_wait_ms=0))
    data = {"files": files(("a.jpg", jpeg()))}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = asyncio.create_task(c.post("/v1/predict", **data))
            await _wait_for(slow.called.is_set)  # the model holds the first image
            second = asyncio.create_task(c.post("/v1/predict", **data))
            await _wait_for(lambda: app.state.batcher.queue.qsize() == 1)  # the queue is full
            third = await c.post("/v1/predict", **data)
            two = await c.post("/v1/predict", files=files(("a", jpeg()), ("b", jpeg())))
            gate.set()
            results = await asyncio.gather(first, second)
            await app.state.batcher.stop()
            return third, two, results

    third, two, (first, second) = asyncio.run(scenario())
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert "queue full" in third.json()["detail"]
    assert two.status_code == 400  # more than the queue holds: never admitted, so no 503
    assert first.status_code == 200 and second.status_code == 200


def test_concurrent_requests_are_batched(engine):
    rec = Wrapped(engine)
    app = create_app(rec, ServeSettings(max_wait_ms=50, max_batch=16))
    images = [jpeg((30 * i, 100, 200 - 20 * i)) for i in range(8)]

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            rs = await asyncio.gather(
                *(c.post("/v1/predict", files=files((f"{i}.jpg", d))) for i, d in enumerate(images))
            )
            metrics = (await c.get("/metrics")).text
            await app.state.batcher.stop()
            return rs, metrics

    responses, metrics = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 8
    assert sum(rec.sizes) == 8 and max(rec.sizes) > 1, rec.sizes
    # each answer is its own image's, whatever batch it travelled in
    for i, (r, d) in enumerate(zip(responses, images, strict=True)):
        expected = next(engine.predict_items([(f"{i}.jpg", d)])).to_dict()
        got = r.json()["results"][0]
        assert got["file"] == expected["file"]
        assert got["attributes"]["shade"]["hex"] == expected["attributes"]["shade"]["hex"]
    assert f"beautytag_batch_size_count {float(len(rec.sizes))}" in metrics


def test_metrics(client):
    client.post("/v1/predict", files=files(("a.jpg", jpeg())))
    client.post("/v1/predict", files=files(("a.jpg", b"nope")))
    client.get("/no/such/path")
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'beautytag_requests_total{endpoint="/v1/predict",method="POST",status="200"} 1.0' in text
    assert 'beautytag_requests_total{endpoint="/v1/predict",method="POST",status="415"} 1.0' in text
    assert 'endpoint="other",method="GET",status="404"' in text
    assert 'beautytag_request_duration_seconds_bucket{endpoint="/v1/predict"' in text
    assert 'beautytag_batch_size_bucket{le="1.0"} 1.0' in text
    assert "beautytag_batch_size_count 1.0" in text
    assert 'beautytag_images_total{outcome="error"} 1.0' in text
    assert "beautytag_queue_depth 0.0" in text


@pytest.mark.parametrize("attribute", ["category", "function", "shade"])
def test_explain_returns_a_png(client, engine, attribute):
    r = client.post(
        f"/v1/explain?attribute={attribute}", files=files(("a.jpg", jpeg(size=(90, 40))))
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    assert r.headers["x-beautytag-attribute"] == attribute
    label = r.headers["x-beautytag-label"]
    a = engine.schema[attribute]
    assert label in a.classes if a.kind != "shade" else label.startswith("#")
    r = client.post(f"/v1/explain?attribute={attribute}&size=200", content=jpeg())
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (200, 200)


def test_explain_errors(make_client, engine):
    c = make_client()
    assert c.post("/v1/explain?attribute=nope", content=jpeg()).status_code == 422
    assert c.post("/v1/explain?attribute=category", content=b"text").status_code == 415
    assert c.post("/v1/explain?attribute=category").status_code == 400
    two = files(("a", jpeg()), ("b", jpeg()))
    assert c.post("/v1/explain?attribute=category", files=two).status_code == 400
    no_torch = Wrapped(engine)
    no_torch.model = None  # e.g. an engine running an .onnx file
    r = make_client(no_torch).post("/v1/explain?attribute=category", content=jpeg())
    assert r.status_code == 501


def test_openapi_lists_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/healthz", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert {"413", "503", "504"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])
    for path in ("/v1/predict", "/v1/explain"):  # a form without a file is a 400: not allowed
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert form["schema"]["required"] == ["file"]
        assert form["schema"]["properties"]["file"]["minItems"] == 1
        assert {"400", "413", "415", "503"} <= set(spec["paths"][path]["post"]["responses"])


def test_cli_serve_options(monkeypatch):
    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "4"])
    assert args.host == "127.0.0.1" and args.max_batch == 4 and args.api_key is None
    seen: dict[str, Any] = {}
    monkeypatch.setattr("beautytag.serve.server.serve", lambda model, **kw: seen.update(kw))
    monkeypatch.setenv("BEAUTYTAG_API_KEY", "k")
    assert args.func(args) == 0
    assert seen["api_key"] == "k" and seen["port"] == 0 and seen["max_batch"] == 4


def test_cli_serve_takes_the_api_key_from_a_file(monkeypatch, tmp_path, capsys):
    seen: dict[str, Any] = {}
    monkeypatch.setattr("beautytag.serve.server.serve", lambda model, **kw: seen.update(kw))
    (tmp_path / "key").write_text("s3cret\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "key")]) == 0
    assert seen["api_key"] == "s3cret"
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "empty")]) == 2
    assert "the API key file is empty" in capsys.readouterr().err
    assert main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "cannot read the API key" in capsys.readouterr().err


def test_onnxruntime_engine_from_a_checkpoint_predicts_and_explains(
    make_client, engine, tiny_model
):
    """The service's default: the checkpoint exported at start and run by ONNX Runtime, with
    the PyTorch model kept for Grad-CAM; answers match the PyTorch engine's."""
    ort_engine = Engine(tiny_model, backend="onnxruntime")
    assert ort_engine.backend.name == "onnxruntime" and ort_engine.model is not None
    c = make_client(ort_engine)
    assert c.get("/healthz").json()["backend"] == "onnxruntime"
    data = jpeg((30, 160, 90))
    got = c.post("/v1/predict", content=data).json()["results"][0]["attributes"]
    want = next(engine.predict_items([("a.jpg", data)])).to_dict()["attributes"]
    assert got["category"]["label"] == want["category"]["label"]
    assert got["category"]["score"] == pytest.approx(want["category"]["score"], abs=1e-3)
    assert got["shade"]["lab"] == pytest.approx(want["shade"]["lab"], abs=0.05)
    r = c.post("/v1/explain?attribute=category", content=data)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_admission_answers_503_when_the_wait_would_outlast_the_timeout(engine):
    slow = Wrapped(engine, delay=0.3)  # 0.3 s per image: two fit in half of 1.5 s, three do not
    app = create_app(slow, ServeSettings(timeout_s=1.5, max_wait_ms=0))
    data = {"files": files(("a.jpg", jpeg()))}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = await c.post("/v1/predict", **data)  # the model's speed is learnt here
            second = asyncio.create_task(c.post("/v1/predict", **data))
            await _wait_for(lambda: len(slow.sizes) == 2)  # the model holds the second image
            third = await c.post("/v1/predict", files=files(("a", jpeg()), ("b", jpeg())))
            fourth = await c.post("/v1/predict", **data)
            second = await second
            await app.state.batcher.stop()
            return first, second, third, fourth

    first, second, third, fourth = asyncio.run(scenario())
    assert first.status_code == 200 and second.status_code == 200
    # 1 in flight + 2 new images = about 0.9 s of work ahead > 0.75 s: 503 at once, not 504 later
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert "s of images ahead" in third.json()["detail"]
    assert fourth.status_code == 200  # 1 + 1 images (0.6 s) still fit
    assert app.state.batcher.seconds_per_image == pytest.approx(0.3, abs=0.1)


def test_admission_sees_a_model_call_that_is_slower_than_the_recent_ones(engine):
    """Under overload the model can slow down many times over (CPUs shared with the clients):
    the call running now counts, not only the average of the calls before it."""
    slow = Wrapped(engine, delay=0.05)
    app = create_app(slow, ServeSettings(timeout_s=3.0, max_wait_ms=0))
    one = files(("a.jpg", jpeg()))

    def slower() -> None:  # learnt from the first request: 0.05 s per image
        slow.delay = 2.0

    # the third is sent when the call of the second image has taken 0.8 s so far
    first, second, third = one_while_another_runs(
        app, one, one, one, lambda: len(slow.sizes) == 2, slower, pause=0.8
    )
    assert first.status_code == 200 and second.status_code == 200
    # 2 images at >= 0.8 s each ahead > half the 3 s timeout: 503 now, where the average
    # (0.05 s) would have admitted it to wait out the slow call and time out (504)
    assert third.status_code == 503 and "s of images ahead" in third.json()["detail"]
    assert app.state.batcher.call is None


def test_gradcam_explains_a_pixel_colour_head(tmp_path):
    model, cfg, _ = load_checkpoint(
        make_tiny_model(tmp_path / "pc.pt", model={"pixel_colour": ["color"]})
    )
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    cam, label = gradcam(model, x, "color")
    assert cam.shape == (64, 64) and cam.min() == 0.0 and cam.max() == 1.0  # scaled to 0..1
    assert cam.std() > 0.05  # a map, not a constant
    with torch.no_grad():  # it explains the class the model answers
        assert label == cfg.schema["color"].classes[int(model.eval()(x)["color"].argmax())]


def test_an_idle_server_admits_after_a_slow_call_and_a_busy_one_still_says_503(engine):
    """The speed estimate only changes when the model runs: after one slow call (3.5 s with
    a 2 s timeout) an idle server must still admit, or it would answer 503 forever."""
    gate = threading.Event()
    slow = Wrapped(engine, gate=gate)
    app = create_app(slow, ServeSettings(timeout_s=2.0, max_wait_ms=0))
    data = {"files": files(("a.jpg", jpeg()))}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            app.state.batcher.start()
            app.state.batcher.seconds_per_image = 3.5  # as after one 3.5 s call
            first = asyncio.create_task(c.post("/v1/predict", **data))
            await _wait_for(slow.called.is_set)  # admitted: the model holds its image
            second = await c.post("/v1/predict", **data)  # 1 in flight: 7 s ahead > 1 s
            gate.set()
            first = await first
            third = await c.post("/v1/predict", **data)  # idle again
            await app.state.batcher.stop()
            return first, second, third

    first, second, third = asyncio.run(scenario())
    assert first.status_code == 200 and third.status_code == 200
    assert second.status_code == 503 and "s of images ahead" in second.json()["detail"]
    assert second.headers["retry-after"] == "1"


class KeepsImages:
    """An engine whose ``load`` notes how many images it returned earlier are still alive."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.images: list[weakref.ref] = []
        self.alive: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load(self, *args: Any, **kwargs: Any):
        self.alive.append(sum(r() is not None for r in self.images))
        img, x = self._engine.load(*args, **kwargs)
        self.images.append(weakref.ref(img))
        return img, x


def test_predict_frees_each_full_size_image_once_decoded(make_client, engine):
    """/v1/predict needs only the model inputs: a request's decoded photos must not all be
    held until its last one is decoded (10 photos of 6000 x 6000 px would hold 1 GB)."""
    rec = KeepsImages(engine)
    c = make_client(rec, workers=1)  # one decoding thread: the files are decoded in turn
    r = c.post("/v1/predict", files=files(*((f"{i}.jpg", jpeg()) for i in range(4))))
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    assert rec.alive == [0, 0, 0, 0]
    r = c.post("/v1/explain?attribute=category", content=jpeg())  # explain keeps its image
    assert r.status_code == 200


def test_too_many_images_for_the_queue_is_400_not_503(make_client):
    c = make_client(queue_size=2, max_batch=1)
    r = c.post("/v1/predict", files=files(*((f"{i}.jpg", jpeg()) for i in range(3))))
    assert r.status_code == 400 and "retry-after" not in r.headers
    assert r.json()["detail"] == "too many images: at most 2 per request"
    r = c.post("/v1/predict", files=files(("a.jpg", jpeg()), ("b.jpg", jpeg())))
    assert r.status_code == 200


def test_explain_renders_in_its_own_thread_within_the_timeout(make_client, monkeypatch):
    """The overlay and the PNG work on the full-size photo: off the event loop, and a slow
    one is cut by the request's timeout (504) like the rest of the request."""
    import beautytag.runtime.explain

    threads: list[str] = []
    release = threading.Event()
    real = beautytag.runtime.explain.overlay

    def slow_overlay(*args: Any, **kwargs: Any):
        threads.append(threading.current_thread().name)
        release.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(beautytag.runtime.explain, "overlay", slow_overlay)
    c = make_client(timeout_s=1.0)
    t0 = time.perf_counter()
    r = c.post("/v1/explain?attribute=category", content=jpeg())
    release.set()
    assert r.status_code == 504 and time.perf_counter() - t0 < 3
    assert threads and threads[0].startswith("beautytag-explain")
    r = c.post("/v1/explain?attribute=category", content=jpeg())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_batch", 0),
        ("max_batch", -1),
        ("queue_size", 0),
        ("workers", 0),
        ("max_request_bytes", 0),
        ("max_pixels", -5),
        ("timeout_s", 0),
        ("timeout_s", math.nan),
        ("max_wait_ms", -1),
    ],
)
def test_settings_are_validated(setting, value):
    with pytest.raises(ValueError, match=f"^{setting} must be"):
        ServeSettings(**{setting: value})


def test_settings_limits_that_still_work():
    s = ServeSettings(max_batch=1, queue_size=1, workers=1, max_wait_ms=0, timeout_s=0.01)
    assert s.max_batch == 1 and s.max_wait_ms == 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--max-batch", "0"], "max_batch must be at least 1, got 0"),
        (["--queue-size", "-3"], "queue_size must be at least 1, got -3"),
        (["--timeout", "0"], "timeout_s must be more than 0, got 0.0"),
        (["--threads", "-1"], "threads must be at least 1, got -1"),
    ],
)
def test_cli_serve_refuses_a_bad_setting_before_loading_the_model(
    monkeypatch, capsys, flag, message
):
    def no_engine(*args: Any, **kwargs: Any):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("beautytag.serve.server.Engine", no_engine)
    assert main(["serve", *flag]) == 2
    err = capsys.readouterr().err
    assert err == f"beautytag serve: error: {message}\n"


def test_cli_serve_runs_a_torchscript_file_with_torch_unless_told(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "beautytag.serve.server.serve", lambda model, **kw: seen.append(kw["backend"])
    )
    assert main(["serve", "--model", "model.ts"]) == 0
    assert main(["serve", "--model", "model.onnx"]) == 0
    assert main(["serve"]) == 0  # the shipped default: exported to ONNX at start
    assert main(["serve", "--model", "model.ts", "--backend", "auto"]) == 0
    assert seen == ["torch", "onnxruntime", "onnxruntime", "auto"]


class SlowDecoding:
    """An engine whose photos take `delay` seconds each to decode."""

    def __init__(self, engine: Engine, delay: float):
        self._engine, self.delay = engine, delay
        self.decoding = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load(self, *args: Any, **kwargs: Any):
        self.decoding.set()
        time.sleep(self.delay)
        return self._engine.load(*args, **kwargs)


def test_admission_counts_the_decoding_time_of_slow_photos(engine):
    """Photos slow to decode (large PNGs) are answered 503 at once when the work ahead would
    outlast the timeout, not 504 later: their decoding counts, not only the model's time."""
    slow = SlowDecoding(engine, delay=0.3)
    app = create_app(slow, ServeSettings(timeout_s=2.0, max_wait_ms=0, workers=1))
    four = files(*((f"{i}.png", jpeg()) for i in range(4)))
    # the first teaches 0.3 s per photo; the third finds 8 x 0.3 s ahead > 1 s
    first, second, third = one_while_another_runs(
        app, files(("a", jpeg())), four, four, slow.decoding.is_set, slow.decoding.clear
    )
    assert first.status_code == 200 and second.status_code == 200
    assert third.status_code == 503 and "s of images ahead" in third.json()["detail"]


@pytest.fixture
def drawing(monkeypatch) -> SimpleNamespace:
    """Explanations' drawing waits for `gate` (clear it to hold them), then `delay` s."""
    import beautytag.runtime.explain

    held = SimpleNamespace(gate=threading.Event(), delay=0.0)
    held.gate.set()
    real = beautytag.runtime.explain.overlay

    def overlay(*args: Any, **kwargs: Any):
        held.gate.wait(5)
        time.sleep(held.delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(beautytag.runtime.explain, "overlay", overlay)
    return held


def test_explanations_never_hold_predictions_up_and_a_burst_is_503(engine, drawing):
    app = create_app(engine, ServeSettings(timeout_s=4.0, workers=1))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            url = "/v1/explain?attribute=category"
            drawing.delay = 0.8
            learnt = await c.post(url, content=jpeg())  # an explanation takes 0.8 s
            drawing.gate.clear()
            held = asyncio.create_task(c.post(url, content=jpeg()))
            await asyncio.sleep(0.3)  # the explanation holds its thread
            t0 = time.perf_counter()
            predicted = await c.post("/v1/predict", files=files(("a.jpg", jpeg())))
            predict_s = time.perf_counter() - t0
            burst = [asyncio.create_task(c.post(url, content=jpeg())) for _ in range(3)]
            await _wait_for(lambda: sum(t.done() for t in burst) == 2)  # answered at once
            drawing.gate.set()
            held, burst = await held, [await t for t in burst]
            await app.state.batcher.stop()
            return learnt, held, predicted, predict_s, burst

    learnt, held, predicted, predict_s, burst = asyncio.run(scenario())
    assert learnt.status_code == 200 and held.status_code == 200
    assert predicted.status_code == 200 and predict_s < 1.0  # not behind the explanation
    codes = [r.status_code for r in burst]  # 1 in flight + 1 more: 1.6 s ahead < 2 s
    assert sorted(codes) == [200, 503, 503]
    assert all("explanations ahead" in r.json()["detail"] for r in burst if r.status_code == 503)


def test_a_multipart_request_may_hold_as_many_files_as_the_queue(make_client):
    c = make_client(queue_size=40)
    r = c.post("/v1/predict", files=files(*((f"{i}.jpg", jpeg()) for i in range(40))))
    assert r.status_code == 200 and len(r.json()["results"]) == 40
    r = c.post("/v1/predict", files=files(*((f"{i}.jpg", jpeg()) for i in range(45))))
    assert r.status_code == 400 and r.json()["detail"] == "too many images: at most 40 per request"


@pytest.mark.parametrize("multipart", [False, True])
def test_a_client_that_leaves_mid_body_is_a_400_not_a_server_error(engine, multipart):
    app = create_app(engine, ServeSettings())
    boundary = b"xyz"
    body = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\n\xff\xd8"
    headers = [(b"content-length", b"100000")]
    if multipart:
        headers.append((b"content-type", b"multipart/form-data; boundary=" + boundary))

    async def scenario():
        sent: list[dict] = []
        messages = iter([{"type": "http.request", "body": body, "more_body": True},
                         {"type": "http.disconnect"}])  # fmt: skip

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)

        path = "/v1/predict"
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "headers": headers,
                 "http_version": "1.1", "scheme": "http", "server": ("test", 80),
                 "client": ("c", 1), "root_path": "", "app": app}  # fmt: skip
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400


def test_a_cold_server_admits_one_explanation_at_a_time_until_it_has_timed_one(engine, drawing):
    drawing.gate.clear()
    app = create_app(engine, ServeSettings(timeout_s=8.0))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            url = "/v1/explain?attribute=category"
            burst = [asyncio.create_task(c.post(url, content=jpeg())) for _ in range(5)]
            await _wait_for(lambda: sum(t.done() for t in burst) == 4)
            drawing.gate.set()
            answers = [await t for t in burst]
            await app.state.batcher.stop()
            return answers

    codes = sorted(r.status_code for r in asyncio.run(scenario()))
    assert codes == [200, 503, 503, 503, 503]
