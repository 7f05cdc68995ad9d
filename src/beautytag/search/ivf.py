"""The approximate kind of index: FAISS IVF-Flat (inner product), its lists trained by k-means
and its ``nprobe`` (how many lists a query scans) chosen by measuring.

* ``nlist``: about sqrt(N) lists for N vectors, at most N / 39 (FAISS's fewest training
  vectors per list), k-means on a sample of `TRAIN_PER_LIST` vectors per list. Fewer lists
  than the usual 4 * sqrt(N): training and adding cost in proportion to nlist, and in
  benchmarks/search.py (200,000 vectors like real embeddings, 2 cores) 2 and 4 * sqrt(N) took
  1.5 and 3.1 times the CPU time to build for queries only 12 and 15 % faster (0.54 and
  0.52 ms against 0.61 ms: fewer, longer lists scanned);
* ``nprobe``: the smallest that reaches recall@10 of `TARGET_RECALL` against exact search on a
  held-out sample: `CALIBRATION_QUERIES` indexed vectors drawn at random, each searched for its
  10 nearest *other* vectors (itself left out of both answers);
* the vectors are stored whole (float32), so that scanning every list is exact search,
  :func:`exact_top` does it with matrix products, and a rebuild loses nothing.

The labels FAISS stores are the index ids (no id map): vectors are removed in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import faiss
import numpy as np

LISTS_PER_SQRT = 1
MIN_PER_LIST = 39  # FAISS's k-means warns with fewer training vectors per centroid
TRAIN_PER_LIST = 40
TARGET_RECALL = 0.95
CALIBRATION_QUERIES = 200
EXACT_BLOCK = 8192  # vectors per matrix product in exact search
K = 10


def nlist_for(n: int) -> int:
    """How many lists an IVF index of `n` vectors gets."""
    return max(1, min(round(LISTS_PER_SQRT * math.sqrt(n)), n // MIN_PER_LIST))


def build(vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> faiss.IndexIVFFlat:
    """An IVF-Flat index of `vectors` (L2-normalised, float32) labelled `ids`, its lists
    trained on a random sample of them (not yet calibrated: nprobe 1)."""
    n, dim = vectors.shape
    nlist = nlist_for(n)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    rng = np.random.default_rng(seed)
    train = min(n, nlist * TRAIN_PER_LIST)
    ivf.train(vectors[np.sort(rng.choice(n, train, replace=False))] if train < n else vectors)
    # each list filled at once (FAISS's add grows them a vector at a time: slack memory)
    assigned = ivf.quantizer.search(vectors, 1)[1][:, 0]
    order = np.argsort(assigned, kind="stable")
    bounds = np.searchsorted(assigned[order], np.arange(nlist + 1))
    for list_no in range(nlist):
        at = order[bounds[list_no] : bounds[list_no + 1]]
        if len(at):
            list_ids, codes = np.ascontiguousarray(ids[at], np.int64), vectors[at].view(np.uint8)
            ivf.invlists.add_entries(
                list_no, len(at), faiss.swig_ptr(list_ids), faiss.swig_ptr(codes)
            )
    ivf.ntotal = n
    return ivf


def lists(ivf: faiss.IndexIVF) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of each non-empty list: views into the index, valid while it is
    unchanged."""
    invlists, dim = ivf.invlists, ivf.d
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
            codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * dim * 4)
            yield ids, codes.view(np.float32).reshape(size, dim)


def stored(ivf: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray]:
    """Copies of every (id, vector) in the index, by list."""
    parts = list(lists(ivf))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, ivf.d), np.float32)
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def exact_top(ivf: faiss.IndexIVF, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the exact top `k` (-1 past the end) for each query, by matrix products
    over blocks of lists (what scanning every list gives, much faster for many queries)."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    rows = np.arange(len(queries))[:, None]
    for ids, vectors in _blocks(ivf):
        s = np.concatenate([scores, queries @ vectors.T], axis=1)
        i = np.concatenate([found, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        scores, found = s[rows, top], i[rows, top]
    order = np.argsort(-scores, axis=1, kind="stable")
    return scores[rows, order], found[rows, order]


def _blocks(ivf: faiss.IndexIVF) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of consecutive lists, copied together in blocks of at least
    `EXACT_BLOCK` vectors (one matrix product each: small ones are slow)."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for part in lists(ivf):
        parts.append(part)
        if sum(len(i) for i, _ in parts) >= EXACT_BLOCK:
            yield np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])
            parts = []
    if parts:
        yield np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def sample(ivf: faiss.IndexIVF, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ids and copies of the vectors of `n` stored vectors drawn at random (all if fewer)."""
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    total = int(sizes.sum())
    picked = np.random.default_rng(seed).choice(total, min(n, total), replace=False)
    picked.sort()
    starts = np.cumsum(sizes) - sizes
    list_of = np.searchsorted(starts, picked, side="right") - 1
    ids, vectors = [], []
    for list_no, (list_ids, list_vectors) in zip(
        (i for i in range(ivf.nlist) if sizes[i]), lists(ivf), strict=True
    ):
        at = picked[list_of == list_no] - starts[list_no]
        ids.append(list_ids[at])
        vectors.append(list_vectors[at])
    return np.concatenate(ids), np.concatenate(vectors)


def recall(found: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    """The mean share of each row of `exact` (ids, -1: none) that `found` holds."""
    hits = [len(np.intersect1d(f[f >= 0], e[e >= 0])) for f, e in zip(found, exact, strict=True)]
    wanted = [max(1, min(k, int((e >= 0).sum()))) for e in exact]
    return float(np.mean(np.array(hits) / np.array(wanted))) if len(hits) else 1.0


def without_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The first `k` of each row of `ids` that is not the row's `own` id."""
    return np.stack([row[row != o][:k] for row, o in zip(ids, own, strict=True)])


def calibrate(
    ivf: faiss.IndexIVF, target: float = TARGET_RECALL, queries: int = CALIBRATION_QUERIES
) -> tuple[int, float, int]:
    """Set ``ivf.nprobe`` to the smallest that reaches recall@10 of `target` on a held-out
    sample (see the module's docstring); returns (nprobe, its recall, queries used)."""
    own, x = sample(ivf, queries)
    if not len(own):
        ivf.nprobe = 1
        return 1, 1.0, 0
    exact = without_own(exact_top(ivf, x, K + 1)[1], own, K)

    def measured(nprobe: int) -> float:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        return recall(without_own(ivf.search(x, K + 1, params=params)[1], own, K), exact)

    results = {ivf.nlist: 1.0}  # every list scanned: exact search
    low, high = 0, 1  # nprobe `low` misses the target (0: none tried), `high` is next to try
    while high < ivf.nlist and results.setdefault(high, measured(high)) < target:
        low, high = high, min(2 * high, ivf.nlist)
    while high - low > 1:  # recall grows with nprobe: the smallest in (low, high] that passes
        middle = (low + high) // 2
        if results.setdefault(middle, measured(middle)) >= target:
            high = middle
        else:
            low = middle
    ivf.nprobe = high
    return high, results[high], len(own)
