"""``beautytag predict --ray``: the same batch job on Ray Data, for catalogues past one machine.

The photos to do (those a resumed output lacks) become a dataset of file paths;
``map_batches`` runs them through :class:`Predictor`, a callable class that holds an
:class:`~beautytag.runtime.engine.Engine`, on a pool of actor workers (one GPU each where the
cluster has GPUs). The records come back to the driver in input order and are written there
by the same :class:`~beautytag.catalogue.records.RecordWriter` as a plain run, so the output
is the same and just as resumable.

The model file is sent to the workers through Ray's object store (no shared folder needed for
it); the photos must be readable at the same paths on every node (a shared or network file
system). Without an address a local cluster is started for the run and stopped after it.
Ray is imported only here, and only when a run asks for it (``pip install 'beautytag[ray]'``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCAL_WORKERS = 2  # on a local cluster, without --ray-workers


class Predictor:
    """A Ray Data worker: a batch of ``{"file": [...]}`` -> ``{"record": [JSON, ...]}``."""

    def __init__(self, model: Any, suffix: str, device: str, settings: dict[str, Any]):
        import ray

        from beautytag.runtime.engine import Engine

        data = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        fd, path = tempfile.mkstemp(suffix=suffix, prefix="beautytag-model-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.engine = Engine(path, device=device, **settings)
        finally:
            os.unlink(path)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        files = [str(f) for f in batch["file"]]
        results = self.engine.predict_items([(f, Path(f)) for f in files])
        return {"record": np.array([json.dumps(r.to_dict()) for r in results], dtype=object)}


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(
            "--ray needs Ray Data: pip install 'beautytag[ray]' (or 'ray[data]')"
        ) from None
    return ray


def start_ray(ray: Any, address: str | None, workers: int | None) -> tuple[int, bool]:
    """Connect to the cluster at `address`, or start a local one; the workers to run, and
    whether they get a GPU each."""
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        return workers or gpus or max(1, int(resources.get("CPU", 1)) // 4), gpus > 0
    import torch

    workers = workers or LOCAL_WORKERS
    gpu = torch.cuda.is_available()
    ray.init(
        num_cpus=workers + 1,  # one per worker, and one for moving the data
        num_gpus=torch.cuda.device_count() if gpu else 0,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        # the workers import beautytag as the driver does (a source checkout included)
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    )
    return workers, gpu


def ray_records(
    files: list[str],
    engine: Any,
    model: str,
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[dict]:
    """The records of `files` (in their order) predicted on Ray with `engine`'s model and
    settings, each naming `model` (``Engine.model_id``)."""
    ray = import_ray()
    if not files:
        return
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # predict says what it did
    started = not ray.is_initialized()
    if started:
        workers, gpu = start_ray(ray, address, workers)
    else:  # already connected (a notebook, a test): use it as it is
        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        workers = workers or LOCAL_WORKERS
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records in input order
        context.enable_progress_bars = False  # predict draws its own
        settings = {
            "batch_size": engine.batch_size,
            "top_k": engine.top_k,
            "threshold": engine.threshold,
            "tta_flip": engine.tta_flip,
            "crop": engine.cropper is not None,
        }
        weights = Path(engine.model_path).read_bytes()  # small: sent with each worker
        workers = min(workers, len(files))
        dataset = ray.data.from_items([{"file": f} for f in files]).map_batches(
            Predictor,
            fn_constructor_kwargs={
                "model": weights,
                "suffix": Path(engine.model_path).suffix,
                "device": "cuda" if gpu else "cpu",
                "settings": settings,
            },
            batch_size=engine.batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=1 if gpu else 0,
            udf_modifying_row_count=False,
        )
        for row in dataset.iter_rows():
            record = json.loads(row["record"])
            yield {"file": record["file"], "model": model} | record
    finally:
        if started:
            ray.shutdown()
