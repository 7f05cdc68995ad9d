"""ASGI middleware in front of the app: API key, body size limit, request metrics."""

from __future__ import annotations

import hmac
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from beautytag.serve.batcher import Metrics
from beautytag.serve.settings import OPEN_PATHS, ServeSettings


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
