"""Export a checkpoint to ONNX or TorchScript, quantise ONNX to int8, and check parity.

An exported model takes one input, ``image``: float32 ``(B, 3, S, S)`` RGB, letterboxed to
``S`` on white and normalised as ``(x / 255 - mean) / std`` - exactly what
:func:`beautytag.images.preprocess` produces. It returns a *tuple* with one tensor per
schema attribute, in schema order, already activated: softmax probabilities ``(B, N)`` for
``single``, sigmoid probabilities ``(B, N)`` for ``multi`` and CIELAB ``(B, 3)`` for
``shade``. The batch axis is dynamic. The file embeds, as JSON (ONNX metadata key
``beautytag``; TorchScript extra file ``beautytag.json``), the full config, the output
order with each output's kind and classes, and the preprocessing settings, so an exported
file is self-describing and :class:`beautytag.runtime.engine.Engine` can run it alone.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from beautytag.checkpoint import TORCHSCRIPT_SUFFIXES, load_checkpoint, model_source
from beautytag.config import Config
from beautytag.images import ImageError, load_for_model, normalize
from beautytag.runtime.backends import load_backend
from beautytag.runtime.engine import expand_paths
from beautytag.runtime.onnx import (
    TORCHSCRIPT_EXTRA,
    ExportWrapper,
    _example,
    export_metadata,
    export_model_onnx,
    onnx_metadata,
    set_onnx_metadata,
)
from beautytag.training.evaluate import check_same_outputs, compute_metrics

TORCHSCRIPT_FORMAT = "beautytag-torchscript-1"


def export_onnx(
    checkpoint: str | Path, out_path: str | Path, opset: int = 17, dynamo: bool | None = None
) -> Path:
    """Export a checkpoint to ONNX with metadata. ``dynamo=None`` tries the legacy
    (TorchScript-based) exporter first and falls back to the ``torch.export`` one."""
    model, cfg, _ = load_checkpoint(checkpoint)
    return export_model_onnx(model, cfg, out_path, opset, dynamo)


def export_torchscript(checkpoint: str | Path, out_path: str | Path) -> Path:
    """Trace the checkpoint to TorchScript with the metadata as extra file
    ``beautytag.json``."""
    model, cfg, _ = load_checkpoint(checkpoint)
    wrapper, x = ExportWrapper(model), _example(cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated but still works
        traced = torch.jit.trace(wrapper, (x,), check_trace=False)  # parity_check checks it
        meta = json.dumps(export_metadata(cfg, TORCHSCRIPT_FORMAT))
        torch.jit.save(traced, str(out_path), _extra_files={TORCHSCRIPT_EXTRA: meta})
    return out_path


def calibration_inputs(
    images: Sequence[Path], meta: dict[str, Any], n: int = 64
) -> list[np.ndarray]:
    """The model inputs of the first `n` usable photos of `images` (preprocessed exactly as
    for inference; unreadable ones skipped)."""
    size, mean, std = meta["input"]["size"], meta["input"]["mean"], meta["input"]["std"]
    inputs = []
    for p in images:
        try:
            inputs.append(load_for_model(p, size, mean, std)[1][None].numpy())
        except ImageError:
            continue
        if len(inputs) == n:
            break
    return inputs


class _Calibration:
    """An onnxruntime CalibrationDataReader over preprocessed photos, one at a time."""

    def __init__(self, inputs: list[np.ndarray], meta: dict[str, Any]):
        self.inputs, self.name = inputs, meta["input"]["name"]

    def __iter__(self):
        for x in self.inputs:
            yield {self.name: x}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if not hasattr(self, "_it"):
            self._it = iter(self)
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self)


def _keep_float_nodes(proto: Any, meta: dict[str, Any]) -> list[str]:
    """Nodes left in float: the colour heads' colour maths (sRGB -> CIELAB: tiny and
    precision-critical) and depthwise convolutions (few weights, but per-tensor int8 on them
    costs the most accuracy: label agreement 0.75 -> 0.94 when kept in float)."""
    colour = [o["name"] for o in meta["outputs"] if o["kind"] == "shade"]
    colour += meta["config"]["model"].get("pixel_colour", [])
    scopes = [f"/model/{s}/" for s in colour] + [f"/heads/{s}/" for s in colour]
    depthwise = {
        n.name
        for n in proto.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    }
    return [
        n.name for n in proto.graph.node if n.name in depthwise or any(s in n.name for s in scopes)
    ]


def quantize_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    mode: str = "dynamic",
    calibration_images: Sequence[Path] = (),
) -> Path:
    """int8 quantisation for CPU. ``dynamic``: int8 weights, activations quantised on the
    fly; ``static``: QDQ format, per-channel weights, activation ranges calibrated on the
    first 64 usable photos of `calibration_images` (the metadata counts them). Convolutions
    and linear layers are quantised, except those named by :func:`_keep_float_nodes`. The
    metadata is carried over."""
    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantisation mode must be dynamic or static, got {mode!r}")
    meta = onnx_metadata(onnx_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prep.onnx"
        try:  # shape inference + graph optimisation, as onnxruntime recommends
            quant_pre_process(str(onnx_path), str(src), skip_symbolic_shape=True)
        except Exception:
            src = Path(onnx_path)
        exclude = _keep_float_nodes(onnx.load(str(src)), meta)
        inputs: list = []  # the calibration photos (static only)
        if mode == "dynamic":
            quantize_dynamic(
                src,
                out_path,
                weight_type=QuantType.QUInt8,  # ConvInteger on CPU takes uint8 weights only
                per_channel=False,
                nodes_to_exclude=exclude,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            )
        else:
            inputs = calibration_inputs(calibration_images, meta)
            if not inputs:
                raise ValueError("static quantisation needs calibration photos (none usable)")
            quantize_static(
                src,
                out_path,
                _Calibration(inputs, meta),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=True,  # 7-bit weights: no int16 saturation on AVX2 without VNNI
                nodes_to_exclude=exclude,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            )
    proto = onnx.load(str(out_path))
    meta["quantization"] = {"mode": mode, "calibration_photos": len(inputs)}
    set_onnx_metadata(proto, meta)
    onnx.save(proto, str(out_path))
    return out_path


def synthetic_photos(folder: str | Path, n: int = 32, seed: int = 0) -> list[Path]:
    """Coloured product-like shapes on white (for parity when no real photos exist)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        w, h = rng.randint(120, 400), rng.randint(120, 400)
        img = Image.new("RGB", (w, h), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            colour = tuple(rng.randint(0, 240) for _ in range(3))
            x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
            box = (x0, y0, rng.randint(x0 + 10, w), rng.randint(y0 + 10, h))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
        paths.append(folder / f"synthetic_{i:03d}.jpg")
        img.save(paths[-1], quality=92)
    return paths


def default_photos(paths: Sequence[str | os.PathLike] | None, n: int = 32) -> tuple[list, str]:
    """At most `n` photos for parity/calibration and where they came from: the first of the
    given files/folders, else of ../shared/datasets/beauty-shades/images, else none
    (``"synthetic"``: the caller makes some with :func:`synthetic_photos`)."""
    from beautytag.config import find_datasets

    if paths:
        return expand_paths(paths)[:n], "given"
    datasets = find_datasets()
    folder = datasets / "beauty-shades" / "images" if datasets else None
    if folder is not None and folder.is_dir():
        return expand_paths([folder])[:n], str(folder)
    return [], "synthetic"


def _labels(kind: str, v: torch.Tensor) -> torch.Tensor | None:
    """Per-image label: argmax for single, the thresholded tag set for multi."""
    if kind == "single":
        return v.argmax(-1, keepdim=True)
    if kind == "multi":
        return v >= 0.5
    return None


def compare_outputs(
    cfg: Config, ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Max abs difference (overall and per output) and label agreement of two runs."""
    diffs = {a.name: float((ref[a.name] - out[a.name]).abs().max()) for a in cfg.schema.attributes}
    same = []
    for a in cfg.schema.attributes:
        la, lb = _labels(a.kind, ref[a.name]), _labels(a.kind, out[a.name])
        if la is not None:
            same.append((la == lb).all(-1))
    agree = torch.stack(same, 1).float() if same else torch.ones(len(next(iter(ref.values()))), 1)
    return {
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_per_output": diffs,
        "labels_identical": bool(agree.all()),
        "label_agreement": round(float(agree.mean()), 4),
    }


def _check_same_schema(a: Config, b: Config, where: str) -> None:
    try:
        check_same_outputs(a, b)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if a.model.image_size != b.model.image_size:
        raise ValueError(
            f"{where}: input size {b.model.image_size}, the checkpoint's is {a.model.image_size}"
        )


def parity_check(
    checkpoint: str | Path, exported_path: str | Path, photos: Sequence[Path], batch_size: int = 16
) -> dict[str, Any]:
    """Run the checkpoint (PyTorch) and the exported model (onnxruntime or TorchScript) on
    the same preprocessed photos. Labels are the argmax of single attributes and the
    thresholded (0.5) tags of multi ones; the agreement is over (photo, attribute) pairs."""
    ref, exp = load_backend(checkpoint, "torch"), load_backend(exported_path, "auto")
    _check_same_schema(ref.cfg, exp.cfg, str(exported_path))
    m = ref.cfg.model
    xs = []
    for p in photos:
        try:
            xs.append(load_for_model(p, m.image_size, m.mean, m.std)[1])
        except ImageError:
            continue
    if not xs:
        raise ValueError("parity check: no readable photos")
    a_out: dict[str, list] = {n: [] for n in ref.cfg.schema.names}
    b_out: dict[str, list] = {n: [] for n in ref.cfg.schema.names}
    for i in range(0, len(xs), batch_size):
        x = torch.stack(xs[i : i + batch_size])
        for outs, backend in ((a_out, ref), (b_out, exp)):
            for k, v in backend(x).items():
                outs[k].append(v)
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    result = {"photos": len(xs), "backend": exp.name, "model": str(exported_path)}
    return result | compare_outputs(ref.cfg, cat(a_out), cat(b_out))


def accuracy_cost(
    checkpoint: str | Path,
    exported_paths: Sequence[str | Path],
    split: str = "test",
    batch_size: int = 32,
) -> dict[str, Any]:
    """Metrics of the checkpoint and of each exported model on a labelled split of the
    checkpoint's data, and each exported model's change (exported - PyTorch)."""
    from beautytag.config import use_found_datasets
    from beautytag.data import BeautyDataset, read_samples

    ref = load_backend(checkpoint, "torch")
    backends = [ref] + [load_backend(p, "auto") for p in exported_paths]
    for path, backend in zip(exported_paths, backends[1:], strict=True):
        _check_same_schema(ref.cfg, backend.cfg, str(path))
    cfg = ref.cfg
    use_found_datasets(cfg)
    samples = read_samples(cfg, splits=[split])
    if not samples:
        raise ValueError(f"no samples in split {split!r} of the model's data sources")
    ds = BeautyDataset(samples, cfg, report=False)
    outs: list[dict[str, list]] = [{n: [] for n in cfg.schema.names} for _ in backends]
    tgts: dict[str, list] = {n: [] for n in cfg.schema.names}
    msks: dict[str, list] = {n: [] for n in cfg.schema.names}
    for x, targets, masks in torch.utils.data.DataLoader(ds, batch_size=batch_size):
        x = normalize(x, cfg.model.mean, cfg.model.std)
        for backend, out in zip(backends, outs, strict=True):
            for k, v in backend(x).items():
                out[k].append(v)
        for n in cfg.schema.names:
            tgts[n].append(targets[n])
            msks[n].append(masks[n])
    cat = lambda d: {k: torch.cat(v).numpy() for k, v in d.items()}  # noqa: E731
    t, mk = cat(tgts), cat(msks)
    metrics = [compute_metrics(cfg, cat(o), t, mk) for o in outs]
    result: dict[str, Any] = {"split": split, "images": len(ds), "torch": metrics[0]}
    for path, met in zip(exported_paths, metrics[1:], strict=True):
        delta = {
            attr: {k: round(v - metrics[0][attr][k], 4) for k, v in r.items() if k != "n"}
            for attr, r in met.items()
        }
        result[str(path)] = {"metrics": met, "change": delta}
    return result


def export_command(
    name: str,
    fmt: str,
    out_arg: str | None,
    opset: int,
    quantize: str | None,
    photo_args: Sequence[str] | None,
    accuracy_split: str,
) -> dict[str, Any]:
    """What ``beautytag export`` does: export the model `name` to `fmt` (``onnx`` or
    ``torchscript``) at `out_arg` (default: beside it), check parity on photos (the given
    ones, the datasets' or synthetic ones), optionally quantise to int8 and measure the
    accuracy cost; returns the report."""
    onnx = fmt == "onnx"
    out = Path(out_arg) if out_arg else Path(name).with_suffix(".onnx" if onnx else ".ts")
    model = model_source(name, out, "the export")
    if quantize and not onnx:
        raise ValueError("--quantize needs --format onnx")
    suffixes = {".onnx"} if onnx else TORCHSCRIPT_SUFFIXES  # predict and serve go by suffix
    if out.suffix.lower() not in suffixes:
        kind, ends = "an ONNX" if onnx else "a TorchScript", ", ".join(sorted(suffixes))
        raise ValueError(f"--out {out}: {kind} file must end in {ends}")
    photos, source = default_photos(photo_args, n=96)
    if photo_args and not photos:
        raise ValueError(f"no photos found in {photo_args}")
    with tempfile.TemporaryDirectory() as tmp:
        if not photos:
            print("no real photos found: parity runs on synthetic images", file=sys.stderr)
            photos = synthetic_photos(tmp, 32)
        check, calibration = photos[:32], photos[32:] or photos  # default: disjoint sets
        if photo_args:  # at most 96 (default_photos): the first 64 calibrate
            check, calibration = photos, photos[:64]
        if onnx:
            export_onnx(model, out, opset=opset)
        else:
            export_torchscript(model, out)
        report: dict = {"model": str(out), "format": fmt, "bytes": out.stat().st_size}
        report["parity"] = parity_check(model, out, check) | {"photo_source": source}
        print(f"exported {out}", file=sys.stderr)
        if quantize:
            q = out.with_name(f"{out.stem}-int8-{quantize}.onnx")
            quantize_onnx(out, q, quantize, calibration)
            parity = parity_check(model, q, check) | {"photo_source": source}
            report["quantized"] = {"model": str(q), "mode": quantize}
            report["quantized"] |= {"bytes": q.stat().st_size, "parity": parity}
            print(f"quantised {q}", file=sys.stderr)
            if accuracy_split != "none":
                try:
                    report["accuracy"] = accuracy_cost(model, [out, q], accuracy_split)
                except (FileNotFoundError, ValueError) as e:
                    report["accuracy"] = {"skipped": f"no labelled data ({e})"}
    return report
