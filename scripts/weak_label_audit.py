"""Coverage of the weak-label rules on the Personal Care catalogue, and the random sample
that was audited by hand (the verdicts are in benchmarks/results/weak_label_audit.csv).

    python scripts/weak_label_audit.py
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from beautytag.weak_labels import finish_from_text, function_from_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' datasets_dir
from benchlib import datasets_dir, no_datasets  # noqa: E402

CATALOGUE = datasets_dir() / "fashion-products-small" / "labels.csv"
AUDIT = ROOT / "benchmarks" / "results" / "weak_label_audit.csv"


def main() -> int:
    if no_datasets(datasets_dir(), "fashion-products-small"):
        return 0
    rows = [r for r in csv.DictReader(CATALOGUE.open()) if r["masterCategory"] == "Personal Care"]
    finish = [r["id"] for r in rows if finish_from_text(r["title"])]
    function = [r["id"] for r in rows if function_from_text(r["title"])]
    print(
        f"{len(rows)} titles; finish rule fires on {len(finish)}, "
        f"function rule names a benefit on {len(function)}"
    )
    random.seed(1)  # the audited sample: 30 of each
    sample = {"finish": random.sample(finish, 30), "function": random.sample(function, 30)}
    audit = list(csv.DictReader(AUDIT.open()))
    for rule, ids in sample.items():
        judged = [a for a in audit if a["rule"] == rule]
        if [a["id"] for a in judged] != ids:
            print(f"error: {AUDIT} is not this sample of the {rule} rule", file=sys.stderr)
            return 1
        right = sum(a["correct"] == "True" for a in judged)
        print(f"{rule}: {right} of {len(judged)} correct (precision {right / len(judged):.2f})")

    return 0


if __name__ == "__main__":
    sys.exit(main())
