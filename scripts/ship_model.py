"""Measure a trained checkpoint for the model card and pack it (fp16) as the shipped default.

    python scripts/ship_model.py runs/default/best.pt [--name default|accurate]

Packs it as src/beautytag/weights/NAME.pt and writes benchmarks/results/NAME_model.json and
.md: test (and validation) metrics of the
Personal Care catalogue (category, color, finish, function) and of beauty-shades (shade,
category, finish), each on its own split; numbers are measured on the packed fp16 model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from beautytag.checkpoint import SHIPPED_MODELS, load_checkpoint, save_checkpoint
from beautytag.config import load_config
from beautytag.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' git_revision, datasets_dir
from benchlib import datasets_dir, git_revision  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--name", default="default", choices=sorted(SHIPPED_MODELS))
    p.add_argument("--note", default="", help="how it was trained (goes into the card JSON)")
    args = p.parse_args()
    try:
        model, cfg, ckpt = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:  # not there, or not a beautytag checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    data_cfg = load_config(ROOT / "configs" / "default.yaml")
    # measured on the datasets found here
    data_cfg.data = dataclasses.replace(data_cfg.data, root=str(datasets_dir()))
    # ship the repository's data section, its root as seen from the repository's root
    cfg.data = dataclasses.replace(data_cfg.data, root="../shared/datasets")
    # a weights path of the training machine (domain pre-training) means nothing elsewhere
    if cfg.model.weights not in ("auto", "none", "hub"):
        cfg.model = dataclasses.replace(cfg.model, weights="auto")
    cfg.model = dataclasses.replace(cfg.model, init="")  # where it started, not what it is
    out = ROOT / "src" / "beautytag" / "weights" / SHIPPED_MODELS[args.name]
    # packed beside the shipped file, measured, and only then put in its place: a model that
    # fails to load or evaluate leaves the shipped one as it was
    new = out.with_suffix(".new.pt")
    save_checkpoint(new, model, cfg, {"epoch": ckpt.get("epoch"), "note": args.note}, half=True)
    result: dict = {
        "checkpoint": args.checkpoint,
        "packed": str(out.relative_to(ROOT)),
        "size_mb": round(new.stat().st_size / 2**20, 2),
        "note": args.note,
        "epoch": ckpt.get("epoch"),
        "command": shlex.join(["python", "scripts/ship_model.py", *sys.argv[1:]]),
        "revision": git_revision(),
    }
    try:
        for split in ("test", "val"):
            for source in ("fashion", "shades"):
                r = evaluate(new, split=split, config=data_cfg, sources=[source])
                result[f"{source}/{split}"] = {
                    "images": r["images"],
                    **{a: m for a, m in r["metrics"].items() if m.get("n")},
                }
    except BaseException:
        new.unlink()  # not left beside the shipped weights (nor packed with them)
        raise
    new.replace(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}_model.json").write_text(json.dumps(result, indent=2))
    lines = ["| data / split | attribute | n | metrics |", "| --- | --- | --- | --- |"]
    for key, r in result.items():
        if "/" not in key or not isinstance(r, dict):
            continue
        for attr, m in r.items():
            if attr == "images":
                continue
            vals = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n")
            lines.append(f"| {key} | {attr} | {m['n']} | {vals} |")
    (RESULTS / f"{args.name}_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
