"""Finding the product at test time (beautytag.runtime.crop): the box through the letterbox,
the skip rule, the combined answer, ``predict --crop``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from beautytag.cli import main
from beautytag.images import letterbox, load_image
from beautytag.runtime import crop
from beautytag.runtime.engine import Engine

SQUARE = (1500, 250, 1620, 370)  # a red square, left top right bottom, on a 1800 x 1000 photo


def photo_with_square(size=(1800, 1000), square=SQUARE, seed=0) -> Image.Image:
    """A noisy light canvas with a red square."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(200, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    img.paste((220, 10, 20), square)
    return img


def redness(img: Image.Image, size: int) -> np.ndarray:
    """A stand-in for a class-activation map: how red each pixel of the letterboxed input is."""
    x = np.asarray(letterbox(img, size), dtype=np.float32)
    return np.clip(x[..., 0] - x[..., 1], 0, None)


def red_box(img: Image.Image) -> tuple[int, int, int, int]:
    """The bounding box of the strongly red pixels of `img`."""
    x = np.asarray(img, dtype=np.int16)
    ys, xs = np.nonzero((x[..., 0] > 150) & (x[..., 1] < 80))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize(
    "size, square", [((1800, 1000), SQUARE), ((700, 1600), (60, 1300, 150, 1390))]
)
def test_box_maps_back_through_the_letterbox_to_the_product(size, square):
    img = photo_with_square(size, square)
    box = crop.product_box(redness(img, 96), img.size)
    left, top, right, bottom = box
    assert right - left == pytest.approx(bottom - top)  # squared
    assert left <= square[0] and top <= square[1] and right >= square[2] and bottom >= square[3]
    assert (right - left) * (bottom - top) < 0.05 * size[0] * size[1]  # far smaller than the photo
    assert crop.worth_cropping(box, img.size)
    # the model's input for the crop: the whole square, letterboxed large
    x = crop.crop_input(img, box, 96, [0, 0, 0], [1 / 255] * 3)
    patch = Image.fromarray(x.permute(1, 2, 0).numpy().round().clip(0, 255).astype(np.uint8))
    l2, t2, r2, b2 = red_box(patch)
    assert r2 - l2 > 40 and b2 - t2 > 40  # the 120 px square fills half the input, not 6 px
    assert 0 < l2 and 0 < t2 and r2 < 96 and b2 < 96  # whole, with a margin around it


def test_crop_decodes_a_reduced_jpeg_again_at_the_scale_the_crop_needs(tmp_path):
    path = tmp_path / "big.jpg"
    photo_with_square().save(path, quality=95)
    small = load_image(path, min_size=96)  # as the engine decodes it: 1/8 scale
    assert small.width < 300
    box = crop.product_box(redness(small, 96), small.size)
    across = box[2] - box[0]
    assert across < 96  # too few pixels in the reduced photo
    x_again = crop.crop_input(small, box, 96, [0, 0, 0], [1 / 255] * 3, source=path)
    x_small = crop.crop_input(small, box, 96, [0, 0, 0], [1 / 255] * 3)
    edges = [float(torch.diff(x, dim=2).abs().mean()) for x in (x_again, x_small)]
    assert edges[0] > 1.5 * edges[1]  # the canvas's noise is back: decoded at a larger scale


def test_square_box_grows_squares_and_stays_inside_the_photo():
    assert crop.square_box((10, 10, 30, 20), (100, 100), margin=0.5) == (0, 0, 40, 40)
    assert crop.square_box((40, 40, 60, 50), (100, 100), margin=0.0) == (40, 35, 60, 55)
    left, top, right, bottom = crop.square_box((0, 0, 100, 30), (100, 40), margin=0.15)
    assert (left, top, right, bottom) == (0, 0, 100, 40)  # cut to the photo, not past it


def test_skip_rule_and_flat_map():
    assert crop.worth_cropping((0, 0, 80, 100), (100, 100))
    assert not crop.worth_cropping((0, 0, 81, 100), (100, 100))  # over 80 % of the photo
    assert not crop.worth_cropping(None, (100, 100))
    assert crop.product_box(np.ones((64, 64)), (300, 200)) is None  # a flat map: no box


class NotLinear(torch.nn.Module):
    """A linear head in the form of the colour heads (feature map, embedding, input)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, fmap, emb, x):
        return self.linear(emb)


def test_activation_pass_is_the_class_activation_map_and_the_backend_outputs(tiny_model):
    engine = Engine(tiny_model)
    model = engine.model
    x = torch.stack([engine.load(photo_with_square(seed=s))[1] for s in range(2)])
    probs, cam = crop.activation_pass(model, x)
    expected = engine.backend(x)
    assert probs.keys() == expected.keys()
    for k in probs:
        torch.testing.assert_close(probs[k], expected[k])
    assert cam.shape == (2, 64, 64) and (cam >= 0).all() and (cam.flatten(1).amax(1) > 0).all()
    # Grad-CAM, for a head that is not linear, is the same map up to a scale
    linear = model.heads["category"]
    model.heads["category"] = NotLinear(linear)
    try:
        probs_g, cam_g = crop.activation_pass(model, x)
    finally:
        model.heads["category"] = linear
    torch.testing.assert_close(probs_g["category"], probs["category"])
    scale = cam.flatten(1).amax(1) / cam_g.flatten(1).amax(1)  # Grad-CAM: 1/(h*w) of it
    torch.testing.assert_close(cam_g * scale[:, None, None], cam, rtol=1e-4, atol=1e-5)


def test_combined_answers_are_the_mean_of_the_two_views_and_a_distribution(tiny_model):
    engine = Engine(tiny_model)
    cropper = crop.Cropper(engine)
    img = photo_with_square()
    x = engine.load(img)[1][None]
    box = (1400.0, 150.0, 1720.0, 470.0)
    whole, _, _ = cropper.views(x, [(img, None, None)])
    one = {k: v[0] for k, v in whole.items()}
    xc = crop.crop_input(img, box, 64, engine.cfg.model.mean, engine.cfg.model.std)
    other = {k: v[0] for k, v in engine.backend(xc[None]).items()}
    mixed = crop.combine(one, other, engine.schema)
    for a in engine.schema.attributes:
        if a.kind == "single":
            assert float(mixed[a.name].sum()) == pytest.approx(1.0, abs=1e-5)
            assert (mixed[a.name] >= 0).all()
            torch.testing.assert_close(mixed[a.name], (one[a.name] + other[a.name]) / 2)
        elif a.kind == "multi":
            assert ((mixed[a.name] >= 0) & (mixed[a.name] <= 1)).all()
        else:
            torch.testing.assert_close(mixed[a.name], one[a.name])  # the whole photo's shade
    assert not torch.equal(mixed["category"], one["category"])


def test_engine_crop_skips_the_second_pass_when_the_box_is_most_of_the_photo(
    tiny_model, monkeypatch
):
    img = photo_with_square((600, 400), (450, 80, 510, 140))
    plain = next(Engine(tiny_model).predict_items([("p", img)])).to_dict()
    engine = Engine(tiny_model, crop=True)
    calls = []
    backend = engine.backend

    def counting(x):
        calls.append(len(x))
        return backend(x)

    monkeypatch.setattr(engine, "backend", counting)
    monkeypatch.setattr(crop, "product_box", lambda cam, size, *a: (0, 0, size[0], size[1] * 0.9))
    assert next(engine.predict_items([("p", img)])).to_dict() == plain  # the whole photo's
    assert calls == []
    monkeypatch.setattr(crop, "product_box", lambda cam, size, *a: (420, 50, 540, 170))
    cropped = next(engine.predict_items([("p", img)])).to_dict()
    assert calls == [1] and cropped != plain
    assert cropped["attributes"]["shade"] == plain["attributes"]["shade"]


def test_predict_crop_end_to_end(tiny_model, tmp_path, capsys, monkeypatch):
    def around_the_square(cam, size, *args):  # a random model's map is anywhere: the box
        return size[0] * 1400 / 1800, size[1] * 150 / 1000, size[0] * 0.95, size[1] * 0.47

    monkeypatch.setattr(crop, "product_box", around_the_square)
    photo_with_square().save(tmp_path / "square.jpg")
    Image.new("RGB", (80, 60), (30, 200, 60)).save(tmp_path / "small.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    photos = [str(tmp_path / n) for n in ("square.jpg", "bad.jpg", "small.png")]
    assert main(["predict", "--model", str(tiny_model), "--crop", *photos]) == 1
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in out] == photos
    assert out[1]["attributes"] is None and "not an image" in out[1]["error"]
    for r in (out[0], out[2]):
        top = r["attributes"]["category"]["top"]
        assert 0 < sum(s for _, s in top) <= 1.0001 and top == sorted(top, key=lambda t: -t[1])
    assert main(["predict", "--model", str(tiny_model), photos[0]]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["attributes"]["shade"] == out[0]["attributes"]["shade"]
    assert plain["attributes"]["category"] != out[0]["attributes"]["category"]  # two views
    assert main(["predict", "--model", str(tiny_model), "--crop", "--tta-flip", photos[0]]) == 0
    both = json.loads(capsys.readouterr().out)["attributes"]
    assert both["category"] not in (
        plain["attributes"]["category"],
        out[0]["attributes"]["category"],
    )


def test_crop_needs_the_pytorch_model(tiny_model):
    with pytest.raises(ValueError, match="torch backend"):
        Engine(tiny_model, backend="onnxruntime", crop=True)
