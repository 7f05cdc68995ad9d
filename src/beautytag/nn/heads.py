"""Colour heads: read the product's colour off the photo (shade by colour pooling, class
logits from a CIELAB histogram)."""

from __future__ import annotations

import torch
from torch import nn

from beautytag.color import lab_constants, linear_rgb_to_lab_torch, srgb_to_linear_torch


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
