"""Shared fixtures. Tests that need the real photos skip with a clear message without them."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())


@pytest.fixture
def raw_config() -> dict:
    """The default config as a mapping, pointing at ../shared/datasets."""
    raw = copy.deepcopy(default_raw())
    raw["data"]["root"] = str(DATASETS)
    return raw


@pytest.fixture
def datasets() -> Path:
    if not (DATASETS / "fashion-products-small" / "labels.csv").is_file():
        pytest.skip(
            f"real datasets not found at {DATASETS} (place ../shared/datasets beside "
            "the repository to run this test)"
        )
    return DATASETS


def make_tiny_model(path: Path, model: dict | None = None, cosmetic: float = 0.99, **data) -> Path:
    """A randomly initialised default-schema model at 64 px (fast): for tests of formats and
    plumbing, not accuracy. `model` and `data` override keys of those config sections. Its
    gate (model.gate) sees every photo with P(accepted class) = `cosmetic` (a cosmetic by
    default: the gate lets every photo through at the default threshold)."""
    from beautytag.checkpoint import save_checkpoint
    from beautytag.config import config_from_dict
    from beautytag.nn.net import BeautyTagNet

    raw = copy.deepcopy(default_raw())
    raw["data"] |= {"root": str(DATASETS), **data}
    raw["model"] |= {"image_size": 64, **(model or {})}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    net = BeautyTagNet(cfg, pretrained=False)
    if gate := cfg.model.gate:
        classes = cfg.schema[gate["attribute"]].classes
        head = net.heads[gate["attribute"]]  # a constant: softmax gives `cosmetic`
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            odds = cosmetic * (len(classes) - 1) / (1 - cosmetic)
            head.bias[classes.index(gate["accept"])] = math.log(odds)
    save_checkpoint(path, net, cfg)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")
