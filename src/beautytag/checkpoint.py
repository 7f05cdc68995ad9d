"""Model files: save, load, average and initialise checkpoints; the shipped models."""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beautytag.config import Config, config_from_dict
from beautytag.nn.heads import PixelColourHead
from beautytag.nn.net import BeautyTagNet
from beautytag.schema import Attribute, Schema


def save_checkpoint(
    path: str | Path,
    model: BeautyTagNet,
    cfg: Config,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Write a checkpoint atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    payload = {"format": "beautytag-1", "config": cfg.to_dict(), "model": state} | (extra or {})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a model is for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def average_checkpoints(paths: list[str | Path], out: str | Path) -> Path:
    """Write the uniform average of the weights of the checkpoints `paths` to `out`, with the
    first's config: a "model soup" (Wortsman et al. 2022). Runs fine-tuned from one start
    average into one model that runs as fast as each; runs of one architecture only.
    Integer buffers (BatchNorm's batch counts) are the first's."""
    loaded = [load_checkpoint(p) for p in paths]
    model, cfg, _ = loaded[0]
    states = [m.state_dict() for m, _, _ in loaded]
    shapes = {k: v.shape for k, v in states[0].items()}
    for path, state, (_, other, _) in zip(paths[1:], states[1:], loaded[1:], strict=True):
        if {k: v.shape for k, v in state.items()} != shapes or other.schema != cfg.schema:
            raise ValueError(f"{path}: not the architecture of {paths[0]}; cannot average them")
    model.load_state_dict(
        {
            k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()
        }
    )
    save_checkpoint(out, model, cfg, {"soup_of": [str(p) for p in paths]})
    return Path(out)


# a head's tensors with one row per class (Linear, or PixelColourHead's two linear layers)
PER_CLASS = {"weight", "bias", "linear.weight", "linear.bias", "colour.weight", "colour.bias"}


def class_order(ours: Attribute, theirs: Attribute) -> list[int] | None:
    """Where each of our classes is among theirs (-1: a class they lack), if both attributes
    have the same name and kind and share at least one class, whatever the order and letter
    case (else None: a new head)."""
    if (ours.name, ours.kind) != (theirs.name, theirs.kind):
        return None
    index = {c.casefold(): i for i, c in enumerate(theirs.classes)}
    if len(index) != len(theirs.classes):
        return None
    order = [index.get(c.casefold(), -1) for c in ours.classes]
    if ours.kind != "shade" and all(i < 0 for i in order):
        return None
    return order


def init_from_checkpoint(model: BeautyTagNet, path: str | Path) -> list[str]:
    """Start `model` from the beautytag checkpoint at `path`: every tensor whose name and
    shape match, the heads of attributes with the same name and kind row by row for the
    classes both know (in any order and letter case); the rows of classes the checkpoint lacks
    keep their initial values. A linear head and a :class:`PixelColourHead`'s linear part
    stand for each other. Returns the names of this model's tensors that kept their initial
    values, wholly or in some rows."""
    theirs, cfg = load_checkpoint(path)[:2]
    state = theirs.state_dict()
    own = model.state_dict()
    partial: set[str] = set()
    for a in model.schema.attributes:
        orders = [class_order(a, b) for b in cfg.schema.attributes]
        order = next((o for o in orders if o is not None), None)
        prefix, head = f"heads.{a.name}.", model.heads[a.name]
        for k in [k for k in state if k.startswith(prefix)]:
            v, rest = state.pop(k), k.removeprefix(prefix)
            if order is None:
                continue
            if isinstance(head, PixelColourHead) and rest in ("weight", "bias"):
                rest = "linear." + rest
            elif isinstance(head, nn.Linear):
                rest = rest.removeprefix("linear.")
            key = prefix + rest
            if rest in PER_CLASS and a.kind != "shade" and key in own:
                rows = own[key].clone()
                known = [i for i, j in enumerate(order) if j >= 0]
                if v.shape[1:] != rows.shape[1:]:
                    continue
                rows[known] = v[[order[i] for i in known]]
                if len(known) < len(order):
                    partial.add(key)
                v = rows
            state[key] = v
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return [k for k in own if k not in matched or k in partial]


def wise_ft(start: str | Path, tuned: str | Path, alpha: float, out: str | Path) -> Path:
    """WiSE-FT (Wortsman et al. 2022): write (1 - alpha) x `start` + alpha x `tuned` to `out`,
    with `tuned`'s config; `tuned` was fine-tuned from `start` (model.init). Tensors and class
    rows that `start` lacks (new heads, new classes) are `tuned`'s. alpha 1 is `tuned`, 0 is
    `start` as far as it goes. Scores need calibrating again (`beautytag calibrate`)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    model, cfg, _ = load_checkpoint(tuned)
    ours = model.state_dict()
    base = copy.deepcopy(model)
    init_from_checkpoint(base, start)  # start's tensors and rows; the rest stays tuned's
    theirs = base.state_dict()
    model.load_state_dict(
        {
            k: torch.lerp(theirs[k].float(), v.float(), alpha).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in ours.items()
        }
    )
    save_checkpoint(out, model, cfg, {"wise_ft": {"start": str(start), "alpha": alpha}})
    return Path(out)


# model settings that a kept head was trained with: another value changes what it reads
HEAD_SETTINGS = ("backbone", "attention", "image_size", "mean", "std", "pixel_colour_pool")


def keep_start_attributes(cfg: Config) -> tuple[Config, list[str], list[str]]:
    """`cfg` with the attributes of its starting model (``model.init``) that it does not
    define added after its own (same name, kind, classes and weight; no source labels them,
    so they are masked; their temperatures, pixel-colour reading and gate kept), unless
    ``model.keep_attributes`` is false. Returns the config, the kept names and warnings
    about model settings that differ from the starting model's (its heads may then not load,
    or read other features)."""
    if not cfg.model.init or not cfg.model.keep_attributes:
        return cfg, [], []
    path = resolve_model(cfg.model.init)
    if not path.is_file():
        raise FileNotFoundError(f"model.init: {path}: model file not found")
    start = config_from_dict(read_checkpoint(path)["config"], where=str(path))
    kept = [
        dataclasses.replace(a, classes=list(a.classes), sources={})
        for a in start.schema.attributes
        if a.name not in cfg.schema.names
    ]
    if not kept:
        return cfg, [], []
    names = [a.name for a in kept]
    model = dataclasses.replace(
        cfg.model,
        pixel_colour=cfg.model.pixel_colour + [n for n in start.model.pixel_colour if n in names],
        temperatures=cfg.model.temperatures
        | {n: t for n, t in start.model.temperatures.items() if n in names},
        # a kept gate attribute keeps its gate (not a cosmetic), unless the config has one
        gate=cfg.model.gate
        or (start.model.gate if start.model.gate.get("attribute") in names else {}),
    )
    settings = [k for k in HEAD_SETTINGS if getattr(cfg.model, k) != getattr(start.model, k)]
    if not set(start.model.pixel_colour) & set(names):  # no kept head reads the pixels
        settings = [k for k in settings if k != "pixel_colour_pool"]
    warnings = [
        f"model.{k} is {getattr(cfg.model, k)!r}, {cfg.model.init}'s is "
        f"{getattr(start.model, k)!r}: the heads kept from it ({', '.join(names)}) may not "
        "load or may read other features (use its settings, or model.keep_attributes: false)"
        for k in settings
    ]
    schema = Schema(cfg.schema.attributes + kept)
    return dataclasses.replace(cfg, model=model, schema=schema), names, warnings


def mismatch(e: RuntimeError) -> str:
    """The first problem that ``load_state_dict`` reports (its message lists them all)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else lines[0] if lines else "unknown"


TORCHSCRIPT_SUFFIXES = {".ts", ".torchscript", ".jit"}


EXPORTED_SUFFIXES = {".onnx", *TORCHSCRIPT_SUFFIXES}  # what `beautytag export` writes


def refuse_exported(path: Path, what: str) -> None:
    """ValueError for an exported model where `what` needs the checkpoint."""
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        raise ValueError(
            f"{path}: an exported model; {what} needs the .pt checkpoint it was exported from "
            "(from `beautytag train`, or default / accurate)"
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a file that ``save_checkpoint`` wrote (``best.pt``, ``last.pt``, a
    shipped model), read as weights only (a file's pickled code is never run); ValueError in
    one line naming the file for anything else (garbage, a truncated file, another format)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Weights only" in str(e):  # torch's advice: run code
            problem = "it holds more than weights, which beautytag does not load"
        raise ValueError(
            f"{path}: not a beautytag checkpoint, the .pt file `beautytag train` writes ({problem})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "beautytag-1":
        raise ValueError(f"{path}: not a beautytag checkpoint")
    return ckpt


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[BeautyTagNet, Config, dict[str, Any]]:
    """Rebuild the model and its config from a checkpoint; no pretrained download needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    refuse_exported(path, "this")
    ckpt = read_checkpoint(path)
    weights = ckpt.get("model")
    if not isinstance(ckpt.get("config"), dict) or not isinstance(weights, dict):
        raise ValueError(f"{path}: a damaged beautytag checkpoint (no config or weights)")
    if bad := [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]:
        raise ValueError(f"{path}: a damaged beautytag checkpoint ({bad[0]} is not a tensor)")
    cfg = config_from_dict(ckpt["config"], where=str(path))
    model = BeautyTagNet(cfg, pretrained=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: a damaged beautytag checkpoint ({mismatch(e)})") from None
    return model.to(device).eval(), cfg, ckpt


# models shipped inside the package, by the name `--model` accepts
SHIPPED_MODELS = {
    "default": "default.pt",  # EfficientNet-Lite0 at 96 px: fast enough for real-time serving
    "accurate": "accurate.pt",  # the same at 192 px: better shades, 4x the pixels
}


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


def model_source(name: str, out: Path, what: str) -> Path:
    """The file of a MODEL argument (a checkpoint or a shipped name) that a command writes
    `what` from to `out`: FileNotFoundError when there is none, ValueError when `out` is it."""
    model = resolve_model(name)
    if not model.is_file():
        raise FileNotFoundError(f"{model}: model file not found")
    refuse_exported(model, what)
    if out.exists() and out.samefile(model):
        raise ValueError(f"{out}: {what} would overwrite the model; give another --out")
    return model
