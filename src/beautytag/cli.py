"""The ``beautytag`` command: train, evaluate, calibrate, predict, review, report, serve, export.

Errors a user can cause (a bad config, a missing model, an unreadable folder) end with a
one-line message and exit status 2, never a traceback. ``predict`` skips a photo it cannot
use, reports it and goes on; it then exits with status 1 (as ``cp`` or ``cat`` do when one
file of several fails), so that a script notices.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from beautytag import __version__

if TYPE_CHECKING:
    pass


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value


def share(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from beautytag.config import check_ranges, load_config
    from beautytag.training.train import train

    cfg = load_config(args.config)
    if args.out:
        cfg.train.out_dir = args.out
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.limit is not None:
        cfg.data.limit = args.limit
    if args.image_size is not None:
        cfg.model.image_size = args.image_size
    check_ranges(cfg.model, cfg.data, cfg.train, "command line")
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from beautytag.checkpoint import resolve_model
    from beautytag.config import load_config
    from beautytag.training.evaluate import evaluate

    cfg = load_config(args.config) if args.config else None
    first = str(Path(args.model[0]).with_suffix(""))
    out = args.out or first + ("-ensemble" if len(args.model) > 1 else "") + f"-eval-{args.split}"
    result = evaluate(
        [resolve_model(m) for m in args.model],
        split=args.split,
        out_dir=out,
        config=cfg,
        sources=args.source,
        flip_tta=args.tta_flip,
    )
    print(json.dumps(result["metrics"], indent=2))
    for name, why in result["not_compared"].items():
        print(f"not measured: {name}: {why}", file=sys.stderr)
    print(f"report written to {out}/report.md", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from beautytag.checkpoint import model_source
    from beautytag.config import load_config
    from beautytag.runtime.gate import summary as gate_summary
    from beautytag.training.calibrate import calibrate

    out = Path(args.out or f"{Path(args.model).with_suffix('')}-calibrated.pt")
    model = model_source(args.model, out, "the calibrated model")
    if out.suffix != ".pt":
        raise ValueError(f"--out {out}: a model file must end in .pt")
    cfg = load_config(args.config) if args.config else None
    report = calibrate(model, out, split=args.split, config=cfg, sources=args.source)
    print(json.dumps(report, indent=2))
    for v in report.values():
        if isinstance(v, dict) and "warning" in v:
            print(f"warning: {v['warning']}", file=sys.stderr)
    if "gate" in report:
        print(f"{args.split} split: {gate_summary(report['gate'])}", file=sys.stderr)
    print(f"calibrated model written to {out}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from beautytag.catalogue.commands import predict

    return predict(args)


def cmd_review(args: argparse.Namespace) -> int:
    from beautytag.catalogue.commands import review

    return review(args)


def cmd_report(args: argparse.Namespace) -> int:
    from beautytag.catalogue.commands import report

    return report(args)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from beautytag.checkpoint import TORCHSCRIPT_SUFFIXES
    from beautytag.serve.server import serve

    backend = args.backend
    if backend is None:  # ONNX Runtime, but a TorchScript file can only run with torch
        suffix = Path(args.model or "").suffix.lower()
        backend = "torch" if suffix in TORCHSCRIPT_SUFFIXES else "onnxruntime"
    key = args.api_key or os.environ.get("BEAUTYTAG_API_KEY") or None
    if args.api_key_file:  # a file keeps the key out of `ps` and the shell's history
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{args.api_key_file}: cannot read the API key ({e})") from None
        if key is None:
            raise ValueError(f"{args.api_key_file}: the API key file is empty")
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key", file=sys.stderr)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
        workers=args.workers,
        threads=args.threads,
        backend=backend,
        api_key=key,
        index=args.index,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from beautytag.export import export_command

    report = export_command(
        args.model,
        args.format,
        args.out,
        args.opset,
        args.quantize,
        args.photos,
        args.accuracy_split,
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from beautytag.search.commands import index_photos

    summary, failed = index_photos(
        args.paths, args.output, args.model, args.resume, args.remove or (), args.batch_size
    )
    print(json.dumps(summary))
    return 1 if failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    from beautytag.search.commands import search_photos

    bad = search_photos(
        args.index, args.photos, args.shade, args.top_k, args.where, args.model, sys.stdout
    )
    return 1 if bad else 0


class DefaultsShown(argparse.HelpFormatter):
    """--help names each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        return text if quiet or "%(default)" in text else text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    shown = DefaultsShown
    p = argparse.ArgumentParser(
        prog="beautytag", description=__doc__.splitlines()[0], formatter_class=shown
    )
    p.add_argument("--version", action="version", version=f"beautytag {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=shown)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    t.add_argument("--out", help="output folder (default: the config's train.out_dir)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--limit", type=int, help="at most N images per source and split (smoke)")
    t.add_argument("--image-size", type=int, help="input side in px (default: the config's)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="measure a model on a labelled split")
    e.add_argument(
        "model",
        nargs="+",
        help="a checkpoint (.pt), or a shipped model: default, accurate; several: an ensemble "
        "(their outputs averaged)",
    )
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split")
    e.add_argument(
        "--config",
        help="evaluate on this config's data instead of the model's (other attributes or "
        "classes: only those both share are measured)",
    )
    e.add_argument(
        "--source",
        action="append",
        help="only this data source of the config, e.g. fashion (repeatable)",
    )
    e.add_argument("--tta-flip", action="store_true", help="average with a mirrored copy")
    e.add_argument(
        "--out",
        help="report folder (default: beside a checkpoint, NAME-eval-SPLIT here for a shipped "
        "model)",
    )
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser(
        "calibrate",
        help="make class scores the chance of being right (temperature scaling on a split) "
        "and set the gate's threshold",
    )
    c.add_argument("model", help="a checkpoint (.pt), or a shipped model: default, accurate")
    c.add_argument(
        "--out",
        help="the calibrated model, not the model itself (default: MODEL-calibrated.pt, here "
        "for a shipped model)",
    )
    c.add_argument(
        "--split", default="val", choices=["train", "val", "test"], help="fit on this split"
    )
    c.add_argument("--config", help="fit on this config's data instead of the model's")
    c.add_argument("--source", action="append", help="only this data source (repeatable)")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser(
        "predict",
        help="attributes of photos (files or folders)",
        epilog="exit status: 0 every photo predicted, 1 some skipped (each reported in the "
        "output, the rest predicted), 2 nothing run (a usage or model error)",
    )
    r.add_argument("paths", nargs="*", help="photos or folders (walked for image files)")
    r.add_argument(
        "--model",
        help="a checkpoint (.pt), an exported model (.onnx, .ts) or a shipped model's name: "
        "default (96 px, fast), accurate (192 px)",
    )
    r.add_argument(
        "--format",
        choices=["jsonl", "csv", "parquet"],
        help="output format (default: by the -o file's suffix, .csv or .parquet, else jsonl)",
    )
    r.add_argument(
        "--output",
        "-o",
        help="write here instead of standard output; an existing file is refused unless "
        "--resume or --force",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="add to -o the photos it lacks (by path); a torn last record is repaired",
    )
    r.add_argument("--force", action="store_true", help="overwrite an existing -o file")
    r.add_argument(
        "--from-list",
        metavar="FILE",
        help="also the photos or folders listed in FILE, one a line (-: standard input)",
    )
    r.add_argument("--batch-size", type=positive_int, default=32, help="photos per model call")
    r.add_argument("--top-k", type=positive_int, default=3, help="answers per class attribute")
    r.add_argument("--threshold", type=share, default=0.5, help="for multi-label tags")
    r.add_argument(
        "--tta-flip",
        action="store_true",
        help="average with a mirrored copy (two model calls per photo)",
    )
    r.add_argument(
        "--crop",
        action="store_true",
        help="also predict a crop around the product and average (up to about 2x slower; "
        "a .pt or shipped model only)",
    )
    r.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data (pip install 'beautytag[ray]'): a local cluster, or --ray-address",
    )
    r.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster, e.g. HOST:6379")
    r.add_argument(
        "--ray-workers",
        type=positive_int,
        help="model workers (default: 2 on a local cluster, the cluster's GPUs or CPUs/4)",
    )
    r.set_defaults(func=cmd_predict)

    w = sub.add_parser(
        "review",
        help="doubtful answers to Label Studio tasks; a Label Studio export back to labels.csv",
        epilog="tasks: beautytag review PREDICTIONS -o tasks.json (prints the labelling config); "
        "back: beautytag review --import EXPORT.json -o labels.csv",
    )
    w.add_argument("predictions", nargs="?", help="a predict output (JSONL, CSV or Parquet)")
    w.add_argument("--output", "-o", required=True, help="tasks.json, or with --import labels.csv")
    w.add_argument(
        "--import",
        dest="import_export",
        metavar="EXPORT",
        help="a Label Studio JSON export to turn into labels.csv",
    )
    w.add_argument("--attribute", default="category", help="the class attribute to review")
    w.add_argument("--below", type=share, default=0.6, help="review answers scoring under this")
    w.add_argument(
        "--image-prefix",
        default="",
        help="put before each photo path in the task, e.g. /data/local-files/?d= for Label "
        "Studio's local files (paths then relative to its document root)",
    )
    w.add_argument(
        "--model",
        help="the model whose attributes the labelling config (and labels.csv's columns) has "
        "(default: the shipped default)",
    )
    w.add_argument("--split", default="train", help="with --import: the split column of labels.csv")
    w.set_defaults(func=cmd_review)

    o = sub.add_parser("report", help="a one-page HTML overview of a predict output")
    o.add_argument("predictions", help="a predict output (JSONL, CSV or Parquet)")
    o.add_argument("--output", "-o", required=True, help="the HTML page to write")
    o.add_argument("--attribute", default="category", help="whose least confident are shown")
    o.add_argument("--thumbnails", type=int, default=24, help="least confident photos shown")
    o.set_defaults(func=cmd_report)

    v = sub.add_parser("serve", help="HTTP service: POST /v1/predict, a web page at /")
    v.add_argument(
        "--model",
        help="a checkpoint, an .onnx or TorchScript file, or a shipped model: default, accurate",
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=int, default=8000, help="port to listen on")
    v.add_argument("--max-batch", type=int, default=16, help="images per model call")
    v.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait")
    v.add_argument("--queue-size", type=int, default=64, help="waiting images; more -> 503")
    v.add_argument("--timeout", type=float, default=10.0, help="seconds per request; -> 504")
    v.add_argument("--workers", type=int, default=2, help="image decoding threads")
    v.add_argument(
        "--backend",
        choices=["onnxruntime", "torch", "auto"],
        help="onnxruntime (default; a checkpoint is exported at start; a TorchScript file runs "
        "with torch), torch, or auto (by file type)",
    )
    v.add_argument(
        "--threads",
        type=int,
        help="model threads (default: all CPUs but one, left for HTTP and decoding)",
    )
    v.add_argument("--index", help="a search index folder: adds /v1/search (beautytag index)")
    keys = v.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        help="require this X-API-Key (seen by `ps`: prefer $BEAUTYTAG_API_KEY or --api-key-file)",
    )
    keys.add_argument("--api-key-file", help="require the X-API-Key written in this file")
    v.set_defaults(func=cmd_serve)

    ix = sub.add_parser(
        "index",
        help="a search index of photos: embeddings, attributes and shades (see search)",
        epilog="exit status: 0 every photo indexed, 1 some skipped (each reported), 2 nothing "
        "run (a usage, model or index error)",
    )
    ix.add_argument("paths", nargs="*", help="photos or folders (walked for image files)")
    ix.add_argument("-o", "--output", required=True, help="the index folder")
    ix.add_argument("--model", help="a checkpoint (.pt) or a shipped model: default, accurate")
    ix.add_argument("--resume", action="store_true", help="add to the index, skip its photos")
    ix.add_argument("--remove", nargs="+", metavar="FILE", help="remove these photos")
    ix.add_argument("--batch-size", type=positive_int, default=32, help="photos per model call")
    ix.set_defaults(func=cmd_index)

    sr = sub.add_parser(
        "search",
        help="the indexed photos most like photos, or nearest a shade (JSON lines)",
        epilog="exit status: 0 done, 1 some photos skipped, 2 nothing run (usage or index error)",
    )
    sr.add_argument("index", help="an index folder from `beautytag index`")
    sr.add_argument("photos", nargs="*", help="photos or folders to search with")
    sr.add_argument("--shade", help="rank by CIEDE2000 to this colour: #rrggbb or L,a,b")
    sr.add_argument("--top-k", type=positive_int, default=10, help="results per query")
    sr.add_argument(
        "--where", action="append", default=[], metavar="ATTR=VALUE", help="filter (repeatable)"
    )
    sr.add_argument("--model", help="the model that made the index (default: the index's)")
    sr.set_defaults(func=cmd_search)

    x = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript, parity-checked")
    x.add_argument("model", help="a checkpoint (.pt), or a shipped model: default, accurate")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="file type")
    x.add_argument(
        "--out",
        help="output file, not the model itself; must end in .onnx for onnx, .ts (or .torchscript, "
        ".jit) for torchscript (default: MODEL with .onnx or .ts)",
    )
    x.add_argument("--opset", type=int, default=17, help="ONNX opset")
    x.add_argument("--quantize", choices=["dynamic", "static"], help="also write an int8 ONNX")
    x.add_argument(
        "--photos",
        nargs="+",
        help="photos or folders for the parity check (the first 96 photos found) and static "
        "calibration (the first 64)",
    )
    x.add_argument(
        "--accuracy-split",
        choices=["val", "test", "none"],
        default="test",
        help="with --quantize: measure the accuracy cost on this split of the model's data",
    )
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors import nothing heavy
    from beautytag.images import ImageError
    from beautytag.nn.net import WeightsError
    from beautytag.schema import SchemaError

    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `beautytag predict ... | head`
        sys.stderr.close()
        return 0
    except (SchemaError, WeightsError, ImageError, OSError, ValueError) as e:
        print(f"beautytag {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
