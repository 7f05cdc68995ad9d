"""Run the service: load the model, warm it up, hand the app to uvicorn."""

from __future__ import annotations

import gc
from typing import Any

import torch

from beautytag.runtime.backends import usable_cpus
from beautytag.runtime.engine import Engine
from beautytag.serve.app import create_app
from beautytag.serve.settings import ServeSettings


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    backend: str = "onnxruntime",
    index: str | None = None,
    **settings: Any,
) -> None:
    """Load the model and run the service with uvicorn until interrupted. The model gets
    ``threads`` CPU threads, by default all CPUs but one (left for HTTP and decoding). With
    backend ``onnxruntime`` (default) a checkpoint is exported to ONNX at start and run by ONNX
    Runtime (faster than PyTorch on CPUs: benchmarks/results/serve.md); PyTorch keeps the
    model for /v1/explain and the embeddings of /v1/search. `index`: a search index folder
    made by the same model (``beautytag index``), for the search endpoints."""
    import uvicorn

    limits = ServeSettings(**settings)  # a bad setting fails here, before the model loads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    threads = threads or max(1, usable_cpus() - 1)
    engine = Engine(model_path, batch_size=limits.max_batch, threads=threads, backend=backend)
    found = None
    if index is not None:
        from beautytag.search import Index

        found = Index.open(index, model=engine.model_id, dim=engine.embedding_dim)
    app = create_app(engine, limits, found)
    size = engine.cfg.model.image_size
    for n in (1, engine.batch_size):  # first calls allocate; keep that out of answers
        engine.predict_tensors(torch.zeros(n, 3, size, size))
    # The start-up objects of torch, timm and FastAPI (hundreds of thousands) never die:
    # without freezing them each full garbage collection walks them all, stalling requests.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port)
