"""The models of benchmarks/wild.py's rows that make one: ``train`` (configs/default.yaml with
the row's changes, trained with the Python API into RUNS/ID-sSEED, or a finished run there
reused, an interrupted one resumed), ``wise`` (WiSE-FT of a trained row's run and its
starting model) and ``crop`` (test-time crop: a hook, see :func:`crop_predictor`).

Imported by wild.py as a sibling.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from benchlib import ROOT

from beautytag.checkpoint import read_checkpoint, resolve_model
from beautytag.config import Config, config_from_dict
from beautytag.training.fine_tune import calibrate_best
from beautytag.training.train import config_changes, finished, train

# settings that may differ between a run found in the runs folder and the row's config
# without making it another run (where the files are, loader workers, the end-of-run report)
# settings that do not change what a run learns (model.gate's threshold is set by calibration)
NOT_COMPARED = {"train.workers", "train.final_report", "train.out_dir", "data.root", "model.gate"}
QUICK = {"train.epochs": 2, "train.freeze_epochs": 1, "data.limit": 48}


class SkipRow(Exception):
    """A row that cannot be measured yet, and why (a run it needs is not here...)."""


def set_key(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"]["c"] = value`` for "a.b.c", making missing mappings."""
    *path, last = dotted.split(".")
    for key in path:
        raw = raw.setdefault(key, {})
    raw[last] = value


def train_config(
    row: dict, seed: int, runs: Path, row_id: str, datasets: Path, quick: bool
) -> Config:
    """A train row's config: configs/default.yaml with the row's ``changes`` (dotted keys),
    its data on `datasets`, its run in RUNS/ID-sSEED with this seed."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    changes = dict(row.get("changes") or {})
    changes |= {
        "data.root": str(datasets),
        "train.out_dir": str(runs / f"{row_id}-s{seed}"),
        "train.seed": seed,
        "train.final_report": False,  # the benchmark measures the test split itself
    }
    for key, value in (changes | (QUICK if quick else {})).items():
        set_key(raw, key, copy.deepcopy(value))
    return config_from_dict(raw, base_dir=ROOT / "configs", where=f"row {row_id}")


def run_state(out: Path, cfg: Config) -> tuple[str, int]:
    """What is in run folder `out` for `cfg`: ("finished", epochs), ("resume", epochs done)
    or ("fresh", 0). SkipRow where a run there was made with other settings (it is never
    overwritten: remove the folder to train it again)."""
    last = out / "last.pt"
    if not last.is_file():
        if (out / "best.pt").is_file():
            raise SkipRow(f"{out} has a best.pt but no last.pt: not a run this benchmark reuses")
        return "fresh", 0
    state = torch.load(last, map_location="cpu", weights_only=True)
    changed = [c for c in config_changes(state["config"], cfg) if c not in NOT_COMPARED]
    if changed:
        raise SkipRow(f"the run in {out} has other settings ({', '.join(changed)}); move it away")
    done = state["epoch"] + 1
    if finished(cfg, done, state["bad_epochs"]) and (out / "best.pt").is_file():
        return "finished", done
    return "resume", done


def trained_checkpoint(
    row_id: str, row: dict, seed: int, runs: Path, datasets: Path, quick: bool, may_train: bool
) -> tuple[Path, dict[str, Any]]:
    """best.pt of a train row's run of `seed`: a finished run reused (calibrated on validation
    if it was not), else trained (or resumed) here when `may_train`."""
    cfg = train_config(row, seed, runs, row_id, datasets, quick)
    out = Path(cfg.train.out_dir)
    state, epochs = run_state(out, cfg)
    info: dict[str, Any] = {"run": str(out)}
    if state == "finished":
        info["reused"] = f"finished run ({epochs} epochs)"
        if cfg.train.calibrate and not read_checkpoint(out / "best.pt")["config"]["model"].get(
            "temperatures"
        ):
            info["temperatures"] = calibrate_best(out / "best.pt", cfg)
        return out / "best.pt", info
    if not may_train:
        raise SkipRow(f"{row_id} seed {seed}: no finished run in {out} (--no-train)")
    if state == "resume":
        print(f"resuming {out} after epoch {epochs}", flush=True)
        info["resumed_after_epoch"] = epochs
    paths = train(cfg, resume=state == "resume", progress=False)
    info |= {"train_seconds": paths["seconds"], "temperatures": paths.get("temperatures")}
    return Path(paths["best"]), info


def wise_checkpoint(
    row_id: str, row: dict, rows: dict, seed: int, runs: Path, datasets: Path, quick: bool
) -> tuple[Path, dict[str, Any]]:
    """RUNS/ID-sSEED/best.pt: WiSE-FT of row ``of``'s finished run of this seed and the model
    it started from (its model.init), weight ``alpha`` on the fine-tuned one, calibrated on
    validation; made once, then reused."""
    try:
        from beautytag.checkpoint import wise_ft
    except ImportError:
        raise SkipRow("kind wise needs beautytag.checkpoint.wise_ft, not on this branch") from None
    of = row["of"]
    cfg = train_config(rows[of], seed, runs, of, datasets, quick)
    tuned = Path(cfg.train.out_dir) / "best.pt"
    if run_state(tuned.parent, cfg)[0] != "finished":
        raise SkipRow(f"{row_id} seed {seed} needs {of} seed {seed} trained first ({tuned})")
    init = read_checkpoint(tuned)["config"]["model"].get("init")
    if not init:
        raise SkipRow(f"{tuned} has no model.init: no starting model to interpolate with")
    start = resolve_model(init)
    made = {"tuned": str(tuned), "start": str(start), "alpha": row["alpha"]}
    out = runs / f"{row_id}-s{seed}" / "best.pt"
    record = out.parent / "wise.json"
    if out.is_file() and record.is_file():
        stored = json.loads(record.read_text())
        if {k: stored.get(k) for k in made} == made:
            return out, stored | {"reused": "made earlier"}
    wise_ft(start, tuned, float(row["alpha"]), out)
    made["temperatures"] = calibrate_best(out, cfg)
    record.write_text(json.dumps(made, indent=1) + "\n")
    return out, made


def crop_predictor(row_id: str, row: dict, checkpoint: Path) -> Any:
    """The hook of kind ``crop``: a test-time crop around the product (another helper writes
    beautytag/runtime/crop.py). It is to return an object like wild_eval.CheckpointModel:
    ``cfg``, ``image_size``, ``__call__(dataset) -> {attribute: outputs}`` (the dataset's
    ``samples`` give the photos' paths, to crop the original photos rather than the
    letterboxed pixels) and ``speed()``, with ``row["crop"]`` as its settings. Until that
    module is here, the row is skipped."""
    try:
        import beautytag.runtime.crop  # noqa: F401
    except ImportError:
        raise SkipRow(f"{row_id}: kind crop needs beautytag/runtime/crop.py (not here)") from None
    raise SkipRow(f"{row_id}: kind crop: write wild_models.crop_predictor for runtime/crop.py")
