"""Shared fixtures: the real, verified datasets (fetched once per session), small configs, a
headless Chromium, and `paused`, for acting on a running study process at a moment it cannot
move past."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from study.config import Config
from study.data import DATASETS, fetch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VAE_DATA_ROOT", REPO / "data"))
# Playwright cannot download its own browsers here: it drives Debian's
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]
BROWSER_TIMEOUT_MS = 120_000  # generous: the machine may be small and busy


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


@contextlib.contextmanager
def chromium():
    """A headless Chromium (a throwaway profile) driven by Playwright's sync API."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) "
                    "to run the browser tests", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             timeout=BROWSER_TIMEOUT_MS)
        with contextlib.closing(browser):
            yield browser


@pytest.fixture(scope="module")
def browser():
    """One Chromium for a module's browser tests. Not per session: while Playwright's sync API
    runs, its event loop is the thread's running loop, which asyncio.run() and a second
    sync_playwright() refuse."""
    with chromium() as browser:
        yield browser


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
