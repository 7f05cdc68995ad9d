"""Micro-batching of single images into model calls, and admission control."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from beautytag.runtime.engine import Engine
from beautytag.serve.settings import ServeSettings, log


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


class Admission:
    """What the service has taken on and whether it can take more: the /v1/predict images in
    flight (decoding, queued or in the model), the explanations and searches running, and each
    step's time per image or search (moving averages, see :meth:`clocked`). They share one
    model thread, so each kind's admission counts the others' work ahead too. Overload is
    answered with 503 at once rather than piling up decode work and memory, or 504 later."""

    def __init__(self, settings: ServeSettings, batcher: MicroBatcher):
        self.settings = settings
        self.batcher = batcher
        self.inflight = 0  # /v1/predict images admitted and not yet answered
        self.explaining = 0
        self.searching = 0  # /v1/search requests admitted and not yet answered
        self.took: dict[str, float] = {}  # seconds per image of each step, moving averages

    def clocked(self, step: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, its time added to the step's average (in the thread that runs it,
        so a step cut off by a request's timeout still counts when it ends)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds = time.perf_counter() - t0
            took = self.took
            took[step] = 0.8 * took[step] + 0.2 * seconds if step in took else seconds

    def explain_seconds(self) -> float:
        """One explanation's time: decoding, the model and drawing."""
        return sum(self.took.get(f"explain {s}", 0.0) for s in ("decode", "model", "render"))

    def predict_refusal(self, images: int, left_s: float) -> str | None:
        """Why ``images`` more cannot be admitted now with ``left_s`` seconds left to their
        request (None: admit). Images in flight are bounded by queue_size + max_batch and,
        while others are in flight, by what the model can answer in half the time left. An
        idle server always admits: the speed estimate only changes when the model runs, so
        one slow call must not lock every later request out. An image's time is the model's
        plus its decoding's (shared by the decoding threads)."""
        s = self.settings
        decoding = self.took.get("decode", 0.0) / s.workers
        per_image = self.batcher.seconds_per_image_now() + decoding
        ahead_s = (self.inflight + images) * per_image + self.others_s("predict")
        if self.inflight + images > s.queue_size + s.max_batch or self.batcher.room() < images:
            return "queue full"
        if self.busy() and ahead_s > left_s / 2:
            return f"about {ahead_s:.1f} s of images ahead of this request"
        return None

    def busy(self) -> bool:
        """Whether anything is in flight (an idle server always admits)."""
        return self.inflight > 0 or self.explaining > 0 or self.searching > 0

    def others_s(self, kind: str) -> float:
        """Model-thread seconds of the explanations and searches in flight, and of the
        predictions unless `kind` is "predict" (which counts its own with their decoding)."""
        ahead = self.explaining * self.took.get("explain model", 0.0)
        ahead += self.searching * self.took.get("search", 0.0)
        if kind != "predict":
            ahead += self.inflight * self.batcher.seconds_per_image_now()
        return ahead

    def search_refusal(self) -> str | None:
        """Why one more search cannot be admitted now (None: admit): ``queue_size`` searches
        in flight, or the work ahead on the model thread (searches, images, explanations) and
        this search taking more than half the timeout."""
        if self.searching >= self.settings.queue_size:
            return "queue full"
        ahead = self.others_s("search")
        if self.busy() and ahead + self.took.get("search", 0.0) > self.settings.timeout_s / 2:
            return f"about {ahead:.1f} s of searches and images ahead"
        return None

    def explain_refusal(self) -> str | None:
        """Why one more explanation cannot be admitted now (None: admit); until one has been
        timed they run one at a time."""
        if self.explaining >= self.settings.queue_size:
            return "queue full"
        if self.explaining > 0 and "explain render" not in self.took:
            return "an explanation is running, and their time is not known yet"
        ahead = self.explaining * self.explain_seconds()
        if self.explaining > 0 and ahead + self.explain_seconds() > self.settings.timeout_s / 2:
            return f"about {ahead:.1f} s of explanations ahead"
        return None

    @contextmanager
    def predicting(self, images: int) -> Iterator[None]:
        """Count ``images`` as in flight while the block runs."""
        self.inflight += images
        try:
            yield
        finally:
            self.inflight -= images

    @contextmanager
    def searching_one(self) -> Iterator[None]:
        """Count one search as in flight while the block runs."""
        self.searching += 1
        try:
            yield
        finally:
            self.searching -= 1

    @contextmanager
    def explaining_one(self) -> Iterator[None]:
        """Count one explanation as running while the block runs."""
        self.explaining += 1
        try:
            yield
        finally:
            self.explaining -= 1
