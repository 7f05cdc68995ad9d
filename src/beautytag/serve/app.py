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
* ``POST /v1/search``, ``GET /v1/search?shade=``, ``GET /v1/thumbnail/{id}`` - with
  ``--index``: similar photos and shade matches (serve/search.py); 404 without an index;
  503 with ``Retry-After`` when ``queue_size`` searches are in flight or the work ahead on the
  model thread (searches and images) would take more than half the timeout.
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
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from beautytag import __version__
from beautytag.images import ImageError
from beautytag.nn.net import BeautyTagNet
from beautytag.runtime.engine import Engine
from beautytag.runtime.explain import gradcam, render_png
from beautytag.runtime.results import Prediction
from beautytag.search import Index
from beautytag.serve.batcher import Admission, Metrics, MicroBatcher, QueueFull
from beautytag.serve.contract import Result, Results, body_doc, error_doc, status_for
from beautytag.serve.guard import Guard
from beautytag.serve.search import add_search_routes
from beautytag.serve.settings import RAW_NAME, ServeSettings


def create_app(
    engine: Engine,
    settings: ServeSettings | None = None,
    search_index: Index | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (anything with the :class:`Engine` interface) and,
    with `search_index` (made by the engine's model), the search endpoints (serve/search.py)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    batcher = MicroBatcher(engine, settings, metrics)
    decoder = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="beautytag-decode")
    # explanations decode and draw on full-size photos in their own thread, so that a burst
    # of them never holds /v1/predict's decoding up
    explainer = ThreadPoolExecutor(1, thread_name_prefix="beautytag-explain")
    admission = Admission(settings, batcher)

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
        return admission.clocked("decode", decode, data, name)[1]

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

    @asynccontextmanager
    async def deadline() -> AsyncIterator[None]:
        """The request's timeout: what runs inside is cut off after ``timeout_s`` (504)."""
        try:
            async with asyncio.timeout(settings.timeout_s):
                yield
        except TimeoutError:
            raise HTTPException(504, f"request took longer than {settings.timeout_s} s") from None

    async def one_image(request: Request, filename: str | None, what: str) -> tuple[str, bytes]:
        """(name, bytes) of the request's one image; 400 for none or several."""
        files = await read_images(request, filename)
        if not files:
            raise no_file()
        if len(files) > 1:
            raise HTTPException(400, f"{what} takes one image")
        return files[0]

    async def explain_one(
        request: Request, filename: str | None, model: BeautyTagNet, name: str, size: int | None
    ) -> tuple[bytes, str]:
        """The PNG and the label explained for the request's one image (each step timed)."""
        file, data = await one_image(request, filename, "explain")
        clocked = admission.clocked
        try:
            img, x = await in_thread(clocked, "explain decode", decode, data, file, pool=explainer)
        except ImageError as e:
            raise all_bad([e]) from None
        cam, label = await batcher.run_model(
            clocked, "explain model", gradcam, model, x[None], name
        )
        side = size or engine.cfg.model.image_size
        png = await in_thread(clocked, "explain render", render_png, img, cam, side, pool=explainer)
        return png, label

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
            "model": Path(getattr(engine, "model_path", "")).name,  # no server paths shown
            "backend": getattr(getattr(engine, "backend", None), "name", "torch"),
            "image_size": engine.cfg.model.image_size,
            "attributes": [{"name": a.name, "kind": a.kind} for a in engine.schema.attributes],
            "explain": isinstance(getattr(engine, "model", None), BeautyTagNet),
            "search": search_index is not None,
            "gate": engine.cfg.model.gate or None,  # not a cosmetic: null answers
            "queue": settings.queue_size - batcher.room(),
        }

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/predict",
        summary="Attributes of one or several photos",
        openapi_extra=body_doc(settings.queue_size),
        responses=error_doc(400, 401, 413, 415, 422, 503, 504),
    )
    async def predict(
        request: Request,
        filename: str | None = Query(None, description="name of a raw-body image in the answer"),
    ) -> Results:
        """``{"results": [{"file", "attributes", "error"}, ...]}`` in request order; a bad file
        among good ones fills its ``error`` (status 200); all bad is a 4xx."""
        started = time.perf_counter()
        async with deadline():
            files = await read_images(request, filename)
            if not files:
                raise no_file()
            if len(files) > settings.queue_size:  # could never be admitted: not a 503
                most = settings.queue_size
                raise HTTPException(
                    400, f"too many images ({len(files)}): at most {most} per request"
                )
            left_s = settings.timeout_s - (time.perf_counter() - started)
            if refusal := admission.predict_refusal(len(files), left_s):
                raise busy(refusal)
            with admission.predicting(len(files)):
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
        metrics.images.labels("ok").inc(len(good))
        metrics.images.labels("error").inc(len(errors))
        answers = [
            Prediction(name, None, d.problem)
            if isinstance(d, ImageError)
            else Prediction(name, next(preds))
            for (name, _), d in zip(files, decoded, strict=True)
        ]
        return Results(results=[Result(**p.to_dict()) for p in answers])

    @app.post(
        "/v1/explain",
        summary="Heatmap of where the model looks for one attribute",
        openapi_extra=body_doc(1),
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the photo with the heatmap"},
            **error_doc(400, 401, 413, 415, 422, 501, 503, 504),
        },
    )
    async def explain(
        request: Request,
        attribute: str | None = Query(
            None,
            description="attribute name (default: the first)",
            json_schema_extra={"enum": engine.schema.names},
        ),
        size: int | None = Query(None, ge=16, le=1024, description="PNG side (default: model's)"),
        filename: str | None = Query(None),
    ) -> Response:
        """A PNG (``size`` x ``size``, default the model's input size) of the letterboxed photo
        with a Grad-CAM heatmap for the top class of ``attribute`` (the pooling weights for a
        shade); headers ``X-Beautytag-Attribute`` and ``X-Beautytag-Label``."""
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
        if refusal := admission.explain_refusal():
            raise busy(refusal)
        with admission.explaining_one():
            async with deadline():
                png, label = await explain_one(request, filename, model, name, size)
        return Response(
            png,
            media_type="image/png",
            headers={"X-Beautytag-Attribute": name, "X-Beautytag-Label": label},
        )

    async def read_photo(request: Request) -> tuple[str, torch.Tensor]:
        """The request's one photo (multipart or raw body), decoded for the model."""
        name, data = await one_image(request, None, "search")
        try:
            return name, await in_thread(decode_tensor, data, name)
        except ImageError as e:
            raise all_bad([e]) from None

    add_search_routes(
        app, engine, search_index, batcher, read_photo, in_thread, deadline, busy, admission
    )

    endpoints = {getattr(r, "path", "") for r in app.routes} - {""}
    app.add_middleware(Guard, settings=settings, metrics=metrics, endpoints=endpoints)
    return app
