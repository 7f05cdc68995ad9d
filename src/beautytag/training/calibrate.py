"""Temperature scaling (Guo et al. 2017): make a class attribute's score the chance of being
right, without changing any answer.

Each class attribute's logits are divided by one number T before the softmax, T chosen to
minimise the negative log-likelihood of the true classes on a held-out split (validation).
T > 1 softens an over-confident head, T < 1 sharpens a cautious one; the order of the
classes, and so every answer, stays the same. The temperatures are stored in the model's
config (``model.temperatures``) and used wherever it answers (predict, serve, evaluate,
export).

With a gate (``model.gate``), its threshold is then chosen on the same split, on the
calibrated scores, by a rule fixed before any run (runtime/gate.py: the highest of 0.05,
0.10, ..., 0.50 that rejects at most 3 % of each cosmetics source's photos).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beautytag.checkpoint import load_checkpoint, save_checkpoint
from beautytag.config import Config
from beautytag.runtime.gate import (
    accept_index,
    choose_threshold,
    labelled_rows,
    rejection_rates,
)
from beautytag.schema import Schema
from beautytag.training import metrics
from beautytag.training.evaluate import split_outputs

MIN_T, MAX_T = 0.01, 100.0  # the range a model's stored temperature is kept in


def nll(log_p: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the classes `y` under softmax(log_p / temperature)."""
    z = torch.from_numpy(np.asarray(log_p, dtype=np.float64)) / temperature
    return float(-torch.log_softmax(z, -1)[torch.arange(len(y)), torch.from_numpy(y)].mean())


def fit_temperature(log_p: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising :func:`nll` (golden-section search over log T; the loss is
    convex in 1 / T, so it has one minimum)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(log_p, y, math.exp(c)), nll(log_p, y, math.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(log_p, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(log_p, y, math.exp(d))
    return math.exp((a + b) / 2)


def calibrate(
    checkpoint: str | Path,
    out: str | Path,
    split: str = "val",
    config: Config | None = None,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Fit every class attribute's temperature on `split`, then the gate's threshold (if the
    model has a gate), and write the model with them to `out` (its weights as they were).
    Returns, per attribute, the photos used, the temperature, and the negative
    log-likelihood and calibration error before and after; under ``gate``, the threshold and
    the share of each source's photos it rejects (:func:`calibrate_gate`)."""
    cfg, ds, outputs, targets, masks = split_outputs([checkpoint], split, config, sources)
    model, model_cfg, ckpt = load_checkpoint(checkpoint)
    temperatures = dict(model_cfg.model.temperatures)
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "out": str(out), "split": split}
    for a in cfg.schema.attributes:
        m = masks[a.name].astype(bool)
        if a.kind != "single" or m.sum() < 2:
            continue
        p, y = outputs[a.name][m], targets[a.name][m].astype(np.int64)
        log_p = np.log(np.clip(p, 1e-12, None))  # the logits up to a constant per photo
        before = temperatures.get(a.name, 1.0)  # the new T multiplies it: keep it in range
        lo, hi = max(0.05, MIN_T / before), min(20.0, MAX_T / before)
        t = fit_temperature(log_p, y, lo, hi)
        warning = None
        if min(t / lo, hi / t) < 1.01:  # no minimum inside: e.g. every answer right
            warning = (
                f"{a.name}: the fit ran to its bound (T = {before * t:.4g}) on {int(m.sum())} "
                f"photos: too few, or all answered right or wrong; temperature left at {before}"
            )
            t = 1.0
        scaled = torch.softmax(torch.from_numpy(log_p) / t, -1).numpy()
        temperatures[a.name] = round(before * t, 4)
        report[a.name] = {
            "n": int(m.sum()),
            "temperature": temperatures[a.name],
            "nll": [round(nll(log_p, y, 1.0), 4), round(nll(log_p, y, t), 4)],
            "calibration_error": [
                round(metrics.calibration_error(y, p), 4),
                round(metrics.calibration_error(y, scaled), 4),
            ],
        }
        if warning:
            report[a.name]["warning"] = warning
        # every photo's scores as the calibrated model gives them: the gate is chosen on them
        every = np.log(np.clip(outputs[a.name], 1e-12, None))
        outputs[a.name] = torch.softmax(torch.from_numpy(every) / t, -1).numpy()
    gate = dict(model_cfg.model.gate)
    if gate:
        photo_sources = [sample.source for sample in ds.samples]
        report["gate"] = calibrate_gate(gate, cfg.schema, outputs, targets, masks, photo_sources)
        gate["threshold"] = report["gate"]["threshold"]
    model_cfg.model = dataclasses.replace(model_cfg.model, temperatures=temperatures, gate=gate)
    half = any(v.dtype == torch.float16 for v in ckpt["model"].values())
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "model")}
    save_checkpoint(out, model, model_cfg, extra, half=half)
    return report


def calibrate_gate(
    gate: dict[str, Any],
    schema: Schema,
    outputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    sources: list[str],
) -> dict[str, Any]:
    """The gate's threshold by the rule (:func:`choose_threshold`) on the photos labelled
    for its attribute, and at that threshold each cosmetics source's share of rejected
    photos and the negatives' (runtime/gate.py); ``previous`` is the threshold before.
    Where no photo is labelled for it at all (a gate kept from the starting model, as when
    fine-tuning on your own photos), every photo counts as of the accepted class: the
    products the model is tuned to tag must pass. Without a photo of the accepted class the
    threshold stays, with a warning."""
    name, before = gate["attribute"], gate["threshold"]
    mask = np.asarray(masks[name]).astype(bool)
    unlabelled = not mask.any()
    if unlabelled:  # every photo, as of the accepted class
        accept = np.full(len(mask), accept_index(gate, schema))
        p, accepted, src = labelled_rows(
            gate, schema, outputs[name], accept, np.ones_like(mask), sources
        )
    else:
        p, accepted, src = labelled_rows(gate, schema, outputs[name], targets[name], mask, sources)
    t = choose_threshold(p, accepted, src) if accepted.any() else before
    report = {"attribute": name, "accept": gate["accept"], "previous": before}
    report |= rejection_rates(p, accepted, src, t)
    if unlabelled and accepted.any():
        report["note"] = (
            f"gate: no photo labelled {name} on this split; its {len(p)} photos were taken "
            f"as {name} = {gate['accept']}"
        )
    if not accepted.any():
        report["warning"] = (
            f"gate: no photo labelled {name} = {gate['accept']} on this split; "
            f"threshold left at {before}"
        )
    return report
