"""Where a model's category errors are, and whether changing only its inference fixes them.

On the Personal Care photos of fashion-products-small (validation and test splits), for each
model (a shipped name or a checkpoint): category accuracy, and how many errors have Face
Moisturisers or Other (the 12 rare article types merged into one class) as the true or the
predicted class: the two classes of jars and tubes of cream, whose type a photo often does
not show. Then three changes at inference, none retrained:

* ``no_other``: Other is never predicted (its probability set to 0);
* ``knn``: the head's probabilities blended (0.7 / 0.3) with a vote of the 5 training photos
  nearest in the model's embedding (cosine; votes weighted by exp(similarity / 0.1));
* ``scales``: probabilities averaged over the model's input size and 16 px more.

Writes benchmarks/results/category_errors.json and .md. The test column is reported, never
used to choose.

    python benchmarks/category_errors.py [--models default accurate PATH REV:PATH...]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import datasets_dir, git_revision, load_model, no_datasets, write_results

from beautytag.config import Config
from beautytag.data import BeautyDataset, read_samples
from beautytag.images import normalize
from beautytag.nn.net import BeautyTagNet

ROOT = Path(__file__).resolve().parents[1]
DATA = datasets_dir()
RESULTS = ROOT / "benchmarks" / "results"
WEAK = ("Face Moisturisers", "Other")
VARIANTS = ("no_other", "knn", "scales")


@torch.inference_mode()
def outputs(
    model: BeautyTagNet,
    cfg: Config,
    split: str,
    sources: list[str] | None,
    attributes: tuple[str, ...] = ("category",),
) -> dict:
    """Embeddings of the photos of one split that have a category, and per attribute its
    probabilities ``p_ATTR`` and class indices ``y_ATTR`` (-1 where a photo has no label).
    The category's are also ``p`` and ``y``."""
    samples = read_samples(cfg, splits=[split], sources=sources)
    ds = BeautyDataset([s for s in samples if s.labels.get("category") is not None], cfg)
    probs: dict[str, list[torch.Tensor]] = {a: [] for a in attributes}
    embs = []
    for i in range(0, len(ds.pixels), 128):
        x = torch.from_numpy(ds.pixels[i : i + 128]).permute(0, 3, 1, 2).float()
        x = normalize(x, cfg.model.mean, cfg.model.std)
        fmap = model.features(x)
        emb = model.pool(fmap).flatten(1)
        answers = model.activated({a: model.head(a, fmap, emb, x) for a in attributes})
        for a in attributes:  # the scores the model gives (its temperatures, if any)
            probs[a].append(answers[a])
        embs.append(emb)
    result = {"emb": torch.cat(embs).numpy()}
    for a in attributes:
        classes = cfg.schema[a].classes
        labels = [s.labels.get(a) for s in ds.samples]
        result[f"p_{a}"] = torch.cat(probs[a]).numpy()
        result[f"y_{a}"] = np.array([-1 if v is None else classes.index(v) for v in labels])
    return result | {"p": result["p_category"], "y": result["y_category"]}


def knn_vote(emb: np.ndarray, bank: np.ndarray, labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Class votes of the `k` nearest bank embeddings (cosine), weighted by exp(sim / 0.1)."""
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    sim = unit(emb) @ unit(bank).T
    near = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(emb), labels.max() + 1))
    for i, row in enumerate(near):
        np.add.at(votes[i], labels[row], np.exp(sim[i, row] / 0.1))
    return votes / votes.sum(1, keepdims=True)


def measure(name: str) -> dict[str, Any]:
    """One model's errors and its three inference variants on validation and test."""
    model, cfg = load_model(name)
    classes = cfg.schema["category"].classes
    other, weak = classes.index("Other"), [classes.index(c) for c in WEAK]
    bank = outputs(model, cfg, "train", None)  # every training photo with a category
    larger = copy.deepcopy(cfg)
    larger.model.image_size = cfg.model.image_size + 16
    result: dict[str, Any] = {"model": name, "image_size": cfg.model.image_size}
    for split in ("val", "test"):
        o = outputs(model, cfg, split, ["fashion"])
        p, y = o["p"], o["y"]
        pred = p.argmax(1)
        wrong = pred != y
        no_other = p.copy()
        no_other[:, other] = 0
        k = knn_vote(o["emb"], bank["emb"], bank["y"])
        scales = (p + outputs(model, larger, split, ["fashion"])["p"]) / 2
        variants = {"no_other": no_other, "knn": 0.7 * p + 0.3 * k, "scales": scales}
        result[split] = {
            "n": len(y),
            "correct": int((~wrong).sum()),
            "accuracy": round(float((~wrong).mean()), 4),
            "errors_weak": int((wrong & (np.isin(y, weak) | np.isin(pred, weak))).sum()),
            "weak_photos": int(np.isin(y, weak).sum()),
        } | {v: int((q.argmax(1) == y).sum()) for v, q in variants.items()}
    return result


def short(model: str) -> str:
    """A shipped model's name, a checkpoint's run folder (RUN/best.pt -> RUN), or a file as
    committed at a revision (REV:.../default.pt -> default@REV)."""
    revision, _, committed = model.partition(":")
    if committed and not Path(model).exists():
        return f"{Path(committed).stem}@{revision}"
    path = Path(model)
    return model if len(path.parts) == 1 else path.parent.name


def table(results: list[dict[str, Any]]) -> list[str]:
    """The markdown table: correct answers per model and split, and the variants' changes."""
    head = "| model | split | correct / n | FM + Other photos | errors | with FM or Other | "
    lines = [
        head + " | ".join(VARIANTS) + " |",
        "| --- " * (6 + len(VARIANTS)) + "|",
    ]
    for r in results:
        for split in ("val", "test"):
            s = r[split]
            deltas = [f"{s[v] - s['correct']:+d}" for v in VARIANTS]
            errors = s["n"] - s["correct"]
            lines.append(
                f"| {short(r['model'])} | {split} | {s['correct']} / {s['n']} "
                f"({s['accuracy']:.3f}) | {s['weak_photos']} | {errors} | {s['errors_weak']} | "
                + " | ".join(deltas)
                + " |"
            )
    for split in ("val", "test"):
        errors = sum(r[split]["n"] - r[split]["correct"] for r in results)
        weak = sum(r[split]["errors_weak"] for r in results)
        photos = sum(r[split]["weak_photos"] for r in results)
        total = [sum(r[split][v] - r[split]["correct"] for r in results) for v in VARIANTS]
        lines.append(
            f"| all {len(results)} | {split} | | {photos} | {errors} | {weak} | "
            + " | ".join(f"{t:+d}" for t in total)
            + " |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["default", "accurate"])
    p.add_argument("--out", default=str(RESULTS / "category_errors"))
    args = p.parse_args()
    if no_datasets(DATA, "fashion-products-small"):
        return 0
    torch.set_num_threads(2)
    results = []
    for name in args.models:
        try:
            results.append(measure(name))
        except (FileNotFoundError, ValueError) as e:  # a model that is not there or not ours
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(results[-1]), flush=True)
    command = shlex.join(["python", "benchmarks/category_errors.py", "--models", *args.models])
    out = Path(args.out)
    payload = {"revision": git_revision(), "command": command, "results": results}
    md = [
        "# Category errors on Personal Care photos, and inference-only changes",
        "",
        f"`python benchmarks/category_errors.py --models MODELS` at {payload['revision']}, with",
        "MODELS the models below (checkpoints by their run folder; the JSON file has the full",
        "command). *with FM or Other*: errors whose true or predicted class is Face Moisturisers",
        "or Other. The last three columns: correct answers gained (+) or lost (-) by each",
        "change at inference (see the script's docstring). The test rows are not used to choose.",
        "",
        *table(results),
    ]
    write_results(out, payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
