"""Does a whole-catalogue model (Table B) tag the cosmetics photos as well as the default?

A Table B model predicts the catalogue's articleType and baseColour, which are the sources of
the default's `category` and `color` labels on the Personal Care photos. Here its predicted
values are read through the shipped default's own label mapping (``data.label_from_row``: an
articleType that is not one of the default's categories becomes Other, a baseColour goes
through the colour map; a colour outside the families is simply wrong) and scored against the
default's labels on the Personal Care val and test splits, next to the shipped default on the
same photos. Writes benchmarks/results/catalogue_transfer.json and .md.

    python benchmarks/catalogue_transfer.py CHECKPOINT [CHECKPOINT ...] [--tta-flip]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from benchlib import datasets_dir, git_revision, no_datasets
from torch.utils.data import DataLoader

from beautytag.checkpoint import load_checkpoint, resolve_model
from beautytag.config import Config
from beautytag.data import BeautyDataset, label_from_row, read_samples
from beautytag.images import normalize
from beautytag.nn.net import BeautyTagNet
from beautytag.runtime.engine import mirror_averaged
from beautytag.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the default's attribute -> the catalogue column (a Table B attribute) it is read from
READ_AS = {"category": "articleType", "color": "baseColour"}


def load_catalogue_model(checkpoint: str | Path) -> tuple[BeautyTagNet, Config]:
    """A Table B model and its config; a ValueError naming the file if it is not one."""
    model, cfg, _ = load_checkpoint(checkpoint)
    missing = sorted(set(READ_AS.values()) - set(cfg.schema.names))
    if missing:
        raise ValueError(f"{checkpoint}: not a whole-catalogue model (no {missing} outputs)")
    return model, cfg


@torch.inference_mode()
def catalogue_predictions(
    model: BeautyTagNet, cfg: Config, target: Config, split: str, flip: bool = False
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """For each Personal Care photo of `split` (labelled as `target`, the default's config):
    the catalogue model's (`cfg`'s) predictions read as `target`'s labels, and the true
    labels."""
    samples = read_samples(target, splits=[split], sources=["fashion"])
    photos = BeautyDataset(samples, dataclasses.replace(target, model=cfg.model))

    def probs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.softmax(v.float(), -1) for k, v in model(x).items()}

    predicted: list[dict[str, object]] = []
    for x, _, _ in DataLoader(photos, batch_size=64, shuffle=False):
        x = normalize(x, cfg.model.mean, cfg.model.std)
        out = mirror_averaged(probs, x) if flip else probs(x)
        for i in range(len(x)):
            row = {
                col: cfg.schema[col].classes[int(out[col][i].argmax())] for col in READ_AS.values()
            }
            predicted.append({a: label_from_row(target.schema[a], "fashion", row) for a in READ_AS})
    return predicted, [s.labels for s in photos.samples]


def scores(predicted: list[dict], truth: list[dict]) -> dict[str, dict[str, Any]]:
    """Accuracy per attribute over the photos that have that label."""
    out = {}
    for a in READ_AS:
        pairs = [(p[a], t[a]) for p, t in zip(predicted, truth, strict=True) if t.get(a)]
        right = sum(p == t for p, t in pairs)
        out[a] = {"n": len(pairs), "accuracy": right / len(pairs) if pairs else None}
    return out


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# A whole-catalogue model on the cosmetics photos",
        "",
        f"`{result['command']}` at revision {result['revision']}. Personal Care photos of "
        "fashion-products-small; a catalogue model's articleType and baseColour read through "
        "the default's label mapping as `category` and `color`"
        + (" (photo + mirror)" if result["flip"] else "")
        + ".",
        "",
        "| model | split | category accuracy | n | color accuracy | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        c, k = r["metrics"]["category"], r["metrics"]["color"]
        lines.append(
            f"| {r['model']} | {r['split']} | {c['accuracy']:.3f} | {c['n']} "
            f"| {k['accuracy']:.3f} | {k['n']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="Table B checkpoints (benchmarks/accuracy.py)")
    ap.add_argument("--data", type=Path, default=datasets_dir())
    ap.add_argument("--default", default="default", help="the model whose labels are scored")
    ap.add_argument("--tta-flip", action="store_true", help="photo + mirror, for every model")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if no_datasets(args.data, "fashion-products-small", hint="; pass --data"):
        return 0
    default_path = resolve_model(args.default)
    try:
        _, target, _ = load_checkpoint(default_path)
        models = {ckpt: load_catalogue_model(ckpt) for ckpt in args.checkpoints}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = dataclasses.replace(
        target, data=dataclasses.replace(target.data, root=str(args.data.resolve()))
    )
    rows = []
    for split in ("val", "test"):
        ref = evaluate(
            default_path, split=split, config=target, sources=["fashion"], flip_tta=args.tta_flip
        )["metrics"]
        metrics = {a: {"n": ref[a]["n"], "accuracy": ref[a]["accuracy"]} for a in READ_AS}
        rows.append(
            {"model": f"{args.default} (its own heads)", "split": split, "metrics": metrics}
        )
        for ckpt, (model, cfg) in models.items():
            predicted, truth = catalogue_predictions(model, cfg, target, split, args.tta_flip)
            rows.append(
                {"model": Path(ckpt).name, "split": split, "metrics": scores(predicted, truth)}
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": shlex.join(
            [
                "python",
                "benchmarks/catalogue_transfer.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "revision": git_revision(),
        "flip": args.tta_flip,
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "catalogue_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.results / "catalogue_transfer.md")
    print((args.results / "catalogue_transfer.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
