"""Knowledge distillation: frozen teacher models whose outputs are a second training target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from beautytag.checkpoint import load_checkpoint, resolve_model
from beautytag.config import Config
from beautytag.nn.net import BeautyTagNet
from beautytag.training.evaluate import check_same_outputs

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
