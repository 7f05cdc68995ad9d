"""Fine-tuning a model: what a run keeps of its starting model (``model.init``,
``model.keep_attributes``)."""

from __future__ import annotations

from beautytag.checkpoint import keep_start_attributes
from beautytag.config import Config


def with_start_attributes(cfg: Config) -> tuple[Config, list[str]]:
    """`cfg` with its starting model's other attributes (checkpoint.keep_start_attributes),
    saying which, and warning of model settings that differ from the starting model's; and
    the names of those attributes."""
    cfg, kept, warnings = keep_start_attributes(cfg)
    if kept:
        print(f"kept from {cfg.model.init}: {', '.join(kept)} (model.keep_attributes)")
    for warning in warnings:
        print(f"warning: {warning}")
    return cfg, kept


def warn_untrained(cfg: Config, fresh: list[str]) -> None:
    """Warn of heads that did not load from the starting model (init_from_checkpoint's
    `fresh` tensors) while no source labels their attribute: they would stay untrained."""
    unlabelled = [a.name for a in cfg.schema.attributes if not a.sources]
    if lost := [n for n in unlabelled if any(k.startswith(f"heads.{n}.") for k in fresh)]:
        print(
            f"warning: the heads of {', '.join(lost)} did not load from {cfg.model.init} "
            "(other model settings?) and no source labels them: they stay untrained"
        )
