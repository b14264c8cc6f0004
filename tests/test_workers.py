"""Workers: `--jobs N` worker processes on one storage, and scale-out as the README tells
it: a throwaway PostgreSQL cluster holding the Optuna and the MLflow databases, a real
`mlflow server` over it serving the artifacts, one `run` process that starts the study and
one `run --worker` process that joins it."""

from __future__ import annotations

import collections
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psycopg
import pytest
from helpers import (
    GRID,
    PG_PASSWORD,
    PG_USER,
    TINY,
    TRIAL_ARTIFACTS,
    free_port,
    load,
    pg_url,
    run_study,
    start_runner,
    stop,
    wait_for_health,
    write_spec,
)
from mlflow import MlflowClient

# Scale-out's waits end on events (a state in the database, a process's exit); their
# deadline only bounds a hang, generously, so that a slow or busy machine cannot fail them.
DEADLINE_S = 900
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * DEADLINE_S)]


def test_jobs_run_worker_processes_on_one_storage(tmp_path, data_env):
    spec = write_spec(tmp_path, "jobs", GRID + "[space]\nbeta = [0.5, 1.0, 2.0, 4.0]\n" + TINY
                      + "epochs = 1\n")
    folder = tmp_path / "stores"
    assert run_study(spec, folder, "--jobs", "2") == 0
    study, _, _, parents, children = load(folder, "jobs")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["beta"] for t in complete) == [0.5, 1.0, 2.0, 4.0]  # each once
    # two workers may pick the same grid point at once; the later steps aside (duplicate_of)
    # before it creates a run, so every other trial has exactly one run
    stepped_aside = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert all(t.state.name == "FAIL" for t in stepped_aside)
    assert len(complete) + len(stepped_aside) == len(study.trials)
    assert len(children) == len(study.trials) - len(stepped_aside) and len(parents) == 1
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.trials
            if "worker" in t.user_attrs}  # a trial that found no point left records none
    assert len(pids) >= 1 and str(os.getpid()) not in pids  # trials ran in workers, not here
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # cores // jobs
    assert {r.data.params["threads"] for r in children} == {str(threads)}


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


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """`mlflow server` over the mlflow database, serving artifacts from a folder; yields
    (base URL, artifact folder) once /health answers."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", pg_url(postgres, "mlflow"),
         "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
         "--default-artifact-root", "mlflow-artifacts:/", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, folder / "server.log", "/health", wait_s=DEADLINE_S)
        yield base, folder / "artifacts"
    finally:
        stop(proc)
        log.close()


def count(port: int, query: str) -> int:
    """The count `query` returns from the optuna database; 0 while it has no tables yet."""
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, password=PG_PASSWORD,
                             dbname="optuna", connect_timeout=10) as conn:
            return conn.execute(query).fetchone()[0]
    except psycopg.Error:  # not reachable, or no tables yet
        return 0


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
    spec = write_spec(tmp_path, "scaleout", SPEC)
    common = ["--study", str(spec), "--tracking-uri", base, "--profile", "smoke", "--device", "cpu"]
    logs = [tmp_path / "first.log", tmp_path / "worker.log"]
    env = {"PYTHONHASHSEED": "0"}  # and the worker gets another: the order must not matter
    old_scheme = pg_url(postgres, "optuna", scheme="postgresql+psycopg2")  # served by psycopg 3
    first = start_runner(["run", "--storage", old_scheme, "--only", f"latent_dim={LATENT_DIMS[0]}",
                          *common], logs[0], env=env, core=0)
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
        procs.append(start_runner(["run", "--worker", "--storage", pg_url(postgres, "optuna"),
                                   *common],
                                  logs[1], env={"PYTHONHASHSEED": "3"}, core=1))
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for proc in procs:
            stop(proc)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], [out[-3000:] for out in outputs]
    for out in outputs:
        assert PG_PASSWORD not in out  # redacted wherever a URL is printed
        assert f"{PG_USER}:***@127.0.0.1:{postgres}/optuna" in out

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
            assert PG_PASSWORD not in value
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
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == TRIAL_ARTIFACTS
    png = client.download_artifacts(complete[0].user_attrs["mlflow_run_id"], "samples.png",
                                     dst_path=str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = list(artifact_folder.rglob("checkpoint.pt"))  # the server wrote them, not us
    assert len(stored) == len(complete)
