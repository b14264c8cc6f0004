"""One trial from start or resume to a closed run, across processes: a study stopped by
SIGTERM, or killed with SIGKILL, after a checkpoint goes on, when the same command runs
again, in the same MLflow run from the saved epoch, and ends with exactly the history and
test metrics of a study never interrupted."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from helpers import (
    DEADLINE_S,
    finish,
    interruptible_spec,
    paused,
    read_rows,
    run_args,
    start_runner,
    write_spec,
)
from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * DEADLINE_S)]

# One point, a checkpoint at every epoch end; dynamic binarization and the learning-rate
# stages of Burda et al. (1 + 3 + 9 epochs) both cross the interruption.
EPOCHS = 12
SPEC = interruptible_spec([1.0], binarize="dynamic", lr_schedule="burda", epochs=EPOCHS,
                          checkpoint_minutes=0)


def start(folder: Path, log_name: str, data_root: Path):
    """The study `resume` on the stores in `folder`, as a process of its own."""
    spec = write_spec(folder, "resume", SPEC)
    return start_runner(run_args(spec, folder), folder / log_name,
                        env={"VAE_DATA_ROOT": str(data_root)})


def checkpoint_epoch(folder: Path) -> int:
    """The newest checkpoint_epoch of any trial (0 if none or unreadable now)."""
    rows = read_rows(folder / "optuna.db", "SELECT value_json FROM trial_user_attributes "
                                          "WHERE key = 'checkpoint_epoch'")
    return max((json.loads(v) for (v,) in rows or []), default=0)


def trial_run_running(folder: Path) -> bool:
    """Whether the trial's MLflow run is still RUNNING (False if unreadable now)."""
    rows = read_rows(folder / "mlflow.db", "SELECT status FROM runs WHERE run_uuid IN (SELECT "
                    "run_uuid FROM tags WHERE key = 'run_kind' AND value = 'trial')")
    return rows is not None and [status for (status,) in rows] == ["RUNNING"]


def interrupt(folder: Path, data_root: Path, sig: int, at_epoch: int, ready) -> tuple:
    """Start the study; once epoch `at_epoch` is saved, send `sig` to its process group if
    `ready(saved epoch)` holds. The group is paused while its state is read, so nothing moves
    between that check and the signal; if the check fails (e.g. a store unreadable at that
    moment) the study goes on and is paused again later. Returns the process and the epoch
    saved when the signal was sent."""
    proc, log = start(folder, "interrupted.log", data_root), folder / "interrupted.log"
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert proc.poll() is None, "it ended before the signal:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        if checkpoint_epoch(folder) >= at_epoch:
            with paused(proc):
                saved = checkpoint_epoch(folder)
                go = saved >= at_epoch and ready(saved)
                if go:
                    os.killpg(proc.pid, sig)
            if go:
                return proc, saved
        time.sleep(0.02)


def trial_runs(folder: Path):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("resume")
    return client, client.search_runs([experiment.experiment_id], "tags.run_kind = 'trial'")


def curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) of the per-epoch curves a reader compares, in logging order."""
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in ("val/nelbo", "train/loss", "lr", "val/kl_dim_00")}


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The same study, never interrupted: its one run's curves and test metrics."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert finish(start(folder, "run.log", data_root)) == 0, (folder / "run.log").read_text()
    client, (run,) = trial_runs(folder)
    return curves(client, run.info.run_id), {k: v for k, v in run.data.metrics.items()
                                             if k.startswith("test/")}


def assert_resumed_like_uninterrupted(folder: Path, uninterrupted) -> tuple:
    expected_curves, expected_test = uninterrupted
    client, runs = trial_runs(folder)
    (run,) = runs  # the resumed trial went on in the stopped trial's run
    assert run.info.status == "FINISHED"
    assert "stop_reason" not in run.data.tags and "failure_reason" not in run.data.tags
    got = curves(client, run.info.run_id)
    assert got == expected_curves  # every epoch once, and the same numbers
    assert [s for s, _ in got["val/nelbo"]] == list(range(1, EPOCHS + 1))
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("test/")} == expected_test
    assert client.list_artifacts(run.info.run_id, "resume") == []  # deleted once finished
    study = optuna.load_study(study_name="resume-smoke", storage=f"sqlite:///{folder}/optuna.db")
    first, second = study.trials
    assert first.state.name == "FAIL" and second.state.name == "COMPLETE"
    assert first.user_attrs["mlflow_run_id"] == second.user_attrs["mlflow_run_id"] \
        == run.info.run_id
    assert second.user_attrs["resumed_from_trial"] == first.number
    assert run.data.tags["resumed_at_epoch"] == str(second.user_attrs["resumed_at_epoch"])
    return run, first, second


def test_sigterm_stops_at_an_epoch_end_and_the_same_command_resumes(tmp_path, data_root,
                                                                    uninterrupted):
    # The signal lands while the run is paused after saving epoch `saved`: it stops at the end
    # of the next epoch, or of the one after if the pause fell between that epoch's save and
    # its record. Two epochs must be left before the last, which the pause lets us check.
    proc, saved = interrupt(tmp_path, data_root, signal.SIGTERM, at_epoch=2,
                            ready=lambda saved: saved + 2 < EPOCHS)
    assert finish(proc) == 128 + signal.SIGTERM
    log = (tmp_path / "interrupted.log").read_text()
    assert "resumable (SIGTERM received)" in log and "the same command resumes them" in log

    client, (run,) = trial_runs(tmp_path)
    assert run.info.status == "KILLED"
    stopped_at = int(run.data.tags["stop_reason"].split("end of epoch ")[1].split()[0])
    assert saved + 1 <= stopped_at <= saved + 2 < EPOCHS
    assert "run the same command again to resume" in run.data.tags["stop_reason"]
    saved = [f.path for f in client.list_artifacts(run.info.run_id, "resume")]
    assert saved and all(p.startswith("resume/state-") for p in saved)
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "val/nelbo")]
    assert logged == list(range(1, stopped_at + 1))  # nothing after the stop

    again = start(tmp_path, "again.log", data_root)
    assert finish(again) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert f"resuming run {run.info.run_id} at epoch {stopped_at} of {EPOCHS}" in \
        (tmp_path / "again.log").read_text()
    _, first, second = assert_resumed_like_uninterrupted(tmp_path, uninterrupted)
    assert first.user_attrs["checkpoint_epoch"] == stopped_at == \
        second.user_attrs["resumed_at_epoch"]
    assert "SIGTERM received" in first.user_attrs["stopped"]


def test_a_killed_trial_resumes_from_its_last_checkpoint(tmp_path, data_root, uninterrupted):
    """SIGKILL lands anywhere: maybe after an epoch was logged but before it was saved. The
    re-queued trial resumes from the newest state that loads and logs no epoch twice."""
    proc, _ = interrupt(tmp_path, data_root, signal.SIGKILL, at_epoch=3,
                        ready=lambda _: trial_run_running(tmp_path))
    proc.wait()
    client, (run,) = trial_runs(tmp_path)
    assert run.info.status == "RUNNING"  # the kill landed inside the trial

    again = start(tmp_path, "again.log", data_root)
    assert finish(again) == 0, (tmp_path / "again.log").read_text()[-3000:]
    log = (tmp_path / "again.log").read_text()
    assert "FAILED: worker process" in log and f"resuming run {run.info.run_id}" in log
    _, first, second = assert_resumed_like_uninterrupted(tmp_path, uninterrupted)
    assert second.system_attrs.get("failed_trial") == first.number  # the re-queued trial
    assert second.user_attrs["resumed_at_epoch"] >= 3
