"""Datasets: imagefolder sources (``labels.csv`` + images) combined with per-attribute masks.

Every source row becomes a :class:`Sample` holding, for each attribute of the schema,
a target and a flag saying whether it is labelled. Images are decoded once, letterboxed
to the model's input size (:func:`beautytag.images.letterbox`, the shared preprocessing)
and kept in memory as uint8; training augmentations work on that and never touch hue
or saturation, since colour is a label.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from beautytag.composite import content_box, foreground_alpha
from beautytag.config import Config, SourceConfig
from beautytag.images import ImageError, letterbox, load_image
from beautytag.schema import Attribute, Schema, SchemaError, SourceSpec
from beautytag.weak_labels import RULES

SPLITS = ("train", "val", "test")
NO_TAGS = "none"  # a tags cell saying that none of the tags applies (an empty cell: unknown)
# a split of a source whose listed files are missing in a larger share than this is an error
# (a wrong data.root or path?); fewer are reported, and skipped when loading
MAX_MISSING_SHARE = 0.1


@dataclass
class Sample:
    path: Path
    source: str
    split: str
    group: str = ""  # what the split was made by (e.g. the brand), for reports
    labels: dict[str, object] = field(default_factory=dict)  # attr -> class / tags / lab


def group_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a group key (e.g. a brand): the same key always lands together."""
    h = int(hashlib.md5(key.strip().lower().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < test_fraction:
        return "test"
    return "val" if h < test_fraction + val_fraction else "train"


def label_from_row(attr: Attribute, source: str, row: dict[str, str]) -> object | None:
    """One attribute's label for one CSV row: a class name, a list of tags, a Lab triple
    or None (not labelled)."""
    return read_label(attr, source, row)[0]


def read_label(
    attr: Attribute, source: str, row: dict[str, str]
) -> tuple[object | None, list[str]]:
    """:func:`label_from_row`'s label, and the values of the row's cell that are neither
    classes nor mapped to one (left out, or counted as the 'other' class): what reading a
    labels.csv reports. A rule's values are never reported."""
    spec = attr.sources.get(source)
    if spec is None:
        return None, []
    if attr.kind == "shade":
        cells = [(row.get(c) or "").strip() for c in spec.columns or []]
        if any(c == "" for c in cells):
            return None, []
        try:
            lab = [float(c) for c in cells]
        except ValueError:
            return None, []
        return (lab if all(math.isfinite(v) for v in lab) else None), []
    if spec.rule is None:
        return cell_label(attr, spec, row.get(spec.column or "") or "")
    value = RULES[spec.rule](" ".join(row.get(c) or "" for c in (spec.columns or [spec.column])))
    if isinstance(value, list):  # a rule's tags (an empty list: none of them)
        return [t for t in (as_class(attr, spec.mapped(v)) for v in value) if t is not None], []
    return cell_label(attr, spec, value or "")[0], []


def cell_label(attr: Attribute, spec: SourceSpec, cell: str) -> tuple[object | None, list[str]]:
    """A class or tags cell's label (None: not labelled) and its values that are not
    classes: one class, else the 'other' class if set; tags (separated by commas or
    semicolons), `none` for none of them, and a cell with no known tag stays unlabelled
    rather than meaning none of them."""
    cell = cell.strip()
    if not cell:
        return None, []
    if attr.kind == "multi" and cell.casefold() == NO_TAGS:  # labelled: none of the tags
        return [], []
    values = split_tags(cell) if attr.kind == "multi" else [cell]
    classes = [as_class(attr, spec.mapped(v)) for v in values]
    known = [c for c in classes if c is not None]
    unknown = [v for v, c in zip(values, classes, strict=True) if c is None]
    if attr.kind == "multi":
        return known or None, unknown
    return (known[0] if known else spec.other), unknown  # 'other' collects unknown values


def split_tags(cell: str) -> list[str]:
    """A tags cell -> its tags: separated by commas or by semicolons (as predict's CSV)."""
    return [t.strip() for t in re.split(r"[,;]", cell) if t.strip()]


def report_values(kind: str, csv_path: Path, what: str, values: Counter) -> None:
    """One line on stderr: how many values of `what` a labels.csv has, the commonest first."""
    shown = ", ".join(f"{v or repr(v)} ({n})" for v, n in values.most_common(6))
    more = f" and {len(values) - 6} more" if len(values) > 6 else ""
    print(f"{kind}: {csv_path}: {sum(values.values())} {what}: {shown}{more}", file=sys.stderr)


def as_class(attr: Attribute, value: str) -> str | None:
    """`value` as one of the attribute's classes, whatever its letter case (None if none)."""
    if value in attr.classes:
        return value
    folded = {c.casefold(): c for c in attr.classes}
    return folded.get(value.casefold())


def source_columns(src: SourceConfig, schema: Schema) -> set[str]:
    """Every column of a source's labels.csv that the config reads."""
    cols = {"file_name", *src.filter}
    cols.add(src.split_by if src.split_by else src.split_column or "")
    for a in schema.attributes:
        spec = a.sources.get(src.name)
        if spec is not None:
            cols.update(spec.columns or [spec.column or ""])
    return cols - {""}


def split_name(value: str) -> str:
    """A split column's value as train / val / test, whatever its case ("validation" is val)."""
    value = value.strip().lower()
    return "val" if value in ("validation", "valid") else value


def read_source(src: SourceConfig, schema: Schema, root: Path) -> list[Sample]:
    """All rows of one source that pass its filter, with their labels and split."""
    folder = root / src.path
    csv_path = folder / "labels.csv"
    if not csv_path.is_file():
        raise SchemaError(f"source {src.name!r}: {csv_path} not found")
    samples = []
    unknown: dict[str, Counter] = {a.name: Counter() for a in schema.attributes}
    other_splits: Counter = Counter()  # split_column values that are not train / val / test
    outside: Counter = Counter()  # file names that lead out of the source's folder
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: Excel's leading BOM
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SchemaError(
            f"{csv_path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); save "
            "it as UTF-8 (in Excel: 'CSV UTF-8')"
        ) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
        missing = sorted(source_columns(src, schema) - set(reader.fieldnames))
        if missing:
            raise SchemaError(
                f"{csv_path}: no column {', '.join(map(repr, missing))} (the config of source "
                f"{src.name!r} reads it; the file has {', '.join(reader.fieldnames) or 'none'})"
            )
        for row in reader:
            if any((row.get(col) or "") not in vals for col, vals in src.filter.items()):
                continue
            if src.split_by:
                group = row.get(src.split_by) or ""
                split = group_split(group, src.val_fraction, src.test_fraction)
            else:
                group, split = "", split_name(row.get(src.split_column or "") or "")
                if split not in SPLITS:
                    other_splits[(row.get(src.split_column or "") or "").strip()] += 1
            labels = {}
            for a in schema.attributes:  # values that are not classes are reported below
                labels[a.name], values = read_label(a, src.name, row)
                unknown[a.name].update(values)
            name = (row["file_name"] or "").strip().replace("\\", "/")  # Windows paths too
            if leaves_folder(name):
                outside[name] += 1
                continue
            samples.append(Sample(folder / name, src.name, split, group, labels))
    for a in schema.attributes:
        spec = a.sources.get(src.name)
        if not unknown[a.name]:
            continue
        if a.kind == "single" and spec and spec.other:
            what = f"{a.name} values are not classes and count as {spec.other!r}"
            report_values("note", csv_path, what, unknown[a.name])
        else:
            what = (
                f"{a.name} values are not classes and are left out (a cell left with none "
                "stays unlabelled; a map or an 'other' class would keep them)"
            )
            report_values("warning", csv_path, what, unknown[a.name])
    if other_splits:
        report_values(
            "warning",
            csv_path,
            f"rows have a {src.split_column} that is not train / val / test and are left out",
            other_splits,
        )
    if outside:
        what = "files are outside the source's folder and are left out"
        report_values("warning", csv_path, what, outside)
    return samples


def leaves_folder(name: str) -> bool:
    """Whether a labels.csv file name leads out of its folder: absolute (``/etc/passwd``,
    ``C:/x.jpg``) or up past it (``../../x.jpg``). Read as text: symbolic links inside the
    folder may lead anywhere, as their owner chose."""
    up = posixpath.normpath(name)
    return name.startswith("/") or bool(PureWindowsPath(name).drive) or up.split("/")[0] == ".."


def check_missing(folder: Path, parts: dict[str, list[Sample]]) -> None:
    """Report a source's listed files that are missing (one line), and fail when more than
    MAX_MISSING_SHARE of a split's are: the data is not where the config says."""
    missing = {split: [s for s in part if not s.path.exists()] for split, part in parts.items()}
    if not any(missing.values()):
        return
    csv_path = folder / "labels.csv"
    counts = ", ".join(f"{k}: {len(missing[k])} of {len(v)}" for k, v in parts.items() if v)
    names = Counter(s.path.relative_to(folder).as_posix() for m in missing.values() for s in m)
    report_values("warning", csv_path, f"listed files are missing ({counts})", names)
    for split, part in parts.items():
        if len(missing[split]) > MAX_MISSING_SHARE * len(part):
            raise SchemaError(
                f"{csv_path}: {len(missing[split])} of the {len(part)} files listed for {split} "
                f"are missing (more than {MAX_MISSING_SHARE:.0%}): is data.root or the "
                "source's path wrong?"
            )


def read_samples(
    cfg: Config, splits: Sequence[str] = SPLITS, sources: Sequence[str] | None = None
) -> list[Sample]:
    """The samples of the chosen splits (and sources) of every configured source."""
    names = [src.name for src in cfg.data.sources]
    unknown = sorted(set(sources or []) - set(names))
    if unknown:
        raise ValueError(
            f"no data source named {', '.join(unknown)}; this config has: {', '.join(names)}"
        )
    out: list[Sample] = []
    for src in cfg.data.sources:
        if sources is not None and src.name not in sources:
            continue
        rows = read_source(src, cfg.schema, cfg.data_root)
        parts = {}
        for split in splits:
            part = [s for s in rows if s.split == split]
            if split == "train" and cfg.data.train_fraction < 1:
                part = spread(part, max(1, round(len(part) * cfg.data.train_fraction)))
            for limit in (src.limit, cfg.data.limit):
                if 0 < limit < len(part):
                    part = spread(part, limit)
            parts[split] = part
        check_missing(cfg.data_root / src.path, parts)
        parts["train"] = parts.get("train", []) * src.repeat
        out += [s for part in parts.values() for s in part]
    return out


def unique_photos(samples: Sequence[Sample]) -> list[Sample]:
    """`samples` without repeats of a photo (a labels.csv may list one twice): the first."""
    seen: set[Path] = set()
    return [s for s in samples if not (s.path in seen or seen.add(s.path))]


def spread(samples: list[Sample], n: int) -> list[Sample]:
    """`n` of `samples`, evenly spaced, so that the class mix is kept (and the same `n` are
    chosen every time)."""
    return [samples[i * len(samples) // n] for i in range(n)] if n < len(samples) else samples


def encode(schema: Schema, labels: dict[str, object]) -> tuple[dict, dict]:
    """Label values -> (targets, masks) tensors for one sample."""
    targets, masks = {}, {}
    for a in schema.attributes:
        v = labels.get(a.name)
        masks[a.name] = torch.tensor(v is not None)
        if a.kind == "single":
            targets[a.name] = torch.tensor(a.classes.index(v) if v is not None else 0)
        elif a.kind == "multi":
            t = torch.zeros(len(a.classes))
            for tag in v or []:
                t[a.classes.index(tag)] = 1.0
            targets[a.name] = t
        else:
            targets[a.name] = torch.tensor(v if v is not None else [0.0, 0.0, 0.0])
    return targets, masks


def load_letterboxed(
    samples: Sequence[Sample], size: int, workers: int = 2, report: bool = True
) -> tuple[list[Sample], np.ndarray, list[str]]:
    """Decode and letterbox every image once. Bad images are reported and dropped."""
    return load_letterboxed_boxes(samples, size, workers, report)[:3]


def load_letterboxed_boxes(
    samples: Sequence[Sample], size: int, workers: int = 2, report: bool = True
) -> tuple[list[Sample], np.ndarray, list[str], np.ndarray]:
    """:func:`load_letterboxed`, and where each photo lies inside its letterbox: (N, 4) int
    top, left, height, width (:func:`beautytag.composite.content_box`)."""

    def work(s: Sample) -> tuple[np.ndarray, tuple[int, ...]] | str:
        try:
            img = load_image(s.path, min_size=size)
            box = content_box(*img.size, size)
            return np.asarray(letterbox(img, size), dtype=np.uint8), box
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(work, samples))
    kept = [s for s, r in zip(samples, results, strict=True) if not isinstance(r, str)]
    errors = [r for r in results if isinstance(r, str)]
    if report:
        for e in errors:
            print(f"skipped {e}", file=sys.stderr)
    done = [r for r in results if not isinstance(r, str)]
    stack = np.stack([a for a, _ in done]) if done else np.zeros((0, size, size, 3), np.uint8)
    boxes = np.array([b for _, b in done], dtype=np.int64).reshape(-1, 4)
    return kept, stack, errors, boxes


def augment_batch(
    x: torch.Tensor,
    degrees: float = 8.0,
    translate: float = 0.06,
    scale: tuple[float, float] = (0.85, 1.1),
) -> torch.Tensor:
    """Random geometric augmentation of a uint8 batch (B, 3, H, W), on its own device:
    horizontal flips, small rotations, shifts and zooms, white where the image moved away.
    Colour is never touched (it is a label). Returns float pixels in 0..255."""
    b, dev = x.shape[0], x.device
    angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(degrees)
    zoom = torch.empty(b, device=dev).uniform_(*scale)
    shift = (torch.rand(2, b, device=dev) * 2 - 1) * 2 * translate  # grid coords span 2
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[0]], -1),
            torch.stack([sin * flip, cos, shift[1]], -1),
        ],
        1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # zero padding of (x - 255) is white padding of x
    return F.grid_sample(x.float() - 255.0, grid, align_corners=False) + 255.0


def cutmix_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): a random box of each photo replaced by the same box of
    another photo of the batch. Returns the mixed batch, which photo each one's box came from,
    and the share of each photo that is its own (its labels' weight; the rest is the other's).
    Pixels move, none changes its colour."""
    b, _, h, w = x.shape
    lam = float(torch.rand(1))  # Beta(1, 1): the share of the photo to keep
    bh, bw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    top, left = int(torch.randint(0, h - bh + 1, (1,))), int(torch.randint(0, w - bw + 1, (1,)))
    perm = torch.randperm(b).to(x.device)
    mixed = x.clone()
    mixed[:, :, top : top + bh, left : left + bw] = x[perm, :, top : top + bh, left : left + bw]
    return mixed, perm, 1 - bh * bw / (h * w)


class BeautyDataset(Dataset):
    """Samples with their letterboxed pixels in memory; returns (image, targets, masks), and
    for training (`train`) also `extra`: the photo's product alpha (uint8 H x W, all zero
    but for a packshot; 1 x 1 while ``data.composite`` is off) and its source's index."""

    def __init__(
        self, samples: Sequence[Sample], cfg: Config, train: bool = False, report: bool = True
    ):
        self.cfg, self.train = cfg, train
        self.samples, self.pixels, self.errors, self.boxes = load_letterboxed_boxes(
            samples, cfg.model.image_size, report=report
        )
        self.encoded = [encode(cfg.schema, s.labels) for s in self.samples]
        names = [src.name for src in cfg.data.sources]
        self.source = [names.index(s.source) if s.source in names else -1 for s in self.samples]
        # (N, H, W) product alphas while compositing is on, else (N, 1, 1) zeros
        cut = train and cfg.data.composite > 0
        side = cfg.model.image_size if cut else 1
        self.alpha = np.zeros((len(self.samples), side, side), np.uint8)
        if cut:
            for i, (pixels, box) in enumerate(zip(self.pixels, self.boxes, strict=True)):
                alpha = foreground_alpha(pixels, tuple(box))
                self.alpha[i] = 0 if alpha is None else alpha

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        """(uint8 CHW letterboxed image, targets, masks[, extra]); augmentation and
        normalisation happen per batch, on the training device (see :func:`augment_batch`)."""
        targets, masks = self.encoded[i]
        image = torch.from_numpy(self.pixels[i]).permute(2, 0, 1)
        if not self.train:
            return image, targets, masks
        extra = {"alpha": torch.from_numpy(self.alpha[i]), "source": self.source[i]}
        return image, targets, masks, extra

    def packshots(self) -> np.ndarray:
        """Which photos are packshots that compositing pastes (bool, N)."""
        return self.alpha.reshape(len(self.alpha), -1).max(1, initial=0) > 0

    def label_counts(self, attr: Attribute) -> Counter:
        return Counter(
            s.labels[attr.name] for s in self.samples if s.labels.get(attr.name) is not None
        )

    def sample_weights(self, attr: Attribute) -> torch.Tensor:
        """Per-sample weights that balance the classes of a single-label attribute."""
        counts = self.label_counts(attr)
        w = [
            1.0 / counts[s.labels[attr.name]] if s.labels.get(attr.name) is not None else 0.0
            for s in self.samples
        ]
        t = torch.tensor(w, dtype=torch.double)
        mean = t[t > 0].mean() if (t > 0).any() else torch.tensor(1.0, dtype=torch.double)
        return torch.where(t > 0, t, mean)


def summarise(samples: Sequence[Sample], schema: Schema) -> dict[str, dict[str, int]]:
    """How many samples each split has, and how many are labelled per attribute."""
    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        part = [s for s in samples if s.split == split]
        out[split] = {"images": len(part)} | {
            a.name: sum(s.labels.get(a.name) is not None for s in part) for a in schema.attributes
        }
    return out


def classes_without_photos(samples: Sequence[Sample], schema: Schema) -> dict[str, list[str]]:
    """Per class attribute that a source labels, the classes no sample is labelled with (a
    typo in the config?); not an attribute no source labels (one kept from model.init)."""
    out = {}
    for a in schema.attributes:
        if a.kind == "shade" or not a.sources:
            continue
        seen: set[str] = set()
        for s in samples:
            label = s.labels.get(a.name)
            seen.update(label if isinstance(label, list) else [label] if label else [])
        if missing := [c for c in a.classes if c not in seen]:
            out[a.name] = missing
    return out


def in_several_splits(samples: Sequence[Sample]) -> list[Path]:
    """Photos listed in more than one split (a photo in both train and val flatters
    validation), in order of first appearance."""
    splits: dict[Path, set[str]] = {}
    for s in samples:
        splits.setdefault(s.path.resolve(), set()).add(s.split)
    return [path for path, seen in splits.items() if len(seen) > 1]
