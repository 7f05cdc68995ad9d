"""The metadata table of an index: one row per vector (id, file, attributes, shade Lab and the
predicted labels the filters compare), rows in ascending id order, stored as Parquet.

An attribute of a predict record is single-label when it has a ``label`` (its predicted
label is kept, lowercased, for filters), multi-label when it has ``labels`` (its tags are
kept), and the shade when it has ``lab``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_LABEL = "label:"  # Parquet column prefix of a single-label attribute
_TAGS = "tags:"  # ... of a multi-label attribute
MEMO = 64  # filter masks kept until the table changes


def record_shade(attributes: Mapping[str, Any]) -> list[float]:
    """The Lab of the record's shade attribute; NaNs where it has none."""
    for value in attributes.values():
        if isinstance(value, Mapping) and "lab" in value and value["lab"] is not None:
            return [float(v) for v in value["lab"]]
    return [np.nan] * 3


def record_labels(attributes: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, tuple]]:
    """The record's predicted label of each single-label attribute and the tags of each
    multi-label attribute, lowercased."""
    labels: dict[str, str] = {}
    tags: dict[str, tuple] = {}
    for name, value in attributes.items():
        if not isinstance(value, Mapping):
            continue
        if "label" in value:
            labels[name] = str(value["label"] or "").casefold()
        elif "labels" in value:
            tags[name] = tuple(
                str(t[0] if isinstance(t, list | tuple) else t).casefold()
                for t in value["labels"] or ()
            )
    return labels, tags


class Metadata:
    """Rows of (id, file, attributes JSON, Lab, filter labels), ids ascending."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, dtype=np.int64)
        self.files = np.zeros(0, dtype=object)
        self.attributes = np.zeros(0, dtype=object)  # JSON text, parsed only for results
        self.lab = np.zeros((0, 3), dtype=np.float64)
        self.labels: dict[str, np.ndarray] = {}  # attribute -> lowercased label per row
        self.tags: dict[str, np.ndarray] = {}  # attribute -> tuple of lowercased tags per row
        self._id_of_file: dict[str, int] = {}
        self._memo: dict[tuple, np.ndarray] = {}

    def memo(self, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()``, kept under `key` until the table changes (the `MEMO` latest): a
        filter's mask over a million rows takes tens of milliseconds. Not to be changed."""
        if key not in self._memo:
            if len(self._memo) >= MEMO:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = compute()
        return self._memo[key]

    def __len__(self) -> int:
        return len(self.ids)

    def id_of(self, file: str) -> int | None:
        """The id of `file`, None where it is not in the table."""
        return self._id_of_file.get(file)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of `ids` (each must be in the table)."""
        return np.searchsorted(self.ids, ids)

    def record(self, row: int) -> tuple[int, str, dict[str, Any]]:
        """(id, file, attributes) of a row."""
        return int(self.ids[row]), str(self.files[row]), json.loads(self.attributes[row])

    def append(
        self, ids: np.ndarray, files: Sequence[str], attributes: Sequence[Mapping[str, Any]]
    ) -> None:
        """Add rows; `ids` must be larger than every id in the table."""
        n = len(ids)
        parsed = [record_labels(a) for a in attributes]
        labels = {
            k: np.array([p[0].get(k, "") for p in parsed], dtype=object)
            for k in {k for p in parsed for k in p[0]} | set(self.labels)
        }
        tags = {
            k: _objects([p[1].get(k, ()) for p in parsed])
            for k in {k for p in parsed for k in p[1]} | set(self.tags)
        }
        self._extend(
            np.asarray(ids, dtype=np.int64),
            np.array(list(files), dtype=object),
            np.array([json.dumps(a, default=_plain) for a in attributes], dtype=object),
            np.array([record_shade(a) for a in attributes], dtype=np.float64).reshape(n, 3),
            labels,
            tags,
        )

    def _extend(self, ids, files, attributes, lab, labels, tags) -> None:
        self._memo.clear()
        old, n = len(self), len(ids)
        self.ids = np.concatenate([self.ids, ids])
        self.files = np.concatenate([self.files, files])
        self.attributes = np.concatenate([self.attributes, attributes])
        self.lab = np.concatenate([self.lab, lab])
        for k in set(labels) | set(self.labels):
            self.labels[k] = np.concatenate(
                [
                    self.labels.get(k, np.full(old, "", dtype=object)),
                    labels.get(k, np.full(n, "", dtype=object)),
                ]
            )
        for k in set(tags) | set(self.tags):
            self.tags[k] = np.concatenate(
                [self.tags.get(k, _objects([()] * old)), tags.get(k, _objects([()] * n))]
            )
        self._id_of_file.update(zip(files.tolist(), ids.tolist(), strict=True))

    def remove(self, ids: np.ndarray) -> None:
        """Drop the rows of `ids` (each must be in the table)."""
        self._memo.clear()
        keep = np.ones(len(self), dtype=bool)
        keep[self.rows(ids)] = False
        for file in self.files[~keep]:
            del self._id_of_file[file]
        self.ids, self.files = self.ids[keep], self.files[keep]
        self.attributes, self.lab = self.attributes[keep], self.lab[keep]
        self.labels = {k: v[keep] for k, v in self.labels.items()}
        self.tags = {k: v[keep] for k, v in self.tags.items()}

    def save(self, path: Path) -> None:
        columns = {
            "id": pa.array(self.ids, pa.int64()),
            "file": pa.array(self.files.tolist(), pa.string()),
            "attributes": pa.array(self.attributes.tolist(), pa.string()),
            "L": self.lab[:, 0],
            "a": self.lab[:, 1],
            "b": self.lab[:, 2],
        }
        for k, v in self.labels.items():
            columns[_LABEL + k] = pa.array(v.tolist(), pa.string())
        for k, v in self.tags.items():
            columns[_TAGS + k] = pa.array([list(t) for t in v], pa.list_(pa.string()))
        pq.write_table(pa.table(columns), path)

    @classmethod
    def load(cls, path: Path) -> Metadata:
        table = pq.read_table(path)
        meta = cls()
        col = {name: table.column(name) for name in table.column_names}
        meta._extend(
            col["id"].to_numpy(),
            col["file"].to_numpy(zero_copy_only=False).astype(object),
            col["attributes"].to_numpy(zero_copy_only=False).astype(object),
            np.stack([col[c].to_numpy() for c in "Lab"], axis=1).astype(np.float64),
            {
                k[len(_LABEL) :]: v.to_numpy(zero_copy_only=False).astype(object)
                for k, v in col.items()
                if k.startswith(_LABEL)
            },
            {
                k[len(_TAGS) :]: _objects([tuple(t) for t in v.to_pylist()])
                for k, v in col.items()
                if k.startswith(_TAGS)
            },
        )
        return meta


def _plain(value: Any) -> Any:
    """A numpy value in an attributes record as plain Python, for JSON."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in an attributes record is not JSON")


def _objects(items: list) -> np.ndarray:
    """A 1-d object array of `items` (numpy would make a 2-d array of equal-length tuples)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out
