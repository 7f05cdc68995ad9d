"""ONNX graph export of a model and the metadata that travels with exported files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beautytag import __version__
from beautytag.config import Config
from beautytag.nn.net import BeautyTagNet, fixed_size_copy

METADATA_KEY = "beautytag"  # ONNX metadata_props key holding the export JSON


TORCHSCRIPT_EXTRA = "beautytag.json"  # the same JSON inside a TorchScript file


ONNX_FORMAT = "beautytag-onnx-1"


ACTIVATION = {"single": "softmax", "multi": "sigmoid", "shade": "CIELAB (L, a, b)"}


class ExportWrapper(nn.Module):
    """BeautyTagNet with a plain-tensor interface for export.

    ``forward(image)`` takes float32 ``(B, 3, S, S)`` normalised as by
    :func:`beautytag.images.preprocess` and returns a tuple with one tensor per schema
    attribute, **in schema order** (``cfg.schema.names``): softmax ``(B, N)`` for single,
    sigmoid ``(B, N)`` for multi, CIELAB ``(B, 3)`` for shade attributes."""

    def __init__(self, model: BeautyTagNet):
        super().__init__()
        self.model = model
        self.names = model.schema.names
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.model.activated(self.model(image))
        return tuple(y[name] for name in self.names)


def export_metadata(cfg: Config, fmt: str) -> dict[str, Any]:
    """The JSON embedded in an exported file: config, output order and preprocessing."""
    m = cfg.model
    return {
        "format": fmt,
        "beautytag_version": __version__,
        "config": cfg.to_dict(),
        "outputs": [
            {
                "name": a.name,
                "kind": a.kind,
                "classes": list(a.classes),
                "shape": ["batch", a.num_outputs],
                "activation": ACTIVATION[a.kind]
                + (
                    f" of the logits / {m.temperatures[a.name]}" if a.name in m.temperatures else ""
                ),
            }
            for a in cfg.schema.attributes
        ],
        "input": {
            "name": "image",
            "size": m.image_size,
            "mean": list(m.mean),
            "std": list(m.std),
            "letterbox_fill": 255,
            "resample": "bicubic",
            "layout": "NCHW float32 RGB",
            "formula": "(pixel / 255 - mean) / std",
        },
    }


def _example(cfg: Config) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = cfg.model.image_size
    return torch.rand(2, 3, s, s, generator=g) * 2 - 1  # batch 2: the batch axis stays symbolic


def export_model_onnx(
    model: BeautyTagNet,
    cfg: Config,
    out_path: str | Path,
    opset: int = 17,
    dynamo: bool | None = None,
    fixed_padding: bool = True,
) -> Path:
    """:func:`export_onnx` for a model already loaded (with its config). The exported model
    is :func:`~beautytag.nn.net.fixed_size_copy`'s; ``fixed_padding=False`` keeps timm's
    padding computed at run time (as exports were before; the serving benchmark compares)."""
    import onnx

    wrapper = ExportWrapper(
        fixed_size_copy(model, cfg.model.image_size) if fixed_padding else model
    )
    x = _example(cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = cfg.schema.names
    common: dict[str, Any] = {
        "input_names": ["image"],
        "output_names": names,
        "opset_version": opset,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer chatter
        if dynamo is not True:
            try:
                torch.onnx.export(
                    wrapper,
                    (x,),
                    str(out_path),
                    dynamo=False,
                    dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
                    **common,
                )
            except Exception:
                if dynamo is False:
                    raise
                dynamo = True
        if dynamo is True:
            torch.onnx.export(
                wrapper,
                (x,),
                str(out_path),
                dynamo=True,
                external_data=False,
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
                **common,
            )
    proto = onnx.load(str(out_path))
    set_onnx_metadata(proto, export_metadata(cfg, ONNX_FORMAT))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Put `meta` under the ``beautytag`` metadata key and document the output order."""
    for p in [p for p in proto.metadata_props if p.key == METADATA_KEY]:
        proto.metadata_props.remove(p)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    order = ", ".join(f"{o['name']} ({o['activation']})" for o in meta["outputs"])
    proto.doc_string = f"beautytag model; input image (B,3,S,S); outputs in order: {order}"


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``beautytag`` metadata of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    raise ValueError(f"{path}: no beautytag metadata (not exported by beautytag export)")
