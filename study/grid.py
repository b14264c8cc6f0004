"""Which trial runs next: the grid points still to run (scheduled here), the samplers and
pruners of searches, and the `--only` selection of grid points.

Grid points are scheduled by the runner rather than by Optuna's own mechanisms, each for a
reason a test pins: GridSampler counts a FAILED trial as a visited point (a crash would never
be retried) and re-runs random points once every point was visited; and Optuna's pop of
WAITING trials (`enqueue_trial`) takes whichever comes first, so `--only variant=vae` could
start a days-long point another invocation had queued. Here a worker picks a pending point
that matches `--only`; two workers that pick the same point at once are settled by
`TrialRunner` (the later steps aside before it creates a run).
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from study.errors import UsageError
from study.specs import Spec

FINISHED = ("COMPLETE", "PRUNED")
"""Trial states that count as done: a grid point with one of them is never run again."""


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
