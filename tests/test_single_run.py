"""One model outside any study: `vae-study train KEY=VALUE ...` run as a user runs it (the
console script, another working directory, the stores and data named by VAE_* variables)
logs one finished MLflow run in experiment `single-runs` and prints its test metrics; a bad
override is one line, exit 2, and no run."""

from __future__ import annotations

import subprocess

import pytest
from helpers import DEADLINE_S, TRIAL_ARTIFACTS, console_env, vae_study
from mlflow import MlflowClient

from study.config import Config
from study.errors import UsageError
from study.single_run import EXPERIMENT, config_from_overrides
from study.tracking import run_name

OVERRIDES = {"likelihood": "gaussian_optimal", "beta": "2", "latent_dim": "4", "hidden": "[64]",
             "epochs": "1", "train_subset": "500", "val_size": "200", "test_subset": "200",
             "test_iw_k": "5", "device": "cpu"}
EXPECTED = dict(likelihood="gaussian_optimal", beta=2.0, latent_dim=4, hidden=(64,), epochs=1,
                train_subset=500, val_size=200, test_subset=200, test_iw_k=5, device="cpu")


def train_elsewhere(tmp_path, data_root, *args: str) -> subprocess.CompletedProcess:
    """`vae-study train ARGS` from an empty folder, its stores and data set by VAE_*."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = console_env({"VAE_TRACKING_URI": f"sqlite:///{tmp_path}/stores/mlflow.db",
                       "VAE_STORAGE": f"sqlite:///{tmp_path}/stores/optuna.db",
                       "VAE_DATA_ROOT": str(data_root), "OMP_WAIT_POLICY": "PASSIVE"})
    return subprocess.run([vae_study(), "train", *args], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S, check=False)


@pytest.mark.slow
def test_train_logs_one_finished_run_and_prints_its_test_metrics(tmp_path, data_root):
    done = train_elsewhere(tmp_path, data_root, *(f"{k}={v}" for k, v in OVERRIDES.items()))
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/stores/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_kind"] == "single"
    expected = Config(data_root=str(data_root), **EXPECTED)
    assert run.info.run_name == run_name(expected) == "mnist gaussian_optimal β=2 z=4 s0"
    params = expected.as_params()
    for key in [*EXPECTED, "data_root"]:  # the overrides, and the data VAE_DATA_ROOT names
        assert run.data.params[key] == params[key], key
    assert run.data.params["lr"] == params["lr"]  # the rest: Config's defaults
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == TRIAL_ARTIFACTS
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/nelbo")] == [1]

    assert "test metrics" in done.stdout
    printed = dict(line.split() for line in done.stdout.splitlines() if line.startswith("  "))
    for key in ("nelbo", "recon", "kl", "iwae_nll", "sse", "ssim", "frechet_distance"):
        assert printed[key] == f"{run.data.metrics[f'test/{key}']:.4g}", key
    assert not any((tmp_path / "elsewhere").iterdir())  # nothing written where it ran


@pytest.mark.slow
def test_a_bad_override_is_one_line_and_no_run(tmp_path, data_root):
    done = train_elsewhere(tmp_path, data_root, "colour=1", "epochs=1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: unknown key 'colour' (Config fields: dataset, ")
    assert not (tmp_path / "stores").exists()  # no store, no run


@pytest.mark.parametrize("overrides, problem", [
    (["epochs"], "'epochs' is not KEY=VALUE"),
    (["beta=-1"], "beta must be > 0, got -1.0"),
    (["likelihood=mse"], "likelihood = 'mse' is not one of bernoulli, gaussian"),
    (["colour=1", "=2"], "unknown key 'colour'"),
])
def test_bad_overrides_are_named(overrides, problem):
    with pytest.raises(UsageError, match=None) as refused:
        config_from_overrides(overrides)
    assert problem in str(refused.value)


def test_overrides_are_typed_as_a_spec_table_types_them():
    config = config_from_overrides(["hidden=[400, 200]", "beta=4", "compile=true", "threads=2",
                                    "likelihood=gaussian", "lr=1e-3"])
    assert (config.hidden, config.beta, config.compile, config.threads, config.likelihood,
            config.lr) == ((400, 200), 4.0, True, 2, "gaussian", 1e-3)
    assert config.replace(hidden=(400,), beta=1.0, compile=False, threads=None,
                          likelihood="bernoulli") == Config()  # nothing else changed
