"""Shared fixtures: the real, verified datasets (fetched once per session) and small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from study.config import Config
from study.data import DATASETS, fetch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VAE_DATA_ROOT", REPO / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The repository's data/ with both datasets present and verified (fetched if needed)."""
    for name in DATASETS:
        fetch(name, DATA_ROOT, log=lambda *_: None)
    return DATA_ROOT


@pytest.fixture
def tiny_config(data_root) -> Config:
    """A real MNIST subset, two epochs: seconds on the CPU."""
    return Config(
        data_root=str(data_root), train_subset=2000, val_size=500, test_subset=300,
        epochs=2, batch_size=100, test_iw_k=20, device="cpu",
    )
