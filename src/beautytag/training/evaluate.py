"""Evaluation: run a model over a labelled dataset and measure every attribute.

* ``single`` - accuracy, macro-F1, top-k accuracy, a confusion matrix, the most confused
  classes and every mistake (mistakes.csv),
* ``multi``  - mAP, micro/macro F1 at 0.5,
* ``shade``  - CIEDE2000 (median, mean, share under 5).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from beautytag.checkpoint import load_checkpoint
from beautytag.config import Config
from beautytag.data import BeautyDataset, read_samples
from beautytag.images import normalize
from beautytag.nn.net import BeautyTagNet
from beautytag.runtime.engine import mirror_averaged
from beautytag.runtime.gate import measure as measure_gate
from beautytag.runtime.gate import summary as gate_summary
from beautytag.schema import Schema, SchemaError
from beautytag.training import metrics


@torch.inference_mode()
def run_dataset(
    model: BeautyTagNet | Sequence[BeautyTagNet],
    ds: BeautyDataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip_tta: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Model outputs (probabilities for classes, Lab for shades), targets and masks. Several
    models (same outputs): an ensemble, their outputs averaged."""
    models = [model] if isinstance(model, BeautyTagNet) else list(model)
    attributes = models[0].schema.attributes
    labelled = ds.cfg.schema.attributes  # the data's (another schema's: evaluate's shared)
    for m in models:
        m.eval()
    outs: dict[str, list] = {a.name: [] for a in attributes}
    tgts: dict[str, list] = {a.name: [] for a in labelled}
    msks: dict[str, list] = {a.name: [] for a in labelled}

    def probs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        ys = [m.activated(m(x)) for m in models]
        return {a.name: sum(y[a.name] for y in ys) / len(ys) for a in attributes}

    for x, targets, masks in DataLoader(ds, batch_size=batch_size, shuffle=False):
        x = normalize(x.to(device), ds.cfg.model.mean, ds.cfg.model.std)
        out = mirror_averaged(probs, x) if flip_tta else probs(x)
        for a in attributes:
            outs[a.name].append(out[a.name].float().cpu())
        for a in labelled:
            tgts[a.name].append(targets[a.name])
            msks[a.name].append(masks[a.name])
    cat = lambda d: {k: torch.cat(v).numpy() for k, v in d.items()}  # noqa: E731
    return cat(outs), cat(tgts), cat(msks)


def compute_metrics(
    cfg: Config,
    outputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """Every attribute's metrics on its labelled samples."""
    result: dict[str, dict[str, Any]] = {}
    for a in cfg.schema.attributes:
        m = masks[a.name].astype(bool)
        o, t = outputs[a.name][m], targets[a.name][m]
        r: dict[str, Any] = {"n": int(m.sum())}
        if r["n"] == 0:
            result[a.name] = r
            continue
        if a.kind == "single":
            pred = o.argmax(-1)
            r |= {
                "accuracy": metrics.accuracy(t, pred),
                "macro_f1": metrics.macro_f1(t, pred, len(a.classes)),
                "top3_accuracy": metrics.topk_accuracy(t, o, 3),
                "calibration_error": metrics.calibration_error(t, o),
            }
        elif a.kind == "multi":
            r |= {"mAP": metrics.multilabel_map(t, o)} | metrics.multilabel_f1(t, o)
        else:
            r |= metrics.shade_stats(t, o)
        result[a.name] = r
    return result


def split_outputs(
    paths: list[str | Path], split: str, config: Config | None = None, *args: Any, **kwargs: Any
) -> tuple[Config, BeautyDataset, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """The models' (averaged) answers on a split of their config's data (or of `config`'s
    data and label sources, which must have the models' attributes and classes; the model's
    own preprocessing is kept): the config used, the dataset, and run_dataset's outputs,
    targets and masks. The other arguments are :func:`answers`'."""
    return answers(paths, split, config, *args, **kwargs)[:5]


def answers(
    paths: list[str | Path],
    split: str,
    config: Config | None = None,
    sources: list[str] | None = None,
    flip_tta: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    shared: bool = False,
) -> tuple[Config, BeautyDataset, dict, dict, dict, dict[str, str]]:
    """:func:`split_outputs`, and with `shared` a `config` whose attributes or classes
    differ from the models': only what both share is measured (:func:`shared_answers`), the
    returned config has that schema, and the last item says, per attribute, what was left
    out and why."""
    from beautytag.config import use_found_datasets

    models, cfg = load_ensemble(paths, device)
    model_schema, not_compared, differ = cfg.schema, {}, False
    if config is None:
        use_found_datasets(cfg)
    else:
        try:
            check_same_outputs(cfg, config)
        except ValueError:
            if not shared:
                raise
            differ = True
        cfg = dataclasses.replace(
            cfg, schema=config.schema, data=config.data, base_dir=config.base_dir
        )
    try:
        samples = read_samples(cfg, splits=[split], sources=sources)
    except SchemaError as e:
        if config is not None or "not found" not in str(e):
            raise
        raise SchemaError(
            f"{e} (the model's data.root, {cfg.data.root!r}, is relative to the folder of the "
            "config it was trained with: run from that folder or pass --config with that file)"
        ) from None
    if not samples:
        raise ValueError(f"no samples in split {split!r} of the configured sources")
    ds = BeautyDataset(samples, cfg)
    outputs, targets, masks = run_dataset(models, ds, batch_size, device, flip_tta)
    if differ:
        schema, not_compared, outputs, targets, masks = shared_answers(
            model_schema, cfg.schema, outputs, targets, masks
        )
        if not schema.attributes:
            raise ValueError(
                "the model and the config share no attribute to measure: "
                + "; ".join(f"{k}: {v}" for k, v in not_compared.items())
            )
        cfg = dataclasses.replace(cfg, schema=schema)
    return cfg, ds, outputs, targets, masks, not_compared


def shared_answers(
    model: Schema,
    data: Schema,
    outputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
) -> tuple[Schema, dict[str, str], dict, dict, dict]:
    """A model's answers and another schema's labels restricted to what both share: the
    attributes of the same name and kind, and of a class attribute the photos labelled with
    a class the model also has (matched by name, in any letter case). The classes of such an
    attribute are the shared ones (the data's names), then the model's others (possible
    answers, always wrong); tags are the shared ones. Returns that schema, what was left
    out and why (per attribute), and the outputs, targets and masks in its terms."""
    attrs, why, outs, tgts, msks = [], {}, {}, {}, {}
    theirs = {a.name: a for a in model.attributes}
    for a in data.attributes:
        m = theirs.get(a.name)
        if m is None:
            why[a.name] = "the model has no such attribute"
            continue
        if m.kind != a.kind:
            why[a.name] = f"a {a.kind} attribute in the config, {m.kind} in the model"
            continue
        out, t, mask = outputs[a.name], targets[a.name], masks[a.name]
        if a.kind == "shade":
            attrs.append(a)
            outs[a.name], tgts[a.name], msks[a.name] = out, t, mask
            continue
        index = {c.casefold(): i for i, c in enumerate(m.classes)}
        common = [c for c in a.classes if c.casefold() in index]
        lacking = [c for c in a.classes if c.casefold() not in index]
        if not common:
            why[a.name] = "no class in common with the model's"
            continue
        if lacking:
            why[a.name] = f"photos of classes the model lacks left out: {', '.join(lacking)}"
        ours = [index[c.casefold()] for c in common]
        rows = [a.classes.index(c) for c in common]
        if a.kind == "multi":  # a photo's labelled tags: the shared ones are still known
            classes, cols, t = common, ours, t[:, rows]
        else:
            rest = [i for i in range(len(m.classes)) if i not in ours]
            classes, cols = common + [m.classes[i] for i in rest], ours + rest
            new = {row: i for i, row in enumerate(rows)}
            mask = mask.astype(bool) & np.isin(t, rows)
            t = np.array([new.get(int(v), 0) for v in t], dtype=t.dtype)
        attrs.append(dataclasses.replace(a, classes=classes))
        outs[a.name], tgts[a.name], msks[a.name] = out[:, cols], t, mask
    for m in model.attributes:
        if m.name not in data.names:
            why[m.name] = "the config does not label it"
    return Schema(attrs), why, outs, tgts, msks


def evaluate(
    checkpoint: str | Path | Sequence[str | Path],
    split: str = "test",
    out_dir: str | Path | None = None,
    config: Config | None = None,
    sources: list[str] | None = None,
    flip_tta: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split of its config's data (or of `config`'s data and label
    sources; the model's own preprocessing is kept). Writes report.json, report.md,
    confusion-matrix PNGs and mistakes.csv (every wrong single-label prediction) when
    `out_dir` is given. Several checkpoints (the same outputs and preprocessing): an
    ensemble, their outputs averaged."""
    paths = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
    cfg, ds, outputs, targets, masks, not_compared = answers(
        paths, split, config, sources, flip_tta, batch_size, device, shared=True
    )
    matrices = confusion_matrices(cfg, outputs, targets, masks)
    classes = {a.name: a.classes for a in cfg.schema.attributes}
    result = {
        "checkpoint": ", ".join(str(p) for p in paths),
        "split": split,
        "sources": sources or [src.name for src in cfg.data.sources],
        "flip_tta": flip_tta,
        "images": len(ds),
        "skipped": ds.errors,
        "metrics": compute_metrics(cfg, outputs, targets, masks),
        "not_compared": not_compared,
        "most_confused": {
            name: metrics.most_confused(cm, classes[name]) for name, cm in matrices.items()
        },
        "per_class": {name: metrics.per_class(cm, classes[name]) for name, cm in matrices.items()},
        "confidence": {
            name: metrics.selective_accuracy(targets[name][m], outputs[name][m])
            for name in matrices
            if (m := masks[name].astype(bool)).any()
        },
    }
    photo_sources = [sample.source for sample in ds.samples]
    if gate := measure_gate(cfg.model.gate, cfg.schema, outputs, targets, masks, photo_sources):
        result["gate"] = gate  # the share of each source's photos the gate rejects
    if out_dir is not None:
        out = Path(out_dir)
        write_report(result, cfg, matrices, out)
        write_mistakes(mistakes(cfg, ds, outputs, targets, masks), out / "mistakes.csv")
    return result


def load_ensemble(
    paths: Sequence[str | Path], device: str | torch.device = "cpu"
) -> tuple[list[BeautyTagNet], Config]:
    """The models of `paths` and the first one's config; a ValueError naming the file if one
    has other outputs or another preprocessing (input size, normalisation) than the first."""
    if not paths:
        raise ValueError("no model to evaluate")
    models, cfgs = [], []
    for path in paths:
        model, cfg, _ = load_checkpoint(path, device)
        models.append(model)
        cfgs.append(cfg)
    first = cfgs[0].model
    for path, cfg in zip(paths[1:], cfgs[1:], strict=True):
        try:
            check_same_outputs(cfgs[0], cfg)
        except ValueError as e:
            raise ValueError(f"{path}: not the same outputs as {paths[0]}: {e}") from None
        ours = (cfg.model.image_size, cfg.model.mean, cfg.model.std)
        if ours != (first.image_size, first.mean, first.std):
            raise ValueError(
                f"{path}: another input size or normalisation than {paths[0]}, so the two "
                "cannot share one batch"
            )
    return models, cfgs[0]


def confusion_matrices(
    cfg: Config,
    outputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The confusion matrix of every single-label attribute that has labelled samples."""
    out = {}
    for a in cfg.schema.attributes:
        m = masks[a.name].astype(bool)
        if a.kind == "single" and m.any():
            pred = outputs[a.name][m].argmax(-1)
            out[a.name] = metrics.confusion_matrix(targets[a.name][m], pred, len(a.classes))
    return out


def mistakes(
    cfg: Config,
    ds: BeautyDataset,
    outputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Every wrong single-label prediction, the most confident first per attribute (a
    confident mistake is often a wrong label)."""
    rows = []
    for a in cfg.schema.attributes:
        if a.kind != "single":
            continue
        wrong = []
        for i, sample in enumerate(ds.samples):
            t, p = int(targets[a.name][i]), int(outputs[a.name][i].argmax())
            if masks[a.name][i] and p != t:
                wrong.append(
                    {
                        "file": str(sample.path),
                        "source": sample.source,
                        "attribute": a.name,
                        "true": a.classes[t],
                        "predicted": a.classes[p],
                        "probability": round(float(outputs[a.name][i][p]), 4),
                        "probability_of_true": round(float(outputs[a.name][i][t]), 4),
                    }
                )
        rows += sorted(wrong, key=lambda r: -r["probability"])
    return rows


MISTAKE_FIELDS = [
    "file",
    "source",
    "attribute",
    "true",
    "predicted",
    "probability",
    "probability_of_true",
]


def write_mistakes(rows: list[dict[str, Any]], path: Path) -> None:
    """:func:`mistakes` as CSV (a header only where there are none)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MISTAKE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def check_same_outputs(model_cfg: Config, data_cfg: Config, ordered: bool = True) -> None:
    """A config goes with a model only if both have the same attributes, kinds and classes
    (and, with `ordered`, in the same order: a model's outputs are a tuple)."""
    ours = {a.name: (a.kind, a.classes) for a in model_cfg.schema.attributes}
    theirs = {a.name: (a.kind, a.classes) for a in data_cfg.schema.attributes}
    differ = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
    if differ:
        raise ValueError(
            f"the config's attributes differ from the model's: {differ} are missing on one "
            "side or differ in kind or classes"
        )
    if ordered and list(ours) != list(theirs):
        raise ValueError(
            "the config's attributes differ from the model's: the same ones in another order "
            f"({list(theirs)} vs {list(ours)})"
        )


def write_report(
    result: dict[str, Any], cfg: Config, matrices: dict[str, np.ndarray], out: Path
) -> None:
    """report.json, report.md (metrics, the most confused classes and each class's recall and
    precision) and a confusion-matrix PNG per single-label attribute."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    flip = "; each photo averaged with its mirror image (test-time flip)"
    lines = [
        f"# Evaluation of `{result['checkpoint']}` on split `{result['split']}`",
        "",
        f"Sources: {', '.join(result['sources'])}; {result['images']} images, "
        f"{len(result['skipped'])} skipped{flip if result['flip_tta'] else ''}.",
        "",
    ]
    if result.get("not_compared"):
        lines += [
            "The config's labels and the model's outputs differ; not measured:",
            "",
            *(f"- {name}: {why}" for name, why in result["not_compared"].items()),
            "",
        ]
    lines += [
        "| attribute | n | metric | value |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in result["metrics"].items():
        for k, v in r.items():
            if k != "n":
                lines.append(f"| {name} | {r['n']} | {k} | {v:.4f} |")
    lines += [
        "",
        "Most confused (each wrong prediction is in mistakes.csv, the most confident first):",
        "",
        "| attribute | true | predicted | count |",
        "| --- | --- | --- | --- |",
    ]
    for name, pairs in result["most_confused"].items():
        lines += [f"| {name} | {p['true']} | {p['predicted']} | {p['count']} |" for p in pairs]
    if not any(result["most_confused"].values()):
        lines.append("| - | no mistakes | - | - |")
    lines += [
        "",
        "Confidence: the answers whose score is at least a threshold (share of the labelled "
        "photos, and how many of those answers are right):",
        "",
        "| attribute | score ≥ | photos | share | accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rows in result["confidence"].items():
        for r in rows:
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            lines.append(f"| {name} | {r['threshold']} | {r['n']} | {r['share']:.3f} | {acc} |")
    if "gate" in result:
        lines += ["", f"Not a cosmetic: {gate_summary(result['gate'])}."]
    for name, rows in result["per_class"].items():
        lines += [
            "",
            f"Per class, {name} (n: true photos of the class; the weakest recall first):",
            "",
            "| class | n | correct | recall | precision | F1 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(rows, key=lambda r: (r["n"] == 0, r["recall"] or 0.0, -r["n"])):
            cells = ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("recall", "precision", "f1")]
            lines.append(f"| {r['class']} | {r['n']} | {r['correct']} | {' | '.join(cells)} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for a in cfg.schema.attributes:
        if a.name in matrices:
            metrics.save_confusion_png(
                matrices[a.name],
                a.classes,
                out / f"confusion_{a.name}.png",
                title=f"{a.name} ({result['split']})",
            )
