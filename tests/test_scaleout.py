"""Scale-out as the README tells it: a throwaway PostgreSQL cluster holding the Optuna and the
MLflow databases, a real `mlflow server` over it serving the artifacts, one `run` process that
starts the study and one `run --worker` process that joins it; plus the one-line error of an
unreachable PostgreSQL storage."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import optuna
import psycopg2
import pytest
from mlflow import MlflowClient
from test_study import free_port, stop

REPO = Path(__file__).resolve().parents[1]
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
USER = "vae"
PASSWORD = "Pw-7d1e0c-not-in-logs"  # distinctive, so any leak is found
# The waits below end on events (a state in the database, a process's exit); their deadline only
# bounds a hang, generously, so that a slow or busy machine cannot fail them.
DEADLINE_S = 900
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * DEADLINE_S)]

# Six points: the first runner takes the three with latent_dim = 2 (--only), so the three
# others are the worker's whenever it joins, and trials can be short.
EPOCHS = 2
BETAS, LATENT_DIMS = [0.5, 1.0, 2.0], [2, 4]
SPEC = f"""
sampler = "grid"
[space]
beta = {BETAS}
latent_dim = {LATENT_DIMS}
[fixed]
train_subset = 2000
val_size = 300
test_subset = 200
batch_size = 100
test_iw_k = 5
epochs = {EPOCHS}
"""
ARTIFACTS = {"checkpoint.pt", "kl_per_dimension.png", "latent_pca.png", "reconstructions.png",
             "samples.png"}


def as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True,
                   timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temporary folder on 127.0.0.1 and a free port, with databases
    optuna and mlflow owned by a user with a password; stopped and deleted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="vae-pg-"))  # not under pytest's root-only tmp
    shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    try:
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
                    "-w", "-t", str(DEADLINE_S), "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off", "start")
        conn = psycopg2.connect(host=str(folder), port=port, user="postgres", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            for name in ("optuna", "mlflow"):
                cur.execute(f"CREATE DATABASE {name} OWNER {USER}")
        conn.close()
        yield port
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data),
                        "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def pg_url(port: int, database: str, scheme: str = "postgresql+psycopg2") -> str:
    return f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{port}/{database}"


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """`mlflow server` over the mlflow database, serving artifacts from a folder; yields
    (base URL, artifact folder) once /health answers."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", pg_url(postgres, "mlflow"),
         "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
         "--default-artifact-root", "mlflow-artifacts:/", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield base, folder / "artifacts"
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def data_env(data_root, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    return data_root


def start_runner(args: list[str], log_path: Path, core: int | None = None) -> subprocess.Popen:
    """`python -m study.runner ARGS` as a machine of its own: one CPU core (so the runner
    gives torch one thread), OMP_NUM_THREADS=1, output to `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cores = sorted(os.sched_getaffinity(0))
    prefix = ["taskset", "-c", str(cores[core % len(cores)])] if core is not None else []
    with open(log_path, "wb") as log:  # taskset execs python: same pid
        return subprocess.Popen([*prefix, sys.executable, "-m", "study.runner", *args], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def count(port: int, query: str) -> int:
    """The count `query` returns from the optuna database; 0 while it has no tables yet."""
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                dbname="optuna", connect_timeout=10)
    except psycopg2.Error:
        return 0
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()[0]
    except psycopg2.Error:  # no tables yet
        return 0
    finally:
        conn.close()


def wait_until(ready, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Poll `ready()` until it holds; fail if `proc` exits without it, or at the deadline."""
    while not ready():
        if proc.poll() is not None:
            assert ready(), log.read_text()[-3000:]  # it may have got there as it exited
            return
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_a_study_and_a_worker_share_postgresql_and_a_tracking_server(postgres, tracking_server,
                                                                    tmp_path, data_env):
    base, artifact_folder = tracking_server
    spec = tmp_path / "scaleout.toml"
    spec.write_text(textwrap.dedent(SPEC))
    common = ["--study", str(spec), "--tracking-uri", base, "--profile", "smoke", "--device", "cpu"]
    logs = [tmp_path / "first.log", tmp_path / "worker.log"]
    first = start_runner(["run", "--storage", pg_url(postgres, "optuna"), "--only",
                          f"latent_dim={LATENT_DIMS[0]}", *common], logs[0], core=0)
    procs = [first]
    deadline = time.monotonic() + DEADLINE_S
    try:
        # The worker joins once the first runner is training: the study and its MLflow parent
        # run exist, and a trial has started. (Counted with finished ones, which a poll cannot
        # miss the way it could miss a short RUNNING state.)
        wait_until(lambda: count(postgres, "SELECT count(*) FROM trials "
                                           "WHERE state IN ('RUNNING', 'COMPLETE')"),
                   first, logs[0], deadline)
        # what `make worker` runs; the plain postgresql:// scheme reaches the same database
        procs.append(start_runner(["run", "--worker", "--storage",
                                   pg_url(postgres, "optuna", scheme="postgresql"), *common],
                                  logs[1], core=1))
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for proc in procs:
            stop(proc)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], [out[-3000:] for out in outputs]
    for out in outputs:
        assert PASSWORD not in out  # redacted wherever a URL is printed
        assert f"{USER}:***@127.0.0.1:{postgres}/optuna" in out

    study = optuna.load_study(study_name="scaleout-smoke", storage=pg_url(postgres, "optuna"))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    points = sorted((t.params["beta"], t.params["latent_dim"]) for t in complete)
    assert points == sorted(itertools.product(BETAS, LATENT_DIMS))  # every point, each once
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    duplicates = [t for t in study.trials if t.state.name == "FAIL"]
    assert all("duplicate_of" in t.user_attrs for t in duplicates)  # stepped aside, nothing else
    workers = collections.Counter(t.user_attrs["worker"] for t in complete)
    host = socket.gethostname()
    ours, theirs = f"{host}:{first.pid}", f"{host}:{procs[1].pid}"
    assert set(workers) == {ours, theirs}, workers
    assert {t.user_attrs["worker"] for t in complete  # --only kept the first runner out
            if t.params["latent_dim"] != LATENT_DIMS[0]} == {theirs}

    client = MlflowClient(tracking_uri=base)
    experiment = client.get_experiment_by_name("scaleout")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags["run_kind"] == "study"]
    children = [r for r in runs if r.data.tags["run_kind"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the worker made none
    assert sorted(r.info.run_id for r in children) == sorted(
        t.user_attrs["mlflow_run_id"] for t in complete)  # one run per point, no other
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert PASSWORD not in value
    assert "***" in parents[0].data.tags["optuna_storage"]
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert float(run.data.params["beta"]) == trial.params["beta"]
        assert int(run.data.params["latent_dim"]) == trial.params["latent_dim"]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        history = client.get_metric_history(run.info.run_id, "val/nelbo")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch
        assert trial.values[0] == pytest.approx(run.data.metrics["val/nelbo"])
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == ARTIFACTS
    png = client.download_artifacts(complete[0].user_attrs["mlflow_run_id"], "samples.png",
                                     dst_path=str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = list(artifact_folder.rglob("checkpoint.pt"))  # the server wrote them, not us
    assert len(stored) == len(complete)


def test_an_unreachable_postgresql_storage_fails_at_once_in_one_line(tmp_path):
    spec = tmp_path / "nowhere.toml"
    spec.write_text('sampler = "grid"\n[fixed]\nepochs = 1\n')
    storage = pg_url(free_port(), "optuna", scheme="postgresql")  # nothing listens there
    done = subprocess.run(  # refused at once; the command gives up after 15 s anyway
        [sys.executable, "-m", "study.runner", "run", "--study", str(spec), "--profile", "smoke",
         "--device", "cpu", "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot reach the Optuna storage postgresql://vae:***@")
    assert "--storage" in lines[0]
    assert PASSWORD not in done.stdout + done.stderr


def test_an_unreachable_postgresql_tracking_uri_fails_at_once_in_one_line(tmp_path):
    spec = tmp_path / "nowhere.toml"
    spec.write_text('sampler = "grid"\n[fixed]\nepochs = 1\n')
    uri = pg_url(free_port(), "mlflow")  # nothing listens there
    done = subprocess.run(  # refused at once; the command gives up after 15 s anyway
        [sys.executable, "-m", "study.runner", "run", "--study", str(spec), "--profile", "smoke",
         "--device", "cpu", "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", uri],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot reach" in lines[0] and "vae:***@127.0.0.1" in lines[0]
    assert "--tracking-uri" in lines[0] or "TRACKING_URI" in lines[0]
    assert PASSWORD not in done.stdout + done.stderr
    assert not (tmp_path / "optuna.db").exists()  # nothing written to Optuna either
