"""Evaluation metrics: numpy arrays in, plain Python floats out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from beautytag.color import delta_e2000


def _labels(y: np.ndarray) -> np.ndarray:
    return np.asarray(y).astype(np.int64).ravel()


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches; nan for empty input."""
    t, p = _labels(y_true), _labels(y_pred)
    return float(np.mean(t == p)) if t.size else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 count matrix; rows are true labels, columns are predictions."""
    t, p = _labels(y_true), _labels(y_pred)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def most_confused(cm: np.ndarray, labels: list[str], k: int = 5) -> list[dict[str, Any]]:
    """The `k` largest off-diagonal cells of a confusion matrix, most frequent first (ties in
    class order): ``{"true": ..., "predicted": ..., "count": ...}``."""
    off = np.asarray(cm).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    cells = [np.unravel_index(i, off.shape) for i in order]
    return [
        {"true": labels[t], "predicted": labels[p], "count": int(off[t, p])}
        for t, p in cells
        if off[t, p] > 0
    ]


def per_class(cm: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    """Each class's support (true photos), hits, recall, precision and F1 from a confusion
    matrix, for the classes that are true or predicted at least once; recall (precision) is
    None for a class that is never true (never predicted)."""
    cm = np.asarray(cm)
    rows = []
    for i, name in enumerate(labels):
        n, predicted, hits = int(cm[i].sum()), int(cm[:, i].sum()), int(cm[i, i])
        if n + predicted == 0:
            continue
        rows.append(
            {
                "class": name,
                "n": n,
                "correct": hits,
                "recall": hits / n if n else None,
                "precision": hits / predicted if predicted else None,
                "f1": 2 * hits / (n + predicted),
            }
        )
    return rows


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in ``y_true`` or ``y_pred``.

    Equivalent to ``sklearn.metrics.f1_score(average="macro", labels=present)`` where
    ``present`` is the union of labels seen in either array; a present class with no true
    positives scores 0. Returns nan for empty input.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return math.nan
    f1 = 2.0 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def topk_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest scores of ``scores`` (N, C)."""
    t = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if t.size == 0:
        return math.nan
    k = min(k, s.shape[1])
    topk = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float(np.mean((topk == t[:, None]).any(axis=1)))


def _top_scores(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top score (in the scores' own float precision) and whether its answer is
    right."""
    s = np.asarray(scores)
    s = s if np.issubdtype(s.dtype, np.floating) else s.astype(np.float64)
    return s.max(axis=1), s.argmax(axis=1) == _labels(y_true)


def calibration_error(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error (Guo et al. 2017): the rows binned by their top score into
    `bins` equal-width bins ([0, 0.1), ..., [0.9, 1]); the mean over rows of |accuracy - mean
    top score| of their bin. 0 for scores that are the chance of being right; nan for empty
    input."""
    top, right = _top_scores(y_true, scores)
    if top.size == 0:
        return math.nan
    edges = (np.arange(1, bins) / bins).astype(top.dtype)  # in the scores' precision: 0.7 is 0.7
    which = np.searchsorted(edges, top, side="right")
    top = top.astype(np.float64)
    gaps = [
        (which == b).sum() * abs(right[which == b].mean() - top[which == b].mean())
        for b in np.unique(which)
    ]
    return float(sum(gaps) / top.size)


def selective_accuracy(
    y_true: np.ndarray, scores: np.ndarray, thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)
) -> list[dict[str, Any]]:
    """What keeping only the answers with a top score of at least each threshold gives: how
    many rows (``n``, ``share`` of all) and how many of those answers are right (``accuracy``,
    None when no row is kept). The basis for auto-accepting confident answers."""
    top, right = _top_scores(y_true, scores)
    rows = []
    for threshold in thresholds:
        kept = top >= top.dtype.type(threshold)  # in the scores' precision: 0.7 keeps 0.7
        rows.append(
            {
                "threshold": threshold,
                "n": int(kept.sum()),
                "share": float(kept.mean()) if top.size else math.nan,
                "accuracy": float(right[kept].mean()) if kept.any() else None,
            }
        )
    return rows


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AP as in sklearn: sum over distinct thresholds of (R_n - R_{n-1}) * P_n."""
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), y.size - 1]
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_map(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean average precision over classes with at least one positive; nan if there are none."""
    y = np.asarray(targets, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    aps = [
        _average_precision(y[:, c].astype(np.float64), s[:, c])
        for c in range(y.shape[1])
        if y[:, c].any()
    ]
    return float(np.mean(aps)) if aps else math.nan


def multilabel_f1(
    targets: np.ndarray, scores: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Micro F1 over all (sample, class) cells and macro F1 over classes with >= 1 positive.

    A label is predicted when ``score >= threshold``. F1 with an empty denominator is 0; macro
    is nan when no class has a positive.
    """
    y = np.asarray(targets, dtype=np.float64) > 0.5
    p = np.asarray(scores, dtype=np.float64) >= threshold
    tp = (y & p).sum(axis=0).astype(np.float64)
    fp = (~y & p).sum(axis=0)
    fn = (y & ~p).sum(axis=0)
    denom = 2.0 * tp.sum() + fp.sum() + fn.sum()
    micro = float(2.0 * tp.sum() / denom) if denom > 0 else 0.0
    pos = y.any(axis=0)
    per_class = 2.0 * tp[pos] / (2.0 * tp[pos] + fp[pos] + fn[pos])
    macro = float(per_class.mean()) if pos.any() else math.nan
    return {"micro_f1": micro, "macro_f1": macro}


def shade_stats(lab_true: np.ndarray, lab_pred: np.ndarray) -> dict[str, float | int]:
    """CIEDE2000 summary between true and predicted Lab shades, each (N, 3).

    Keys: ``median_de2000``, ``mean_de2000``, ``share_under_5`` (fraction with dE00 < 5), ``n``.
    """
    de = np.asarray(delta_e2000(lab_true, lab_pred), dtype=np.float64).ravel()
    if de.size == 0:
        return {
            "median_de2000": math.nan,
            "mean_de2000": math.nan,
            "share_under_5": math.nan,
            "n": 0,
        }
    return {
        "median_de2000": float(np.median(de)),
        "mean_de2000": float(np.mean(de)),
        "share_under_5": float(np.mean(de < 5.0)),
        "n": int(de.size),
    }


_WHITE = np.array([255.0, 255.0, 255.0])
_DARK_BLUE = np.array([8.0, 48.0, 107.0])


def _truncate(name: str, limit: int = 18) -> str:
    """Shorten ``name`` to ``limit`` chars, eliding the middle so distinguishing suffixes stay."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 3
    return name[: limit - 1 - tail] + "~" + name[-tail:]


def save_confusion_png(
    cm: np.ndarray, labels: list[str], path: str | Path, title: str = ""
) -> None:
    """Draw a row-normalised confusion-matrix heat map (rows = true, columns = predicted).

    Cells shade from white (0) to dark blue (whole row); counts are printed when there are at
    most 40 classes. Uses PIL only with the default font.
    """
    cm = np.asarray(cm)
    n = cm.shape[0]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
        return x1 - x0, y1 - y0

    show_counts = n <= 40
    names = [_truncate(str(lab)) for lab in labels]
    count_w = text_size(str(int(cm.max()) if cm.size else 0))[0]
    cell = max(16, count_w + 8) if show_counts else 16
    cell = max(cell, min(48, 640 // max(n, 1)))
    _, line_h = text_size("Hg")
    label_w = max([text_size(s)[0] for s in names] + [10]) + 8
    pad = 10
    title_h = line_h + 12 if title else 0
    axis_h = line_h + 8

    grid_x = pad + axis_h + label_w
    grid_y = pad + title_h + axis_h + label_w
    width = max(grid_x + n * cell + pad, pad * 2 + text_size(title)[0])
    height = grid_y + n * cell + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    grid_len = n * cell
    pred_x = grid_x + max(0, (grid_len - text_size("predicted")[0]) // 2)
    draw.text((pred_x, pad + title_h), "predicted", fill="black", font=font)
    true_lbl = Image.new("RGB", (text_size("true")[0] + 4, line_h + 4), "white")
    ImageDraw.Draw(true_lbl).text((0, 0), "true", fill="black", font=font)
    true_lbl = true_lbl.rotate(90, expand=True)
    img.paste(true_lbl, (pad, grid_y + max(0, (grid_len - true_lbl.height) // 2)))

    row_sums = cm.sum(axis=1, keepdims=True).astype(np.float64)
    norm = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=np.float64), where=row_sums > 0)
    for i in range(n):
        for j in range(n):
            x0, y0 = grid_x + j * cell, grid_y + i * cell
            rgb = tuple(int(v) for v in np.round(_WHITE + norm[i, j] * (_DARK_BLUE - _WHITE)))
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=rgb, outline=(200, 200, 200))
            if show_counts and cm[i, j] > 0:
                s = str(int(cm[i, j]))
                tw, th = text_size(s)
                color = "white" if norm[i, j] > 0.5 else "black"
                draw.text(
                    (x0 + (cell - tw) / 2, y0 + (cell - th) / 2 - 1), s, fill=color, font=font
                )

    for k, name in enumerate(names):
        tw, th = text_size(name)
        # row label, right-aligned against the grid
        draw.text(
            (grid_x - tw - 4, grid_y + k * cell + (cell - th) / 2 - 1),
            name,
            fill="black",
            font=font,
        )
        # column label, rotated to read bottom-to-top, bottom-aligned against the grid
        tile = Image.new("RGB", (tw + 2, line_h + 4), "white")
        ImageDraw.Draw(tile).text((0, 0), name, fill="black", font=font)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (grid_x + k * cell + (cell - tile.width) // 2, grid_y - tile.height - 4))

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
