"""Shared fixtures. Tests that need the real photos skip with a clear message without them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
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
