"""Attribute schema: what the model predicts and where each label comes from.

An attribute is one of three kinds:

* ``single`` - one class of N (cross-entropy),
* ``multi``  - any number of N tags (binary cross-entropy per tag),
* ``shade``  - a colour regressed in CIELAB (three numbers).

For every data source an attribute names the column(s) its label comes from, an
optional ``map`` from source values to our classes, or a weak-label ``rule`` that
reads text (see :mod:`beautytag.weak_labels`). An empty cell means "not labelled".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("single", "multi", "shade")


class SchemaError(ValueError):
    """The schema (or the config holding it) is invalid; the message says where and why."""


@dataclass
class SourceSpec:
    """How one data source labels one attribute."""

    column: str | None = None
    columns: list[str] | None = None  # shade: the L, a, b columns; rule: texts joined
    map: dict[str, str] = field(default_factory=dict)
    rule: str | None = None  # name of a weak-label rule applied to `column`
    other: str | None = None  # class for values that are not in `classes` (else unlabelled)

    def mapped(self, value: str) -> str:
        """`value` through `map`, whose keys match in any letter case; else `value` itself."""
        if value in self.map:
            return self.map[value]
        folded = {k.strip().casefold(): v for k, v in self.map.items()}
        return folded.get(value.strip().casefold(), value)


@dataclass
class Attribute:
    name: str
    kind: str
    classes: list[str] = field(default_factory=list)
    weight: float = 1.0
    sources: dict[str, SourceSpec] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return 3 if self.kind == "shade" else len(self.classes)


@dataclass
class Schema:
    attributes: list[Attribute]

    def __getitem__(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def to_dict(self) -> list[dict[str, Any]]:
        out = []
        for a in self.attributes:
            d: dict[str, Any] = {"name": a.name, "kind": a.kind, "weight": a.weight}
            if a.classes:
                d["classes"] = list(a.classes)
            d["sources"] = {
                k: {f: v for f, v in vars(s).items() if v not in (None, {}, [])}
                for k, s in a.sources.items()
            }
            out.append(d)
        return out


def _require(cond: bool, where: str, problem: str) -> None:
    if not cond:
        raise SchemaError(f"{where}: {problem}")


def _parse_source(spec: Any, attr: Attribute, where: str) -> SourceSpec:
    _require(isinstance(spec, dict), where, "must be a mapping with 'column' (or 'columns')")
    unknown = set(spec) - {"column", "columns", "map", "rule", "other"}
    _require(not unknown, where, f"unknown keys {sorted(unknown)}")
    src = SourceSpec(
        column=spec.get("column"),
        columns=spec.get("columns"),
        map={str(k): str(v) for k, v in (spec.get("map") or {}).items()},
        rule=spec.get("rule"),
        other=spec.get("other"),
    )
    if attr.kind == "shade":
        _require(
            isinstance(src.columns, list) and len(src.columns) == 3,
            where,
            "a shade source needs 'columns: [L, a, b]' (three column names)",
        )
    elif src.rule is not None and src.columns:
        _require(all(isinstance(c, str) for c in src.columns), where, "'columns' must be names")
    else:
        _require(isinstance(src.column, str) and src.column != "", where, "needs a 'column'")
    if src.rule is not None:
        from beautytag.weak_labels import RULES

        _require(src.rule in RULES, where, f"unknown rule {src.rule!r}; known: {sorted(RULES)}")
    seen: dict[str, str] = {}  # keys match in any letter case: two may not disagree
    for k, v in src.map.items():
        _require(v in attr.classes, where, f"map sends {k!r} to {v!r}, which is not a class")
        first = seen.setdefault(k.strip().casefold(), k)
        _require(
            src.map[first] == v,
            where,
            f"map keys {first!r} and {k!r} differ only in letter case but send to different "
            "classes",
        )
    if src.other is not None:
        _require(src.other in attr.classes, where, f"other class {src.other!r} is not a class")
    return src


def parse_schema(raw: Any) -> Schema:
    """Validate a list of attribute mappings (as read from YAML) and build a :class:`Schema`."""
    _require(isinstance(raw, list) and raw, "attributes", "must be a non-empty list")
    attrs: list[Attribute] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"attributes[{i}]"
        _require(isinstance(item, dict), where, "must be a mapping")
        name = item.get("name")
        _require(
            isinstance(name, str) and name.isidentifier(),
            where,
            f"'name' must be an identifier, got {name!r}",
        )
        where = f"attribute {name!r}"
        _require(name != "image", where, "'image' is the name of an exported model's input")
        _require(name not in seen, where, "is defined twice")
        seen.add(name)
        unknown = set(item) - {"name", "kind", "classes", "weight", "sources"}
        _require(not unknown, where, f"unknown keys {sorted(unknown)}")
        kind = item.get("kind")
        _require(kind in KINDS, where, f"'kind' must be one of {KINDS}, got {kind!r}")
        classes = item.get("classes") or []
        if kind == "shade":
            _require(not classes, where, "a shade attribute has no classes")
        else:
            _require(
                isinstance(classes, list) and len(classes) >= 2,
                where,
                "needs 'classes': a list of at least two names",
            )
            classes = [str(c) for c in classes]
            dup = {c for c in classes if classes.count(c) > 1}
            _require(not dup, where, f"duplicate classes {sorted(dup)}")
        weight = item.get("weight", 1.0)
        _require(
            isinstance(weight, int | float) and weight >= 0,
            where,
            f"'weight' must be a number >= 0, got {weight!r}",
        )
        attr = Attribute(name=name, kind=kind, classes=classes, weight=float(weight))
        sources = item.get("sources") or {}
        _require(isinstance(sources, dict), where, "'sources' must be a mapping")
        attr.sources = {
            str(s): _parse_source(spec, attr, f"{where}, source {s!r}")
            for s, spec in sources.items()
        }
        attrs.append(attr)
    return Schema(attrs)
