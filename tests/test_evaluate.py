"""How settled a run was at its end (`convergence`), on constructed histories whose answers
are worked out by hand."""

from __future__ import annotations

import math

import pytest

from study.evaluate import convergence


def history(nelbo: list[float], sigma: list[float] | None = None) -> list[dict[str, float]]:
    """Per-epoch rows as training logs them: val/nelbo, and likelihood/sigma if given."""
    rows = [{"val/nelbo": v, "train/nelbo": v + 1.0} for v in nelbo]
    for row, s in zip(rows, sigma or [], strict=False):
        row["likelihood/sigma"] = s
    return rows


@pytest.mark.parametrize("epochs", [0, 1])
def test_nothing_is_said_of_a_run_of_one_epoch(epochs):
    assert convergence(history([100.0] * epochs)) == {}


@pytest.mark.parametrize("nelbo, change, share", [
    # 2 epochs: the last tenth is the last epoch; its fall is the whole fall
    ([100.0, 90.0], 10.0, 1.0),
    # 10 epochs: the last tenth is the last epoch, 78.1 -> 78.0, of a fall of 22
    ([100.0, 90.0, 85.0, 82.0, 80.0, 79.0, 78.5, 78.2, 78.1, 78.0], 0.1, 0.1 / 22),
    # 11 epochs: ceil(1.1) = 2 epochs back, 79 -> 77 of 100 -> 77
    ([100.0, 95.0, 90.0, 86.0, 84.0, 82.0, 81.0, 80.0, 79.0, 78.0, 77.0], 2.0, 2.0 / 23),
    # 25 epochs: ceil(2.5) = 3 epochs back from the last, 53 -> 50 of 74 -> 50
    ([74.0 - i for i in range(21)] + [53.0, 52.0, 51.0, 50.0], 3.0, 3.0 / 24),
    # still worsening at the end: a negative change
    ([100.0, 90.0, 80.0, 82.0], -2.0, -2.0 / 18),
])
def test_the_change_over_the_last_tenth_of_epochs(nelbo, change, share):
    out = convergence(history(nelbo))
    assert set(out) == {"converge/val_nelbo_change", "converge/val_nelbo_share"}
    assert out["converge/val_nelbo_change"] == pytest.approx(change)
    assert out["converge/val_nelbo_share"] == pytest.approx(share)


def test_a_run_that_never_improved_has_no_share():
    out = convergence(history([80.0, 85.0, 90.0]))
    assert out["converge/val_nelbo_change"] == pytest.approx(-5.0)
    assert math.isnan(out["converge/val_nelbo_share"])


def test_a_sigmas_change_is_the_log_of_its_ratio():
    """Over the same epochs as the NELBO's: 20 epochs, two back, sigma 0.2 -> 0.1."""
    sigma = [0.5] * 17 + [0.2, 0.15, 0.1]
    out = convergence(history([100.0 - i for i in range(20)], sigma))
    assert out["converge/log_sigma_change"] == pytest.approx(math.log(0.1 / 0.2))
    assert out["converge/val_nelbo_change"] == pytest.approx(2.0)
