"""Dead workers and runners: who ran a trial (a process record), whether that process is
gone, and what is closed when it is: its trials failed and re-queued, their MLflow runs
ended, the invocation's study run ended; and workers that die with their runner.

RDB storages also have Optuna's heartbeat (`stores.open_storage`: a trial silent for GRACE_S
is failed and re-queued by RetryHeartbeatStaleTrialCallback). What is added here, and why:
a worker of *this* machine that died is failed at once rather than after the grace period,
and a journal file, which has no heartbeat, gets the same; the MLflow run of a trial the
heartbeat failed is closed (Optuna knows nothing of it).
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

import optuna
import psutil
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import TrialState
from tqdm import tqdm

from study.stores import MAX_RETRY

PR_SET_PDEATHSIG = 1  # prctl(2)


def say(message: str) -> None:
    """A line on stderr that does not break the progress bars."""
    tqdm.write(message, file=sys.stderr)


def _machine_id() -> str | None:
    """This kernel boot and pid namespace, so that two workers whose hosts share a name
    (containers with host networking) never judge each other's pids; None off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def this_process() -> dict:
    """This process as a record others can judge alive or gone: host, pid, machine (boot and
    pid namespace) and creation time (a pid reused by a new process is not this one)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine_id(),
            "started": psutil.Process().create_time()}


def worker_process(trial_number: int) -> dict:
    """The process running trial `trial_number`, as a user attr (see this_process). The trial
    number tells this record from the copy a re-queued trial inherits."""
    return {"trial": trial_number, **this_process()}


def process_gone(owner: dict) -> bool:
    """True when the process of the record `owner` (of this machine) has ended: no such pid,
    a zombie, or another process under a reused pid."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        started = process.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # it exists, run by another user
        return False
    recorded = owner.get("started")
    return isinstance(recorded, float) and recorded != started  # older records: the pid alone


def gone_here(owner) -> bool:
    """True when `owner` (a this_process record) ran on this machine and has ended."""
    return (isinstance(owner, dict) and owner.get("host") == socket.gethostname()
            and owner.get("machine") == _machine_id() and process_gone(owner))


def end_if_running(tracker, run_id: str, status: str, reason: str) -> bool:
    """End the run `run_id` with `status` if it is still RUNNING; whether it was."""
    try:
        running = tracker.client.get_run(run_id).info.status == "RUNNING"
    except Exception:  # a run in another store, or deleted: nothing to end
        return False
    if running:
        tracker.end_run(run_id, status, reason=reason)
    return running


def fail_dead_local_trials(study, tracker) -> list[int]:
    """Fail at once the RUNNING trials whose worker process ran on this machine and is gone
    (SIGKILL, out of memory), end their MLflow runs FAILED and re-queue them with the same
    params, as the heartbeat does after GRACE_S. Trials of other hosts, and trials with no
    worker_process record, wait for the heartbeat. Returns the failed trial numbers."""
    storage = study._storage  # as optuna.storages.fail_stale_trials does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker_process")
        if not isinstance(owner, dict) or owner.get("trial") != trial.number \
                or not gone_here(owner):
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process failed it first
            continue
        failed.append(trial.number)
        reason = f"worker process {owner['pid']} on {owner['host']} died"
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            end_if_running(tracker, run_id, "FAILED",
                           f"{reason}; the trial was re-queued with the same params")
        retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
        say(f"{study.study_name}: trial {trial.number} FAILED: {reason} (re-queued)")
    return failed


def close_orphan_runs(study, tracker) -> None:
    """End as FAILED the MLflow runs of trials that failed without ending them: their worker
    died and the heartbeat marked the trial FAIL (it is re-queued with the same params).
    A run that a running trial resumed belongs to it and is left alone. (A re-queued trial
    inherits the dead one's user attrs, mlflow_run_id and worker_process included: only a
    trial whose worker_process record is its own has claimed the run it names.)"""
    trials = study.get_trials(deepcopy=False)
    claimed = {t.user_attrs.get("mlflow_run_id") for t in trials
               if t.state == TrialState.RUNNING
               and (t.user_attrs.get("worker_process") or {}).get("trial") == t.number}
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.state == TrialState.FAIL and run_id and run_id not in claimed:
            end_if_running(tracker, run_id, "FAILED", "worker died (stale heartbeat); the "
                                                      "trial was re-queued with the same params")


def close_dead_parent_runs(tracker, experiment_id: str) -> list[str]:
    """End KILLED the study runs (one per invocation) left RUNNING by a runner process of this
    machine that died (SIGKILL, out of memory); the run ids closed. Other machines' runs are
    left alone: their processes cannot be judged from here."""
    closed = []
    for run in tracker.client.search_runs(
            [experiment_id], "tags.run_kind = 'study' and attributes.status = 'RUNNING'",
            max_results=1000):
        try:
            owner = json.loads(run.data.tags.get("runner_process", "null"))
        except ValueError:
            continue
        if gone_here(owner):
            tracker.end_run(run.info.run_id, "KILLED",
                            reason=f"the runner process {owner['pid']} on {owner['host']} died")
            closed.append(run.info.run_id)
    return closed


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send this process SIGTERM when its parent (the runner) dies, even by
    SIGKILL, so that no worker trains on unsupervised: SIGTERM stops the running trial at
    its epoch end with a resumable state. Linux only (prctl); elsewhere the stop check
    notices the new parent at the next epoch end."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
