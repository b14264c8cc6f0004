"""Training budgets in epochs and optimizer steps, read from the runs' params, and which of a
store's profiles is the long reference and which the default: what the ladder and the
default-versus-long table compare."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from analysis.runs import FINISHED, RunStore

OFFICIAL_TRAIN_IMAGES = 60_000
"""Images in the official train split of MNIST and of Fashion-MNIST; a run's training images
are these less its validation carve (`val_size`), or its `train_subset`."""
DEFAULT_PROFILE = "default"


def _param(row: Mapping, name: str):
    value = row.get(name) if isinstance(row, Mapping) or hasattr(row, "get") else \
        getattr(row, name, None)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "None":
        return None
    return value


def train_images(row) -> int:
    """Training images of a run (a frame row or a Config)."""
    subset = _param(row, "train_subset")
    val = _param(row, "val_size")
    full = OFFICIAL_TRAIN_IMAGES - int(float(val if val is not None else 5000))
    return min(int(float(subset)), full) if subset is not None else full


def steps_per_epoch(row) -> int:
    """Optimizer steps per epoch: ceil(training images / batch_size), the last batch smaller."""
    return math.ceil(train_images(row) / int(float(_param(row, "batch_size") or 128)))


@dataclass(frozen=True)
class Budget:
    epochs: int
    steps_per_epoch: int
    batch_size: int
    images: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def text(self, epochs: int | None = None) -> str:
        """`10 epochs (4,300 steps)`, or the same for another number of epochs."""
        e = self.epochs if epochs is None else epochs
        return f"{e:g} epoch{'s' if e != 1 else ''} ({e * self.steps_per_epoch:,} steps)"

    def how(self) -> str:
        return f"{self.batch_size} images per step over {self.images:,} training images"

    def full(self, epochs: int | None = None) -> str:
        """`10 epochs (4,300 steps of 128 images, over 55,000 training images)`."""
        e = self.epochs if epochs is None else epochs
        return (f"{e:g} epoch{'s' if e != 1 else ''} ({e * self.steps_per_epoch:,} steps of "
                f"{self.batch_size} images, over {self.images:,} training images)")


def budget_of(row, epochs: int | None = None) -> Budget:
    """The budget of a run (frame row or Config); `epochs` overrides its own."""
    return Budget(int(float(epochs if epochs is not None else _param(row, "epochs"))),
                  steps_per_epoch(row), int(float(_param(row, "batch_size") or 128)),
                  train_images(row))


@dataclass(frozen=True)
class Profile:
    name: str
    runs: pd.DataFrame
    """Its finished runs of the study."""

    @property
    def epochs(self) -> int:
        return int(self.runs["epochs"].max())

    @property
    def budget(self) -> Budget:
        longest = self.runs[self.runs["epochs"] == self.epochs].iloc[0]
        return budget_of(longest)


def profiles(finished: pd.DataFrame) -> list[Profile]:
    """The profiles among a study's finished runs, longest budget first (ties: by name)."""
    if finished.empty or "tag/profile" not in finished or "epochs" not in finished:
        return []
    finished = finished[finished["status"] == FINISHED] if "status" in finished else finished
    out = [Profile(str(name), group) for name, group in
           finished.dropna(subset=["epochs"]).groupby(finished["tag/profile"].fillna("untagged"))]
    return sorted(out, key=lambda p: (-p.epochs, p.name))


def long_and_default(finished: pd.DataFrame) -> tuple[Profile | None, Profile | None]:
    """(the profile with the longest budget, the default one beside it): the default is the
    profile named `default` when the store has it, else the shorter profile with most runs;
    None where the store holds no such profile."""
    found = profiles(finished)
    if not found:
        return None, None
    long, shorter = found[0], [p for p in found[1:] if p.epochs < found[0].epochs]
    named = [p for p in shorter if p.name == DEFAULT_PROFILE]
    default = named[0] if named else max(shorter, key=lambda p: len(p.runs), default=None)
    return long, default


def spec_budget(study: str, profile: str = DEFAULT_PROFILE) -> Budget | None:
    """The budget a study's spec gives `profile` (study/specs/<study>.toml), for a store
    without runs of it; None when the spec cannot be read."""
    from study.errors import UsageError
    from study.specs import load_spec

    try:
        return budget_of(load_spec(study, profile).base)
    except (UsageError, OSError, ValueError):
        return None


def profile_text(runs: pd.DataFrame) -> str:
    """Which profile's runs a report's sections use, and a warning when they mix budgets."""
    found = ", ".join(sorted(runs["tag/profile"].dropna().astype(str).unique())) \
        if "tag/profile" in runs else ""
    text = (f"The sections before the budget comparisons use the finished runs of profile "
            f"{found or '(untagged)'}; the comparison of budgets and the budget ladder read "
            f"every profile in the store.")
    if "tag/profile" in runs and runs["tag/profile"].nunique() > 1:
        text += (" These runs mix profiles (pass --profile to read one): pairs never join runs "
                 "of two budgets, but means across seeds do.")
    return text


def default_budget(store: RunStore | None, study: str) -> tuple[Budget, str] | None:
    """The default profile's budget: from its finished runs' params, else from the spec."""
    if store is not None:
        runs = store.finished(study)
        if "tag/profile" in runs:
            runs = runs[runs["tag/profile"] == DEFAULT_PROFILE].dropna(subset=["epochs"])
            if not runs.empty:
                longest = runs[runs["epochs"] == runs["epochs"].max()].iloc[0]
                return budget_of(longest), f"the params of its {len(runs)} finished runs"
    spec = spec_budget(study)
    if spec is None:
        return None
    return spec, (f"study/specs/{study}.toml; the store holds no finished {study} runs of "
                  f"profile {DEFAULT_PROFILE}")
