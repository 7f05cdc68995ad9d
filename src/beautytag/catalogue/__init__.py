"""Whole-catalogue tools that work on prediction records (issue 36), not on the model.

A record is what ``beautytag predict`` writes for one photo::

    {"file": str, "model": "default@1a2b3c4d", "attributes": {...} | None, "error": str | None}

* :mod:`beautytag.catalogue.records` writes records resumably (JSONL, CSV, Parquet) and reads
  them back,
* :mod:`beautytag.catalogue.review` turns doubtful answers into Label Studio tasks and a
  Label Studio export back into a ``labels.csv`` that training reads,
* :mod:`beautytag.catalogue.report` draws a one-page HTML overview of a catalogue,
* :mod:`beautytag.catalogue.batch` writes a run's records (progress bar, Ctrl-C),
  :mod:`beautytag.catalogue.distributed` runs it on Ray Data (``predict --ray``), and
  :mod:`beautytag.catalogue.commands` is ``beautytag predict``, ``review`` and ``report``.

records, review, report and batch import neither torch nor the model code; the commands and
Ray import them only when they run a model.
"""
