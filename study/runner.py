"""Optuna studies over the specs, run by one or several worker processes, tracked in MLflow;
and the command line `python -m study.runner {run,list,ui,dashboard}`.

Storage and resumption. The Optuna storage defaults to `sqlite:///<repo>/mlruns/optuna.db`
(`--storage`: a SQLAlchemy URL such as postgresql://... for several machines, or a journal
file path for several processes on one machine). `--jobs N` starts N worker processes on that
same storage, whatever it is: switching a SQLite default to a journal file behind the user's
back would split one study over two stores, so SQLite stays, with a 60 s busy timeout per
connection (trials last seconds to hours and write a few rows an epoch, so waits are short).
Each worker gets max(1, cores // N) torch threads and one BLAS thread (numpy's OpenBLAS
spinning beside torch's OpenMP pool slowed the sklearn probe of the test metrics 15-300x).
RDB storages run heartbeats; a trial whose worker died is marked FAIL after the grace period,
its MLflow run is closed FAILED, and it is re-queued with the same params
(RetryHeartbeatStaleTrialCallback, Optuna 5's name for RetryFailedTrialCallback). A journal
file has no heartbeats: a killed worker's trial stays RUNNING and its grid point is skipped.
Every run is a resumption: a grid runs each point until it has one
finished (COMPLETE or PRUNED) trial; a search runs until `trials` trials are finished. A point
whose trial failed is tried again by the next invocation, not within the same one.

Long trials resume mid-run. Every `checkpoint_minutes` a trial saves a resumable state (the
weights, Adam's moments, the noise generator, the history) as artifacts of its MLflow run. On
SIGTERM, or when `--stop-after` minutes have passed, each worker finishes its epoch, saves,
ends the run KILLED and stops. When the point is run again (the re-queued trial of a dead
worker, or the next invocation) the new trial goes on in the same MLflow run from the newest
state, and ends with what an uninterrupted run would have computed.

Names. A spec `loss_choice` run with profile `default` is the Optuna study
`loss_choice-default` (profiles never share trials); its MLflow experiment is `loss_choice`
(one per study, whatever the profile), with one parent run per invocation
(`loss_choice-default/run-<time>`, tag run_kind=study) and one child run per trial
(`loss_choice-default/trial-0003`, run_kind=trial), both tagged study=loss_choice and
profile=default: filter on the profile tag when several profiles share a store.

Grid points are scheduled by the runner (PointSampler) rather than by Optuna's GridSampler:
GridSampler counts a FAILED trial as a visited point (so a crash would never be retried) and,
once every point is visited, re-runs random points instead of stopping.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from threadpoolctl import threadpool_limits

from study.config import DEVICES
from study.errors import UsageError
from study.specs import PROFILES, VARIANT, Spec, describe, load_spec, spec_names, suite_names

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 30
GRACE_S = 120
MAX_RETRY = 2
SQLITE_BUSY_TIMEOUT_S = 60
FINISHED = ("COMPLETE", "PRUNED")
PR_SET_PDEATHSIG = 1  # prctl(2)


def default_storage(repo: Path = REPO) -> str:
    """$VAE_STORAGE (how make passes STORAGE: never on a command line), else
    sqlite:///<repo>/mlruns/optuna.db."""
    return os.environ.get("VAE_STORAGE") or f"sqlite:///{Path(repo).resolve() / 'mlruns' / 'optuna.db'}"


def default_data_root() -> str:
    return os.environ.get("VAE_DATA_ROOT", str(REPO / "data"))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- storage


def check_storage(url: str) -> None:
    """The Optuna storage must be reachable (30 s) and writable; UsageError otherwise."""
    from study.tracking import SQLITE_HEADER, _writable, check_database, redact

    if "://" in url:
        check_database(url, "optuna", "--storage / STORAGE=")
        return
    path = Path(url).resolve()
    if not _writable(path.parent):
        raise UsageError(f"journal file {redact(url)}: its folder cannot be created or written; "
                         f"pass a writable path with --storage")
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
                raise UsageError(f"--storage {path} is an SQLite database, not an Optuna "
                                 f"journal file; pass sqlite:///{path} if it is an Optuna "
                                 f"storage, or another path for a journal")


def open_storage(url: str):
    """An Optuna storage: RDB (with heartbeats and retries) for a URL, a journal for a path."""
    from optuna.exceptions import ExperimentalWarning

    from study.tracking import redact, sqlite_path, tune_sqlite

    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        path = Path(url).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if sqlite_path(url) is not None:
        sqlite_path(url).resolve().parent.mkdir(parents=True, exist_ok=True)
        tune_sqlite()
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith(("postgresql", "mysql")):
            engine_kwargs["connect_args"] = {"connect_timeout": 30}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY),
            )
        except Exception as exc:
            raise UsageError(f"cannot open the Optuna storage {redact(url)} "
                             f"({redact(str(exc).splitlines()[0])}); fix --storage") from None


# --------------------------------------------------------------------------- samplers


class NoPointLeft(Exception):
    """Another worker took the last grid point between our look and our trial."""


class PointSampler(optuna.samplers.BaseSampler):
    """Grid search scheduled by the runner: returns the point the runner chose (`self.point`).

    A trial re-queued after its worker died already has its params and never asks.
    """

    def __init__(self):
        self.point: dict | None = None

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if not self.point or param_name not in self.point:
            raise NoPointLeft(f"no grid point for {param_name}")
        return self.point[param_name]


def make_sampler(spec: Spec, seed: int | None = None):
    if spec.sampler == "grid":
        return PointSampler()
    cls = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
           "nsga2": optuna.samplers.NSGAIISampler}[spec.sampler]
    return cls(seed=seed, **spec.sampler_options)


def make_pruner(spec: Spec):
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**spec.pruner_options)
    if spec.pruner == "hyperband":
        options = {"min_resource": 1, "max_resource": spec.base.epochs, **spec.pruner_options}
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def point_key(spec: Spec, params: dict) -> tuple:
    return tuple((d.name, params.get(d.name)) for d in spec.dimensions)


def pending_points(spec: Spec, trials, invocation: str) -> list[dict]:
    """Grid points with no finished trial, none running or queued, and no failure in this
    invocation (a failed point is retried by the next invocation)."""
    from optuna.trial import TrialState

    taken = set()
    for t in trials:
        if (t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                        TrialState.WAITING)
                or (t.state == TrialState.FAIL and t.user_attrs.get("invocation") == invocation)):
            if "duplicate_of" not in t.user_attrs:
                taken.add(point_key(spec, t.params))
    return [p for p in spec.grid() if point_key(spec, p) not in taken]


def parse_only(items: list[str] | None, specs: list[Spec]) -> tuple[tuple[str, str], ...]:
    """`--only NAME=VALUE` pairs, checked against every spec: each must be a grid study with
    a dimension NAME that has VALUE among its choices. Several pairs must all hold."""
    pairs = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--only takes NAME=VALUE (e.g. variant=vae), got {item!r}")
        pairs.append((name.strip(), value.strip()))
    for spec in specs if pairs else []:
        if spec.sampler != "grid":
            raise UsageError(f"--only selects grid points, but {spec.name} is a "
                             f"{spec.sampler} search; drop --only or pick a grid study")
        dims = {d.name: d for d in spec.dimensions if d.is_grid}
        for name, value in pairs:
            if name not in dims:
                raise UsageError(f"--only {name}=...: {spec.name} has no grid dimension "
                                 f"{name!r}; its dimensions are {', '.join(dims) or 'none'}")
            choices = dims[name].optuna_choices()
            if not any(same_value(c, value) for c in choices):
                raise UsageError(f"--only {name}={value}: not one of {name}'s values in "
                                 f"{spec.name} ({', '.join(map(str, choices))})")
    return tuple(pairs)


def same_value(param, text: str) -> bool:
    """Whether the Optuna param value `param` is what `text` (from --only) names: numbers as
    numbers (`beta=1` is the 1.0 of the grid), anything else by its text."""
    if isinstance(param, (int, float)) and not isinstance(param, bool):
        try:
            return float(text) == param
        except ValueError:
            return False
    return str(param) == text


def matches(params: dict, only: tuple[tuple[str, str], ...]) -> bool:
    return all(name in params and same_value(params[name], value) for name, value in only)


def count_states(trials, invocation: str | None = None) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for t in trials:
        if invocation is None or t.user_attrs.get("invocation") == invocation:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# --------------------------------------------------------------------------- one trial


def _say(message: str) -> None:
    """A line on stderr that does not break the progress bars."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class TrialFailed(Exception):
    """A trial failed (diverged, crashed); the study records it and goes on."""


@dataclass(frozen=True)
class Job:
    """What one worker needs to run one study (picklable, for spawned processes)."""

    spec_ref: str
    profile: str
    storage: str
    tracking_uri: str
    experiment_id: str
    invocation: str
    """The parent run id of this study invocation: tags trials, links child runs."""
    device: str = "auto"
    threads: int | None = None
    worker: int = 0
    jobs: int = 1
    data_root: str = ""
    progress: bool = True
    stop_at: float | None = None
    """time.time() after which running trials stop at an epoch end, resumable (--stop-after)."""
    only: tuple[tuple[str, str], ...] = ()
    """(dimension, value) pairs from --only: run only the grid points that match them all."""


class StopRequest:
    """Asks the running trial to stop at its next epoch end, save a resumable state and end
    its run KILLED, and the worker to start no other trial: on SIGTERM, or once `deadline`
    (a time.time()) has passed. Called by the training loop after every epoch."""

    def __init__(self):
        self.reason: str | None = None
        self.deadline: float | None = None
        self.parent_pid: int | None = None
        """In a worker process: the runner's pid; the worker stops when it is gone."""

    def __call__(self) -> bool:
        if self.reason is None and self.deadline is not None and time.time() >= self.deadline:
            self.reason = "--stop-after time reached"
        if self.reason is None and self.parent_pid is not None \
                and os.getppid() != self.parent_pid:
            self.reason = f"the runner process {self.parent_pid} died"
        return self.reason is not None

    def on_signal(self, signum, _frame) -> None:
        self.reason = f"{signal.Signals(signum).name} received"


STOP = StopRequest()


class SplitsCache:
    """Data splits loaded once per worker process, shared by trials whose data fields match."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def get(self, config, device: str):
        from study.data import load_splits

        key = (config.dataset, config.data_root, device, config.val_size, config.seed,
               config.binarize, config.train_subset, config.test_subset)
        if key not in self.entries:
            self.entries[key] = load_splits(
                config.dataset, config.data_root, device=device, val_size=config.val_size,
                seed=config.seed, binarize=config.binarize, train_subset=config.train_subset,
                test_subset=config.test_subset)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return self.entries[key]


def _callbacks(trial, spec: Spec, config, logger, progress: bool, done: int = 0):
    """Tracking first (so a pruned epoch is logged), then the pruner, then the epoch bar."""
    from study.train import Callback

    class ReportToPruner(Callback):
        """The validation objective goes to Optuna every epoch (pruners and the dashboard)."""

        def on_epoch(self, epoch, metrics):
            value = metrics[spec.metrics[0]]
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({spec.metrics[0]} = {value:.4g})")

    class EpochBar(Callback):
        def __init__(self):
            from tqdm import tqdm

            self.bar = tqdm(total=config.epochs, initial=done, desc=f"  trial {trial.number}",
                            unit="epoch", leave=False, disable=not progress)

        def on_epoch(self, epoch, metrics):
            self.bar.set_postfix_str(f"val/nelbo {metrics.get('val/nelbo', float('nan')):.1f}")
            self.bar.update(1)

    callbacks = [logger]
    if len(spec.objectives) == 1:  # Optuna cannot report intermediate values of several
        callbacks.append(ReportToPruner())
    bar = EpochBar()
    callbacks.append(bar)
    return callbacks, bar.bar


class Objective:
    """Runs one trial: config from the spec and the trial's params, a child MLflow run,
    training with per-epoch logging and pruning, test metrics and artifacts at the end."""

    def __init__(self, spec: Spec, job: Job, tracker, cache: SplitsCache, storage_label: str):
        self.spec, self.job, self.tracker, self.cache = spec, job, tracker, cache
        self.storage_label = storage_label

    def __call__(self, trial):
        from study.data import dataset_digest
        from study.tracking import (
            ResumeStates,
            environment_tags,
            final_metrics,
            last_logged_epoch,
            log_trial_artifacts,
        )
        from study.train import Checkpointing, NonFiniteLoss, TrainingStopped, resolve_device, train

        spec, job, tracker = self.spec, self.job, self.tracker
        try:
            params = spec.suggest(trial)
        except NoPointLeft as exc:
            trial.set_user_attr("duplicate_of", -1)
            raise TrialFailed("no grid point left for this worker") from exc
        trial.set_user_attr("invocation", job.invocation)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("worker_process", worker_process(trial.number))
        if spec.sampler == "grid":
            self._refuse_duplicate(trial, params)

        config = spec.config_for(
            params, device=job.device, threads=job.threads, data_root=job.data_root,
            extra={"study": spec.name, "optuna_study": spec.study_name, "profile": spec.profile,
                   "trial": trial.number},
        )
        device = resolve_device(config.device)
        splits = self.cache.get(config, device)  # before the run: a data error creates no run
        run_name = f"{spec.study_name}/trial-{trial.number:04d}"
        t_setup = time.perf_counter()
        tags = {
            "study": spec.name, "profile": spec.profile,
            "trial_number": trial.number, "run_kind": "trial",
            "optuna_study": spec.study_name, "optuna_storage": self.storage_label,
            "dataset": config.dataset, "dataset_digest": dataset_digest(config.dataset),
            **environment_tags(device),
        }
        if VARIANT in params:
            tags[VARIANT] = params[VARIANT]
        run_params = config.as_params()
        if VARIANT in params:
            run_params[VARIANT] = params[VARIANT]
        resume = self._resumable(trial, params, config)
        if resume is None:
            run_id = tracker.start_run(job.experiment_id, run_name, tags, run_params,
                                       parent_run_id=job.invocation)
            state, slot, logged_through, before = None, None, 0, {}
        else:
            run_id, state, slot, earlier = resume
            trial.set_user_attr("mlflow_run_id", run_id)  # claimed before it runs again
            tracker.reopen_run(run_id, run_name, {**tags, "resumed_from_trial": earlier,
                                                  "resumed_at_epoch": state["epoch"]})
            logged_through = last_logged_epoch(tracker, run_id)
            before = state.get("runner_seconds", {})
            trial.set_user_attr("resumed_from_trial", earlier)
            trial.set_user_attr("resumed_at_epoch", state["epoch"])
            _say(f"{run_name}: resuming run {run_id} at epoch {state['epoch']} of "
                 f"{config.epochs} (saved by trial {earlier})")
        trial.set_user_attr("mlflow_run_id", run_id)
        setup_seconds = time.perf_counter() - t_setup

        from study.tracking import TrialLogger

        logger = TrialLogger(tracker, run_id, logged_through)
        states = ResumeStates(tracker, run_id, last_slot=slot)
        callbacks, bar = _callbacks(trial, spec, config, logger, job.progress,
                                    done=state["epoch"] if state else 0)
        t_train = time.perf_counter()

        def part_times(final_seconds: float = 0.0) -> dict[str, float]:
            """This trial's share of the run: a resumed run's earlier parts are not in it."""
            tracking = logger.seconds + states.seconds
            now = time.perf_counter()
            return {"train_seconds": now - t_train - tracking - final_seconds,
                    "tracking_seconds": logger.seconds,
                    "tracking_total_seconds": setup_seconds + tracking + final_seconds,
                    "run_seconds": now - t_setup}

        def record_times(final_seconds: float = 0.0) -> dict[str, float]:
            """Set this trial's times as user attrs; return the run's (all parts) as metrics."""
            part = part_times(final_seconds)
            for key, value in part.items():
                trial.set_user_attr(key, value)
            return {f"time/{k}": v + before.get(k, 0.0) for k, v in part.items()}

        def save(state: dict) -> None:
            part = part_times()
            state["runner_seconds"] = {k: v + before.get(k, 0.0) for k, v in part.items()}
            states.save(state)
            trial.set_user_attr("checkpoint_epoch", state["epoch"])

        try:
            result = train(config, callbacks, splits=splits, resume=state,
                           checkpointing=Checkpointing(save=save, stop=STOP))
        except TrainingStopped as exc:
            bar.close()
            reason = (f"{exc} ({STOP.reason}); run the same command again to resume from "
                      f"there")
            trial.set_user_attr("stopped", reason)
            tracker.log_metrics(run_id, record_times(), step=exc.epoch)
            tracker.end_run(run_id, "KILLED", reason=reason)
            _say(f"{run_name} stopped at the end of epoch {exc.epoch} of {config.epochs}, "
                 f"resumable ({STOP.reason})")
            raise TrialFailed(reason) from exc
        except optuna.TrialPruned as exc:
            bar.close()
            tracker.set_tags(run_id, {"pruned": str(exc)})
            tracker.log_metrics(run_id, record_times(), step=0)
            tracker.end_run(run_id, "KILLED")
            raise
        except UsageError as exc:
            bar.close()
            tracker.end_run(run_id, "FAILED", reason=str(exc))
            raise
        except (NonFiniteLoss, Exception) as exc:  # the study goes on after a failed trial
            bar.close()
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, NonFiniteLoss) \
                else str(exc)
            trial.set_user_attr("failure_reason", reason)
            tracker.log_metrics(run_id, record_times(), step=0)
            tracker.end_run(run_id, "FAILED", reason=reason)
            _say(f"{run_name} FAILED: {reason} (the study goes on)")
            raise TrialFailed(reason) from exc
        except BaseException:  # interrupted: the run did not fail, it was stopped
            bar.close()
            tracker.end_run(run_id, "KILLED", reason="interrupted")
            raise
        bar.close()

        values = [result.final[m] for m in spec.metrics]
        t_final = time.perf_counter()
        try:  # artifacts, then the test metrics and times in one batch
            log_trial_artifacts(tracker, run_id, result, splits)
            final = final_metrics(result)
            final.update(record_times(time.perf_counter() - t_final))
            tracker.log_metrics(run_id, final, step=config.epochs)
        except Exception as exc:
            tracker.end_run(run_id, "FAILED", reason=f"logging results failed: {exc}")
            raise TrialFailed(f"logging results failed: {exc}") from exc
        if not all(v == v and abs(v) != float("inf") for v in values):
            reason = f"non-finite objective {dict(zip(spec.metrics, values, strict=True))}"
            trial.set_user_attr("failure_reason", reason)
            tracker.end_run(run_id, "FAILED", reason=reason)
            raise TrialFailed(reason)
        tracker.end_run(run_id, "FINISHED")
        return values[0] if len(values) == 1 else tuple(values)

    def _resumable(self, trial, params, config):
        """(run id, state, slot, trial number) of the newest resumable state saved by an
        earlier trial at this point that was stopped or whose worker died (not one that failed
        in training: resuming would fail again), if it still fits the config; else None."""
        from optuna.trial import TrialState

        from study.tracking import ResumeStates
        from study.train import resume_problem

        key = point_key(self.spec, params)
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.number < trial.number and point_key(self.spec, t.params) == key
                   and "mlflow_run_id" in t.user_attrs and "failure_reason" not in t.user_attrs
                   and "duplicate_of" not in t.user_attrs]
        for t in sorted(earlier, key=lambda t: -t.number):
            run_id = t.user_attrs["mlflow_run_id"]
            try:
                found = ResumeStates.newest(self.tracker, run_id)
            except Exception:  # a run in another store, or deleted: nothing to resume
                continue
            if found is None:
                continue
            state, slot = found
            problem = resume_problem(config, state)
            if problem:
                _say(f"trial {trial.number}: not resuming run {run_id} ({problem}); "
                     f"training from the start")
                return None
            return run_id, state, slot, t.number
        return None

    def _refuse_duplicate(self, trial, params) -> None:
        """Two workers that picked the same point at once: the later trial steps aside."""
        from optuna.trial import TrialState

        key = point_key(self.spec, params)
        for other in trial.study.get_trials(deepcopy=False):
            if other.number == trial.number or point_key(self.spec, other.params) != key:
                continue
            if other.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                    other.state == TrialState.RUNNING and other.number < trial.number
                    and "duplicate_of" not in other.user_attrs):
                trial.set_user_attr("duplicate_of", other.number)
                raise TrialFailed(f"grid point already taken by trial {other.number}")


# --------------------------------------------------------------------------- workers


def run_study_trials(job: Job, cache: SplitsCache, tracker, on_trial=None) -> None:
    """One worker's loop over one study: trial after trial until the budget is met."""
    from study.tracking import redact

    spec = load_spec(job.spec_ref, job.profile)
    storage = open_storage(job.storage)
    existing = optuna.load_study(study_name=spec.study_name, storage=storage)
    seed = spec.base.seed * 1_000_003 + len(existing.trials) * 7919 + job.worker
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              sampler=make_sampler(spec, seed), pruner=make_pruner(spec))
    objective = Objective(spec, job, tracker, cache, redact(job.storage))
    max_failures = max(3, spec.size())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        optuna.storages.fail_stale_trials(study)  # dead workers' trials -> FAIL + re-queued
        fail_dead_local_trials(study, tracker)  # this host's dead workers: at once
    close_orphan_runs(study, tracker)
    while not STOP():
        trials = study.get_trials(deepcopy=False)
        counts = count_states(trials)
        if spec.sampler == "grid":
            pending = [p for p in pending_points(spec, trials, job.invocation)
                       if matches(p, job.only)]
            waiting = [t for t in trials if t.state.name == "WAITING"
                       and matches(t.params, job.only)]
            if not pending and not waiting:
                break
            study.sampler.point = pending[job.worker % len(pending)] if pending else None
        else:
            if counts["COMPLETE"] + counts["PRUNED"] >= spec.trials and not counts["WAITING"]:
                break
            if count_states(trials, job.invocation)["FAIL"] >= max_failures:
                print(f"{spec.study_name}: stopping after {max_failures} failed trials in this "
                      f"run; see failure_reason on the failed runs", file=sys.stderr)
                break
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False,
                       show_progress_bar=False)
        if on_trial is not None:
            on_trial(spec.study_name)


def close_orphan_runs(study, tracker) -> None:
    """End as FAILED the MLflow runs of trials that failed without ending them: their worker
    died and the heartbeat marked the trial FAIL (it is re-queued with the same params).
    A run that a running trial resumed belongs to it and is left alone. (A re-queued trial
    inherits the dead one's user attrs, mlflow_run_id and worker_process included: only a
    trial whose worker_process record is its own has claimed the run it names.)"""
    trials = study.get_trials(deepcopy=False)
    claimed = {t.user_attrs.get("mlflow_run_id") for t in trials
               if t.state == optuna.trial.TrialState.RUNNING
               and (t.user_attrs.get("worker_process") or {}).get("trial") == t.number}
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.state != optuna.trial.TrialState.FAIL or not run_id or run_id in claimed:
            continue
        end_if_running(tracker, run_id, "FAILED", "worker died (stale heartbeat); the trial "
                                                  "was re-queued with the same params")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process `pid`, from /proc/<pid>/stat
    (fields 3 and 22 of proc(5)); None when there is no such process or no /proc (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    return fields[0], int(fields[19])


def _machine_id() -> str | None:
    """This kernel boot and pid namespace, so that two workers whose hosts share a name
    (containers with host networking) never judge each other's pids; None off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def this_process() -> dict:
    """This process as a record others can judge alive or gone: host and pid, and on Linux the
    boot, pid namespace and start time (a pid reused by a new process is not this one)."""
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine_id(),
            "started": stat[1] if stat else None}


def worker_process(trial_number: int) -> dict:
    """The process running trial `trial_number`, as a user attr (see this_process). The trial
    number tells this record from the copy a re-queued trial inherits."""
    return {"trial": trial_number, **this_process()}


def _gone_here(owner) -> bool:
    """True when `owner` (a this_process record) ran on this machine and has ended."""
    return (isinstance(owner, dict) and owner.get("host") == socket.gethostname()
            and owner.get("machine") == _machine_id() and _process_gone(owner))


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
        if _gone_here(owner):
            tracker.end_run(run.info.run_id, "KILLED",
                            reason=f"the runner process {owner['pid']} on {owner['host']} died")
            closed.append(run.info.run_id)
    return closed


def _process_gone(owner: dict) -> bool:
    """True when the worker process `owner` (a worker_process record of this machine) ended."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        pass
    if owner.get("started") is None:  # no /proc: the pid alone decides
        return False
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X") or stat[1] != owner["started"]


def fail_dead_local_trials(study, tracker) -> list[int]:
    """Fail at once the RUNNING trials whose worker process ran on this machine and is gone
    (SIGKILL, out of memory), end their MLflow runs FAILED and re-queue them with the same
    params, as the heartbeat does after GRACE_S (a journal file has no heartbeat at all).
    Trials of other hosts, and trials with no worker_process record, wait for the heartbeat.
    Returns the failed trial numbers."""
    import copy

    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage  # as optuna.storages.fail_stale_trials does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker_process")
        if not isinstance(owner, dict) or owner.get("trial") != trial.number \
                or not _gone_here(owner):
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
        _say(f"{study.study_name}: trial {trial.number} FAILED: {reason} (re-queued)")
    return failed


def work(jobs: list[Job], on_trial=None) -> None:
    """A worker: every study of `jobs` in order, one data cache across them."""
    import torch

    from study.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by Objective
    if jobs and jobs[0].threads:
        torch.set_num_threads(jobs[0].threads)
    cache = SplitsCache()
    trackers: dict[str, Tracker] = {}
    STOP.reason, STOP.deadline = None, jobs[0].stop_at if jobs else None
    previous = signal.signal(signal.SIGTERM, STOP.on_signal)
    # torch's OpenMP pool does the heavy work; numpy/scipy's OpenBLAS pool, spinning beside it,
    # made the sklearn probe of the test metrics 15-300x slower on this 2-core machine.
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for job in jobs:
                if STOP():
                    break
                tracker = trackers.setdefault(job.tracking_uri, Tracker(job.tracking_uri))
                run_study_trials(job, cache, tracker, on_trial)
            if STOP.parent_pid is not None and os.getppid() != STOP.parent_pid:
                for job in jobs:  # the runner that would have ended them is gone
                    end_if_running(trackers[job.tracking_uri] if job.tracking_uri in trackers
                                   else Tracker(job.tracking_uri), job.invocation, "KILLED",
                                   f"the runner process {STOP.parent_pid} died")
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_if_running(tracker, run_id: str, status: str, reason: str) -> bool:
    """End the run `run_id` with `status` if it is still RUNNING; whether it was."""
    try:
        running = tracker.client.get_run(run_id).info.status == "RUNNING"
    except Exception:  # a run in another store, or deleted: nothing to end
        return False
    if running:
        tracker.end_run(run_id, status, reason=reason)
    return running


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


def _worker_process(jobs: list[Job], parent_pid: int) -> None:
    """Entry point of a spawned worker process: exit 2 on a usage error."""
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    STOP.parent_pid = parent_pid
    die_with_parent(parent_pid)
    try:
        work(jobs)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


# --------------------------------------------------------------------------- a suite run


@dataclass
class Prepared:
    spec: Spec
    job: Job
    parent_run_id: str
    created_parent: bool
    all_failed: str | None = None
    """Set by finish_study when every trial this invocation ran failed: why, in a line."""


def spec_settings(spec: Spec) -> dict:
    """What a study's trials compute, as plain JSON: the fixed config (less the fields that
    only say where and how fast it runs), the variants' bundles and the search space."""
    import dataclasses

    from study.train import RUN_ONLY_FIELDS

    fixed = {k: v for k, v in dataclasses.asdict(spec.base).items()
             if k not in RUN_ONLY_FIELDS and k != "extra"}
    return json.loads(json.dumps({"fixed": fixed, "variants": spec.variants,
                                  "space": [d.describe() for d in spec.dimensions]}, default=str))


def check_settings(study, spec: Spec, storage_label: str) -> None:
    """A study keeps the settings of its first invocation: a spec edited since would mix two
    settings under one study, its finished grid points counting for the new setting. Refuse
    that, naming what changed; record the settings of a study that has none yet."""
    ours, theirs = spec_settings(spec), study.user_attrs.get("settings")
    if theirs is None:
        study.set_user_attr("settings", ours)
        return
    if theirs == ours:
        return
    changed = [k for k in sorted({*ours["fixed"], *theirs["fixed"]})
               if ours["fixed"].get(k) != theirs["fixed"].get(k)]
    changed += [k for k in ("variants", "space") if ours.get(k) != theirs.get(k)]
    raise UsageError(
        f"study {study.study_name!r} was run with other settings than spec {spec.name!r} has "
        f"now (changed: {', '.join(changed)}); delete it (`.venv/bin/optuna delete-study "
        f"--study-name {study.study_name} --storage {storage_label}`) or give the spec a new name")


def trial_runs(tracker, experiment_id: str, study_name: str) -> list:
    """Every trial run (any status) that the Optuna study `study_name` logged in the
    experiment, read in pages."""
    runs, token = [], None
    while True:
        page = tracker.client.search_runs(
            [experiment_id], f"tags.run_kind = 'trial' and tags.optuna_study = '{study_name}'",
            max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def reconcile_with_mlflow(study, spec: Spec, tracker, args) -> int:
    """Check the Optuna study against the MLflow runs it names, before anything is written.

    Finished trials whose runs the tracking store no longer holds (an emptied or replaced
    mlflow.db) are refused: the reports could never show them and the study would never run
    them again. FINISHED runs of this study that no trial names (an emptied or replaced
    optuna.db) are adopted as COMPLETE trials when their logged settings are exactly what the
    spec gives that point, so nothing is trained twice. Returns how many were adopted."""
    from optuna.trial import TrialState, create_trial

    from study.tracking import redact
    from study.train import RUN_ONLY_FIELDS

    experiment = tracker.client.get_experiment_by_name(spec.name)
    runs = trial_runs(tracker, experiment.experiment_id, spec.study_name) if experiment else []
    trials = study.get_trials(deepcopy=False)
    in_store = {r.info.run_id for r in runs}
    lost = [t.number for t in trials if t.state.name in FINISHED
            and t.user_attrs.get("mlflow_run_id") not in in_store]
    if lost:
        raise UsageError(
            f"study {spec.study_name!r} has {len(lost)} finished trial(s) whose MLflow runs "
            f"are not in {redact(args.tracking_uri)} (was the tracking store emptied or "
            f"replaced?); point --tracking-uri / TRACKING_URI at the store that holds them, or "
            f"rebuild from scratch: `.venv/bin/optuna delete-study --study-name "
            f"{spec.study_name} --storage {redact(args.storage)}`, then run again")
    named = {t.user_attrs.get("mlflow_run_id") for t in trials}
    adopted = 0
    for run in runs:
        if run.info.status != "FINISHED" or run.info.run_id in named:
            continue
        logged = run.data.params
        params = {d.name: d.from_param(logged.get(d.name, "")) for d in spec.dimensions}
        values = [run.data.metrics.get(m) for m in spec.metrics]
        if any(v is None for v in [*params.values(), *values]):
            continue
        expected = spec.config_for(params).as_params()
        if any(logged.get(k) != v for k, v in expected.items() if k not in RUN_ONLY_FIELDS):
            continue  # trained with other settings: not this study's result
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, params=params, values=values,
            distributions={d.name: d.distribution() for d in spec.dimensions},
            user_attrs={"mlflow_run_id": run.info.run_id, "adopted_from_mlflow": True,
                        "invocation": run.data.tags.get("mlflow.parentRunId", "")}))
        adopted += 1
    if adopted:
        _say(f"{spec.study_name}: adopted {adopted} finished MLflow run(s) that the Optuna "
             f"storage did not know (lost trials); they are not trained again")
    return adopted


def prepare_study(spec: Spec, args, storage, tracker, worker_mode: bool) -> Prepared:
    """Create (or, as a --worker, find) the study, its experiment and this invocation's parent
    run. Nothing here trains."""
    from study.tracking import environment_tags, redact
    from study.train import resolve_device

    name = spec.study_name
    if worker_mode:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise UsageError(f"no study {name!r} in {redact(args.storage)}; start it first with "
                             f"`make study STUDY={spec.name} PROFILE={spec.profile}`") from None
        check_settings(study, spec, redact(args.storage))
        reconcile_with_mlflow(study, spec, tracker, args)
        experiment_id = tracker.experiment_id(spec.name, create=False)
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if not parent:
            raise UsageError(f"study {name!r} has no MLflow parent run; start it with "
                             f"`make study` before joining it with `make worker`")
        created = False
    else:
        study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions,
                                    load_if_exists=True)
        found = [d.name.lower() for d in study.directions]
        if found != spec.directions:
            raise UsageError(f"study {name!r} exists with directions {found}, but the spec asks "
                             f"for {spec.directions}; rename the spec or delete the study")
        check_settings(study, spec, redact(args.storage))
        reconcile_with_mlflow(study, spec, tracker, args)
        experiment_id = tracker.experiment_id(spec.name)
        close_dead_parent_runs(tracker, experiment_id)
        tags = {"study": spec.name, "profile": spec.profile, "run_kind": "study",
                "runner_process": json.dumps(this_process()),
                "optuna_study": name, "optuna_storage": redact(args.storage),
                "sampler": spec.sampler, "pruner": spec.pruner, "jobs": args.jobs,
                **environment_tags(resolve_device(args.device))}
        params = {"sampler": spec.sampler, "pruner": spec.pruner, "trials": spec.size(),
                  "objectives": json.dumps(dict(spec.objectives)), "epochs": spec.base.epochs,
                  "space": "; ".join(d.describe() for d in spec.dimensions)}
        parent = tracker.start_run(experiment_id, f"{name}/run-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags, params)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "spec.json").write_text(json.dumps(spec.table, indent=2, default=str))
            tracker.log_artifacts(parent, Path(tmp))
        for key, value in {"spec": spec.name, "profile": spec.profile,
                           "mlflow_parent_run_id": parent, "mlflow_experiment_id": experiment_id,
                           "description": spec.description}.items():
            study.set_user_attr(key, value)
        created = True
    job = Job(spec_ref=str(spec.path), profile=spec.profile, storage=args.storage,
              tracking_uri=args.tracking_uri, experiment_id=experiment_id, invocation=parent,
              device=args.device, data_root=default_data_root(), jobs=args.jobs)
    return Prepared(spec, job, parent, created)


def finish_study(prep: Prepared, storage, tracker, wall: float, status: str) -> dict:
    """Log this invocation's counts and the measured tracking overhead on the parent run."""
    study = optuna.load_study(study_name=prep.spec.study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get("invocation") == prep.job.invocation]
    train = sum(t.user_attrs.get("train_seconds", 0.0) for t in mine)
    tracking = sum(t.user_attrs.get("tracking_seconds", 0.0) for t in mine)
    total = sum(t.user_attrs.get("tracking_total_seconds", 0.0) for t in mine)
    counts = count_states(mine)
    failed = [t for t in mine if t.state.name == "FAIL" and "duplicate_of" not in t.user_attrs
              and "stopped" not in t.user_attrs]
    if failed and not any(t.state.name in FINISHED for t in trials):
        prep.all_failed = (f"every trial of {prep.spec.study_name} failed ({len(failed)} "
                           f"this run); the first: "
                           f"{failed[0].user_attrs.get('failure_reason', 'no reason recorded')}")
    summary = {
        "trials_complete": counts["COMPLETE"], "trials_pruned": counts["PRUNED"],
        "trials_failed": counts["FAIL"],
        "trials_finished_total": sum(count_states(trials)[s] for s in FINISHED),
        "wall_seconds": wall, "train_seconds": train,
        "tracking_seconds": tracking, "tracking_total_seconds": total,
    }
    if train > 0:
        summary["tracking_overhead_pct"] = 100 * tracking / train
        summary["tracking_total_overhead_pct"] = 100 * total / train
    if prep.created_parent:
        tracker.log_metrics(prep.parent_run_id, summary, step=0)
        tracker.end_run(prep.parent_run_id, status)
    return summary


def _progress_count(storage, preps: list[Prepared]) -> int:
    done = 0
    for prep in preps:
        study = optuna.load_study(study_name=prep.spec.study_name, storage=storage)
        counts = count_states(study.get_trials(deepcopy=False))
        done += min(prep.spec.size(), counts["COMPLETE"] + counts["PRUNED"])
    return done


def cmd_run(args) -> int:
    from tqdm import tqdm

    from study.tracking import Tracker, check_tracking_uri, first_use_lock, redact
    from study.train import resolve_device

    if args.profile not in PROFILES:
        raise UsageError(f"unknown profile {args.profile!r}; choose one of {', '.join(PROFILES)}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.device not in DEVICES:
        raise UsageError(f"unknown device {args.device!r}; choose one of {', '.join(DEVICES)}")
    if args.stop_after is not None and not args.stop_after > 0:
        raise UsageError(f"--stop-after must be > 0 minutes, got {args.stop_after}")
    if args.worker and not args.study:
        raise UsageError("--worker joins one study: name it with --study NAME (make worker STUDY=...)")
    names = args.study or suite_names(args.profile)
    specs, problems = [], []
    for name in names:
        try:
            specs.append(load_spec(name, args.profile))
        except UsageError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError(" | ".join(problems))
    only = parse_only(args.only, specs)
    resolve_device(args.device)
    args.storage = args.storage or default_storage()
    args.tracking_uri = args.tracking_uri or _default_tracking_uri()
    check_tracking_uri(args.tracking_uri)
    check_storage(args.storage)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    preps: list[Prepared] = []
    with first_use_lock(args.storage, args.tracking_uri):  # two first runs: one creates
        storage = open_storage(args.storage)
        tracker = Tracker(args.tracking_uri)
        try:
            for spec in specs:
                preps.append(prepare_study(spec, args, storage, tracker, args.worker))
        except BaseException:
            for prep in preps:
                if prep.created_parent:
                    tracker.end_run(prep.parent_run_id, "FAILED",
                                    reason="the suite did not start")
            raise
    threads = max(1, available_cores() // args.jobs)
    stop_at = time.time() + 60 * args.stop_after if args.stop_after else None
    jobs = [replace(p.job, threads=threads, stop_at=stop_at, only=only) for p in preps]
    total = sum(p.spec.size() for p in preps)
    print(f"running {len(preps)} stud{'y' if len(preps) == 1 else 'ies'} "
          f"({', '.join(p.spec.study_name for p in preps)}), profile {args.profile}, "
          f"{args.jobs} worker process(es) x {threads} torch thread(s)\n"
          f"  Optuna storage {redact(args.storage)}\n  MLflow tracking {redact(args.tracking_uri)}",
          flush=True)
    bar = tqdm(total=total, initial=_progress_count(storage, preps), desc="suite", unit="trial")
    t0 = time.perf_counter()
    status, code = "FINISHED", 0
    try:
        if args.jobs == 1:
            def on_trial(name):
                bar.n = _progress_count(storage, preps)
                bar.set_description(name)
            work(jobs, on_trial=on_trial)
        else:
            code = _run_processes(jobs, args.jobs, lambda: _progress_count(storage, preps), bar)
            if code:
                status = "FAILED"
        if STOP.reason and not code:
            status = "KILLED"
            code = 128 + signal.SIGTERM if STOP.reason.startswith("SIGTERM") else 0
    except KeyboardInterrupt:
        status, code = "KILLED", 130
    except BaseException:
        status = "FAILED"
        raise
    finally:
        bar.n = _progress_count(storage, preps)
        bar.close()
        wall = time.perf_counter() - t0
        summaries = [finish_study(p, storage, tracker, wall, status) for p in preps]
    for prep, summary in zip(preps, summaries, strict=True):
        overhead = summary.get("tracking_overhead_pct")
        print(f"{prep.spec.study_name}: {summary['trials_complete']} complete, "
              f"{summary['trials_pruned']} pruned, {summary['trials_failed']} failed this run; "
              f"{summary['trials_finished_total']}/{prep.spec.size()} finished"
              + (f"; tracking {overhead:.2f}% of training time "
                 f"({summary['tracking_total_overhead_pct']:.1f}% with artifacts)"
                 if overhead is not None else ""))
    for prep in preps:
        if prep.all_failed:
            print(f"error: {redact(prep.all_failed)}; see failure_reason on the runs "
                  f"(make ui)", file=sys.stderr)
            code = code or 1
    if STOP.reason:
        print(f"stopped ({STOP.reason}): running trials saved a resumable state; the same "
              f"command resumes them.")
    print(f"took {wall:.0f} s. Look at the runs with `make ui` (MLflow, {redact(args.tracking_uri)}),"
          f" the studies with `make dashboard` (Optuna), and the reports with `make report` "
          f"(reports/index.html).")
    return code


def _default_tracking_uri() -> str:
    from study.tracking import default_tracking_uri

    return default_tracking_uri()


def _run_processes(jobs: list[Job], n: int, progress, bar) -> int:
    """N spawned worker processes (not threads: torch and the GIL) on the same storage."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(n):
        worker_jobs = [replace(job, worker=i, progress=False) for job in jobs]
        proc = ctx.Process(target=_worker_process, args=(worker_jobs, os.getpid()),
                           name=f"vae-worker-{i}")
        proc.start()
        procs.append(proc)

    def forward(signum, frame):  # each worker finishes its epoch and saves
        STOP.on_signal(signum, frame)
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
    codes = [p.exitcode for p in procs]
    bad = [c for c in codes if c]
    if bad:
        print(f"error: {len(bad)} worker process(es) exited with status {bad}; see above",
              file=sys.stderr)
        return 2 if 2 in bad else 1
    return 0


# --------------------------------------------------------------------------- other commands


def cmd_list(args) -> int:
    names = spec_names() if args.all else suite_names(args.profile)
    for name in names:
        spec = load_spec(name, args.profile)
        print(("  " if spec.suite else "* ") + describe(spec))
    if args.all:
        print("(* = not in the default suite; run it with --study NAME)")
    return 0


def cmd_ui(args) -> int:
    """exec `mlflow server` over the same store and artifact folder the runner writes.

    Runs written straight to the store keep the artifact folder they were created with (the
    server reads it); experiments created through the server (runner workers given
    `--tracking-uri http://...`, possibly on other machines) get `mlflow-artifacts:/`, which
    the server proxies into the same folder (`--artifacts-destination`)."""
    from study.tracking import artifact_root, check_tracking_uri, redact

    uri = args.tracking_uri or _default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise UsageError(f"{redact(uri)} is already a tracking server: open it in a browser; "
                         f"`ui` serves a database store (sqlite:///... or postgresql://...)")
    check_tracking_uri(uri)
    root = artifact_root(uri)
    root.mkdir(parents=True, exist_ok=True)
    # the store URI goes in the environment (mlflow server's MLFLOW_BACKEND_STORE_URI), not
    # on the command line, where any user's process list would show its password
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--default-artifact-root", "mlflow-artifacts:/", "--artifacts-destination", root.as_uri(),
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType="
          f"machine_learning over {redact(uri)} (artifacts in {root}); Ctrl-C stops it",
          flush=True)
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})
    return 0  # pragma: no cover - execv does not return


def cmd_dashboard(args) -> int:
    """optuna-dashboard over the Optuna storage (loopback unless --host says otherwise)."""
    from study.tracking import redact, sqlite_path

    url = args.storage or default_storage()
    check_storage(url)
    db = sqlite_path(url) if "://" in url else Path(url)
    if db is not None and not db.exists():
        raise UsageError(f"no Optuna storage at {db}; run a study first (make study) or pass "
                         f"--storage")
    import optuna_dashboard

    storage = open_storage(url)
    print(f"optuna-dashboard on http://{args.host}:{args.port} over {redact(url)}; Ctrl-C stops it",
          flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m study.runner",
        description="Run the VAE study suite (Optuna + MLflow) and serve its UIs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the default suite (or --study NAME) for a profile",
                         description="Run every study of the default suite (or --study NAME) "
                                     "for --profile; resumes, never redoes a finished trial.")
    run.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)} "
                     "(default: default)")
    run.add_argument("--study", action="append", metavar="NAME",
                     help="a spec name in study/specs/ or a path to a .toml spec; repeatable "
                          "(default: the suite)")
    run.add_argument("--jobs", type=int, default=1,
                     help="worker processes on the same storage (default 1); each gets "
                          "max(1, cores // N) torch threads")
    run.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}")
    run.add_argument("--storage", help="Optuna storage: a SQLAlchemy URL (default "
                     "sqlite:///<repo>/mlruns/optuna.db; postgresql://... for several machines) "
                     "or a journal file path (several processes on one machine)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default "
                     "sqlite:///<repo>/mlruns/mlflow.db, artifacts beside it; or http://host:port)")
    run.add_argument("--worker", action="store_true",
                     help="join an existing study on a shared storage; create nothing else")
    run.add_argument("--only", action="append", metavar="NAME=VALUE",
                     help="run only the grid points whose dimension NAME has VALUE (e.g. "
                          "variant=vae); repeatable, all must hold")
    run.add_argument("--stop-after", type=float, metavar="MINUTES",
                     help="after this many minutes, stop running trials at their next epoch "
                          "end with a resumable state (so does SIGTERM); the same command "
                          "resumes them")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list the studies of the suite and their sizes",
                         description="Print each study's sampler, space and trial budget.")
    lst.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)}")
    lst.add_argument("--all", action="store_true", help="every spec, not only the suite")
    lst.set_defaults(func=cmd_list)

    ui = sub.add_parser("ui", help="serve the MLflow UI over the tracking store",
                        description="exec `mlflow server` with --backend-store-uri and the "
                                    "artifact folder of the store.")
    ui.add_argument("--tracking-uri", help="default sqlite:///<repo>/mlruns/mlflow.db")
    ui.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback)")
    ui.add_argument("--port", type=int, default=5000, help="default 5000")
    ui.set_defaults(func=cmd_ui)

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard over the Optuna storage",
                          description="Run optuna-dashboard over --storage.")
    dash.add_argument("--storage", help="default sqlite:///<repo>/mlruns/optuna.db")
    dash.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback)")
    dash.add_argument("--port", type=int, default=8080, help="default 8080")
    dash.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with one line on stderr for bad input)."""
    from study.tracking import redact

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return UsageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
