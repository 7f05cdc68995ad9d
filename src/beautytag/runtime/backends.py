"""Backends that run a model file: a checkpoint in PyTorch, a TorchScript file, an ONNX
file in ONNX Runtime. Each takes a preprocessed batch and returns activated outputs."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from beautytag.checkpoint import TORCHSCRIPT_SUFFIXES, load_checkpoint
from beautytag.config import Config, config_from_dict
from beautytag.nn.net import BeautyTagNet
from beautytag.runtime.onnx import METADATA_KEY, TORCHSCRIPT_EXTRA

BACKENDS = ("auto", "torch", "onnxruntime")


def usable_cpus() -> int:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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

    @torch.inference_mode()
    def with_embedding(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`__call__`'s outputs and the pooled embeddings (B, C), in one pass."""
        y, emb = self.model.forward_with_embedding(x.to(self.device))
        return {name: v.cpu() for name, v in self.model.activated(y).items()}, emb.float().cpu()


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
        from beautytag.runtime.onnx import export_model_onnx  # export imports this module

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
