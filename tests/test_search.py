"""The search index (beautytag.search) on small synthetic embeddings."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from beautytag.color import delta_e2000, lab_to_hex
from beautytag.search import Index, SearchError, parse_shade, parse_where
from beautytag.search import index as index_module

DIM = 16
MODEL = "default@1a2b3c4d"


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def record(
    category: str = "Lipstick", lab=(50.0, 40.0, 20.0), finish: str = "matte", tags=("waterproof",)
) -> dict:
    """An `attributes` dict as `beautytag predict` writes it."""
    return {
        "category": {"label": category, "score": 0.9, "top": [[category, 0.9]]},
        "color": {"label": "Red", "score": 0.8, "top": [["Red", 0.8]]},
        "shade": None if lab is None else {"lab": list(lab), "hex": lab_to_hex(lab)},
        "finish": {"label": finish, "score": 0.7, "top": [[finish, 0.7]]},
        "function": {"labels": [[t, 0.8] for t in tags], "scores": {t: 0.8 for t in tags}},
    }


def filled(folder, n: int = 30, **create) -> tuple[Index, np.ndarray]:
    index = Index.create(folder, MODEL, DIM, **create)
    vectors = unit(n)
    index.add([f"p{i}.jpg" for i in range(n)], vectors, [record() for _ in range(n)])
    return index, vectors


def test_create_add_remove_save_open_round_trip(tmp_path):
    index, vectors = filled(tmp_path / "idx")
    assert (len(index), index.kind) == (30, "flat")
    index.save()
    index = Index.open(tmp_path / "idx", model=MODEL, dim=DIM)
    [hits] = index.search(vectors[3], top_k=4)
    assert hits[0].file == "p3.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].attributes == record()
    assert index.get(hits[0].id).file == "p3.jpg"
    assert index.remove(["p3.jpg", "not-there.jpg", "p29.jpg"]) == 2
    index.save()
    index = Index.open(tmp_path / "idx")
    assert len(index) == 28 and "p3.jpg" not in index and "p4.jpg" in index
    # ids are not given again, not even the last one's, removed before the save
    assert index.add(["new.jpg"], vectors[3], [{"shade": {"lab": np.array([50.0, 1, 2])}}]) == [30]
    assert index.get(30).attributes == {"shade": {"lab": [50.0, 1.0, 2.0]}}
    assert all(h.file != "p3.jpg" for h in index.search(vectors[3], top_k=29)[0])
    with pytest.raises(SearchError, match="no photo with id"):
        index.get(hits[0].id)


def test_adding_a_file_again_replaces_it(tmp_path):
    index, vectors = filled(tmp_path / "idx")
    old = index.search(vectors[0], top_k=1)[0][0]
    [new_id] = index.add(["p0.jpg"], vectors[1] * 3, [record("Mascara")])
    assert len(index) == 30 and new_id != old.id
    top = index.search(vectors[1], top_k=2)[0]
    assert {h.file for h in top} == {"p0.jpg", "p1.jpg"}
    assert index.get(new_id).attributes["category"]["label"] == "Mascara"
    assert index.search(vectors[0], top_k=1)[0][0].file != "p0.jpg"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filtered_search_returns_k_when_k_match(tmp_path, monkeypatch, kind):
    """The 10 mascaras are the farthest from the query: a search that cut its top k
    afterwards would return none."""
    monkeypatch.setattr(index_module, "EXACT_SUBSET", 0)  # HNSW with a selector, then exact
    # a graph this sparse finds none of the mascaras through the selector: the exact fallback
    hnsw = {"m": 4, "ef_search": 4}
    index = Index.create(
        tmp_path / "idx", MODEL, DIM, exact_max=0 if kind == "hnsw" else 1000, hnsw=hnsw
    )
    query = unit(1, seed=1)[0]
    near = query + 0.05 * unit(190, seed=2)
    index.add([f"l{i}.jpg" for i in range(190)], near, [record() for _ in range(190)])
    index.add(
        [f"m{i}.jpg" for i in range(10)],
        -query + 0.05 * unit(10, seed=3),
        [record("Mascara", tags=("long_lasting", "waterproof")) for _ in range(10)],
    )
    assert index.kind == kind
    [hits] = index.search(query, top_k=7, where={"category": "MASCARA"})
    assert len(hits) == 7 and all(h.file.startswith("m") for h in hits)
    [hits] = index.search(
        query, top_k=50, where={"category": "mascara", "function": "Long_Lasting"}
    )
    assert len(hits) == 10  # all that match, no more
    [hits] = index.search(query, top_k=5, where={"function": "waterproof"})
    assert [h.file[0] for h in hits] == ["l"] * 5


def test_shade_search_ranks_by_ciede2000(tmp_path):
    index = Index.create(tmp_path / "idx", MODEL, DIM)
    labs = [(50, 60, 30), (52, 55, 25), (40, 20, 10), (70, -10, 40), (30, 5, -30), (51, 58, 28)]
    records = [record(lab=lab) for lab in labs] + [record(lab=None)]
    index.add([f"s{i}.jpg" for i in range(7)], unit(7), records)
    target = (50.0, 58.0, 27.0)
    hits = index.search_shade("50,58,27", top_k=10)
    expected = np.argsort(delta_e2000(np.array(labs, dtype=float), np.array(target)))
    assert [h.file for h in hits] == [f"s{i}.jpg" for i in expected]  # no shade: left out
    assert [h.score for h in hits] == sorted(h.score for h in hits)
    hits = index.search_shade(lab_to_hex(target), top_k=2)
    assert [h.file for h in hits] == [f"s{i}.jpg" for i in expected[:2]]
    index.add(["s9.jpg"], unit(1), [record("Mascara", lab=target)])
    [hit] = index.search_shade(target, top_k=1, where={"category": "lipstick"})
    assert hit.file == f"s{expected[0]}.jpg"
    assert np.allclose(parse_shade("#ff0000"), parse_shade([53.2408, 80.0925, 67.2032]), atol=0.01)


def test_the_kind_is_chosen_by_size_and_recall_is_measured(tmp_path):
    index, vectors = filled(tmp_path / "idx", n=40, exact_max=50)
    assert index.kind == "flat" and index.recall(vectors[:5]) == 1.0
    index.add([f"q{i}.jpg" for i in range(20)], unit(20, seed=5), [record()] * 20)
    assert (index.kind, len(index)) == ("hnsw", 60)
    assert index.recall(vectors[:10]) >= 0.9
    index.save()
    index = Index.open(tmp_path / "idx")
    assert index.describe() == {
        "model": MODEL,
        "dim": DIM,
        "kind": "hnsw",
        "count": 60,
        "orphans": 0,
    }
    index.remove([f"p{i}.jpg" for i in range(5)])  # HNSW keeps their vectors, unreachable
    assert index.describe()["orphans"] == 5
    assert not any(
        h.file in {f"p{i}.jpg" for i in range(5)} for h in index.search(vectors[:5], top_k=55)[0]
    )
    assert len(index.search(vectors[0], top_k=55)[0]) == 55
    index.remove([f"p{i}.jpg" for i in range(5, 20)])  # a third orphaned: rebuilt, flat again
    assert index.describe() == {
        "model": MODEL,
        "dim": DIM,
        "kind": "flat",
        "count": 40,
        "orphans": 0,
    }
    assert index.search(vectors[25], top_k=1)[0][0].file == "p25.jpg"


def test_an_interrupted_save_opens_as_the_vectors_were_saved(tmp_path):
    index, _ = filled(tmp_path / "idx")
    index.save()
    index.remove(["p1.jpg"])
    faiss.write_index(index._vectors, str(tmp_path / "idx" / index_module.VECTORS))
    reopened = Index.open(tmp_path / "idx")  # metadata and manifest still hold p1.jpg
    assert len(reopened) == 29 and "p1.jpg" not in reopened


def test_bad_input_gets_one_line_saying_what_is_valid(tmp_path):
    def error(call, *args, **kwargs) -> str:
        with pytest.raises(SearchError) as caught:
            call(*args, **kwargs)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "no such folder" in error(Index.open, tmp_path / "nothing")
    assert "not a search index" in error(Index.open, tmp_path)
    index, vectors = filled(tmp_path / "idx")
    assert "already holds an index" in error(Index.create, tmp_path / "idx", MODEL, DIM)
    message = error(Index.open, tmp_path / "idx", model="default@99999999")
    assert f"made by model {MODEL}" in message and f"--model {MODEL}" in message
    assert f"of {DIM} values, not 1280" in error(Index.open, tmp_path / "idx", dim=1280)
    assert f"holds {DIM} values" in error(index.search, np.zeros(1280))
    assert "valid: category, color, finish, function" in error(
        index.search, vectors[0], where={"brand": "x"}
    )
    assert "unknown finish 'glossy'; valid: matte" in error(
        index.search, vectors[0], where={"finish": "glossy"}
    )
    assert "valid: waterproof" in error(index.search_shade, "#aa0000", where={"function": "spf"})
    assert "not a colour" in error(index.search_shade, "#zz0000")
    assert "not a colour" in error(index.search_shade, "50,1")
    assert "is not ATTR=VALUE" in error(parse_where, ["category"])
    assert parse_where(["category = Lipstick", "finish=matte"]) == {
        "category": "Lipstick",
        "finish": "matte",
    }
    vocabulary = {"category": ["Lipstick", "Mascara"]}
    other = Index.create(tmp_path / "voc", MODEL, DIM, vocabulary=vocabulary)
    other.add(["a.jpg"], vectors[0], [record()])
    assert other.search(vectors[0], where={"category": "mascara"}) == [[]]  # valid, none
    assert "valid: Lipstick, Mascara" in error(other.search, vectors[0], where={"category": "x"})
