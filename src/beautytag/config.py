"""The one configuration object that flows through training, evaluation, prediction and export.

A YAML file has four sections - ``model``, ``attributes`` (the schema), ``data`` and
``train`` - each validated here with errors that name the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from beautytag.schema import Schema, SchemaError, parse_schema


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "auto"  # auto | none | hub | path to a state-dict file
    attention: str = "cbam"  # none | seed | cbam
    dropout: float = 0.2
    image_size: int = 128
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # class attributes whose heads also read the product's pixel colour (model.PixelColourHead)
    pixel_colour: list[str] = field(default_factory=list)
    pixel_colour_pool: int = 2  # their histogram reads the input average-pooled this much
    # start training from a beautytag model (a checkpoint, or `default` / `accurate`): every
    # tensor whose name, shape and (for heads) classes match; the rest as above
    init: str = ""
    # with `init`: the starting model's attributes that `attributes` does not define are kept
    # (its classes and trained heads; the data has no labels for them); false drops them
    keep_attributes: bool = True
    # class attribute -> the temperature its logits are divided by before the softmax, so
    # that a score is the chance of being right (set by `beautytag calibrate`; 1 if absent)
    temperatures: dict[str, float] = field(default_factory=dict)
    # "not a cosmetic": {attribute, accept, threshold}: a photo whose P(accept) of that
    # single-label attribute is below threshold gets null answers (runtime/gate.py); {}: none
    gate: dict[str, Any] = field(default_factory=dict)
    # > 0: search embeddings are the pooled feature mapped to this many values by a linear
    # projection trained for search (scripts/add_search_projection.py); 0: the pooled feature
    search_projection: int = 0


@dataclass
class SourceConfig:
    name: str
    path: str  # dataset folder (holding labels.csv), relative to data.root
    filter: dict[str, list[str]] = field(default_factory=dict)  # keep rows whose column is in list
    split_column: str | None = "split"  # use this column's train/val/test values ...
    split_by: str | None = None  # ... or hash this column (e.g. brand) into a group split
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    limit: int = 0  # if > 0: at most this many rows per split, evenly spread (e.g. negatives)
    repeat: int = 1  # each training photo counts this many times per epoch (a small source)


@dataclass
class DataConfig:
    root: str = "../shared/datasets"
    sources: list[SourceConfig] = field(default_factory=list)
    augment: bool = True
    limit: int = 0  # if > 0: at most this many images per source and split (smoke tests)
    train_fraction: float = 1.0  # < 1: train on this share of each source's train split
    # the probability that a training packshot (a product on white) is pasted onto a new
    # background (beautytag.composite); its pixels, so its colour, never change
    composite: float = 0.0
    # the probability that a training photo is scaled down (1.5-4x) and back up
    downscale: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 15
    freeze_epochs: int = 2  # heads (and attention) only, backbone frozen
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # > 0: validate and keep a moving average of the weights
    cutmix: float = 0.0  # the share of training batches that CutMix mixes (data.cutmix_batch)
    # where a mixed photo lacks an attribute's label: "area" still counts its box's label
    # (weighing the box's area; measured better: accuracy benchmark C48 vs C54), "both"
    # counts the attribute only where both photos have its label
    cutmix_labels: str = "area"
    # a teacher model (checkpoint, default, accurate) to learn from, or a list of them (an
    # ensemble: their raw outputs averaged)
    distill_from: str | list[str] = ""
    distill_weight: float = 0.5  # share of the teacher's loss: (1 - w) labels + w teacher
    distill_temperature: float = 2.0  # softens the teacher's class probabilities
    balance: str = "none"  # none | sampler | weights
    balance_attribute: str = "category"
    loss_weighting: str = "fixed"  # fixed | uncertainty
    patience: int = 5
    monitor: str = "loss"  # loss | <attribute>.<metric>, e.g. category.macro_f1
    seed: int = 0
    workers: int = 0
    amp: bool = True  # bf16 autocast and channels-last, on a GPU only
    # after training: best.pt and the starting model (model.init) measured on the test split,
    # side by side (OUT/test-report, OUT/start-test-report)
    final_report: bool = True
    calibrate: bool = True  # after training: best.pt temperature-scaled on the validation split
    out_dir: str = "runs/default"

    @property
    def teachers(self) -> list[str]:
        """The models that ``distill_from`` names: none, one, or an ensemble."""
        if isinstance(self.distill_from, str):
            return [self.distill_from] if self.distill_from else []
        return list(self.distill_from)


@dataclass
class Config:
    model: ModelConfig
    schema: Schema
    data: DataConfig
    train: TrainConfig
    base_dir: str = "."  # where relative data paths are resolved (the YAML file's folder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "attributes": self.schema.to_dict(),
            "data": asdict(self.data),
            "train": asdict(self.train),
        }

    @property
    def data_root(self) -> Path:
        root = Path(os.path.expanduser(self.data.root))
        return root if root.is_absolute() else Path(self.base_dir) / root


# what train.monitor can name after "<attribute>.", by the attribute's kind (as evaluate computes)
METRICS = {
    "single": ("accuracy", "macro_f1", "top3_accuracy"),
    "multi": ("mAP", "micro_f1", "macro_f1"),
    "shade": ("median_de2000", "mean_de2000", "share_under_5"),
}

# string keys that also take a list of strings
STR_OR_LIST = {("train", "distill_from")}
CHOICES = {
    ("model", "attention"): ("none", "seed", "cbam"),
    ("train", "balance"): ("none", "sampler", "weights"),
    ("train", "cutmix_labels"): ("area", "both"),
    ("train", "loss_weighting"): ("fixed", "uncertainty"),
}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build a dataclass from a mapping, refusing unknown keys and wrong types."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise SchemaError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in raw]
    if missing:
        raise SchemaError(f"{where}: missing keys {missing}")
    kwargs = {}
    for key, value in raw.items():
        default = _default(fields[key])
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise SchemaError(f"{where}.{key}: must be true or false, got {value!r}")
        elif isinstance(default, int | float):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise SchemaError(f"{where}.{key}: must be a number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise SchemaError(f"{where}.{key}: must be a whole number, got {value!r}")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            if (where, key) not in STR_OR_LIST:
                raise SchemaError(f"{where}.{key}: must be a string, got {value!r}")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError(f"{where}.{key}: must be a string or a list of strings")
        choices = CHOICES.get((where, key))
        if choices and value not in choices:
            raise SchemaError(f"{where}.{key}: must be one of {choices}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _build_source(raw: Any, where: str) -> SourceConfig:
    src = _build(SourceConfig, raw, where)
    if not isinstance(src.filter, dict):
        raise SchemaError(f"{where}.filter: must map column -> value(s)")
    src.filter = {
        str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in src.filter.items()
    }
    if src.split_by is None and src.split_column is None:
        raise SchemaError(f"{where}: needs 'split_column' or 'split_by'")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(src, key) < 1:
            raise SchemaError(f"{where}.{key}: must be in [0, 1), got {getattr(src, key)}")
    if src.limit < 0 or src.repeat < 1:
        raise SchemaError(f"{where}: limit must be 0 (none) or more and repeat 1 or more")
    if src.val_fraction + src.test_fraction >= 1:
        raise SchemaError(f"{where}: val_fraction + test_fraction must be below 1 (no training)")
    return src


def check_names(schema: Schema, train: TrainConfig, where: str) -> None:
    """train.monitor and train.balance_attribute must name what the schema has."""
    if train.monitor != "loss":
        name, _, metric = train.monitor.partition(".")
        kind = schema[name].kind if name in schema.names else None
        known = [f"{a.name}.{m}" for a in schema.attributes for m in METRICS[a.kind]]
        if kind is None or metric not in METRICS[kind]:
            raise SchemaError(
                f"{where}: train.monitor must be 'loss' or an attribute's metric, got "
                f"{train.monitor!r}; known: {', '.join(known)}"
            )
    if train.balance != "none":
        single = [a.name for a in schema.attributes if a.kind == "single"]
        if train.balance_attribute not in single:
            raise SchemaError(
                f"{where}: train.balance_attribute must name a single-label attribute "
                f"({', '.join(single) or 'none'}), got {train.balance_attribute!r}"
            )


def check_temperatures(temperatures: Any, schema: Schema, where: str) -> None:
    """model.temperatures: class attributes to numbers above 0."""
    if not isinstance(temperatures, dict):
        raise SchemaError(f"{where}: model.temperatures must map class attributes to numbers")
    single = [a.name for a in schema.attributes if a.kind == "single"]
    for name, t in temperatures.items():
        if name not in single:
            raise SchemaError(
                f"{where}: model.temperatures names {name!r}, which is not a class attribute "
                f"({', '.join(single) or 'none'})"
            )
        if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t <= 100:
            raise SchemaError(
                f"{where}: model.temperatures.{name} must be above 0 and at most 100, got {t!r}"
            )


GATE_KEYS = ("attribute", "accept", "threshold")


def check_gate(gate: Any, schema: Schema, where: str) -> dict[str, Any]:
    """model.gate: ``{}`` or a single-label attribute, one of its classes and a threshold in
    (0, 1) (0.5 when left out). Returns it with the class spelled as the schema has it."""
    if not isinstance(gate, dict):
        raise SchemaError(f"{where}: model.gate must be a mapping ({{}} or {list(GATE_KEYS)})")
    if not gate:
        return {}
    if unknown := sorted(set(gate) - set(GATE_KEYS)):
        raise SchemaError(f"{where}: model.gate: unknown keys {unknown}; known: {list(GATE_KEYS)}")
    single = {a.name: a for a in schema.attributes if a.kind == "single"}
    name = gate.get("attribute")
    if name not in single:
        raise SchemaError(
            f"{where}: model.gate.attribute must name a single-label attribute "
            f"({', '.join(single) or 'none'}), got {name!r}"
        )
    classes = {c.casefold(): c for c in single[name].classes}
    accept = gate.get("accept")
    if not isinstance(accept, str) or accept.casefold() not in classes:
        raise SchemaError(
            f"{where}: model.gate.accept must be one of {name}'s classes "
            f"({', '.join(single[name].classes)}), got {accept!r}"
        )
    t = gate.get("threshold", 0.5)
    if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t < 1:
        raise SchemaError(f"{where}: model.gate.threshold must be in (0, 1), got {t!r}")
    return {"attribute": name, "accept": classes[accept.casefold()], "threshold": float(t)}


def check_ranges(model: ModelConfig, data: DataConfig, train: TrainConfig, where: str) -> None:
    """Numbers outside their range are errors that name the key (from a file or the CLI)."""
    checks = [
        ("model.image_size", model.image_size >= 32, "32 or more (pixels)"),
        ("model.dropout", 0 <= model.dropout < 1, "in [0, 1)"),
        ("model.pixel_colour_pool", model.pixel_colour_pool >= 1, "1 or more"),
        ("model.search_projection", model.search_projection >= 0, "0 (none) or more"),
        ("data.limit", data.limit >= 0, "0 (no limit) or more"),
        ("data.train_fraction", 0 < data.train_fraction <= 1, "in (0, 1]"),
        ("data.composite", 0 <= data.composite <= 1, "in [0, 1] (a probability)"),
        ("data.downscale", 0 <= data.downscale <= 1, "in [0, 1] (a probability)"),
        ("train.epochs", train.epochs >= 1, "1 or more"),
        ("train.freeze_epochs", train.freeze_epochs >= 0, "0 or more"),
        ("train.batch_size", train.batch_size >= 1, "1 or more"),
        ("train.lr", train.lr > 0, "above 0"),
        ("train.label_smoothing", 0 <= train.label_smoothing < 1, "in [0, 1)"),
        ("train.ema_decay", 0 <= train.ema_decay < 1, "in [0, 1)"),
        ("train.cutmix", 0 <= train.cutmix <= 1, "in [0, 1]"),
        ("train.distill_weight", 0 <= train.distill_weight <= 1, "in [0, 1]"),
        ("train.distill_temperature", train.distill_temperature > 0, "above 0"),
        ("train.patience", train.patience >= 1, "1 or more"),
        ("train.workers", train.workers >= 0, "0 or more"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise SchemaError(f"{where}: {key} must be {rule}")


def config_from_dict(
    raw: dict[str, Any], base_dir: str | Path = ".", where: str = "config"
) -> Config:
    """Validate a config mapping; errors are prefixed with `where` (the file name)."""
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: must be a YAML mapping")
    unknown = set(raw) - {"model", "attributes", "data", "train"}
    if unknown:
        raise SchemaError(f"{where}: unknown sections {sorted(unknown)}")
    try:
        model = _build(ModelConfig, raw.get("model"), "model")
        schema = parse_schema(raw.get("attributes"))
        data_raw = dict(raw.get("data") or {})
        sources = data_raw.pop("sources", []) or []
        data = _build(DataConfig, data_raw, "data")
        data.sources = [_build_source(s, f"data.sources[{i}]") for i, s in enumerate(sources)]
        train = _build(TrainConfig, raw.get("train"), "train")
    except SchemaError as e:
        raise SchemaError(f"{where}: {e}") from None
    if not isinstance(model.pixel_colour, list):
        raise SchemaError(f"{where}: model.pixel_colour must be a list of attribute names")
    check_ranges(model, data, train, where)
    check_names(schema, train, where)
    check_temperatures(model.temperatures, schema, where)
    model.gate = check_gate(model.gate, schema, where)
    for name in model.pixel_colour:
        if name not in schema.names or schema[name].kind == "shade":
            raise SchemaError(
                f"{where}: model.pixel_colour names {name!r}, which is not a class or tag attribute"
            )
    names = {s.name for s in data.sources}
    for attr in schema.attributes:
        for src in attr.sources:
            if data.sources and src not in names:
                raise SchemaError(
                    f"{where}: attribute {attr.name!r} reads source {src!r}, "
                    f"which data.sources does not define ({sorted(names)})"
                )
    return Config(model=model, schema=schema, data=data, train=train, base_dir=str(base_dir))


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases: a few lines of nested aliases ("billion
    laughs") expand to gigabytes once a config's values are walked."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a config",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SchemaError(
            f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}"
        ) from None
    return config_from_dict(raw, base_dir=path.resolve().parent, where=str(path))


def find_datasets() -> Path | None:
    """``../shared/datasets`` beside the current folder or beside this checkout, if any."""
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        cand = base.parent / "shared" / "datasets"
        if cand.is_dir():
            return cand
    return None


def use_found_datasets(cfg: Config) -> None:
    """A model's data root saved relative to another folder (a shipped model's
    ../shared/datasets): point it at :func:`find_datasets`' folder when it is not there."""
    if not cfg.data_root.is_dir() and (found := find_datasets()) is not None:
        cfg.data.root = str(found)


# what configs/default.yaml gained for real photos (issue #35): models trained before it
# (the shipped ones, the accuracy benchmark's Tables A-C) know none of these
REAL_PHOTO_SOURCES = ("wild", "others")
REAL_PHOTO_CLASSES = ("Eyebrow Pencil", "Makeup Brushes")


def catalogue_only(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of configs/default.yaml's mapping without its real-photo additions: the
    wild-dev and negative sources, the `cosmetic` attribute and gate, the two classes the
    catalogue lacks and the pixel colour head (plain linear heads, as that config had)."""
    raw = copy.deepcopy(raw)
    raw["data"]["sources"] = [
        s for s in raw["data"]["sources"] if s["name"] not in REAL_PHOTO_SOURCES
    ]
    raw["attributes"] = [a for a in raw["attributes"] if a["name"] != "cosmetic"]
    for a in raw["attributes"]:
        a["sources"] = {k: v for k, v in a["sources"].items() if k not in REAL_PHOTO_SOURCES}
        if "classes" in a:
            a["classes"] = [c for c in a["classes"] if c not in REAL_PHOTO_CLASSES]
    for key in ("gate", "pixel_colour", "pixel_colour_pool"):
        raw["model"].pop(key, None)
    return raw
