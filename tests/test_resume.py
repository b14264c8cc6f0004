"""Resumable states of a training run: a run stopped at an epoch end and resumed from its
saved state ends exactly as one never stopped; states are saved at the configured cadence;
`resume_problem` says why a state cannot continue a run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import Recorder, same_but_time

from study.resume import RESUME_FORMAT, RUN_ONLY_FIELDS, Checkpointing, TrainingStopped, resume_problem
from study.train import train


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tiny_config, tmp_path):
    """Stop at an epoch end, save, load with weights_only (what a checkpoint file allows),
    resume: the weights, Adam's moments, history and test metrics are those of a run that was
    never stopped (dynamic binarization and a learning-rate stage change cross the stop)."""
    config = tiny_config.replace(epochs=5, train_subset=600, binarize="dynamic",
                                 lr_schedule="burda", test_iw_k=5, checkpoint_minutes=60)
    straight = train(config)

    saved = []
    stop_after_epoch = 2
    checkpointing = Checkpointing(save=saved.append,
                                  stop=lambda: len(rec.epochs) == stop_after_epoch)
    rec = Recorder()
    with pytest.raises(TrainingStopped, match="stopped at the end of epoch 2 of 5") as stopped:
        train(config, [rec], checkpointing=checkpointing)
    assert stopped.value.epoch == 2 and len(saved) == 1  # 60 minutes never passed: one save
    path = tmp_path / "state.pt"
    torch.save(saved[0], path)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert resume_problem(config, state) is None
    assert "latent_dim 20 -> 8" in resume_problem(config.replace(latent_dim=8), state)
    assert resume_problem(config.replace(threads=1, checkpoint_minutes=0), state) is None

    rec = Recorder()
    resumed = train(config, [rec], resume=state)
    assert [e for e, _ in rec.epochs] == [3, 4, 5]  # only the epochs not yet run
    assert same_but_time(resumed.history, straight.history)
    assert resumed.test == straight.test
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.seconds >= state["seconds"]


def test_checkpoints_follow_the_cadence(tiny_config):
    """checkpoint_minutes = 0 saves at every epoch end but the last; a finished run is never
    saved (it needs no resuming)."""
    saved = []
    config = tiny_config.replace(epochs=3, train_subset=300, checkpoint_minutes=0, test_iw_k=2)
    train(config, checkpointing=Checkpointing(save=saved.append), evaluate_at_end=False)
    assert [s["epoch"] for s in saved] == [1, 2]
    assert [len(s["history"]) for s in saved] == [1, 2]
    assert "checkpoint_minutes must be >= 0" in " ".join(
        config.replace(checkpoint_minutes=-1).validate())


def test_a_state_saved_before_a_field_existed_resumes_with_its_default(tiny_config):
    """A resumable state whose config predates `optimizer` and `init` was made with their
    defaults: it resumes a run with the defaults and is refused by one with other values."""
    config = tiny_config.replace(epochs=3)
    old = dataclasses.asdict(config)
    del old["optimizer"], old["init"]
    state = {"format": 1, "config": old, "epoch": 1}
    assert resume_problem(config, state) is None
    problem = resume_problem(config.replace(optimizer="adam_burda"), state)
    assert problem and "optimizer 'adam' -> 'adam_burda'" in problem


@pytest.mark.parametrize("change, problem", [
    (dict(format=RESUME_FORMAT + 1), f"resume format {RESUME_FORMAT + 1}, expected {RESUME_FORMAT}"),
    (dict(epoch=3), "the state is at epoch 3 of 3"),
    (dict(epoch=0), "the state is at epoch 0 of 3"),
    (dict(config_change=dict(beta=2.0)), "beta 2.0 -> 1.0"),
    (dict(config_change=dict(hidden=[400, 200])), "hidden [400, 200] -> (400,)"),
    *[(dict(config_change={name: value}), None) for name, value in
      zip(RUN_ONLY_FIELDS, ("cuda", 7, True, 0.0, "/elsewhere"), strict=True)],
])
def test_resume_problem_names_what_differs(tiny_config, change, problem):
    """Another format, a state at no epoch the run can go on from, or a config that computes
    something else are refused; the fields that only say where and how fast a run trains
    (RUN_ONLY_FIELDS) may differ."""
    config = tiny_config.replace(epochs=3)
    saved = {**dataclasses.asdict(config), **change.get("config_change", {})}
    state = {"format": change.get("format", RESUME_FORMAT), "config": saved,
             "epoch": change.get("epoch", 1)}
    found = resume_problem(config, state)
    if problem is None:
        assert found is None
    else:
        assert problem in found, found
