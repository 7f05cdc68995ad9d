"""Write a checkpoint of an accuracy-benchmark row's model with random weights, to measure its
serving speed before (or without) training it: the weights do not change the speed.

    python scripts/untrained_model.py C21 /tmp/c21-speed.pt
    python benchmarks/serve.py --model /tmp/c21-speed.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402
from benchlib import datasets_dir  # noqa: E402

from beautytag.checkpoint import save_checkpoint  # noqa: E402
from beautytag.config import config_from_dict  # noqa: E402
from beautytag.nn.net import BeautyTagNet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("row", help='a row id of benchmarks/rows/*.yaml, e.g. "C21"')
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=datasets_dir())
    args = p.parse_args(argv)
    rows = accuracy.rows(args.data)
    found = [n for n in rows if accuracy.selects([args.row], n) and "model" in rows[n]]
    if len(found) != 1:
        print(f"error: {args.row!r} names {len(found)} trained rows", file=sys.stderr)
        return 2
    raw = accuracy.without_marker(rows[found[0]])
    raw["model"] = raw["model"] | {"weights": "none"}
    cfg = config_from_dict(raw)
    save_checkpoint(args.out, BeautyTagNet(cfg, pretrained=False).eval(), cfg, half=True)
    print(f"{accuracy.label(found[0])} (random weights): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
