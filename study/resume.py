"""Resumable states of a training run: what one holds, whether it can continue a run of a
given config, and how training is asked to stop and save at an epoch end.

A state holds the weights, Adam's moments, the noise generator, the counters, the history so
far and the config, as plain types and tensors (`torch.load(..., weights_only=True)` reads
it). `train(config, resume=state)` goes on from it and ends with what a run never stopped
would have computed. Where a trial finds its run's newest state: `study.trial`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from study.config import Config

RESUME_FORMAT = 1
RUN_ONLY_FIELDS = ("device", "threads", "compile", "checkpoint_minutes", "data_root")
"""Fields that say where and how fast a run trains, not what it computes: a run may resume
with other values of these (another device, thread count, compile setting or checkpoint
cadence, another data folder) and still produce the run it started."""


class TrainingStopped(Exception):
    """Training stopped at an epoch end because `Checkpointing.stop` asked; the state of that
    epoch end was saved first, so a later `train(..., resume=state)` goes on from it."""

    def __init__(self, epoch: int, epochs: int):
        super().__init__(f"stopped at the end of epoch {epoch} of {epochs}")
        self.epoch = epoch


@dataclass
class Checkpointing:
    """How `train` saves resumable states. `save(state)` receives a resumable state at the
    first epoch end `config.checkpoint_minutes` after the previous save (or the start), and at
    the epoch end where `stop()` first returns True; `train` then raises TrainingStopped.
    Nothing is saved after the last epoch: a finished run needs no resuming."""

    save: Callable[[dict], None]
    stop: Callable[[], bool] = lambda: False


def resume_state(trainer_state: dict, history: list[dict], seconds: float,
                 config: Config) -> dict:
    """A resumable state from a Trainer's state_dict, the history so far and the seconds
    trained so far."""
    return {"format": RESUME_FORMAT, **trainer_state,
            "history": [dict(row) for row in history], "seconds": seconds,
            "config": dataclasses.asdict(config)}


def resume_problem(config: Config, state: dict) -> str | None:
    """Why `state` cannot continue a run of `config` (None when it can): another format, or a
    config that differs in a field that changes the result."""
    if state.get("format") != RESUME_FORMAT:
        return f"resume format {state.get('format')!r}, expected {RESUME_FORMAT}"
    # A field added after the state was saved had its default then.
    saved = {**dataclasses.asdict(Config()), **state.get("config", {})}
    ours = dataclasses.asdict(config)
    differ = [name for name in Config.field_names()
              if name not in RUN_ONLY_FIELDS and _plain(saved[name]) != _plain(ours[name])]
    if differ:
        return "the config changed since the state was saved: " + ", ".join(
            f"{name} {saved.get(name)!r} -> {ours[name]!r}" for name in differ)
    if not 0 < state.get("epoch", 0) < config.epochs:
        return f"the state is at epoch {state.get('epoch')} of {config.epochs}"
    return None


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value
