"""The burda2016 spec's smoke profile end to end: both Table 1 rows (VAE, IWAE k = 50) train
with the paper's settings at toy size and log the importance-weighted test bound."""

from __future__ import annotations

import math

import optuna
from mlflow import MlflowClient

from study import runner


def test_burda2016_smoke_end_to_end(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runner.main(["run", "--profile", "smoke", "--study", "burda2016", "--device", "cpu",
                        "--storage", storage, "--tracking-uri", uri]) == 0
    study = optuna.load_study(study_name="burda2016-smoke", storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 2
    client = MlflowClient(tracking_uri=uri)
    runs = {t.params.get("variant"): client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    assert set(runs) == {"vae", "iwae_k50"}
    for variant, run in runs.items():
        params = run.data.params
        assert params["binarize"] == "dynamic" and params["hidden"] == "(200, 200)"
        assert params["activation"] == "tanh" and params["latent_dim"] == "50"
        assert params["batch_size"] == "20" and params["adam_eps"] == "0.0001"
        assert params["lr_schedule"] == "burda" and params["val_size"] == "400"
        assert params["iw_samples"] == ("50" if variant == "iwae_k50" else "1")
        nll = run.data.metrics["test/iwae_nll"]
        assert math.isfinite(nll) and nll > 0
        # the k-sample bound is never above the ELBO's negative on average
        assert nll <= run.data.metrics["test/nelbo"] + 1.0
