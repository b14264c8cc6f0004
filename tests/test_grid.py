"""Which trial runs next: the grid points still pending, and `--only`, which compares
numbers as numbers, on constructed trials and through a real run."""

from __future__ import annotations

import pytest
from helpers import BETAS, error_line, run_args, run_runner, three_betas, trial_runs
from optuna.trial import TrialState, create_trial

from study.grid import matches, pending_points, same_value
from study.specs import load_spec


@pytest.fixture
def spec(tmp_path):
    return load_spec(str(three_betas(tmp_path)), "smoke")


def trial(spec, state, beta, **user_attrs):
    return create_trial(state=state, params={"beta": beta}, user_attrs=user_attrs,
                        distributions={d.name: d.distribution() for d in spec.dimensions},
                        value=1.0 if state == TrialState.COMPLETE else None)


@pytest.mark.parametrize("states, pending", [
    ([], BETAS),
    ([(TrialState.COMPLETE, 0.5, {}), (TrialState.PRUNED, 1.0, {})], [2.0]),
    # running or queued elsewhere: taken
    ([(TrialState.RUNNING, 0.5, {}), (TrialState.WAITING, 2.0, {})], [1.0]),
    # failed in this invocation: retried by the next one, not now; in another: retried now
    ([(TrialState.FAIL, 0.5, {"invocation": "this"}),
      (TrialState.FAIL, 1.0, {"invocation": "earlier"})], [1.0, 2.0]),
    # a trial that stepped aside from a point another worker took claims nothing
    ([(TrialState.FAIL, 0.5, {"invocation": "this", "duplicate_of": 3})], BETAS),
])
def test_pending_points(spec, states, pending):
    trials = [trial(spec, state, beta, **attrs) for state, beta, attrs in states]
    assert pending_points(spec, trials, invocation="this") == [{"beta": b} for b in pending]


@pytest.mark.parametrize("param, text, same", [
    (1.0, "1", True), (1.0, "1.0", True), (1.0, "1e0", True), (0.5, ".5", True),
    (2, "2.0", True), (1.0, "1.01", False), (1.0, "one", False),
    ("vae", "vae", True), ("vae", "VAE", False), (True, "True", True), (True, "1", False),
])
def test_same_value_compares_numbers_as_numbers(param, text, same):
    assert same_value(param, text) is same


def test_matches_needs_every_pair():
    params = {"beta": 1.0, "variant": "vae"}
    assert matches(params, ())
    assert matches(params, (("beta", "1"), ("variant", "vae")))
    assert not matches(params, (("beta", "1"), ("variant", "iwae")))
    assert not matches(params, (("seed", "0"),))  # a dimension the point lacks


@pytest.mark.slow
def test_only_compares_numbers_as_numbers(tmp_path, data_env):
    spec = three_betas(tmp_path, name="numbers")
    done = run_runner(run_args(spec, tmp_path / "stores", "--only", "beta=1"))  # the grid's 1.0
    assert done.returncode == 0, done.stderr[-3000:]
    assert [float(r.data.params["beta"]) for r in trial_runs(tmp_path / "stores", "numbers")] \
        == [1.0]
    line = error_line(run_runner(run_args(spec, tmp_path / "other", "--only", "beta=3")))
    assert "not one of beta's values in numbers (0.5, 1.0, 2.0)" in line
