"""Find the product at test time (``Engine(crop=True)``, ``beautytag predict --crop``): the
whole photo's class-activation map for its top category gives a box around the product; the
photo is cropped there at full resolution, predicted again through the same preprocessing,
and the two views' answers are averaged. At most twice the model's work: a photo whose box
covers most of it gets one pass (with the constants below, 11-30 % of wild-dev's photos got
two). On wild-dev with the shipped models it did not measurably help (crop.md).

Class and tag probabilities are the mean of the two views; the shade is the whole photo's
(the crop's shade was not measured better: see benchmarks/results/crop.md)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from beautytag.config import Config
from beautytag.images import ImageError, load_image, preprocess
from beautytag.nn.net import BeautyTagNet
from beautytag.runtime.explain import activation_map
from beautytag.runtime.results import Answer, Prediction
from beautytag.schema import Schema

# THRESHOLD and MARGIN: the best of a 3 x 3 grid on wild-dev's validation split, mean over
# the shipped models (benchmarks/results/crop.md); a loose box, so a photo is cropped only
# where the product is clearly small in it
THRESHOLD = 0.3  # a map pixel is the product's where it is at least this share of the range
MARGIN = 0.3  # the box grows by this share of its longer side on every side, then squared
MAX_AREA = 0.8  # a box covering more of the photo than this: no second pass

Box = tuple[float, float, float, float]  # left, top, right, bottom, in a photo's pixels
Item = Any  # a photo as the engine takes it: a path, encoded bytes or a PIL image


class EngineLike(Protocol):
    """What :class:`Cropper` uses of a :class:`beautytag.runtime.engine.Engine` (which
    imports this module: no import back)."""

    backend: Any
    cfg: Config
    schema: Schema
    batch_size: int
    tta_flip: bool

    def load(self, item: Item, name: str | None = None) -> tuple[Image.Image, torch.Tensor]: ...

    def describe(self, out: dict[str, torch.Tensor]) -> dict[str, Answer]: ...


@torch.no_grad()
def activation_pass(
    model: BeautyTagNet, x: torch.Tensor, attribute: str = "category"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass of a batch: the activated outputs (float32, on the CPU, as the torch backend
    gives them) and, per image, the class-activation map (B, H, W) at the input's size for
    its top class of `attribute`: ReLU of the head's weights for that class over the
    feature map where the head is linear (on average pooling: what the logit sums), else
    Grad-CAM (the gradient-weighted map, the same for a linear head but slower)."""
    x = x.to(next(model.parameters()).device)
    fmap = model.features(x)
    head = model.heads[attribute]
    if isinstance(head, torch.nn.Linear):
        y, _ = model.forward_from_features(fmap, x)
        weights = head.weight[y[attribute].argmax(1)][:, :, None, None]
    else:
        fmap = fmap.detach().requires_grad_(True)
        with torch.enable_grad():
            y, _ = model.forward_from_features(fmap, x)
            top = y[attribute].argmax(1, keepdim=True)
            (grad,) = torch.autograd.grad(y[attribute].gather(1, top).sum(), fmap)
        y, fmap = {k: v.detach() for k, v in y.items()}, fmap.detach()
        weights = grad.mean((2, 3), keepdim=True)
    cam = activation_map(weights, fmap, x.shape[-2:])
    return {k: v.cpu() for k, v in model.activated(y).items()}, cam[:, 0].cpu()


def content_region(photo_size: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Where :func:`beautytag.images.letterbox` puts a (width, height) photo on its
    `size`-px canvas: (left, top, width, height) in canvas pixels."""
    width, height = photo_size
    scale = size / max(width, height)
    w = min(size, max(1, round(width * scale)))
    h = min(size, max(1, round(height * scale)))
    return (size - w) // 2, (size - h) // 2, w, h


def product_box(
    cam: np.ndarray,
    photo_size: tuple[int, int],
    threshold: float = THRESHOLD,
    margin: float = MARGIN,
) -> Box | None:
    """The box around the product in the photo's pixels, from the map `cam` (H, W) of its
    letterboxed input: the bounding box of the largest 4-connected region where the map,
    inside the photo's part of the canvas, is at least `threshold` of its range, mapped
    back through the letterbox, grown by `margin` and squared (:func:`square_box`). None
    where the map is flat there."""
    left, top, w, h = content_region(photo_size, cam.shape[-1])
    inside = np.asarray(cam, dtype=np.float32)[top : top + h, left : left + w]
    lo, hi = float(inside.min()), float(inside.max())
    if not hi > lo:
        return None
    labels, n = ndimage.label(inside - lo >= threshold * (hi - lo))
    biggest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    ys, xs = np.nonzero(labels == biggest)
    sx, sy = photo_size[0] / w, photo_size[1] / h  # canvas pixel -> photo pixels
    box = (xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy)
    return square_box(box, photo_size, margin)


def square_box(box: Box, photo_size: tuple[int, int], margin: float = MARGIN) -> Box:
    """`box` grown by `margin` of its longer side on every side, made square about its
    centre and moved (not shrunk) to lie inside the photo; a side longer than the photo's
    is cut to the photo."""
    left, top, right, bottom = box
    width, height = photo_size
    side = max(right - left, bottom - top) * (1 + 2 * margin)
    out = []
    for centre, extent in (((left + right) / 2, width), ((top + bottom) / 2, height)):
        s = min(side, extent)
        out.append(min(max(centre - s / 2, 0.0), extent - s))
        out.append(s)
    (x, w), (y, h) = out[:2], out[2:]
    return x, y, x + w, y + h


def worth_cropping(
    box: Box | None, photo_size: tuple[int, int], max_area: float = MAX_AREA
) -> bool:
    """Whether a second pass is worth it: there is a box and it covers at most `max_area`
    of the photo."""
    if box is None:
        return False
    left, top, right, bottom = box
    return (right - left) * (bottom - top) <= max_area * photo_size[0] * photo_size[1]


def crop_input(
    img: Image.Image,
    box: Box,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    source: Item | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """The model input for `box` (in `img`'s pixels) of the photo: cropped and letterboxed
    through :func:`beautytag.images.preprocess`. Where the box has fewer than `size` pixels
    across in `img` (a JPEG decoded at a reduced scale) and the `source` it came from is
    given, the photo is decoded again at the scale the crop needs (full resolution at most)."""
    left, top, right, bottom = box
    across = min(right - left, bottom - top)
    if across < size and source is not None and not isinstance(source, Image.Image):
        need = math.ceil(size * min(img.size) / max(across, 1.0))
        try:
            big = load_image(source, name=name, min_size=need)
        except ImageError:  # changed since: crop what was decoded
            big = img
        if big.width > img.width:
            k = big.width / img.width, big.height / img.height
            box, img = (left * k[0], top * k[1], right * k[0], bottom * k[1]), big
    crop = img.crop(tuple(round(v) for v in box))
    return preprocess(crop, size, mean, std)


def combine(
    whole: dict[str, torch.Tensor], crop: dict[str, torch.Tensor], schema: Schema
) -> dict[str, torch.Tensor]:
    """The two views' outputs as one: class and tag probabilities averaged, the shade the
    whole photo's."""
    return {
        a.name: whole[a.name] if a.kind == "shade" else (whole[a.name] + crop[a.name]) / 2
        for a in schema.attributes
    }


class Cropper:
    """Predicts with an :class:`Engine`'s PyTorch model on the whole photo and on the crop
    around the product, combined (see the module)."""

    def __init__(
        self,
        engine: EngineLike,
        threshold: float = THRESHOLD,
        margin: float = MARGIN,
        max_area: float = MAX_AREA,
    ):
        if getattr(engine.backend, "name", None) != "torch":
            raise ValueError(
                "crop reads the model's feature map: it needs a checkpoint (.pt or a shipped "
                "model) run by the torch backend, not an ONNX or TorchScript model"
            )
        self.engine = engine
        self.model: BeautyTagNet = engine.backend.model
        self.threshold, self.margin, self.max_area = threshold, margin, max_area

    def views(
        self, x: torch.Tensor, photos: Sequence[tuple[Image.Image, Item | None, str | None]]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor] | None], list[Box | None]]:
        """A batch's whole-photo outputs, each photo's crop outputs (None where skipped) and
        its box (in the decoded photo's pixels); `photos`: (decoded photo, source, name)."""
        m = self.engine.cfg.model
        whole, cam = activation_pass(self.model, x)
        if self.engine.tta_flip:
            whole = self._mirror_averaged(whole, x)
        boxes = [
            product_box(c.numpy(), img.size, self.threshold, self.margin)
            for c, (img, _, _) in zip(cam, photos, strict=True)
        ]
        todo = [i for i, (b, p) in enumerate(zip(boxes, photos, strict=True))
                if worth_cropping(b, p[0].size, self.max_area)]  # fmt: skip
        crops: list[dict[str, torch.Tensor] | None] = [None] * len(photos)
        if todo:
            xc = torch.stack(
                [
                    crop_input(photos[i][0], boxes[i], m.image_size, m.mean, m.std, *photos[i][1:])
                    for i in todo
                ]  # fmt: skip
            )
            out = self.engine.backend(xc)
            if self.engine.tta_flip:
                out = self._mirror_averaged(out, xc)
            for j, i in enumerate(todo):
                crops[i] = {k: v[j] for k, v in out.items()}
        return whole, crops, boxes

    def _mirror_averaged(
        self, out: dict[str, torch.Tensor], x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`out`, the outputs for `x`, averaged with those of its mirror image (tta_flip)."""
        mirror = self.engine.backend(torch.flip(x, dims=[3]))
        return {k: (v + mirror[k]) / 2 for k, v in out.items()}

    def predict_items(
        self, items: Sequence[tuple[str, Item]], workers: int = 2
    ) -> Iterator[Prediction]:
        """As :meth:`Engine.predict_items`, each photo predicted whole and cropped: decoding
        and cropping run in a thread pool while the model works on the previous batch."""
        engine = self.engine

        def load_chunk(chunk: Sequence[tuple[str, Item]]) -> list:
            out: list = []
            for name, item in chunk:
                try:
                    img, x = engine.load(item, name)
                    out.append((img, x, item, name))
                except ImageError as e:
                    out.append(e)
            return out

        size = engine.batch_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        workers = max(1, workers)
        with ThreadPoolExecutor(workers) as pool:
            futures: deque = deque(pool.submit(load_chunk, c) for c in chunks[:workers])
            for i, chunk in enumerate(chunks):
                loaded = futures.popleft().result()
                if i + workers < len(chunks):
                    futures.append(pool.submit(load_chunk, chunks[i + workers]))
                good = [t for t in loaded if not isinstance(t, ImageError)]
                answers = iter(self._answers(good))
                for (name, _), t in zip(chunk, loaded, strict=True):
                    if isinstance(t, ImageError):
                        yield Prediction(name, None, t.problem)
                    else:
                        yield Prediction(name, next(answers))

    def _answers(self, good: list[tuple]) -> list:
        if not good:
            return []
        x = torch.stack([t[1] for t in good])
        whole, crops, _ = self.views(x, [(img, item, name) for img, _, item, name in good])
        out = []
        for j, crop in enumerate(crops):
            one = {k: v[j] for k, v in whole.items()}
            out.append(
                self.engine.describe(
                    one if crop is None else combine(one, crop, self.engine.schema)
                )
            )
        return out
