"""What the benchmark scripts share: the datasets' folder, the code revision they measured, the
models they read, their results files and a timing loop.

The scripts import it as a sibling (``python benchmarks/NAME.py`` puts this folder first on
``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from beautytag.config import Config
    from beautytag.nn.net import BeautyTagNet

ROOT = Path(__file__).resolve().parents[1]


# The files whose changes change what a benchmark measures (not its results or the docs).
CODE = ["src", "configs", "scripts", "pyproject.toml", ":(glob)benchmarks/*.py"]


def datasets_dir() -> Path:
    """The datasets' folder: ../shared/datasets beside the current folder or beside the
    package's checkout (beautytag.config.find_datasets), else where it is expected,
    ../shared/datasets beside this repository (see :func:`no_datasets`)."""
    from beautytag.config import find_datasets

    return find_datasets() or ROOT.parent / "shared" / "datasets"


def no_datasets(data: Path, *needs: str, hint: str = "") -> bool:
    """Whether folder `data` lacks one of the datasets `needs` (e.g. "beauty-shades"); if so,
    says on stderr that the benchmark is skipped (it then exits 0), with `hint` after."""
    if all((data / name).is_dir() for name in needs):
        return False
    print(
        f"skipped: no datasets at {data} (expected ../shared/datasets beside the repository{hint})",
        file=sys.stderr,
    )
    return True


def git_revision() -> str:
    """The checkout's short commit hash, with "-dirty" when committed code (CODE) has changes
    not committed (new files not counted: a benchmark may write some); "unknown" outside
    git."""
    if os.environ.get("BEAUTYTAG_REVISION"):  # set where the checkout has no .git (a copy)
        return os.environ["BEAUTYTAG_REVISION"]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, text=True, capture_output=True)
        if done.returncode:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE)
        return revision + ("-dirty" if changed else "")
    except OSError:
        return "unknown"


def git_file(revision: str, path: str, out: Path) -> Path | None:
    """Write file `path` as committed at `revision` to `out` (e.g. a model shipped then);
    None where git or that file is not to be had."""
    try:
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:{path}"], capture_output=True
        )
    except OSError:
        return None
    if shown.returncode:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(shown.stdout)
    return out


def load_model(spec: str) -> tuple[BeautyTagNet, Config]:
    """The model (in eval mode) and config of a benchmark's model argument: a shipped name or
    a checkpoint as the command line takes them, or ``REVISION:PATH``, a file as committed
    at a revision (e.g. ``c08db71:src/beautytag/weights/default.pt``, the default shipped
    then). FileNotFoundError where there is no such file, ValueError for a file that is not
    a beautytag checkpoint."""
    from beautytag.checkpoint import load_checkpoint, resolve_model

    revision, _, path = spec.partition(":")
    if not path or Path(spec).exists():
        model, cfg, _ = load_checkpoint(resolve_model(spec))
        return model, cfg
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / Path(path).name
        if git_file(revision, path, out) is None:
            raise FileNotFoundError(f"{spec}: no such file at revision {revision}")
        model, cfg, _ = load_checkpoint(out)
    return model, cfg


def write_results(out: Path, payload: dict[str, Any], markdown: list[str]) -> None:
    """A benchmark's results: `payload` as OUT.json, the `markdown` lines as OUT.md."""
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")


@torch.inference_mode()
def throughput(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, budget_s: float) -> dict:
    """images/s of ``fn(x)``: two warm-up calls, then calls until ``budget_s`` (at least 3).
    ``images_per_s`` is over all calls, ``images_per_s_median`` from the median call."""
    for _ in range(2):
        fn(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {
        "images_per_s": round(len(x) * len(times) / sum(times), 2),
        "images_per_s_median": round(len(x) / median, 2),
        "ms_per_call_median": round(1000 * median, 2),
        "calls": len(times),
    }
