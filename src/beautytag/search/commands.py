"""``beautytag index`` and ``beautytag search``: the model's embeddings and predictions of
photos into an index, and the index searched by photo or by shade.

The index stores each photo's absolute path (``os.path.abspath``, links not resolved), so
that it can be searched and served from any folder; ``--resume`` and ``--remove`` compare
paths the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from beautytag.checkpoint import SHIPPED_MODELS
from beautytag.runtime.engine import Engine, expand_paths
from beautytag.search.errors import SearchError
from beautytag.search.filters import parse_where
from beautytag.search.index import EXACT_MAX, MANIFEST, Hit, Index
from beautytag.search.shade import parse_shade

CHUNK = 1000  # photos embedded and added between two saves


def stored_path(path: str | os.PathLike) -> str:
    """How the index names a photo: its absolute path."""
    return os.path.abspath(path)


def hit_record(hit: Hit, file: str | None = None) -> dict[str, Any]:
    """One result as the CLI writes it (the service names the file itself)."""
    return {
        "id": hit.id,
        "file": hit.file if file is None else file,
        "score": round(hit.score, 4),
        "attributes": hit.attributes,
    }


def open_for(engine: Engine, folder: str | os.PathLike) -> Index:
    """The index in `folder`, checked to be made by the engine's model."""
    return Index.open(folder, model=engine.model_id, dim=engine.embedding_dim)


def index_photos(
    paths: Sequence[str],
    out: str,
    model: str | None = None,
    resume: bool = False,
    remove: Sequence[str] = (),
    batch_size: int = 32,
    chunk: int = CHUNK,
    log: TextIO | None = None,
    exact_max: int = EXACT_MAX,
) -> tuple[dict[str, Any], int]:
    """Build or update the index in `out`; returns the summary and how many photos failed.
    Progress and skipped photos go to `log` (standard error by default); a new index is
    exact up to `exact_max` photos, IVF above (its nprobe chosen again after adding)."""
    log = log or sys.stderr
    folder = Path(out)
    exists = (folder / MANIFEST).exists()
    if not paths and not remove:
        raise SearchError("nothing to do: give photos or folders to index, or --remove FILE")
    if exists and paths and not resume:
        raise SearchError(
            f"{folder} already holds an index: --resume adds photos to it (skipping those it "
            "has), or give another -o"
        )
    if not exists and (resume or remove) and not paths:
        Index.open(folder)  # the clear "no index" message
    summary: dict[str, Any] = {"index": str(folder)}
    index = Index.open(folder) if exists and not paths else None
    engine = None
    if paths:
        engine = Engine(model, batch_size=batch_size)
        if exists:
            index = open_for(engine, folder)
        else:
            index = Index.create(
                folder,
                engine.model_id,
                engine.embedding_dim,
                exact_max=exact_max,
                vocabulary=engine.vocabulary(),
            )
    assert index is not None
    if remove:
        files = [stored_path(f) for f in expand_removed(remove)]
        summary["removed"] = index.remove(files)
        if summary["removed"] < len(files):
            print(f"{len(files) - summary['removed']} of --remove not in the index", file=log)
        index.save()
    failed = 0
    if paths:
        assert engine is not None
        photos = [stored_path(p) for p in expand_paths(paths)]
        todo = [p for p in photos if not (resume and p in index)]
        summary["skipped_indexed"] = len(photos) - len(todo)
        added, t0 = 0, time.perf_counter()
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            files, vectors, records = [], [], []
            for pred, emb in engine.embed_items([(p, p) for p in part]):
                if emb is None:
                    failed += 1
                    print(f"skipped {pred.file}: {pred.error}", file=log)
                    continue
                files.append(pred.file)
                vectors.append(emb)
                records.append(pred.to_dict()["attributes"])
            if files:
                index.add(files, np.stack(vectors), records)
            index.save()  # an interrupted run resumes after this chunk
            added += len(files)
            rate = (start + len(part)) / max(time.perf_counter() - t0, 1e-9)
            print(
                f"{start + len(part)}/{len(todo)} photos ({added} added, {failed} failed), "
                f"{rate:.1f} photos/s",
                file=log,
            )
        summary["added"], summary["failed"] = added, failed
        if not photos:
            print(f"warning: no image files in {', '.join(map(str, paths))}", file=log)
        if added and index.kind == "ivf":
            index.tune()  # nprobe for what it holds now
            index.save()
    summary |= index.describe()
    print(describe_kind(index), file=log)
    return summary, failed


def describe_kind(index: Index) -> str:
    """The line that says what kind of index `index` is, and for IVF its measured recall."""
    if index.kind == "flat":
        return f"index: {len(index)} photos, flat (exact search)"
    s = index.ivf_settings()
    return (
        f"index: {len(index)} photos, IVF (approximate: nlist {s['nlist']}, nprobe "
        f"{s['nprobe']}), recall@10 {s.get('recall_at_10')} against exact search on "
        f"{s.get('calibration_queries')} of its photos"
    )


def expand_removed(given: Sequence[str]) -> list[str]:
    """--remove arguments: a folder on disk is its photos, anything else a file name."""
    out: list[str] = []
    for g in given:
        out += [str(p) for p in expand_paths(g)] if Path(g).is_dir() else [g]
    return out


def model_for(index_dir: str | os.PathLike, model: str | None) -> str | None:
    """The model to search an index with: `model` as given, or without one the index's own
    model where that is a shipped one; a shipped model's id ``NAME@HASH`` (as an index names
    it) means NAME, whose hash opening the index checks."""
    given = model
    if model is None:
        try:
            model = str(json.loads((Path(index_dir) / MANIFEST).read_text())["model"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    name = model.rpartition("@")[0]
    if name in SHIPPED_MODELS and not Path(model).exists():
        return name
    return given


def search_photos(
    index_dir: str,
    photos: Sequence[str],
    shade: str | None,
    top_k: int,
    where_pairs: Sequence[str],
    model: str | None,
    out: TextIO,
) -> int:
    """Write one JSON line per query; returns how many photos could not be used."""
    where = parse_where(where_pairs)
    if bool(photos) == bool(shade):
        raise SearchError("give photos to search with, or --shade HEX|L,a,b (one of the two)")
    if shade is not None:
        lab = parse_shade(shade)
        hits = Index.open(index_dir).search_shade(lab, top_k, where)
        query = {"shade": shade, "lab": [float(v) for v in lab]}
        out.write(json.dumps({"query": query, "results": [hit_record(h) for h in hits]}) + "\n")
        return 0
    if not Path(index_dir).is_dir():
        Index.open(index_dir)  # no index: say so before loading the model
    engine = Engine(model_for(index_dir, model))
    index = open_for(engine, index_dir)
    index.count(where)  # an unknown filter fails before any photo is read
    files = expand_paths(photos)
    bad = 0
    for pred, emb in engine.embed_items([(str(f), f) for f in files]):
        if emb is None:
            bad += 1
            line = {"query": pred.file, "error": pred.error, "results": []}
        else:
            [hits] = index.search(emb, top_k, where)
            line = {"query": pred.file, "results": [hit_record(h) for h in hits]}
        out.write(json.dumps(line) + "\n")
        out.flush()
    if not files:
        print(f"warning: no image files in {', '.join(map(str, photos))}", file=sys.stderr)
    return bad
