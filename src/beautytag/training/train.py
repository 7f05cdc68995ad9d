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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from beautytag.checkpoint import (
    init_from_checkpoint,
    mismatch,
    read_checkpoint,
    resolve_model,
    save_checkpoint,
)
from beautytag.config import Config, config_from_dict
from beautytag.data import (
    BeautyDataset,
    classes_without_photos,
    cutmix_batch,
    in_several_splits,
    read_samples,
    summarise,
)
from beautytag.images import normalize
from beautytag.nn.losses import MultiTaskLoss, distillation_loss
from beautytag.nn.net import BeautyTagNet
from beautytag.training.augment import BatchAugment
from beautytag.training.distill import Teacher, load_teachers, teach
from beautytag.training.evaluate import compute_metrics, run_dataset
from beautytag.training.fine_tune import after_training, warn_untrained, with_start_attributes

LOWER_IS_BETTER = ("loss", "median_de2000", "mean_de2000")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """The device :func:`train` trains on: the GPU where CUDA has one, else the CPU."""
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


def read_datasets(cfg: Config) -> tuple[BeautyDataset, BeautyDataset]:
    """The training and validation photos, with warnings for what looks like a mistake in the
    config or labels.csv; ValueError when a split has no photo."""
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
    train_ds = BeautyDataset(training, cfg, train=True)
    val_ds = BeautyDataset([s for s in samples if s.split == "val"], cfg)
    for split, ds in (("training", train_ds), ("validation", val_ds)):
        if len(ds) == 0:
            raise ValueError(
                f"no {split} images: check data.root, the sources' filters and their splits "
                "(a split_column's values must be train / val / test; split_by hashes a column "
                "into val_fraction and test_fraction)"
            )
    return train_ds, val_ds


@dataclass
class Run:
    """What a training run carries from epoch to epoch (all of it saved in ``last.pt``)."""

    model: BeautyTagNet
    criterion: MultiTaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEmaV3 | None
    generator: torch.Generator
    loader: DataLoader
    use_amp: bool
    augment: BatchAugment  # compositing, geometry, down-up-scaling (training.augment)
    epoch: int = 0  # the next epoch to run (0-based)
    best: float = -math.inf  # the best monitored score so far ('higher is better')
    bad_epochs: int = 0  # epochs since the best
    elapsed: float = 0.0  # wall time of earlier sittings (a resumed run)

    @property
    def kept(self) -> BeautyTagNet:
        """The model that is validated and saved as best.pt (the EMA when there is one)."""
        return self.model if self.ema is None else self.ema.module


def build_run(cfg: Config, train_ds: BeautyDataset, device: torch.device) -> Run:
    """The model (from ``model.init`` if set), loss, AdamW with the backbone's own learning
    rate, EMA, and the loader with its seeded generator and cosine schedule."""
    model = BeautyTagNet(cfg)
    if cfg.model.init:
        fresh = init_from_checkpoint(model, resolve_model(cfg.model.init))
        new = ", ".join(fresh[:8]) + (f" and {len(fresh) - 8} more" if len(fresh) > 8 else "")
        print(f"started from {cfg.model.init}; new: {new or 'nothing'}")
        warn_untrained(cfg, fresh)
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
    augment = BatchAugment(cfg, train_ds, device)
    return Run(model, criterion, optimizer, scheduler, ema, generator, loader, use_amp, augment)


# what save_last writes and resume_run reads
RESUME_KEYS = ("model", "config", "criterion", "optimizer", "scheduler", "generator")
RESUME_KEYS += ("torch_rng", "epoch", "best", "bad_epochs")


def resume_run(run: Run, last: Path, cfg: Config) -> None:
    """Continue ``run`` from ``last`` (a ``last.pt``): weights, optimiser, schedule, random
    state and early-stopping counters. ValueError when its model differs from the config's."""
    state = read_checkpoint(last)
    if missing := [k for k in RESUME_KEYS if k not in state]:
        raise ValueError(f"{last}: not a last.pt that `beautytag train` writes (no {missing[0]})")
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{last}: cannot resume, its model differs from this config's "
            f"({mismatch(e)}); train without --resume or into another --out"
        ) from None
    run.criterion.load_state_dict(state["criterion"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.module.load_state_dict(state.get("ema") or state["model"])
    run.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    run.epoch, run.best, run.bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
    run.elapsed = state.get("elapsed", 0.0)  # the earlier sittings' wall time
    if changed := config_changes(state["config"], cfg):
        print(f"warning: resuming with settings changed since {last}: {changed}")
    print(f"resumed from {last} at epoch {run.epoch + 1}")


def save_last(run: Run, last: Path, cfg: Config, epoch: int, seconds: float) -> None:
    """Write everything :func:`resume_run` needs to go on after ``epoch``."""
    save_checkpoint(
        last,
        run.model,
        cfg,
        {
            "epoch": epoch,
            "best": run.best,
            "bad_epochs": run.bad_epochs,
            "criterion": run.criterion.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "generator": run.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema": None if run.ema is None else run.ema.module.state_dict(),
            "elapsed": seconds,
        },
    )


def train_one_epoch(
    run: Run,
    cfg: Config,
    device: torch.device,
    teachers: list[Teacher],
    epoch: int,
    progress: bool = True,
) -> tuple[int, float, bool]:
    """One pass over the training photos (augmented, CutMix'd, distilled as the config
    says). Returns the photos seen, their summed loss, and whether the backbone was frozen."""
    model, criterion = run.model, run.criterion
    frozen = epoch < cfg.train.freeze_epochs
    set_backbone_trainable(model, not frozen)
    model.train()
    if frozen:
        model.backbone.eval()  # keep pretrained BatchNorm statistics while frozen
    seen, total_loss = 0, 0.0
    bar = tqdm(
        run.loader,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}" + (" (frozen)" * frozen),
        disable=not progress,
        mininterval=1.0,
        leave=False,
    )
    for x, targets, masks, extra in bar:
        x = run.augment(x.to(device, non_blocking=True), extra)
        perm = None  # with CutMix: which photo of the batch each photo's box came from
        if cfg.train.cutmix > 0 and float(torch.rand(1)) < cfg.train.cutmix:
            x, perm, lam = cutmix_batch(x)
        x = normalize(x, cfg.model.mean, cfg.model.std)
        if run.use_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device) for k, v in targets.items()}
        masks = {k: v.to(device) for k, v in masks.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_amp):
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
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update(model, step=run.scheduler.last_epoch)  # last_epoch counts steps
        seen += len(x)
        total_loss += float(loss.detach()) * len(x)
        bar.set_postfix(
            loss=f"{total_loss / seen:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}
        )
    return seen, total_loss, frozen


def trim_log(log_path: Path, resumed_at: int | None) -> None:
    """A fresh run starts a new metrics.jsonl; a resumed one drops the epochs it redoes (one
    logged but interrupted before last.pt was written)."""
    if not log_path.exists():
        return
    if resumed_at is None:
        log_path.unlink()
        return
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(x for x in lines if logged_epoch(x) <= resumed_at))


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
    cfg, kept = with_start_attributes(cfg)
    teachers = load_teachers(cfg, device)  # before the photos: a wrong teacher fails at once
    train_ds, val_ds = read_datasets(cfg)
    run = build_run(cfg, train_ds, device)
    if resume and not (out / "last.pt").is_file():
        print(f"warning: nothing to resume in {out} (no last.pt): training from the start")
        resume = False
    if resume:
        resume_run(run, out / "last.pt", cfg)
    log_path = out / "metrics.jsonl"
    trim_log(log_path, run.epoch if resume else None)

    for epoch in range(run.epoch, cfg.train.epochs):
        if finished(cfg, epoch, run.bad_epochs):
            break
        t0 = time.time()
        seen, total_loss, frozen = train_one_epoch(run, cfg, device, teachers, epoch, progress)
        train_time = time.time() - t0
        val_loss, val_metrics = validate(run.kept, val_ds, cfg, run.criterion, device)
        score = monitor_value(cfg, val_loss, val_metrics)
        improved = math.isfinite(score) and score > run.best  # a NaN never replaces a model
        if improved:
            run.best, run.bad_epochs = score, 0
            save_checkpoint(out / "best.pt", run.kept, cfg, {"epoch": epoch, "val": val_metrics})
        else:
            run.bad_epochs += 1
        record = {
            "epoch": epoch + 1,
            "frozen": frozen,
            "train_loss": total_loss / max(1, seen),
            "val_loss": val_loss,
            "val": val_metrics,
            "task_weights": run.criterion.task_weights(),
            "lr": run.scheduler.get_last_lr(),
            "images_per_s": seen / train_time,
            "seconds": train_time,
            "best": improved,
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(summary_line(record))
        save_last(run, out / "last.pt", cfg, epoch, run.elapsed + time.time() - started)
    if not math.isfinite(run.best):  # no epoch of this run (or of the run resumed) saved best.pt
        earlier = " (the best.pt there is an earlier run's)" if (out / "best.pt").exists() else ""
        raise ValueError(
            f"{out}: no epoch gave a finite validation {cfg.train.monitor} (the training "
            f"diverged? try a lower train.lr), so this run wrote no best.pt{earlier}; see "
            f"{log_path}"
        )
    return {
        "seconds": round(run.elapsed + time.time() - started, 1),
        "best": str(out / "best.pt"),
        "last": str(out / "last.pt"),
        "log": str(log_path),
        "skipped": train_ds.errors + val_ds.errors,
    } | after_training(out, cfg, str(device), kept)


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
