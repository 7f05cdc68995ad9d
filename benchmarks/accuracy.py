"""Accuracy benchmark: does each part of the design help? Measured, with the same data,
split, budget and seeds for every configuration.

Table A - cosmetics (Personal Care subset of fashion-products-small, split == test),
          attributes category and color: baseline, single-task, multi-task, attention
          variants, uncertainty weighting, ResNet-50, and improvements.
Table B - the whole 44k catalogue as one multi-task model (six attributes).
Table C - shade colour on beauty-shades (split by brand): median / mean CIEDE2000.

The rows are data: benchmarks/rows/table_a.yaml, table_b.yaml and table_c.yaml, one row per
short stable id (A1, A2-category, A8-192px, B1, C29...) with its description and how its config
is made (benchmarks/README.md says how to add one). Every finished run is stored in the results
JSON under ``ID|seedN`` (its description inside) and skipped on the next start, and an
unfinished one goes on from its last epoch (its ``last.pt`` in ``--runs-dir``, if the code
revision and config are the same), so the tables can be built over several sittings (or
quickly on a GPU). Usage:

    python benchmarks/accuracy.py --quick            # smoke run, minutes on a CPU
    python benchmarks/accuracy.py --tables A C       # the full tables (hours on 2 CPU cores)
    python benchmarks/accuracy.py --only C29 A8      # rows by id, number or description words
    python benchmarks/accuracy.py --speed            # inference images/s on this machine
    python benchmarks/accuracy.py --report           # only rewrite the markdown table
    python benchmarks/accuracy.py --pick C10         # rank a row's runs by the validation
                                                     # score that picks a shipped model

Several processes can share one GPU, each with its own ``--results`` file (and ``--only`` /
``--seeds`` to split the work); ``--merge THEIR_FILES`` then adds their runs to this store.
``benchmarks/accuracy_parallel.sh [DATA]`` does that for the whole benchmark.

A row that starts from other rows' runs waits for them: a row with ``backbone_from: B1``
(domain pre-training) needs that checkpoint on this machine (`--tables B` first), a
``teacher_from`` row the run of the same seed of its teacher row, a ``soup_of`` row the runs
of the same seed of the rows it averages, ``tta_of`` the run it evaluates on photo + mirror,
``ensemble_of`` that row's runs of every seed; each is skipped until they are here. Shipped
models (C10_DEFAULT, C16_DEFAULT, C28_ACCURATE, C29_DEFAULT, C39_DEFAULT below) are read with
git, or from $BEAUTYTAG_SHIPPED_DIR where the checkout has no .git.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from benchlib import datasets_dir, git_file, git_revision, no_datasets, throughput

from beautytag.checkpoint import average_checkpoints
from beautytag.color import srgb_to_lab
from beautytag.config import Config, catalogue_only, config_from_dict
from beautytag.data import BeautyDataset, load_letterboxed, read_samples
from beautytag.images import normalize
from beautytag.nn.net import BeautyTagNet
from beautytag.training.evaluate import evaluate
from beautytag.training.metrics import accuracy, macro_f1, shade_stats
from beautytag.training.train import config_changes, finished, pick_device, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEEDS = (0, 1, 2)


def default_raw() -> dict[str, Any]:
    """configs/default.yaml as Tables A-C ran it: the catalogue and beauty-shades only, no
    `cosmetic` attribute or gate, the 20 catalogue categories and plain linear heads (rows
    add the pixel colour head as a change). Real-photo rows are benchmarks/wild.py's."""
    return catalogue_only(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))


# ---------------------------------------------------------------- configurations


def table_a_raw(data: Path, attrs: tuple[str, ...] = ("category", "color"), **changes) -> dict:
    """The default config cut down to Table A's task: the catalogue only, given attributes."""
    raw = default_raw()
    raw["attributes"] = [a for a in raw["attributes"] if a["name"] in attrs]
    for a in raw["attributes"]:
        a["sources"] = {k: v for k, v in a["sources"].items() if k == "fashion"}
    raw["data"]["root"] = str(data)
    raw["data"]["sources"] = [s for s in raw["data"]["sources"] if s["name"] == "fashion"]
    raw["model"] |= {"image_size": 128, "attention": "cbam"}  # Table A's common base
    return apply(raw, changes)


def full_raw(data: Path, **changes) -> dict:
    """The shipped model's config (all attributes, both sources)."""
    raw = default_raw()
    raw["data"]["root"] = str(data)
    return apply(raw, changes)


def weighted(raw: dict, **weights: float) -> dict:
    """The config with these attributes' loss weights (lambda) changed."""
    raw = copy.deepcopy(raw)
    for a in raw["attributes"]:
        a["weight"] = weights.get(a["name"], a["weight"])
    return raw


def apply(raw: dict, changes: dict) -> dict:
    """changes like {"model.attention": "seed"} set nested keys."""
    raw = copy.deepcopy(raw)
    for key, value in changes.items():
        section, _, field = key.partition(".")
        raw[section][field] = value
    return raw


def catalogue_raw(data: Path, min_count: int = 20, **changes) -> dict:
    """Table B: six catalogue attributes, classes rarer than `min_count` merged into Other."""
    rows = list(csv.DictReader((data / "fashion-products-small" / "labels.csv").open()))
    attrs = []
    for col in ("masterCategory", "subCategory", "articleType", "gender", "baseColour", "usage"):
        counts = Counter(r[col] for r in rows if r[col] and r["split"] == "train")
        classes = sorted(c for c, n in counts.items() if n >= min_count)
        if len(classes) < len(counts):
            classes.append("Other")
        attrs.append(
            {
                "name": col,
                "kind": "single",
                "classes": classes,
                "sources": {
                    "fashion": {"column": col, "other": "Other" if "Other" in classes else None}
                },
            }
        )
    for a in attrs:
        if a["sources"]["fashion"]["other"] is None:
            del a["sources"]["fashion"]["other"]
    raw = default_raw()
    raw["attributes"] = attrs
    raw["model"].pop("gate", None)  # no cosmetic attribute among Table B's
    raw["data"] = {
        "root": str(data),
        "sources": [{"name": "fashion", "path": "fashion-products-small", "split_column": "split"}],
    }
    raw["train"]["balance_attribute"] = "articleType"
    return apply(raw, changes)


# The revision whose src/beautytag/weights/default.pt is C10 seed 2, the default that C13 and
# C14 start from (read with `git show`, so that the rows mean the same after it is replaced).
C10_DEFAULT = "c08db71"
# The revision whose default.pt is C16 seed 1 (the default shipped since), C23's teacher.
C16_DEFAULT = "7260413"
# The revision whose accurate.pt is C28 seed 0 (192 px), C30's teacher.
C28_ACCURATE = "fb65977"
# The revisions whose default.pt is C29 seed 2 and C39 seed 0, two of C44's teachers.
C29_DEFAULT = "ba5c7ed"
C39_DEFAULT = "aa5c2aa"
# the shipped models the rows read from git: revision -> file in src/beautytag/weights
SHIPPED = {
    C10_DEFAULT: "default.pt",
    C16_DEFAULT: "default.pt",
    C28_ACCURATE: "accurate.pt",
    C29_DEFAULT: "default.pt",
    C39_DEFAULT: "default.pt",
}
# the names the row files give them
SHIPPED_NAMES = {
    "C10_DEFAULT": C10_DEFAULT,
    "C16_DEFAULT": C16_DEFAULT,
    "C28_ACCURATE": C28_ACCURATE,
    "C29_DEFAULT": C29_DEFAULT,
    "C39_DEFAULT": C39_DEFAULT,
}


# ---------------------------------------------------------------- rows (benchmarks/rows/)

ROWS = ROOT / "benchmarks" / "rows"
TABLES = {"A": "table_a.yaml", "B": "table_b.yaml", "C": "table_c.yaml"}
ROW_ID = re.compile(r"[ABC]\d+(-[a-z0-9]+)*")
BASES = {"table_a": table_a_raw, "full": full_raw, "catalogue": catalogue_raw}
# what a row may say besides its description: how its config is made, or the markers of a
# row that trains nothing (a baseline) or starts from other rows' runs or shipped models
DEFINITION = {"base", "attributes", "from", "changes", "weights"}
SOURCES = {"backbone_from", "init_from", "teacher_from", "tta_of", "soup_of", "ensemble_of"}
MARKERS = SOURCES | {"baseline", "flip"}


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings may not repeat a key (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for key, count in Counter(keys).items():
            if count > 1:
                raise ValueError(f"{node.start_mark}: {key!r} appears {count} times")
        return super().construct_mapping(node, deep)


def row_entries() -> dict[str, dict]:
    """Every row of the row files (ROWS: benchmarks/rows/table_*.yaml), in table order."""
    return read_rows(ROWS)


@functools.cache
def read_rows(folder: Path) -> dict[str, dict]:
    """The rows of the row files in `folder`: id -> its entry as written. ValueError naming
    the file and row for a malformed id, an unknown field, a repeated id or a reference to no
    row or shipped model."""
    entries: dict[str, dict] = {}
    for table, name in TABLES.items():
        path = folder / name
        for row_id, entry in yaml.load(path.read_text(), UniqueKeyLoader).items():
            where = f"{path}: row {row_id!r}"
            if not ROW_ID.fullmatch(str(row_id)) or row_id[0] != table:
                raise ValueError(f"{where}: not an id of table {table} (e.g. {table}12-part)")
            if row_id in entries:
                raise ValueError(f"{where}: the id is taken by another table's row")
            unknown = set(entry) - DEFINITION - MARKERS - {"description"}
            if unknown or not entry.get("description"):
                raise ValueError(f"{where}: unknown fields {sorted(unknown)} or no description")
            entries[row_id] = entry
    for row_id, entry in entries.items():
        for field in SOURCES & set(entry) | ({"from"} & set(entry)):
            for ref in as_list(entry[field]):
                if ref not in SHIPPED_NAMES and ref.partition("@")[0] not in entries:
                    raise ValueError(f"{row_id}: {field} {ref!r} names no row or shipped model")
    return entries


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def source(ref: str) -> str:
    """A row file's reference as the runners take it: a shipped model's revision, a row id,
    or ``ROW@REVISION`` as :func:`at` makes it (that row's runs at that revision)."""
    if ref in SHIPPED_NAMES:
        return SHIPPED_NAMES[ref]
    row, _, revision = ref.partition("@")
    return at(row, revision) if revision else row


def row_definition(data: Path, entries: dict[str, dict], row_id: str) -> dict:
    """Row `row_id` as the runners take it: a raw config (its base or the row it is made
    `from`, with its `changes` and loss `weights`) with its markers, or only markers."""
    entry = copy.deepcopy(entries[row_id])
    if "from" in entry:
        raw = row_definition(data, entries, entry["from"])
    elif "base" in entry:
        attrs = {"attrs": tuple(entry["attributes"])} if "attributes" in entry else {}
        raw = BASES[entry["base"]](data, **attrs)
    else:
        raw = {}
    raw = apply(raw, entry.get("changes", {}))
    if "weights" in entry:
        raw = weighted(raw, **entry["weights"])
    for marker in MARKERS & set(entry):
        value = entry[marker]
        if marker in SOURCES:
            value = [source(r) for r in value] if isinstance(value, list) else source(value)
        raw[marker] = value
    return raw


def rows(data: Path, tables: str = "ABC") -> dict[str, dict]:
    """The rows of these tables in table order: id -> :func:`row_definition`."""
    entries = row_entries()
    return {i: row_definition(data, entries, i) for i in entries if i[0] in tables}


def label(row_id: str) -> str:
    """A row's id and description, as the report and the runs show it ("C29 as C27, ...");
    the id alone for a row that is in no row file."""
    entry = row_entries().get(row_id)
    return f"{row_id} {entry['description']}" if entry else row_id


# ---------------------------------------------------------------- runners


def summarise_metrics(result: dict[str, dict]) -> dict[str, float]:
    out = {}
    for name, r in result.items():
        for k in ("accuracy", "macro_f1", "median_de2000", "mean_de2000", "share_under_5", "mAP"):
            if k in r:
                out[f"{name}.{k}"] = r[k]
    return out


def at(row: str, revision: str) -> str:
    """Row `row`'s runs made at code `revision` only, as a source of a soup, flip, teacher...
    (where a row was run again at another revision and the source must be the one used)."""
    return f"{row}|{revision}"


def run_checkpoint(store: dict, name: str, seed: int) -> Path | None:
    """The checkpoint of the finished run of row `name` (that seed) if it is on this machine,
    else that of a run of the same row and seed at another revision (``key|revision``, as
    merge_runs adds them, in the order of the revisions' hashes) that is; None if there is
    none. A `name` made by :func:`at` takes only the run at that revision."""
    row, _, revision = name.partition("|")
    key = f"{row}|seed{seed}"
    reruns = sorted(k for k in store["runs"] if k.startswith(key + "|"))
    for k in [key, *reruns]:
        run = store["runs"].get(k, {})
        path = run.get("checkpoint", "")
        if path and Path(path).is_file() and revision in ("", run.get("revision")):
            return Path(path)
    return None


def checkpoint_of(store: dict, name: str, out: Path, seed: int = 0) -> Path | None:
    """The checkpoint of run `name` (that seed) on this machine, or for a revision in
    ``SHIPPED`` the model shipped at that revision (written to `out` from git, or from the
    folder $BEAUTYTAG_SHIPPED_DIR where there is no git); None if not to be had."""
    if name not in SHIPPED:
        return run_checkpoint(store, name, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    copies = os.environ.get("BEAUTYTAG_SHIPPED_DIR")  # set where the checkout has no .git
    if copies:  # that folder holds REVISION.pt for each revision in SHIPPED
        src = Path(copies) / f"{name}.pt"
        if not src.is_file():
            return None
        out.write_bytes(src.read_bytes())
        return out
    return git_file(name, f"src/beautytag/weights/{SHIPPED[name]}", out)


def backbone_of_run(store: dict, name: str, out: Path) -> Path | None:
    """Write the backbone weights of :func:`checkpoint_of` `name` as a state-dict file for
    model.weights (domain pre-training); None if that checkpoint is not here."""
    src = checkpoint_of(store, name, out.with_name(out.stem + "-source.pt"))
    if src is None:
        return None
    state = torch.load(src, map_location="cpu", weights_only=True)["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            k.removeprefix("backbone."): v.float()
            for k, v in state.items()
            if k.startswith("backbone.")
        },
        out,
    )
    return out


def resolve_markers(store: dict, key: str, raw: dict, seed: int, init: Path) -> dict | None:
    """Run `key`'s config with its markers made files: the backbone or model it starts from
    (written to `init`) and the teacher of this seed; None, with a message, if one is
    missing."""
    out = without_marker(raw)
    start = raw.get("backbone_from") or raw.get("init_from")
    if start:  # domain pre-training: start from that run (or model)
        if "backbone_from" in raw:
            path, field = backbone_of_run(store, start, init), "weights"
        else:
            path, field = checkpoint_of(store, start, init), "init"
        if path is None:
            print(
                f"skipped {key}: needs the checkpoint of {start}"
                " (run --tables B first, on this machine; or a git checkout)"
            )
            return None
        out["model"] = out["model"] | {field: str(path)}
    several = isinstance(raw.get("teacher_from"), list)
    paths = []  # distillation: a shipped default, or that row's run of the same seed; or several
    for i, teacher in enumerate(teachers_of(raw)):
        file = init.stem + (f"-teacher{i}.pt" if several else "-teacher.pt")
        path = checkpoint_of(store, teacher, init.with_name(file), seed)
        if path is None:
            if teacher in SHIPPED:
                need = f"git history with revision {teacher}"
            else:
                need = f"the checkpoint of {teacher} seed {seed}"
            print(f"skipped {key}: needs {need}")
            return None
        paths.append(str(path))
    if paths:
        out["train"] = out["train"] | {"distill_from": paths if several else paths[0]}
    return out


def marker_sources(store: dict, raw: dict, seed: int) -> list[str]:
    """What a row's markers resolve to for this seed, for the run's record: a shipped model as
    ``REVISION:PATH``, a run by its checkpoint file (the backbone's: seed 0, as
    backbone_of_run / checkpoint_of take it)."""
    start = raw.get("backbone_from") or raw.get("init_from")
    named = ([(start, 0)] if start else []) + [(t, seed) for t in teachers_of(raw)]
    return [
        f"{n}:src/beautytag/weights/{SHIPPED[n]}"
        if n in SHIPPED
        else str(run_checkpoint(store, n, s))
        for n, s in named
    ]


def teachers_of(raw: dict) -> list[str]:
    """The rows or shipped revisions that a row's "teacher_from" names: none, one or several."""
    teachers = raw.get("teacher_from") or []
    return [teachers] if isinstance(teachers, str) else list(teachers)


def without_marker(raw: dict) -> dict:
    """The config without the benchmark's own "backbone_from" / "init_from" / "teacher_from"
    markers."""
    return {k: v for k, v in raw.items() if k not in ("backbone_from", "init_from", "teacher_from")}


def resume_epoch(out_dir: Path, cfg: Config, revision: str) -> int | None:
    """The epoch at which the unfinished run in `out_dir` goes on (its ``last.pt``), so that
    a long run (B1 is hours on a CPU) spans several sittings; None to start afresh: no such
    run, a finished one, or one of another code revision or config (data-loader workers
    aside)."""
    last = out_dir / "last.pt"
    if not last.is_file():
        return None
    state = torch.load(last, map_location="cpu", weights_only=True)
    if finished(cfg, state["epoch"] + 1, state["bad_epochs"]):
        return None  # finished: measured again, not reused
    started_at = (out_dir / "revision").read_text() if (out_dir / "revision").is_file() else "?"
    changed = [c for c in config_changes(state["config"], cfg) if c != "train.workers"]
    if started_at != revision or changed:
        why = f"revision {started_at}, settings changed: {changed}"
        print(f"not resuming {last}: started with other code or settings ({why})", flush=True)
        return None
    return state["epoch"] + 2


def run_trained(
    raw: dict, seed: int, out_dir: Path, quick: bool, workers: int, revision: str
) -> dict[str, Any]:
    raw = apply(raw, {"train.seed": seed, "train.out_dir": str(out_dir), "train.workers": workers})
    # a row is the model its config defines, measured as below: no attribute kept from a
    # starting model, no end-of-run report or calibration (the rows before them had none)
    raw = apply(
        raw,
        {"model.keep_attributes": False, "train.final_report": False, "train.calibrate": False},
    )
    if quick:
        raw = apply(raw, {"train.epochs": 2, "train.freeze_epochs": 1, "data.limit": 48})
    cfg = config_from_dict(raw)
    resumed = resume_epoch(out_dir, cfg, revision)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "revision").write_text(revision)
    paths = train(cfg, resume=resumed is not None, progress=False)
    return (
        measured(paths["best"], cfg)
        | {"train_seconds": paths["seconds"]}
        | ({"resumed_at_epoch": resumed} if resumed else {})
    )


def measured(checkpoint: str | Path | list[str], cfg: Config, flip: bool = False) -> dict:
    """A finished model's (or an ensemble's) test and validation metrics on `cfg`'s data."""
    device = str(pick_device())
    result = evaluate(checkpoint, split="test", config=cfg, device=device, flip_tta=flip)
    val = evaluate(checkpoint, split="val", config=cfg, device=device, flip_tta=flip)
    where = (
        {"checkpoints": checkpoint}
        if isinstance(checkpoint, list)
        else {"checkpoint": str(checkpoint)}
    )
    return {
        "metrics": summarise_metrics(result["metrics"]),
        "val_metrics": summarise_metrics(val["metrics"]),
        "test_images": result["images"],
    } | where


def embed_split(model: BeautyTagNet, cfg: Config, split: str) -> tuple[np.ndarray, BeautyDataset]:
    ds = BeautyDataset(read_samples(cfg, splits=[split]), cfg, report=False)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(ds), 64):
            x = torch.stack([ds[j][0] for j in range(i, min(len(ds), i + 64))])
            feats.append(model.embed(normalize(x, cfg.model.mean, cfg.model.std)).numpy())
    return np.concatenate(feats), ds


def run_logreg(data: Path, quick: bool) -> dict[str, Any]:
    """Frozen ImageNet features + logistic regression, one per attribute."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    raw = table_a_raw(data, **{"model.attention": "none"})
    if quick:
        raw = apply(raw, {"data.limit": 48})
    cfg = config_from_dict(raw)
    model = BeautyTagNet(cfg).eval()
    t0 = time.time()
    xtr, dtr = embed_split(model, cfg, "train")
    xte, dte = embed_split(model, cfg, "test")
    scaler = StandardScaler().fit(xtr)
    metrics: dict[str, float] = {}
    for a in cfg.schema.attributes:
        ytr = [s.labels[a.name] for s in dtr.samples]
        keep = [i for i, y in enumerate(ytr) if y is not None]
        clf = LogisticRegression(max_iter=3000, C=0.5)
        clf.fit(scaler.transform(xtr[keep]), [a.classes.index(ytr[i]) for i in keep])
        yte = [s.labels[a.name] for s in dte.samples]
        kt = [i for i, y in enumerate(yte) if y is not None]
        pred = clf.predict(scaler.transform(xte[kt]))
        true = np.array([a.classes.index(yte[i]) for i in kt])
        metrics[f"{a.name}.accuracy"] = accuracy(true, pred)
        metrics[f"{a.name}.macro_f1"] = macro_f1(true, pred, len(a.classes))
    return {"metrics": metrics, "train_seconds": time.time() - t0}


def row_config(data: Path, name: str, quick: bool) -> Config:
    """The config of row `name` (an id of any table) without its markers, cut down for
    --quick: the data and outputs that a flip or a soup of that row's runs is measured on."""
    row = name.partition("|")[0]  # without at()'s revision
    raw = without_marker(row_definition(data, row_entries(), row))
    return config_from_dict(apply(raw, {"data.limit": 48}) if quick else raw)


def run_tta(
    store: dict, source_name: str, seed: int, data: Path, quick: bool
) -> dict[str, Any] | None:
    """The row `source_name`'s checkpoint of this seed, on its test data, photo + mirror."""
    checkpoint = run_checkpoint(store, source_name, seed)
    if checkpoint is None:
        return None
    cfg = row_config(data, source_name, quick)
    result = evaluate(checkpoint, split="test", config=cfg, flip_tta=True)
    metrics = summarise_metrics(result["metrics"])
    return {"metrics": metrics, "train_seconds": 0.0, "sources": [str(checkpoint)]}


def run_soup(
    store: dict, rows: list[str], seed: int, data: Path, out: Path, quick: bool
) -> dict[str, Any] | None:
    """The weights of the rows' checkpoints of this seed averaged (written to `out`), on the
    test and validation data of the first row's config; None if a checkpoint is not here."""
    paths = [run_checkpoint(store, r, seed) for r in rows]
    if None in paths:
        print(f"skipped: needs the checkpoints of {rows} seed {seed} on this machine")
        return None
    average_checkpoints(paths, out)
    cfg = row_config(data, rows[0], quick)
    return measured(out, cfg) | {"train_seconds": 0.0, "sources": [str(p) for p in paths]}


def run_ensemble(
    store: dict, source_name: str, data: Path, flip: bool, quick: bool
) -> dict[str, Any] | None:
    """The row `source_name`'s runs of every seed (SEEDS) as one ensemble, their outputs
    averaged, on the row's test and validation data; None if a checkpoint is not here."""
    paths = [run_checkpoint(store, source_name, s) for s in SEEDS]
    if None in paths:
        print(f"skipped: needs the checkpoints of {source_name} seeds {list(SEEDS)} here")
        return None
    cfg = row_config(data, source_name, quick)
    return measured([str(p) for p in paths], cfg, flip) | {"train_seconds": 0.0}


def shade_samples(data: Path) -> tuple[list, list]:
    cfg = config_from_dict(full_raw(data))
    samples = read_samples(cfg, sources=["shades"])
    train_s = [s for s in samples if s.split in ("train", "val") and s.labels["shade"]]
    test_s = [s for s in samples if s.split == "test" and s.labels["shade"]]
    return train_s, test_s


def dominant_lab(pixels: np.ndarray, k: int = 3) -> np.ndarray:
    """Lab centre of the largest k-means cluster among non-background pixels."""
    from sklearn.cluster import KMeans

    lab = srgb_to_lab(pixels.reshape(-1, 3) / 255.0)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    fg = lab[~((lab[:, 0] > 92) & (chroma < 6))]  # drop the white background
    if len(fg) < k:
        fg = lab
    km = KMeans(n_clusters=k, n_init=3, random_state=0).fit(fg)
    return km.cluster_centers_[np.bincount(km.labels_).argmax()]


def run_shade_baseline(kind: str, data: Path) -> dict[str, Any]:
    train_s, test_s = shade_samples(data)
    truth = np.array([s.labels["shade"] for s in test_s])
    t0 = time.time()
    if kind == "mean":
        pred = np.tile(np.mean([s.labels["shade"] for s in train_s], axis=0), (len(truth), 1))
    else:
        cfg = config_from_dict(full_raw(data, **{"model.image_size": 192}))
        kept, pixels, _ = load_letterboxed(test_s, cfg.model.image_size, report=False)
        truth = np.array([s.labels["shade"] for s in kept])
        pred = np.array([dominant_lab(p) for p in pixels])
    stats = shade_stats(truth, pred)
    return {
        "metrics": {f"shade.{k}": v for k, v in stats.items() if k != "n"},
        "train_seconds": time.time() - t0,
        "test_images": int(stats["n"]),
    }


# ---------------------------------------------------------------- speed on this machine


def measure_speed(raw: dict, batch: int = 32, budget_s: float = 4.0) -> float:
    """Inference images/s of the configuration's model in PyTorch eager on this machine:
    batches of random pixels (weights do not change the speed), median over ``budget_s``."""
    cfg = config_from_dict(apply(without_marker(raw), {"model.weights": "none"}))
    model = BeautyTagNet(cfg, pretrained=False).eval()
    x = torch.randn(batch, 3, cfg.model.image_size, cfg.model.image_size)
    return throughput(model, x, budget_s)["images_per_s_median"]


# ---------------------------------------------------------------- report


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def row_order(row_id: str) -> tuple[int, str]:
    """C2 before C10: by the row's number, then by id."""
    number = re.match(r"\D*(\d*)", row_id).group(1)
    return (int(number) if number else 0, row_id)


def report_rows(store: dict) -> list[tuple[str, list[dict]]]:
    """The report's rows, one per row id and code revision: (label, runs), the rows of the
    row files in their order, then any others (no longer in a file) by number; a row's
    revisions in order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, run in store["runs"].items():
        groups.setdefault((key.split("|")[0], run["revision"]), []).append(run)
    order = {row_id: i for i, row_id in enumerate(row_entries())}
    ranked = sorted(groups, key=lambda g: (order.get(g[0], len(order)), row_order(g[0]), g[1]))
    return [
        (f"{label(i) if i in order else groups[i, r][0]['name']} [{r}]", groups[i, r])
        for i, r in ranked
    ]


def write_report(store: dict, path_md: Path) -> None:
    lines = [
        "# beautytag accuracy benchmark",
        "",
        "Measured by `benchmarks/accuracy.py`; every number below comes from "
        "`benchmarks/results/accuracy.json` (per-run metrics, device, git revision). "
        "Mean ± standard deviation over seeds; `n` = number of seeds. Each run's `command` "
        "there reproduces it; in the runs measured up to revision e891547 it joined the "
        "arguments with spaces, so a pattern of several words after `--only` (`--only A8 "
        "lite2 + cbam @ 192 px`) was one argument: quote it to run it again.",
        "",
    ]
    tables = {
        "A": (
            "Table A - cosmetics (Personal Care, split == test)",
            ["category.accuracy", "category.macro_f1", "color.accuracy", "color.macro_f1"],
        ),
        "B": (
            "Table B - whole catalogue (split == test)",
            [
                "masterCategory.accuracy",
                "subCategory.accuracy",
                "articleType.accuracy",
                "gender.accuracy",
                "baseColour.accuracy",
                "usage.accuracy",
            ],
        ),
        "C": (
            "Table C - shade colour on beauty-shades (test brands); category and color of the "
            "trained rows on their whole test split (Personal Care + beauty-shades)",
            [
                "shade.median_de2000",
                "shade.mean_de2000",
                "shade.share_under_5",
                "category.accuracy",
                "color.accuracy",
            ],
        ),
    }
    for key, (title, cols) in tables.items():
        shown = [(n, runs) for n, runs in report_rows(store) if n.startswith(key)]
        if not shown:
            continue
        lines += [
            f"## {title}",
            "",
            "| configuration | n | "
            + " | ".join(cols)
            + " | train s | device | img/s (CPU, this machine) | revision |",
            "|" + " --- |" * (len(cols) + 6),
        ]
        for n, runs in shown:
            speed = store.get("speed", {}).get(n.split()[0])
            cells = [n, str(len(runs))]
            cells += [fmt([r["metrics"][c] for r in runs if c in r["metrics"]]) for c in cols]
            cells += [
                fmt([r["train_seconds"] for r in runs], 0),
                ", ".join(sorted({r["device"] for r in runs})),
                f"{speed:.0f}" if speed else "-",
                ", ".join(sorted({r["revision"] for r in runs})),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if key == "B":  # the published numbers Table B is compared with (not run here)
            ref = {"masterCategory": "0.992", "subCategory": "0.973", "gender": "0.921"}
            cells = ["published multi-output CNN (reference, not run here)", "-"]
            cells += [ref.get(c.split(".")[0], "-") for c in cols] + ["-"] * 4
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if store.get("superseded"):
        lines += [
            f"Earlier runs of the same rows at older code revisions ({len(store['superseded'])}, "
            "one seed each) are kept in accuracy.json under `superseded`; the table shows the "
            "runs of the current code.",
            "",
        ]
    if store.get("conclusion"):
        lines += ["## Conclusion", "", store["conclusion"], ""]
    path_md.write_text("\n".join(lines))


def selects(patterns: list[str], row_id: str) -> bool:
    """Whether --only / --skip `patterns` name the row `row_id`: an id names that row ("C12",
    not "C16 as C12, ...") and those it starts ("A8": A8-192px, A8-flip...; "A8-lite2"), any
    other pattern matches as a substring of the row's :func:`label` ("(B1)", "model soup")."""

    def names(p: str) -> bool:
        if ROW_ID.fullmatch(p):
            return row_id == p or row_id.startswith(p + "-")
        return p in label(row_id)

    return any(names(p) for p in patterns)


# What every stored run has (the report reads them).
RUN_FIELDS = ("name", "seed", "metrics", "train_seconds", "device", "revision")


def load_store(path: Path, must_exist: bool) -> dict:
    """The results file at `path` (a new, empty store if there is none and none is needed);
    ValueError naming the file when it is not a results file."""
    if not path.exists():
        if must_exist:
            raise ValueError(f"{path}: no such results file")
        return {"runs": {}}
    try:
        store = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(store, dict) or not isinstance(store.get("runs"), dict):
        raise ValueError(f"{path}: not an accuracy results file (no mapping 'runs')")
    return store


def merge_runs(store: dict, runs: dict[str, dict]) -> list[str]:
    """Add finished runs from another results file to `store`. A run the store already has
    is kept as it is; a run of the same row and seed at another code revision is added as
    ``key|revision`` (its own row in the table). Returns the keys added."""
    if not isinstance(runs, dict):
        raise ValueError("'runs' is not a mapping of run keys to runs")
    for key, run in runs.items():
        missing = [f for f in RUN_FIELDS if not isinstance(run, dict) or f not in run]
        if missing:
            raise ValueError(f"run {key!r} has no {', '.join(missing)}")
    added = {}
    for key, run in runs.items():
        mine = store["runs"].get(key)
        if mine is not None and mine.get("revision") != run.get("revision"):
            key = f"{key}|{run.get('revision')}"
            mine = store["runs"].get(key)
        if mine is None:
            added[key] = run
    store["runs"] |= added
    return list(added)


# The validation score that picks a shipped model among runs (fixed before the C10 runs): the
# mean of these validation metrics, each in [0, 1] and higher-is-better.
PICK_METRICS = (
    "category.accuracy",
    "color.accuracy",
    "shade.share_under_5",
    "finish.accuracy",
    "function.mAP",
)


def pick_score(run: dict) -> float | None:
    """A run's validation score (mean of PICK_METRICS); None if it lacks one of them."""
    val = run.get("val_metrics", {})
    if not all(k in val for k in PICK_METRICS):
        return None
    return statistics.mean(val[k] for k in PICK_METRICS)


def pick_table(store: dict, patterns: list[str]) -> list[str]:
    """Lines ranking the runs of the rows `patterns` select (:func:`selects`) by
    :func:`pick_score`."""
    scored = [
        (score, key, run)
        for key, run in store["runs"].items()
        if selects(patterns, key.split("|")[0]) and (score := pick_score(run)) is not None
    ]
    lines = [f"validation score = mean of {', '.join(PICK_METRICS)}"]
    for score, key, run in sorted(scored, key=lambda t: -t[0]):
        parts = ", ".join(f"{k} {run['val_metrics'][k]:.3f}" for k in PICK_METRICS)
        lines.append(f"{score:.4f}  {key}  ({parts}; {run.get('checkpoint', '')})")
    return lines + agreement([run for _, _, run in scored])


def agreement(runs: list[dict]) -> list[str]:
    """How far validation ranks these runs as the test split does: per metric of the score
    (and the score), Pearson's r between the runs' validation and test values."""

    def value(metrics: dict, name: str) -> float | None:
        return pick_score({"val_metrics": metrics}) if name == "score" else metrics.get(name)

    lines = []
    for name in ("score", *PICK_METRICS):
        pairs = [(value(r["val_metrics"], name), value(r.get("metrics", {}), name)) for r in runs]
        pairs = [(v, t) for v, t in pairs if v is not None and t is not None]
        try:
            r = f"{statistics.correlation([v for v, _ in pairs], [t for _, t in pairs]):+.2f}"
        except statistics.StatisticsError:  # fewer than 2 runs, or constant values
            r = "-"
        lines.append(f"validation vs test, {name}: r = {r} over {len(pairs)} runs")
    return lines


# ---------------------------------------------------------------- main


def default_runs_dir(quick: bool) -> Path:
    """Where runs write their checkpoints without --runs-dir: a --quick smoke run elsewhere
    than full runs, whose best.pt the results file names (soups, teachers and flips read it)."""
    return ROOT / "runs" / ("bench-quick" if quick else "bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=datasets_dir())
    p.add_argument("--tables", nargs="+", default=["A", "C"], choices=["A", "B", "C"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="rows with these ids (C12, A8-192px), numbers (A8) or description words",
    )
    p.add_argument("--skip", nargs="*", default=[], help="leave out these rows (as --only)")
    p.add_argument("--quick", action="store_true", help="tiny subset, 2 epochs: a smoke run")
    p.add_argument("--results", type=Path, help="results JSON (default: benchmarks/results)")
    p.add_argument("--runs-dir", type=Path, help="the runs' folders (default: runs/bench)")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers")
    p.add_argument("--speed", action="store_true", help="measure inference img/s here")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown")
    p.add_argument(
        "--pick",
        nargs="+",
        default=[],
        metavar="ROW",
        help="rank the finished runs of these rows (as --only) by the validation score",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="add the finished runs of these results files (parallel processes, other machines)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="start no new run after this many seconds (0: no limit)",
    )
    args_given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(args_given)
    args.runs_dir = args.runs_dir or default_runs_dir(args.quick)

    name = "accuracy-quick" if args.quick else "accuracy"
    path = args.results or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # --pick and --report read a results file; a run or --merge may start one
        store = load_store(path, must_exist=bool(args.pick or (args.report and not args.merge)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pick:
        print("\n".join(pick_table(store, args.pick)))
        return 0
    if args.merge or args.report:
        for other in args.merge:
            try:
                added = merge_runs(store, load_store(other, must_exist=True)["runs"])
            except ValueError as e:
                where = "" if str(e).startswith(str(other)) else f"{other}: "
                print(f"error: {where}{e} (nothing merged)", file=sys.stderr)
                return 2
            print(f"{other}: {len(added)} runs added")
        path.write_text(json.dumps(store, indent=2))
        write_report(store, path.with_suffix(".md"))
        print(f"results: {path} and {path.with_suffix('.md')}")
        return 0
    if no_datasets(args.data, "fashion-products-small", hint="; pass --data"):
        return 0
    plan = {
        n: c
        for t in args.tables
        for n, c in rows(args.data, t).items()
        if (not args.only or selects(args.only, n)) and not selects(args.skip, n)
    }
    device = str(pick_device())
    if device == "cuda":
        device = torch.cuda.get_device_name(0)
    if args.speed:
        store.setdefault("speed", {})
        for n, raw in plan.items():
            if "model" in raw:
                store["speed"][n] = measure_speed(raw)
                print(f"{n}: {store['speed'][n]:.1f} img/s", flush=True)
        store["speed_machine"] = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    else:
        started = time.time()
        revision = git_revision()  # the code the runs start from, not the HEAD at their end
        for n, raw in plan.items():
            once = "baseline" in raw and raw["baseline"] in ("mean", "kmeans", "logreg")
            once = once or "ensemble_of" in raw  # of every seed's run
            for seed in [0] if once else args.seeds:
                key = f"{n}|seed{seed}"
                if key in store["runs"]:
                    continue
                if args.time_budget and time.time() - started > args.time_budget:
                    print(f"time budget spent: {key} and later runs left for next time")
                    break
                print(f"== {key}", flush=True)
                if "baseline" in raw and raw["baseline"] == "logreg":
                    run = run_logreg(args.data, args.quick)
                elif "baseline" in raw:
                    run = run_shade_baseline(raw["baseline"], args.data)
                elif "tta_of" in raw:
                    run = run_tta(store, raw["tta_of"], seed, args.data, args.quick)
                    if run is None:
                        continue
                elif "ensemble_of" in raw:
                    run = run_ensemble(
                        store, raw["ensemble_of"], args.data, raw["flip"], args.quick
                    )
                    if run is None:
                        continue
                elif "soup_of" in raw:
                    soup = args.runs_dir / f"{n}-s{seed}" / "soup.pt"
                    run = run_soup(store, raw["soup_of"], seed, args.data, soup, args.quick)
                    if run is None:
                        continue
                else:
                    init = args.runs_dir / f"{n}-s{seed}-init.pt"
                    train_raw = resolve_markers(store, key, raw, seed, init)
                    if train_raw is None:
                        continue
                    sources = marker_sources(store, raw, seed)
                    run = run_trained(
                        train_raw,
                        seed,
                        args.runs_dir / f"{n}-s{seed}",
                        args.quick,
                        args.workers,
                        revision,
                    ) | ({"sources": sources} if sources else {})
                run |= {
                    "name": label(n),
                    "seed": seed,
                    "device": device,
                    "revision": revision,
                    "command": shlex.join(["python", "benchmarks/accuracy.py", *args_given]),
                }
                store["runs"][key] = run
                path.write_text(json.dumps(store, indent=2))  # keep every finished run
                print(json.dumps(run["metrics"]), flush=True)
    path.write_text(json.dumps(store, indent=2))
    write_report(store, path.with_suffix(".md"))
    print(f"results: {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
