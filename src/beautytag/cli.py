"""The ``beautytag`` command: train, evaluate, predict.

Errors a user can cause (a bad config, a missing model, an unreadable folder) end with a
one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from beautytag import __version__


def find_datasets() -> Path | None:
    """``../shared/datasets`` beside the current folder or beside this checkout, if any."""
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        cand = base.parent / "shared" / "datasets"
        if cand.is_dir():
            return cand
    return None


def cmd_train(args: argparse.Namespace) -> int:
    from beautytag.config import load_config
    from beautytag.train import train

    cfg = load_config(args.config)
    if args.out:
        cfg.train.out_dir = args.out
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.limit is not None:
        cfg.data.limit = args.limit
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from beautytag.config import load_config
    from beautytag.evaluate import evaluate

    cfg = load_config(args.config) if args.config else None
    out = args.out or str(Path(args.model).with_suffix("")) + f"-eval-{args.split}"
    result = evaluate(
        args.model,
        split=args.split,
        out_dir=out,
        config=cfg,
        sources=args.source,
        flip_tta=args.tta_flip,
    )
    print(json.dumps(result["metrics"], indent=2))
    print(f"report written to {out}/report.md", file=sys.stderr)
    return 0


def csv_row(result: dict) -> dict[str, str]:
    row = {"file": result["file"], "error": result["error"] or ""}
    for name, v in (result["attributes"] or {}).items():
        if "label" in v:
            row[name], row[f"{name}_score"] = v["label"], f"{v['score']:.4f}"
        elif "labels" in v:
            row[name] = ";".join(label for label, _ in v["labels"])
        else:
            row[name], row[f"{name}_lab"] = v["hex"], " ".join(f"{t:.2f}" for t in v["lab"])
    return row


def cmd_predict(args: argparse.Namespace) -> int:
    from beautytag.engine import Engine, expand_paths

    paths = args.paths
    if not paths:
        datasets = find_datasets()
        if datasets is None or not (datasets / "beauty-shades" / "images").is_dir():
            print(
                "usage: beautytag predict PHOTO_OR_FOLDER [...]  (no photos given, and no "
                "../shared/datasets/beauty-shades to demo on)",
                file=sys.stderr,
            )
            return 2
        paths = [str(datasets / "beauty-shades" / "images")]
        print(f"no photos given: predicting the demo photos in {paths[0]}", file=sys.stderr)
    engine = Engine(
        args.model, batch_size=args.batch_size, top_k=args.top_k, threshold=args.threshold
    )
    files = expand_paths(paths)
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    writer = None
    t0, n, bad = time.perf_counter(), 0, 0
    try:
        for result in engine.predict_files(files):
            n += 1
            bad += result["error"] is not None
            if args.format == "jsonl":
                out.write(json.dumps(result) + "\n")
            else:
                row = csv_row(result)
                if writer is None:
                    fields = ["file", "error"] + [k for k in csv_fields(engine) if k != "file"]
                    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
                    writer.writeheader()
                writer.writerow(row)
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    dt = time.perf_counter() - t0
    print(
        f"{n} images ({bad} skipped with errors) in {dt:.1f} s: {n / dt if dt else 0:.1f} images/s",
        file=sys.stderr,
    )
    return 0


def csv_fields(engine) -> list[str]:
    fields = []
    for a in engine.schema.attributes:
        fields += {
            "single": [a.name, f"{a.name}_score"],
            "multi": [a.name],
            "shade": [a.name, f"{a.name}_lab"],
        }[a.kind]
    return fields


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beautytag", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"beautytag {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    t.add_argument("--out", help="output folder (default: the config's train.out_dir)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--limit", type=int, help="at most N images per source and split (smoke)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="measure a model on a labelled split")
    e.add_argument("model", help="a checkpoint (.pt)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--config", help="evaluate on this config's data instead of the model's")
    e.add_argument("--source", action="append", help="only this data source (repeatable)")
    e.add_argument("--tta-flip", action="store_true", help="average with a mirrored copy")
    e.add_argument("--out", help="report folder (default: beside the model)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="attributes of photos (files or folders)")
    r.add_argument("paths", nargs="*")
    r.add_argument("--model", help="a checkpoint (default: the shipped model)")
    r.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    r.add_argument("--output", "-o", help="write here instead of standard output")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--top-k", type=int, default=3)
    r.add_argument("--threshold", type=float, default=0.5, help="for multi-label tags")
    r.set_defaults(func=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    from beautytag.images import ImageError
    from beautytag.model import WeightsError
    from beautytag.schema import SchemaError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SchemaError, WeightsError, ImageError, FileNotFoundError, ValueError) as e:
        print(f"beautytag {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `beautytag predict ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
