"""Images per second of ``beautytag predict -o``: a plain run against ``--ray`` with 1, 2, ...
workers on a local Ray cluster, on this machine.

Each run is the real command in a subprocess writing a fresh JSON lines file. Two rates are
reported: the run's own (the CLI's summary line: photos over the time from the model loaded
to the last photo; for Ray, the local cluster and its workers start within it) and the
wall-clock one (Python's and torch's start-up included). The photos are the first --photos
of the demo photos (../shared/datasets/beauty-shades/images), or generated 640x480 JPEGs
where there are none.
The load average is recorded: on a shared machine the numbers move with it. Usage:

    python benchmarks/batch.py [--photos 200] [--workers 1 2] [--batch-size 32] [--model M]

Writes benchmarks/results/batch.json and .md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, git_revision, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "batch"
DEMO = ROOT.parent / "shared" / "datasets" / "beauty-shades" / "images"
RATE = re.compile(r"(\d+) images? \((\d+) skipped with errors\) in ([\d.]+) s: ([\d.]+) images/s")


def photo_list(n: int, tmp: Path) -> tuple[list[str], str]:
    """`n` photos (the demo photos, or generated ones) and where they come from."""
    found = sorted(p for p in DEMO.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(found) >= n:
        return [str(p) for p in found[:n]], f"the first {n} of {DEMO.relative_to(ROOT.parent)}"
    from PIL import Image

    paths = []
    for i in range(n):
        path = tmp / f"p{i:04d}.jpg"
        Image.new("RGB", (640, 480), (i * 37 % 256, 120, 255 - i % 256)).save(path)
        paths.append(str(path))
    return paths, f"{n} generated 640x480 JPEGs"


def run(photos_file: Path, out: Path, args: argparse.Namespace, ray_workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "beautytag.cli", "predict", "--from-list", str(photos_file)]
    cmd += ["-o", str(out), "--force", "--batch-size", str(args.batch_size)]
    if args.model:
        cmd += ["--model", args.model]
    if ray_workers:
        cmd += ["--ray", "--ray-workers", str(ray_workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    match = RATE.search(done.stderr)
    if done.returncode not in (0, 1) or not match:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-2000:]}")
    n, _, seconds, rate = match.groups()
    return {
        "run": f"ray, {ray_workers} worker{'s' * (ray_workers > 1)}" if ray_workers else "plain",
        "workers": ray_workers or 1,
        "photos": int(n),
        "run_seconds": float(seconds),
        "images_per_s": float(rate),
        "wall_seconds": round(wall, 2),
        "wall_images_per_s": round(int(n) / wall, 2),
        "load_average_before": round(load, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=200, help="photos per run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts")
    p.add_argument("--batch-size", type=int, default=32, help="photos per model call")
    p.add_argument("--model", help="the model (default: the shipped default)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos, source = photo_list(args.photos, tmp)
        listed = tmp / "photos.txt"
        listed.write_text("\n".join(photos) + "\n")
        rows = [run(listed, tmp / "plain.jsonl", args, None)]
        rows += [run(listed, tmp / f"ray{w}.jsonl", args, w) for w in args.workers]
    command = "python benchmarks/batch.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    payload = {
        "command": command.strip(),
        "revision": git_revision(),
        "machine": f"{os.cpu_count()} CPUs, no GPU used",
        "photos": source,
        "model": args.model or "default",
        "batch_size": args.batch_size,
        "runs": rows,
    }
    md = [
        "# Batch tagging: plain against Ray",
        "",
        f"`{payload['command']}` at {payload['revision']} on {payload['machine']}; "
        f"{source}, model {payload['model']}, batch size {args.batch_size}.",
        "",
        "| run | Ray workers | images/s (run) | wall s | images/s (wall) | load before |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    md += [
        f"| {r['run']} | {r['workers'] if r['run'] != 'plain' else '-'} | "
        f"{r['images_per_s']:.1f} | {r['wall_seconds']:.1f} | {r['wall_images_per_s']:.1f} | "
        f"{r['load_average_before']:.1f} |"
        for r in rows
    ]
    md += [
        "",
        "images/s (run): as predict reports it, from the model loaded to the last photo (for "
        "Ray this includes starting the local cluster and its workers); wall: the whole "
        "command, Python's and torch's start-up included. The load average is the machine's "
        "before each run (it is shared by other work, so the numbers are noisy).",
    ]
    write_results(RESULTS, payload, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
