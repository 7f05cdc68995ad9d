import numpy as np
import pytest
import torch

from beautytag.color import (
    delta_e2000,
    hex_to_lab,
    lab_to_hex,
    lab_to_srgb,
    linear_rgb_to_lab_torch,
    srgb_to_lab,
    srgb_to_linear_torch,
)

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1 (all 34 pairs).
SHARMA_PAIRS = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, 3.1571, -77.2803), (50.0000, 0.0000, -82.7485), 2.8615),
    ((50.0000, 2.8361, -74.0200), (50.0000, 0.0000, -82.7485), 3.4412),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -1.1848, -84.8006), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -0.9009, -85.5211), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, -1.0000, 2.0000), (50.0000, 0.0000, 0.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0009), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0010), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0012), 7.2195),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0009, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0010, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0011, -2.4900), 4.7461),
    ((50.0000, 2.5000, 0.0000), (50.0000, 0.0000, -2.5000), 4.3065),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((50.0000, 2.5000, 0.0000), (61.0000, -5.0000, 29.0000), 22.8977),
    ((50.0000, 2.5000, 0.0000), (56.0000, -27.0000, -3.0000), 31.9030),
    ((50.0000, 2.5000, 0.0000), (58.0000, 24.0000, 15.0000), 19.4535),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.1736, 0.5854), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2972, 0.0000), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 1.8634, 0.5757), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2592, 0.3350), 1.0000),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ((61.2901, 3.7196, -5.3901), (61.4292, 2.2480, -4.9620), 1.8731),
    ((35.0831, -44.1164, 3.7933), (35.0232, -40.0716, 1.5901), 1.8645),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((6.7747, -0.2908, -2.4247), (5.8714, -0.0985, -2.2286), 0.6377),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


def _sharma_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lab1 = np.array([p[0] for p in SHARMA_PAIRS])
    lab2 = np.array([p[1] for p in SHARMA_PAIRS])
    expected = np.array([p[2] for p in SHARMA_PAIRS])
    return lab1, lab2, expected


def test_delta_e2000_sharma_vectorised() -> None:
    lab1, lab2, expected = _sharma_arrays()
    de = delta_e2000(lab1, lab2)
    assert de.shape == (34,)
    np.testing.assert_allclose(de, expected, atol=5e-5)


@pytest.mark.parametrize("lab1,lab2,expected", SHARMA_PAIRS)
def test_delta_e2000_sharma_pairwise_and_symmetric(lab1, lab2, expected) -> None:
    assert float(delta_e2000(np.array(lab1), np.array(lab2))) == pytest.approx(expected, abs=5e-5)
    assert float(delta_e2000(np.array(lab2), np.array(lab1))) == pytest.approx(expected, abs=5e-5)


def test_delta_e2000_broadcasting_and_identity() -> None:
    lab1, lab2, _ = _sharma_arrays()
    ref = np.array([50.0, 0.0, 0.0])
    assert delta_e2000(lab1, ref).shape == (34,)
    grid = delta_e2000(lab1[:, None, :], lab2[None, :, :])
    assert grid.shape == (34, 34)
    np.testing.assert_allclose(np.diag(grid), delta_e2000(lab1, lab2))
    np.testing.assert_allclose(delta_e2000(lab1, lab1), 0.0, atol=1e-12)


def test_srgb_to_lab_reference_points() -> None:
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab(np.array([0.0, 0.0, 0.0])), [0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(
        srgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=0.05
    )
    # neutral greys have a = b = 0
    grey = srgb_to_lab(np.array([0.5, 0.5, 0.5]))
    np.testing.assert_allclose(grey[1:], 0.0, atol=1e-3)
    assert 53.0 < grey[0] < 54.0


def test_srgb_lab_round_trip() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.0, 1.0, size=(4, 50, 3))
    lab = srgb_to_lab(rgb)
    assert lab.shape == rgb.shape
    back = lab_to_srgb(lab)
    np.testing.assert_allclose(back, rgb, atol=1e-7)
    np.testing.assert_allclose(srgb_to_lab(back), lab, atol=1e-5)


def test_lab_to_srgb_clips_out_of_gamut() -> None:
    rgb = lab_to_srgb(np.array([[50.0, 120.0, -120.0], [110.0, 0.0, 0.0]]))
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_hex_round_trip() -> None:
    for h in ["#000000", "#ffffff", "#ff0000", "#c8102e", "#1a2b3c", "#f5d0c5"]:
        assert lab_to_hex(hex_to_lab(h)) == h
    assert lab_to_hex([100.0, 0.0, 0.0]) == "#ffffff"
    assert lab_to_hex((53.2408, 80.0925, 67.2032)) == "#ff0000"
    np.testing.assert_allclose(hex_to_lab("FFF"), [100.0, 0.0, 0.0], atol=1e-3)
    with pytest.raises(ValueError):
        hex_to_lab("#12345")


def test_the_models_torch_conversion_matches_the_reference():
    """The float32 torch formulas inside the model (exportable to ONNX) give the float64
    reference's CIELAB, dark pixels (linear segment) and the gamut's corners included."""
    rng = np.random.default_rng(0)
    corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T
    rgb = np.concatenate([rng.random((500, 3)), rng.random((100, 3)) * 0.05, corners])
    lab = linear_rgb_to_lab_torch(srgb_to_linear_torch(torch.tensor(rgb, dtype=torch.float32)))
    np.testing.assert_allclose(lab.numpy(), srgb_to_lab(rgb), atol=2e-3)
