"""Real-world photos: category accuracy and macro-F1 on wild-dev's test split (hands, lips,
nails, flat-lays, swatches: the photos users take), row by row (benchmarks/rows/wild.yaml).

Rows are data: each has a short id, kept as its key in the results, and a kind (a shipped
model, or a frozen-feature probe; see the rows file). Finished rows are stored and skipped
on the next start (``--redo ID`` measures one again). A shipped model cannot answer the two
classes the catalogue lacks (Eyebrow Pencil, Makeup Brushes): its accuracy is reported on
all test photos and on the five classes it knows. Usage:

    python benchmarks/wild.py [--only W1 W3] [--redo W3]

Writes benchmarks/results/wild.json and wild.md. Look at the test split only to report:
choices (the probe's C) are made on the validation split.
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
import yaml
from benchlib import git_revision, write_results
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from beautytag.config import find_datasets
from beautytag.images import ImageError, load_for_model
from beautytag.nn.net import create_backbone
from beautytag.runtime import Engine

HERE = Path(__file__).resolve().parent
ROWS = HERE / "rows" / "wild.yaml"
RESULTS = HERE / "results" / "wild"
PROBE_C = (0.01, 0.1, 1.0, 10.0)


def wild_photos(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """(photo, category) per split of wild-dev."""
    out: dict[str, list[tuple[Path, str]]] = {"train": [], "val": [], "test": []}
    with (root / "labels.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[row["split"]].append((root / row["file_name"], row["category"]))
    return out


def scores(truth: list[str], pred: list[str], classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over `classes` and per-class recall."""
    per_class = {}
    for c in classes:
        idx = [i for i, t in enumerate(truth) if t == c]
        per_class[c] = {
            "photos": len(idx),
            "recall": round(sum(pred[i] == c for i in idx) / len(idx), 3) if idx else None,
        }
    return {
        "photos": len(truth),
        "accuracy": round(accuracy_score(truth, pred), 4),
        "macro_f1": round(
            f1_score(truth, pred, labels=classes, average="macro", zero_division=0), 4
        ),
        "per_class": per_class,
    }


def run_shipped(row: dict, split: list[tuple[Path, str]], classes: list[str]) -> dict[str, Any]:
    engine = Engine(row["model"])
    known = set(engine.schema["category"].classes)
    preds = list(engine.predict_files([p for p, _ in split]))
    pred = [p["category"].label if p.ok else "" for p in preds]
    truth = [c for _, c in split]
    answered = {}
    for p in pred:
        answered[p] = answered.get(p, 0) + 1
    inside = [i for i, t in enumerate(truth) if t in known]
    return {
        "all": scores(truth, pred, classes),
        "known_classes": scores(
            [truth[i] for i in inside],
            [pred[i] for i in inside],
            [c for c in classes if c in known],
        ),
        "most_answered": sorted(answered.items(), key=lambda kv: -kv[1])[:3],
        "errors": sum(not p.ok for p in preds),
    }


@torch.inference_mode()
def features(backbone: torch.nn.Module, photos: list[Path], size: int) -> np.ndarray:
    """Pooled frozen features, photos through the package's preprocessing (letterboxed)."""
    out = []
    for i in range(0, len(photos), 32):
        batch = []
        for p in photos[i : i + 32]:
            try:
                batch.append(load_for_model(p, size, [0.5] * 3, [0.5] * 3)[1])
            except ImageError:
                batch.append(torch.zeros(3, size, size))
        out.append(backbone.forward_features(torch.stack(batch)).mean((2, 3)).numpy())
    return np.concatenate(out)


def run_probe(row: dict, data: dict[str, list[tuple[Path, str]]], classes: list[str]) -> dict:
    backbone = create_backbone(row["backbone"], "auto").eval()
    x = {s: features(backbone, [p for p, _ in data[s]], row["image_size"]) for s in data}
    y = {s: [c for _, c in data[s]] for s in data}
    scaler = StandardScaler().fit(x["train"])
    x = {s: scaler.transform(v) for s, v in x.items()}
    val = {}
    for c in PROBE_C:
        fit = LogisticRegression(C=c, max_iter=3000).fit(x["train"], y["train"])
        val[c] = f1_score(y["val"], fit.predict(x["val"]), labels=classes, average="macro")
    best = max(PROBE_C, key=lambda c: (round(val[c], 6), -c))  # ties: the smaller C
    fit = LogisticRegression(C=best, max_iter=3000).fit(x["train"], y["train"])
    return {
        "all": scores(y["test"], list(fit.predict(x["test"])), classes),
        "val_macro_f1": {str(c): round(v, 4) for c, v in val.items()},
        "chosen_C": best,
    }


def report(store: dict, rows: dict) -> list[str]:
    md = [
        "# Real-world photos (wild-dev test split)",
        "",
        f"`{store['command']}`; each row at the revision it names. Category on the "
        f"{store.get('test_photos', '?')} test photos; shipped models also on the photos of "
        "the five classes they know (they lack Eyebrow Pencil and Makeup Brushes).",
        "",
        "| id | row | accuracy | macro-F1 | accuracy, known classes | most answered | s | rev |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rid in rows:
        r = store["rows"].get(rid)
        if r is None:
            continue
        known = r.get("known_classes", {}).get("accuracy", "")
        most = ", ".join(f"{k} {v}" for k, v in r.get("most_answered", []))
        md.append(
            f"| {rid} | {rows[rid]['description']} | {r['all']['accuracy']:.3f} | "
            f"{r['all']['macro_f1']:.3f} | {known} | {most} | {r['seconds']} | {r['revision']} |"
        )
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="row ids to run (default: all)")
    p.add_argument("--redo", nargs="+", default=[], help="row ids to measure again")
    args = p.parse_args(argv)
    datasets = find_datasets()
    if datasets is None or not (datasets / "wild-dev" / "labels.csv").is_file():
        print("skipped: no ../shared/datasets/wild-dev beside the repository", file=sys.stderr)
        return 0
    rows = yaml.safe_load(ROWS.read_text())
    data = wild_photos(datasets / "wild-dev")
    classes = sorted({c for _, c in data["train"]})
    json_path = RESULTS.with_suffix(".json")
    store = yaml.safe_load(json_path.read_text()) if json_path.is_file() else {"rows": {}}
    store["command"] = "python benchmarks/wild.py"
    store["test_photos"] = len(data["test"])
    for rid in args.only or list(rows):
        if rid not in rows:
            print(f"unknown row {rid!r}; rows: {', '.join(rows)}", file=sys.stderr)
            return 2
        if rid in store["rows"] and rid not in args.redo:
            continue
        print(f"== {rid} {rows[rid]['description']}", flush=True)
        t0 = time.perf_counter()
        row = rows[rid]
        if row["kind"] == "shipped":
            result = run_shipped(row, data["test"], classes)
        else:
            result = run_probe(row, data, classes)
        result |= {"seconds": round(time.perf_counter() - t0, 1), "revision": git_revision()}
        result["command"] = "python benchmarks/wild.py " + shlex.join(["--only", rid])
        store["rows"][rid] = result
        write_results(RESULTS, store, report(store, rows))
    print("\n".join(report(store, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
