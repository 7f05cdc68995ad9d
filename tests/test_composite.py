"""Compositing augmentation and down-up-scaling (beautytag.composite, training.augment), on
synthetic photos: no real photos needed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from beautytag.composite import (
    BACKGROUNDS,
    CompositeParams,
    background_pool,
    composite_batch,
    content_box,
    down_up_batch,
    finger,
    foreground_alpha,
    procedural,
)
from beautytag.config import config_from_dict
from beautytag.data import augment_batch
from beautytag.schema import SchemaError
from beautytag.training.augment import BatchAugment

SIZE = 64


def packshot(colour=(200, 40, 90), textured: bool = False, seed: int = 0) -> np.ndarray:
    """A 64 x 64 product (a 20 x 30 box, with a white label inside) on a slightly noisy
    white background, and where the product is."""
    rng = np.random.default_rng(seed)
    img = rng.integers(246, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    product = np.zeros((SIZE, SIZE), bool)
    product[20:50, 22:42] = True
    img[product] = colour
    if textured:  # every product pixel its own value
        img[product] = rng.integers(0, 200, (int(product.sum()), 3))
    img[30:34, 28:34] = 255  # a white label: inside the product, so part of it
    return img, product


def photo(seed: int = 0) -> np.ndarray:
    """A 64 x 64 photo with no white background: smooth colour noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 200, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def batch(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) and the alphas (B, H, W) of foreground_alpha (zero: none)."""
    alphas = [foreground_alpha(img) for img in images]
    alpha = [a if a is not None else np.zeros((SIZE, SIZE), np.uint8) for a in alphas]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(alpha))


def test_a_product_on_white_is_a_packshot_with_its_mask():
    img, product = packshot()
    alpha = foreground_alpha(img)
    assert alpha is not None
    assert np.array_equal(alpha > 0, product)  # the white label inside stays product
    assert (alpha[product] == 255).all()  # a plain colour's edge is all product


def test_a_photo_without_white_background_or_with_a_speck_of_product_is_not_a_packshot():
    assert foreground_alpha(photo()) is None
    speck = np.full((SIZE, SIZE, 3), 255, np.uint8)
    speck[30:33, 30:33] = (200, 40, 90)  # 0.2 % of the photo
    assert foreground_alpha(speck) is None


def test_a_letterboxed_photo_is_not_a_packshot_for_its_white_bands():
    wide = np.asarray(Image.fromarray(photo()).resize((SIZE, 40)))  # a 64 x 40 photo
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    top, left, h, w = content_box(SIZE, 40, SIZE)
    assert (top, left, h, w) == (12, 0, 40, 64)
    img[top : top + h, left : left + w] = wide
    assert foreground_alpha(img) is not None  # the bands alone look like a white background
    assert foreground_alpha(img, (top, left, h, w)) is None  # inside its box, a photo
    inner, product = packshot()
    img[top : top + h] = inner[12:52]
    alpha = foreground_alpha(img, (top, left, h, w))
    assert alpha is not None and np.array_equal(alpha > 0, product)


def test_an_edge_pixel_mixed_with_white_gets_its_share_as_alpha():
    img, product = packshot(colour=(55, 55, 55))
    img[20:50, 21] = 155  # half the product's darkness: half product, half white
    alpha = foreground_alpha(img)
    assert alpha is not None and (np.abs(alpha[20:50, 21].astype(int) - 128) <= 3).all()
    # pasted, the white is taken out of it: against the same paste of an all-white photo
    # (same alpha, same background), the edge is darker by half the product's darkness
    a = torch.from_numpy(alpha)[None]
    pasted = []
    for pixels in (img, np.full_like(img, 255)):
        torch.manual_seed(0)
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        pasted.append(composite_batch(x, a, torch.zeros(1), 1.0, None, CompositeParams.identity()))
    (out, _), (white, _) = pasted
    darker = out[0, :, 20:50, 21] - white[0, :, 20:50, 21]  # without unmixing: -50
    assert torch.allclose(darker, torch.tensor(-100.0), atol=2)


def test_with_identity_geometry_the_product_keeps_its_pixels_and_the_background_changes():
    images = [packshot(textured=True, seed=i)[0] for i in range(6)]
    x, alpha = batch(images)
    torch.manual_seed(0)
    out, done = composite_batch(x, alpha, torch.zeros(6), 1.0, None, CompositeParams.identity())
    assert done.all()
    inside = (alpha == 255)[:, None].expand_as(x)
    assert torch.equal(out.round()[inside], x.float()[inside])
    outside = (alpha == 0)[:, None].expand_as(x)
    changed = ((out - x.float()).abs() > 1) & outside
    share = changed.flatten(1).sum(1) / outside.flatten(1).sum(1)
    assert (share > 0.5).all(), share  # every photo got a new background


def test_photos_that_are_not_packshots_pass_through_compositing_unchanged():
    x, alpha = batch([packshot()[0], photo(1), packshot(seed=2)[0], photo(3)])
    torch.manual_seed(0)
    out, done = composite_batch(x, alpha, torch.zeros(4), 1.0)
    assert done.tolist() == [True, False, True, False]
    assert torch.equal(out[[1, 3]], x[[1, 3]].float())
    assert not torch.equal(out[[0, 2]], x[[0, 2]].float())
    out, done = composite_batch(x, alpha, torch.zeros(4), 0.0)  # p = 0: nothing
    assert not done.any() and torch.equal(out, x.float())


def test_a_pasted_product_keeps_its_colour_at_any_scale_and_angle():
    x, alpha = batch([packshot(colour=(200, 40, 90))[0]] * 8)
    params = CompositeParams(clutter=0, occlusion=0.0, blur=0.0, noise=0.0, jpeg=0.0)
    torch.manual_seed(0)
    out, _ = composite_batch(x, alpha, torch.zeros(8), 1.0, None, params)
    colour = torch.tensor([200.0, 40, 90]).view(1, 3, 1, 1)
    exact = ((out - colour).abs() < 1).all(1).flatten(1).sum(1)
    smallest = (0.35 * SIZE) ** 2 * (20 / 30) * 0.5  # the product at its smallest, less edges
    assert (exact > smallest).all(), exact


def test_clutter_comes_from_packshots_of_the_same_source_only():
    red, blue, green = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    x, alpha = batch([packshot(colour=c)[0] for c in (red, blue, green)])
    source = torch.tensor([0, 0, 1])
    params = CompositeParams(clutter=2, occlusion=0.0, blur=0.0, noise=0.0, jpeg=0.0)

    def has(image: torch.Tensor, colour: tuple) -> bool:
        return bool(((image - torch.tensor(colour).view(3, 1, 1)).abs() < 3).all(0).sum() > 4)

    red_got_blue = False
    for seed in range(12):
        torch.manual_seed(seed)
        out, _ = composite_batch(x, alpha, source, 1.0, None, params)
        assert not has(out[2], red) and not has(out[2], blue)  # its source's only packshot
        red_got_blue |= has(out[0], blue)
    assert red_got_blue


def test_a_finger_covers_at_most_its_share_of_the_product():
    alpha = torch.zeros(16, 1, SIZE, SIZE)
    alpha[:, :, 16:48, 24:40] = 1
    torch.manual_seed(0)
    shape, pixels = finger(alpha, 0.2)
    cover = (shape * alpha).sum((1, 2, 3)) / alpha.sum((1, 2, 3))
    assert (cover <= 0.2).all() and (cover > 0.01).sum() >= 8
    assert pixels.shape == (16, 3, SIZE, SIZE) and 0 <= pixels.min() and pixels.max() <= 300


@pytest.mark.parametrize("kind", [k for k in BACKGROUNDS if k != "photo"])
def test_every_procedural_background_is_in_range_and_varies(kind):
    torch.manual_seed(0)
    bg = procedural(kind, 6, SIZE, torch.device("cpu")).clamp(0, 255)
    assert bg.shape == (6, 3, SIZE, SIZE) and torch.isfinite(bg).all()
    assert (bg.flatten(1).std(1) > 1).all()  # a texture, not a flat fill
    assert (bg.mean((1, 2, 3)).std() > 5) or kind == "skin"  # photos differ from each other


def test_real_backgrounds_are_photos_that_are_not_packshots_without_their_white_bands():
    pixels = np.full((3, SIZE, SIZE, 3), 255, np.uint8)
    pixels[0, 12:52] = (30, 140, 60)  # a letterboxed wide photo
    pixels[1] = packshot()[0]
    pixels[2] = photo()
    boxes = np.array([[12, 0, 40, 64], [0, 0, 64, 64], [0, 0, 64, 64]])
    pool = background_pool(pixels, boxes, np.array([True, False, True]))
    assert pool.shape == (2, 3, SIZE, SIZE)
    assert (pool[0].float() - torch.tensor([30.0, 140, 60]).view(3, 1, 1)).abs().max() <= 1
    assert torch.equal(pool[1], torch.from_numpy(pixels[2]).permute(2, 0, 1))


def test_down_up_keeps_the_mean_colour_and_takes_the_fine_detail():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, SIZE, SIZE, generator=g) * 120 + 60
    x[:, :, ::2] += 40  # stripes: high frequencies
    torch.manual_seed(0)
    y = down_up_batch(x, 1.0)
    assert (y.mean((2, 3)) - x.mean((2, 3))).abs().max() < 1.5

    def fine(t):  # energy of the Laplacian
        lap = 4 * t[..., 1:-1, 1:-1] - t[..., :-2, 1:-1] - t[..., 2:, 1:-1]
        return (lap - t[..., 1:-1, :-2] - t[..., 1:-1, 2:]).pow(2).mean((1, 2, 3))

    assert (fine(y) < 0.2 * fine(x)).all()
    assert torch.equal(down_up_batch(x, 0.0), x)


def test_batch_augment_with_both_keys_off_is_the_geometric_augmentation_alone(raw_config):
    cfg = config_from_dict(raw_config)
    x, alpha = batch([packshot()[0], photo()])
    extra = {"alpha": alpha, "source": torch.zeros(2, dtype=torch.long)}

    class Dataset:  # what BatchAugment reads of a BeautyDataset
        pixels = x.permute(0, 2, 3, 1).numpy()
        boxes = np.array([[0, 0, SIZE, SIZE]] * 2)

        def packshots(self):
            return np.array([True, False])

    torch.manual_seed(3)
    plain = augment_batch(x)
    torch.manual_seed(3)
    assert torch.equal(BatchAugment(cfg, Dataset(), torch.device("cpu"))(x, extra), plain)
    cfg.data.composite = cfg.data.downscale = 1.0
    torch.manual_seed(3)
    both = BatchAugment(cfg, Dataset(), torch.device("cpu"))(x, extra)
    assert both.shape == x.shape and not torch.equal(both, plain)


@pytest.mark.parametrize("key", ["composite", "downscale"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probabilities_out_of_range_are_errors_naming_the_key(raw_config, key, value):
    raw_config["data"][key] = value
    with pytest.raises(SchemaError, match=rf"data\.{key} must be in \[0, 1\]"):
        config_from_dict(raw_config)
    raw_config["data"][key] = 1
    assert getattr(config_from_dict(raw_config).data, key) == 1.0


def test_training_with_compositing_and_down_up_scaling(tmp_path):
    from beautytag.training.train import read_datasets, train

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(16):
        split = "train" if i < 12 else "val"
        img = packshot(colour=(40 * (i % 6), 90, 160), seed=i)[0] if i % 2 else photo(i)
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{('Lipstick', 'Mascara')[i % 2]},{split}")
    (folder / "labels.csv").write_text("file_name,category,split\n" + "\n".join(rows) + "\n")
    attribute = {"name": "category", "kind": "single", "classes": ["Lipstick", "Mascara"]}
    cfg = config_from_dict(
        {
            "model": {"weights": "none", "attention": "none", "image_size": 32},
            "attributes": [attribute | {"sources": {"mine": {"column": "category"}}}],
            "data": {
                "root": str(tmp_path),
                "sources": [{"name": "mine", "path": "photos"}],
                "composite": 1.0,
                "downscale": 1.0,
            },
            "train": {"epochs": 1, "freeze_epochs": 0, "batch_size": 4, "out_dir": str(tmp_path)},
        }
    )
    train_ds, val_ds = read_datasets(cfg)
    assert train_ds.packshots().tolist() == [False, True] * 6  # the odd photos
    assert len(train_ds[0]) == 4 and len(val_ds[0]) == 3  # alphas for training only
    train(cfg, progress=False)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_loss"] > 0 and np.isfinite(record["val_loss"])
