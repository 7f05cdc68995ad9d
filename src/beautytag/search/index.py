"""An index of photo embeddings (FAISS, inner product of L2-normalised vectors) with each
photo's file, predicted attributes and shade, in a folder:

* ``vectors.faiss``: an ``IndexIDMap2`` around an exact ``IndexFlatIP`` while the index holds
  at most `exact_max` vectors, an ``IndexIVFFlat`` above (``kind`` ``ivf``, see
  :mod:`beautytag.search.ivf`: lists trained on the vectors, nprobe chosen by measuring
  recall@10 against exact search), its labels the index ids;
* ``metadata.parquet``: the rows (see :mod:`beautytag.search.metadata`);
* ``manifest.json``: the model that made the embeddings, their size, the settings and, for
  IVF, its lists, nprobe and measured recall.

Ids only grow: a replaced photo gets a new id. An IVF index is rebuilt (its lists trained
again) when its size leaves a factor `REBUILD_GROWTH` of the size its lists were trained at,
and made flat again at `exact_max` / 2 photos. The files are saved vectors first, manifest
last, and opening keeps the ids both files hold, so an index interrupted while saving opens as
it was before or after that save. An index of an older version that used HNSW above
`exact_max` is rebuilt as IVF when opened (and saved so by the next save).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

import beautytag.search.ivf as ivf
from beautytag.search.errors import SearchError
from beautytag.search.filters import matching_rows
from beautytag.search.metadata import Metadata
from beautytag.search.shade import nearest_shades, parse_shade

FORMAT = "beautytag-search/2"
OLD_FORMATS = ("beautytag-search/1",)  # flat or HNSW: read, saved as FORMAT
MANIFEST, VECTORS, METADATA = "manifest.json", "vectors.faiss", "metadata.parquet"
EXACT_MAX = 100_000  # more vectors than this: IVF
EXACT_SUBSET = 10_000  # filtered searches over at most this many vectors are exact
REBUILD_GROWTH = 4  # an IVF index 4 times larger or smaller than when trained is rebuilt


@dataclass(frozen=True)
class Hit:
    """One result: the photo's index id, file and attributes (as in ``predict``'s records);
    `score` is the cosine similarity, or the ΔE2000 in a shade search."""

    id: int
    file: str
    score: float
    attributes: dict[str, Any]


class Index:
    """Embeddings with their metadata; make one with :meth:`create`, or :meth:`open` one."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], vectors: faiss.Index, meta: Metadata
    ) -> None:
        self.folder = folder
        self.model: str = manifest["model"]
        self.dim: int = manifest["dim"]
        self.exact_max: int = manifest["exact_max"]
        self.vocabulary: dict[str, list[str]] = manifest["vocabulary"]
        self._vectors = vectors
        self._meta = meta
        # IVF: trained_count, tuned_count, recall_at_10, calibration_queries (nlist and nprobe
        # are the FAISS index's own)
        self._ivf: dict[str, Any] = dict(manifest.get("ivf") or {})
        if self.kind == "ivf":
            self._ivf.setdefault("trained_count", vectors.ntotal)
        # ids are never given again, not even those of photos removed before a save
        used = max(_stored_ids(vectors).max(initial=-1), meta.ids.max(initial=-1))
        self._next_id = max(int(used) + 1, manifest.get("next_id", 0))

    # -- making, opening, saving -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: str | Path,
        model: str,
        dim: int,
        *,
        exact_max: int = EXACT_MAX,
        vocabulary: Mapping[str, Sequence[str]] | None = None,
    ) -> Index:
        """A new empty index in `folder` (saved at once) for embeddings of `dim` values made
        by `model` (e.g. ``default@1a2b3c4d``), exact up to `exact_max` photos. `vocabulary`:
        the valid values of filter attributes (the model's classes); without it, the values
        in the index are."""
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise SearchError(f"{folder} already holds an index; open it to add photos")
        manifest = {
            "model": model,
            "dim": int(dim),
            "exact_max": int(exact_max),
            "vocabulary": {k: list(v) for k, v in (vocabulary or {}).items()},
        }
        folder.mkdir(parents=True, exist_ok=True)
        index = cls(folder, manifest, _new_flat(int(dim)), Metadata())
        index.save()
        return index

    @classmethod
    def open(cls, folder: str | Path, *, model: str | None = None, dim: int | None = None) -> Index:
        """The index in `folder`; with `model` or `dim`, checks that it was made by that model
        and holds embeddings of that size."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SearchError(f"no index at {folder}: no such folder")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest.get("format") not in (FORMAT, *OLD_FORMATS):
                raise ValueError
        except (OSError, ValueError, AttributeError):
            raise SearchError(
                f"{folder} is not a search index (no {MANIFEST} of format {FORMAT}); "
                "make one with `beautytag index PHOTOS -o INDEX_DIR`"
            ) from None
        if model is not None and manifest["model"] != model:
            raise SearchError(
                f"{folder} was made by model {manifest['model']}, not {model}: search it with "
                f"--model {manifest['model']}, or index the photos again with {model}"
            )
        if dim is not None and manifest["dim"] != dim:
            raise SearchError(
                f"{folder} holds embeddings of {manifest['dim']} values, not {dim}: search it "
                f"with model {manifest['model']}, or index the photos again"
            )
        vectors = faiss.read_index(str(folder / VECTORS))  # of its own class
        meta = Metadata.load(folder / METADATA)
        stored = _stored_ids(vectors)
        orphaned = ~np.isin(meta.ids, stored)
        if orphaned.any():  # removed from the vectors by a save that did not finish
            meta.remove(meta.ids[orphaned])
        index = cls(folder, manifest, vectors, meta)
        if _is_hnsw(vectors):  # an older version's; its removed photos' vectors are left out
            index._rebuild()
        elif len(meta) < len(stored):  # added to the vectors by a save that did not finish
            vectors.remove_ids(stored[~np.isin(stored, meta.ids)])
        return index

    def save(self) -> None:
        """Write the index to its folder (each file replaced whole)."""
        manifest = {
            "format": FORMAT,
            "model": self.model,
            "dim": self.dim,
            "exact_max": self.exact_max,
            "vocabulary": self.vocabulary,
            "kind": self.kind,
            "count": len(self),
            "next_id": self._next_id,
            **({"ivf": self.ivf_settings()} if self.kind == "ivf" else {}),
        }
        _replace(self.folder / VECTORS, lambda p: faiss.write_index(self._vectors, str(p)))
        _replace(self.folder / METADATA, self._meta.save)
        _replace(self.folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))

    # -- contents --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``flat`` (exact search) or ``ivf`` (approximate)."""
        return "ivf" if isinstance(self._vectors, faiss.IndexIVF) else "flat"

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, file: str) -> bool:
        return self._meta.id_of(file) is not None

    def get(self, id: int) -> Hit:
        """The photo of index id `id` (score 0); SearchError where there is none."""
        row = int(self._meta.rows(np.array([id]))[0])
        if row >= len(self) or self._meta.ids[row] != id:
            raise SearchError(f"no photo with id {id} in the index")
        return self._hit(row, 0.0)

    def ivf_settings(self) -> dict[str, Any]:
        """An IVF index's lists (``nlist``), lists scanned per query (``nprobe``), the recall@10
        measured when nprobe was chosen and on how many queries, and the sizes its lists were
        trained and nprobe chosen at; {} for a flat index."""
        if self.kind != "ivf":
            return {}
        return {"nlist": self._vectors.nlist, "nprobe": self._vectors.nprobe, **self._ivf}

    def describe(self) -> dict[str, Any]:
        """What the index is: model, dim, kind, photos and, for IVF, its settings."""
        described = {"model": self.model, "dim": self.dim, "kind": self.kind, "count": len(self)}
        if self.kind == "ivf":
            settings = self.ivf_settings()
            described |= {k: settings.get(k) for k in ("nlist", "nprobe", "recall_at_10")}
        return described

    def count(self, where: Mapping[str, str] | None = None) -> int:
        """How many photos match `where` (all without it); SearchError for an unknown filter
        attribute or value, as :meth:`search` would raise."""
        rows = matching_rows(self._meta, where, self.vocabulary)
        return len(self) if rows is None else int(rows.sum())

    # -- changing --------------------------------------------------------------------------

    def add(
        self,
        files: Sequence[str],
        embeddings: np.ndarray,
        attributes: Sequence[Mapping[str, Any]],
    ) -> np.ndarray:
        """Add photos (a file already in the index is replaced); returns their new ids.
        Turns the index into IVF once it holds more than `exact_max` photos, and rebuilds an
        IVF index grown `REBUILD_GROWTH` times since its lists were trained."""
        files = [str(f) for f in files]
        vectors = self._normalised(embeddings)
        if not len(files) == len(vectors) == len(attributes):
            raise SearchError(
                f"{len(files)} files, {len(vectors)} embeddings and {len(attributes)} "
                "attribute records: give one of each per photo"
            )
        if len(set(files)) != len(files):
            raise SearchError("a file is given twice in one add; give each once")
        self.remove(files)
        ids = np.arange(self._next_id, self._next_id + len(files), dtype=np.int64)
        self._next_id += len(files)
        if self._rebuild_at(len(self) + len(files)):
            self._rebuild(ids, vectors)
        else:
            self._vectors.add_with_ids(vectors, ids)
        self._meta.append(ids, files, attributes)
        return ids

    def remove(self, files: Sequence[str]) -> int:
        """Remove the photos of `files` that the index holds; returns how many."""
        ids = np.array(
            [i for f in files if (i := self._meta.id_of(str(f))) is not None], dtype=np.int64
        )
        if not len(ids):
            return 0
        self._meta.remove(ids)
        self._vectors.remove_ids(ids)
        if self.kind == "ivf" and self._rebuild_at(len(self)):
            self._rebuild()
        return len(ids)

    def tune(self) -> dict[str, Any]:
        """Choose an IVF index's nprobe again on a sample of the vectors it holds now (done
        when its lists are trained; worth doing after adding many); returns
        :meth:`ivf_settings`. Nothing to do for a flat index, or an unchanged count."""
        if self.kind == "ivf" and self._ivf.get("tuned_count") != self._vectors.ntotal:
            nprobe, recall, queries = ivf.calibrate(self._vectors)
            self._ivf |= {
                "recall_at_10": round(recall, 4),
                "calibration_queries": queries,
                "target_recall": ivf.TARGET_RECALL,
                "tuned_count": int(self._vectors.ntotal),
            }
        return self.ivf_settings()

    def _rebuild_at(self, n: int) -> bool:
        """Whether an index of `n` photos needs a new FAISS index (another kind or lists)."""
        if self.kind == "flat":
            return n > self.exact_max
        trained = self._ivf["trained_count"]
        grown = n > REBUILD_GROWTH * trained or REBUILD_GROWTH * n < trained
        return grown or n <= self.exact_max // 2

    def _rebuild(self, ids: np.ndarray | None = None, vectors: np.ndarray | None = None) -> None:
        """A new FAISS index of the stored vectors of live photos and `vectors` of new `ids`,
        of the kind their number calls for (IVF: trained and tuned)."""
        all_ids, all_vectors = self._gathered(ids, vectors)
        self._vectors, self._ivf = _new_flat(self.dim), {}  # the old one's memory freed
        if len(all_ids) <= self.exact_max:
            self._vectors.add_with_ids(all_vectors, all_ids)
            return
        try:
            self._vectors = ivf.build(all_vectors, all_ids)
            self._ivf = {"trained_count": len(all_ids)}
            self.tune()
        except BaseException:  # interrupted (e.g. Ctrl-C in k-means): keep the photos' vectors
            self._vectors, self._ivf = _new_flat(self.dim), {}
            self._vectors.add_with_ids(all_vectors[: len(self)], all_ids[: len(self)])
            raise

    def _gathered(
        self, ids: np.ndarray | None, vectors: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ids and vectors of the live photos (by the metadata), then `ids` and `vectors`,
        each in one new array (the only copy made)."""
        live = np.zeros(self._next_id, dtype=bool)
        live[self._meta.ids] = True
        parts = [(i, v, live[i]) for i, v in _stored(self._vectors)]
        extra = 0 if ids is None else len(ids)
        count = sum(int(keep.sum()) for _, _, keep in parts)
        out_ids = np.empty(count + extra, dtype=np.int64)
        out_vectors = np.empty((count + extra, self.dim), dtype=np.float32)
        at = 0
        for part_ids, part_vectors, keep in parts:
            n = int(keep.sum())
            out_ids[at : at + n] = part_ids[keep]
            out_vectors[at : at + n] = part_vectors[keep]
            at += n
        if ids is not None and vectors is not None:
            out_ids[at:], out_vectors[at:] = ids, vectors
        return out_ids, out_vectors

    # -- searching -------------------------------------------------------------------------

    def search(
        self,
        embeddings: np.ndarray,
        top_k: int = 10,
        where: Mapping[str, str] | None = None,
    ) -> list[list[Hit]]:
        """The `top_k` most similar photos to each embedding, most similar first, among the
        photos that match `where` (e.g. ``{"category": "Lipstick"}``): `top_k` of them
        whenever as many match."""
        queries = self._normalised(embeddings)
        rows = matching_rows(self._meta, where, self.vocabulary)
        scores, ids = self._search(queries, top_k, rows)
        hits = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            found = row_ids >= 0
            rows_found = self._meta.rows(row_ids[found])
            hits.append(
                [self._hit(r, s) for r, s in zip(rows_found, row_scores[found], strict=True)]
            )
        return hits

    def search_shade(
        self,
        shade: str | Sequence[float],
        top_k: int = 10,
        where: Mapping[str, str] | None = None,
    ) -> list[Hit]:
        """The `top_k` photos whose shade is closest to `shade` (hex or Lab) by ΔE2000,
        closest first (`score` is the ΔE2000), among those that match `where`."""
        target = parse_shade(shade)
        rows = matching_rows(self._meta, where, self.vocabulary)
        candidates = np.arange(len(self)) if rows is None else np.flatnonzero(rows)
        found, de = nearest_shades(self._meta.lab, target, candidates, top_k)
        return [self._hit(r, d) for r, d in zip(found, de, strict=True)]

    def recall(self, embeddings: np.ndarray, k: int = 10) -> float:
        """Recall@k of :meth:`search` against exact search for these queries: the mean share
        of the exact top k that the search finds (1.0 for a flat index, which is exact)."""
        queries = self._normalised(embeddings)
        if self.kind == "flat" or not len(queries):
            return 1.0
        _, found = self._search(queries, k, None)
        _, exact = ivf.exact_top(self._vectors, queries, min(k, len(self)))
        return ivf.recall(found, exact, k)

    def _search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (-1: none) of the top `k` among the photos of `rows` (a boolean
        mask over the metadata rows; None: all)."""
        selector, selected, bits = None, len(self), None
        if rows is not None:
            bitmap = np.zeros(self._next_id, dtype=bool)
            bitmap[self._meta.ids[rows]] = True
            selected = int(rows.sum())
            bits = np.packbits(bitmap, bitorder="little")  # kept alive while searching
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bits))
        k = min(k, selected)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), int)
        if self.kind == "flat":
            params = faiss.SearchParameters(sel=selector) if selector else None
            return self._vectors.search(queries, k, params=params)
        exact = selector is not None and selected <= EXACT_SUBSET
        scores, found = self._vectors.search(queries, k, params=self._ivf_params(selector, exact))
        short = (found < 0).any(axis=1)  # the lists scanned held fewer than k that match
        if short.any() and not exact:
            scores[short], found[short] = self._vectors.search(
                queries[short], k, params=self._ivf_params(selector, exact=True)
            )
        return scores, found

    def _ivf_params(self, selector: faiss.IDSelector | None, exact: bool):
        """Search parameters of the IVF index: its nprobe, or every list (exact search)."""
        nprobe = self._vectors.nlist if exact else self._vectors.nprobe
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if selector is not None:
            params.sel = selector
        return params

    def _hit(self, row: int, score: float) -> Hit:
        id, file, attributes = self._meta.record(int(row))
        return Hit(id, file, float(score), attributes)

    def _normalised(self, embeddings: np.ndarray) -> np.ndarray:
        vectors = np.array(embeddings, dtype=np.float32, copy=True, ndmin=2)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise SearchError(
                f"embeddings of shape {tuple(np.shape(embeddings))}: this index holds "
                f"{self.dim} values per photo (model {self.model})"
            )
        faiss.normalize_L2(vectors)
        return vectors


def _new_flat(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _is_hnsw(vectors: faiss.Index) -> bool:
    inner = getattr(vectors, "index", None)
    return inner is not None and isinstance(faiss.downcast_index(inner), faiss.IndexHNSW)


def _stored(vectors: faiss.Index) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) views of the stored vectors, in parts (IVF: by list)."""
    if isinstance(vectors, faiss.IndexIVF):
        return list(ivf.lists(vectors))
    inner = faiss.downcast_index(vectors.index)
    flat = faiss.downcast_index(inner.storage) if _is_hnsw(vectors) else inner
    ids = faiss.vector_to_array(vectors.id_map)
    if not len(ids):
        return []
    return [(ids, faiss.rev_swig_ptr(flat.get_xb(), len(ids) * flat.d).reshape(-1, flat.d))]


def _stored_ids(vectors: faiss.Index) -> np.ndarray:
    parts = [ids for ids, _ in _stored(vectors)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _replace(path: Path, write) -> None:
    """Write `path` through a temporary file, so that it is replaced whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
