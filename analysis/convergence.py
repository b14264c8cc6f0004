"""Whether a run had stopped changing when it ended, read from the `converge/*` metrics every
run of two or more epochs logs (study.evaluate.convergence), and the same for a cell of runs
(the seeds of one setting): settled, still moving, or cannot tell.

A cell is settled only when every one of its runs is; a table or verdict that rests on a cell
that is not says so, and no sentence reads a trend into it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

NELBO_SHARE_SETTLED = 0.05
"""The validation NELBO has settled when under 5% of its fall since epoch 1 came in the run's
last tenth of epochs: a curve still falling at a constant pace puts about 10% there (1 of 9
intervals in 10 epochs, 3 of 29 in 30), so 5% means it has flattened to half that pace or less."""
LOG_SIGMA_SETTLED = 0.01
"""A Gaussian's σ has settled when log σ moved by at most 0.01 (1% of σ) over the last tenth of
epochs: that moves the SSE-equivalent β = 2σ²β by 2%, small next to the factor of 4 between the
study's two βs."""

SETTLED, MOVING, CANNOT_TELL = "settled", "still moving", "cannot tell"
SHARE, CHANGE, SIGMA = ("converge/val_nelbo_share", "converge/val_nelbo_change",
                        "converge/log_sigma_change")
STATUS = "convergence"
"""Column `with_status` adds: the run's status."""


@dataclass(frozen=True)
class RunConvergence:
    status: str
    reason: str
    """Why, in a few words ("one epoch: no trend to read", "last tenth brought 12% of its fall")."""


def _number(row: Mapping, key: str) -> float:
    value = row.get(key, math.nan)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def nelbo_convergence(row: Mapping) -> RunConvergence:
    """The validation NELBO's status from `converge/val_nelbo_share` (and `_change`)."""
    share, change = _number(row, SHARE), _number(row, CHANGE)
    if not math.isfinite(change):
        epochs = _number(row, "epochs")
        return RunConvergence(CANNOT_TELL, "one epoch: no trend to read" if epochs == 1
                              else "no converge/* metrics logged")
    if not math.isfinite(share):
        return RunConvergence(CANNOT_TELL, "its validation NELBO did not fall after epoch 1")
    if abs(share) <= NELBO_SHARE_SETTLED:
        return RunConvergence(SETTLED, f"its last tenth of epochs moved the validation NELBO "
                                       f"by {100 * abs(share):.1f}% of its fall since epoch 1")
    verb = "still fell" if share > 0 else "rose"
    return RunConvergence(MOVING, f"its validation NELBO {verb} by {abs(change):.3g} nats "
                                  f"({100 * abs(share):.0f}% of its fall since epoch 1) in "
                                  f"its last tenth of epochs")


def sigma_convergence(row: Mapping) -> RunConvergence | None:
    """σ's status from `converge/log_sigma_change`; None for a likelihood without a σ."""
    change = _number(row, SIGMA)
    if not math.isfinite(change):
        return None
    if abs(change) <= LOG_SIGMA_SETTLED:
        return RunConvergence(SETTLED, f"log σ moved by {change:+.3f} in its last tenth")
    return RunConvergence(MOVING, f"log σ still moved by {change:+.3f} in its last tenth")


def run_convergence(row: Mapping) -> RunConvergence:
    """A run is settled when its validation NELBO and (where it has one) σ both are."""
    nelbo, sigma = nelbo_convergence(row), sigma_convergence(row)
    if sigma is None or nelbo.status == CANNOT_TELL or sigma.status == SETTLED:
        return nelbo
    if nelbo.status == SETTLED:
        return sigma
    return RunConvergence(MOVING, f"{nelbo.reason}; {sigma.reason}")


def cell_status(statuses: Iterable[str]) -> str:
    """Still moving when any run is; else cannot tell when any run cannot; else settled."""
    statuses = set(statuses)
    if not statuses:
        return CANNOT_TELL
    for status in (MOVING, CANNOT_TELL):
        if status in statuses:
            return status
    return SETTLED


def with_status(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` plus the column STATUS (each run's status)."""
    out = runs.copy()
    out[STATUS] = [run_convergence(r).status for _, r in runs.iterrows()] if len(runs) else []
    return out


def cell_text(runs: pd.DataFrame) -> str:
    """A cell's flag for a table: `settled`, or what was not and in how many of its runs."""
    judged = [run_convergence(r) for _, r in runs.iterrows()]
    status = cell_status(j.status for j in judged)
    if status == SETTLED:
        return SETTLED
    count = sum(j.status == status for j in judged)
    text = f"{status}: {count} of {len(judged)} run{'s' if len(judged) != 1 else ''}"
    if status == CANNOT_TELL and all(j.reason.startswith("one epoch") for j in judged
                                     if j.status == CANNOT_TELL):
        text += " (one epoch)"
    return text


def flags(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell (group of `keys`): its status and its flag text (columns `status`, `flag`)."""
    rows = []
    for key, group in runs.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        judged = [run_convergence(r).status for _, r in group.iterrows()]
        rows.append({**dict(zip(keys, key, strict=True)), "status": cell_status(judged),
                     "flag": cell_text(group)})
    return pd.DataFrame(rows, columns=[*keys, "status", "flag"])


def unsettled_reasons(runs: pd.DataFrame) -> list[str]:
    """One line per run that is not settled: its name (or id) and why."""
    out = []
    for _, r in runs.iterrows():
        judged = run_convergence(r)
        if judged.status != SETTLED:
            out.append(f"{r.get('run_name', r.get('run_id', '?'))}: {judged.status} "
                       f"({judged.reason})")
    return out


def rules_text(then: str = "") -> str:
    """The thresholds as the reports state them, `then` (what the report does with them),
    and their plain reading."""
    return (f"Convergence: a run is settled when under {100 * NELBO_SHARE_SETTLED:g}% of its "
            f"validation NELBO's fall since epoch 1 came in its last tenth of epochs (a curve "
            f"still falling at a constant pace puts about 10% there) and, for a Gaussian with a "
            f"learned or calibrated σ, log σ moved by at most {LOG_SIGMA_SETTLED:g} (1% of σ) "
            f"over those epochs; still moving otherwise; a run of one epoch has no trend to "
            f"read (cannot tell). A cell (the seeds of one setting) is settled when all its "
            f"runs are, still moving when any is.{then} In plain words: a run is settled when its "
            f"loss had nearly stopped falling by the end of training. A run still improving "
            f"could change its ranking with more epochs, so results resting on it are flagged.")
