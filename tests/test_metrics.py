import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from beautytag.training.metrics import (
    accuracy,
    calibration_error,
    confusion_matrix,
    macro_f1,
    most_confused,
    multilabel_f1,
    multilabel_map,
    per_class,
    save_confusion_png,
    selective_accuracy,
    shade_stats,
    topk_accuracy,
)


def test_accuracy() -> None:
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])) == 0.75
    assert isinstance(accuracy(np.array([1]), np.array([1])), float)
    assert math.isnan(accuracy(np.array([], dtype=int), np.array([], dtype=int)))


def test_confusion_matrix() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0]), 4)
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype.kind == "i"


def test_most_confused_lists_off_diagonal_cells_most_frequent_first() -> None:
    cm = np.array([[9, 1, 0], [4, 5, 2], [0, 0, 7]])
    pairs = most_confused(cm, ["a", "b", "c"], k=2)
    assert pairs == [
        {"true": "b", "predicted": "a", "count": 4},
        {"true": "b", "predicted": "c", "count": 2},
    ]
    assert len(most_confused(cm, ["a", "b", "c"])) == 3  # only cells with mistakes
    assert most_confused(np.diag([3, 4]), ["a", "b"]) == []


def test_per_class_counts_recall_precision_and_f1() -> None:
    # rows true, columns predicted; class c is never true, class d neither true nor predicted
    cm = np.array([[3, 1, 0, 0], [2, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    rows = {r["class"]: r for r in per_class(cm, ["a", "b", "c", "d"])}
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"] == {
        "class": "a",
        "n": 4,
        "correct": 3,
        "recall": 0.75,
        "precision": 0.6,
        "f1": pytest.approx(2 * 3 / (4 + 5)),
    }
    assert (rows["b"]["n"], rows["b"]["correct"], rows["b"]["precision"]) == (5, 2, 2 / 3)
    assert rows["c"]["recall"] is None and rows["c"]["precision"] == 0.0 and rows["c"]["f1"] == 0
    # the F1s of the classes present average to macro-F1
    t, p = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 2, 0])
    f1s = [r["f1"] for r in per_class(confusion_matrix(t, p, 3), ["a", "b", "c"])]
    assert np.mean(f1s) == pytest.approx(macro_f1(t, p, 3))


def test_macro_f1_hand_computed() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    # F1: class0 = 2*1/(2+2) = 0.5, class1 = 2*2/(2+3) = 0.8, class2 = 2*1/(2+1) = 2/3
    # classes 3 and 4 appear nowhere and are ignored
    expected = (0.5 + 0.8 + 2 / 3) / 3
    assert macro_f1(y_true, y_pred, 5) == pytest.approx(expected)
    assert expected == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2]))


def test_macro_f1_counts_class_only_predicted() -> None:
    y_true = np.array([0, 0, 1])
    y_pred = np.array([0, 3, 1])
    # class0 = 2/3, class1 = 1, class3 (predicted only) = 0
    assert macro_f1(y_true, y_pred, 5) == pytest.approx(5 / 9)
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 7, 200), rng.integers(0, 5, 200)
    present = sorted(set(t) | set(p))
    assert macro_f1(t, p, 10) == pytest.approx(
        f1_score(t, p, average="macro", labels=present, zero_division=0)
    )


def test_topk_accuracy() -> None:
    scores = np.array([[0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.2, 0.1], [0.21, 0.2, 0.25, 0.35]])
    y = np.array([2, 2, 0])
    assert topk_accuracy(y, scores, 1) == 0.0
    assert topk_accuracy(y, scores, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(y, scores, 3) == 1.0
    assert topk_accuracy(y, scores, 10) == 1.0  # k larger than C is clamped
    assert topk_accuracy(np.array([1, 0]), scores[:2], 1) == 1.0


def test_calibration_error_hand_computed() -> None:
    # top scores 0.95, 0.95 (bin [0.9, 1]: 1 of 2 right) and 0.6, 0.65 (bin [0.6, 0.7): both
    # right): (2 * |0.5 - 0.95| + 2 * |1.0 - 0.625|) / 4
    scores = np.array([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.35, 0.65]])
    y = np.array([0, 0, 0, 1])
    assert calibration_error(y, scores) == pytest.approx((2 * 0.45 + 2 * 0.375) / 4)
    # a score of exactly 1 falls in the last bin; scores that match the hit rate give 0
    assert calibration_error(np.array([0]), np.array([[1.0, 0.0]])) == 0.0
    fair = np.array([[0.5, 0.5]] * 4)
    assert calibration_error(np.array([0, 0, 1, 1]), fair) == 0.0  # argmax 0: half right
    assert math.isnan(calibration_error(np.array([], int), np.zeros((0, 2))))
    # a float32 score of 0.7 is binned as 0.7, not as float64's 0.69999998 (evaluate's scores)
    edge = np.array([[0.7, 0.3], [0.65, 0.35]])
    y = np.array([0, 1])
    assert calibration_error(y, edge.astype(np.float32)) == pytest.approx(
        calibration_error(y, edge)
    )
    assert calibration_error(y, edge) == pytest.approx((0.3 + 0.65) / 2)


def test_selective_accuracy_keeps_answers_at_or_above_each_threshold() -> None:
    scores = np.array([[0.95, 0.05], [0.05, 0.95], [0.7, 0.3], [0.45, 0.55], [0.5, 0.5]])
    y = np.array([0, 0, 0, 1, 1])  # right, wrong, right, right, wrong (tie: class 0)
    rows = selective_accuracy(y, scores, (0.5, 0.7, 0.96))
    assert [r["n"] for r in rows] == [5, 3, 0]  # 0.7 itself is kept
    assert rows[0]["accuracy"] == pytest.approx(3 / 5) and rows[0]["share"] == 1.0
    assert rows[1]["accuracy"] == pytest.approx(2 / 3) and rows[1]["share"] == 0.6
    assert rows[2]["accuracy"] is None and rows[2]["share"] == 0.0
    # evaluate's scores are float32: a score of 0.7 there is kept at 0.7 too
    rows32 = selective_accuracy(y, scores.astype(np.float32), (0.5, 0.7, 0.96))
    assert [r["n"] for r in rows32] == [5, 3, 0]


def test_multilabel_map_hand_computed() -> None:
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.9, 0.1], [0.8, 0.8, 0.2], [0.3, 0.3, 0.3], [0.1, 0.1, 0.4]])
    # class0: hits at ranks 1 and 3 -> AP = (1 + 2/3) / 2; class1: hit at rank 2 -> AP = 1/2
    # class2 has no positive and is skipped
    assert multilabel_map(targets, scores) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert math.isnan(multilabel_map(np.zeros((3, 2)), np.ones((3, 2))))


def test_multilabel_map_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(2)
    targets = (rng.uniform(size=(60, 6)) < 0.3).astype(int)
    targets[:, 5] = 0
    scores = np.round(rng.uniform(size=(60, 6)), 1)  # coarse scores -> many ties
    cols = [c for c in range(6) if targets[:, c].any()]
    expected = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in cols])
    assert multilabel_map(targets, scores) == pytest.approx(expected)


def test_multilabel_f1() -> None:
    targets = np.array([[1, 0, 0], [1, 1, 0]])
    scores = np.array([[0.7, 0.6, 0.8], [0.4, 0.9, 0.2]])
    # predictions [[1,1,1],[0,1,0]]: tp=2, fp=2, fn=1 -> micro = 4/7
    # class0 F1 = 2/3, class1 F1 = 2/3, class2 has no positive -> excluded from macro
    out = multilabel_f1(targets, scores)
    assert out["micro_f1"] == pytest.approx(4 / 7)
    assert out["macro_f1"] == pytest.approx(2 / 3)
    preds = (scores >= 0.5).astype(int)
    assert out["micro_f1"] == pytest.approx(f1_score(targets, preds, average="micro"))
    assert out["macro_f1"] == pytest.approx(
        f1_score(targets, preds, average="macro", labels=[0, 1])
    )
    assert multilabel_f1(targets, scores, threshold=0.95)["micro_f1"] == 0.0


def test_shade_stats_on_sharma_pairs() -> None:
    lab_true = np.array(
        [[50.0, 2.5, 0.0], [50.0, 2.6772, -79.7751], [50.0, 2.49, -0.001], [50.0, 2.5, 0.0]]
    )
    lab_pred = np.array(
        [[50.0, 3.2972, 0.0], [50.0, 0.0, -82.7485], [50.0, -2.49, 0.0009], [73.0, 25.0, -18.0]]
    )
    # dE00 = 1.0000, 2.0425, 7.1792, 27.1492 (Sharma et al. 2005)
    out = shade_stats(lab_true, lab_pred)
    assert out["n"] == 4 and isinstance(out["n"], int)  # a count, printed as 4, not 4.0
    assert out["median_de2000"] == pytest.approx((2.0425 + 7.1792) / 2, abs=1e-4)
    assert out["mean_de2000"] == pytest.approx((1.0 + 2.0425 + 7.1792 + 27.1492) / 4, abs=1e-4)
    assert out["share_under_5"] == 0.5
    assert all(isinstance(v, float) for k, v in out.items() if k != "n")


def _pixel_count(img: Image.Image, rgb: tuple[int, int, int]) -> int:
    return sum(n for n, c in img.getcolors(maxcolors=1 << 20) if c == rgb)


def test_save_confusion_png_small(tmp_path) -> None:
    cm = np.array([[10, 0, 0], [5, 5, 0], [0, 0, 0]])
    path = tmp_path / "sub" / "cm.png"
    save_confusion_png(
        cm, ["lipstick", "mascara", "a very long category name indeed"], path, title="category"
    )
    img = Image.open(path).convert("RGB")
    assert 100 < img.width < 1000 and 100 < img.height < 1000
    # full row -> dark blue, half row -> mid blue (matplotlib's Blues), empty cell -> white
    from matplotlib import colormaps

    half = np.array(colormaps["Blues"](0.5)[:3]) * 255
    pixels = np.asarray(img, dtype=float).reshape(-1, 3)
    assert _pixel_count(img, (8, 48, 107)) > 100
    assert (np.abs(pixels - half).max(1) <= 2).sum() > 100
    assert _pixel_count(img, (255, 255, 255)) > 1000


@pytest.mark.parametrize("n", [2, 12, 40, 45])
def test_save_confusion_png_sizes(tmp_path, n: int) -> None:
    rng = np.random.default_rng(n)
    cm = rng.integers(0, 300, size=(n, n)) + np.diag(rng.integers(500, 2000, size=n))
    labels = [f"class_{i}_with_a_rather_long_name" for i in range(n)]
    path = tmp_path / f"cm{n}.png"
    save_confusion_png(cm, labels, path, title=f"{n} classes")
    img = Image.open(path)
    assert img.format == "PNG"
    assert 150 < img.width < 2500 and 150 < img.height < 2500
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > n
