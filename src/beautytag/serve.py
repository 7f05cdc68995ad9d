"""The HTTP service behind ``beautytag serve`` (FastAPI + uvicorn).

Endpoints (all JSON unless said otherwise):

* ``POST /v1/predict`` - images as repeatable multipart field ``file``, or one image as the raw
  request body (any non-multipart content type; ``?filename=`` names it). Always answers
  ``{"results": [{"file", "attributes", "error"}, ...]}`` in request order, each item exactly
  what ``beautytag predict`` prints. When some files are bad and others are not, the answer is
  200 with the bad items' ``error`` filled (``attributes`` null), as in the CLI; only when no
  image can be used is the request an error: 413 (too many pixels), 415 (not an image),
  422 (truncated or corrupt), with ``{"detail": "<file>: <problem>"}``.
* ``POST /v1/explain?attribute=NAME[&size=PX]`` - one image in; a PNG of the letterboxed photo
  with a Grad-CAM heatmap (on the attended feature map) for the top class of ``NAME``, or the
  shade head's colour-pooling weights for a shade. Headers ``X-Beautytag-Attribute`` and
  ``X-Beautytag-Label`` say what is shown. 501 when the engine has no torch model.
* ``GET /healthz`` - ``{"status": "ok", ...}``; ``GET /metrics`` - Prometheus text;
  ``GET /openapi.json``; ``GET /`` - the web page (``web/index.html``).

Other answers: 400 no file, a malformed form or more images than the queue holds
(``queue_size``: such a request could never be admitted), 401 missing or wrong ``X-API-Key``
(when a key is set; ``/``, ``/healthz`` and ``/openapi.json`` stay open), 413 body over the size
limit (checked from Content-Length and while reading), 503 with ``Retry-After`` when the queue
is full or, while other images are in flight, the images ahead would take more than half the
timeout at the model's recent speed (its recent calls' average, or the call running now if that
is slower: so that overload is answered with 503 at once, not 504 later; an idle server always
admits, so one slow call cannot lock it out), 504 when a request takes longer than the timeout.

Requests are decoded in a thread pool; decoded images go to a bounded queue that one
background task drains in micro-batches (at most ``max_batch`` images, waiting at most
``max_wait_ms`` after the first), running the model one batch at a time in its own thread.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from beautytag import __version__
from beautytag.color import lab_to_hex
from beautytag.engine import Engine, usable_cpus
from beautytag.images import ImageError, letterbox
from beautytag.model import BeautyTagNet

log = logging.getLogger("beautytag.serve")

OPEN_PATHS = frozenset({"/", "/healthz", "/openapi.json"})
RAW_NAME = "<body>"


@dataclass
class ServeSettings:
    """Limits and knobs of the service."""

    max_batch: int = 16  # images per model call
    max_wait_ms: float = 5.0  # how long a batch waits for company after its first image
    queue_size: int = 64  # decoded images waiting for the model; more -> 503
    max_request_bytes: int = 20 * 1024 * 1024  # request body; more -> 413
    max_pixels: int = 40_000_000  # width * height of one image; more -> 413
    timeout_s: float = 10.0  # whole request; longer -> 504
    api_key: str | None = None  # required in X-API-Key when set
    workers: int = 2  # decoding threads

    def __post_init__(self) -> None:
        """Refuse settings the service cannot run with (ValueError naming the setting)."""
        counts = ["max_batch", "queue_size", "workers"]
        for name in [*counts, "max_request_bytes", "max_pixels"]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be more than 0, got {self.timeout_s}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")


class Result(BaseModel):
    """One image's answer, as ``beautytag predict`` prints it."""

    file: str
    attributes: dict[str, Any] | None = Field(
        description="per attribute: {label, score, top} | {labels, scores} | {lab, hex}"
    )
    error: str | None = Field(description="why the image could not be used")


class Results(BaseModel):
    results: list[Result]


class QueueFull(Exception):
    """No room in the queue for a request's images."""


class Metrics:
    """The Prometheus metrics of one app (its own registry, so apps do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "beautytag_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "beautytag_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "beautytag_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.inference = Histogram(
            "beautytag_inference_seconds", "Model time per batch", registry=self.registry
        )
        self.images = Counter(
            "beautytag_images", "Images received by outcome", ["outcome"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "beautytag_queue_depth", "Images waiting for the model", registry=self.registry
        )


class MicroBatcher:
    """Collects single images from concurrent requests into batches for ``engine``."""

    def __init__(self, engine: Engine, settings: ServeSettings, metrics: Metrics):
        self.engine = engine
        self.max_batch = max(1, settings.max_batch)
        self.max_wait = max(0.0, settings.max_wait_ms / 1000)
        self.queue_size = max(1, settings.queue_size)
        self.metrics = metrics
        self.seconds_per_image = 0.0  # model time per image, moving average of recent calls
        self.call: tuple[float, int] | None = None  # (start, images) of the call running now
        self.model_thread: ThreadPoolExecutor | None = None
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self.task: asyncio.Task | None = None
        metrics.queue_depth.set_function(lambda: self.queue.qsize() if self.queue else 0)

    def start(self) -> None:
        """Start the batching task on the running loop (done lazily on first use, and again
        if the loop changed)."""
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.queue = asyncio.Queue(self.queue_size)
            self.task = loop.create_task(self._run())
        if self.model_thread is None:
            self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="beautytag-model")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        if self.model_thread is not None:
            self.model_thread.shutdown(wait=False, cancel_futures=True)
            self.model_thread = None

    def room(self) -> int:
        self.start()
        assert self.queue is not None
        return self.queue_size - self.queue.qsize()

    async def predict(self, tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Queue the images (all or none: raises :class:`QueueFull`) and await their results."""
        if self.room() < len(tensors):
            raise QueueFull
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in tensors]
        for t, f in zip(tensors, futures, strict=True):
            self.queue.put_nowait((t, f))
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for f in futures:  # on timeout: the batcher skips cancelled items
                f.cancel()

    def seconds_per_image_now(self) -> float:
        """The model's time per image: the moving average, or more if the call running now
        has already taken longer per image (the machine just got slower, e.g. under load)."""
        if self.call is None:
            return self.seconds_per_image
        started, images = self.call
        return max(self.seconds_per_image, (time.perf_counter() - started) / images)

    async def run_model(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the model thread (one model call at a time)."""
        self.start()
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        assert self.queue is not None
        items = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            getter = asyncio.ensure_future(self.queue.get())
            try:
                done, _ = await asyncio.wait({getter}, timeout=remaining)
            finally:
                if not getter.done():
                    getter.cancel()  # Queue.get leaves the item queued when cancelled
            if getter not in done:
                break
            items.append(getter.result())
        return items

    async def _run(self) -> None:
        while True:
            items = [(t, f) for t, f in await self._collect() if not f.done()]
            if not items:
                continue
            self.metrics.batch_size.observe(len(items))
            t0 = time.perf_counter()
            self.call = (t0, len(items))
            try:
                x = torch.stack([t for t, _ in items])
                preds = await self.run_model(self.engine.predict_tensors, x)
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("model call failed")
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self.call = None
            seconds = time.perf_counter() - t0
            self.metrics.inference.observe(seconds)
            rate = 0.3 if self.seconds_per_image else 1.0  # the first call sets it
            self.seconds_per_image += rate * (seconds / len(items) - self.seconds_per_image)
            for (_, f), p in zip(items, preds, strict=True):
                if not f.done():
                    f.set_result(p)


def status_for(problem: str) -> int:
    """The HTTP status for an image problem reported by :func:`load_image`."""
    if problem.startswith(("too many pixels", "absurd dimensions")):
        return 413
    if problem.startswith("not an image"):
        return 415
    return 422


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class Guard:
    """ASGI middleware: API key, body size limit (header and stream) and request metrics."""

    def __init__(
        self, app: ASGIApp, settings: ServeSettings, metrics: Metrics, endpoints: set[str]
    ):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.endpoints = endpoints  # metric labels: a known path, else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        status = 500
        started = False
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def reject(code: int, detail: str) -> None:
            await JSONResponse({"detail": detail}, code)(scope, receive, send_wrapper)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = self.settings.max_request_bytes
        try:
            key = self.settings.api_key
            if (
                key
                and path not in OPEN_PATHS
                and not hmac.compare_digest(  # the header's bytes against the key's UTF-8
                    headers.get("x-api-key", "").encode("latin-1").strip(), key.encode()
                )
            ):
                await reject(401, "missing or wrong API key (send it in the X-API-Key header)")
                return
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                await reject(413, f"request body larger than {limit} bytes")
                return
            seen = 0

            async def limited_receive() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except BodyTooLarge as e:
                if started:
                    raise
                await reject(413, e.detail)
        finally:
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


# -- explanations -------------------------------------------------------------------------


def gradcam(model: BeautyTagNet, x: torch.Tensor, attribute: str) -> tuple[np.ndarray, str]:
    """A (H, W) map in 0..1 at the input's size for one image ``x`` (1, 3, H, W), and the label
    it explains: Grad-CAM on ``model.features(x)`` for the top class of a class attribute,
    the shade head's pooling weights for a shade."""
    a = model.schema[attribute]
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        fmap = model.features(x)
    fmap = fmap.detach().float().requires_grad_(True)
    head = model.heads[a.name]
    with torch.enable_grad():
        if a.kind == "shade":
            cam = head.weights(fmap, x.float()).detach()
            lab = model.head(a.name, fmap, model.pool(fmap).flatten(1), x.float())[0].detach()
            label = lab_to_hex([float(t) for t in lab])
        else:
            logits = model.head(a.name, fmap, model.pool(fmap).flatten(1), x.float())[0]
            idx = int(logits.argmax())
            (grad,) = torch.autograd.grad(logits[idx], fmap)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * fmap).sum(1, keepdim=True)).detach()
            cam = torch.nn.functional.interpolate(
                cam, size=x.shape[-2:], mode="bilinear", align_corners=False
            )
            label = a.classes[idx]
    cam = cam[0, 0].float().cpu()
    cam = cam - cam.min()
    top = float(cam.max())
    return (cam / top if top > 0 else cam).numpy(), label


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> RGB uint8 (a 'jet'-like blue-cyan-yellow-red ramp)."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    rgb = np.concatenate([1.5 - np.abs(4 * v - c) for c in (3, 2, 1)], -1).clip(0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(img: Image.Image, cam: np.ndarray, size: int, alpha: float = 0.7) -> Image.Image:
    """The letterboxed photo at ``size`` px with ``cam`` blended over it (more where hotter)."""
    photo = np.asarray(letterbox(img, size), dtype=np.float32)
    heat = Image.fromarray((cam * 255).astype(np.uint8), "L").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    v = np.asarray(heat, dtype=np.float32) / 255
    a = (0.15 + (alpha - 0.15) * v)[..., None]
    blend = photo * (1 - a) + colormap(v).astype(np.float32) * a
    return Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))


# -- the app --------------------------------------------------------------------------------

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "Images as repeatable multipart field `file`, or one image as the body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _error_doc(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "no file, a malformed form, or more images than one request may hold",
        401: "missing or wrong X-API-Key",
        413: "body too large, or an image with too many pixels",
        415: "not an image",
        422: "truncated or corrupt image, or an unknown attribute",
        501: "the engine has no torch model",
        503: "queue full (see Retry-After)",
        504: "timed out",
    }
    return {c: {"description": text[c]} for c in codes}


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (anything with the :class:`Engine` interface)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    batcher = MicroBatcher(engine, settings, metrics)
    decoder = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="beautytag-decode")
    # explanations decode and draw on full-size photos in their own thread, so that a burst
    # of them never holds /v1/predict's decoding up
    explainer = ThreadPoolExecutor(1, thread_name_prefix="beautytag-explain")
    explaining = 0
    inflight = 0  # /v1/predict images admitted and not yet answered
    took: dict[str, float] = {}  # seconds per image of each step, moving averages

    def clocked(step: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, its time added to the step's average (in the thread that runs it,
        so a step cut off by a request's timeout still counts when it ends)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds = time.perf_counter() - t0
            took[step] = 0.8 * took[step] + 0.2 * seconds if step in took else seconds

    def explain_seconds() -> float:
        return sum(took.get(f"explain {step}", 0.0) for step in ("decode", "model", "render"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        for pool in (decoder, explainer):
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="beautytag",
        version=__version__,
        description=(__doc__ or "").split("\n\n")[0],
        lifespan=lifespan,
        docs_url=None,  # Swagger UI needs a CDN; the spec is at /openapi.json
        redoc_url=None,
    )
    app.state.settings, app.state.metrics, app.state.batcher = settings, metrics, batcher

    def decode(data: bytes, name: str) -> tuple[Image.Image, torch.Tensor]:
        try:
            return engine.load(data, name, int(settings.max_pixels))
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever else a file can do, it is its fault
            raise ImageError(name, f"cannot process image: {e}") from None

    def decode_tensor(data: bytes, name: str) -> torch.Tensor:
        """Only the model input: the full-size image is freed in the thread, not held until
        the whole request is decoded."""
        return clocked("decode", decode, data, name)[1]

    def render(img: Image.Image, cam: np.ndarray, size: int) -> bytes:
        """The explanation as PNG bytes (CPU work on the full-size photo: run in a thread)."""
        buf = io.BytesIO()
        overlay(img, cam, size).save(buf, format="PNG")
        return buf.getvalue()

    async def read_images(request: Request, filename: str | None) -> list[tuple[str, bytes]]:
        """(name, bytes) of the request's images, multipart or raw body."""
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            most = settings.queue_size
            try:
                async with request.form(max_files=most) as form:
                    items = form.getlist("file")
                    if any(not isinstance(u, UploadFile) for u in items):
                        raise HTTPException(400, "form field 'file' must be a file upload")
                    return [
                        (u.filename or f"file{i}", await u.read())
                        for i, u in enumerate(items)
                        if isinstance(u, UploadFile)
                    ]
            except ClientDisconnect:
                raise left() from None
            except StarletteHTTPException as e:  # how Starlette reports a form it refuses
                if "Too many files" in str(e.detail):
                    raise HTTPException(400, f"too many images: at most {most} per request") from e
                raise
        try:
            data = await request.body()
        except ClientDisconnect:
            raise left() from None
        return [(filename or RAW_NAME, data)] if data else []

    def left() -> HTTPException:  # nobody to answer: counted as a bad request, not a 500
        return HTTPException(400, "the client left before sending the whole request")

    async def in_thread(fn: Any, *args: Any, pool: ThreadPoolExecutor = decoder) -> Any:
        """Run ``fn`` in a thread pool (the decoding one by default)."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def decode_all(files: list[tuple[str, bytes]]) -> list[torch.Tensor | BaseException]:
        """The model inputs of ``files`` in order, or each one's exception."""
        jobs = [in_thread(decode_tensor, data, name) for name, data in files]
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    def no_file() -> HTTPException:
        return HTTPException(
            400, "no image: send multipart field 'file' (repeatable) or one image as the body"
        )

    def all_bad(errors: list[ImageError]) -> HTTPException:
        metrics.images.labels("error").inc(len(errors))
        return HTTPException(status_for(errors[0].problem), "; ".join(map(str, errors)))

    def busy(reason: str) -> HTTPException:
        return HTTPException(503, f"server busy: {reason}", headers={"Retry-After": "1"})

    def timed_out() -> HTTPException:
        return HTTPException(504, f"request took longer than {settings.timeout_s} s")

    page_methods = ["GET", "HEAD"]  # HEAD: what load balancers and health checkers send

    @app.api_route("/", methods=page_methods, response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("beautytag") / "web" / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/healthz", summary="Liveness and model info")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "model": str(getattr(engine, "model_path", "")),
            "backend": getattr(getattr(engine, "backend", None), "name", "torch"),
            "image_size": engine.cfg.model.image_size,
            "attributes": [{"name": a.name, "kind": a.kind} for a in engine.schema.attributes],
            "explain": isinstance(getattr(engine, "model", None), BeautyTagNet),
            "queue": settings.queue_size - batcher.room(),
        }

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/predict",
        summary="Attributes of one or several photos",
        openapi_extra=_BODY_DOC,
        responses=_error_doc(400, 401, 413, 415, 422, 503, 504),
    )
    async def predict(
        request: Request,
        filename: str | None = Query(None, description="name of a raw-body image in the answer"),
    ) -> Results:
        """``{"results": [{"file", "attributes", "error"}, ...]}`` in request order; a bad file
        among good ones fills its ``error`` (status 200); all bad is a 4xx."""
        nonlocal inflight
        started = time.perf_counter()
        try:
            async with asyncio.timeout(settings.timeout_s):
                files = await read_images(request, filename)
                if not files:
                    raise no_file()
                if len(files) > settings.queue_size:  # could never be admitted: not a 503
                    most = settings.queue_size
                    raise HTTPException(
                        400, f"too many images ({len(files)}): at most {most} per request"
                    )
                # admission: images in flight (decoding, queued or in the model) are bounded by
                # queue_size + max_batch, and, while others are in flight, by what the model can
                # answer in half the time left to this request, so overload is answered with 503
                # at once instead of piling up decode work and memory, or answering 504 later.
                # An idle server always admits: the speed estimate only changes when the model
                # runs, so one slow call must not lock every later request out. An image's
                # time is the model's plus its decoding's (shared by the decoding threads).
                limit = settings.queue_size + settings.max_batch
                decoding = took.get("decode", 0.0) / settings.workers
                per_image = batcher.seconds_per_image_now() + decoding
                explanations = explaining * took.get("explain model", 0.0)  # the same model
                ahead_s = (inflight + len(files)) * per_image + explanations
                left_s = settings.timeout_s - (time.perf_counter() - started)
                if inflight + len(files) > limit or batcher.room() < len(files):
                    raise busy("queue full")
                if (inflight > 0 or explaining > 0) and ahead_s > left_s / 2:
                    raise busy(f"about {ahead_s:.1f} s of images ahead of this request")
                inflight += len(files)
                try:
                    decoded = await decode_all(files)
                    for d in decoded:
                        if isinstance(d, BaseException) and not isinstance(d, ImageError):
                            raise d
                    errors = [d for d in decoded if isinstance(d, ImageError)]
                    if len(errors) == len(decoded):
                        raise all_bad(errors)
                    good = [d for d in decoded if isinstance(d, torch.Tensor)]
                    try:
                        preds = iter(await batcher.predict(good))
                    except QueueFull:
                        raise busy("queue full") from None
                finally:
                    inflight -= len(files)
        except TimeoutError:
            raise timed_out() from None
        metrics.images.labels("ok").inc(len(good))
        metrics.images.labels("error").inc(len(errors))
        return Results(
            results=[
                Result(file=name, attributes=None, error=d.problem)
                if isinstance(d, ImageError)
                else Result(file=name, attributes=next(preds), error=None)
                for (name, _), d in zip(files, decoded, strict=True)
            ]
        )

    @app.post(
        "/v1/explain",
        summary="Heatmap of where the model looks for one attribute",
        openapi_extra=_BODY_DOC,
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the photo with the heatmap"},
            **_error_doc(400, 401, 413, 415, 422, 501, 503, 504),
        },
    )
    async def explain(
        request: Request,
        attribute: str | None = Query(None, description="attribute name (default: the first)"),
        size: int | None = Query(None, ge=16, le=1024, description="PNG side (default: model's)"),
        filename: str | None = Query(None),
    ) -> Response:
        """A PNG (``size`` x ``size``, default the model's input size) of the letterboxed photo
        with a Grad-CAM heatmap for the top class of ``attribute`` (the pooling weights for a
        shade); headers ``X-Beautytag-Attribute`` and ``X-Beautytag-Label``."""
        nonlocal explaining
        model = getattr(engine, "model", None)
        if not isinstance(model, BeautyTagNet):
            raise HTTPException(
                501, "explanations need a PyTorch checkpoint (an exported file has no gradients)"
            )
        name = attribute or engine.schema.names[0]
        if name not in engine.schema.names:
            raise HTTPException(
                422, f"unknown attribute {name!r} (one of: {', '.join(engine.schema.names)})"
            )
        if explaining >= settings.queue_size:
            raise busy("queue full")
        if explaining > 0 and "explain render" not in took:  # none timed yet: one at a time
            raise busy("an explanation is running, and their time is not known yet")
        if explaining > 0 and (explaining + 1) * explain_seconds() > settings.timeout_s / 2:
            raise busy(f"about {explaining * explain_seconds():.1f} s of explanations ahead")
        explaining += 1
        try:
            async with asyncio.timeout(settings.timeout_s):
                files = await read_images(request, filename)
                if not files:
                    raise no_file()
                if len(files) > 1:
                    raise HTTPException(400, "explain takes one image")
                ((file, data),) = files
                try:
                    step = ("explain decode", decode, data, file)
                    img, x = await in_thread(clocked, *step, pool=explainer)
                except ImageError as e:
                    raise all_bad([e]) from None
                step = ("explain model", gradcam, model, x[None], name)
                cam, label = await batcher.run_model(clocked, *step)
                step = ("explain render", render, img, cam, size or engine.cfg.model.image_size)
                png = await in_thread(clocked, *step, pool=explainer)
        except TimeoutError:
            raise timed_out() from None
        finally:
            explaining -= 1
        return Response(
            png,
            media_type="image/png",
            headers={"X-Beautytag-Attribute": name, "X-Beautytag-Label": label},
        )

    endpoints = {getattr(r, "path", "") for r in app.routes} - {""}
    app.add_middleware(Guard, settings=settings, metrics=metrics, endpoints=endpoints)
    return app


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    backend: str = "onnxruntime",
    **settings: Any,
) -> None:
    """Load the model and run the service with uvicorn until interrupted. The model gets
    ``threads`` CPU threads, by default all CPUs but one (left for HTTP and decoding). With
    backend ``onnxruntime`` (default) a checkpoint is exported to ONNX at start and run by ONNX
    Runtime (faster than PyTorch on CPUs: benchmarks/results/serve.md); PyTorch keeps the
    model for /v1/explain."""
    import uvicorn

    limits = ServeSettings(**settings)  # a bad setting fails here, before the model loads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    threads = threads or max(1, usable_cpus() - 1)
    engine = Engine(model_path, batch_size=limits.max_batch, threads=threads, backend=backend)
    app = create_app(engine, limits)
    size = engine.cfg.model.image_size
    for n in (1, engine.batch_size):  # first calls allocate; keep that out of answers
        engine.predict_tensors(torch.zeros(n, 3, size, size))
    # The start-up objects of torch, timm and FastAPI (hundreds of thousands) never die:
    # without freezing them each full garbage collection walks them all, stalling requests.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port)
