"""The projection for search (model.search_projection): trained on frozen embeddings, kept in
the model file, applied to what a search index stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beautytag.checkpoint import load_checkpoint, save_checkpoint
from beautytag.config import config_from_dict
from beautytag.runtime.engine import Engine
from beautytag.schema import SchemaError
from beautytag.search import Index, SearchError
from beautytag.training.projection import fit_projection

from .conftest import default_raw, make_tiny_model


def test_the_projection_learns_from_the_labelled_photos_only():
    """Deterministic; photos without a label (-1) do not count; the classes stay apart.
    (Whether it helps search on real photos is benchmarks/search_photos.py's measure.)"""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    x = (rng.normal(0, 0.3, (60, 16)) + 3 * np.eye(16)[y]).astype(np.float32)
    colour = np.where(np.arange(60) % 3 == 0, -1, rng.integers(0, 2, 60))
    targets, n = {"category": y, "color": colour}, {"category": 3, "color": 2}
    proj = fit_projection(x, targets, n, dim=8, epochs=50)
    assert proj.out_features == 8 and not proj.weight.requires_grad
    assert torch.equal(proj.weight, fit_projection(x, targets, n, dim=8, epochs=50).weight)
    moved = x.copy()
    moved[y == 0] += 1.0  # photos of category 0 elsewhere: another projection
    assert not torch.equal(proj.weight, fit_projection(moved, targets, n, 8, 50).weight)
    # an attribute without labels is left out: colour's labels only here
    only_colour = {"category": np.full(60, -1), "color": colour}
    assert torch.equal(
        fit_projection(x, only_colour, n, 8, 50).weight,
        fit_projection(x, {"color": colour}, n, 8, 50).weight,
    )
    with pytest.raises(ValueError, match="no labelled photo"):
        fit_projection(x, {"category": np.full(60, -1)}, n, 8, 5)
    with torch.no_grad():
        z = torch.nn.functional.normalize(proj(torch.from_numpy(x)), dim=1).numpy()
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    assert (y[sims.argmax(1)] == y).mean() > 0.95  # nearest photo: the same category


def test_a_model_with_a_projection_indexes_its_projected_embeddings(tmp_path):
    plain = make_tiny_model(tmp_path / "plain.pt")
    model, cfg, _ = load_checkpoint(plain)
    torch.manual_seed(0)
    cfg.model.search_projection = 8
    model.search_projection = torch.nn.Linear(model.backbone.num_features, 8)
    save_checkpoint(tmp_path / "proj.pt", model, cfg)

    engine, before = Engine(tmp_path / "proj.pt"), Engine(plain)
    x = torch.randn(3, 3, 64, 64)
    emb, answers = engine.embed_tensors(x)
    raw, same_answers = before.embed_tensors(x)
    assert engine.embedding_dim == 8 and emb.shape == (3, 8)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert raw.shape == (3, before.embedding_dim) != emb.shape  # the pooled feature
    # the projection of the normalised pooled feature, normalised: as it was trained
    expected = torch.nn.functional.normalize(model.search_projection(torch.from_numpy(raw)), dim=1)
    assert np.allclose(emb, expected.detach().numpy(), atol=1e-4)
    # answers are the model's as before
    assert answers[0]["category"].top == same_answers[0]["category"].top
    # an index of the plain model's embeddings refuses the projected ones (other size)
    Index.create(tmp_path / "idx", before.model_id, before.embedding_dim)
    with pytest.raises(SearchError, match="index the photos again with proj@"):
        Index.open(tmp_path / "idx", model=engine.model_id, dim=engine.embedding_dim)


def test_a_negative_projection_size_is_an_error_naming_the_key():
    raw = default_raw()
    raw["model"]["search_projection"] = -1
    with pytest.raises(SchemaError, match="model.search_projection must be 0"):
        config_from_dict(raw)
