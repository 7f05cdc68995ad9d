"""Training: transfer learning in two phases, multi-task loss, early stopping, resumable.

Phase 1 (``freeze_epochs``): the pretrained backbone is frozen; heads and attention learn.
Phase 2: everything trains, the backbone at ``lr * backbone_lr_mult``. AdamW with a
cosine schedule (one warm-up epoch) over all epochs. The best epoch by ``monitor`` on the
validation split is kept as ``best.pt``; ``last.pt`` allows ``--resume``. With
``ema_decay`` > 0, an exponential moving average of the weights (timm's ModelEmaV3, its
decay warmed up from 0) is what is validated and kept. With ``distill_from``, a frozen
teacher model's outputs (or the mean of several teachers') are a second target (knowledge
distillation, losses.distillation_loss). With ``cutmix``, that share of the batches is
mixed by CutMix (data.cutmix_batch), each photo's loss weighing its own and the pasted box's
labels by their areas.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from beautytag.config import Config, config_from_dict
from beautytag.data import (
    BeautyDataset,
    augment_batch,
    classes_without_photos,
    cutmix_batch,
    in_several_splits,
    read_samples,
    summarise,
)
from beautytag.engine import resolve_model
from beautytag.evaluate import check_same_outputs, compute_metrics, run_dataset
from beautytag.images import normalize
from beautytag.losses import MultiTaskLoss, distillation_loss
from beautytag.model import (
    BeautyTagNet,
    init_from_checkpoint,
    load_checkpoint,
    mismatch,
    save_checkpoint,
)

LOWER_IS_BETTER = ("loss", "median_de2000", "mean_de2000")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def limit_cpu_threads(cap: int = 4) -> int:
    """Cap PyTorch's CPU threads at `cap` (unless OMP_NUM_THREADS is set) and return the
    number in use. Training on a GPU leaves the CPU only batch collation, and many threads per
    process starve each other: two trainings at once on a 16-core H200 machine ran at 118
    images/s each with 16 threads; three with 4 threads each at about 1,450-1,530 (Table B's
    B3-B5 in benchmarks/results/accuracy.md)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(cap, torch.get_num_threads())))
    return torch.get_num_threads()


def class_weights(ds: BeautyDataset, cfg: Config) -> dict[str, torch.Tensor]:
    """Inverse square-root class frequency for each single-label attribute (mean 1)."""
    out = {}
    for a in cfg.schema.attributes:
        if a.kind != "single":
            continue
        counts = ds.label_counts(a)
        w = torch.tensor([(counts.get(c, 0) + 1) ** -0.5 for c in a.classes])
        out[a.name] = w / w.mean()
    return out


def make_loader(ds: BeautyDataset, cfg: Config, generator: torch.Generator) -> DataLoader:
    sampler = None
    if cfg.train.balance == "sampler":
        attr = cfg.schema[cfg.train.balance_attribute]
        w = ds.sample_weights(attr) ** 0.5  # square-root balancing: rare classes, not repeats
        sampler = WeightedRandomSampler(w, num_samples=len(ds), generator=generator)
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.train.workers,
        drop_last=len(ds) > max(64, cfg.train.batch_size),  # never every batch
        generator=generator,
        # workers start afresh each epoch, seeded from `generator`: a resumed run draws what
        # the uninterrupted one did (persistent workers drew their seed in the first epoch)
        persistent_workers=False,
    )


def logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line (inf for a line cut off mid-write)."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def monitor_value(cfg: Config, val_loss: float, val_metrics: dict[str, dict]) -> float:
    """The validation number that early stopping follows, as 'higher is better'."""
    if cfg.train.monitor == "loss":
        return -val_loss
    attr, _, metric = cfg.train.monitor.partition(".")
    if metric not in val_metrics[attr]:
        raise ValueError(f"train.monitor is {cfg.train.monitor} but no validation photo has {attr}")
    value = val_metrics[attr][metric]
    return -value if metric in LOWER_IS_BETTER else value


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def finished(cfg: Config, epochs_done: int, bad_epochs: int) -> bool:
    """Whether training stops after `epochs_done` epochs: all run, or stopped early."""
    return epochs_done >= cfg.train.epochs or bad_epochs >= cfg.train.patience


def set_backbone_trainable(model: BeautyTagNet, trainable: bool) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)


Teacher = tuple[BeautyTagNet, int]  # a frozen model and its input size


def load_teachers(cfg: Config, device: torch.device) -> list[Teacher]:
    """The frozen models that ``train.distill_from`` names (none without one), each with its
    input size; each must predict the same attributes and classes and normalise its input
    the same way."""
    teachers = []
    for name in cfg.train.teachers:
        try:
            path = resolve_model(name)
            teacher, teacher_cfg, _ = load_checkpoint(path, device)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"train.distill_from: {e}") from None
        try:
            check_same_outputs(teacher_cfg, cfg, ordered=False)  # outputs are read by name
        except ValueError as e:
            raise ValueError(f"{path}: cannot teach this model: {e}") from None
        if (teacher_cfg.model.mean, teacher_cfg.model.std) != (cfg.model.mean, cfg.model.std):
            raise ValueError(f"{path}: cannot teach this model: its input mean / std differ")
        teachers.append((teacher.requires_grad_(False), teacher_cfg.model.image_size))
    return teachers


def teach(teachers: list[Teacher], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teachers' raw outputs for a normalised batch, each teacher's input resized to its
    size (the letterboxed square scales as a whole), averaged over the teachers (for
    classes: mean logits, a geometric mean of their probabilities)."""
    outputs = []
    for teacher, size in teachers:
        xs = x
        if x.shape[-1] != size:
            xs = F.interpolate(x, size=(size, size), mode="bilinear", antialias=size < x.shape[-1])
        with torch.no_grad():
            outputs.append(teacher(xs))
    return {k: torch.stack([o[k] for o in outputs]).mean(0) for k in outputs[0]}


@torch.no_grad()
def validate(
    model: BeautyTagNet,
    ds: BeautyDataset,
    cfg: Config,
    criterion: MultiTaskLoss,
    device: torch.device,
) -> tuple[float, dict[str, dict]]:
    """Validation loss (fixed lambdas, whatever the training weighting) and metrics."""
    outputs, targets, masks = run_dataset(model, ds, device=device)
    metrics = compute_metrics(cfg, outputs, targets, masks)
    loss = 0.0
    for a in cfg.schema.attributes:
        # on the criterion's device: its class weights live there
        m = torch.from_numpy(masks[a.name]).bool().to(device)
        o = torch.from_numpy(outputs[a.name]).to(device)
        if a.kind == "single":
            o = torch.log(o.clamp_min(1e-8))  # log-probabilities work as logits here
        elif a.kind == "multi":
            o = torch.logit(o.clamp(1e-6, 1 - 1e-6))
        t = torch.from_numpy(targets[a.name]).to(device)
        part = criterion.task_loss(a.name, a.kind, o, t, m)
        if part is not None:
            loss += a.weight * float(part)
    return loss, metrics


def config_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The settings ("section.key", or a whole section that is not a mapping) in which `cfg`
    differs from the config saved in a checkpoint."""
    old, new = config_from_dict(saved).to_dict(), cfg.to_dict()
    changed = []
    for section, value in new.items():
        if isinstance(value, dict):
            changed += [f"{section}.{k}" for k in value if value[k] != old[section].get(k)]
        elif value != old.get(section):
            changed.append(section)
    return changed


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a model as the config says; returns the checkpoints' paths and ``seconds``, the
    wall time of the whole training (every sitting, when resumed)."""
    started = time.time()
    seed_everything(cfg.train.seed)
    device = pick_device()
    if device.type == "cuda":
        limit_cpu_threads()
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teachers = load_teachers(cfg, device)  # before the photos: a wrong teacher fails at once
    samples = read_samples(cfg, splits=("train", "val"))
    counts = summarise(samples, cfg.schema)
    print(f"data: {json.dumps({k: counts[k] for k in ('train', 'val')})}")
    training = [s for s in samples if s.split == "train"]
    for name, classes in classes_without_photos(training, cfg.schema).items():
        print(
            f"warning: {name} classes with no training photo (a typo in the config, or "
            f"labels.csv?): {', '.join(classes)}"
        )
    if shared := in_several_splits(samples):
        print(
            "warning: photos in both the training and the validation split (listed twice in "
            f"labels.csv?), which flatter validation: {len(shared)}, e.g. {shared[0]}"
        )
    train_ds = BeautyDataset(training, cfg)
    val_ds = BeautyDataset([s for s in samples if s.split == "val"], cfg)
    for split, ds in (("training", train_ds), ("validation", val_ds)):
        if len(ds) == 0:
            raise ValueError(
                f"no {split} images: check data.root, the sources' filters and their splits "
                "(a split_column's values must be train / val / test; split_by hashes a column "
                "into val_fraction and test_fraction)"
            )

    model = BeautyTagNet(cfg)
    if cfg.model.init:
        fresh = init_from_checkpoint(model, resolve_model(cfg.model.init))
        new = ", ".join(fresh[:8]) + (f" and {len(fresh) - 8} more" if len(fresh) > 8 else "")
        print(f"started from {cfg.model.init}; new: {new or 'nothing'}")
    model = model.to(device)
    use_amp = device.type == "cuda" and cfg.train.amp
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    criterion = MultiTaskLoss(
        cfg.schema,
        cfg.train.loss_weighting,
        cfg.train.label_smoothing,
        class_weights(train_ds, cfg) if cfg.train.balance == "weights" else None,
    ).to(device)
    backbone = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in backbone_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone, "lr": cfg.train.lr * cfg.train.backbone_lr_mult},
            {"params": rest + list(criterion.parameters()), "lr": cfg.train.lr},
        ],
        weight_decay=cfg.train.weight_decay,
    )
    ema = None
    if cfg.train.ema_decay > 0:
        # the decay warms up (0.97 after 100 steps, 0.99 after 500), capped at ema_decay
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True, warmup_power=0.75)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = make_loader(train_ds, cfg, generator)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps * cfg.train.epochs, steps)
    )

    start_epoch, best, bad_epochs, elapsed = 0, -math.inf, 0, 0.0
    if resume and not (out / "last.pt").is_file():
        print(f"warning: nothing to resume in {out} (no last.pt): training from the start")
        resume = False
    if resume:
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(
                f"{out / 'last.pt'}: cannot resume, its model differs from this config's "
                f"({mismatch(e)}); train without --resume or into another --out"
            ) from None
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(state.get("ema") or state["model"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        elapsed = state.get("elapsed", 0.0)  # the earlier sittings' wall time
        if changed := config_changes(state["config"], cfg):
            print(f"warning: resuming with settings changed since {out / 'last.pt'}: {changed}")
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch + 1}")
    log_path = out / "metrics.jsonl"
    if log_path.exists() and not resume:
        log_path.unlink()
    elif log_path.exists():  # an epoch logged but interrupted before last.pt is redone
        lines = log_path.read_text().splitlines(keepends=True)
        log_path.write_text("".join(x for x in lines if logged_epoch(x) <= start_epoch))

    for epoch in range(start_epoch, cfg.train.epochs):
        if finished(cfg, epoch, bad_epochs):
            break
        frozen = epoch < cfg.train.freeze_epochs
        set_backbone_trainable(model, not frozen)
        model.train()
        if frozen:
            model.backbone.eval()  # keep pretrained BatchNorm statistics while frozen
        t0, seen, total_loss = time.time(), 0, 0.0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}" + (" (frozen)" * frozen),
            disable=not progress,
            mininterval=1.0,
            leave=False,
        )
        for x, targets, masks in bar:
            x = x.to(device, non_blocking=True)
            if cfg.data.augment:
                x = augment_batch(x)
            perm = None  # with CutMix: which photo of the batch each photo's box came from
            if cfg.train.cutmix > 0 and float(torch.rand(1)) < cfg.train.cutmix:
                x, perm, lam = cutmix_batch(x)
            x = normalize(x, cfg.model.mean, cfg.model.std)
            if use_amp:
                x = x.contiguous(memory_format=torch.channels_last)
            targets = {k: v.to(device) for k, v in targets.items()}
            masks = {k: v.to(device) for k, v in masks.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = model(x)
                soft = teach(teachers, x) if teachers else None
            if perm is None:
                loss, parts = criterion(outputs, targets, masks)
            else:
                both = cfg.train.cutmix_labels == "both"
                loss, parts = criterion.mixed(outputs, targets, masks, perm, lam, both)
            if soft is not None:  # the teachers saw the same (mixed) photos
                kd = distillation_loss(cfg.schema, outputs, soft, cfg.train.distill_temperature)
                loss = (1 - cfg.train.distill_weight) * loss + cfg.train.distill_weight * kd
                parts["distill"] = float(kd.detach())
            if not loss.requires_grad:  # no photo of the batch is labelled, and no teacher
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model, step=scheduler.last_epoch)  # last_epoch counts steps
            seen += len(x)
            total_loss += float(loss.detach()) * len(x)
            bar.set_postfix(
                loss=f"{total_loss / seen:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}
            )
        train_time = time.time() - t0
        kept = model if ema is None else ema.module
        val_loss, val_metrics = validate(kept, val_ds, cfg, criterion, device)
        score = monitor_value(cfg, val_loss, val_metrics)
        improved = math.isfinite(score) and score > best  # a NaN never replaces a model
        if improved:
            best, bad_epochs = score, 0
            save_checkpoint(out / "best.pt", kept, cfg, {"epoch": epoch, "val": val_metrics})
        else:
            bad_epochs += 1
        record = {
            "epoch": epoch + 1,
            "frozen": frozen,
            "train_loss": total_loss / max(1, seen),
            "val_loss": val_loss,
            "val": val_metrics,
            "task_weights": criterion.task_weights(),
            "lr": scheduler.get_last_lr(),
            "images_per_s": seen / train_time,
            "seconds": train_time,
            "best": improved,
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(summary_line(record))
        save_checkpoint(
            out / "last.pt",
            model,
            cfg,
            {
                "epoch": epoch,
                "best": best,
                "bad_epochs": bad_epochs,
                "criterion": criterion.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "ema": None if ema is None else ema.module.state_dict(),
                "elapsed": elapsed + time.time() - started,
            },
        )
    if not math.isfinite(best):  # no epoch of this run (or of the run resumed) saved best.pt
        earlier = " (the best.pt there is an earlier run's)" if (out / "best.pt").exists() else ""
        raise ValueError(
            f"{out}: no epoch gave a finite validation {cfg.train.monitor} (the training "
            f"diverged? try a lower train.lr), so this run wrote no best.pt{earlier}; see "
            f"{log_path}"
        )
    return {
        "seconds": round(elapsed + time.time() - started, 1),
        "best": str(out / "best.pt"),
        "last": str(out / "last.pt"),
        "log": str(log_path),
        "skipped": train_ds.errors + val_ds.errors,
    }


def summary_line(record: dict[str, Any]) -> str:
    """One readable line per epoch: loss, then each attribute's main validation metric."""
    keys = ("accuracy", "mAP", "median_de2000")
    parts = [
        f"epoch {record['epoch']}",
        f"train loss {record['train_loss']:.3f}",
        f"val loss {record['val_loss']:.3f}",
    ]
    for name, r in record["val"].items():
        for k in keys:
            if k in r:
                parts.append(f"{name} {k} {r[k]:.3f}")
    parts.append(f"{record['images_per_s']:.0f} img/s" + ("  *" if record["best"] else ""))
    return " | ".join(parts)
