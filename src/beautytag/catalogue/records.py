"""Prediction records on disk: a resumable writer (JSONL, CSV, Parquet) and a reader.

JSONL and CSV are append-only: each record is written whole with one ``os.write`` (so a
``kill -9`` leaves at most one torn last line), and fsync'd every :data:`SYNC_EVERY` records or
:data:`SYNC_SECONDS` seconds and on close. A write that fails (a full disk, Ctrl-C inside the
write) is cut back to the last whole record, so what was written stays valid.

Parquet cannot be appended to, so ``out.parquet`` is written through a journal: the records go
to ``out.parquet.journal.jsonl`` (resumable like any JSONL), and closing the writer converts
the journal to ``out.parquet`` (through a temporary file and a rename) and removes it. A run
that was killed leaves the journal, which ``--resume`` continues; resuming a finished Parquet
file first copies its records into a new journal. Besides the flat columns of the CSV form
(typed: a score is a float, tags and Lab values are lists), a Parquet row keeps the whole
record as JSON in ``record_json``, which :func:`read_records` reads back.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from beautytag.runtime import results

FORMATS = ("jsonl", "csv", "parquet")
SYNC_EVERY = 64  # records between fsyncs ...
SYNC_SECONDS = 5.0  # ... or seconds, whichever comes first
BASE_FIELDS = ("file", "error", "model")
PARQUET_BATCH = 10_000  # rows per Parquet row group when converting the journal


class RecordsError(ValueError):
    """A predictions file cannot be written or read; the message is one line."""


def journal_path(path: str | Path) -> Path:
    """Where the records of an unfinished Parquet output are kept."""
    path = Path(path)
    return path.with_name(path.name + ".journal.jsonl")


# --- the CSV form ---------------------------------------------------------------------------


def csv_fields(schema: Any) -> list[str]:
    """The CSV header: the columns of ``beautytag.runtime.results.csv_fields`` with ``model``
    after ``error``. `schema` is anything with ``.attributes`` having ``.name`` and ``.kind``."""
    return results.csv_fields(schema, extra=("model",))


csv_row = results.csv_row  # a record (with its model) as one CSV row


def record_from_csv_row(row: dict[str, str], fields: list[str]) -> dict:
    """A CSV row back as a record. The CSV form has no top-k lists and no tag scores (a tag's
    score is None)."""
    error = row.get("error") or None
    attributes: dict[str, dict] | None = None
    if error is None:
        attributes = {}
        for name in fields:
            if name in BASE_FIELDS or name.endswith(("_score", "_lab")):
                continue
            cell = row.get(name) or ""
            if f"{name}_score" in fields:
                score = row.get(f"{name}_score") or ""
                attributes[name] = {"label": cell or None, "score": float(score) if score else None}
            elif f"{name}_lab" in fields:  # empty: no shade (a photo the gate rejects)
                lab = [float(t) for t in (row.get(f"{name}_lab") or "").split()]
                attributes[name] = {"lab": lab or None, "hex": cell or None}
            else:
                attributes[name] = {"labels": [[t, None] for t in cell.split(";") if t]}
    model = row.get("model") or None
    return {"file": row["file"], "model": model, "attributes": attributes, "error": error}


# --- reading --------------------------------------------------------------------------------


def is_record(obj: object) -> bool:
    """Whether `obj` has the shape of a prediction record."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("file"), str)
        and isinstance(obj.get("attributes", 0), dict | None)
    )


def jsonl_records(data: bytes, name: str) -> tuple[list[dict], int]:
    """The records of the whole lines of JSONL `data`, and where the last whole line ends
    (a last line without its newline is left out: torn, or not yet written)."""
    records, end = [], 0
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        end += len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not is_record(record):
            raise RecordsError(f"{name}: line {number} is not a prediction record")
        records.append(record)
    return records, end


def csv_end(data: bytes) -> int:
    """Where the last whole CSV record of `data` ends: after a newline, outside quotes."""
    end, pos, quotes = 0, 0, 0
    for line in data.splitlines(keepends=True):
        pos += len(line)
        quotes += line.count(b'"')
        if line.endswith(b"\n") and quotes % 2 == 0:
            end = pos
    return end


def csv_records(data: bytes, name: str) -> tuple[list[dict], list[str]]:
    """The records of CSV `data` (its whole rows) and its header."""
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    if "file" not in fields or "error" not in fields:
        raise RecordsError(f"{name}: not a predictions file (no 'file' and 'error' columns)")
    try:
        return [record_from_csv_row(row, fields) for row in reader], fields
    except ValueError as e:  # a score or Lab value that is not a number
        raise RecordsError(f"{name}: line {reader.line_num}: {e}") from None


def read_records(path: str | Path) -> list[dict]:
    """The records of a predictions file written by ``beautytag predict`` (JSONL, CSV or
    Parquet, told apart by their content). A torn last line is left out."""
    path = Path(path)
    if not path.is_file():
        if journal_path(path).is_file():
            raise RecordsError(
                f"{path}: not finished (its records are in {journal_path(path)}); run predict "
                "again with --resume to finish it"
            )
        raise RecordsError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecordsError(f"{path}: cannot read ({e.strerror})") from None
    if data.startswith(b"PAR1"):
        return read_parquet(path)
    first = data.lstrip()[:1]
    if first in (b"{", b""):
        return jsonl_records(data, str(path))[0] + tail_record(data)
    if first.isalpha() or data.startswith(b"\xef\xbb\xbf"):  # a CSV header (Excel: a BOM)
        return csv_records(data[: csv_end(data) or len(data)], str(path))[0]
    raise RecordsError(f"{path}: not a predictions file (JSON lines, CSV or Parquet)")


def tail_record(data: bytes) -> list[dict]:
    """The last line of JSONL `data` if it has no newline but is a whole record."""
    tail = data.rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(tail) if tail.strip() else None
    except ValueError:
        return []
    return [record] if is_record(record) else []


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["record_json"])
    except (OSError, KeyError, ValueError) as e:  # not Parquet, or not ours
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecordsError(f"{path}: not a predictions Parquet file ({first})") from None
    return [json.loads(s) for s in table.column("record_json").to_pylist()]


# --- writing --------------------------------------------------------------------------------


class RecordWriter:
    """Appends records to one file (see :func:`open_output`); use it as a context manager or
    call :meth:`close`."""

    def __init__(self, path: Path | None, fmt: str, fd: int | None, fields: list[str] | None):
        self.path, self.fmt, self.fields = path, fmt, fields
        self.file = journal_path(path) if path and fmt == "parquet" else path
        self.count = 0  # records written by this writer
        self._fd = fd
        self._size = os.fstat(fd).st_size if fd is not None else 0
        self._unsynced, self._synced_at = 0, time.monotonic()

    def write(self, record: dict) -> None:
        """Write one record whole (or, if that fails, nothing: :class:`RecordsError`)."""
        if self.fmt == "csv":
            self._write(csv_text([csv_row(record)], self.fields or []))
        else:
            self._write((json.dumps(record) + "\n").encode())
        self.count += 1
        self._unsynced += 1
        if self._unsynced >= SYNC_EVERY or time.monotonic() - self._synced_at >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """fsync what was written."""
        if self._fd is None or not self._unsynced:
            return
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise self._error(e) from None
        self._unsynced, self._synced_at = 0, time.monotonic()

    def close(self, finish: bool = True) -> None:
        """Sync and close; for Parquet, with `finish`, convert the journal to the output."""
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = None
        if finish and self.fmt == "parquet" and self.path is not None:
            journal_to_parquet(self.file, self.path)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(finish=exc_type is None)  # a failed Parquet run keeps its journal

    def _write(self, data: bytes) -> None:
        if self.path is None:  # standard output: nothing to cut back
            out = getattr(sys.stdout, "buffer", None)
            if out is None:
                sys.stdout.write(data.decode("utf-8", errors="surrogateescape"))
            else:
                out.write(data)
            sys.stdout.flush()
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except BaseException as e:  # a full disk, or Ctrl-C mid-write: keep whole records only
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            if isinstance(e, OSError):
                raise self._error(e) from None
            raise
        self._size += len(data)

    def _error(self, e: OSError) -> RecordsError:
        kept = f"it holds the {self.count} records written whole"
        if e.errno == errno.ENOSPC:
            return RecordsError(
                f"{self.file}: disk full; {kept} (free some space and run again with --resume)"
            )
        return RecordsError(f"{self.file}: cannot write ({e.strerror}); {kept}")


def csv_text(rows: Iterable[dict[str, str]], fields: list[str], header: bool = False) -> bytes:
    """CSV rows (and the header) as bytes; a file name that is not UTF-8 keeps its bytes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def open_output(
    path: str | Path | None,
    fmt: str = "jsonl",
    resume: bool = False,
    force: bool = False,
    fields: list[str] | None = None,
    model: str | None = None,
) -> tuple[RecordWriter, set[str]]:
    """A writer for `path` (None or '-': standard output, JSONL or CSV only) and the files that
    already have a record there (by path), which the caller skips.

    Without `resume` an existing output is refused unless `force`; with `resume` a torn last
    line is cut off and records are appended. `fields` (:func:`csv_fields`) is the CSV header;
    on resume the existing header is kept and must match it. `model`
    (``Engine.model_id``): on resume, records of another model are refused.
    """
    if fmt not in FORMATS:
        raise RecordsError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if path is None or str(path) == "-":
        if fmt == "parquet" or resume:
            raise RecordsError(f"{'--resume' if resume else 'parquet'} needs an output file (-o)")
        return start(RecordWriter(None, fmt, None, fields), 0), set()
    path = Path(path)
    file = journal_path(path) if fmt == "parquet" else path
    if path.is_dir():
        raise RecordsError(f"{path}: is a folder; name an output file")
    if fmt == "csv" and fields is None and not (resume and file.exists()):
        raise RecordsError("a CSV output needs its fields (csv_fields(schema))")
    existing = [p for p in dict.fromkeys([path, file]) if p.exists()]
    if existing and not (resume or force):
        raise RecordsError(
            f"{existing[0]} exists: use --resume to add the photos it lacks, or --force to "
            "overwrite it"
        )
    records: list[dict] = []
    end = 0
    seeded = resume and fmt == "parquet" and not file.exists() and path.exists()
    if seeded:
        seed_journal(path, file)
    if resume and file.exists():
        records, end, fields = repair(file, fmt, fields)
        others = {r["model"] for r in records if r.get("model") not in (None, model)}
        if model and others:
            if seeded:  # the finished file stays as it was
                file.unlink()
            raise RecordsError(
                f"{file}: written by model {sorted(others)[0]}, and this run uses {model}: use "
                "--force to start over, or another output file"
            )
    elif fmt == "parquet":  # --force, or nothing there: a finished file goes too
        for p in existing:
            p.unlink()
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.ftruncate(fd, end)  # resume: the torn tail; else the whole file
    except OSError as e:
        raise RecordsError(f"{file}: cannot write ({e.strerror})") from None
    return start(RecordWriter(path, fmt, fd, fields), end), {r["file"] for r in records}


def start(writer: RecordWriter, end: int) -> RecordWriter:
    """`writer`, with the CSV header written if its file has none (`end` 0)."""
    if writer.fmt == "csv" and end == 0:
        if writer.fields is None:
            raise RecordsError("a CSV output needs its fields (csv_fields(schema))")
        writer._write(csv_text([], writer.fields, header=True))
    return writer


def repair(file: Path, fmt: str, fields: list[str] | None) -> tuple[list[dict], int, list | None]:
    """The whole records of a file to resume, where they end, and the CSV header (`fields`, or
    the file's)."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise RecordsError(f"{file}: cannot read ({e.strerror})") from None
    if fmt != "csv":
        records, end = jsonl_records(data, str(file))
        return records, end, fields
    end = csv_end(data)
    if end == 0:  # empty, or a torn header: start again
        return [], 0, fields
    records, header = csv_records(data[:end], str(file))
    if fields is not None and header != fields:
        raise RecordsError(
            f"{file}: its columns differ from this run's ({', '.join(header)} vs "
            f"{', '.join(fields)}): use --force to start over, or another output file"
        )
    return records, end, header


def seed_journal(path: Path, journal: Path) -> None:
    """Start a journal with the records of a finished Parquet file (whole, or not at all)."""
    tmp = journal.with_name(journal.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for record in read_parquet(path):
                f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, journal)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RecordsError(f"{journal}: cannot write ({e.strerror})") from None


def iter_journal(journal: Path) -> Iterator[dict]:
    with open(journal, "rb") as f:
        for line in f:
            if line.endswith(b"\n") and line.strip():
                yield json.loads(line)


def attribute_kind(value: dict) -> str:
    """An attribute's kind from its answer: single, multi or shade."""
    return "single" if "label" in value else "multi" if "labels" in value else "shade"


def parquet_row(record: dict, kinds: dict[str, str]) -> dict[str, Any]:
    """A record's flat Parquet columns (as the CSV form, typed) and the whole record as JSON."""

    def text(s: str | None) -> str | None:  # a file name that is not UTF-8: replaced
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if s else s

    row = {"file": text(record["file"]), "error": text(record.get("error"))}
    row["model"] = record.get("model")
    for name, v in (record.get("attributes") or {}).items():
        if kinds[name] == "single":
            row[name], row[f"{name}_score"] = v.get("label"), v.get("score")
        elif kinds[name] == "multi":
            row[name] = None if v["labels"] is None else [label for label, _ in v["labels"]]
        else:
            row[name], row[f"{name}_lab"] = v["hex"], v["lab"]
    row["record_json"] = json.dumps(record)
    return row


def journal_to_parquet(journal: Path, target: Path) -> None:
    """Convert a finished journal to `target` (through a temporary file) and remove it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds: dict[str, str] = {}
    for record in iter_journal(journal):
        for name, v in (record.get("attributes") or {}).items():
            kinds.setdefault(name, attribute_kind(v))
    columns = [pa.field(name, pa.string()) for name in BASE_FIELDS]
    for name, kind in kinds.items():
        columns.append(pa.field(name, pa.list_(pa.string()) if kind == "multi" else pa.string()))
        if kind == "single":
            columns.append(pa.field(f"{name}_score", pa.float64()))
        elif kind == "shade":
            columns.append(pa.field(f"{name}_lab", pa.list_(pa.float64())))
    schema = pa.schema([*columns, pa.field("record_json", pa.string())])
    tmp = target.with_name(target.name + ".tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as out:
            batch: list[dict] = []
            for record in iter_journal(journal):
                batch.append(parquet_row(record, kinds))
                if len(batch) == PARQUET_BATCH:
                    out.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            out.write_table(pa.Table.from_pylist(batch, schema=schema))
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RecordsError(
            f"{target}: cannot write ({e.strerror or e}); the records stay in {journal}: run "
            "again with --resume to finish"
        ) from None
    journal.unlink()
