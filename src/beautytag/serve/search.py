"""The search endpoints of the service (``beautytag serve --index INDEX_DIR``):

* ``POST /v1/search?top_k=K&where=ATTR=VALUE...`` - one photo (multipart field ``file``, or the
  raw body, as for ``/v1/predict``) -> the indexed photos most like it;
* ``GET /v1/search?shade=HEX|L,a,b&top_k=K&where=...`` - the indexed photos whose predicted
  shade is nearest by ΔE2000 (``score``);
* ``GET /v1/thumbnail/{id}`` - a JPEG thumbnail of the indexed photo of that integer id.

Answers name a result's file by its base name only (no server paths); the thumbnail of a
result is fetched by its ``id``, the only way a request reaches a stored photo: the id is
looked up in the index, never a path read from the request. Without an index each answers
404 (the search is not there). The model runs on the batcher's model thread (one model call
at a time), and so does the index search (the index is not shared between threads).

Admission (the service's one :class:`~beautytag.serve.batcher.Admission`): at most
``queue_size`` searches are in flight; a search is answered 503 with ``Retry-After`` at once
when that many are, or when the work ahead of it on the model thread (searches, /v1/predict
images, explanations) and the search itself would take more than half the timeout at their
recent times; an idle server always admits. A search longer than the timeout is 504.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from beautytag.images import ImageError, load_image
from beautytag.runtime.engine import Engine
from beautytag.search import Hit, Index, SearchError, parse_shade, parse_where
from beautytag.serve.batcher import Admission, MicroBatcher
from beautytag.serve.contract import body_doc, error_doc

THUMBNAIL_PX = 160


class SearchHit(BaseModel):
    id: int = Field(description="index id; GET /v1/thumbnail/{id} shows the photo")
    file: str = Field(description="the photo's file name (no folder)")
    score: float = Field(description="cosine similarity, or the ΔE2000 in a shade search")
    attributes: dict[str, Any] = Field(description="predicted attributes, as /v1/predict's")


class SearchResults(BaseModel):
    query: dict[str, Any] = Field(
        description="the photo searched with ({file, attributes}) or the shade ({shade, lab})"
    )
    results: list[SearchHit]


NO_INDEX = "this server has no search index: start it with `beautytag serve --index INDEX_DIR`"
DOCS = {
    404: {
        "description": "the server has no search index (`beautytag serve --index`); for a "
        "thumbnail also: no indexed photo of that id, or its file is gone"
    },
    422: {"description": "an unknown filter attribute or value, a bad shade or id, or an image"},
}
BUSY = {
    503: {
        "description": "server busy (see Retry-After): `queue_size` searches in flight, or "
        "the work ahead (searches, images) would take more than half the timeout"
    }
}


def hit(h: Hit) -> SearchHit:
    return SearchHit(
        id=h.id, file=Path(h.file).name, score=round(h.score, 4), attributes=h.attributes
    )


def add_search_routes(
    app: FastAPI,
    engine: Engine,
    index: Index | None,
    batcher: MicroBatcher,
    read_photo: Callable[[Request], Awaitable[tuple[str, torch.Tensor]]],
    in_thread: Callable[..., Awaitable[Any]],
    deadline: Callable[[], AbstractAsyncContextManager[None]],
    busy: Callable[[str], HTTPException],
    admission: Admission,
) -> None:
    """Add the routes. `read_photo`: the request's one photo, decoded -> (name, model input),
    raising HTTPException for a bad request; `in_thread`: runs a function in a worker
    thread; `deadline`: the request's timeout (504); `busy`: the 503 answer for a reason;
    `admission`: the service's, which /v1/predict and /v1/explain share."""

    def usable(where: list[str]) -> tuple[Index, dict[str, str]]:
        if index is None:
            raise HTTPException(404, NO_INDEX)
        try:
            parsed = parse_where(where)
            index.count(parsed)
        except SearchError as e:
            raise HTTPException(422, str(e)) from None
        return index, parsed

    async def admitted(work: Callable[[], Awaitable[Any]]) -> Any:
        """`work()` within the timeout, if admitted (else 503)."""
        if refusal := admission.search_refusal():
            raise busy(refusal)
        with admission.searching_one():
            async with deadline():
                return await work()

    top = Query(10, ge=1, le=100, description="how many results")
    filters = Query(
        [],
        description="a filter ATTR=VALUE (repeatable), e.g. category=Lipstick, finish=matte",
    )

    @app.post(
        "/v1/search",
        summary="Indexed photos like a photo",
        openapi_extra=body_doc(1),
        responses=error_doc(400, 401, 413, 415, 504) | DOCS | BUSY,
    )
    async def search_photo(
        request: Request, top_k: int = top, where: list[str] = filters
    ) -> SearchResults:
        """The `top_k` indexed photos most like the photo sent (cosine similarity of the
        model's embeddings), among those that match every `where` filter: `top_k` whenever
        as many match."""
        idx, parsed = usable(where)

        def run(x: torch.Tensor) -> tuple[dict[str, Any], list[Hit]]:
            emb, answers = engine.embed_tensors(x)
            attributes = {k: v.to_dict() for k, v in answers[0].items()}
            return attributes, idx.search(emb, top_k, parsed)[0]

        async def work() -> SearchResults:
            name, x = await read_photo(request)
            attributes, hits = await batcher.run_model(admission.clocked, "search", run, x[None])
            return SearchResults(
                query={"file": name, "attributes": attributes}, results=[hit(h) for h in hits]
            )

        return await admitted(work)

    @app.get(
        "/v1/search",
        summary="Indexed photos nearest a shade (ΔE2000)",
        responses=error_doc(401, 504) | DOCS | BUSY,
    )
    async def search_shade(
        shade: str = Query(..., description="#rrggbb, or L,a,b (CIELAB)", examples=["#b03a48"]),
        top_k: int = top,
        where: list[str] = filters,
    ) -> SearchResults:
        """The `top_k` indexed photos whose predicted shade is nearest `shade` by CIEDE2000
        (`score`: the ΔE2000, nearest first), among those that match every `where` filter."""
        idx, parsed = usable(where)
        try:
            lab = parse_shade(shade)
        except SearchError as e:
            raise HTTPException(422, str(e)) from None
        hits = await admitted(
            lambda: batcher.run_model(
                admission.clocked, "search", idx.search_shade, lab, top_k, parsed
            )
        )
        query = {"shade": shade, "lab": [float(v) for v in lab]}
        return SearchResults(query=query, results=[hit(h) for h in hits])

    async def not_allowed() -> None:
        """405 naming both methods of /v1/search (Starlette names the first route's only)."""
        raise HTTPException(405, "Method Not Allowed", headers={"Allow": "GET, HEAD, POST"})

    others = ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
    app.add_api_route("/v1/search", not_allowed, methods=others, include_in_schema=False)

    @app.get(
        "/v1/thumbnail/{id}",
        summary="Thumbnail of an indexed photo",
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "a JPEG, at most 160 px a side"},
            **error_doc(401),
            **DOCS,
        },
    )
    async def thumbnail(
        id: str = PathParam(  # noqa: A002 - the route's own name
            ..., pattern=r"^[0-9]{1,18}$", description="an index id from a search (digits only)"
        ),
    ) -> Response:
        """A JPEG thumbnail of the indexed photo of index id `id` (from search results)."""
        if index is None:
            raise HTTPException(404, NO_INDEX)
        try:
            file = (await batcher.run_model(index.get, int(id))).file
        except SearchError as e:
            raise HTTPException(404, str(e)) from None
        try:
            async with deadline():
                data = await in_thread(thumbnail_jpeg, file)
        except (ImageError, OSError):
            raise HTTPException(404, f"the photo of id {id} can no longer be read") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def thumbnail_jpeg(file: str) -> bytes:
    """A stored photo as a JPEG of at most THUMBNAIL_PX a side."""
    img = load_image(file, min_size=THUMBNAIL_PX)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
