"""MLflow tracking for studies: experiments, the parent run of each study invocation and one
child run per trial, batched metric logging during training, the final metrics, checkpoint
and figures, and the resumable states kept as run artifacts.

Runs are written through `MlflowClient` (no fluent active-run state, so nothing leaks between
trials or threads). A trial's run is linked to its study invocation's parent run by the
`mlflow.parentRunId` tag, which is exactly what `mlflow.start_run(parent_run_id=...)` writes;
`nested=True` is never used (it makes orphans when trials run in parallel).

Every logged value is per image: nats for likelihood terms (summed over pixels and latent
dimensions, averaged over images), SSE summed over pixels and averaged over images.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow.artifacts
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.errors import UsageError
from study.evaluate import convergence
from study.paths import PACKAGE_PARENT
from study.stores import artifact_root, redact, sqlite_path, tune_sqlite
from study.train import Callback, TrainResult
from study.trial_figures import TrialFigures

NOTE = "mlflow.note.content"
"""The tag MLflow's UI shows as an experiment's or a run's description."""
EXPERIMENT_KIND = "mlflow.experimentKind"
"""The experiment tag MLflow's UI reads to choose its model-training view over the GenAI one."""
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_TAG_LENGTH = 5000


@functools.cache
def git_state(repo: str = str(PACKAGE_PARENT)) -> tuple[str, str]:
    """(commit, dirty) of the working tree: dirty is "true" when tracked files differ."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, dirty


@functools.cache
def machine_name(device: str) -> str:
    """What ran the trial: the GPU's name on cuda, else the CPU model from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def environment_tags(device: str) -> dict[str, str]:
    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "device": device,
            "machine": machine_name(device), "torch_version": torch.__version__}


# --------------------------------------------------------------------------- runs


def run_name(config, variant: str | None = None) -> str:
    """What a run trained, as the MLflow UI lists it: `fashion gaussian β=1 z=20 s0`, plus
    the variant of a study that has them."""
    name = (f"{config.dataset} {config.likelihood} β={config.beta:.3g} z={config.latent_dim} "
            f"s{config.seed}")
    return f"{name} {variant}" if variant else name


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One MLflow store: experiments, parent and trial runs, batched logging."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.artifacts = artifact_root(tracking_uri)
        if sqlite_path(tracking_uri) is not None:
            tune_sqlite()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._artifact_uris: dict[str, str] = {}  # run id -> artifact URI, from create_run

    def experiment_id(self, name: str, create: bool = True) -> str:
        """The experiment `name` (restored if deleted), created with an explicit artifact
        location under the artifact root when `create`."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        if not create:
            raise UsageError(f"no MLflow experiment {name!r} in {redact(self.uri)}; start the "
                             f"study first (make study STUDY=...) before joining it")
        location = None
        if self.artifacts is not None:
            folder = self.artifacts / re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
            location = folder.as_uri()
        try:  # MLflow 3's UI opens experiments in its GenAI view unless told they train models
            return self.client.create_experiment(
                name, artifact_location=location,
                tags={EXPERIMENT_KIND: "custom_model_development"})
        except MlflowException as exc:  # another process created it since we looked
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, experiment_id: str, name: str, tags: dict, params: dict | None = None,
                  parent_run_id: str | None = None) -> str:
        tags = {k: redact(str(v))[:MAX_TAG_LENGTH] for k, v in tags.items()}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(experiment_id, tags=tags, run_name=name)
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One log_batch call for all of `metrics` at `step` (non-numbers are skipped)."""
        self.log_metric_rows(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        now = _now_ms()
        items = [Metric(k, float(v), now, int(s)) for k, v, s in rows
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))[:MAX_TAG_LENGTH])
                                            for k, v in tags.items()])

    def end_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run FINISHED, KILLED (pruned, interrupted; `reason` as `stop_reason`) or
        FAILED (`reason` as `failure_reason`)."""
        if reason:
            self.set_tags(run_id, {"failure_reason" if status == "FAILED" else "stop_reason": reason})
        self.client.set_terminated(run_id, status=status, end_time=_now_ms())
        self._artifact_uris.pop(run_id, None)

    def reopen_run(self, run_id: str, name: str, tags: dict) -> None:
        """Set a stopped or failed run RUNNING again (a resumed trial goes on in it): new name
        and `tags`, the old end's failure_reason / stop_reason removed."""
        run = self.client.get_run(run_id)
        for key in ("failure_reason", "stop_reason"):
            if key in run.data.tags:
                self.client.delete_tag(run_id, key)
        self.client.update_run(run_id, status="RUNNING", name=name)
        self.set_tags(run_id, tags)
        self._artifact_uris[run_id] = run.info.artifact_uri

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Every file of `folder` into the run's artifacts (under `artifact_path`). For a run
        this tracker created, the artifact repository comes from the URI create_run returned;
        MlflowClient would first fetch the whole run (params, tags, latest metrics) each call."""
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            self.client.log_artifacts(run_id, str(folder), artifact_path)
            return
        get_artifact_repository(uri, tracking_uri=self.uri).log_artifacts(str(folder),
                                                                          artifact_path)


class TrialLogger(Callback):
    """Logs a trial's curves to its run, one log_batch call per step, and times itself.

    Per epoch (step = epoch number): every key of the engine's epoch metrics (train/*, val/*,
    val/kl_dim_<jj>, beta, lr, epoch_seconds, likelihood/sigma). Within the first epoch, every
    `step_log_every` optimizer steps (step = global step): `step/train_recon`, `step/train_kl`
    and `step/beta`. These keys are distinct from the per-epoch `train/recon`, `train/kl` and
    `beta` on purpose: one metric key must have one x-axis, and mixing global steps with epoch
    numbers in one series would make the curves unreadable. The engine hands the first-epoch
    steps over together after that epoch; they go in the same log_batch as the epoch's values.

    `seconds` is the wall time spent inside this callback: the tracking cost during training.
    """

    STEP_KEYS = {"train/recon": "step/train_recon", "train/kl": "step/train_kl",
                 "beta": "step/beta"}

    def __init__(self, tracker: Tracker, run_id: str, logged_through: int = 0):
        self.tracker, self.run_id = tracker, run_id
        self.logged_through = logged_through
        """A resumed run's epochs up to here are in the store already (logged before a kill,
        after the last checkpoint): their recomputed values, the same numbers, are not
        logged twice."""
        self.seconds = 0.0
        self._pending: list[tuple[str, float, int]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        t = time.perf_counter()
        self._pending += [(self.STEP_KEYS.get(k, f"step/{k}"), v, step) for k, v in metrics.items()]
        self.seconds += time.perf_counter() - t

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch <= self.logged_through:
            return
        t = time.perf_counter()
        rows, self._pending = self._pending, []
        rows += [(k, v, epoch) for k, v in metrics.items()]
        self.tracker.log_metric_rows(self.run_id, rows)
        self.seconds += time.perf_counter() - t


# --------------------------------------------------------------------------- results


def final_metrics(result: TrainResult) -> dict[str, float]:
    """`test/<key>` for every key the engine's test evaluation returns, plus quantities that
    only exist at the end: how settled the run was (`converge/*`, study.evaluate.convergence)
    and the SSE-equivalent beta of a learned or calibrated Gaussian sigma."""
    out = {f"test/{k}": v for k, v in result.test.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update(convergence(result.history))
    config = result.config
    if config.likelihood in ("gaussian_learned", "gaussian_optimal") \
            and result.final.get("likelihood/sigma"):
        sigma = result.final["likelihood/sigma"]
        out["likelihood/sse_equivalent_beta"] = 2 * sigma**2 * config.beta
    return out


def save_checkpoint(result: TrainResult, path: Path) -> None:
    """Plain types only, so `torch.load(path, weights_only=True)` reads it back."""
    torch.save({
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "likelihood_state": {k: v.detach().cpu() for k, v in result.likelihood.state_dict().items()},
        "config": dataclasses.asdict(result.config),
    }, path)



RESUME_ARTIFACTS = "resume"
RESUME_SLOTS = ("state-a.pt", "state-b.pt")
"""A run's resumable state alternates between two artifact files, so that a kill while one
is being written leaves the other, one checkpoint older, to resume from."""


class ResumeStates:
    """Saves a trial's resumable states (`study.train.resume_state`) as artifacts of its run,
    under resume/, and finds the newest one that loads. Loading uses weights_only=True."""

    def __init__(self, tracker: Tracker, run_id: str, last_slot: str | None = None):
        self.tracker, self.run_id = tracker, run_id
        self.last_slot = last_slot
        self.seconds = 0.0

    def save(self, state: dict) -> None:
        t = time.perf_counter()
        slot = RESUME_SLOTS[1] if self.last_slot == RESUME_SLOTS[0] else RESUME_SLOTS[0]
        with tempfile.TemporaryDirectory(prefix="vae-resume-") as tmp:
            torch.save(state, Path(tmp) / slot)
            self.tracker.log_artifacts(self.run_id, Path(tmp), RESUME_ARTIFACTS)
        self.last_slot = slot
        self.seconds += time.perf_counter() - t

    def discard(self) -> None:
        """Delete the run's resumable states: a finished run needs no resuming, and each
        state holds the weights and Adam's moments (three times the model)."""
        if self.last_slot is None:
            return
        run = self.tracker.client.get_run(self.run_id)
        repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.tracker.uri)
        repository.delete_artifacts(RESUME_ARTIFACTS)
        self.last_slot = None

    @staticmethod
    def newest(tracker: Tracker, run_id: str) -> tuple[dict, str] | None:
        """(state, slot) of the newest state of `run_id` that loads; None if it has none."""
        names = {Path(f.path).name for f in tracker.client.list_artifacts(run_id, RESUME_ARTIFACTS)}
        best = None
        with tempfile.TemporaryDirectory(prefix="vae-resume-") as tmp:
            for slot in RESUME_SLOTS:
                if slot not in names:
                    continue
                try:
                    path = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=f"{RESUME_ARTIFACTS}/{slot}", dst_path=tmp,
                        tracking_uri=tracker.uri)
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception:  # a file cut short by a kill: the other slot is older
                    continue
                if best is None or state.get("epoch", 0) > best[0].get("epoch", 0):
                    best = (state, slot)
        return best


def last_logged_epoch(tracker: Tracker, run_id: str) -> int:
    """The last epoch whose per-epoch metrics are in the run (0 if none)."""
    history = tracker.client.get_metric_history(run_id, "epoch_seconds")
    return max((m.step for m in history), default=0)


def log_trial_artifacts(tracker: Tracker, run_id: str, result: TrainResult, splits,
                        figures: TrialFigures) -> None:
    """The figures and checkpoint of a finished trial, written to a temporary folder and
    logged in one call."""
    with tempfile.TemporaryDirectory(prefix="vae-artifacts-") as tmp:
        figures.write(result, splits, Path(tmp))
        save_checkpoint(result, Path(tmp) / "checkpoint.pt")
        tracker.log_artifacts(run_id, Path(tmp))
