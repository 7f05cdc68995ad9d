"""The search index (beautytag.search) on small synthetic embeddings."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from beautytag.color import delta_e2000, lab_to_hex
from beautytag.search import Index, SearchError, ivf, parse_shade, parse_where
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


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_filtered_search_returns_k_when_k_match(tmp_path, monkeypatch, kind):
    """The 10 mascaras are the farthest from the query: a search that cut its top k
    afterwards would return none."""
    monkeypatch.setattr(index_module, "EXACT_SUBSET", 0)  # IVF with a selector, then exact
    index = Index.create(tmp_path / "idx", MODEL, DIM, exact_max=0 if kind == "ivf" else 1000)
    query = unit(1, seed=1)[0]
    near = query + 0.05 * unit(190, seed=2)
    index.add([f"l{i}.jpg" for i in range(190)], near, [record() for _ in range(190)])
    index.add(
        [f"m{i}.jpg" for i in range(10)],
        -query + 0.05 * unit(10, seed=3),
        [record("Mascara", tags=("long_lasting", "waterproof")) for _ in range(10)],
    )
    assert index.kind == kind
    if kind == "ivf":  # one list scanned holds fewer than 7 mascaras: the exact fallback
        index._vectors.nprobe = 1
        mascaras = faiss.IDSelectorRange(190, 200)
        params = faiss.SearchParametersIVF(nprobe=1, sel=mascaras)
        assert (index._vectors.search(query[None], 7, params=params)[1] < 0).any()
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


def clustered(n: int, seed: int = 0, centres: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).standard_normal((centres, DIM))
    return (c[rng.integers(centres, size=n)] + 0.4 * rng.standard_normal((n, DIM))).astype(
        np.float32
    )


def add(index: Index, vectors: np.ndarray, prefix: str = "p") -> None:
    n = len(vectors)
    index.add([f"{prefix}{i}.jpg" for i in range(n)], vectors, [record()] * n)


def test_the_kind_is_chosen_by_size_and_recall_is_measured(tmp_path):
    index, vectors = filled(tmp_path / "idx", n=40, exact_max=500)
    assert index.kind == "flat" and index.recall(vectors[:5]) == 1.0
    assert index.describe() == {"model": MODEL, "dim": DIM, "kind": "flat", "count": 40}
    add(index, clustered(600), "q")  # 640 > 500: IVF, its lists trained, nprobe measured
    settings = index.ivf_settings()
    assert (index.kind, len(index), settings["nlist"]) == ("ivf", 640, ivf.nlist_for(640))
    assert settings["recall_at_10"] >= ivf.TARGET_RECALL and settings["calibration_queries"] == 200
    assert settings["trained_count"] == settings["tuned_count"] == 640
    assert index.recall(clustered(100, seed=7)) >= 0.9  # new queries of the same kind
    index.save()
    index = Index.open(tmp_path / "idx")
    assert index.describe() == {
        "model": MODEL,
        "dim": DIM,
        "kind": "ivf",
        "count": 640,
        **{k: settings[k] for k in ("nlist", "nprobe", "recall_at_10")},
    }
    assert index.search(vectors[7], top_k=1)[0][0].file == "p7.jpg"
    removed = [f"p{i}.jpg" for i in range(5)]
    assert index.remove(removed) == 5 and index._vectors.ntotal == 635  # really removed
    found = {h.file for h in index.search(vectors[:5], top_k=635)[0]}
    assert len(found) == 635 and not found & set(removed)
    index.remove([f"q{i}.jpg" for i in range(400)])  # 235 <= 500 / 2: flat again
    assert index.describe() == {"model": MODEL, "dim": DIM, "kind": "flat", "count": 235}
    assert index.search(vectors[25], top_k=1)[0][0].file == "p25.jpg"


def test_nprobe_is_the_smallest_that_reaches_the_target(tmp_path):
    index = Index.create(tmp_path / "idx", MODEL, DIM, exact_max=100)
    add(index, unit(2000))  # uniform: many lists must be scanned
    s = index.ivf_settings()
    assert s["nlist"] == ivf.nlist_for(2000) and 1 < s["nprobe"] < s["nlist"]
    fewer = s["nprobe"] - 1
    own, x = ivf.sample(index._vectors, 200)
    exact = ivf.without_own(ivf.exact_top(index._vectors, x, 11)[1], own, 10)
    params = faiss.SearchParametersIVF(nprobe=fewer)
    found = ivf.without_own(index._vectors.search(x, 11, params=params)[1], own, 10)
    assert ivf.recall(found, exact) < ivf.TARGET_RECALL <= s["recall_at_10"]


def test_exact_top_is_exact_search():
    x = unit(3000, seed=4)
    index = ivf.build(x, np.arange(3000, dtype=np.int64) * 3)
    queries = unit(50, seed=5)
    scores, ids = ivf.exact_top(index, queries, 10)
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10] * 3
    assert (ids == truth).all() and np.allclose(scores, np.sort(queries @ x.T)[:, ::-1][:, :10])
    assert (ivf.exact_top(index, queries[:2], 5000)[1][:, 3000:] == -1).all()  # past the end


def test_ivf_grows_and_is_rebuilt(tmp_path):
    index = Index.create(tmp_path / "idx", MODEL, DIM, exact_max=100)
    add(index, clustered(200))
    assert index.ivf_settings()["nlist"] == ivf.nlist_for(200) == 5
    add(index, clustered(600, seed=1), "q")  # 800 = 4 x 200: the same lists
    assert index.ivf_settings()["trained_count"] == 200 and len(index) == 800
    assert index.tune()["tuned_count"] == 800  # nprobe chosen again for 800
    add(index, clustered(1, seed=2), "r")  # 801: trained again
    assert index.ivf_settings()["nlist"] == ivf.nlist_for(801)
    assert index.ivf_settings()["trained_count"] == 801
    assert index.search(clustered(200)[3], top_k=1)[0][0].file == "p3.jpg"


def test_an_old_hnsw_index_opens_as_ivf(tmp_path):
    """Version 1 indexes were HNSW above exact_max; a removed photo's vector stayed in."""
    index, vectors = filled(tmp_path / "idx", n=300)
    index.remove(["p0.jpg"])
    index.save()
    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(DIM, 8, faiss.METRIC_INNER_PRODUCT))
    hnsw.add_with_ids(vectors, np.arange(300, dtype=np.int64))
    faiss.write_index(hnsw, str(tmp_path / "idx" / index_module.VECTORS))
    manifest = json.loads((tmp_path / "idx" / index_module.MANIFEST).read_text())
    manifest |= {"format": "beautytag-search/1", "exact_max": 100, "kind": "hnsw"}
    (tmp_path / "idx" / index_module.MANIFEST).write_text(json.dumps(manifest))
    index = Index.open(tmp_path / "idx")
    assert (index.kind, len(index), index._vectors.ntotal) == ("ivf", 299, 299)
    assert index.search(vectors[0], top_k=1)[0][0].file != "p0.jpg"
    assert index.search(vectors[9], top_k=1)[0][0].file == "p9.jpg"
    index.save()
    assert json.loads((tmp_path / "idx" / index_module.MANIFEST).read_text())["format"] == (
        index_module.FORMAT
    )


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


def test_filters_see_every_change(tmp_path):
    """Filter masks are kept between searches: each add and remove must be seen."""
    index, vectors = filled(tmp_path / "idx", n=10)
    mascara = record("Mascara", tags=("long_lasting",))
    index.add(["m1.jpg"], vectors[0], [mascara])
    where = [{"category": "mascara"}, {"function": "long_lasting"}]
    assert [index.count(w) for w in where] == [1, 1]
    index.add(["m2.jpg"], vectors[1], [mascara])
    assert [index.count(w) for w in where] == [2, 2]
    assert {h.file for h in index.search(vectors[0], top_k=5, where=where[1])[0]} == {
        "m1.jpg",
        "m2.jpg",
    }
    index.remove(["m1.jpg"])
    assert [index.count(w) for w in where] == [1, 1]
    index.add(["m2.jpg"], vectors[1], [record()])  # replaced by a lipstick
    assert index.count({"category": "lipstick"}) == 11
    with pytest.raises(SearchError, match="unknown category 'mascara'"):
        index.count(where[0])  # none left, and no vocabulary: not a value of this index
