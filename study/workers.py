"""The workers of a suite run: one worker's loop over its studies (trial after trial until
the study's budget is met), the stop request it obeys, and the supervisor that runs `--jobs N`
spawned worker processes on one storage.

Each worker gets max(1, cores // N) torch threads and one BLAS thread: numpy's OpenBLAS pool
spinning beside torch's OpenMP pool made the sklearn probe of the test metrics many times
slower on a 2-core machine.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import replace

import optuna
import torch
from threadpoolctl import threadpool_limits

from study.classifier import Classifiers
from study.errors import UsageError
from study.grid import count_states, make_pruner, make_sampler, matches, pending_points
from study.liveness import (
    close_orphan_runs,
    die_with_parent,
    end_if_running,
    fail_dead_local_trials,
)
from study.specs import load_spec
from study.stores import open_storage, redact
from study.tracking import Tracker
from study.trial import Job, SplitsCache, TrialFailed, TrialRunner, WorkerTools


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class StopRequest:
    """Asks the running trial to stop at its next epoch end, save a resumable state and end
    its run KILLED, and the worker to start no other trial: on SIGTERM, once `deadline`
    (a time.time()) has passed, or when the runner process `parent_pid` is gone. Called by
    the training loop after every epoch; one per process."""

    def __init__(self, deadline: float | None = None, parent_pid: int | None = None):
        self.reason: str | None = None
        self.deadline, self.parent_pid = deadline, parent_pid

    def __call__(self) -> bool:
        if self.reason is None and self.deadline is not None and time.time() >= self.deadline:
            self.reason = "--stop-after time reached"
        if self.reason is None and self.parent_pid is not None \
                and os.getppid() != self.parent_pid:
            self.reason = f"the runner process {self.parent_pid} died"
        return self.reason is not None

    def on_signal(self, signum, _frame) -> None:
        self.reason = f"{signal.Signals(signum).name} received"

    @property
    def orphaned(self) -> bool:
        """True in a worker process whose runner is gone."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid


def next_trial_ready(study, spec, job: Job, max_failures: int) -> bool:
    """Whether the worker should start another trial, and for a grid, which point: a
    pending point that matches --only (spread over workers by their number), or a
    re-queued trial."""
    trials = study.get_trials(deepcopy=False)
    if spec.sampler == "grid":
        pending = [p for p in pending_points(spec, trials, job.invocation)
                   if matches(p, job.only)]
        waiting = [t for t in trials if t.state.name == "WAITING" and matches(t.params, job.only)]
        study.sampler.point = pending[job.worker % len(pending)] if pending else None
        return bool(pending or waiting)
    counts = count_states(trials)
    if counts["COMPLETE"] + counts["PRUNED"] >= spec.trials and not counts["WAITING"]:
        return False
    if count_states(trials, job.invocation)["FAIL"] >= max_failures:
        print(f"{spec.study_name}: stopping after {max_failures} failed trials in this run; "
              f"see failure_reason on the failed runs", file=sys.stderr)
        return False
    return True


def run_study_trials(job: Job, tools: WorkerTools, tracker: Tracker, stop: StopRequest,
                     on_trial=None) -> None:
    """One worker's loop over one study: trial after trial until the budget is met."""
    spec = load_spec(job.spec_ref, job.profile)
    storage = open_storage(job.storage)
    existing = optuna.load_study(study_name=spec.study_name, storage=storage)
    seed = spec.base.seed * 1_000_003 + len(existing.trials) * 7919 + job.worker
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              sampler=make_sampler(spec, seed), pruner=make_pruner(spec))
    runner = TrialRunner(spec, job, tracker, tools, redact(job.storage), stop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        optuna.storages.fail_stale_trials(study)  # dead workers' trials -> FAIL + re-queued
        fail_dead_local_trials(study, tracker)  # this host's dead workers: at once
    close_orphan_runs(study, tracker)
    max_failures = max(3, spec.size())
    while not stop() and next_trial_ready(study, spec, job, max_failures):
        study.optimize(runner, n_trials=1, catch=(TrialFailed,), gc_after_trial=False,
                       show_progress_bar=False)
        if on_trial is not None:
            on_trial(spec.study_name)


def work(jobs: list[Job], stop: StopRequest, on_trial=None) -> None:
    """A worker: every study of `jobs` in order, one data cache across them. SIGTERM asks
    `stop`; a worker whose runner died ends the invocations' study runs itself."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported per trial
    if jobs and jobs[0].threads:
        torch.set_num_threads(jobs[0].threads)
    tools = WorkerTools(SplitsCache(), Classifiers(jobs[0].data_root if jobs else ""))
    trackers: dict[str, Tracker] = {}
    previous = signal.signal(signal.SIGTERM, stop.on_signal)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for job in jobs:
                if stop():
                    break
                tracker = trackers.setdefault(job.tracking_uri, Tracker(job.tracking_uri))
                run_study_trials(job, tools, tracker, stop, on_trial)
            if stop.orphaned:
                for job in jobs:  # the runner that would have ended them is gone
                    tracker = trackers.setdefault(job.tracking_uri, Tracker(job.tracking_uri))
                    end_if_running(tracker, job.invocation, "KILLED",
                                   f"the runner process {stop.parent_pid} died")
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_main(jobs: list[Job], parent_pid: int) -> None:
    """Entry point of a spawned worker process: exit 2 on a usage error."""
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    die_with_parent(parent_pid)
    try:
        work(jobs, StopRequest(jobs[0].stop_at if jobs else None, parent_pid))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_processes(jobs: list[Job], n: int, stop: StopRequest, progress, bar) -> int:
    """N spawned worker processes (not threads: torch and the GIL) on the same storage; the
    exit status (0, or 2 / 1 when a worker failed). SIGTERM is passed on to each, which
    finishes its epoch and saves; each also dies with this process."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(n):
        worker_jobs = [replace(job, worker=i, progress=False) for job in jobs]
        proc = ctx.Process(target=worker_main, args=(worker_jobs, os.getpid()),
                           name=f"vae-worker-{i}")
        proc.start()
        procs.append(proc)

    def forward(signum, frame):
        stop.on_signal(signum, frame)
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(2)
            bar.n = progress()
            bar.refresh()
    except KeyboardInterrupt:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        print(f"error: {len(bad)} worker process(es) exited with status {bad}; see above",
              file=sys.stderr)
        return 2 if 2 in bad else 1
    return 0
