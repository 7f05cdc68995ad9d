"""The "not a cosmetic" gate (``model.gate``): a photo whose probability of the gate
attribute's accepted class is below the threshold keeps its scores but loses its answers.

Every path that answers (the Python API, ``beautytag predict``, the service, catalogue
records, search indexes; PyTorch, ONNX and TorchScript alike) builds its answers in
:meth:`Engine.describe`, which calls :func:`apply_gate`. Calibration chooses the threshold
with :func:`choose_threshold` (a rule fixed before any run) and reports, as evaluation does,
:func:`rejection_rates`: the share of each source's photos that the gate rejects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from beautytag.runtime.results import Answer, ClassAnswer, ShadeAnswer, TagsAnswer
from beautytag.schema import Schema


def accept_index(gate: Mapping[str, Any], schema: Schema) -> int:
    """The position of the accepted class among the gate attribute's classes (in any letter
    case)."""
    classes = [c.casefold() for c in schema[gate["attribute"]].classes]
    return classes.index(gate["accept"].casefold())


def accept_scores(gate: Mapping[str, Any], schema: Schema, probs: Any) -> np.ndarray:
    """P(accept) of each photo from the gate attribute's class probabilities (N, C) or (C,)."""
    return np.asarray(probs)[..., accept_index(gate, schema)]


def rejects(gate: Mapping[str, Any], p_accept: float) -> bool:
    """Whether a photo with this P(accept) is rejected: below the threshold (never without
    a gate)."""
    return bool(gate) and p_accept < gate["threshold"]


def apply_gate(
    gate: Mapping[str, Any], schema: Schema, answers: dict[str, Answer], probs: Any
) -> dict[str, Answer]:
    """`answers` as they are, or, for a photo the gate rejects (`probs`: the gate
    attribute's class probabilities), null labels for every class attribute but the gate's,
    null tags and a null shade; scores and top-k lists are kept."""
    if not gate or not rejects(gate, float(accept_scores(gate, schema, np.asarray(probs)))):
        return answers
    out: dict[str, Answer] = {}
    for name, a in answers.items():
        if name == gate["attribute"]:
            out[name] = a
        elif isinstance(a, ClassAnswer):
            out[name] = ClassAnswer(None, a.score, a.top)
        elif isinstance(a, TagsAnswer):
            out[name] = TagsAnswer(None, a.scores)
        else:
            out[name] = ShadeAnswer(None, None)
    return out


GRID = tuple(round(0.05 * k, 2) for k in range(1, 11))  # the thresholds calibration tries
MAX_REJECTED = 0.03  # the share of any cosmetics source's photos a threshold may reject


def labelled_rows(
    gate: Mapping[str, Any],
    schema: Schema,
    probs: np.ndarray,
    targets: np.ndarray,
    masks: np.ndarray,
    sources: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The photos labelled for the gate attribute (an evaluation's `probs`, `targets` and
    `masks` of it, each photo's source): their P(accept), whether they are labelled with
    the accepted class, and their sources."""
    m = np.asarray(masks).astype(bool)
    accepted = np.asarray(targets)[m] == accept_index(gate, schema)
    return accept_scores(gate, schema, probs)[m], accepted, np.asarray(sources, dtype=object)[m]


def rejection_rates(
    p_accept: np.ndarray, accepted: np.ndarray, sources: Sequence[str], threshold: float
) -> dict[str, Any]:
    """At `threshold`: each source's share of rejected photos among those labelled with the
    accepted class (``accepted`` true; the sources of cosmetics), and the share of rejected
    negatives (labelled with another class), with their counts."""
    p, accepted, sources = np.asarray(p_accept), np.asarray(accepted, bool), np.asarray(sources)
    rejected = p < threshold
    per_source = {
        str(s): {"n": int(m.sum()), "rejected": round(float(rejected[m].mean()), 4)}
        for s in dict.fromkeys(sources[accepted].tolist())
        if (m := accepted & (sources == s)).any()
    }
    neg = ~accepted
    negatives = {"n": int(neg.sum())}
    if neg.any():
        negatives["rejected"] = round(float(rejected[neg].mean()), 4)
    return {"threshold": threshold, "sources": per_source, "negatives": negatives}


def choose_threshold(p_accept: np.ndarray, accepted: np.ndarray, sources: Sequence[str]) -> float:
    """The rule fixed before any run: the highest t in 0.05, 0.10, ..., 0.50 that rejects at
    most 3 % of the photos of each cosmetics source (those labelled with the accepted class);
    0.05 if none does."""
    p, accepted, sources = np.asarray(p_accept), np.asarray(accepted, bool), np.asarray(sources)
    groups = [accepted & (sources == s) for s in set(sources[accepted].tolist())]
    best = GRID[0]
    for t in GRID:
        if all((p[m] < t).mean() <= MAX_REJECTED for m in groups):
            best = t
    return best


def measure(
    gate: Mapping[str, Any],
    schema: Schema,
    outputs: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    sources: Sequence[str],
    threshold: float | None = None,
) -> dict[str, Any] | None:
    """An evaluation's gate report: the gate's attribute and class, and at `threshold` (the
    gate's own by default) :func:`rejection_rates` of the photos labelled for its attribute.
    None without a gate, or where the data's `schema` lacks its attribute or class, or no
    photo is labelled for it."""
    name = gate.get("attribute") if gate else None
    if name not in masks or name not in schema.names or not np.asarray(masks[name]).any():
        return None
    try:
        rows = labelled_rows(gate, schema, outputs[name], targets[name], masks[name], sources)
    except ValueError:  # the data's classes lack the accepted one
        return None
    t = gate["threshold"] if threshold is None else threshold
    return {"attribute": name, "accept": gate["accept"]} | rejection_rates(*rows, t)


def summary(report: Mapping[str, Any]) -> str:
    """One line: a gate report's threshold and the shares it rejects."""
    shares = [f"{s} {r['rejected']:.1%} of {r['n']}" for s, r in report["sources"].items()]
    neg = report["negatives"]
    if "rejected" in neg:
        shares.append(f"negatives {neg['rejected']:.1%} of {neg['n']}")
    return (
        f"gate {report['attribute']} = {report['accept']}: threshold {report['threshold']}; "
        f"rejected: {', '.join(shares) or 'no photo'}"
    )
