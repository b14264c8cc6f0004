"""Shared fixtures: the real, verified datasets (fetched once per session), small configs, a
headless Chromium, studies run once per session on real stores (the end-to-end study, a
finished three-point study to copy), and a throwaway PostgreSQL cluster. Plain helpers are
in helpers.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from helpers import (
    DEADLINE_S,
    PG_PASSWORD,
    PG_USER,
    TINY,
    free_port,
    load,
    run_args,
    run_runner,
    run_study,
    three_betas,
    write_spec,
)
from playwright.sync_api import sync_playwright

from study.config import Config
from study.data import DATASETS, fetch, load_splits

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
def data_env(data_root, monkeypatch) -> Path:
    """VAE_DATA_ROOT pointing at the verified data, for runs in this process and its children."""
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    return data_root


@pytest.fixture
def tiny_config(data_root) -> Config:
    """A real MNIST subset, two epochs: seconds on the CPU."""
    return Config(
        data_root=str(data_root), train_subset=2000, val_size=500, test_subset=300,
        epochs=2, batch_size=100, test_iw_k=20, device="cpu",
    )


@pytest.fixture(scope="session")
def mnist_test(data_root):
    """The first 1000 official MNIST test images, grey, (N, 1, 28, 28)."""
    return load_splits("mnist", data_root, test_subset=1000).test


@pytest.fixture
def fresh_stores(tmp_path) -> dict:
    """SQLite stores in a folder that does not exist yet: a refused command must leave it so."""
    folder = tmp_path / "stores"
    return {"folder": folder, "args": ["--storage", f"sqlite:///{folder}/optuna.db",
                                       "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]}


# --------------------------------------------------------------------------- the browser


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


# --------------------------------------------------------------------------- studies

# Order matters: the grid runs its points in this order. lr 1e-5 completes first; lr 1e-3
# beats it at epoch 1 and completes; lr 10 diverges (a NaN in the first epoch, checked by
# test_suite); lr 1e-8 is still at its initial loss after epoch 1, above the median of the
# completed trials, so the median pruner prunes it before epoch 2. checkpoint_minutes = 0
# saves a resumable state at the end of epoch 1, which a finished run deletes.
E2E_DESCRIPTION = "two complete, one diverging, one pruned"
E2E = f"""
description = "{E2E_DESCRIPTION}"
sampler = "grid"
pruner = {{ type = "median", n_startup_trials = 1, n_warmup_steps = 0 }}
objectives = {{ "val/nelbo" = "minimize" }}
[space]
lr = [1e-5, 1e-3, 10.0, 1e-8]
""" + TINY + """
likelihood = "gaussian_learned"
epochs = 2
checkpoint_minutes = 0
"""


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, data_root) -> dict:
    """The study E2E run once in this process on SQLite stores, and what it left there."""
    folder = tmp_path_factory.mktemp("e2e")
    spec = write_spec(folder, "e2e", E2E)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_DATA_ROOT", str(data_root))
        assert run_study(spec, folder / "stores") == 0
    study, client, experiment, parents, children = load(folder / "stores", "e2e")
    return {"folder": folder / "stores", "study": study, "client": client,
            "experiment": experiment, "parents": parents, "children": children,
            "by_lr": {t.params["lr"]: t for t in study.trials},
            "runs": {r.info.run_id: r for r in children}}


@pytest.fixture(scope="session")
def finished(data_root, tmp_path_factory):
    """(spec, stores folder) of the three-point study run once as a process of its own;
    tests change copies of the stores (`copy_of`)."""
    folder = tmp_path_factory.mktemp("finished")
    spec = three_betas(folder)
    done = run_runner(run_args(spec, folder / "stores"), env={"VAE_DATA_ROOT": str(data_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    return spec, folder / "stores"


@pytest.fixture
def copy_of(finished, tmp_path, data_env):
    """A copy of the finished three-point study's spec and stores, to change."""
    spec, stores = finished
    shutil.copytree(stores, tmp_path / "stores")
    shutil.copy(spec, tmp_path / spec.name)
    return tmp_path / spec.name, tmp_path / "stores"


# --------------------------------------------------------------------------- PostgreSQL

PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name),
             default=None)


def as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True,
                   timeout=DEADLINE_S)


@pytest.fixture(scope="session")
def postgres() -> int:
    """A PostgreSQL cluster in a temporary folder on 127.0.0.1 and a free port, with databases
    optuna and mlflow owned by a user with a password; its port. Stopped and deleted at the
    end of the session."""
    if PG_BIN is None:
        pytest.fail("PostgreSQL is missing: `make system` installs it (apt-get install -y "
                    "postgresql)", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="vae-pg-"))  # not under pytest's root-only tmp
    shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    try:
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
                    "-w", "-t", str(DEADLINE_S), "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off", "start")
        # psycopg 3, the driver of the postgres extra; autocommit: CREATE DATABASE cannot
        # run in a transaction
        with psycopg.connect(host=str(folder), port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'")
            for name in ("optuna", "mlflow"):
                conn.execute(f"CREATE DATABASE {name} OWNER {PG_USER}")
        yield port
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data),
                        "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def store(tmp_path_factory, data_root):
    """(tracking URI, {study: experiment id}) of the report tests' miniature studies
    (report_runs.py)."""
    from report_runs import log_fixture_runs  # report_runs imports this module

    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, log_fixture_runs(uri, root / "artifacts", data_root)
