"""`beautytag predict` on 1,000 photos: real catalogue and retailer photos plus a handful of
broken files, through the real command line. Checks that no traceback appears, that every
file gets exactly one answer, that exactly the broken files are reported as errors (exit
status 1, as the command gives when it skipped a file), and reports the throughput on this
machine. The results are written only when those checks pass.

    python benchmarks/predict.py [--n 1000] [--model PATH]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import datasets_dir, git_revision, no_datasets
from PIL import Image

from beautytag.cli import positive_int

ROOT = Path(__file__).resolve().parents[1]
DATA = datasets_dir()
RESULTS = ROOT / "benchmarks" / "results"


def broken_files(folder: Path) -> list[Path]:
    """One file of each kind of trouble a real upload folder holds."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (200, 40, 90)).save(buf, format="JPEG")
    files = {
        "truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 3],
        "text.jpg": b"not an image at all",
        "empty.png": b"",
        "random.webp": bytes(range(256)) * 8,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    # a decompression bomb: 48 Mpx of one colour, over beautytag.images.MAX_PIXELS, in a
    # file of a few dozen kilobytes
    Image.new("L", (8000, 6000)).save(folder / "bomb.png")
    return sorted(folder.iterdir())


def photo_list(n: int, tmp: Path) -> list[Path]:
    bad = broken_files(tmp / "broken")
    shades = sorted((DATA / "beauty-shades" / "images").iterdir())
    rows = list(csv.DictReader((DATA / "fashion-products-small" / "labels.csv").open()))
    catalogue = [
        DATA / "fashion-products-small" / r["file_name"]
        for r in rows
        if r["masterCategory"] == "Personal Care"
    ]
    return (bad + shades + catalogue)[:n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=1000, help="photos, broken ones first")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    args = p.parse_args()
    if no_datasets(DATA, "beauty-shades"):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = photo_list(args.n, Path(tmp))
        broken = {f.name for f in files if f.parent.name == "broken"}
        listing = Path(tmp) / "files.txt"
        cmd = [sys.executable, "-m", "beautytag.cli", "predict", *map(str, files)]
        cmd += ["--model", args.model] if args.model else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        listing.write_text("\n".join(map(str, files)))
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    errors = [r for r in lines if r["error"]]
    result = {
        "files": len(files),
        "answers": len(lines),
        "errors": len(errors),
        "error_examples": {Path(r["file"]).name: r["error"] for r in errors[:10]},
        "exit_code": proc.returncode,
        "traceback": "Traceback" in proc.stderr,
        "wall_seconds": round(seconds, 1),
        "images_per_second": round(len(files) / seconds, 1),
        "cli_summary": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "command": shlex.join(["python", "benchmarks/predict.py", *sys.argv[1:]]),
        "revision": git_revision(),
    }
    print(json.dumps(result, indent=2))
    ok = (
        proc.returncode == (1 if broken else 0)
        and not result["traceback"]
        and len(lines) == len(files)
        and {Path(r["file"]).name for r in errors} == broken
    )
    if not ok:
        print("failed: results not written", proc.stderr[-2000:], sep="\n", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict.json").write_text(json.dumps(result, indent=2))
    md = [
        "# `beautytag predict` on real photos",
        "",
        f"Command: `{result['command']}` at {result['revision']} (measured on "
        f"{result['machine']}; wall time "
        "includes starting Python and loading the model).",
        "",
        "| files | answers | errors reported | exit code | traceback | wall s | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {result['files']} | {result['answers']} | {result['errors']} | "
        f"{result['exit_code']} | {result['traceback']} | {result['wall_seconds']} | "
        f"{result['images_per_second']} |",
        "",
        "Errors reported: " + "; ".join(f"`{k}`: {v}" for k, v in result["error_examples"].items()),
        "",
    ]
    (RESULTS / "predict.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
