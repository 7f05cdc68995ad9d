"""How long ``beautytag --help`` takes against importing torch and timm, in the same run.

The CLI parses its arguments before importing torch, so ``--help`` (of the command and of
every subcommand) should take well under half the time of ``python -c "import torch, timm"``.
Each command runs ``--repeats`` times, alternating, and the medians are compared as a ratio
(timings on a shared machine are noisy; the ratio in one run is what counts). Usage:

    python benchmarks/cli_startup.py [--repeats 7]

Writes benchmarks/results/cli_startup.json and .md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import git_revision, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "cli_startup"
SUBCOMMANDS = ["train", "evaluate", "calibrate", "predict", "review", "report", "serve", "export"]


def seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="runs of each command")
    args = p.parse_args(argv)
    py = sys.executable
    commands = {"import torch, timm": [py, "-c", "import torch, timm"]}
    commands["beautytag --help"] = [py, "-m", "beautytag.cli", "--help"]
    for sub in SUBCOMMANDS:
        commands[f"beautytag {sub} --help"] = [py, "-m", "beautytag.cli", sub, "--help"]
    for cmd in commands.values():  # warm the file cache
        seconds(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            times[name].append(seconds(cmd))
    medians = {name: round(statistics.median(t), 3) for name, t in times.items()}
    base = medians["import torch, timm"]
    ratios = {name: round(m / base, 3) for name, m in medians.items()}
    command = "python benchmarks/cli_startup.py " + shlex.join(sys.argv[1:])
    payload = {
        "command": command.strip(),
        "revision": git_revision(),
        "repeats": args.repeats,
        "median_seconds": medians,
        "ratio_to_import_torch_timm": ratios,
        "target": "every --help below 0.5 of import torch, timm",
        "passed": all(r < 0.5 for n, r in ratios.items() if n.startswith("beautytag")),
    }
    md = [
        "# CLI start-up",
        "",
        f"`{payload['command']}` at {payload['revision']}, median of {args.repeats} runs each.",
        "",
        "| command | median s | ratio to `import torch, timm` |",
        "| --- | --- | --- |",
    ]
    md += [f"| `{n}` | {medians[n]:.3f} | {ratios[n]:.3f} |" for n in commands]
    md += ["", f"Target (every `--help` under 0.5): {'met' if payload['passed'] else 'NOT met'}."]
    write_results(RESULTS, payload, md)
    print("\n".join(md))
    return 0 if payload["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
