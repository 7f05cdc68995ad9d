"""Put a projection for search into a model file (``model.search_projection``).

    python scripts/add_search_projection.py MODEL [--dim 128] [--source fashion] [-o OUT]

Embeds the training photos of one data source of the model's own config (default: the
catalogue's Personal Care photos, as benchmarks/search_photos.py measures it), trains the
projection on them (beautytag.training.projection: category and colour) and writes the model
with it to OUT (default: in place). Its answers do not change; its search embeddings, its
hash and so the indexes it can open do: rebuild them with `beautytag index`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from beautytag.checkpoint import load_checkpoint, read_checkpoint, resolve_model, save_checkpoint
from beautytag.config import use_found_datasets
from beautytag.data import read_samples, unique_photos
from beautytag.runtime.engine import Engine
from beautytag.training.projection import fit_on_samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a checkpoint, or default / accurate")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--source", default="fashion", help="the config's data source to train on")
    p.add_argument("-o", "--out", help="where to write the model (default: in place)")
    args = p.parse_args()
    path = resolve_model(args.model)
    try:
        model, cfg, _ = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.search_projection:
        print(f"error: {path} already has a projection for search", file=sys.stderr)
        return 2
    use_found_datasets(cfg)
    samples = unique_photos(read_samples(cfg, splits=("train",), sources=[args.source]))
    engine = Engine(path)
    pairs = list(engine.embed_items([(str(s.path), s.path) for s in samples]))
    bad = [pred.file for pred, emb in pairs if emb is None]
    if bad:
        print(f"error: {len(bad)} photos could not be read, e.g. {bad[0]}", file=sys.stderr)
        return 2
    x = np.stack([emb for _, emb in pairs])
    model.search_projection = fit_on_samples(x, samples, cfg.schema, dim=args.dim)
    cfg.model = dataclasses.replace(cfg.model, search_projection=args.dim)
    ckpt = read_checkpoint(path)
    half = any(v.dtype.is_floating_point and v.itemsize == 2 for v in ckpt["model"].values())
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "model")}
    out = Path(args.out or path)
    save_checkpoint(out, model, cfg, extra, half=half)
    print(f"{out}: search embeddings {args.dim}-d, trained on {len(samples)} photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
