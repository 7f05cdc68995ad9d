"""A review queue in Label Studio: doubtful answers out as tasks, reviewed answers back in.

:func:`review_tasks` writes tasks in Label Studio's JSON import format with the model's answer
as a pre-annotation (``predictions[].result[]`` of type ``choices``, with the model id as
``model_version`` and the answer's probability as ``score``, by which Label Studio's Data
Manager sorts). Only the reviewed attribute is pre-filled: an answer a reviewer left alone
must not come back as a person's label. :func:`labeling_config` is the labelling interface
to paste into the project (one ``Choices`` per class attribute, all optional), and
:func:`import_export` turns a Label Studio JSON export into ``labels.csv`` rows that
``beautytag train`` reads (a source with ``column: <attribute>`` for each attribute).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

IMAGE = "image"  # the Image tag's name and the task data key


def review_tasks(
    records: Iterable[dict],
    attribute: str = "category",
    below: float = 0.6,
    image_prefix: str = "",
) -> list[dict]:
    """Label Studio tasks for the photos whose `attribute` scores under `below`, least
    confident first. ``data.image`` is `image_prefix` + the photo's path (URL-quoted when
    there is a prefix; Label Studio's local files: ``/data/local-files/?d=`` and paths
    relative to its document root); ``data.file`` keeps the path for :func:`import_export`."""
    doubtful, seen = [], False
    for r in records:
        answer = (r.get("attributes") or {}).get(attribute)
        if answer is None:
            continue
        if "score" not in answer:
            raise ValueError(f"{attribute!r} is not a class attribute (one class and its score)")
        seen = True
        if answer["score"] is not None and answer["score"] < below:
            doubtful.append((answer["score"], r["file"], r.get("model"), answer["label"]))
    if not seen:
        raise ValueError(f"no record has an answer for {attribute!r}")
    tasks = []
    for score, file, model, label in sorted(doubtful, key=lambda d: d[:2]):
        image = image_prefix + quote(file, safe="/") if image_prefix else file
        result = [choices_result(attribute, [label])] if label is not None else []
        prediction = {"model_version": model or "beautytag", "score": score, "result": result}
        tasks.append({"data": {IMAGE: image, "file": file}, "predictions": [prediction]})
    return tasks


def choices_result(name: str, choices: list[str]) -> dict:
    """One ``result`` item of a ``Choices`` tag named `name` on the image."""
    return {
        "from_name": name,
        "to_name": IMAGE,
        "type": "choices",
        "value": {"choices": choices},
    }


def labeling_config(attributes: Any) -> str:
    """The XML labelling config: the image and one ``Choices`` per class attribute.
    `attributes`: a schema (``.attributes`` with ``.name``, ``.kind``, ``.classes``; tags
    attributes get check boxes, shades are left out) or a mapping of name -> classes."""
    if isinstance(attributes, Mapping):
        groups = [(name, "single", list(classes)) for name, classes in attributes.items()]
    else:
        groups = [(a.name, a.kind, a.classes) for a in attributes.attributes if a.classes]
    lines = ["<View>", f"  <Image name={quoteattr(IMAGE)} value={quoteattr('$' + IMAGE)}/>"]
    for name, kind, classes in groups:
        choice = "multiple" if kind == "multi" else "single-radio"
        lines += [
            f"  <Header value={quoteattr(name)}/>",
            f"  <Choices name={quoteattr(name)} toName={quoteattr(IMAGE)} "
            f'choice="{choice}" showInline="true">',
            *(f"    <Choice value={quoteattr(c)}/>" for c in classes),
            "  </Choices>",
        ]
    return "\n".join([*lines, "</View>"]) + "\n"


class Imported(NamedTuple):
    """:func:`import_export`'s answer: ``labels.csv`` rows and why tasks were left out."""

    rows: list[dict[str, str]]
    skipped: list[str]  # "<file>: <why>", one per task left out


def import_export(
    export: str | Path | Sequence[dict],
    relative_to: str | Path | None = None,
    split: str | None = "train",
) -> Imported:
    """``labels.csv`` rows (``file_name``, ``split`` unless None, one column per attribute,
    tags joined by ';') from a Label Studio JSON export (its file, or the parsed list). Each
    task's latest annotation that is not cancelled counts; a task without one is skipped and
    reported. `relative_to`: the folder of the labels.csv, to which file names are made
    relative (a relative photo path is taken from the current folder)."""
    tasks = load_export(export)
    rows, skipped = [], []
    for task in tasks:
        data = task.get("data") or {}
        file = str(data.get("file") or data.get(IMAGE) or "")
        if not file:
            skipped.append(f"task {task.get('id', '?')}: no image in its data")
            continue
        kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not kept:
            why = "cancelled" if task.get("annotations") else "not annotated"
            skipped.append(f"{file}: {why}")
            continue
        latest = max(enumerate(kept), key=lambda ia: (annotated_at(ia[1]), ia[0]))[1]
        labels = {
            item["from_name"]: ";".join(item["value"]["choices"])
            for item in latest.get("result") or []
            if item.get("type") == "choices"
            and isinstance(item.get("value"), dict)
            and isinstance(item["value"].get("choices"), list)
        }
        if not labels:
            skipped.append(f"{file}: empty annotation")
            continue
        if relative_to is not None:
            file = os.path.relpath(os.path.abspath(file), os.path.abspath(relative_to))
        row = {"file_name": file.replace(os.sep, "/")}
        if split:
            row["split"] = split
        rows.append(row | labels)
    return Imported(rows, skipped)


def annotated_at(annotation: dict) -> str:
    """When an annotation was last changed (ISO 8601 text, which sorts as time)."""
    return str(annotation.get("updated_at") or annotation.get("created_at") or "")


def load_export(export: str | Path | Sequence[dict]) -> list[dict]:
    """The tasks of a Label Studio JSON export; a one-line ValueError for anything else."""
    name = "the export"
    if isinstance(export, str | Path):
        name = str(export)
        try:
            export = json.loads(Path(export).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{name}: cannot read it as JSON ({e})") from None
    if not isinstance(export, list) or not all(
        isinstance(t, dict) and isinstance(t.get("data"), dict) for t in export
    ):
        raise ValueError(
            f"{name}: not a Label Studio JSON export (a list of tasks with 'data'; export "
            "with the JSON format, not JSON-MIN or CSV)"
        )
    return list(export)


def write_labels_csv(
    rows: Sequence[dict[str, str]], path: str | Path, attributes: Iterable[str] = ()
) -> None:
    """Write :func:`import_export`'s rows as a labels.csv (UTF-8), with a column for each of
    `attributes` even where no task has its answer: training refuses a labels.csv without a
    column that its config reads."""
    keys = [k for row in rows for k in row]
    fields = list(dict.fromkeys(["file_name", *keys[:2], *attributes, *keys]))
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
