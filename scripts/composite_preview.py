"""A grid of training composites to look at: each packshot of the config's training photos
beside what compositing (beautytag.composite) makes of it, and a last row of photos scaled
down and back up (data.downscale). Writes a PNG; never commit one (it holds dataset pixels).
With --time N it also times N training batches' augmentation with and without the two keys,
beside a training step of the config's model (forward, backward, AdamW), in CPU seconds of
one thread (steady on a busy machine, where wall time is not).

    python scripts/composite_preview.py --out /tmp/composites.png [--config configs/default.yaml]
        [--n 32] [--limit 300] [--seed 0] [--scale 2] [--time 300]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beautytag.composite import background_pool, composite_batch, down_up_batch
from beautytag.config import load_config
from beautytag.data import BeautyDataset, read_samples
from beautytag.training.augment import BatchAugment

ROOT = Path(__file__).resolve().parents[1]


def tile(images: torch.Tensor, columns: int) -> np.ndarray:
    """(N, 3, H, W) pixels in 0..255 -> one H*rows x W*columns uint8 image, white-filled."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.full((rows * columns, 3, h, w), 255.0)
    grid[:n] = images.float()
    grid = grid.view(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, -1, 3)
    return grid.round().clamp(0, 255).to(torch.uint8).numpy()


def seconds_per_batch(ds: BeautyDataset, cfg, batches: int, composite: float, down: float) -> float:
    """Seconds one training batch's augmentation takes (data.augment on) with these keys."""
    cfg = copy.deepcopy(cfg)
    cfg.data.augment, cfg.data.composite, cfg.data.downscale = True, composite, down
    augment = BatchAugment(cfg, ds, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True)
    torch.manual_seed(0)
    spent, done = 0.0, 0
    while done < batches:
        for x, _, _, extra in loader:
            t0 = time.process_time()
            augment(x, extra)
            spent, done = spent + time.process_time() - t0, done + 1
            if done == batches:
                break
    return spent / batches


def step_seconds(cfg, steps: int = 20) -> float:
    """Seconds of one training step of the config's model on a batch (CPU)."""
    from beautytag.nn.net import BeautyTagNet

    model = BeautyTagNet(cfg, pretrained=False)
    opt = torch.optim.AdamW(model.parameters())
    size = cfg.model.image_size
    x = torch.randn(cfg.train.batch_size, 3, size, size)
    for i in range(steps + 3):  # 3 to warm up
        if i == 3:
            t0 = time.process_time()
        out = model(x)
        loss = sum(v.float().mean() for v in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.process_time() - t0) / steps


def timing(ds: BeautyDataset, cfg, batches: int) -> None:
    """Print the augmentation's cost per batch, with and without the keys."""
    torch.set_num_threads(1)
    step = step_seconds(cfg)
    base = seconds_per_batch(ds, cfg, batches, 0.0, 0.0)
    print(f"training step {step * 1e3:.1f} ms/batch; augmentation alone {base * 1e3:.1f} ms")
    for composite, down in ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5), (1.0, 1.0)):
        t = seconds_per_batch(ds, cfg, batches, composite, down)
        ratio = (step + t) / (step + base)
        print(
            f"composite {composite}, downscale {down}: {t * 1e3:.1f} ms/batch, an epoch x "
            f"{ratio:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--n", type=int, default=32, help="composites to show")
    ap.add_argument("--limit", type=int, default=300, help="photos per source (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=2, help="pixel zoom of the grid")
    ap.add_argument("--time", type=int, default=0, help="also time this many batches")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    cfg.data.limit, cfg.data.composite = args.limit, 1.0
    ds = BeautyDataset(read_samples(cfg, splits=("train",)), cfg, train=True, report=False)
    packshots = ds.packshots()
    if not packshots.any():
        print("no packshot among the training photos: nothing to composite", file=sys.stderr)
        return 1
    print(f"{packshots.sum()} of {len(ds)} training photos are packshots")
    torch.manual_seed(args.seed)
    pool = background_pool(ds.pixels, ds.boxes, ~packshots)
    pick = torch.randperm(len(ds))[: max(args.n * 3, 64)]  # a batch as training draws one
    x = torch.from_numpy(ds.pixels[pick.numpy()]).permute(0, 3, 1, 2)
    alpha = torch.from_numpy(ds.alpha[pick.numpy()])
    source = torch.tensor(ds.source)[pick]
    out, done = composite_batch(x, alpha, source, 1.0, pool)
    rows = done.nonzero().squeeze(1)[: args.n]
    pairs = torch.stack([x[rows].float(), out[rows]], 1).flatten(0, 1)  # source, composite
    downs = down_up_batch(x[:8].float(), 1.0)
    grid = np.concatenate([tile(pairs, 16), tile(torch.cat([x[:8].float(), downs]), 16)])
    img = Image.fromarray(grid)
    img = img.resize((img.width * args.scale, img.height * args.scale), Image.Resampling.NEAREST)
    img.save(args.out)
    print(f"wrote {args.out}: {len(rows)} packshots beside their composites, then 8 photos and")
    print("the same scaled down and back up")
    if args.time:
        timing(ds, cfg, args.time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
