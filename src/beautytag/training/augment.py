"""What training does to a batch before normalising it: compositing (``data.composite``),
geometric augmentation (``data.augment``) and down-up-scaling (``data.downscale``), on the
training device. With both new keys at 0 it is :func:`beautytag.data.augment_batch` alone,
drawing the same random numbers as before."""

from __future__ import annotations

import torch

from beautytag.composite import background_pool, composite_batch, down_up_batch
from beautytag.config import Config
from beautytag.data import BeautyDataset, augment_batch


class BatchAugment:
    """Augments training batches of ``ds`` (a training :class:`BeautyDataset`); the real
    backgrounds are crops of its photos that are not packshots, kept on `device`."""

    def __init__(self, cfg: Config, ds: BeautyDataset, device: torch.device):
        self.data = cfg.data
        self.pool = None
        if self.data.composite > 0:
            self.pool = background_pool(ds.pixels, ds.boxes, ~ds.packshots()).to(device)

    def __call__(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: a uint8 batch (B, 3, H, W) on the training device; `extra` as the dataset
        gives it (alpha and source). Returns pixels in 0..255 (float once anything ran)."""
        data, dev = self.data, x.device
        if data.composite > 0:
            alpha, source = extra["alpha"].to(dev), extra["source"].to(dev)
            out, done = composite_batch(x, alpha, source, data.composite, self.pool)
            rest = (~done).nonzero().squeeze(1)
            if data.augment and len(rest):  # a composite was placed at random already
                out[rest] = augment_batch(x[rest])
            x = out
        elif data.augment:
            x = augment_batch(x)
        if data.downscale > 0:
            x = down_up_batch(x.float(), data.downscale)
        return x
