"""The inference engine behind ``beautytag predict`` (and anything else that predicts):
files or bytes in, one JSON-ready result per image out, batched, bad images reported."""

from __future__ import annotations

import functools
import hashlib
import numbers
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from beautytag.checkpoint import resolve_model
from beautytag.color import lab_to_hex
from beautytag.images import MAX_PIXELS, ImageError, load_for_model
from beautytag.runtime.backends import load_backend
from beautytag.runtime.gate import apply_gate
from beautytag.runtime.results import Answer, ClassAnswer, Prediction, ShadeAnswer, TagsAnswer

# what a folder walk picks up (the format itself is read from the content, whatever the name)
IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".web",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
}


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders walked recursively for image files (sorted): every entry with
    an image suffix that is not a folder, so that loading reports a dangling link or a FIFO;
    a subfolder that cannot be read is a warning on stderr. An empty path is an error (it
    would mean the current folder: an unset variable in a script?)."""
    if isinstance(paths, str | os.PathLike):  # one path, not its characters
        paths = [paths]

    def unreadable(e: OSError) -> None:
        print(
            f"warning: {e.filename}: folder not read ({e.strerror or e}); its photos are left out",
            file=sys.stderr,
        )

    out: list[Path] = []
    for given in paths:
        if str(given) == "":
            raise ValueError("an empty path was given (an unset variable?); use . for this folder")
        p = Path(given)
        try:
            is_dir = p.is_dir()
        except OSError:  # e.g. a name too long for the file system: reported per item
            is_dir = False
        if is_dir:
            out += sorted(
                Path(top, f)
                for top, _, files in os.walk(p, onerror=unreadable)  # not into folder links
                for f in files
                if Path(f).suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            out.append(p)  # a missing file is reported per item, not fatal
    return out


Item = str | os.PathLike | bytes | Image.Image  # what the engine can predict


class Engine:
    """A loaded model plus its preprocessing; call :meth:`predict_files` or
    :meth:`predict_items`. The model may be a checkpoint (PyTorch) or an exported file
    (ONNX via onnxruntime, TorchScript); see :func:`load_backend`."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        top_k: int = 3,
        threshold: float = 0.5,
        backend: str = "auto",
        threads: int | None = None,
        tta_flip: bool = False,
        crop: bool = False,
    ):
        for name, value in (("batch_size", batch_size), ("top_k", top_k)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number, 1 or more, got {value!r}")
        if not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        batch_size, top_k, threshold = int(batch_size), int(top_k), float(threshold)
        self.model_path = resolve_model(model_path)
        self.backend = load_backend(self.model_path, backend, device, threads)
        self.model = getattr(self.backend, "model", None)  # the nn.Module, if there is one
        self.cfg = self.backend.cfg
        self.device = device
        self.batch_size = batch_size
        self.top_k = top_k
        self.threshold = threshold
        self.tta_flip = tta_flip  # also run the mirrored photo and average: 2x the compute
        self.schema = self.cfg.schema
        self.cropper = None  # crop: also predict a crop around the product, 2x the compute
        if crop:
            from beautytag.runtime.crop import Cropper

            self.cropper = Cropper(self)

    def load(
        self, item: Item, name: str | None = None, max_pixels: int = MAX_PIXELS
    ) -> tuple[Image.Image, torch.Tensor]:
        """Decode one photo (path, bytes or PIL image) -> (RGB image, model input); raises
        ImageError."""
        m = self.cfg.model
        return load_for_model(item, m.image_size, m.mean, m.std, name=name, max_pixels=max_pixels)

    def predict_tensors(self, x: torch.Tensor) -> list[dict[str, Answer]]:
        """A batch of preprocessed images -> each image's answers by attribute."""
        probs = mirror_averaged(self.backend, x) if self.tta_flip else self.backend(x)
        return [self.describe({k: v[i] for k, v in probs.items()}) for i in range(len(x))]

    def describe(self, out: dict[str, torch.Tensor]) -> dict[str, Answer]:
        """One image's outputs -> its answers (top-k classes, tags over the threshold,
        shade), nulled where the model's gate says it is not a cosmetic (runtime/gate.py)."""
        result: dict[str, Answer] = {}
        for a in self.schema.attributes:
            v = out[a.name]
            if a.kind == "single":
                scores, idx = v.topk(min(self.top_k, len(a.classes)))
                top = [(a.classes[i], round(float(s), 4)) for s, i in zip(scores, idx, strict=True)]
                result[a.name] = ClassAnswer(top[0][0], top[0][1], top)
            elif a.kind == "multi":
                order = v.argsort(descending=True)
                result[a.name] = TagsAnswer(
                    [
                        (a.classes[i], round(float(v[i]), 4))
                        for i in order
                        if v[i] >= self.threshold
                    ],
                    {c: round(float(s), 4) for c, s in zip(a.classes, v, strict=False)},
                )
            else:
                lab = [round(float(t), 2) for t in v]
                result[a.name] = ShadeAnswer(tuple(lab), lab_to_hex(lab))
        gate = self.cfg.model.gate
        if gate:
            result = apply_gate(gate, self.schema, result, out[gate["attribute"]].numpy())
        return result

    def embed_tensors(self, x: torch.Tensor) -> tuple[np.ndarray, list[dict[str, Answer]]]:
        """A batch of preprocessed images -> their embeddings (the pooled backbone features,
        or their projection for search where the model has one, L2-normalised, float32) and
        answers: one model pass for both with a PyTorch checkpoint; with ONNX Runtime the
        answers come from ONNX and the embeddings from the PyTorch model kept beside it.
        ValueError where there is no PyTorch model (an exported file) to embed with."""
        with_embedding = getattr(self.backend, "with_embedding", None)
        model = self._embedding_model()
        if with_embedding is not None and not self.tta_flip:
            probs, emb = with_embedding(x)
            answers = [self.describe({k: v[i] for k, v in probs.items()}) for i in range(len(x))]
        else:
            answers = self.predict_tensors(x)
            with torch.inference_mode():
                emb = model.embed(x.to(self.device))
        with torch.inference_mode():
            return model.search_embedding(emb).cpu().numpy(), answers

    def _embedding_model(self) -> torch.nn.Module:
        if not isinstance(self.model, torch.nn.Module):
            raise ValueError(
                f"{self.model_path.name}: embeddings need the PyTorch checkpoint (.pt) this "
                "file was exported from, or a shipped model (default, accurate)"
            )
        return self.model

    @property
    def embedding_dim(self) -> int:
        """The size of :meth:`embed_tensors`'s embeddings (ValueError without a PyTorch
        model)."""
        return self._embedding_model().search_dim

    @functools.cached_property
    def model_id(self) -> str:
        """What a search index records as the model that made it: ``NAME@HASH``, the model
        file's name without its suffix and the first 8 hex digits of its SHA-256."""
        return model_id(self.model_path)

    def vocabulary(self) -> dict[str, list[str]]:
        """The classes of each single- and multi-label attribute (a search index's valid
        filter values)."""
        return {a.name: list(a.classes) for a in self.schema.attributes if a.kind != "shade"}

    def predict_items(
        self, items: Sequence[tuple[str, Item]], workers: int = 2
    ) -> Iterator[Prediction]:
        """(name, photo) pairs, a photo being a path, encoded bytes or a PIL image -> results
        in order. Decoding runs in a thread pool while the model works on the previous batch;
        a bad item yields its error only. With ``crop``, see :mod:`beautytag.runtime.crop`."""
        if self.cropper is not None:
            yield from self.cropper.predict_items(items, workers)
            return
        for name, answers, problem in self._run_items(items, self.predict_tensors, workers):
            yield Prediction(name, answers, problem)

    def embed_items(
        self, items: Sequence[tuple[str, Item]], workers: int = 2
    ) -> Iterator[tuple[Prediction, np.ndarray | None]]:
        """As :meth:`predict_items`, each result with its photo's embedding (None for a bad
        item); see :meth:`embed_tensors`."""

        def run(x: torch.Tensor) -> list[tuple[dict[str, Answer], np.ndarray]]:
            emb, answers = self.embed_tensors(x)
            return list(zip(answers, emb, strict=True))

        self._embedding_model()  # fail before decoding anything
        for name, out, problem in self._run_items(items, run, workers):
            if out is None:
                yield Prediction(name, None, problem), None
            else:
                yield Prediction(name, out[0]), out[1]

    def _run_items(
        self,
        items: Sequence[tuple[str, Item]],
        run: Callable[[torch.Tensor], list],
        workers: int,
    ) -> Iterator[tuple[str, Any, str | None]]:
        """(name, `run`'s result for the photo, None) per item in order, or (name, None,
        problem) for a bad one; `run` takes a batch and returns one result per image."""

        def load_chunk(chunk):
            out = []
            for name, item in chunk:
                try:
                    out.append(self.load(item, name)[1])
                except ImageError as e:
                    out.append(e)
            return out

        workers = max(1, workers)
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with ThreadPoolExecutor(workers) as pool:
            futures: deque = deque()
            for chunk in chunks[:workers]:  # bounded prefetch: memory stays flat
                futures.append(pool.submit(load_chunk, chunk))
            for i, chunk in enumerate(chunks):
                loaded = futures.popleft().result()
                if i + workers < len(chunks):
                    futures.append(pool.submit(load_chunk, chunks[i + workers]))
                good = [t for t in loaded if isinstance(t, torch.Tensor)]
                results = iter(run(torch.stack(good))) if good else iter(())
                for (name, _), t in zip(chunk, loaded, strict=True):
                    if isinstance(t, ImageError):
                        yield name, None, t.problem
                    else:
                        yield name, next(results), None

    def predict_files(
        self, paths: str | os.PathLike | Iterable[str | os.PathLike]
    ) -> Iterator[Prediction]:
        """Photos and folders (walked for image files, sorted) -> one :class:`Prediction` per
        photo, in order (``to_dict()``: what ``beautytag predict`` writes)."""
        files = expand_paths(paths)
        return self.predict_items([(str(f), f) for f in files])


def mirror_averaged(
    probs: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Test-time flip: `probs` of a batch averaged with `probs` of its mirror image."""
    a, b = probs(x), probs(torch.flip(x, dims=[3]))
    return {k: (v + b[k]) / 2 for k, v in a.items()}


def model_id(path: str | os.PathLike) -> str:
    """``NAME@HASH`` of a model file: its name without the suffix and the first 8 hex digits
    of the SHA-256 of its bytes (another file of the same name is another model)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}@{digest.hexdigest()[:8]}"
