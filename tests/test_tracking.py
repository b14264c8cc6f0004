"""MLflow tracking on a real SQLite store: what a run is named, what a finished run's final
metrics are, a resumed logger that logs no epoch twice, and the resumable states a run
keeps under resume/ (two slots, the newest that loads, deleted when it finishes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from study.config import Config
from study.tracking import ResumeStates, Tracker, TrialLogger, final_metrics, last_logged_epoch, run_name
from study.train import TrainResult


@pytest.mark.parametrize("config, variant, name", [
    (Config(), None, "mnist bernoulli β=1 z=20 s0"),
    (Config(dataset="fashion", likelihood="gaussian", beta=0.5, latent_dim=4, seed=2), None,
     "fashion gaussian β=0.5 z=4 s2"),
    (Config(likelihood="gaussian_optimal", beta=1 / 3, latent_dim=8), None,
     "mnist gaussian_optimal β=0.333 z=8 s0"),
    (Config(beta=16.0, latent_dim=50), "iwae_k50", "mnist bernoulli β=16 z=50 s0 iwae_k50"),
])
def test_run_name_says_what_was_trained(config, variant, name):
    assert run_name(config, variant) == name


def result_of(likelihood: str, beta: float, test: dict, history: list[dict]) -> TrainResult:
    return TrainResult(Config(likelihood=likelihood, beta=beta), model=None, likelihood=None,
                       history=history, test=test)


def test_final_metrics_are_the_test_metrics_and_what_only_the_end_knows():
    history = [{"val/nelbo": 110.0, "likelihood/sigma": 0.2},
               {"val/nelbo": 100.0, "likelihood/sigma": 0.1}]
    test = {"nelbo": 101.5, "iwae_k": 5, "calibrated": True}
    out = final_metrics(result_of("gaussian_optimal", 4.0, test, history))
    assert out == pytest.approx({
        "test/nelbo": 101.5, "test/iwae_k": 5,  # numbers only: no flag
        "converge/val_nelbo_change": 10.0, "converge/val_nelbo_share": 1.0,
        "converge/log_sigma_change": math.log(0.5),
        "likelihood/sse_equivalent_beta": 2 * 0.1**2 * 4.0,  # beta 2 sigma^2 scales the SSE
    })
    bernoulli = final_metrics(result_of("bernoulli", 4.0, test, history[:1]))
    assert bernoulli == {"test/nelbo": 101.5, "test/iwae_k": 5}  # one epoch: no trend


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


def test_resumable_states_alternate_slots_and_are_deleted_at_the_end(tracker):
    """Each save goes to the slot the last one did not use, so a kill while writing one
    leaves the other; `newest` finds the newest state that loads; `discard` deletes them."""
    run_id = tracker.start_run(tracker.experiment_id("states"), "run", {})
    states = ResumeStates(tracker, run_id)
    assert ResumeStates.newest(tracker, run_id) is None
    states.discard()  # nothing saved: nothing to delete
    for epoch in (1, 2, 3):
        states.save({"epoch": epoch, "weights": torch.full((3,), float(epoch))})
    state, slot = ResumeStates.newest(tracker, run_id)
    assert (state["epoch"], slot) == (3, "state-a.pt")  # a, b, a
    assert torch.equal(state["weights"], torch.full((3,), 3.0))

    folder = Path(tracker.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    cut = folder / "resume" / "state-a.pt"
    os.truncate(cut, cut.stat().st_size // 2)  # as a kill while writing it would leave it
    state, slot = ResumeStates.newest(tracker, run_id)
    assert (state["epoch"], slot) == (2, "state-b.pt")

    states.discard()
    assert tracker.client.list_artifacts(run_id, "resume") == []
    assert not (folder / "resume").exists()
    assert ResumeStates.newest(tracker, run_id) is None
    assert states.last_slot is None
