"""benchmarks/wild.py's tables (wild.md) and its shipping rule (``--pick``), both made from the
stored results only. Imported by wild.py as a sibling."""

from __future__ import annotations

import json
import statistics
from typing import Any

from wild_eval import COSMETIC_SETS, NEAR_DUPLICATES, THRESHOLDS

SEEDED = {"train", "wise", "crop"}  # kinds whose results are kept per seed (ID|seedN)
# the rule in the header of benchmarks/rows/wild.yaml, fixed before the trained rows ran
MARGIN, PC_DROP, SHADE_RISE, TIE, MAX_FALSE = 0.10, 0.02, 0.3, 0.01, 0.03
RULE_SEEDS = (0, 1, 2)  # the mean over these where all ran, else seed 0
SETS = {"noncosmetic": "non-cosmetics", "pc": "PC", "shades": "shades", "wild": "wild-dev"}


def get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def entries(store: dict, rid: str, row: dict) -> list[tuple[int | None, dict]]:
    """A row's stored results: per seed (seeded kinds) or its one entry."""
    if row["kind"] not in SEEDED:
        return [(None, store["rows"][rid])] if rid in store["rows"] else []
    found = []
    for key, entry in store["rows"].items():
        name, _, seed = key.partition("|seed")
        if name == rid and seed.isdigit() and "columns" in entry:
            found.append((int(seed), entry))
    return sorted(found, key=lambda e: e[0])


def column(entry: dict, path: tuple[str, ...]) -> float | None:
    """A stored number; a row measured before the new columns gives wild-dev test from its
    earlier measurement."""
    value = get(entry.get("columns"), *path)
    if value is None and path[:2] == ("test", "wild") and len(path) == 3:
        value = get(entry, "all", path[2])
    return value


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell(found: list[tuple[int | None, dict]], path: tuple[str, ...], digits: int = 3) -> str:
    """Mean ± sd over the stored seeds; "n/a" for rejection by a model with no gate."""
    values = [v for _, e in found if (v := column(e, path)) is not None]
    if not values and path[1:2] == ("rejection",):
        if any("columns" in e and get(e, "columns", path[0]) for _, e in found):
            return "n/a"
    return fmt(values, digits)


def photos(store: dict, *path: str) -> Any:
    for entry in store["rows"].values():
        if (n := get(entry.get("columns"), *path)) is not None:
            return n
    return "?"


TEST = [
    ("wild-dev accuracy", ("test", "wild", "accuracy"), 3),
    ("wild-dev macro-F1", ("test", "wild", "macro_f1"), 3),
    ("PC category, all", ("test", "pc", "accuracy"), 3),
    ("PC category, no near-duplicate", ("test", "pc", "no_near_duplicate", "accuracy"), 3),
    ("shade median ΔE2000", ("test", "shades", "median_de2000"), 3),
    ("non-cosmetics rejected", ("test", "rejection", "rates", "noncosmetic"), 3),
    ("wild-dev falsely rejected", ("test", "rejection", "rates", "wild"), 3),
    ("CPU img/s", ("columns_speed",), 0),
]
VAL = [
    ("wild-dev accuracy", ("val", "wild", "accuracy"), 3),
    ("PC category", ("val", "pc", "accuracy"), 3),
    ("shade median ΔE2000", ("val", "shades", "median_de2000"), 3),
    *[
        (f"rejected, {label}", ("val", "rejection", "rates", name), 3)
        for name, label in SETS.items()
    ],
]


def speed_cell(found: list[tuple[int | None, dict]]) -> str:
    return fmt([v for _, e in found if (v := get(e, "columns", "speed", "images_per_s_median"))], 0)


def report(store: dict, rows: dict) -> list[str]:
    near = json.loads(NEAR_DUPLICATES.read_text()) if NEAR_DUPLICATES.is_file() else {}
    md = [
        "# Real-world photos (wild-dev) and what a wild-trained model must keep",
        "",
        f"`{store.get('command', 'python benchmarks/wild.py')}` (each result's own command and "
        "revision are in `wild.json`). Mean ± standard deviation over the seeds stored (`n`). "
        f"wild-dev: {store.get('test_photos', '?')} test photos, category (shipped models lack "
        "Eyebrow Pencil and Makeup Brushes: those photos count as their mistakes). PC: the "
        f"catalogue's Personal Care test photos ({photos(store, 'test', 'pc', 'photos')}), and "
        "those without a near-identical training photo "
        f"({photos(store, 'test', 'pc', 'no_near_duplicate', 'photos')}; "
        f"{near.get('count', '?')} have one: "
        "[`pc_test_near_duplicates.json`](pc_test_near_duplicates.json) says how they were "
        "found). Shade: beauty-shades test brands "
        f"({photos(store, 'test', 'shades', 'photos')} photos with a measured shade). "
        "Rejected: the share of photos with P(cosmetic = yes) below the model's gate "
        "threshold (model.gate, else 0.5), among the catalogue's "
        f"{photos(store, 'test', 'rejection', 'photos', 'noncosmetic')} test photos that are not "
        "Personal Care (clothes, shoes, accessories and a few free items and sporting goods) "
        "and among the wild-dev test photos (all cosmetics: false rejections); n/a: the "
        "model has no cosmetic head. CPU img/s: PyTorch eager, batches of 32, median, on 2 CPU "
        "cores shared with other jobs (a rough figure; the load average then is in `wild.json`).",
        "",
        "## Test (report only)",
        "",
        "| id | row | n | " + " | ".join(t for t, _, _ in TEST) + " | rev |",
        "| --- | --- | --- | " + " | ".join("---" for _ in TEST) + " | --- |",
    ]
    for rid, row in rows.items():
        if not (found := entries(store, rid, row)):
            continue
        cells = [
            speed_cell(found) if path == ("columns_speed",) else cell(found, path, d)
            for _, path, d in TEST
        ]
        revs = sorted({get(e, "columns", "revision") or e.get("revision", "?") for _, e in found})
        md.append(
            f"| {rid} | {row['description']} | {len(found)} | {' | '.join(cells)} | "
            f"{', '.join(revs)} |"
        )
    md += validation_table(store, rows) + per_class_table(store, rows)
    md += legacy_table(store, rows)
    md += ["", "## The shipping rule on these results (`python benchmarks/wild.py --pick`)", ""]
    md += ["```", *pick(store, rows), "```"]
    return md


def validation_table(store: dict, rows: dict) -> list[str]:
    md = [
        "",
        "## Validation (for the shipping rule)",
        "",
        "The same columns on the validation splits (wild-dev "
        f"{photos(store, 'val', 'wild', 'photos')}, PC {photos(store, 'val', 'pc', 'photos')}, "
        f"shades {photos(store, 'val', 'shades', 'photos')}, non-cosmetics "
        f"{photos(store, 'val', 'rejection', 'photos', 'noncosmetic')}), and t: the gate "
        "threshold that the rule chooses (the highest of 0.05, 0.10 ... 0.50 that rejects at "
        f"most {MAX_FALSE:.0%} of each cosmetics set), with the shares rejected at t.",
        "",
        "| id | n | "
        + " | ".join(t for t, _, _ in VAL)
        + " | t | at t: "
        + " / ".join(SETS.values())
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in VAL) + " | --- | --- |",
    ]
    for rid, row in rows.items():
        found = [(s, e) for s, e in entries(store, rid, row) if get(e, "columns", "val")]
        if not found:
            continue
        t = rule_threshold(store, rid, row)
        at_t = " / ".join(
            cell(found, ("val", "rejection", "by_threshold", n, str(t))) for n in SETS
        )
        cells = [cell(found, path, d) for _, path, d in VAL]
        md.append(
            f"| {rid} | {len(found)} | {' | '.join(cells)} | {t if t else '-'} | "
            f"{at_t if t else '-'} |"
        )
    return md


def per_class_table(store: dict, rows: dict) -> list[str]:
    classes: list[str] = []
    for entry in store["rows"].values():
        classes = classes or list(get(entry, "columns", "test", "wild", "per_class_f1") or [])
    if not classes:
        return []
    counts = photos(store, "test", "wild", "per_class_photos")
    md = [
        "",
        "## wild-dev test, F1 per class",
        "",
        "| id | n | " + " | ".join(f"{c} ({counts.get(c, '?')})" for c in classes) + " |",
        "| --- | --- | " + " | ".join("---" for _ in classes) + " |",
    ]
    for rid, row in rows.items():
        found = [(s, e) for s, e in entries(store, rid, row) if get(e, "columns", "test")]
        if found:
            path = ("test", "wild", "per_class_f1")
            cells = [fmt([get(e["columns"], *path, c) for _, e in found]) for c in classes]
            md.append(f"| {rid} | {len(found)} | {' | '.join(cells)} |")
    return md


def legacy_table(store: dict, rows: dict) -> list[str]:
    md = [
        "",
        "## Earlier measurement of the rows without seeds",
        "",
        "wild-dev test through `Engine.predict_files` (shipped models; also on the photos of "
        "the five classes they know) or the probe (its C chosen on validation macro-F1).",
        "",
        "| id | accuracy | macro-F1 | accuracy, known classes | most answered | s | rev |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rid, row in rows.items():
        r = store["rows"].get(rid)
        if row["kind"] in SEEDED or not r or "all" not in r:
            continue
        known = get(r, "known_classes", "accuracy")
        most = ", ".join(f"{k} {v}" for k, v in r.get("most_answered", []))
        md.append(
            f"| {rid} | {r['all']['accuracy']:.3f} | {r['all']['macro_f1']:.3f} | "
            f"{'' if known is None else f'{known:.3f}'} | {most} | {r.get('seconds', '')} | "
            f"{r.get('revision', '')} |"
        )
    return md


# ---------------------------------------------------------------- the shipping rule


def rule_value(store: dict, rid: str, row: dict, path: tuple[str, ...]) -> float | None:
    """A validation number as the rule reads it: the mean over seeds 0-2 where all three
    ran, else seed 0 (a row without seeds: its one result)."""
    found = dict(entries(store, rid, row))
    if row["kind"] not in SEEDED:
        return get(found.get(None, {}).get("columns"), *path)
    values = {s: get(e["columns"], *path) for s, e in found.items()}
    if all(values.get(s) is not None for s in RULE_SEEDS):
        return statistics.mean(values[s] for s in RULE_SEEDS)
    return values.get(0)


def rule_threshold(store: dict, rid: str, row: dict) -> float | None:
    """The highest threshold that falsely rejects at most MAX_FALSE of each cosmetics set's
    validation photos; None if none does or the model has no gate."""
    for t in reversed(THRESHOLDS):
        rates = [
            rule_value(store, rid, row, ("val", "rejection", "by_threshold", n, str(t)))
            for n in COSMETIC_SETS
        ]
        if all(r is not None and r <= MAX_FALSE for r in rates):
            return t
    return None


def additions(row: dict, rows: dict) -> int:
    """How many things a row adds: its ``additions``, else one more than the row it is made
    of (``of``), else the "+" signs in its description."""
    if "additions" in row:
        return int(row["additions"])
    if "of" in row:
        return additions(rows[row["of"]], rows) + 1
    return row["description"].count("+")


def pick(store: dict, rows: dict) -> list[str]:
    """The rule of benchmarks/rows/wild.yaml's header applied to the stored validation
    results, as lines: each candidate's numbers and the decision."""
    keys = {"wild": ("val", "wild", "accuracy"), "pc": ("val", "pc", "accuracy")}
    keys["shade"] = ("val", "shades", "median_de2000")
    if "W1" not in rows or rule_value(store, "W1", rows["W1"], keys["wild"]) is None:
        return ["W1 (the shipped default) has no validation columns: run --only W1 first"]
    base = {k: rule_value(store, "W1", rows["W1"], p) for k, p in keys.items()}
    lines = [
        "Rule (benchmarks/rows/wild.yaml), validation only, seed 0 or the mean of seeds 0-2:",
        f"W1, the shipped default: wild-dev {base['wild']:.3f}, PC category {base['pc']:.3f}, "
        f"shade median dE2000 {base['shade']:.3f}",
        f"needs (a) the best wild-dev of the trained rows (ties within {TIE}: fewer additions) "
        f"and >= {base['wild'] + MARGIN:.3f}; (b) PC >= {base['pc'] - PC_DROP:.3f}; (c) shade "
        f"<= {base['shade'] + SHADE_RISE:.3f}",
    ]
    found = {}
    for rid, row in rows.items():
        if row["kind"] not in SEEDED or rule_value(store, rid, row, keys["wild"]) is None:
            continue
        v = {k: rule_value(store, rid, row, p) for k, p in keys.items()}
        seeds = sorted(s for s, _ in entries(store, rid, row))
        used = "seeds 0-2" if set(RULE_SEEDS) <= set(seeds) else "seed 0"
        checks = {
            "a": v["wild"] >= base["wild"] + MARGIN,
            "b": v["pc"] is not None and v["pc"] >= base["pc"] - PC_DROP,
            "c": v["shade"] is not None and v["shade"] <= base["shade"] + SHADE_RISE,
        }
        found[rid] = (v, checks)
        lines.append(
            f"{rid} ({used}, {additions(row, rows)} additions): wild-dev {v['wild']:.3f}, PC "
            f"{fmt([v['pc']] if v['pc'] is not None else [])}, shade "
            f"{fmt([v['shade']] if v['shade'] is not None else [])}; margin (a) "
            f"{'yes' if checks['a'] else 'no'}, (b) {'yes' if checks['b'] else 'no'}, (c) "
            f"{'yes' if checks['c'] else 'no'}; gate t {rule_threshold(store, rid, row)}"
        )
    if not found:
        return [*lines, "no trained row has validation results: the default stays"]
    top = max(v["wild"] for v, _ in found.values())
    tied = [r for r, (v, _) in found.items() if v["wild"] >= top - TIE]
    best = min(tied, key=lambda r: (additions(rows[r], rows), -found[r][0]["wild"]))
    v, checks = found[best]
    if all(checks.values()):
        t = rule_threshold(store, best, rows[best])
        gate = f"gate threshold {t}" if t else "no threshold in 0.05-0.50 keeps to 3 %"
        return [*lines, f"decision: {best} replaces the default ({gate})"]
    failed = ", ".join(k for k, ok in checks.items() if not ok)
    return [*lines, f"decision: the default stays ({best}, the best by (a), fails {failed})"]
