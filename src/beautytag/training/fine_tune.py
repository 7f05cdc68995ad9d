"""Fine-tuning a model: what a run keeps of its starting model (``model.init``,
``model.keep_attributes``), and what it does after its last epoch: temperature-scale best.pt
on the validation split (``train.calibrate``), and measure it and the starting model on the
test split, side by side (``train.final_report``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from beautytag.checkpoint import keep_start_attributes, resolve_model
from beautytag.config import Config
from beautytag.runtime.gate import summary as gate_summary
from beautytag.training.calibrate import calibrate
from beautytag.training.evaluate import evaluate


def with_start_attributes(cfg: Config) -> tuple[Config, list[str]]:
    """`cfg` with its starting model's other attributes (checkpoint.keep_start_attributes),
    saying which, and warning of model settings that differ from the starting model's; and
    the names of those attributes."""
    cfg, kept, warnings = keep_start_attributes(cfg)
    if kept:
        print(f"kept from {cfg.model.init}: {', '.join(kept)} (model.keep_attributes)")
    for warning in warnings:
        print(f"warning: {warning}")
    return cfg, kept


def warn_untrained(cfg: Config, fresh: list[str]) -> None:
    """Warn of heads that did not load from the starting model (init_from_checkpoint's
    `fresh` tensors) while no source labels their attribute: they would stay untrained."""
    unlabelled = [a.name for a in cfg.schema.attributes if not a.sources]
    if lost := [n for n in unlabelled if any(k.startswith(f"heads.{n}.") for k in fresh)]:
        print(
            f"warning: the heads of {', '.join(lost)} did not load from {cfg.model.init} "
            "(other model settings?) and no source labels them: they stay untrained"
        )


def after_training(out: Path, cfg: Config, device: str, kept: list[str]) -> dict[str, Any]:
    """What train() adds to its result after the last epoch: the attributes `kept` from the
    starting model, best.pt's temperatures and the test reports, as the config says."""
    result: dict[str, Any] = {}
    if kept:
        result["kept"] = kept
    if cfg.train.calibrate:
        result["temperatures"] = calibrate_best(out / "best.pt", cfg)
    if cfg.train.final_report:
        result |= final_report(out, cfg, device)
    return result


def calibrate_best(best: Path, cfg: Config) -> dict[str, float]:
    """Temperature-scale `best` in place on the validation split (training/calibrate.py),
    and set its gate's threshold (printing what it rejects); an attribute whose fit fails
    keeps its temperature, with a warning. Returns the temperatures."""
    try:
        report = calibrate(best, best, split="val", config=cfg)
    except ValueError as e:
        print(f"warning: {best} not calibrated: {e}")
        return dict(cfg.model.temperatures)
    temperatures = {}
    for name, r in report.items():
        if isinstance(r, dict):
            if "temperature" in r:
                temperatures[name] = r["temperature"]
            if "warning" in r:
                print(f"warning: calibration: {r['warning']}")
            if "note" in r:
                print(f"note: calibration: {r['note']}")
    shown = ", ".join(f"{k} {v:.3g}" for k, v in temperatures.items()) or "no class attribute"
    print(f"calibrated {best} on the validation split: temperatures {shown}")
    if "gate" in report:
        print(f"validation split: {gate_summary(report['gate'])}")
    return temperatures


def final_report(out: Path, cfg: Config, device: str) -> dict[str, Any]:
    """best.pt and the starting model (model.init, if any) measured on the test split, their
    reports in OUT/test-report and OUT/start-test-report, and a side-by-side table printed;
    nothing when the config's sources have no test photo."""
    try:
        ours = evaluate(out / "best.pt", "test", out / "test-report", cfg, device=device)
    except ValueError as e:
        if "no samples in split" not in str(e):
            raise
        print("no test photos: no final report (give the sources a test split)")
        return {}
    reports = {"test_report": str(out / "test-report" / "report.md")}
    start = None
    if cfg.model.init:
        try:
            start = evaluate(
                resolve_model(cfg.model.init), "test", out / "start-test-report", cfg, device=device
            )
            reports["start_test_report"] = str(out / "start-test-report" / "report.md")
        except ValueError as e:  # e.g. no attribute in common
            print(f"warning: {cfg.model.init} not measured on the test split: {e}")
    print(comparison(ours, start, cfg.model.init))
    if "gate" in ours:  # what the gate rejects of the test photos
        print(f"test split: {gate_summary(ours['gate'])}")
    return reports


# what the side-by-side table shows per kind of attribute
COMPARED = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("mAP", "mAP"))
COMPARED += (("median_de2000", "median dE"),)


def comparison(ours: dict[str, Any], start: dict[str, Any] | None, name: str) -> str:
    """A table of this run's test metrics beside the starting model's (where it has them)."""
    head = f"test split, {ours['images']} photos: this run"
    lines = [head + (f" | {name} (the starting model)" if start else "")]
    theirs = start["metrics"] if start else {}
    for attr, r in ours["metrics"].items():
        if not r.get("n"):
            continue
        other = theirs.get(attr, {})
        cells = []
        for key, label in COMPARED:
            if key in r:
                was = f" | {other[key]:.3f}" if other.get(key) is not None else ""
                cells.append(f"{label} {r[key]:.3f}{was}")
        n = f"n {r['n']}" + (f" | {other['n']}" if start and "n" in other else "")
        lines.append(f"  {attr}: {n}; " + "; ".join(cells))
    for attr, why in (start or {}).get("not_compared", {}).items():
        lines.append(f"  {name} not measured on {attr}: {why}")
    return "\n".join(lines)
