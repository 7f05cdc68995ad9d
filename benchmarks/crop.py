"""Find the product at test time (issue #35, item 5): wild-dev category accuracy of a model
on the whole photo, and on the whole photo combined with a crop around the product
(``beautytag predict --crop``, beautytag.runtime.crop), with the speed of both measured in
the same run.

    python benchmarks/crop.py [--model default accurate | --model PATH...] [--no-grid]

For each model, on wild-dev's validation and test splits: category accuracy without and with
the crop, through ``Engine.predict_items`` as ``beautytag predict`` runs it, and images/s of
both (decoding included; the better of two interleaved rounds). A model that lacks some of
wild-dev's classes (the shipped ones lack Eyebrow Pencil and Makeup Brushes) is measured on
the photos of the classes it knows; a model that knows them all (retrained), on all.

Choices are made on validation only: the grid of the crop's threshold and margin is run on
the validation split, and the shade (whole photo, crop, or their mean) is compared on the
beauty-shades validation split; test is only reported, at the module's constants. Writes
benchmarks/results/crop.json and crop.md.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import datasets_dir, git_revision, no_datasets, write_results

from beautytag.color import delta_e2000
from beautytag.config import load_config
from beautytag.data import read_samples
from beautytag.runtime import Engine
from beautytag.runtime import crop as crop_module
from beautytag.runtime.crop import Cropper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "crop"
THRESHOLDS = (0.3, 0.5, 0.7)
MARGINS = (0.0, 0.15, 0.3)


def wild_split(root: Path, split: str, known: set[str]) -> tuple[list[Path], list[str]]:
    """wild-dev photos of `split` whose category is in `known`, with their categories."""
    with (root / "labels.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and r["category"] in known]
    return [root / r["file_name"] for r in rows], [r["category"] for r in rows]


def labels_of(engine: Engine, photos: list[Path]) -> tuple[list[str], float]:
    """Category labels (empty for an unusable photo) and the seconds it took."""
    t0 = time.perf_counter()
    preds = list(engine.predict_items([(str(p), p) for p in photos]))
    dt = time.perf_counter() - t0
    return [p["category"].label if p.ok else "" for p in preds], dt


def accuracy(truth: list[str], pred: list[str]) -> float:
    return round(float(np.mean([t == p for t, p in zip(truth, pred, strict=True)])), 4)


def view_outputs(cropper: Cropper, photos: list[Path]) -> list[tuple[dict, dict | None, bool]]:
    """Per photo: its whole-photo outputs, its crop's (None where skipped) and whether it was
    cropped, as :meth:`Cropper.views` gives them."""
    engine, out = cropper.engine, []
    for i in range(0, len(photos), engine.batch_size):
        chunk = photos[i : i + engine.batch_size]
        loaded = [engine.load(p) for p in chunk]
        x = torch.stack([t[1] for t in loaded])
        photos_in = [(img, p, None) for (img, _), p in zip(loaded, chunk, strict=True)]
        whole, crops, _ = cropper.views(x, photos_in)
        for j, c in enumerate(crops):
            out.append(({k: v[j] for k, v in whole.items()}, c, c is not None))
    return out


def grid(engine: Engine, photos: list[Path], truth: list[str]) -> list[dict[str, Any]]:
    """Validation category accuracy of the combined views for each threshold and margin."""
    classes = engine.schema["category"].classes
    rows = []
    for t in THRESHOLDS:
        for m in MARGINS:
            views = view_outputs(Cropper(engine, threshold=t, margin=m), photos)
            combined, alone = [], []
            whole_only = [classes[int(v[0]["category"].argmax())] for v in views]
            for whole, c, _ in views:
                mixed = crop_module.combine(whole, c, engine.schema) if c else whole
                combined.append(classes[int(mixed["category"].argmax())])
                alone.append(classes[int((c or whole)["category"].argmax())])
            rows.append(
                {
                    "threshold": t,
                    "margin": m,
                    "accuracy": accuracy(truth, combined),
                    "whole_accuracy": accuracy(truth, whole_only),
                    "crop_view_accuracy": accuracy(truth, alone),
                    "cropped_share": round(float(np.mean([v[2] for v in views])), 3),
                }
            )
            print(f"  grid t={t} m={m}: {rows[-1]}", flush=True)
    return rows


def shade_check(engine: Engine, data: Path) -> dict[str, Any] | None:
    """Median CIELAB dE2000 on the beauty-shades validation split of the whole photo's shade,
    the crop's and their mean (over the photos that get cropped, and over all)."""
    if "shade" not in engine.schema.names:
        return None
    cfg = load_config(ROOT / "configs" / "default.yaml")
    cfg.data.root = str(data)
    samples = read_samples(cfg, ["val"], sources=["shades"])
    samples = [s for s in samples if s.labels.get("shade") is not None]
    truth = np.array([s.labels["shade"] for s in samples], dtype=np.float64)
    views = view_outputs(Cropper(engine), [s.path for s in samples])
    got = {"whole": [], "crop": [], "mean": []}
    for whole, c, _ in views:
        c = c or whole
        got["whole"].append(whole["shade"].numpy())
        got["crop"].append(c["shade"].numpy())
        got["mean"].append((whole["shade"].numpy() + c["shade"].numpy()) / 2)
    cropped = np.array([v[2] for v in views])
    out: dict[str, Any] = {"photos": len(samples), "cropped": int(cropped.sum())}
    for k, v in got.items():
        de = delta_e2000(np.array(v, dtype=np.float64), truth)
        out[f"median_de2000_{k}"] = round(float(np.median(de)), 3)
        if cropped.any():
            out[f"median_de2000_{k}_cropped_only"] = round(float(np.median(de[cropped])), 3)
    return out


def run_model(spec: str, data: Path, grid_only: bool, with_grid: bool) -> dict[str, Any]:
    plain = Engine(spec, backend="torch")
    known = set(plain.schema["category"].classes)
    wild = data / "wild-dev"
    with (wild / "labels.csv").open(encoding="utf-8") as f:
        wild_classes = sorted({r["category"] for r in csv.DictReader(f)})
    scope = [c for c in wild_classes if c in known]
    result: dict[str, Any] = {"classes": scope, "splits": {}}
    if with_grid or grid_only:  # first: choices come from validation only
        photos, truth = wild_split(wild, "val", set(scope))
        result["val_grid"] = grid(plain, photos, truth)
    if grid_only:
        return result
    cropped = Engine(spec, backend="torch", crop=True)
    labels_of(cropped, wild_split(wild, "train", set(scope))[0][:8])  # warm up
    for split in ("val", "test"):
        photos, truth = wild_split(wild, split, set(scope))
        runs: dict[str, list[float]] = {"whole": [], "crop": []}
        preds: dict[str, list[str]] = {}
        for _ in range(2):  # interleaved: both see the same load on a shared machine
            for key, engine in (("whole", plain), ("crop", cropped)):
                labels, dt = labels_of(engine, photos)
                if key in preds and preds[key] != labels:
                    raise RuntimeError(f"{spec} {split} {key}: two runs answered differently")
                preds[key] = labels
                runs[key].append(dt)
        speed = {k: round(len(photos) / min(v), 2) for k, v in runs.items()}
        result["splits"][split] = {
            "photos": len(photos),
            "accuracy_whole": accuracy(truth, preds["whole"]),
            "accuracy_crop": accuracy(truth, preds["crop"]),
            "changed": sum(a != b for a, b in zip(preds["whole"], preds["crop"], strict=True)),
            "images_per_s_whole": speed["whole"],
            "images_per_s_crop": speed["crop"],
            "speed_ratio": round(speed["crop"] / speed["whole"], 3),
        }
        print(f"  {split}: {result['splits'][split]}", flush=True)
    result["shade_val"] = shade_check(plain, data)
    print(f"  shade: {result['shade_val']}", flush=True)
    return result


def report(store: dict[str, Any]) -> list[str]:
    c = store["constants"]
    md = [
        "# Find the product at test time: whole photo vs whole + crop (wild-dev)",
        "",
        f"`{store['command']}` at {store['revision']}, on {store['device']}. The crop: the "
        f"whole photo's class-activation map for its top category at >= {c['threshold']} of "
        f"its range, largest connected region, "
        f"grown by {c['margin']} of its side on every side and squared, cropped from the photo "
        f"at full resolution; no second pass where the box covers more than {c['max_area']} "
        "of the photo. Class and tag probabilities of the two views are averaged; the shade is "
        "the whole photo's. Category accuracy on the photos of the classes the model knows "
        "(the shipped models: Compact, Eyeshadow, Foundation and Primer, Lipstick, Nail "
        "Polish). images/s: `Engine.predict_items` with decoding, the better of two "
        "interleaved rounds, 2 shared CPU cores (a ratio, not a speed to quote).",
        "",
        "| model | split | photos | accuracy, whole | accuracy, whole + crop | answers changed "
        "| images/s whole | images/s crop | speed ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in store["models"].items():
        for split, s in r.get("splits", {}).items():
            md.append(
                f"| {name} | {split} | {s['photos']} | {s['accuracy_whole']:.3f} | "
                f"{s['accuracy_crop']:.3f} | {s['changed']} | {s['images_per_s_whole']} | "
                f"{s['images_per_s_crop']} | {s['speed_ratio']} |"
            )
    for name, r in store["models"].items():
        if r.get("val_grid"):
            md += [
                "",
                f"Validation grid, {name}: category accuracy of the whole photo, whole + crop, "
                "the crop view alone (the whole photo where not cropped); share of photos "
                "cropped:",
                "",
                "| threshold | margin | whole | whole + crop | crop view alone | cropped |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            md += [
                f"| {g['threshold']} | {g['margin']} | {g['whole_accuracy']:.3f} | "
                f"{g['accuracy']:.3f} | "
                f"{g['crop_view_accuracy']:.3f} | {g['cropped_share']} |"
                for g in r["val_grid"]
            ]
    grids = [r["val_grid"] for r in store["models"].values() if r.get("val_grid")]
    if grids:
        mean = {
            (g["threshold"], g["margin"]): np.mean([gr[i]["accuracy"] for gr in grids])
            for i, g in enumerate(grids[0])
        }
        best = max(mean.values())
        chosen = [k for k, v in mean.items() if v == best]
        md += [
            "",
            f"Best on validation (mean over the models above): threshold, margin = "
            f"{', '.join(str(k) for k in chosen)} ({best:.3f}; whole photo: "
            f"{np.mean([g[0]['whole_accuracy'] for g in grids]):.3f}); the module's: "
            f"({c['threshold']}, {c['margin']}).",
        ]
    shades = {n: r["shade_val"] for n, r in store["models"].items() if r.get("shade_val")}
    if shades:
        md += [
            "",
            "Shade, beauty-shades validation split: median dE2000 of the whole photo's shade, "
            "the crop's, their mean (all photos; in brackets the cropped ones only):",
            "",
            "| model | photos | cropped | whole | crop | mean |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for n, s in shades.items():
            cells = [
                f"{s[f'median_de2000_{k}']} ({s.get(f'median_de2000_{k}_cropped_only', '-')})"
                for k in ("whole", "crop", "mean")
            ]
            md.append(f"| {n} | {s['photos']} | {s['cropped']} | " + " | ".join(cells) + " |")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["default", "accurate"], help="models")
    p.add_argument("--no-grid", action="store_true", help="skip the validation grid")
    p.add_argument("--grid-only", action="store_true", help="only the validation grid")
    p.add_argument("--out", type=Path, default=RESULTS, help="results path, no suffix")
    args = p.parse_args(argv)
    data = datasets_dir()
    if no_datasets(data, "wild-dev", "beauty-shades"):
        return 0
    store: dict[str, Any] = {
        "command": "python benchmarks/crop.py " + shlex.join(argv or sys.argv[1:]),
        "revision": git_revision(),
        "device": f"{torch.get_num_threads()} CPU threads",
        "constants": {
            "threshold": crop_module.THRESHOLD,
            "margin": crop_module.MARGIN,
            "max_area": crop_module.MAX_AREA,
        },
        "models": {},
    }
    for spec in args.model:
        print(f"== {spec}", flush=True)
        store["models"][spec] = run_model(spec, data, args.grid_only, not args.no_grid)
        write_results(args.out, store, report(store))
    print("\n".join(report(store)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
