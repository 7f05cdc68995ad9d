"""Typed answers: a :class:`Prediction` per photo. ``to_dict()`` is the JSON contract that
``beautytag predict`` writes, the service answers and the Python API returns; ``csv_row()``
is its CSV form. A photo that the model's gate rejects (not a cosmetic, runtime/gate.py) has
null labels, tags and shade, with every score kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from beautytag.schema import Schema


@dataclass(frozen=True)
class ClassAnswer:
    """A single-label attribute: the top class (None for a photo the gate rejects), its
    score, the top-k (class, score) pairs."""

    label: str | None
    score: float
    top: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "top": [list(t) for t in self.top]}


@dataclass(frozen=True)
class TagsAnswer:
    """A multi-label attribute: the tags at or above the threshold (best first, with their
    scores; None for a photo the gate rejects) and every tag's score."""

    labels: list[tuple[str, float]] | None
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        labels = None if self.labels is None else [list(t) for t in self.labels]
        return {"labels": labels, "scores": dict(self.scores)}


@dataclass(frozen=True)
class ShadeAnswer:
    """A shade: CIELAB (D65) and its sRGB hex (both None for a photo the gate rejects)."""

    lab: tuple[float, float, float] | None
    hex: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"lab": None if self.lab is None else list(self.lab), "hex": self.hex}


Answer = ClassAnswer | TagsAnswer | ShadeAnswer


@dataclass(frozen=True)
class Prediction:
    """One photo's answer: ``attributes`` by name, or ``error`` when the photo could not be
    used (then ``attributes`` is None)."""

    file: str
    attributes: dict[str, Answer] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __getitem__(self, name: str) -> Answer:
        """An attribute's answer (KeyError for a failed photo or an unknown name)."""
        if self.attributes is None:
            raise KeyError(f"{self.file}: no attributes ({self.error})")
        return self.attributes[name]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"file", "attributes", "error"}``."""
        attributes = None
        if self.attributes is not None:
            attributes = {name: a.to_dict() for name, a in self.attributes.items()}
        return {"file": self.file, "attributes": attributes, "error": self.error}

    def csv_row(self) -> dict[str, str]:
        """The CSV form (columns of :func:`csv_fields`): see :func:`csv_row`."""
        return csv_row(self.to_dict())


def csv_fields(schema: Schema, extra: tuple[str, ...] = ()) -> list[str]:
    """The CSV header: file, error, the `extra` columns (e.g. ``model``), then each
    attribute's columns (as :func:`csv_row` fills them)."""
    fields = ["file", "error", *extra]
    for a in schema.attributes:
        fields += {
            "single": [a.name, f"{a.name}_score"],
            "multi": [a.name],
            "shade": [a.name, f"{a.name}_lab"],
        }[a.kind]
    return fields


def csv_row(record: dict[str, Any]) -> dict[str, str]:
    """A JSON record (:meth:`Prediction.to_dict`, maybe with more top-level keys such as
    ``model``) as one CSV row: a class's label and score, the tags joined by ``;``, a shade's
    hex and its L a b; a null label, tags or shade is an empty cell. Top-level keys other
    than ``attributes`` are copied as they are."""
    row = {k: v for k, v in record.items() if k != "attributes"}
    for name, v in (record.get("attributes") or {}).items():
        if "label" in v:
            score = v.get("score")
            row[name] = v["label"]
            row[f"{name}_score"] = f"{score:.4f}" if score is not None else ""
        elif "labels" in v:
            row[name] = ";".join(label for label, _ in v["labels"] or ())
        else:
            lab = " ".join(f"{t:.2f}" for t in v["lab"]) if v["lab"] is not None else None
            row[name], row[f"{name}_lab"] = v["hex"], lab
    return {k: "" if v is None else str(v) for k, v in row.items()}
