"""Shade matching: a colour given as hex or Lab, and the rows ranked by CIEDE2000 to it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from beautytag.color import delta_e2000, hex_to_lab
from beautytag.search.errors import SearchError


def parse_shade(text: str | Sequence[float]) -> np.ndarray:
    """A colour as CIELAB, shape (3,): ``#rrggbb`` / ``#rgb`` hex, ``"L,a,b"`` or 3 numbers."""
    if isinstance(text, str):
        parts = text.split(",")
        try:
            if len(parts) == 1:
                return hex_to_lab(text)
            lab = np.array([float(p) for p in parts], dtype=np.float64)
        except ValueError:
            lab = np.zeros(0)
    else:
        lab = np.asarray(text, dtype=np.float64).reshape(-1)
    if lab.shape != (3,) or not np.isfinite(lab).all():
        raise SearchError(f"shade {text!r} is not a colour; give #rrggbb or L,a,b")
    return lab


def nearest_shades(
    lab: np.ndarray, target: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (at most) `k` rows of `rows` whose `lab` is closest to `target` by ΔE2000, closest
    first, and their ΔE2000. Rows without a shade (NaN) are left out."""
    rows = rows[~np.isnan(lab[rows]).any(axis=1)]
    de = delta_e2000(lab[rows], target)
    order = np.lexsort((rows, de))[:k]  # ties by row, i.e. by id
    return rows[order], de[order]
