"""MLflow tracking on a real SQLite store: a resumed logger logs no epoch twice."""

from __future__ import annotations

import pytest

from study.tracking import Tracker, TrialLogger, last_logged_epoch


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db")


def test_a_resumed_logger_skips_the_epochs_already_in_the_run(tracker):
    """After a kill between logging an epoch and saving it, the resumed trial recomputes that
    epoch (the same numbers); TrialLogger does not log it a second time."""
    run_id = tracker.start_run(tracker.experiment_id("resume-logger"), "run", {})
    first = TrialLogger(tracker, run_id)
    for epoch in (1, 2, 3):
        first.on_epoch(epoch, {"val/nelbo": 100.0 - epoch, "epoch_seconds": 0.1})
    assert last_logged_epoch(tracker, run_id) == 3
    resumed = TrialLogger(tracker, run_id, logged_through=last_logged_epoch(tracker, run_id))
    for epoch in (3, 4):  # resumed from a state saved at epoch 2
        resumed.on_epoch(epoch, {"val/nelbo": 100.0 - epoch, "epoch_seconds": 0.1})
    history = tracker.client.get_metric_history(run_id, "val/nelbo")
    assert [(m.step, m.value) for m in history] == [(1, 99.0), (2, 98.0), (3, 97.0), (4, 96.0)]
