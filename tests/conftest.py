"""Shared fixtures: the real, verified datasets (fetched once per session) and small configs;
and `paused`, for acting on a running study process at a moment it cannot move past."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
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


def _stopped(task: Path) -> bool:
    """Whether thread `task` (/proc/PID/task/TID) is stopped, or gone."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tTZX"
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def paused(proc: subprocess.Popen):
    """The process group of `proc` stopped (SIGSTOP) for the block, once every thread of `proc`
    has stopped, so that nothing it does can move between reading its state and acting on
    it; continued (SIGCONT) afterwards, unless the block killed it. Linux only (/proc)."""
    os.killpg(proc.pid, signal.SIGSTOP)
    while not all(_stopped(task) for task in Path(f"/proc/{proc.pid}/task").iterdir()):
        time.sleep(0.001)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
