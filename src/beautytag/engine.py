"""The inference engine behind ``beautytag predict`` (and anything else that predicts):
files or bytes in, one JSON-ready result per image out, batched, bad images reported."""

from __future__ import annotations

import json
import numbers
import os
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from beautytag.color import lab_to_hex
from beautytag.config import Config, config_from_dict
from beautytag.evaluate import mirror_averaged
from beautytag.images import MAX_PIXELS, ImageError, load_for_model
from beautytag.model import TORCHSCRIPT_SUFFIXES, BeautyTagNet, load_checkpoint

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
# models shipped inside the package, by the name `--model` accepts
SHIPPED_MODELS = {
    "default": "default.pt",  # EfficientNet-Lite0 at 96 px: fast enough for real-time serving
    "accurate": "accurate.pt",  # the same at 192 px: better shades, 4x the pixels
}
BACKENDS = ("auto", "torch", "onnxruntime")
METADATA_KEY = "beautytag"  # ONNX metadata_props key holding the export JSON
TORCHSCRIPT_EXTRA = "beautytag.json"  # the same JSON inside a TorchScript file


def default_model_path(name: str = "default") -> Path:
    """A model shipped inside the package (see ``SHIPPED_MODELS``)."""
    return Path(str(resources.files("beautytag") / "weights" / SHIPPED_MODELS[name]))


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A ``--model`` argument -> its file: nothing means the shipped default, a shipped model's
    name (``default``, ``accurate``) its file in the package, anything else a path."""
    if model is None or str(model) == "":
        return default_model_path()
    if str(model) in SHIPPED_MODELS and not Path(model).exists():
        return default_model_path(str(model))
    return Path(model)


def usable_cpus() -> int:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def _config_from_meta(raw: str | bytes, path: Path) -> Config:
    try:
        meta = json.loads(raw)
        return config_from_dict(meta["config"], where=str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable beautytag metadata ({e})") from None


class TorchBackend:
    """A checkpoint (.pt) run by PyTorch."""

    name = "torch"

    def __init__(self, path: Path, device: str = "cpu"):
        self.model: BeautyTagNet
        self.model, self.cfg, _ = load_checkpoint(path, device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed batch -> activated outputs per attribute (float32, on the CPU)."""
        y = self.model.activated(self.model(x.to(self.device)))
        return {name: v.cpu() for name, v in y.items()}


class TorchScriptBackend:
    """A file from ``beautytag export --format torchscript`` run by PyTorch."""

    name = "torchscript"

    def __init__(self, path: Path, device: str = "cpu"):
        extra = {TORCHSCRIPT_EXTRA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as e:  # noqa: BLE001 - not a TorchScript archive
            raise ValueError(f"{path}: not a TorchScript model ({e})") from None
        if not extra[TORCHSCRIPT_EXTRA]:
            raise ValueError(f"{path}: no {TORCHSCRIPT_EXTRA} (not exported by beautytag export)")
        self.cfg = _config_from_meta(extra[TORCHSCRIPT_EXTRA], path)
        self.device = device

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.module(x.to(self.device))
        return {n: v.float().cpu() for n, v in zip(self.cfg.schema.names, y, strict=True)}


class OnnxBackend:
    """A file from ``beautytag export --format onnx`` run by onnxruntime on the CPU."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cpus()
        # idle worker threads sleep instead of spinning: decoding threads and the service's
        # event loop share the same CPUs, and spinning threads take CPU time from them
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise ValueError(f"{path}: not a usable ONNX model ({e})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{path}: no beautytag metadata (not exported by beautytag export)")
        self.cfg = _config_from_meta(meta[METADATA_KEY], path)
        self.model: BeautyTagNet | None = None  # set by from_checkpoint
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        if sorted(self.outputs) != sorted(self.cfg.schema.names):
            raise ValueError(f"{path}: outputs {self.outputs} do not match the schema")

    @classmethod
    def from_checkpoint(cls, path: Path, threads: int | None = None) -> OnnxBackend:
        """Export a checkpoint to ONNX in a temporary folder (seconds) and run that; the
        PyTorch model stays loaded as ``model`` for what needs gradients (Grad-CAM)."""
        from beautytag.export import export_model_onnx  # export imports this module

        model, cfg, _ = load_checkpoint(path)
        tmp = tempfile.TemporaryDirectory(prefix="beautytag-")
        onnx_path = Path(tmp.name) / f"{path.stem}.onnx"
        export_model_onnx(model, cfg, onnx_path)
        backend = cls(onnx_path, threads)
        backend.tmp = tmp  # removed with the backend
        backend.model = model
        return backend

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ys = self.session.run(None, {self.input: x.detach().float().cpu().contiguous().numpy()})
        return {n: torch.from_numpy(y) for n, y in zip(self.outputs, ys, strict=True)}


Backend = TorchBackend | TorchScriptBackend | OnnxBackend
Item = str | os.PathLike | bytes | Image.Image  # what the engine can predict


def load_backend(
    path: str | os.PathLike, backend: str = "auto", device: str = "cpu", threads: int | None = None
) -> Backend:
    """The runtime for a model file: ``.onnx`` -> onnxruntime, ``.ts``/``.torchscript`` ->
    TorchScript, else a checkpoint run by PyTorch. ``backend`` may force torch or
    onnxruntime; each returns activated per-attribute outputs for a preprocessed batch.
    ``threads``: CPU threads for the model (PyTorch's setting is process-wide); default all."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    suffix = path.suffix.lower()
    if backend == "onnxruntime" or (backend == "auto" and suffix == ".onnx"):
        if device != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU only")
        if suffix in TORCHSCRIPT_SUFFIXES:
            raise ValueError(f"{path}: a TorchScript file runs with backend torch (or auto)")
        if suffix != ".onnx":  # a checkpoint: exported on the fly
            return OnnxBackend.from_checkpoint(path, threads)
        return OnnxBackend(path, threads)
    if suffix == ".onnx":
        raise ValueError(f"{path}: an ONNX model needs backend onnxruntime (or auto)")
    if threads:
        torch.set_num_threads(threads)
    if suffix in TORCHSCRIPT_SUFFIXES:
        return TorchScriptBackend(path, device)
    return TorchBackend(path, device)


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

    def load(
        self, item: Item, name: str | None = None, max_pixels: int = MAX_PIXELS
    ) -> tuple[Image.Image, torch.Tensor]:
        """Decode one photo (path, bytes or PIL image) -> (RGB image, model input); raises
        ImageError."""
        m = self.cfg.model
        return load_for_model(item, m.image_size, m.mean, m.std, name=name, max_pixels=max_pixels)

    def predict_tensors(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """A batch of preprocessed images -> one attributes dict per image."""
        probs = mirror_averaged(self.backend, x) if self.tta_flip else self.backend(x)
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

    def predict_items(
        self, items: Sequence[tuple[str, Item]], workers: int = 2
    ) -> Iterator[dict[str, Any]]:
        """(name, photo) pairs, a photo being a path, encoded bytes or a PIL image -> results
        in order. Decoding runs in a thread pool while the model works on the previous batch;
        a bad item yields its error only."""

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
                preds = iter(self.predict_tensors(torch.stack(good))) if good else iter(())
                for (name, _), t in zip(chunk, loaded, strict=True):
                    if isinstance(t, ImageError):
                        yield {"file": name, "attributes": None, "error": t.problem}
                    else:
                        yield {"file": name, "attributes": next(preds), "error": None}

    def predict_files(
        self, paths: str | os.PathLike | Iterable[str | os.PathLike]
    ) -> Iterator[dict[str, Any]]:
        """Photos and folders (walked for image files, sorted) -> one result per photo, in
        order: ``{"file", "attributes", "error"}`` as ``beautytag predict`` writes them."""
        files = expand_paths(paths)
        return self.predict_items([(str(f), f) for f in files])
