"""Export benchmark: ONNX parity and the accuracy cost of int8, for each shipped model.

Runs ``beautytag export MODEL --format onnx --quantize MODE`` (dynamic and static) for the
shipped ``default`` and ``accurate`` models and writes benchmarks/results/export.json (each
command's JSON report) and export.md. Usage:

    python benchmarks/export.py [--models default accurate]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import datasets_dir, git_revision, no_datasets

from beautytag.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
DATA = datasets_dir()
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("dynamic", "static")


def export_report(model: str, mode: str, out: Path) -> dict[str, Any]:
    """One ``beautytag export`` run; its JSON report."""
    args = ["export", model, "--format", "onnx", "--quantize", mode, "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(args)
    if rc != 0:
        raise RuntimeError(f"beautytag {' '.join(args)} failed with exit status {rc}")
    command = shlex.join(["beautytag", *args[:-2], "--out", out.name])
    return {"command": command} | json.loads(buf.getvalue())


def row(label: str, size: int | None, parity: dict | None, metrics: dict) -> str:
    """A table row; no size and parity for the PyTorch reference."""
    m = metrics
    mb = f"{size / 2**20:.1f}" if size else "-"
    diff = f"{parity['max_abs_diff']:.2g}" if parity else "-"
    agree = f"{parity['label_agreement']:.3f}" if parity else "-"
    return (
        f"| {label} | {mb} | {diff} | {agree} | {m['category']['accuracy']:.3f} | "
        f"{m['color']['accuracy']:.3f} | {m['shade']['median_de2000']:.2f} | "
        f"{m['function']['mAP']:.3f} |"
    )


def write_markdown(
    runs: dict[str, dict[str, dict]], path: Path, command: str, revision: str
) -> None:
    lines = [
        "# Export: ONNX parity and the accuracy cost of int8 (shipped models)",
        "",
        f"Command: `{command}` at {revision}, which runs `beautytag export MODEL --format onnx "
        "--quantize dynamic|static` for each model. Accuracy on the test split of the model's "
        "data (Personal Care + beauty-shades test brands; the default's also wild-dev's real "
        "photos and, for its gate only, clothes and shoes); parity on 32 beauty-shades photos "
        "(max abs difference over all outputs: probabilities, and the shade in Lab units).",
        "",
        "| model | MB | parity max abs diff | label agreement | category acc | color acc "
        "| shade median dE2000 | function mAP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, by_mode in runs.items():
        first = next(iter(by_mode.values()))
        acc = first["accuracy"]
        lines.append(row(f"`{model}` PyTorch (reference)", None, None, acc["torch"]))
        fp32 = acc[first["model"]]["metrics"]
        lines.append(row(f"`{model}` ONNX fp32", first["bytes"], first["parity"], fp32))
        for mode, r in by_mode.items():
            q = r["quantized"]
            int8 = r["accuracy"][q["model"]]["metrics"]
            lines.append(row(f"`{model}` ONNX int8 {mode}", q["bytes"], q["parity"], int8))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["default", "accurate"])
    args = p.parse_args(argv)
    if no_datasets(DATA, "beauty-shades"):
        return 0
    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            try:
                runs[model] = {
                    mode: export_report(model, mode, Path(tmp) / f"{model}.onnx") for mode in MODES
                }
            except RuntimeError as e:  # the command said why on stderr
                print(f"error: {e}; nothing written", file=sys.stderr)
                return 1
    command = shlex.join(
        ["python", "benchmarks/export.py", *(sys.argv[1:] if argv is None else argv)]
    )
    revision = git_revision()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "export.json"
    payload = {"command": command, "revision": revision, "runs": runs}
    out.write_text(json.dumps(payload, indent=2))
    write_markdown(runs, out.with_suffix(".md"), command, revision)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
