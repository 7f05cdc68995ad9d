"""Explanations: where the model looks (Grad-CAM on the attended feature map, or a shade
head's colour-pooling weights), drawn over the photo."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from beautytag.color import lab_to_hex
from beautytag.images import letterbox
from beautytag.nn.net import BeautyTagNet


def activation_map(
    weights: torch.Tensor, fmap: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The class-activation map (B, 1, *size*): ReLU of the feature map (B, C, h, w) summed
    with per-channel `weights` (B, C, 1, 1), resized bilinearly to the input's `size`."""
    cam = torch.relu((weights * fmap).sum(1, keepdim=True).float())
    return torch.nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def gradcam(model: BeautyTagNet, x: torch.Tensor, attribute: str) -> tuple[np.ndarray, str]:
    """A (H, W) map in 0..1 at the input's size for one image ``x`` (1, 3, H, W), and the label
    it explains: Grad-CAM on ``model.features(x)`` for the top class of a class attribute,
    the shade head's pooling weights for a shade."""
    a = model.schema[attribute]
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        fmap = model.features(x)
    fmap = fmap.detach().float().requires_grad_(True)
    head = model.heads[a.name]
    with torch.enable_grad():
        if a.kind == "shade":
            cam = head.weights(fmap, x.float()).detach()
            lab = model.head(a.name, fmap, model.pool(fmap).flatten(1), x.float())[0].detach()
            label = lab_to_hex([float(t) for t in lab])
        else:
            logits = model.head(a.name, fmap, model.pool(fmap).flatten(1), x.float())[0]
            idx = int(logits.argmax())
            (grad,) = torch.autograd.grad(logits[idx], fmap)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = activation_map(weights, fmap.detach(), x.shape[-2:])
            label = a.classes[idx]
    cam = cam[0, 0].float().cpu()
    cam = cam - cam.min()
    top = float(cam.max())
    return (cam / top if top > 0 else cam).numpy(), label


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> RGB uint8 (a 'jet'-like blue-cyan-yellow-red ramp)."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    rgb = np.concatenate([1.5 - np.abs(4 * v - c) for c in (3, 2, 1)], -1).clip(0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(img: Image.Image, cam: np.ndarray, size: int, alpha: float = 0.7) -> Image.Image:
    """The letterboxed photo at ``size`` px with ``cam`` blended over it (more where hotter)."""
    photo = np.asarray(letterbox(img, size), dtype=np.float32)
    heat = Image.fromarray((cam * 255).astype(np.uint8), "L").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    v = np.asarray(heat, dtype=np.float32) / 255
    a = (0.15 + (alpha - 0.15) * v)[..., None]
    blend = photo * (1 - a) + colormap(v).astype(np.float32) * a
    return Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))


def render_png(img: Image.Image, cam: np.ndarray, size: int) -> bytes:
    """The explanation as PNG bytes (CPU work on the full-size photo: run it in a thread)."""
    buf = io.BytesIO()
    overlay(img, cam, size).save(buf, format="PNG")
    return buf.getvalue()
