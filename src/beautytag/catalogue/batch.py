"""A batch run of ``beautytag predict``: which photos, and writing their records.

:func:`read_list` reads ``--from-list`` (one path a line, ``-`` for standard input),
:func:`write_records` writes records through a :class:`~beautytag.catalogue.records.
RecordWriter` with a progress bar on a terminal, and stops cleanly on Ctrl-C: the first one
lets the record in hand be written whole and ends the run (the output stays resumable), a
second one stops at once (the writer still keeps only whole records).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from beautytag.catalogue.records import RecordWriter


def read_list(source: str, stdin: TextIO | None = None) -> list[str]:
    """The paths of a list file (``-``: standard input), one a line; blank lines skipped."""
    if source == "-":
        text = (stdin or sys.stdin).read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise ValueError(f"--from-list {source}: cannot read ({e.strerror})") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


@dataclass
class Written:
    """What :func:`write_records` did."""

    count: int = 0  # records written
    errors: int = 0  # of them, photos that failed
    interrupted: bool = False  # stopped by Ctrl-C


class Interrupt:
    """A SIGINT handler: the first Ctrl-C sets :attr:`requested`, a second raises
    KeyboardInterrupt. Installed only in the main thread (elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupted: finishing the record in hand (Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on standard error (count, images/s, ETA), or None when not `enabled`."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def write_records(
    records: Iterable[dict], writer: RecordWriter, total: int, progress: bool | None = None
) -> Written:
    """Write `records` (``total`` of them expected) until they end or Ctrl-C. `progress`:
    a progress bar (default: when standard error is a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    done = Written()
    bar = progress_bar(total, progress)
    it: Iterator[dict] = iter(records)
    try:
        with Interrupt() as interrupt:
            for record in it:
                writer.write(record)
                done.count += 1
                done.errors += record.get("error") is not None
                if bar is not None:
                    bar.update()
                if interrupt.requested:
                    done.interrupted = True
                    break
    finally:
        if bar is not None:
            bar.close()
        close = getattr(it, "close", None)  # a generator: let it clean up (thread pools)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
    return done
