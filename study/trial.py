"""One trial, from start or resume to a closed MLflow run: what Optuna calls for each trial.

The steps, in order (`TrialRunner.__call__`):
1. claim: the grid point (or searched params) and who runs it; a point another worker took
   at the same moment is stepped aside from, before any run exists;
2. the trial's Config and its data splits (a data error creates no run);
3. open the run: a new child run of the invocation's study run, or, when an earlier trial of
   this point was stopped or its worker died after saving a resumable state, that trial's
   run, reopened, with its newest state (`find_resumable`);
4. train, logging every epoch; a stop (SIGTERM, --stop-after, a dead runner) saves a state
   and ends the run KILLED; pruning ends it KILLED; a failure ends it FAILED (`close_run`);
5. finish: figures, checkpoint, test metrics and times, then the run ends FINISHED.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from study.classifier import Classifiers
from study.data import SPLIT_FIELDS, Splits, dataset_digest, splits_for
from study.errors import UsageError
from study.grid import NoPointLeft, point_key
from study.liveness import say, worker_process
from study.resume import Checkpointing, TrainingStopped, resume_problem
from study.specs import VARIANT, Spec
from study.tracking import (
    ResumeStates,
    Tracker,
    TrialLogger,
    environment_tags,
    final_metrics,
    last_logged_epoch,
    log_trial_artifacts,
    run_name,
)
from study.train import Callback, NonFiniteLoss, resolve_device, train
from study.trial_figures import TrialFigures


class TrialFailed(Exception):
    """A trial failed (diverged, crashed, was stopped); the study records it and goes on."""


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


class SplitsCache:
    """Data splits loaded once per worker process, shared by trials whose data fields match."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: dict = {}

    def get(self, config, device: str) -> Splits:
        key = (device, *(getattr(config, name) for name in SPLIT_FIELDS))
        if key not in self.entries:
            self.entries[key] = splits_for(config, device)
            while len(self.entries) > self.size:
                self.entries.pop(next(iter(self.entries)))  # the oldest
        self.entries[key] = self.entries.pop(key)  # now the newest
        return self.entries[key]


@dataclass
class WorkerTools:
    """What a worker process keeps across its trials: loaded splits, classifiers, figures."""

    splits: SplitsCache
    classifiers: Classifiers
    figures: TrialFigures = field(default_factory=TrialFigures)


@dataclass
class OpenRun:
    """The MLflow run a trial trains in, and where it picks up."""

    run_id: str
    state: dict | None = None
    """The resumable state to go on from (None: from the start)."""
    slot: str | None = None
    logged_through: int = 0
    """Epochs whose metrics the run already holds (logged before a kill)."""
    before: dict = field(default_factory=dict)
    """The times of the run's earlier parts."""


class PartTimes:
    """This trial's share of its run's time (a resumed run's earlier parts are not in it)."""

    def __init__(self, t_setup: float, setup_seconds: float, logger: TrialLogger,
                 states: ResumeStates, before: dict):
        self.t_setup, self.setup_seconds = t_setup, setup_seconds
        self.logger, self.states, self.before = logger, states, before
        self.t_train = time.perf_counter()

    def part(self, final_seconds: float = 0.0) -> dict[str, float]:
        tracking = self.logger.seconds + self.states.seconds
        now = time.perf_counter()
        return {"train_seconds": now - self.t_train - tracking - final_seconds,
                "tracking_seconds": self.logger.seconds,
                "tracking_total_seconds": self.setup_seconds + tracking + final_seconds,
                "run_seconds": now - self.t_setup}

    def record(self, trial, final_seconds: float = 0.0) -> dict[str, float]:
        """Set this trial's times as user attrs; return the run's (all parts) as metrics."""
        part = self.part(final_seconds)
        for key, value in part.items():
            trial.set_user_attr(key, value)
        return {f"time/{k}": v + self.before.get(k, 0.0) for k, v in part.items()}

    def with_state(self, state: dict) -> dict:
        """`state` carrying the run's times so far, for the part that resumes it."""
        state["runner_seconds"] = {k: v + self.before.get(k, 0.0) for k, v in self.part().items()}
        return state


class ReportToPruner(Callback):
    """The validation objective goes to Optuna every epoch (pruners and the dashboard)."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch(self, epoch, metrics):
        value = metrics[self.metric]
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.metric} = {value:.4g})")


class EpochBar(Callback):
    def __init__(self, trial_number: int, epochs: int, done: int, enabled: bool):
        self.bar = tqdm(total=epochs, initial=done, desc=f"  trial {trial_number}",
                        unit="epoch", leave=False, disable=not enabled)

    def on_epoch(self, epoch, metrics):
        self.bar.set_postfix_str(f"val/nelbo {metrics.get('val/nelbo', float('nan')):.1f}")
        self.bar.update(1)


class TrialRunner:
    """Runs one trial of `spec` for Optuna (`study.optimize(TrialRunner(...))`); see the
    module docstring for its steps. `stop` is the worker's StopRequest."""

    def __init__(self, spec: Spec, job: Job, tracker: Tracker, tools: WorkerTools,
                 storage_label: str, stop):
        self.spec, self.job, self.tracker, self.tools = spec, job, tracker, tools
        self.storage_label, self.stop = storage_label, stop

    def __call__(self, trial):
        params = self.claim(trial)
        config = self.spec.config_for(
            params, device=self.job.device, threads=self.job.threads,
            data_root=self.job.data_root,
            extra={"study": self.spec.name, "optuna_study": self.spec.study_name,
                   "profile": self.spec.profile, "trial": trial.number})
        device = resolve_device(config.device)
        splits = self.tools.splits.get(config, device)
        classifier = self.tools.classifiers.get(config.dataset, device)
        t_setup = time.perf_counter()
        run = self.open_run(trial, params, config, device)
        logger = TrialLogger(self.tracker, run.run_id, run.logged_through)
        states = ResumeStates(self.tracker, run.run_id, last_slot=run.slot)
        times = PartTimes(t_setup, time.perf_counter() - t_setup, logger, states, run.before)
        bar = EpochBar(trial.number, config.epochs, run.state["epoch"] if run.state else 0,
                       self.job.progress)
        callbacks = [logger]  # tracking first, so a pruned epoch is logged
        if len(self.spec.objectives) == 1:  # Optuna cannot report several intermediate values
            callbacks.append(ReportToPruner(trial, self.spec.metrics[0]))

        def save(state: dict) -> None:
            states.save(times.with_state(state))
            trial.set_user_attr("checkpoint_epoch", state["epoch"])

        try:
            result = train(config, [*callbacks, bar], splits=splits, resume=run.state,
                           checkpointing=Checkpointing(save=save, stop=self.stop),
                           classifier=classifier)
        except BaseException as exc:
            bar.bar.close()
            raised = self.close_run(trial, run.run_id, config, times, exc)
            if raised is exc:
                raise
            raise raised from exc
        bar.bar.close()
        return self.finish(trial, run.run_id, config, splits, result, times, states)

    # -- 1. claim
    def claim(self, trial) -> dict:
        """The trial's params, recorded with who runs it; TrialFailed (no run yet) when a
        grid point was taken by another worker at the same moment."""
        try:
            params = self.spec.suggest(trial)
        except NoPointLeft as exc:
            trial.set_user_attr("duplicate_of", -1)
            raise TrialFailed("no grid point left for this worker") from exc
        trial.set_user_attr("invocation", self.job.invocation)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("worker_process", worker_process(trial.number))
        if self.spec.sampler == "grid":
            self.refuse_duplicate(trial, params)
        return params

    def refuse_duplicate(self, trial, params) -> None:
        """Two workers that picked the same point at once: the later trial steps aside."""
        key = point_key(self.spec, params)
        for other in trial.study.get_trials(deepcopy=False):
            if other.number == trial.number or point_key(self.spec, other.params) != key:
                continue
            if other.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                    other.state == TrialState.RUNNING and other.number < trial.number
                    and "duplicate_of" not in other.user_attrs):
                trial.set_user_attr("duplicate_of", other.number)
                raise TrialFailed(f"grid point already taken by trial {other.number}")

    # -- 3. open the run
    def open_run(self, trial, params: dict, config, device: str) -> OpenRun:
        """A new child run of the invocation, or the run of an earlier trial of this point
        reopened at its newest resumable state."""
        spec = self.spec
        name = run_name(config, params.get(VARIANT))
        tags = {"study": spec.name, "profile": spec.profile, "trial_number": trial.number,
                "run_kind": "trial", "optuna_study": spec.study_name,
                "optuna_storage": self.storage_label, "dataset": config.dataset,
                "dataset_digest": dataset_digest(config.dataset), **environment_tags(device)}
        run_params = config.as_params()
        if VARIANT in params:
            tags[VARIANT] = run_params[VARIANT] = params[VARIANT]
        found = self.find_resumable(trial, params, config)
        if found is None:
            run = OpenRun(self.tracker.start_run(self.job.experiment_id, name, tags, run_params,
                                                 parent_run_id=self.job.invocation))
        else:
            run, earlier = found
            trial.set_user_attr("mlflow_run_id", run.run_id)  # claimed before it runs again
            self.tracker.reopen_run(run.run_id, name, {
                **tags, "resumed_from_trial": earlier, "resumed_at_epoch": run.state["epoch"]})
            run.logged_through = last_logged_epoch(self.tracker, run.run_id)
            trial.set_user_attr("resumed_from_trial", earlier)
            trial.set_user_attr("resumed_at_epoch", run.state["epoch"])
            say(f"{name}: resuming run {run.run_id} at epoch {run.state['epoch']} of "
                f"{config.epochs} (saved by trial {earlier})")
        trial.set_user_attr("mlflow_run_id", run.run_id)
        return run

    def find_resumable(self, trial, params: dict, config) -> tuple[OpenRun, int] | None:
        """The run and newest resumable state saved by an earlier trial at this point that was
        stopped or whose worker died (not one that failed in training: resuming would fail
        again), with that trial's number, if the state still fits the config; else None."""
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
                say(f"trial {trial.number}: not resuming run {run_id} ({problem}); training "
                    f"from the start")
                return None
            return OpenRun(run_id, state, slot, before=state.get("runner_seconds", {})), t.number
        return None

    # -- 4. a run that ends early
    def close_run(self, trial, run_id: str, config, times: PartTimes,
                  exc: BaseException) -> BaseException:
        """End the run as `exc` says (stopped or pruned: KILLED; failed: FAILED) and return
        the exception the trial raises: TrialFailed for a failure the study goes on after."""
        tracker = self.tracker
        if isinstance(exc, TrainingStopped):
            reason = f"{exc} ({self.stop.reason}); run the same command again to resume from there"
            trial.set_user_attr("stopped", reason)
            tracker.log_metrics(run_id, times.record(trial), step=exc.epoch)
            tracker.end_run(run_id, "KILLED", reason=reason)
            say(f"{self.spec.study_name}/trial-{trial.number:04d} stopped at the end of epoch "
                f"{exc.epoch} of {config.epochs}, resumable ({self.stop.reason})")
            return TrialFailed(reason)
        if isinstance(exc, optuna.TrialPruned):
            tracker.set_tags(run_id, {"pruned": str(exc)})
            tracker.log_metrics(run_id, times.record(trial), step=0)
            tracker.end_run(run_id, "KILLED")
            return exc
        if isinstance(exc, UsageError):
            tracker.end_run(run_id, "FAILED", reason=str(exc))
            return exc
        if isinstance(exc, Exception):  # the study goes on after a failed trial
            reason = str(exc) if isinstance(exc, NonFiniteLoss) \
                else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("failure_reason", reason)
            tracker.log_metrics(run_id, times.record(trial), step=0)
            tracker.end_run(run_id, "FAILED", reason=reason)
            say(f"{self.spec.study_name}/trial-{trial.number:04d} FAILED: {reason} (the study "
                f"goes on)")
            return TrialFailed(reason)
        tracker.end_run(run_id, "KILLED", reason="interrupted")  # not a failure: stopped
        return exc

    # -- 5. finish
    def finish(self, trial, run_id: str, config, splits, result, times: PartTimes,
               states: ResumeStates):
        """Artifacts, then the test metrics and times in one batch; the run ends FINISHED,
        its resumable states are deleted, and the trial's objective values are returned to
        Optuna."""
        values = [result.final[m] for m in self.spec.metrics]
        t_final = time.perf_counter()
        try:
            log_trial_artifacts(self.tracker, run_id, result, splits, self.tools.figures)
            final = final_metrics(result)
            final.update(times.record(trial, time.perf_counter() - t_final))
            self.tracker.log_metrics(run_id, final, step=config.epochs)
        except Exception as exc:
            self.tracker.end_run(run_id, "FAILED", reason=f"logging results failed: {exc}")
            raise TrialFailed(f"logging results failed: {exc}") from exc
        if not all(v == v and abs(v) != float("inf") for v in values):
            reason = f"non-finite objective {dict(zip(self.spec.metrics, values, strict=True))}"
            trial.set_user_attr("failure_reason", reason)
            self.tracker.end_run(run_id, "FAILED", reason=reason)
            raise TrialFailed(reason)
        self.tracker.end_run(run_id, "FINISHED")
        try:
            states.discard()
        except Exception as exc:  # the result stands; the states only take room
            say(f"{self.spec.study_name}: run {run_id} finished, but its resumable states "
                f"were not deleted ({type(exc).__name__}: {exc})")
        return values[0] if len(values) == 1 else tuple(values)
