"""Real-world photos: wild-dev category and what a wild-trained model must keep (catalogue
Personal Care category, beauty-shades shade, rejecting photos that are not cosmetics, CPU
speed), row by row (benchmarks/rows/wild.yaml), on the test splits (to report) and the
validation splits (for the shipping rule in the rows file's header).

Rows are data: each has a short id, its key in the results, and a kind: ``shipped`` (a
model of the package), ``probe`` (logistic regression on frozen ImageNet features), ``train``
(configs/default.yaml with the row's changes, trained into RUNS/ID-sSEED), ``wise`` (WiSE-FT
of a train row's runs) or ``crop`` (test-time crop; a hook). Results are keyed ``ID`` (rows
without seeds) or ``ID|seedN``; stored ones are skipped on the next start (``--redo ID``
measures again), a finished run in the runs folder is measured without training, an
interrupted one resumes. A shipped model cannot answer the two classes the catalogue lacks
(Eyebrow Pencil, Makeup Brushes): they count as its mistakes. Usage:

    python benchmarks/wild.py [--only W1 W4] [--seeds 0 1 2] [--runs DIR] [--redo W4]
    python benchmarks/wild.py --runs /work/main/runs/wild --no-train  # finished runs only
    python benchmarks/wild.py --speed --only W1 W4   # only the CPU speed again (idle machine)
    python benchmarks/wild.py --pick          # the shipping rule on the stored validation
    python benchmarks/wild.py --report        # only rewrite wild.md from wild.json
    python benchmarks/wild.py --quick --only W4 --seeds 0   # smoke run: 48 photos, 2 epochs

Writes benchmarks/results/wild.json and wild.md (``--quick``: wild-quick.*). Look at the
test split only to report: every choice (the probe's C, the shipped row, the gate's
threshold) is made on the validation splits.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import ROOT, datasets_dir, git_revision, no_datasets, write_results
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler
from wild_eval import (
    CheckpointModel,
    PhotoSets,
    cpu_speed,
    data_config,
    features,
    find_near_duplicates,
    measure,
)
from wild_models import SkipRow, crop_predictor, trained_checkpoint, wise_checkpoint
from wild_report import SEEDED, pick, report

from beautytag.checkpoint import resolve_model
from beautytag.nn.net import create_backbone
from beautytag.runtime import Engine

HERE = Path(__file__).resolve().parent
ROWS = HERE / "rows" / "wild.yaml"
RESULTS = HERE / "results" / "wild"
PROBE_C = (0.01, 0.1, 1.0, 10.0)
FIELDS = {  # kind -> (required, optional) fields besides description and kind
    "shipped": ({"model"}, set()),
    "probe": ({"backbone", "image_size"}, set()),
    "train": (set(), {"changes", "additions"}),
    "wise": ({"of", "alpha"}, {"additions"}),
    "crop": ({"of"}, {"crop", "additions"}),
}
OF_KINDS = {"wise": {"train"}, "crop": {"train", "wise"}}


def read_rows(path: Path = ROWS) -> dict[str, dict]:
    """The rows, checked: known kinds and fields, `of` naming a row of the right kind."""
    rows = yaml.safe_load(path.read_text()) or {}
    for rid, row in rows.items():
        kind = row.get("kind") if isinstance(row, dict) else None
        if kind not in FIELDS:
            raise ValueError(f"{path}: row {rid}: kind must be one of {', '.join(FIELDS)}")
        required, optional = FIELDS[kind]
        fields = set(row) - {"description", "kind"}
        if missing := required - fields:
            raise ValueError(f"{path}: row {rid}: no {', '.join(sorted(missing))}")
        if unknown := fields - required - optional:
            raise ValueError(f"{path}: row {rid}: unknown field {', '.join(sorted(unknown))}")
        if kind in OF_KINDS and rows.get(row["of"], {}).get("kind") not in OF_KINDS[kind]:
            raise ValueError(f"{path}: row {rid}: of: {row['of']} is not a {OF_KINDS[kind]} row")
    return rows


# ---------------------------------------------------------------- rows without seeds


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
    """A shipped model through the Engine (predict_files) on wild-dev test."""
    engine = Engine(row["model"])
    known = set(engine.schema["category"].classes)
    preds = list(engine.predict_files([p for p, _ in split]))
    pred = [p["category"].label if p.ok else "" for p in preds]
    truth = [c for _, c in split]
    answered: dict[str, int] = {}
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


def run_probe(row: dict, data: dict[str, list[tuple[Path, str]]], classes: list[str]) -> dict:
    """Logistic regression on frozen features; C chosen by wild-dev val macro-F1."""
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


def probe_speed(row: dict) -> dict[str, Any]:
    """images/s of the probe's frozen backbone (pooled features; the regression is free)."""
    backbone = create_backbone(row["backbone"], "none").eval()
    return cpu_speed(lambda b: backbone.forward_features(b).mean((2, 3)), row["image_size"])


# ---------------------------------------------------------------- measuring


def measured_model(
    rid: str, rows: dict, seed: int, args: argparse.Namespace, datasets: Path
) -> tuple[Any, dict[str, Any]]:
    """The model of a seeded row (train, wise, crop) and how it was made."""
    row = rows[rid]
    if row["kind"] == "train":
        path, info = trained_checkpoint(
            rid, row, seed, args.runs, datasets, args.quick, not args.no_train
        )
    elif row["kind"] == "wise":
        path, info = wise_checkpoint(rid, row, rows, seed, args.runs, datasets, args.quick)
    else:
        base = measured_model(row["of"], rows, seed, args, datasets)[1]["checkpoint"]
        return crop_predictor(rid, row, Path(base)), {"checkpoint": base}
    return CheckpointModel(path), info | {"checkpoint": str(path)}


def columns(model: Any, sets: PhotoSets) -> dict[str, Any]:
    return measure(model, model.cfg, model.image_size, sets, model.speed)


def stamp(result: dict, command: str) -> dict:
    return result | {"revision": git_revision(), "command": command}


def speed_again(rid: str, row: dict, entry: dict, command: str) -> None:
    """Measure a stored result's CPU speed again (on an idle machine), in place."""
    if row["kind"] == "probe":
        speed = probe_speed(row)
    elif row["kind"] == "crop":
        raise SkipRow(f"{rid}: kind crop: speed not measured again (hook)")
    else:
        checkpoint = entry["columns"].get("checkpoint") or resolve_model(row["model"])
        speed = CheckpointModel(checkpoint).speed()
    entry["columns"]["speed"] = speed | {"command": command, "revision": git_revision()}


def run_rows(args: argparse.Namespace, rows: dict, store: dict, datasets: Path, out: Path) -> None:
    """Measure the selected rows not stored yet, storing each as it finishes."""
    data = wild_photos(datasets / "wild-dev")
    classes = sorted({c for _, c in data["train"]})
    sets: PhotoSets | None = None
    command = "python benchmarks/wild.py " + shlex.join(args.argv)
    for rid in args.only or list(rows):
        row, redo = rows[rid], rid in args.redo
        for seed in args.seeds if row["kind"] in SEEDED else [None]:
            key = rid if seed is None else f"{rid}|seed{seed}"
            entry = {} if redo else dict(store["rows"].get(key, {}))
            if args.speed and "columns" in entry:
                print(f"== {key} speed", flush=True)
                speed_again(rid, row, entry, command)
                store["rows"][key] = entry
                write_results(out, store, report(store, rows))
                continue
            if "columns" in entry or args.speed:
                continue
            print(f"== {key} {row['description']}", flush=True)
            t0 = time.perf_counter()
            if row["kind"] == "shipped" and "all" not in entry:
                entry = stamp(run_shipped(row, data["test"], classes), command)
            elif row["kind"] == "probe" and "all" not in entry:
                entry = stamp(run_probe(row, data, classes), command)
            if "all" in entry and "seconds" not in entry:
                entry["seconds"] = round(time.perf_counter() - t0, 1)
            if row["kind"] == "probe":
                entry["columns"] = stamp({"speed": probe_speed(row)}, command)
            else:
                try:
                    if row["kind"] == "shipped":
                        model, made = CheckpointModel(resolve_model(row["model"])), {}
                    else:
                        model, made = measured_model(rid, rows, seed, args, datasets)
                except SkipRow as e:
                    print(f"skipped: {e}", flush=True)
                    continue
                sets = sets or PhotoSets(data_config(datasets, 48 if args.quick else 0))
                entry["columns"] = stamp(columns(model, sets) | made, command)
                if seed is not None:
                    entry["description"] = row["description"]
            store["rows"][key] = entry
            write_results(out, store, report(store, rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="row ids to run (default: all)")
    p.add_argument("--redo", nargs="+", default=[], help="row ids to measure again")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="of the seeded rows")
    p.add_argument("--runs", type=Path, help="trained runs' folder (default: runs/wild)")
    p.add_argument("--no-train", action="store_true", help="measure finished runs only")
    p.add_argument("--quick", action="store_true", help="smoke run: 48 photos, 2 epochs")
    p.add_argument("--speed", action="store_true", help="only measure stored rows' speed again")
    p.add_argument("--pick", action="store_true", help="apply the shipping rule and exit")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown")
    p.add_argument("--near-duplicates", action="store_true", help="find them again")
    p.add_argument("--rows", type=Path, default=ROWS, help="the rows file (default: wild.yaml)")
    p.add_argument("--results", type=Path, help="results file stem (default: results/wild)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    default_runs = "runs/wild-quick" if args.quick else "runs/wild"
    args.runs = (args.runs or ROOT / default_runs).resolve()
    out = args.results or (RESULTS.with_name("wild-quick") if args.quick else RESULTS)
    out = out.with_suffix("")
    rows = read_rows(args.rows)
    if unknown := [r for r in (args.only or []) + args.redo if r not in rows]:
        print(f"unknown row {unknown[0]!r}; rows: {', '.join(rows)}", file=sys.stderr)
        return 2
    json_path = out.with_suffix(".json")
    store = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}}
    if args.pick or args.report:
        if args.report:
            write_results(out, store, report(store, rows))
        print("\n".join(pick(store, rows) if args.pick else report(store, rows)))
        return 0
    datasets = datasets_dir()
    if no_datasets(datasets, "wild-dev", "fashion-products-small", "beauty-shades"):
        return 0
    if args.near_duplicates:
        found = find_near_duplicates(datasets, "python benchmarks/wild.py --near-duplicates")
        print(f"{found['count']} of {found['test_photos']} Personal Care test photos")
    store["command"] = "python benchmarks/wild.py"
    store["test_photos"] = len(wild_photos(datasets / "wild-dev")["test"])
    run_rows(args, rows, store, datasets, out)
    print("\n".join(report(store, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
