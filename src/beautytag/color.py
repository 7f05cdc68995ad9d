"""Colour science helpers: sRGB <-> CIELAB (D65) and CIEDE2000 colour difference.

All functions take float arrays whose last dimension is 3 and broadcast over leading dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: D65 reference white (2 degree observer), XYZ scaled so that Y = 1.
D65_WHITE = np.array([0.95047, 1.0, 1.08883])

# Linear sRGB -> XYZ (D65), IEC 61966-2-1.
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)

_EPS = 216.0 / 24389.0  # (6/29)^3
_KAPPA = 24389.0 / 27.0


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1.0 / 2.4) - 0.055)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert gamma-encoded sRGB in [0, 1] to CIELAB (D65 white)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    xyz = _srgb_to_linear(rgb) @ _RGB_TO_XYZ.T
    t = xyz / D65_WHITE
    f = np.where(t > _EPS, np.cbrt(t), (_KAPPA * t + 16.0) / 116.0)
    lab_l = 116.0 * f[..., 1] - 16.0
    lab_a = 500.0 * (f[..., 0] - f[..., 1])
    lab_b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lab_l, lab_a, lab_b], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """Convert CIELAB (D65) to gamma-encoded sRGB in [0, 1]; out-of-gamut values are clipped."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = fy + lab[..., 1] / 500.0
    fz = fy - lab[..., 2] / 200.0
    f = np.stack([fx, fy, fz], axis=-1)
    t = np.where(f**3 > _EPS, f**3, (116.0 * f - 16.0) / _KAPPA)
    xyz = t * D65_WHITE
    return np.clip(_linear_to_srgb(xyz @ _XYZ_TO_RGB.T), 0.0, 1.0)


def lab_to_hex(lab: Sequence[float]) -> str:
    """Format one CIELAB colour as a lowercase ``#rrggbb`` sRGB hex string."""
    rgb = lab_to_srgb(np.asarray(lab, dtype=np.float64).reshape(3))
    r, g, b = (int(round(float(v) * 255.0)) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def hex_to_lab(hex_str: str) -> np.ndarray:
    """Parse ``#rrggbb`` (or ``rrggbb`` / ``#rgb``) to a CIELAB array of shape (3,)."""
    s = hex_str.strip().lstrip("#")
    if len(s) == 3:
        s = "".join(ch * 2 for ch in s)
    if len(s) != 6:
        raise ValueError(f"not a hex colour: {hex_str!r}")
    rgb = np.array([int(s[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255.0
    return srgb_to_lab(rgb)


def delta_e2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma, Wu & Dalal 2005) with kL = kC = kH = 1.

    Inputs broadcast against each other; returns an array of the broadcast leading shape.
    """
    lab1 = np.asarray(lab1, dtype=np.float64)
    lab2 = np.asarray(lab2, dtype=np.float64)
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]

    c1 = np.hypot(a1, b1)
    c2 = np.hypot(a2, b2)
    c_bar7 = ((c1 + c2) / 2.0) ** 7
    g = 0.5 * (1.0 - np.sqrt(c_bar7 / (c_bar7 + 25.0**7)))
    a1p = (1.0 + g) * a1
    a2p = (1.0 + g) * a2
    c1p = np.hypot(a1p, b1)
    c2p = np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360.0
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360.0

    dlp = l2 - l1
    dcp = c2p - c1p
    zero_c = (c1p * c2p) == 0.0
    dhp = h2p - h1p
    dhp = np.where(dhp > 180.0, dhp - 360.0, dhp)
    dhp = np.where(dhp < -180.0, dhp + 360.0, dhp)
    dhp = np.where(zero_c, 0.0, dhp)
    d_hp = 2.0 * np.sqrt(c1p * c2p) * np.sin(np.radians(dhp / 2.0))

    lbp = (l1 + l2) / 2.0
    cbp = (c1p + c2p) / 2.0
    hsum = h1p + h2p
    hbp = np.where(
        np.abs(h1p - h2p) <= 180.0,
        hsum / 2.0,
        np.where(hsum < 360.0, (hsum + 360.0) / 2.0, (hsum - 360.0) / 2.0),
    )
    hbp = np.where(zero_c, hsum, hbp)

    t = (
        1.0
        - 0.17 * np.cos(np.radians(hbp - 30.0))
        + 0.24 * np.cos(np.radians(2.0 * hbp))
        + 0.32 * np.cos(np.radians(3.0 * hbp + 6.0))
        - 0.20 * np.cos(np.radians(4.0 * hbp - 63.0))
    )
    d_theta = 30.0 * np.exp(-(((hbp - 275.0) / 25.0) ** 2))
    cbp7 = cbp**7
    r_c = 2.0 * np.sqrt(cbp7 / (cbp7 + 25.0**7))
    s_l = 1.0 + 0.015 * (lbp - 50.0) ** 2 / np.sqrt(20.0 + (lbp - 50.0) ** 2)
    s_c = 1.0 + 0.045 * cbp
    s_h = 1.0 + 0.015 * cbp * t
    r_t = -np.sin(np.radians(2.0 * d_theta)) * r_c

    tl = dlp / s_l
    tc = dcp / s_c
    th = d_hp / s_h
    return np.sqrt(tl**2 + tc**2 + th**2 + r_t * tc * th)


def srgb_to_linear_torch(rgb: torch.Tensor) -> torch.Tensor:
    """Differentiable sRGB gamma decoding (any shape). Powers are written exp(k log x)
    here and below: ONNX Runtime runs Exp and Log faster than Pow with a fractional k."""
    rgb = rgb.clamp(0.0, 1.0)
    return torch.where(
        rgb <= 0.04045, rgb / 12.92, torch.exp(2.4 * torch.log((rgb + 0.055) / 1.055))
    )


# f(X), f(Y), f(Z) -> L*, a*, b* (before L*'s offset of -16)
_F_TO_LAB = np.array([[0.0, 500.0, 0.0], [116.0, -500.0, 200.0], [0.0, 0.0, -200.0]])


def lab_constants() -> dict[str, torch.Tensor]:
    """The matrices of :func:`linear_rgb_to_lab_torch` (float32). A module registers them as
    buffers and passes them in, so that a traced (TorchScript) copy follows its device."""
    return {
        "rgb_to_xyz_t": torch.tensor((_RGB_TO_XYZ / D65_WHITE[:, None]).T, dtype=torch.float32),
        "f_to_lab": torch.tensor(_F_TO_LAB, dtype=torch.float32),
        "lab_offset": torch.tensor([16.0, 0.0, 0.0]),
    }


def linear_rgb_to_lab_torch(
    lin: torch.Tensor, constants: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Differentiable linear sRGB (..., 3) -> CIELAB (D65), the same formulas as
    :func:`srgb_to_lab`; used inside the model so that it exports to ONNX. `constants`:
    :func:`lab_constants` on `lin`'s device (made here when not given)."""
    c = constants or {k: v.to(lin) for k, v in lab_constants().items()}
    t = lin @ c["rgb_to_xyz_t"]
    cube_root = torch.exp(torch.log(t.clamp_min(_EPS)) / 3.0)
    f = torch.where(t > _EPS, cube_root, (_KAPPA * t + 16.0) / 116.0)
    return f @ c["f_to_lab"] - c["lab_offset"]
