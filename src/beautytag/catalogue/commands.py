"""The catalogue's commands: ``beautytag predict``, ``review`` and ``report`` (the CLI
parses their arguments and calls these; see ``beautytag.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def output_format(args: argparse.Namespace) -> str:
    """--format, or else the -o file's suffix (.csv, .parquet), or else JSON lines."""
    if args.format:
        return args.format
    suffix = Path(args.output or "").suffix.lower()
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "jsonl")


def predict(args: argparse.Namespace) -> int:
    """``beautytag predict``: photos -> one record each, to standard output or -o (resumable)."""
    from beautytag.catalogue.batch import read_list, write_records
    from beautytag.catalogue.records import csv_fields, open_output
    from beautytag.runtime.engine import Engine, expand_paths

    paths = list(args.paths)
    if args.from_list:
        paths += read_list(args.from_list)
    if not paths and not args.from_list:
        from beautytag.config import find_datasets

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
    photos = expand_paths(paths)
    if not photos:
        where = ", ".join(map(str, paths)) or f"the list {args.from_list}"
        print(f"beautytag predict: no photos found in {where}", file=sys.stderr)
        return 2
    fmt = output_format(args)
    target = Path(args.output) if args.output and args.output != "-" else None
    if target and target.exists() and any(p.exists() and p.samefile(target) for p in photos):
        raise ValueError(f"{args.output}: the output would overwrite a photo to predict")
    if target is None and (args.resume or fmt == "parquet"):
        raise ValueError(f"{'--resume' if args.resume else '--format parquet'} needs -o FILE")
    engine = Engine(
        args.model,
        batch_size=args.batch_size,
        top_k=args.top_k,
        threshold=args.threshold,
        tta_flip=args.tta_flip,
        crop=args.crop,
    )
    model = engine.model_id
    fields = csv_fields(engine.schema)
    writer, done = open_output(target, fmt, args.resume, args.force, fields, model)
    todo = [str(f) for f in photos if str(f) not in done]
    if done:
        already = len(photos) - len(todo)
        print(f"resuming: {already} of the photos already in {target}", file=sys.stderr)
    if target is None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    if args.ray:
        from beautytag.catalogue.distributed import ray_records

        records = ray_records(
            todo,
            engine,
            model,
            address=args.ray_address,
            workers=args.ray_workers,
        )
    else:
        records = (
            {"file": r.file, "model": model} | r.to_dict()
            for r in engine.predict_items([(f, Path(f)) for f in todo])
        )
    t0 = time.perf_counter()
    with writer:
        written = write_records(records, writer, len(todo))
    n, bad, dt = written.count, written.errors, time.perf_counter() - t0
    print(
        f"{n} image{'' if n == 1 else 's'} ({bad} skipped with errors) in {dt:.1f} s: "
        f"{n / dt if dt else 0:.1f} images/s",
        file=sys.stderr,
    )
    if written.interrupted:
        again = f"; run again with --resume to finish {target}" if target else ""
        print(f"interrupted after {n} of {len(todo)} photos{again}", file=sys.stderr)
        return 130
    return 1 if bad else 0


def model_schema(name: str | None):  # -> Schema
    """The attributes of a --model argument (a checkpoint, an export or a shipped name)."""
    from beautytag.runtime.engine import Engine

    return Engine(name).schema


def review(args: argparse.Namespace) -> int:
    """``beautytag review``: doubtful answers -> Label Studio tasks, or an export -> labels.csv."""
    from beautytag.catalogue.records import read_records
    from beautytag.catalogue.review import (
        import_export,
        labeling_config,
        review_tasks,
        write_labels_csv,
    )

    out = Path(args.output)
    if args.import_export:
        if args.predictions:
            raise ValueError("give either PREDICTIONS or --import EXPORT, not both")
        attributes = []
        if args.model:
            schema = model_schema(args.model)
            attributes = [a.name for a in schema.attributes if a.classes]
        rows, skipped = import_export(args.import_export, relative_to=out.parent, split=args.split)
        write_labels_csv(rows, out, attributes)
        for why in skipped:
            print(f"skipped {why}", file=sys.stderr)
        print(f"{len(rows)} reviewed photos written to {out}", file=sys.stderr)
        return 0
    if not args.predictions:
        raise ValueError("give PREDICTIONS (a predict output) or --import EXPORT.json")
    tasks = review_tasks(
        read_records(args.predictions), args.attribute, args.below, args.image_prefix
    )
    try:
        out.write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{out}: cannot write ({e.strerror})") from None
    print(labeling_config(model_schema(args.model)), end="")
    print(
        f"{len(tasks)} tasks ({args.attribute} under {args.below}) written to {out}; paste the "
        "labelling config above into the Label Studio project (Settings > Labeling Interface)",
        file=sys.stderr,
    )
    return 0


def report(args: argparse.Namespace) -> int:
    """``beautytag report``: a predict output -> one HTML page."""
    from beautytag.catalogue.records import read_records
    from beautytag.catalogue.report import write_report

    records = read_records(args.predictions)
    write_report(records, args.output, attribute=args.attribute, thumbnails=args.thumbnails)
    print(f"report on {len(records)} photos written to {args.output}", file=sys.stderr)
    return 0
