"""Evaluation metrics: numpy arrays in, plain Python floats out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

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


def save_confusion_png(
    cm: np.ndarray, labels: list[str], path: str | Path, title: str = ""
) -> None:
    """Draw a row-normalised confusion matrix with matplotlib (rows: true, columns:
    predicted; white for 0 to dark blue for a whole row), every class name written out in
    full, the counts in the cells when there are at most 40 classes."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    cm = np.asarray(cm)
    n = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    names = [str(lab) for lab in labels]
    longest = max([len(s) for s in names] + [4])
    side = min(24.0, max(3.0, 0.32 * n + 0.07 * longest + 1.5))
    fig = Figure(figsize=(side, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 40:
        for i, j in zip(*np.nonzero(cm), strict=True):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7, color=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
