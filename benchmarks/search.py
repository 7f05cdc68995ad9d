"""Search index at scale (issue 37, the synthetic part): build time, memory, single-query
latency p50/p99 and recall@10 against exact search, for each size and kind of data:

* ``mixture``: vectors drawn like real embeddings. The shipped model embeds real photos
  (the catalogue's Personal Care photos, 2,000 of its other products, beauty-shades and
  wild-dev; cached, see ``--cache``); k-means splits them into components of about 20
  photos, and a draw is a component's mean plus a Gaussian with its members' empirical
  covariance (a random combination of their deviations from the mean), so draws spread like
  the photos of a component, in the directions they differ;
* ``random``: vectors uniform on the sphere, the worst case for approximate search.

Each size is built as ``beautytag index`` builds it: `Index.add` in chunks of 50,000 (the
index chooses flat or IVF and, for IVF, trains its lists and chooses nprobe), then
`Index.tune`. Queries are new draws of the same data, one at a time, top 10, on one FAISS
thread; recall@10 is against exact top 10 computed here, apart from the index, as the
chunks are drawn. Filtered queries keep one category of 20 (5 % of the photos); shade queries
rank every photo by CIEDE2000. Each (data, size) is stored when measured and skipped on the
next start (``--again`` measures it anew).

    python benchmarks/search.py [--sizes 10000 100000 1000000] [--data mixture random]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
from benchlib import datasets_dir, git_revision, no_datasets, write_results

from beautytag.search import EXACT_MAX, Index
from beautytag.search import ivf as ivf_module

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHUNK = 50_000
CATEGORIES = 20
OTHER_PRODUCTS = 2000  # catalogue photos outside Personal Care
COMPONENT_SIZE = 20  # real photos per mixture component
MIN_MEMBERS = 3  # the fewest a component keeps (smaller ones' photos go to the next nearest)
EMBED_PART = 250  # photos embedded between two saves of the cache
DEFAULT_LISTS = ivf_module.LISTS_PER_SQRT


def catalogue_photos(data: Path) -> list[Path]:
    """The real photos embedded: all of the catalogue's Personal Care, every k-th other
    product (OTHER_PRODUCTS), beauty-shades and wild-dev, in a fixed order."""
    fashion = data / "fashion-products-small"
    with open(fashion / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file_name"])
    care = [r for r in rows if r["masterCategory"] == "Personal Care"]
    rest = [r for r in rows if r["masterCategory"] != "Personal Care"]
    picked = care + rest[:: max(1, len(rest) // OTHER_PRODUCTS)][:OTHER_PRODUCTS]
    photos = [fashion / r["file_name"] for r in picked]
    for name in ("beauty-shades", "wild-dev"):
        with open(data / name / "labels.csv", newline="") as f:
            photos += sorted({data / name / r["file_name"] for r in csv.DictReader(f)})
    return photos


def real_embeddings(model: str, data: Path, cache: Path) -> tuple[np.ndarray, str]:
    """The model's embeddings of :func:`catalogue_photos` (unreadable ones left out) and the
    model's id; cached in `cache` after every EMBED_PART photos, and continued from there."""
    from beautytag.runtime.engine import Engine

    engine = Engine(model)
    photos = catalogue_photos(data)
    path = cache / f"embeddings-{engine.model_id}.npz"
    done = np.zeros((0, engine.embedding_dim), np.float32)
    if path.exists():
        done = np.load(path)["vectors"]
    t0 = time.perf_counter()
    for start in range(len(done), len(photos), EMBED_PART):
        part = photos[start : start + EMBED_PART]
        rows = [
            np.full(engine.embedding_dim, np.nan, np.float32) if emb is None else emb
            for _, emb in engine.embed_items([(str(p), p) for p in part])
        ]
        done = np.concatenate([done, np.stack(rows)])
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, vectors=done)
        os.replace(tmp, path)
        print(
            f"  embedded {len(done)}/{len(photos)}, {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return done[~np.isnan(done).any(axis=1)], engine.model_id


class Data:
    """Draws of one distribution (see the module's docstring), DIM values each."""

    def __init__(self, kind: str, real: np.ndarray | None, seed: int = 0) -> None:
        self.kind = kind
        self.dim = 1280 if real is None else real.shape[1]
        if kind == "mixture":
            assert real is not None
            x = real / np.linalg.norm(real, axis=1, keepdims=True)
            k = max(1, len(x) // COMPONENT_SIZE)
            kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True)
            kmeans.train(x)
            centroids = kmeans.centroids
            while True:  # a component of 1 or 2 photos would draw (near) copies: none such
                labels = np.argmax(x @ centroids.T, axis=1)
                sizes = np.bincount(labels, minlength=len(centroids))
                if sizes.min() >= MIN_MEMBERS:
                    break
                centroids = centroids[sizes >= MIN_MEMBERS]
            self.means = np.stack([x[labels == c].mean(axis=0) for c in range(len(centroids))])
            self.deviations = [x[labels == c] - self.means[c] for c in range(len(centroids))]
            sizes = np.array([len(d) for d in self.deviations], dtype=float)
            self.weights = sizes / sizes.sum()

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "random":
            return rng.standard_normal((n, self.dim), dtype=np.float32)
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        out = self.means[component].astype(np.float32)
        for c in np.unique(component):
            at = np.flatnonzero(component == c)
            dev = self.deviations[c]
            scale = 1 / np.sqrt(max(1, len(dev) - 1))
            out[at] += scale * rng.standard_normal((len(at), len(dev)), dtype=np.float32) @ dev
        return out

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, size, CHUNK):
            rng = np.random.default_rng([1, start])
            yield start, self.draw(min(CHUNK, size - start), rng)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def attributes(start: int, n: int) -> list[dict]:
    rng = np.random.default_rng(start)
    labs = np.column_stack(
        [rng.uniform(20, 80, n), rng.uniform(-20, 60, n), rng.uniform(-20, 50, n)]
    )
    return [
        {"category": {"label": f"cat{(start + i) % CATEGORIES}"}, "shade": {"lab": lab.tolist()}}
        for i, lab in enumerate(labs)
    ]


def rss_mb(field: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS), or its peak since :func:`reset_peak` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def latency(call: Callable, queries: np.ndarray) -> tuple[dict, list]:
    """p50/p99 in ms of `call(query)` one query at a time (after 3 warm-up calls): wall-clock
    time, and the thread's CPU time (``cpu_p50``, ``cpu_p99``: without the waits for a core
    that a loaded machine adds)."""
    for q in queries[:3]:
        call(q)
    wall, cpu, out = [], [], []
    for q in queries:
        t0, c0 = time.perf_counter(), time.thread_time()
        out.append(call(q))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    ms, cpu_ms = 1000 * np.array(wall), 1000 * np.array(cpu)
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "cpu_p50": round(float(np.percentile(cpu_ms, 50)), 3),
        "cpu_p99": round(float(np.percentile(cpu_ms, 99)), 3),
    }, out


def index_mb(index: Index) -> float:
    """What the FAISS index holds: the vectors (float32), their ids and, for IVF, the lists'
    centroids."""
    vectors = index._vectors  # a benchmark looks inside
    n, d = vectors.ntotal, vectors.d
    centroids = vectors.nlist * d * 4 if isinstance(vectors, faiss.IndexIVF) else 0
    return (n * d * 4 + n * 8 + centroids) / 2**20


OPENED = """
import json, sys, time
from pathlib import Path
import numpy as np
from beautytag.search import Index

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

before, t0 = rss(), time.perf_counter()
index = Index.open(sys.argv[1])
seconds = time.perf_counter() - t0
index.search(np.ones(index.dim, dtype=np.float32), 10)
print(json.dumps({"open_s": round(seconds, 1), "opened_rss_mb": round(rss() - before)}))
"""


def opened(folder: Path) -> dict:
    """Time and RSS growth of opening the saved index in a new process (what ``beautytag
    search`` or ``serve`` hold: FAISS reads each list at its size)."""
    done = subprocess.run(
        [sys.executable, "-c", OPENED, str(folder)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def measure(
    data: Data, size: int, n_queries: int, threads: int, folder: Path, exact_max: int = EXACT_MAX
) -> dict:
    queries = unit(data.draw(n_queries, np.random.default_rng(2)))
    exact_s = np.full((n_queries, 10), -np.inf, np.float32)
    exact_i = np.full((n_queries, 10), -1, np.int64)
    rows = np.arange(n_queries)[:, None]
    gc.collect()
    reset_peak()
    before = rss_mb()
    index = Index.create(folder, "synthetic@00000000", data.dim, exact_max=exact_max)
    build = build_cpu = 0.0
    for start, vectors in data.chunks(size):
        vectors = unit(vectors)  # exact top 10 of the queries so far, apart from the index
        s = np.concatenate([exact_s, queries @ vectors.T], axis=1)
        ids = np.broadcast_to(np.arange(start, start + len(vectors)), (n_queries, len(vectors)))
        i = np.concatenate([exact_i, ids], axis=1)
        top = np.argpartition(-s, 9, axis=1)[:, :10]
        exact_s, exact_i = s[rows, top], i[rows, top]
        records = attributes(start, len(vectors))
        files = [f"{data.kind}/{start + j}.jpg" for j in range(len(vectors))]
        t0, c0 = time.perf_counter(), time.process_time()
        index.add(files, vectors, records)
        build += time.perf_counter() - t0
        build_cpu += time.process_time() - c0
        del vectors, s, i, ids
        print(f"  {data.kind} {size}: {len(index)} added, {build:.0f} s", file=sys.stderr)
    t0, c0 = time.perf_counter(), time.process_time()
    settings = index.tune()
    tune_s = time.perf_counter() - t0
    build_cpu += time.process_time() - c0
    grown, peak = rss_mb() - before, rss_mb("VmHWM") - before
    t0 = time.perf_counter()
    index.save()
    save_s = time.perf_counter() - t0
    build_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    plain, found = latency(lambda q: index.search(q, 10), queries)
    filtered, hits = latency(lambda q: index.search(q, 10, where={"category": "cat3"}), queries)
    shade, _ = latency(lambda q: index.search_shade("#b03a48", 10), queries[:20])
    faiss.omp_set_num_threads(build_threads)
    found_ids = np.array([[h.id for h in r[0]] for r in found])
    kind, held_mb = index.kind, index_mb(index)
    fewest = min(len(h[0]) for h in hits)
    index = found = hits = None  # freed before the saved index is opened
    gc.collect()
    loaded = opened(folder)
    result = {
        "data": data.kind,
        "size": size,
        "kind": kind,
        "nlist": settings.get("nlist"),
        "nprobe": settings.get("nprobe"),
        "calibration_recall_at_10": settings.get("recall_at_10"),
        "build_s": round(build + tune_s, 1),
        "tune_s": round(tune_s, 1),
        "build_cpu_s": round(build_cpu, 1),
        "vectors_per_s": round(size / (build + tune_s)),
        "save_s": round(save_s, 1),
        **loaded,
        "index_mb": round(held_mb),
        "rss_growth_mb": round(grown),
        "rss_peak_growth_mb": round(peak),
        "disk_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20),
        "query_ms": plain,
        "filtered_query_ms": filtered,
        "filtered_min_results": fewest,
        "shade_query_ms": shade,
        "recall_at_10": round(ivf_module.recall(found_ids, exact_i), 4),
        "queries": n_queries,
        "load_average": round(os.getloadavg()[0], 1),
    }
    print(f"  {result}", file=sys.stderr)
    return result


def markdown(payload: dict) -> list[str]:
    source = payload.get("real_embeddings") or {}
    lines = [
        "# Search index at scale (synthetic embeddings)",
        "",
        "Measured by "
        + "; ".join(sorted({f"`{r['command']}` at {r['revision']}" for r in payload["runs"]}))
        + f" on {payload['machine']}.",
        "",
        f"{payload['dim']}-dimensional vectors, L2-normalised. *mixture*: drawn like "
        f"{source.get('count', '?')} real embeddings of catalogue photos by "
        f"`{source.get('model', '?')}` (a Gaussian per k-means component of ~"
        f"{COMPONENT_SIZE} photos, with their empirical covariance; see the script's "
        "docstring); *random*: uniform on the sphere, the worst case. The index chooses its "
        f"kind: flat (exact) up to {payload['exact_max']:,} vectors, IVF-Flat above "
        f"(nlist ~ {DEFAULT_LISTS:g} sqrt(N) lists trained by k-means, unless the kind says "
        "otherwise; nprobe the smallest reaching "
        f"recall@10 {ivf_module.TARGET_RECALL} on {ivf_module.CALIBRATION_QUERIES} held-out "
        "indexed vectors, *calib.*). Build: `Index.add` in chunks of 50,000 plus `Index.tune`, "
        "not drawing the vectors: wall-clock seconds, and the CPU seconds of the process (all "
        "its threads). *index MB*: the vectors, ids and centroids FAISS holds; "
        "*RSS* growth of the process after the build, and its peak during it (a rebuild holds "
        "two copies; lists grown by adds leave freed memory in the heap); *opened*: RSS growth "
        "of a new process opening the saved index, what `beautytag search` and `serve` hold. "
        f"Latency: {payload['queries']} queries one at a time on "
        f"{payload['query_threads']} FAISS thread, top 10; *recall@10*: of those queries "
        "against exact top 10 computed apart from the index; *CPU*: the query thread's CPU time, "
        "without the waits for a core that the load adds. *filtered*: `where={category: "
        "cat3}` (5 % of the photos; *min k*: the fewest results a filtered query got). "
        "*shade*: CIEDE2000 over every photo (20 queries). *load*: the machine's 1-minute load "
        "average after the run: 2 cores shared with a training job and other work, so times "
        "are under load and noisy.",
        "",
        "| data | vectors | kind | nlist | nprobe | build s | build CPU s | index MB | RSS MB "
        "| RSS peak MB | opened RSS MB "
        "| query p50 ms | query p99 ms | CPU p50 ms | CPU p99 ms | recall@10 | calib. "
        "| filtered p50 ms | filtered p99 ms | min k | shade p50 ms | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(payload["runs"], key=lambda r: (r["data"], r["size"], r["lists_per_sqrt"])):
        lists = "" if r["lists_per_sqrt"] == DEFAULT_LISTS else f" ({r['lists_per_sqrt']:g} sqrt N)"
        q = r["query_ms"]
        lines.append(
            f"| {r['data']} | {r['size']:,} | {r['kind']}{lists} | {r['nlist'] or '-'} | "
            f"{r['nprobe'] or '-'} | {r['build_s']} | {r['build_cpu_s']} | {r['index_mb']:,} | "
            f"{r['rss_growth_mb']:,} | {r['rss_peak_growth_mb']:,} | {r['opened_rss_mb']:,} | "
            f"{q['p50']} | {q['p99']} | "
            f"{q['cpu_p50']} | {q['cpu_p99']} | {r['recall_at_10']} | "
            f"{r['calibration_recall_at_10'] or '-'} | {r['filtered_query_ms']['p50']} | "
            f"{r['filtered_query_ms']['p99']} | {r['filtered_min_results']} | "
            f"{r['shade_query_ms']['p50']} | {r['load_average']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--data", nargs="+", choices=["mixture", "random"], default=["mixture", "random"]
    )
    parser.add_argument("--model", default="default", help="the model embedding real photos")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--query-threads", type=int, default=1, help="FAISS threads querying")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "beautytag-search-benchmark",
        help="where the real photos' embeddings are kept",
    )
    parser.add_argument(
        "--lists-per-sqrt",
        type=float,
        default=ivf_module.LISTS_PER_SQRT,
        help="IVF lists per sqrt(N) (default: the index's); runs with another are extra rows",
    )
    parser.add_argument("--exact-max", type=int, default=EXACT_MAX, help="flat up to this size")
    parser.add_argument(
        "--again", action="store_true", help="measure the sizes given again (others are kept)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "search_synthetic")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    out_json = args.out.with_suffix(".json")
    stored = json.loads(out_json.read_text()) if out_json.exists() else {}
    runs = {r["key"]: r for r in stored.get("runs", []) if "key" in r}
    ivf_module.LISTS_PER_SQRT = args.lists_per_sqrt
    variant = "" if args.lists_per_sqrt == DEFAULT_LISTS else f"|lists={args.lists_per_sqrt:g}"
    variant += "" if args.exact_max == EXACT_MAX else f"|exact_max={args.exact_max}"
    real, model = None, None
    if "mixture" in args.data:
        data_dir = datasets_dir()
        if no_datasets(data_dir, "fashion-products-small", "beauty-shades", "wild-dev"):
            return
        real, model = real_embeddings(args.model, data_dir, args.cache)
    payload = {
        "revision": git_revision(),
        "command": shlex.join(["python", "benchmarks/search.py", *given]),
        "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} threads, "
        f"faiss {faiss.__version__}",
        "dim": 1280 if real is None else real.shape[1],
        "query_threads": args.query_threads,
        "queries": args.queries,
        "exact_max": EXACT_MAX,
        "real_embeddings": stored.get("real_embeddings")
        if real is None
        else {"model": model, "count": len(real)},
    }
    for kind in args.data:
        data = Data(kind, real)
        for size in args.sizes:
            key = f"{kind}|{size}{variant}"
            if key in runs and not args.again:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "i"
                result = measure(
                    data, size, args.queries, args.query_threads, folder, args.exact_max
                )
            runs[key] = result | {
                "key": key,
                "lists_per_sqrt": args.lists_per_sqrt,
                "exact_max": args.exact_max,
                "revision": payload["revision"],
                "command": payload["command"],
            }
            payload["runs"] = list(runs.values())
            write_results(args.out, payload, markdown(payload))  # each size kept as measured
            gc.collect()
    payload["runs"] = list(runs.values())
    write_results(args.out, payload, markdown(payload))


if __name__ == "__main__":
    main()
