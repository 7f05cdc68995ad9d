"""The inference engine behind ``beautytag predict`` (and anything else that predicts):
files or bytes in, one JSON-ready result per image out, batched, bad images reported."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from beautytag.color import lab_to_hex
from beautytag.evaluate import activate
from beautytag.images import ImageError, load_image, preprocess
from beautytag.model import load_checkpoint

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_MODEL = "default.pt"


def default_model_path() -> Path:
    """The model shipped inside the package."""
    return Path(str(resources.files("beautytag") / "weights" / DEFAULT_MODEL))


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders walked recursively for image files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            out.append(p)  # a missing file is reported per item, not fatal
    return out


class Engine:
    """A loaded model plus its preprocessing; call :meth:`predict_files` or
    :meth:`predict_images`."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        top_k: int = 3,
        threshold: float = 0.5,
    ):
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.model, self.cfg, _ = load_checkpoint(self.model_path, device)
        self.device = device
        self.batch_size = batch_size
        self.top_k = top_k
        self.threshold = threshold
        self.schema = self.cfg.schema

    def preprocess(self, img) -> torch.Tensor:
        m = self.cfg.model
        return preprocess(img, m.image_size, m.mean, m.std)

    @torch.inference_mode()
    def predict_tensors(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """A batch of preprocessed images -> one attributes dict per image."""
        y = self.model(x.to(self.device))
        probs = {a.name: activate(a.kind, y[a.name]).float().cpu() for a in self.schema.attributes}
        return [self.describe({k: v[i] for k, v in probs.items()}) for i in range(len(x))]

    def describe(self, out: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One image's outputs -> the JSON form documented in the README."""
        result: dict[str, Any] = {}
        for a in self.schema.attributes:
            v = out[a.name]
            if a.kind == "single":
                scores, idx = v.topk(min(self.top_k, len(a.classes)))
                top = [[a.classes[i], round(float(s), 4)] for s, i in zip(scores, idx, strict=True)]
                result[a.name] = {"label": top[0][0], "score": top[0][1], "top": top}
            elif a.kind == "multi":
                order = v.argsort(descending=True)
                result[a.name] = {
                    "labels": [
                        [a.classes[i], round(float(v[i]), 4)]
                        for i in order
                        if v[i] >= self.threshold
                    ],
                    "scores": {c: round(float(s), 4) for c, s in zip(a.classes, v, strict=False)},
                }
            else:
                lab = [round(float(t), 2) for t in v]
                result[a.name] = {"lab": lab, "hex": lab_to_hex(lab)}
        return result

    def _load(self, item: str | os.PathLike | bytes, name: str) -> torch.Tensor:
        return self.preprocess(load_image(item, name=name))

    def predict_items(
        self, items: Sequence[tuple[str, str | os.PathLike | bytes]], workers: int = 2
    ) -> Iterator[dict[str, Any]]:
        """(name, path-or-bytes) pairs -> results in order. Decoding runs in a thread pool
        while the model works on the previous batch; a bad image yields its error only."""

        def load(pair):
            name, item = pair
            try:
                return self._load(item, name)
            except ImageError as e:
                return e

        workers = max(1, workers)
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with ThreadPoolExecutor(workers) as pool:
            futures: deque = deque()
            for chunk in chunks[:workers]:  # bounded prefetch: memory stays flat
                futures.append(pool.submit(lambda c: list(map(load, c)), chunk))
            for i, chunk in enumerate(chunks):
                loaded = futures.popleft().result()
                if i + workers < len(chunks):
                    futures.append(pool.submit(lambda c: list(map(load, c)), chunks[i + workers]))
                good = [t for t in loaded if isinstance(t, torch.Tensor)]
                preds = iter(self.predict_tensors(torch.stack(good))) if good else iter(())
                for (name, _), t in zip(chunk, loaded, strict=True):
                    if isinstance(t, ImageError):
                        yield {"file": name, "attributes": None, "error": t.problem}
                    else:
                        yield {"file": name, "attributes": next(preds), "error": None}

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
        files = expand_paths(paths)
        return self.predict_items([(str(f), f) for f in files])
