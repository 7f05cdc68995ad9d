"""The joint multi-task loss L = sum_i w_i L_i over attributes, each masked to the samples
that are labelled for it.

* ``single`` - cross-entropy (optional label smoothing and class weights),
* ``multi``  - binary cross-entropy over the tags,
* ``shade``  - Charbonnier loss on the CIELAB distance, sqrt(dE76^2 + 1) - 1, divided by 10
  so that a 10-unit error costs about 1 (robust to the odd badly-measured shade).

Weights are either the schema's fixed lambdas, or learned by uncertainty weighting
(Kendall, Gal & Cipolla 2018): L = sum_i exp(-s_i) L_i + s_i, with s_i = log sigma_i^2
kept inside (-LOGVAR_LIMIT, LOGVAR_LIMIT) so a task cannot be switched off entirely: s_i =
LOGVAR_LIMIT tanh(r_i / LOGVAR_LIMIT) of a learned r_i, smooth, so that a task whose loss
fell very low can come back (a clamp has no gradient past its bounds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beautytag.schema import Schema

LOGVAR_LIMIT = 4.0
SHADE_SCALE = 10.0


def bounded(log_var: torch.Tensor) -> torch.Tensor:
    """A learned log-variance kept smoothly inside (-LOGVAR_LIMIT, LOGVAR_LIMIT)."""
    return LOGVAR_LIMIT * torch.tanh(log_var / LOGVAR_LIMIT)


def shade_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample robust loss on CIELAB distance."""
    d2 = ((pred.float() - target.float()) ** 2).sum(-1)
    return (torch.sqrt(d2 + 1.0) - 1.0) / SHADE_SCALE


class MultiTaskLoss(nn.Module):
    def __init__(
        self,
        schema: Schema,
        weighting: str = "fixed",
        label_smoothing: float = 0.0,
        class_weights: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"unknown loss weighting {weighting!r}")
        self.schema = schema
        self.weighting = weighting
        self.label_smoothing = label_smoothing
        for name, w in (class_weights or {}).items():
            self.register_buffer(f"cw_{name}", w.float())
        self.log_vars = (
            nn.ParameterDict({a.name: nn.Parameter(torch.zeros(())) for a in schema.attributes})
            if weighting == "uncertainty"
            else None
        )

    def task_loss(
        self, name: str, kind: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Mean loss over the labelled samples of one attribute (None when none is labelled)."""
        if not mask.any():
            return None
        pred, target = pred[mask], target[mask]
        if kind == "single":
            return F.cross_entropy(
                pred.float(),
                target,
                weight=getattr(self, f"cw_{name}", None),
                label_smoothing=self.label_smoothing,
            )
        if kind == "multi":
            return F.binary_cross_entropy_with_logits(pred.float(), target.float())
        return shade_loss(pred, target).mean()

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and each task's unweighted loss (for logging)."""
        total = next(iter(outputs.values())).new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        for a in self.schema.attributes:
            loss = self.task_loss(a.name, a.kind, outputs[a.name], targets[a.name], masks[a.name])
            if loss is None:
                continue
            parts[a.name] = float(loss.detach())
            if self.log_vars is not None:
                s = bounded(self.log_vars[a.name])
                total = total + torch.exp(-s) * loss + s
            else:
                total = total + a.weight * loss
        return total, parts

    def mixed(
        self,
        outputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        perm: torch.Tensor,
        lam: float,
        both: bool = False,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CutMix's loss: towards each photo's own labels, weighing `lam`, and towards those of
        photo `perm[i]`, whose box was pasted in, weighing its area `1 - lam`, each where it
        is known; with `both`, an attribute of a mixed photo counts only where both photos
        have its label."""
        own, box = masks, {k: v[perm] for k, v in masks.items()}
        if both:
            own = box = {k: v & v[perm] for k, v in masks.items()}
        loss, parts = self(outputs, targets, own)
        other = self(outputs, {k: v[perm] for k, v in targets.items()}, box)[0]
        return lam * loss + (1 - lam) * other, parts

    def task_weights(self) -> dict[str, float]:
        """The weight each task currently gets (lambda, or exp(-s) when learned)."""
        if self.log_vars is None:
            return {a.name: a.weight for a in self.schema.attributes}
        return {k: float(torch.exp(-bounded(v.detach()))) for k, v in self.log_vars.items()}


def distillation_loss(
    schema: Schema,
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015): every output pulled towards the
    teacher's on every sample, labelled or not, weighted by the schema's lambdas. Classes:
    T^2 KL(teacher || student) of the softmax at temperature T; tags: binary cross-entropy
    to the teacher's probabilities; shades: the shade loss to the teacher's Lab."""
    total = next(iter(student.values())).new_zeros((), dtype=torch.float32)
    for a in schema.attributes:
        s, t = student[a.name].float(), teacher[a.name].float()
        if a.kind == "single":
            loss = (
                F.kl_div(
                    F.log_softmax(s / temperature, -1),
                    F.log_softmax(t / temperature, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                * temperature**2
            )
        elif a.kind == "multi":
            loss = F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))
        else:
            loss = shade_loss(s, t).mean()
        total = total + a.weight * loss
    return total
