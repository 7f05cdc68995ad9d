"""Metadata filters such as ``{"category": "Lipstick", "function": "waterproof"}``: the rows
that match all of them, checked against the attributes and values the index knows.

A single-label attribute matches its predicted label, a multi-label one any of its predicted
tags; both in any letter case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from beautytag.search.errors import SearchError
from beautytag.search.metadata import Metadata


def parse_where(pairs: Iterable[str]) -> dict[str, str]:
    """The command line's ``--where ATTR=VALUE`` arguments as a dict."""
    where: dict[str, str] = {}
    for pair in pairs:
        attr, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not attr or not value:
            raise SearchError(f"filter {pair!r} is not ATTR=VALUE (e.g. category=Lipstick)")
        if attr in where:
            raise SearchError(f"filter attribute {attr!r} given twice; give each once")
        where[attr] = value
    return where


def matching_rows(
    meta: Metadata,
    where: Mapping[str, str] | None,
    vocabulary: Mapping[str, Sequence[str]],
) -> np.ndarray | None:
    """Boolean mask of the rows that match every filter; None where there are no filters.

    `vocabulary` names the valid values of an attribute (the model's classes); for an
    attribute it does not name, the values in the index are the valid ones.
    """
    if not where:
        return None
    mask = np.ones(len(meta), dtype=bool)
    for attr, value in where.items():
        mask &= _matches(meta, attr, str(value), vocabulary)
    return mask


def _matches(
    meta: Metadata, attr: str, value: str, vocabulary: Mapping[str, Sequence[str]]
) -> np.ndarray:
    folded = value.strip().casefold()
    if attr in meta.labels:
        hit = meta.memo(("label", attr, folded), lambda: meta.labels[attr] == folded)
    elif attr in meta.tags:
        hit = meta.memo(
            ("tags", attr, folded),
            lambda: np.fromiter((folded in tags for tags in meta.tags[attr]), bool, len(meta)),
        )
    elif attr in vocabulary:
        hit = np.zeros(len(meta), dtype=bool)
    else:
        valid = sorted(set(meta.labels) | set(meta.tags) | set(vocabulary))
        raise SearchError(
            f"unknown filter attribute {attr!r}; valid: {', '.join(valid) or 'none (empty index)'}"
        )
    known = vocabulary.get(attr)
    if known is not None and folded not in {v.casefold() for v in known}:
        raise SearchError(f"unknown {attr} {value!r}; valid: {', '.join(known)}")
    if known is None and not hit.any():
        raise SearchError(f"unknown {attr} {value!r}; valid: {', '.join(_present(meta, attr))}")
    return hit


def _present(meta: Metadata, attr: str) -> list[str]:
    """The values of `attr` that rows of the index have."""
    if attr in meta.labels:
        return sorted(set(meta.labels[attr].tolist()) - {""})
    return sorted(set().union(*meta.tags[attr].tolist()))
