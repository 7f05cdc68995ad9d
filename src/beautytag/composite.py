"""Compositing augmentation ("cut, paste and learn", Dwibedi et al. 2017) and down-up-scaling.

A catalogue packshot is cut from its white background (the near-white region connected to
the border, :func:`foreground_alpha`) and pasted at a random scale, place, rotation and
perspective onto a varied background (procedural textures, skin, blurred crops of real
photos), with other products as clutter behind it, sometimes a finger over it, then blur,
noise and JPEG (:func:`composite_batch`). The pasted product keeps its own pixels: nothing
changes its colour, lighting or white balance, so colour and shade labels stay true.
:func:`down_up_batch` closes the gap between blurry thumbnails and sharp phone photos.
Everything works per batch on the training device, drawing from torch's global RNG.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

WHITE = 236  # near white: every channel at least this bright ...
MAX_CHROMA = 24  # ... and channels at most this far apart
MIN_BACKGROUND = 0.15  # a packshot: at least this share of its photo is white background
MIN_PRODUCT = 0.05  # ... and at least this share is product
MIN_BORDER = 0.5  # ... and its border is mostly background (not a collage on white)
MIN_PART = 0.002  # product specks smaller than this share of the photo are dropped
# skin tones (RGB) from light to deep, for skin backgrounds and fingers
SKIN = ((247, 224, 205), (236, 200, 170), (224, 178, 140), (198, 143, 104), (164, 110, 76),
        (125, 80, 54), (90, 56, 38), (232, 190, 172))  # fmt: skip
BACKGROUNDS = ("noise", "marble", "fabric", "wood", "gradient", "skin", "photo")


@dataclass(frozen=True)
class CompositeParams:
    """How a packshot is pasted; the defaults are the training's."""

    scale: tuple[float, float] | None = (0.35, 0.9)  # product's longer side / photo side
    degrees: float = 30.0  # rotation, either way
    perspective: float = 0.25  # projective tilt, in normalised coordinates
    flip: float = 0.5  # probability of a mirror image
    clutter: int = 2  # at most this many other products behind, from the same source
    occlusion: float = 0.25  # probability of a finger covering some of the product ...
    max_occlusion: float = 0.2  # ... at most this share of it
    blur: float = 0.25  # probabilities of a Gaussian blur, noise and JPEG
    noise: float = 0.25
    jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 90)

    @classmethod
    def identity(cls) -> CompositeParams:
        """The product stays where it is, as it is: only its background changes."""
        return cls(None, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)


def content_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a width x height photo inside its letterbox of `size`
    (as :func:`beautytag.images.letterbox` places it)."""
    scale = size / max(width, height)
    w, h = min(size, max(1, round(width * scale))), min(size, max(1, round(height * scale)))
    return (size - h) // 2, (size - w) // 2, h, w


def foreground_alpha(
    pixels: np.ndarray, box: tuple[int, int, int, int] | None = None
) -> np.ndarray | None:
    """The product's alpha (uint8 H x W, 255 inside, softer on its edge) of a packshot on
    white, or None when the photo is not one. The background is the near-white region
    connected to the border of `box` (the photo inside its letterbox; all of it if None);
    the letterbox around `box` is background too. A packshot has at least MIN_BACKGROUND of
    background, MIN_PRODUCT of product, and MIN_BORDER of its border is background. An
    edge pixel, a mix of product and white, gets the product's share as its alpha, so that
    pasting can take the white out (no halo)."""
    from scipy import ndimage  # here: core modules import fast

    top, left, h, w = box or (0, 0, *pixels.shape[:2])
    img = pixels[top : top + h, left : left + w].astype(np.float32)
    lo, hi = img.min(-1), img.max(-1)
    labels, _ = ndimage.label((lo >= WHITE) & (hi - lo <= MAX_CHROMA))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    product = ~np.isin(labels, edge[edge > 0])
    parts, n = ndimage.label(product)
    if n:
        sizes = ndimage.sum_labels(product, parts, np.arange(1, n + 1))
        product = np.concatenate([[False], sizes >= MIN_PART * h * w])[parts]
    share = product.mean()
    border = np.concatenate([product[0], product[-1], product[:, 0], product[:, -1]])
    if share < MIN_PRODUCT or share > 1 - MIN_BACKGROUND or border.mean() > 1 - MIN_BORDER:
        return None
    # an edge pixel is a mix a * product + (1 - a) * white: a from its neighbours inside
    core = ndimage.binary_erosion(product)
    near = ndimage.uniform_filter(core.astype(np.float32), 5)
    inner = (
        ndimage.uniform_filter(img * core[..., None], (5, 5, 1)) / np.maximum(near, 1e-6)[..., None]
    )
    depth = (255 - inner).sum(-1)  # how far the product nearby is from white
    ok = product & ~core & (near > 0.01) & (depth > 40)
    soft = np.where(ok, np.clip((255 - img).sum(-1) / np.maximum(depth, 1), 0, 1), 1.0)
    soft = np.where(product, soft, 0.0)
    out = np.zeros(pixels.shape[:2], np.uint8)
    out[top : top + h, left : left + w] = np.round(soft * 255).astype(np.uint8)
    return out


def background_pool(
    pixels: np.ndarray, boxes: np.ndarray, usable: np.ndarray, n: int = 256
) -> torch.Tensor:
    """Up to `n` photos (uint8 N x 3 x H x W) for real backgrounds: of the photos that are
    `usable` (not packshots), evenly spread, each its largest centred square inside its
    letterbox, resized to the full size."""
    idx = np.flatnonzero(usable)
    idx = idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).astype(int)] if len(idx) else idx
    size = pixels.shape[1]
    out = []
    for i in idx:
        top, left, h, w = (int(v) for v in boxes[i])
        side = min(h, w)
        y, x = top + (h - side) // 2, left + (w - side) // 2
        crop = torch.from_numpy(pixels[i, y : y + side, x : x + side]).permute(2, 0, 1)
        out.append(F.interpolate(crop[None].float(), size=(size, size), mode="bilinear")[0])
    if not out:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV (each (n,) in 0..1) -> RGB (n, 3) in 0..255."""
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device) + h[:, None] * 6) % 6
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return 255 * (v[:, None] - v[:, None] * s[:, None] * ramp)


def random_colour(n: int, device: torch.device, sat: float = 0.6) -> torch.Tensor:
    """(n, 3) colours of interiors and props: any hue, mostly muted, mid to light."""
    dev = device
    return hsv(torch.rand(n, device=dev), torch.rand(n, device=dev) ** 1.5 * sat,
               uniform(n, 0.25, 1.0, dev) ** 0.7)  # fmt: skip


def skin_colour(n: int, device: torch.device) -> torch.Tensor:
    """(n, 3) skin tones, a little apart from the palette's."""
    palette = torch.tensor(SKIN, dtype=torch.float32, device=device)
    pick = palette[torch.randint(len(SKIN), (n,), device=device)]
    return pick * uniform(n, 0.9, 1.08, device)[:, None] + torch.randn(n, 3, device=device) * 4


def smooth_noise(n: int, size: int, device: torch.device, cells: tuple = (3, 6, 12, 24)):
    """(n, 1, size, size) fractal value noise, about zero mean and unit spread (made at two
    pixels a cell of the finest octave, then scaled up: it is smooth below that)."""
    work = min(size, 2 * max(cells))
    out = torch.zeros(n, 1, work, work, device=device)
    for c in cells:
        grid = torch.randn(n, 1, c, c, device=device)
        out += F.interpolate(grid, size=(work, work), mode="bicubic", align_corners=False) / c**0.7
    out = (out - out.mean((2, 3), keepdim=True)) / out.std((2, 3), keepdim=True).clamp_min(1e-6)
    return F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)


def coords(n: int, size: int, device: torch.device, angle: torch.Tensor | None = None):
    """(x, y), each (n, 1, size, size) in -1..1, rotated by `angle` (n,) if given."""
    t = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1
    y, x = torch.meshgrid(t, t, indexing="ij")
    x, y = x.expand(n, 1, size, size), y.expand(n, 1, size, size)
    if angle is None:
        return x, y
    c, s = torch.cos(angle).view(n, 1, 1, 1), torch.sin(angle).view(n, 1, 1, 1)
    return c * x - s * y, s * x + c * y


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Colours a, b (n, 3) mixed by t (n, 1, H, W) -> (n, 3, H, W)."""
    return a[:, :, None, None] + (b - a)[:, :, None, None] * t


def procedural(kind: str, n: int, size: int, device: torch.device) -> torch.Tensor:
    """(n, 3, size, size) float backgrounds of one kind (not "photo")."""
    dev, angle = device, torch.rand(n, device=device) * math.pi
    col = lambda v: v.view(n, 1, 1, 1)  # noqa: E731
    if kind == "noise":  # cloudy surfaces: plaster, paper, stone
        t = torch.sigmoid(smooth_noise(n, size, dev) * col(uniform(n, 0.5, 2.0, dev)))
        return lerp(random_colour(n, dev), random_colour(n, dev), t)
    if kind == "marble":  # a light or dark stone with a few winding veins
        x, _ = coords(n, size, dev, angle)
        turb = smooth_noise(n, size, dev, (2, 4, 8)) * col(uniform(n, 1.0, 2.5, dev))
        wave = torch.sin(x * col(uniform(n, 1.5, 4.5, dev)) * math.pi + turb)
        vein = (1 - wave.abs()) ** col(uniform(n, 10, 40, dev))
        vein = vein * torch.sigmoid(smooth_noise(n, size, dev, (3, 6)) * 2 + 1)  # fading
        dark = torch.rand(n, device=dev) < 0.3
        base = torch.where(dark[:, None], random_colour(n, dev, 0.2) * 0.3,
                           hsv(uniform(n, 0.05, 0.15, dev), uniform(n, 0, 0.12, dev),
                               uniform(n, 0.82, 0.98, dev)))  # fmt: skip
        veins = torch.where(dark[:, None], hsv(uniform(n, 0.08, 0.14, dev),
                            uniform(n, 0.2, 0.6, dev), uniform(n, 0.6, 0.9, dev)),
                            base * uniform(n, 0.45, 0.8, dev)[:, None])  # fmt: skip
        cloud = 1 + 0.04 * smooth_noise(n, size, dev)
        return lerp(base, veins, vein) * cloud
    if kind == "fabric":  # a woven cloth: crossing threads and uneven yarn
        x, y = coords(n, size, dev, angle * 0.2)
        f = col(uniform(n, 40, 90, dev))
        weave = torch.sin(x * f) * torch.sin(y * f)
        yarn = F.interpolate(torch.randn(n, 1, size // 2, 1, device=dev), (size, size))
        t = 0.6 + 0.15 * weave + 0.06 * yarn + 0.1 * smooth_noise(n, size, dev, (3, 6))
        c = random_colour(n, dev, 0.7)
        return lerp(c * 0.7, c, t.clamp(0, 1.2))
    if kind == "wood":  # planks: long, slightly wavy stripes of uneven width
        x, y = coords(n, size, dev, angle)
        bend = smooth_noise(n, size, dev, (2, 3)) * 0.06 + 0.03 * torch.sin(y * 3)
        rings = 0.5 + 0.5 * torch.sin((x + bend) * col(uniform(n, 6, 18, dev)))
        grain = 0.5 + 0.5 * torch.sin((x + 0.5 * bend) * col(uniform(n, 60, 120, dev)))
        t = 0.6 * rings**3 + 0.25 * grain + 0.15 * torch.sigmoid(smooth_noise(n, size, dev))
        light = hsv(uniform(n, 0.05, 0.1, dev), uniform(n, 0.3, 0.65, dev),
                    uniform(n, 0.45, 0.9, dev))  # fmt: skip
        return lerp(light, light * uniform(n, 0.55, 0.8, dev)[:, None], t)
    if kind == "gradient":  # a studio sweep or a wall in soft light
        x, _ = coords(n, size, dev, angle * 2)
        t = (0.5 + x * col(uniform(n, 0.2, 0.6, dev))).clamp(0, 1)
        return lerp(random_colour(n, dev), random_colour(n, dev), t)
    if kind == "skin":  # a hand or an arm, close up
        shade = 1 + 0.05 * smooth_noise(n, size, dev, (2, 4, 8))
        x, _ = coords(n, size, dev, angle * 2)
        return skin_colour(n, dev)[:, :, None, None] * shade * (1 - 0.08 * x.clamp(0, 1))
    raise ValueError(f"unknown background {kind!r}")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """x (n, C, H, W) float, each blurred by its own sigma (n,) in pixels (at most
    `max_sigma`: the kernel's radius, fixed so that nothing waits for the device)."""
    n, c, h, w = x.shape
    r = max(1, min(math.ceil(3 * max_sigma), min(h, w) // 2 - 1))
    k = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    wgt = torch.exp(-(k**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    wgt = (wgt / wgt.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, wgt.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(y, wgt.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)


def photo_backgrounds(pool: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size): blurred random crops (35-80 % of the side) of `pool` photos."""
    dev = pool.device
    pick = torch.randint(len(pool), (n,), device=dev)
    side = uniform(n, 0.35, 0.8, dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = side * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    theta[:, 1, 1] = side
    theta[:, :, 2] = (torch.rand(n, 2, device=dev) * 2 - 1) * (1 - side)[:, None]
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    crops = F.grid_sample(pool[pick].float(), grid, align_corners=False)
    return gaussian_blur(crops, uniform(n, 0.012, 0.035, dev) * size, 0.035 * size)


def backgrounds(n: int, size: int, device: torch.device, pool: torch.Tensor | None):
    """(n, 3, size, size) float backgrounds, each of a random kind of BACKGROUNDS (not
    "photo" without a pool)."""
    kinds = BACKGROUNDS if pool is not None and len(pool) else BACKGROUNDS[:-1]
    kind = torch.randint(len(kinds), (n,), device=device)
    out = torch.empty(n, 3, size, size, device=device)
    for i, name in enumerate(kinds):
        rows = (kind == i).nonzero().squeeze(1)
        if len(rows):
            m = len(rows)
            out[rows] = (
                photo_backgrounds(pool, m, size) if name == "photo"  # type: ignore[arg-type]
                else procedural(name, m, size, device)
            )  # fmt: skip
    return out.clamp(0, 255)


def placement_grid(
    alpha: torch.Tensor,
    scale: torch.Tensor | None,
    centre: torch.Tensor | None,
    angle: torch.Tensor,
    flip: torch.Tensor,
    tilt: torch.Tensor,
) -> torch.Tensor:
    """The grid_sample grid (n, H, W, 2) that pastes each product (its alpha (n, H, W)):
    its bounding box's longer side to `scale` (n,) of the photo's side, centred on `centre`
    (n, 2) in -1..1, turned by `angle`, mirrored where `flip` is -1 and tilted in
    perspective by `tilt` (n, 2). scale None: the product keeps its size and place."""
    n, size, dev = alpha.shape[0], alpha.shape[-1], alpha.device
    idx = torch.arange(size, device=dev)
    rows, cols = alpha.amax(2) > 0, alpha.amax(1) > 0
    lo = lambda m: torch.where(m, idx, size).amin(1)  # noqa: E731
    hi = lambda m: torch.where(m, idx, -1).amax(1)  # noqa: E731
    x0, x1, y0, y1 = lo(cols), hi(cols), lo(rows), hi(rows)
    box_centre = torch.stack([(x0 + x1 + 1), (y0 + y1 + 1)], 1).float() / size - 1
    if scale is None:
        zoom, centre = torch.ones(n, device=dev), box_centre
    else:
        side = torch.maximum(x1 - x0 + 1, y1 - y0 + 1).clamp_min(1).float() / size
        zoom = side / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.stack([torch.stack([cos * flip, sin], -1), torch.stack([-sin * flip, cos], -1)], 1)
    m = m * zoom[:, None, None]  # output offset -> source offset
    x, y = coords(n, size, dev)
    d = torch.cat([x, y], 1).permute(0, 2, 3, 1) - centre[:, None, None, :]  # (n, H, W, 2)
    d = d / (1 + (d * tilt[:, None, None, :]).sum(-1, keepdim=True)).clamp_min(0.2)
    return torch.einsum("nij,nhwj->nhwi", m, d) + box_centre[:, None, None, :]


def finger(alpha: torch.Tensor, max_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A finger over each product (alpha (n, 1, H, W) in 0..1), coming from outside and
    covering at most `max_share` of it: (its alpha (n, 1, H, W), its pixels (n, 3, H, W)).
    Where no place covers little enough, its alpha is all zero."""
    n, size, dev = alpha.shape[0], alpha.shape[-1], alpha.device
    x, y = coords(n, size, dev)
    mass = alpha.sum((2, 3)).clamp_min(1e-6)  # (n, 1)
    mx, my = (alpha * x).sum((2, 3)) / mass, (alpha * y).sum((2, 3)) / mass
    radius = (mass * (2 / size) ** 2 / math.pi).sqrt()
    phi = torch.rand(n, 1, device=dev) * 2 * math.pi
    v = lambda t: t.view(n, 1, 1, 1)  # noqa: E731
    dx, dy = v(torch.cos(phi)), v(torch.sin(phi))
    half_w = v((radius * uniform(n, 0.25, 0.45, dev)[:, None]).clamp(0.09, 0.22))
    reach = radius * uniform(n, 0.1, 0.8, dev)[:, None]  # the tip's distance from the centre
    for _ in range(5):  # slide it out until it covers little enough
        tx, ty = x - v(mx + torch.cos(phi) * reach), y - v(my + torch.sin(phi) * reach)
        along, across = tx * dx + ty * dy, ty * dx - tx * dy  # from the tip
        dist = torch.where(along < 0, torch.hypot(along, across), across.abs())  # a capsule
        shape = ((half_w - dist) * size / 2 + 0.5).clamp(0, 1)  # a pixel of soft edge
        cover = (shape * alpha).sum((2, 3)) / mass
        reach = reach + radius * 0.3 * (cover > max_share)
    shape = shape * v(cover <= max_share)
    rounded = (1 - (dist / half_w) ** 2).clamp(0, 1).sqrt()  # a cylinder's light
    skin = skin_colour(n, dev)[:, :, None, None] * (0.7 + 0.3 * rounded)
    nail = (along > 0.15 * half_w) & (along < 1.5 * half_w) & (across.abs() < 0.6 * half_w)
    nail = nail & v(torch.rand(n, device=dev) < 0.5)  # seen from above
    tint = torch.tensor([250.0, 222, 218], device=dev).view(1, 3, 1, 1) * (0.8 + 0.2 * rounded)
    return shape, torch.where(nail, 0.5 * skin + 0.5 * tint, skin)


def degrade(x: torch.Tensor, params: CompositeParams) -> torch.Tensor:
    """Gaussian blur, noise and JPEG, each on a random share of the photos x (n, 3, H, W)."""
    n, size, dev = x.shape[0], x.shape[-1], x.device
    blur = (torch.rand(n, device=dev) < params.blur).nonzero().squeeze(1)
    if len(blur):
        sigma = uniform(len(blur), 0.4, 1.2, dev) * size / 96
        x[blur] = gaussian_blur(x[blur], sigma, 1.2 * size / 96)
    noisy = (torch.rand(n, device=dev) < params.noise).nonzero().squeeze(1)
    if len(noisy):
        sigma = uniform(len(noisy), 2, 8, dev).view(-1, 1, 1, 1)
        x[noisy] = x[noisy] + torch.randn_like(x[noisy]) * sigma
    x = x.clamp(0, 255)
    quality = torch.randint(params.jpeg_quality[0], params.jpeg_quality[1] + 1, (n,))
    for i in (torch.rand(n) < params.jpeg).nonzero().squeeze(1).tolist():
        pixels = x[i].round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        data = io.BytesIO()
        Image.fromarray(pixels).save(data, "JPEG", quality=int(quality[i]))
        decoded = np.asarray(Image.open(data).convert("RGB"))
        x[i] = torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(dev).float()
    return x


def composite_batch(
    x: torch.Tensor,
    alpha: torch.Tensor,
    source: torch.Tensor,
    p: float,
    pool: torch.Tensor | None = None,
    params: CompositeParams = CompositeParams(),  # noqa: B008 (frozen)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite a share `p` of the packshots of a batch x (B, 3, H, W, 0..255), those
    whose alpha (B, H, W, uint8, from :func:`foreground_alpha`) is not empty: each pasted on
    a new background, with up to ``params.clutter`` packshots of the batch from the same
    `source` (B,) behind it. Returns the float batch and which photos were composited; the
    others are as they were."""
    b, size, dev = x.shape[0], x.shape[-1], x.device
    out = x.float()
    eligible = alpha.flatten(1).amax(1) > 0
    chosen = eligible & (torch.rand(b, device=dev) < p)
    rows = chosen.nonzero().squeeze(1)
    n = len(rows)
    if n == 0:
        return out, chosen
    bg = backgrounds(n, size, dev, pool)
    k = params.clutter
    donors = [rows]
    active = [torch.ones(n, dtype=torch.bool, device=dev)]
    if k:
        same = (source[rows][:, None] == source[None, :]) & eligible[None, :]
        same &= torch.arange(b, device=dev)[None, :] != rows[:, None]
        has = same.any(1)
        count = torch.randint(0, k + 1, (n,), device=dev)
        weights = same.float() + (~has)[:, None].float()
        for j in range(k):
            donors.append(torch.multinomial(weights, 1).squeeze(1))
            active.append(has & (count > j))
    src = torch.cat(donors)
    m = len(src)
    a = alpha[src].float()[:, None] / 255
    if params.scale is None:
        scale, centre = None, None
    else:
        main = uniform(n, *params.scale, dev)
        scale = torch.cat([main] + [main * uniform(n, 0.35, 0.7, dev) for _ in range(k)])
        centre = torch.cat(
            [(torch.rand(n, 2, device=dev) * 2 - 1) * (1 - main[:, None])]
            + [torch.rand(n, 2, device=dev) * 2 - 1 for _ in range(k)]
        )
    angle = uniform(m, -1, 1, dev) * math.radians(params.degrees)
    flip = torch.where(torch.rand(m, device=dev) < params.flip, -1.0, 1.0)
    tilt = uniform(2 * m, -1, 1, dev).view(m, 2) * params.perspective
    on = torch.cat(active).nonzero().squeeze(1)  # only the products that are pasted
    sc = None if scale is None else scale[on]
    ce = None if centre is None else centre[on]
    grid = placement_grid(a[on, 0], sc, ce, angle[on], flip[on], tilt[on])
    # premultiplied, the white taken out of the edge pixels (a mix a * product + (1 - a) *
    # white), so that a product's pixels mix only with its own; inside (a = 1) x as it is
    own = (x[src[on]].float() - (1 - a[on]) * 255).clamp_min(0) * (a[on] > 0)
    pasted = torch.zeros(m, 4, size, size, device=dev)
    pasted[on] = F.grid_sample(torch.cat([own, a[on]], 1), grid, align_corners=False)
    pasted = pasted.view(k + 1, n, 4, size, size)
    for j in [*range(1, k + 1), 0]:  # the clutter first, behind
        bg = bg * (1 - pasted[j, :, 3:]) + pasted[j, :, :3]
    held = (torch.rand(n, device=dev) < params.occlusion).nonzero().squeeze(1)
    if len(held):
        shape, skin = finger(pasted[0, held, 3:], params.max_occlusion)
        bg[held] = bg[held] * (1 - shape) + skin * shape
    out[rows] = degrade(bg, params)
    return out, chosen


def down_up(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x (n, C, H, W) float scaled down by `factor` (antialiased) and back up (bilinear)."""
    h, w = x.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    low = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def down_up_batch(x: torch.Tensor, p: float, factors: tuple[float, float] = (1.5, 4.0)):
    """A share `p` of a float batch x (B, 3, H, W) scaled down by a random factor in
    `factors` and back up: blurry thumbnails beside sharp phone photos."""
    b = x.shape[0]
    chosen = torch.rand(b, device=x.device) < p
    factor = torch.empty(b).uniform_(*factors)  # on the CPU: sizes are Python numbers
    out = x.clone()
    for i in chosen.nonzero().squeeze(1).tolist():
        out[i : i + 1] = down_up(x[i : i + 1].float(), float(factor[i]))
    return out
