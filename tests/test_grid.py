"""Which trial runs next: `--only` compares numbers as numbers, through a real run."""

from __future__ import annotations

import pytest
from helpers import error_line, run_args, run_runner, three_betas, trial_runs


@pytest.mark.slow
def test_only_compares_numbers_as_numbers(tmp_path, data_env):
    spec = three_betas(tmp_path, name="numbers")
    done = run_runner(run_args(spec, tmp_path / "stores", "--only", "beta=1"))  # the grid's 1.0
    assert done.returncode == 0, done.stderr[-3000:]
    assert [float(r.data.params["beta"]) for r in trial_runs(tmp_path / "stores", "numbers")] \
        == [1.0]
    line = error_line(run_runner(run_args(spec, tmp_path / "other", "--only", "beta=3")))
    assert "not one of beta's values in numbers (0.5, 1.0, 2.0)" in line
