"""An index of photo embeddings (FAISS, inner product of L2-normalised vectors) with each
photo's file, predicted attributes and shade, in a folder:

* ``vectors.faiss``: an ``IndexIDMap2`` around an exact ``IndexFlatIP`` while the index holds
  at most `exact_max` vectors, around an ``IndexHNSWFlat`` above (``kind``);
* ``metadata.parquet``: the rows (see :mod:`beautytag.search.metadata`);
* ``manifest.json``: the model that made the embeddings, their size and the settings.

Ids only grow: a replaced photo gets a new id. HNSW cannot delete, so a removed photo's vector
stays in it, never found (searches then select the live ids), until the orphans are a quarter
of the vectors and the index is rebuilt. The files are saved vectors first, manifest last, and
opening keeps the ids both files hold, so an index interrupted while saving opens as it was
before or after that save.
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

from beautytag.search.errors import SearchError
from beautytag.search.filters import matching_rows
from beautytag.search.metadata import Metadata
from beautytag.search.shade import nearest_shades, parse_shade

FORMAT = "beautytag-search/1"
MANIFEST, VECTORS, METADATA = "manifest.json", "vectors.faiss", "metadata.parquet"
EXACT_MAX = 100_000  # more vectors than this: HNSW
EXACT_SUBSET = 10_000  # filtered searches over at most this many vectors are exact
HNSW = {"m": 32, "ef_construction": 40, "ef_search": 128}


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
        self.hnsw: dict[str, int] = manifest["hnsw"]
        self.vocabulary: dict[str, list[str]] = manifest["vocabulary"]
        self._vectors = vectors
        self._meta = meta
        self._id_map = faiss.vector_to_array(vectors.id_map)  # FAISS position -> id
        self._live: np.ndarray | None = None  # FAISS position of each metadata row
        # ids are never given again, not even those of photos removed before a save
        used = max(self._id_map.max(initial=-1), meta.ids.max(initial=-1))
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
        hnsw: Mapping[str, int] | None = None,
        vocabulary: Mapping[str, Sequence[str]] | None = None,
    ) -> Index:
        """A new empty index in `folder` (saved at once) for embeddings of `dim` values made
        by `model` (e.g. ``default@1a2b3c4d``). `vocabulary`: the valid values of filter
        attributes (the model's classes); without it, the values in the index are."""
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise SearchError(f"{folder} already holds an index; open it to add photos")
        manifest = {
            "format": FORMAT,
            "model": model,
            "dim": int(dim),
            "exact_max": int(exact_max),
            "hnsw": {**HNSW, **(hnsw or {})},
            "vocabulary": {k: list(v) for k, v in (vocabulary or {}).items()},
        }
        folder.mkdir(parents=True, exist_ok=True)
        index = cls(folder, manifest, _new_vectors("flat", int(dim), manifest["hnsw"]), Metadata())
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
            if manifest.get("format") != FORMAT:
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
        vectors = faiss.read_index(str(folder / VECTORS))
        meta = Metadata.load(folder / METADATA)
        orphaned = ~np.isin(meta.ids, faiss.vector_to_array(vectors.id_map))
        if orphaned.any():  # removed from the vectors by a save that did not finish
            meta.remove(meta.ids[orphaned])
        return cls(folder, manifest, vectors, meta)

    def save(self) -> None:
        """Write the index to its folder (each file replaced whole)."""
        manifest = {
            "format": FORMAT,
            "model": self.model,
            "dim": self.dim,
            "exact_max": self.exact_max,
            "hnsw": self.hnsw,
            "vocabulary": self.vocabulary,
            "kind": self.kind,
            "count": len(self),
            "next_id": self._next_id,
        }
        _replace(self.folder / VECTORS, lambda p: faiss.write_index(self._vectors, str(p)))
        _replace(self.folder / METADATA, self._meta.save)
        _replace(self.folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))

    # -- contents --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``flat`` (exact search) or ``hnsw`` (approximate)."""
        return "hnsw" if isinstance(self._ann, faiss.IndexHNSW) else "flat"

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

    def describe(self) -> dict[str, Any]:
        """What the index is: model, dim, kind, photos and orphaned vectors."""
        return {
            "model": self.model,
            "dim": self.dim,
            "kind": self.kind,
            "count": len(self),
            "orphans": self._vectors.ntotal - len(self),
        }

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
        Turns the index into HNSW once it holds more than `exact_max` photos."""
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
        if self.kind == "flat" and len(self) + len(files) > self.exact_max:
            self._rebuild(ids, vectors)
        else:
            self._vectors.add_with_ids(vectors, ids)
            self._id_map = np.concatenate([self._id_map, ids])
        self._meta.append(ids, files, attributes)
        self._live = None
        return ids

    def remove(self, files: Sequence[str]) -> int:
        """Remove the photos of `files` that the index holds; returns how many."""
        ids = np.array(
            [i for f in files if (i := self._meta.id_of(str(f))) is not None], dtype=np.int64
        )
        if not len(ids):
            return 0
        self._meta.remove(ids)
        self._live = None
        if self.kind == "flat":
            self._vectors.remove_ids(ids)
            self._id_map = faiss.vector_to_array(self._vectors.id_map)
        elif self._vectors.ntotal - len(self) > self._vectors.ntotal // 4:
            self._rebuild()
        return len(ids)

    def _rebuild(self, ids: np.ndarray | None = None, vectors: np.ndarray | None = None) -> None:
        """A new FAISS index of the live vectors (and `vectors` of new `ids`), of the kind
        their number calls for."""
        live = self._positions(None)
        all_ids = self._id_map[live]
        all_vectors = np.zeros((0, self.dim), dtype=np.float32)
        if self._vectors.ntotal:
            stored = faiss.rev_swig_ptr(self._flat.get_xb(), self._vectors.ntotal * self.dim)
            all_vectors = stored.reshape(-1, self.dim)[live]  # a copy
        if ids is not None:
            all_ids = np.concatenate([all_ids, ids])
            all_vectors = np.concatenate([all_vectors, vectors])
        kind = "hnsw" if len(all_ids) > self.exact_max else "flat"
        self._vectors = _new_vectors(kind, self.dim, self.hnsw)
        self._vectors.add_with_ids(all_vectors, all_ids)
        self._id_map = all_ids
        self._live = None

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
        scores, positions = self._search(queries, top_k, rows)
        hits = []
        for row_scores, row_positions in zip(scores, positions, strict=True):
            found = row_positions >= 0
            rows_found = self._meta.rows(self._id_map[row_positions[found]])
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
        of the exact top k that the search finds (1.0 for a flat index)."""
        queries = self._normalised(embeddings)
        _, approximate = self._search(queries, k, None)
        _, exact = self._search(queries, k, None, exact=True)
        found = [
            len(np.intersect1d(a[a >= 0], e[e >= 0]))
            for a, e in zip(approximate, exact, strict=True)
        ]
        wanted = max(1, min(k, len(self)))
        return float(np.mean(found) / wanted) if len(queries) else 1.0

    def _search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and FAISS positions (-1: none) of the top `k` among the live photos of
        `rows` (a boolean mask over the metadata rows; None: all)."""
        if rows is None and len(self) == self._vectors.ntotal:
            positions, selector = None, None  # every vector is live and wanted
        else:
            positions = self._positions(rows)
            bitmap = np.zeros(self._vectors.ntotal, dtype=bool)
            bitmap[positions] = True
            bits = np.packbits(bitmap, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bits))
        k = min(k, len(self) if positions is None else len(positions))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), int)
        flat_params = faiss.SearchParameters(sel=selector) if selector else None
        if exact or self.kind == "flat" or (selector and len(positions) <= EXACT_SUBSET):
            return self._flat.search(queries, k, params=flat_params)
        params = faiss.SearchParametersHNSW(efSearch=max(self.hnsw["ef_search"], k))
        if selector:
            params.sel = selector
        scores, found = self._ann.search(queries, k, params=params)
        short = (found < 0).any(axis=1)  # HNSW with a selector may find fewer than k
        if short.any():
            scores[short], found[short] = self._flat.search(queries[short], k, params=flat_params)
        return scores, found

    def _positions(self, rows: np.ndarray | None) -> np.ndarray:
        """FAISS positions of the metadata rows selected by `rows` (None: all)."""
        if self._live is None:
            self._live = np.searchsorted(self._id_map, self._meta.ids)
        return self._live if rows is None else self._live[rows]

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

    @property
    def _ann(self) -> faiss.Index:
        return faiss.downcast_index(self._vectors.index)

    @property
    def _flat(self) -> faiss.IndexFlat:
        """The stored vectors as an exact index, by FAISS position."""
        ann = self._ann
        return faiss.downcast_index(ann.storage) if isinstance(ann, faiss.IndexHNSW) else ann


def _new_vectors(kind: str, dim: int, hnsw: Mapping[str, int]) -> faiss.IndexIDMap2:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    ann = faiss.IndexHNSWFlat(dim, hnsw["m"], faiss.METRIC_INNER_PRODUCT)
    ann.hnsw.efConstruction = hnsw["ef_construction"]
    ann.hnsw.efSearch = hnsw["ef_search"]
    return faiss.IndexIDMap2(ann)


def _replace(path: Path, write) -> None:
    """Write `path` through a temporary file, so that it is replaced whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
