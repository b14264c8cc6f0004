"""Dead workers and runners: a study killed mid-trial (SIGKILL) leaves both SQLite stores
readable and the same command finishes the grid, every point once; only this machine's dead
workers are failed at once, other trials wait for the heartbeat, which fails them later; a
resumed run is not closed as an orphan; and workers die with a killed runner."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import pytest
from helpers import (
    DEADLINE_S,
    GRID,
    TINY,
    integrity,
    interruptible_spec,
    load,
    paused,
    read_rows,
    run_args,
    run_study,
    start_runner,
    three_betas,
    trial_runs,
    write_spec,
)
from mlflow import MlflowClient

from study import stores
from study.liveness import (
    close_orphan_runs,
    fail_dead_local_trials,
    worker_process,
)
from study.stores import open_storage
from study.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * DEADLINE_S)]

# Four points; the kill lands inside the second or a later one (see the test), which need
# only outlast one 50 ms poll.
CRASH_SPEC = interruptible_spec([0.5, 1.0, 2.0, 4.0], epochs=3)
CRASH_BETAS = [0.5, 1.0, 2.0, 4.0]


def read_trials(db: Path) -> list[tuple[int, str, str | None]]:
    """(number, state, mlflow_run_id JSON) of every trial."""
    return read_rows(db, "SELECT t.number, t.state, a.value_json FROM trials t LEFT JOIN "
                         "trial_user_attributes a ON a.trial_id = t.trial_id AND "
                         "a.key = 'mlflow_run_id' ORDER BY t.number") or []


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


def test_a_study_killed_mid_trial_resumes_with_every_point_once(tmp_path, data_env):
    spec = write_spec(tmp_path, "crash", CRASH_SPEC)
    optuna_db, mlflow_db = tmp_path / "optuna.db", tmp_path / "mlflow.db"
    args = run_args(spec, tmp_path)
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
    assert sorted(t.params["beta"] for t in complete) == CRASH_BETAS  # every point, each once
    assert study.trials[number].state.name == "FAIL"
    (retried,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert retried.state.name == "COMPLETE" and retried.params == killed.params
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]

    experiment = client.get_experiment_by_name("crash")
    children = client.search_runs([experiment.experiment_id], "tags.run_kind = 'trial'",
                                  max_results=100)
    runs_per_point = collections.Counter(float(r.data.params["beta"]) for r in children)
    assert runs_per_point == {b: 2 if b == killed.params["beta"] else 1 for b in CRASH_BETAS}
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
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="rules", storage=storage)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exited = subprocess.Popen(["true"])
    exited.wait()

    def running(owner_of):  # a RUNNING trial with the worker_process record owner_of(number)
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("worker_process", owner_of(trial.number))
        return trial.number

    def me(n):
        return worker_process(n)

    alive = running(me)
    gone = running(lambda n: {**me(n), "pid": exited.pid})
    reused = running(lambda n: {**me(n), "started": me(n)["started"] - 1})  # pid reused since
    elsewhere = running(lambda n: {**me(n), "pid": exited.pid, "host": "another-host"})
    other_ns = running(lambda n: {**me(n), "pid": exited.pid, "machine": "another boot"})
    copied = running(lambda n: {**me(n - 1), "pid": exited.pid})  # inherited by a re-queued trial
    no_record = study.ask().number

    assert fail_dead_local_trials(study, tracker) == [gone, reused]
    states = {t.number: t.state.name for t in study.trials}
    for n in (alive, elsewhere, other_ns, copied, no_record):
        assert states[n] == "RUNNING", n  # the heartbeat's business
    assert states[gone] == states[reused] == "FAIL"
    requeued = [t for t in study.trials if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in requeued) == [gone, reused]
    assert all("x" in t.params for t in requeued)  # same params, run again
    assert fail_dead_local_trials(study, tracker) == []  # once only


def test_a_resumed_run_is_not_closed_as_an_orphan(tmp_path):
    """close_orphan_runs ends the RUNNING run of a failed trial, unless a running trial of its
    own worker resumed that run; a re-queued copy that only inherited the attrs claims none."""
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="orphans", storage=storage)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracker.experiment_id("orphans")
    resumed, orphan = (tracker.start_run(experiment, name, {}) for name in ("resumed", "orphan"))

    def trial(run_id, state, own_worker):
        t = study.ask()
        t.set_user_attr("mlflow_run_id", run_id)
        owner = worker_process(t.number if own_worker else t.number - 1)
        t.set_user_attr("worker_process", owner)
        if state == "FAIL":
            study.tell(t, state=optuna.trial.TrialState.FAIL)

    trial(resumed, "FAIL", own_worker=True)  # stopped; a later trial resumed its run:
    trial(resumed, "RUNNING", own_worker=True)
    trial(orphan, "FAIL", own_worker=True)  # died; its copy only inherited the attrs:
    trial(orphan, "RUNNING", own_worker=False)
    close_orphan_runs(study, tracker)
    assert tracker.client.get_run(resumed).info.status == "RUNNING"
    assert tracker.client.get_run(orphan).info.status == "FAILED"


def test_a_trial_whose_worker_died_is_failed_and_run_again(tmp_path, data_env, monkeypatch):
    """A RUNNING trial whose heartbeat stopped (its process was killed) is marked FAIL, its
    MLflow run is closed FAILED, and the same params run again in a new trial."""
    monkeypatch.setattr(stores, "HEARTBEAT_S", 1)
    monkeypatch.setattr(stores, "GRACE_S", 2)
    spec = write_spec(tmp_path, "dead", GRID + "[space]\nbeta = [0.5, 1.0]\n" + TINY + "epochs = 1\n")
    folder = tmp_path / "stores"
    storage = open_storage(f"sqlite:///{folder}/optuna.db")
    study = optuna.create_study(study_name="dead-smoke", storage=storage)
    study.enqueue_trial({"beta": 0.5})
    dead = study.ask()
    dead.suggest_categorical("beta", [0.5, 1.0])
    tracker = Tracker(f"sqlite:///{folder}/mlflow.db")
    dead_run = tracker.start_run(tracker.experiment_id("dead"), "mnist bernoulli β=0.5 z=4 s0",
                                 {"run_kind": "trial", "profile": "smoke"})
    dead.set_user_attr("mlflow_run_id", dead_run)
    storage.record_heartbeat(dead._trial_id)  # then the worker "dies": no more heartbeats
    time.sleep(3)

    assert run_study(spec, folder) == 0
    study, client, _, _, _ = load(folder, "dead")
    trials = study.trials
    assert trials[0].state.name == "FAIL"
    assert client.get_run(dead_run).info.status == "FAILED"
    assert "worker died" in client.get_run(dead_run).data.tags["failure_reason"]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == {"beta": 0.5}
    assert sorted(t.params["beta"] for t in trials if t.state.name == "COMPLETE") == [0.5, 1.0]


def test_workers_die_with_a_killed_runner(tmp_path, data_env):
    """kill -9 of a runner with two workers: the kernel's parent-death signal stops each
    worker at its epoch end (a resumable state, the run KILLED), and the last to go ends the
    invocation's study run; nothing trains on unsupervised."""
    spec, folder = three_betas(tmp_path, epochs=200), tmp_path / "stores"
    proc = start_runner(run_args(spec, folder, "--jobs", "2"), tmp_path / "run.log")
    deadline = time.monotonic() + DEADLINE_S
    while len([r for r in trial_runs(folder, "three") if r.info.status == "RUNNING"]) < 2:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children()
               if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=DEADLINE_S)
    assert not alive
    statuses = sorted(r.info.status for r in trial_runs(folder, "three"))
    assert statuses == ["KILLED", "KILLED"], statuses
    for run in trial_runs(folder, "three"):
        assert "the same command again to resume" in run.data.tags["stop_reason"]
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    (parent,) = client.search_runs([trial_runs(folder, "three")[0].info.experiment_id],
                                   "tags.run_kind = 'study'")
    assert parent.info.status == "KILLED", (tmp_path / "run.log").read_text()[-3000:]
    assert parent.data.tags["stop_reason"] == f"the runner process {proc.pid} died"
