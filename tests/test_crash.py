"""Crash safety: a study process killed with SIGKILL in the middle of a trial leaves both SQLite
stores readable, and running the same command again finishes the grid with every point
complete exactly once, the killed trial's run ended FAILED and no finished trial run twice."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from conftest import paused
from mlflow import MlflowClient

from study import runner
from study.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
# The waits below end on events (a trial's state, a process's exit); their deadline only bounds
# a hang, generously, so that a slow or busy machine cannot fail them.
DEADLINE_S = 600
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * DEADLINE_S)]

# Four points; the kill lands inside the second or a later one (see the test), which need
# only outlast one 50 ms poll.
SPEC = """
sampler = "grid"
[space]
beta = [0.5, 1.0, 2.0, 4.0]
[fixed]
train_subset = 3000
val_size = 300
test_subset = 200
batch_size = 100
test_iw_k = 5
latent_dim = 4
epochs = 3
"""
BETAS = [0.5, 1.0, 2.0, 4.0]


@pytest.fixture
def data_env(data_root, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    return data_root


def start_runner(args: list[str], log_path: Path) -> subprocess.Popen:
    """`python -m study.runner ARGS` in its own session, output to `log_path`. OpenMP threads
    sleep rather than spin when they wait: on a shared 2-core machine spinning threads made
    an epoch 40x slower."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "study.runner", *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_rows(db: Path, query: str, *args) -> list:
    """The rows of `query`, read-only, straight from SQLite (opening an Optuna storage could
    race the runner creating the schema); none while the file or its tables do not exist yet,
    or SQLite is busy (rarely, for a reader of a WAL database)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return conn.execute(query, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def read_trials(db: Path) -> list[tuple[int, str, str | None]]:
    """(number, state, mlflow_run_id JSON) of every trial."""
    return read_rows(db, "SELECT t.number, t.state, a.value_json FROM trials t LEFT JOIN "
                         "trial_user_attributes a ON a.trial_id = t.trial_id AND "
                         "a.key = 'mlflow_run_id' ORDER BY t.number")


def victim(optuna_db: Path, mlflow_db: Path) -> tuple[int, str] | None:
    """(number, run id JSON) of a trial in the middle of its run after a finished one: RUNNING
    in Optuna, and its MLflow run RUNNING too (a trial ends its run just before Optuna's
    COMPLETE); None if there is none now."""
    trials = read_trials(optuna_db)
    if not any(state == "COMPLETE" for _, state, _ in trials):
        return None
    for number, state, run in trials:
        if state != "RUNNING" or not run:
            continue
        status = read_rows(mlflow_db, "SELECT status FROM runs WHERE run_uuid = ?",
                           json.loads(run))
        if status == [("RUNNING",)]:
            return number, run
    return None


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_a_study_killed_mid_trial_resumes_with_every_point_once(tmp_path, data_env):
    spec = tmp_path / "crash.toml"
    spec.write_text(textwrap.dedent(SPEC))
    optuna_db, mlflow_db = tmp_path / "optuna.db", tmp_path / "mlflow.db"
    args = ["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
            "--storage", f"sqlite:///{optuna_db}", "--tracking-uri", f"sqlite:///{mlflow_db}"]
    log_path = tmp_path / "killed.log"
    proc = start_runner(args, log_path)
    deadline = time.monotonic() + DEADLINE_S
    try:
        # Seen by a poll, the trial could finish before a kill lands: the study is paused,
        # read again while nothing can move, and killed only if it is still mid-trial.
        found = None
        while found is None:
            assert proc.poll() is None, "the study ended before the kill:\n" + log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            if victim(optuna_db, mlflow_db) is not None:
                with paused(proc):
                    found = victim(optuna_db, mlflow_db)
                    if found is not None:
                        os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: the pid is gone, not a zombie
    number, run_json = found

    study = optuna.load_study(study_name="crash-smoke", storage=f"sqlite:///{optuna_db}")
    killed = study.trials[number]
    assert killed.state.name == "RUNNING"  # the kill landed inside the trial
    assert killed.user_attrs["worker"] == f"{socket.gethostname()}:{proc.pid}"
    run_id = killed.user_attrs["mlflow_run_id"]
    assert run_json == f'"{run_id}"'
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    assert client.get_run(run_id).info.status == "RUNNING"
    before = {t.params["beta"]: t.user_attrs["mlflow_run_id"] for t in study.trials
              if t.state.name == "COMPLETE"}
    assert before and killed.params["beta"] not in before

    again = start_runner(args, tmp_path / "again.log")  # the same command, at once
    try:
        code = again.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait()
    assert code == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert "FAILED: worker process" in (tmp_path / "again.log").read_text()

    study = optuna.load_study(study_name="crash-smoke", storage=f"sqlite:///{optuna_db}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["beta"] for t in complete) == BETAS  # every point, each once
    assert study.trials[number].state.name == "FAIL"
    (retried,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert retried.state.name == "COMPLETE" and retried.params == killed.params
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]

    experiment = client.get_experiment_by_name("crash")
    children = client.search_runs([experiment.experiment_id], "tags.run_kind = 'trial'",
                                  max_results=100)
    runs_per_point = collections.Counter(float(r.data.params["beta"]) for r in children)
    assert runs_per_point == {b: 2 if b == killed.params["beta"] else 1 for b in BETAS}
    for beta, old_run in before.items():  # finished before the kill: not run again
        assert [r.info.run_id for r in children if float(r.data.params["beta"]) == beta] == [old_run]
    dead_run = client.get_run(run_id)
    assert dead_run.info.status == "FAILED"
    assert (f"worker process {proc.pid} on {socket.gethostname()} died"
            in dead_run.data.tags["failure_reason"])
    statuses = {r.info.run_id: r.info.status for r in children}
    assert statuses.pop(run_id) == "FAILED"
    assert set(statuses.values()) == {"FINISHED"}
    assert client.get_run(retried.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
    parents = client.search_runs([experiment.experiment_id], "tags.run_kind = 'study'")
    assert len(parents) == 2  # one per invocation
    (killed_parent,) = [p for p in parents if p.info.run_id != study.user_attrs[
        "mlflow_parent_run_id"]]
    assert killed_parent.info.status == "KILLED"  # not RUNNING forever
    assert (f"the runner process {proc.pid} on {socket.gethostname()} died"
            == killed_parent.data.tags["stop_reason"])
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"

    assert integrity(optuna_db) == "ok"
    assert integrity(mlflow_db) == "ok"


def test_only_this_machines_dead_workers_are_failed(tmp_path):
    """The rules of fail_dead_local_trials, on RUNNING trials made by hand."""
    storage = runner.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="rules", storage=storage)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exited = subprocess.Popen(["true"])
    exited.wait()

    def running(owner_of):  # a RUNNING trial with the worker_process record owner_of(number)
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("worker_process", owner_of(trial.number))
        return trial.number

    def me(n):
        return runner.worker_process(n)

    alive = running(me)
    gone = running(lambda n: {**me(n), "pid": exited.pid})
    reused = running(lambda n: {**me(n), "started": me(n)["started"] - 1})  # pid reused since
    elsewhere = running(lambda n: {**me(n), "pid": exited.pid, "host": "another-host"})
    other_ns = running(lambda n: {**me(n), "pid": exited.pid, "machine": "another boot"})
    copied = running(lambda n: {**me(n - 1), "pid": exited.pid})  # inherited by a re-queued trial
    no_record = study.ask().number

    assert runner.fail_dead_local_trials(study, tracker) == [gone, reused]
    states = {t.number: t.state.name for t in study.trials}
    for n in (alive, elsewhere, other_ns, copied, no_record):
        assert states[n] == "RUNNING", n  # the heartbeat's business
    assert states[gone] == states[reused] == "FAIL"
    requeued = [t for t in study.trials if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in requeued) == [gone, reused]
    assert all("x" in t.params for t in requeued)  # same params, run again
    assert runner.fail_dead_local_trials(study, tracker) == []  # once only
