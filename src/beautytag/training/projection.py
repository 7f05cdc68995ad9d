"""A linear projection of the pooled embedding for search (``model.search_projection``),
trained on frozen embeddings so that photos of the same category and colour family end up
near each other: a cosine-softmax classifier per attribute on the projected, L2-normalised
vectors (full batch, Adam). benchmarks/search_photos.py measures it against the raw
embedding; scripts/add_search_projection.py puts it into a model file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from beautytag.data import Sample
from beautytag.schema import Schema

TEMPERATURE = 0.1  # the cosine logits are divided by it
ATTRIBUTES = ("category", "color")  # the labels it learns from


def fit_on_samples(
    x: np.ndarray, samples: Sequence[Sample], schema: Schema, dim: int = 128
) -> nn.Linear:
    """:func:`fit_projection` of the embeddings `x` of `samples` (a row each) on their
    category and colour labels, as `schema` classes them."""
    classes = {a: schema[a].classes for a in ATTRIBUTES}
    targets = {
        a: np.array([classes[a].index(v) if (v := s.labels.get(a)) else -1 for s in samples])
        for a in ATTRIBUTES
    }
    return fit_projection(x, targets, {a: len(c) for a, c in classes.items()}, dim=dim)


def fit_projection(
    x: np.ndarray,
    targets: Mapping[str, np.ndarray],
    n_classes: Mapping[str, int],
    dim: int = 128,
    epochs: int = 60,
) -> nn.Linear:
    """A (C -> `dim`) projection of the embeddings `x` (N, C), trained to classify each
    attribute of `targets` (name -> N class indices, -1 where a photo has no label; it has
    ``n_classes[name]`` classes; one without any label is left out) with a cosine softmax.
    Deterministic (seed 0); ValueError when no photo has a label."""
    targets = {a: y for a, y in targets.items() if (np.asarray(y) >= 0).any()}
    if not targets:
        raise ValueError("no labelled photo to train the projection on")
    torch.manual_seed(0)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    proj = nn.Linear(xt.shape[1], dim)
    ys = {a: torch.from_numpy(np.asarray(y, dtype=np.int64)) for a, y in targets.items()}
    heads = {a: nn.Parameter(torch.randn(n_classes[a], dim) * 0.01) for a in ys}
    opt = torch.optim.Adam([*proj.parameters(), *heads.values()], lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        z = nn.functional.normalize(proj(xt), dim=1)
        loss = sum(
            nn.functional.cross_entropy(
                z @ nn.functional.normalize(heads[a], dim=1).T / TEMPERATURE, y, ignore_index=-1
            )
            for a, y in ys.items()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return proj.eval().requires_grad_(False)
