"""A study end to end on real SQLite stores (a real Optuna storage and a real MLflow store):
trials that complete, one the median pruner really prunes, one that really diverges; what
the runs, the experiment and the Optuna study hold; running again; a changed spec refused;
lost trials adopted from MLflow, an emptied MLflow store refused, and a study whose every
trial failed."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import E2E_DESCRIPTION
from helpers import (
    BETAS,
    GRID,
    TINY,
    TRIAL_ARTIFACTS,
    error_line,
    finished_study,
    load,
    run_args,
    run_runner,
    run_study,
    store_args,
    three_betas,
    trial_runs,
    write_spec,
)

from study.config import Config
from study.data import dataset_digest
from study.model import build_model
from study.runner import main
from study.tracking import NOTE, run_name

pytestmark = pytest.mark.slow

EPOCH_KEYS = ["train/loss", "train/recon", "train/kl", "train/nelbo", "val/recon", "val/kl",
              "val/nelbo", "val/active_units", "val/sse", "beta", "lr", "epoch_seconds",
              "likelihood/sigma"] + [f"val/kl_dim_{j:02d}" for j in range(4)]
STEP_KEYS = ["step/train_recon", "step/train_kl", "step/beta"]
TEST_KEYS = ["test/recon", "test/kl", "test/nelbo", "test/iwae_nll", "test/sse",
             "test/active_units"] + [f"test/kl_dim_{j:02d}" for j in range(4)]


def run_of(e2e, trial):
    return e2e["runs"][trial.user_attrs["mlflow_run_id"]]


def test_one_parent_run_and_one_linked_child_run_per_trial(e2e):
    (parent,) = e2e["parents"]
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.info.run_name.startswith("e2e-smoke/run-")
    assert len(e2e["children"]) == len(e2e["study"].trials) == 4
    for child in e2e["children"]:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    metrics = parent.data.metrics
    assert metrics["trials_complete"] == 2 and metrics["trials_pruned"] == 1
    assert metrics["trials_failed"] == 1
    assert math.isfinite(metrics["tracking_overhead_pct"]) and metrics["tracking_overhead_pct"] > 0
    artifacts = {a.path for a in e2e["client"].list_artifacts(parent.info.run_id)}
    assert artifacts == {"spec.json", "evidence.json"}
    experiment = e2e["client"].get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_trials_and_runs_link_both_ways(e2e):
    for trial in e2e["study"].trials:
        run = run_of(e2e, trial)
        assert run.data.tags["trial_number"] == str(trial.number)
        assert run.data.tags["study"] == "e2e"
        assert run.data.tags["optuna_study"] == "e2e-smoke"
        assert trial.user_attrs["invocation"] == run.data.tags["mlflow.parentRunId"]


def test_trial_runs_are_named_by_what_they_trained(e2e):
    """Read back from the store: dataset, likelihood, beta, latent size and seed (the e2e
    trials differ only in lr, so they share one name; the trial number is a tag)."""
    names = {run.info.run_name for run in e2e["children"]}
    assert names == {"mnist gaussian_learned β=1 z=4 s0"}


def test_the_experiment_and_the_study_run_carry_the_specs_description(e2e):
    (parent,) = e2e["parents"]
    assert parent.data.tags[NOTE] == E2E_DESCRIPTION
    assert e2e["experiment"].tags[NOTE] == E2E_DESCRIPTION
    assert e2e["study"].user_attrs["description"] == E2E_DESCRIPTION


def test_the_optuna_study_names_its_objectives(e2e):
    assert e2e["study"].metric_names == ["val/nelbo"]
    assert e2e["study"].user_attrs["settings"]["objectives"] == [["val/nelbo", "minimize"]]


def test_complete_trials_log_every_metric_param_and_tag(e2e):
    client = e2e["client"]
    for lr in (1e-5, 1e-3):
        trial = e2e["by_lr"][lr]
        assert trial.state.name == "COMPLETE"
        run = run_of(e2e, trial)
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        for key in EPOCH_KEYS + STEP_KEYS + TEST_KEYS:
            assert key in metrics, key
            assert math.isfinite(metrics[key]), key
        assert trial.values[0] == pytest.approx(metrics["val/nelbo"])
        history = client.get_metric_history(run.info.run_id, "val/nelbo")
        assert sorted(m.step for m in history) == [1, 2]
        steps = client.get_metric_history(run.info.run_id, "step/train_kl")
        assert sorted(m.step for m in steps) == [2, 4, 6, 8, 10]  # 10 steps, every 2nd
        assert all(math.isfinite(m.value) for m in steps)
        config = Config(**{k: v for k, v in torch.load(
            client.download_artifacts(run.info.run_id, "checkpoint.pt"),
            weights_only=True)["config"].items()})
        params = run.data.params
        for key, value in config.as_params().items():
            assert params[key] == value, key
        assert float(params["lr"]) == lr
        assert run.info.run_name == run_name(config)
        tags = run.data.tags
        assert tags["profile"] == "smoke" and tags["dataset"] == "mnist"
        assert tags["dataset_digest"] == dataset_digest("mnist")
        assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
        assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__


def test_artifacts_exist_and_the_checkpoint_loads_with_weights_only(e2e, tmp_path):
    client = e2e["client"]
    run = run_of(e2e, e2e["by_lr"][1e-3])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == TRIAL_ARTIFACTS
    local = Path(client.download_artifacts(run.info.run_id, "", dst_path=str(tmp_path)))
    for name in TRIAL_ARTIFACTS - {"checkpoint.pt"}:
        assert (local / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    checkpoint = torch.load(local / "checkpoint.pt", weights_only=True)
    config = Config(**checkpoint["config"])
    assert config.lr == 1e-3 and config.extra["trial"] == e2e["by_lr"][1e-3].number
    model = build_model(config, (1, 28, 28))
    model.load_state_dict(checkpoint["state_dict"])
    assert set(checkpoint["likelihood_state"]) == {"log_sigma"}


def test_a_finished_run_keeps_no_resumable_state(e2e):
    """checkpoint_minutes = 0 saved a state at the end of epoch 1 of 2 (into resume/); the
    finished run deleted it: resume/ is gone from its artifacts and from the disk."""
    client = e2e["client"]
    for lr in (1e-5, 1e-3):
        trial = e2e["by_lr"][lr]
        assert trial.user_attrs["checkpoint_epoch"] == 1  # a state was saved
        run = run_of(e2e, trial)
        assert client.list_artifacts(run.info.run_id, "resume") == []
        folder = Path(run.info.artifact_uri.removeprefix("file://"))
        assert (folder / "checkpoint.pt").is_file() and not (folder / "resume").exists()


def test_a_pruned_trial_ends_its_run_killed(e2e):
    trial = e2e["by_lr"][1e-8]
    assert trial.state.name == "PRUNED"
    assert list(trial.intermediate_values) == [1]  # pruned after the first epoch
    run = run_of(e2e, trial)
    assert run.info.status == "KILLED"
    assert run.data.tags["pruned"].startswith("pruned at epoch 1")
    history = e2e["client"].get_metric_history(run.info.run_id, "val/nelbo")
    assert [m.step for m in history] == [1]


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(e2e):
    trial = e2e["by_lr"][10.0]
    assert trial.state.name == "FAIL"
    reason = trial.user_attrs["failure_reason"]
    assert reason.startswith("non-finite loss at epoch 1 step ")  # lr 10 really diverges
    run = run_of(e2e, trial)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == reason
    later = [t for t in e2e["study"].trials if t.number > trial.number]
    assert later and all(t.state.name in ("COMPLETE", "PRUNED") for t in later)


# --------------------------------------------------------------------------- running again

RESUME = GRID + """
[space]
lr = [1e-3, 2e-3, 10.0]
""" + TINY + """
likelihood = "gaussian"
epochs = 1
"""


def test_running_again_resumes_without_duplicates(tmp_path, data_env, capsys):
    spec = write_spec(tmp_path, "resume", RESUME)
    folder = tmp_path / "stores"
    assert run_study(spec, folder) == 0
    study, _, _, parents, children = load(folder, "resume")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert len(children) == 3 and len(parents) == 1

    assert run_study(spec, folder) == 0  # only the failed point is tried again
    study, client, _, parents, children = load(folder, "resume")
    states = [(t.params["lr"], t.state.name) for t in study.trials]
    assert states == [(1e-3, "COMPLETE"), (2e-3, "COMPLETE"), (10.0, "FAIL"), (10.0, "FAIL")]
    assert len(children) == 4 and len(parents) == 2
    latest = max(parents, key=lambda r: r.info.start_time)
    assert latest.data.metrics["trials_complete"] == 0
    assert latest.data.metrics["trials_failed"] == 1
    assert latest.data.metrics["trials_finished_total"] == 2

    # a worker joins the study, finds nothing to do, and creates no run of its own
    assert run_study(spec, folder, "--worker") == 0
    study, _, _, parents, children = load(folder, "resume")
    assert len(study.trials) == 4 and len(children) == 4 and len(parents) == 2
    # ... and refuses a study that was never started
    capsys.readouterr()
    code = main(["run", "--worker", "--study", str(spec), "--profile", "default",
                 *store_args(folder)])
    assert code == 2 and "no study 'resume-default'" in capsys.readouterr().err


def test_a_spec_changed_under_its_study_is_refused(tmp_path, data_env, capsys):
    """A study keeps the settings it was started with: after an edit that changes what its
    trials compute, running (or joining) it again gets one line naming the changed fields and
    the fix, exit 2, and adds no trial and no run; the original spec still runs."""
    original = textwrap.dedent(GRID + TINY + "epochs = 1\n")
    spec = write_spec(tmp_path, "changed", original)
    folder = tmp_path / "stores"
    assert run_study(spec, folder) == 0
    spec.write_text(original + 'init = "glorot"\noptimizer = "adam_burda"\n')
    capsys.readouterr()
    for extra in ((), ("--worker",)):
        assert run_study(spec, folder, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "study 'changed-smoke' was run with other settings" in err
        assert "(changed: init, optimizer)" in err and "optuna delete-study" in err
    # a changed grid too (Optuna itself would fail mid-trial on a categorical's new values)
    spec.write_text(textwrap.dedent(GRID + "[space]\nbeta = [0.5, 1.0]\n" + TINY + "epochs = 1\n"))
    assert run_study(spec, folder) == 2
    assert "(changed: space)" in capsys.readouterr().err
    study, _, _, parents, children = load(folder, "changed")
    assert len(study.trials) == 1 and len(parents) == 1 and len(children) == 1
    spec.write_text(original)
    assert run_study(spec, folder) == 0


def test_running_again_in_another_process_is_not_refused(tmp_path, data_env):
    """What `make study` does the next day: the same spec run again by a new process (here
    with another hash seed, as every new process has one) goes on with the study."""
    spec = write_spec(tmp_path, "again", GRID + '[space]\nlikelihood = ["bernoulli"]\n'
                      "beta = [1.0]\n" + TINY + "epochs = 1\n")
    for seed in ("0", "3"):  # two seeds that order {likelihood, beta} differently
        done = run_runner(run_args(spec, tmp_path / "stores"), env={"PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr[-3000:]


# --------------------------------------------------------------------------- lost stores


def test_lost_optuna_trials_are_adopted_not_trained_again(copy_of):
    spec, stores = copy_of
    before = {r.info.run_id for r in trial_runs(stores, "three")}
    (stores / "optuna.db").write_bytes(b"")  # `: > optuna.db`
    done = run_runner(run_args(spec, stores))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adopted 3 finished MLflow run(s)" in done.stderr
    assert {r.info.run_id for r in trial_runs(stores, "three")} == before  # nothing trained twice
    study = finished_study(stores)
    assert sorted(t.params["beta"] for t in study.trials) == BETAS
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == before
    assert all(t.state.name == "COMPLETE" and t.user_attrs["adopted_from_mlflow"]
               for t in study.trials)


def test_runs_of_other_settings_are_not_adopted(copy_of):
    spec, stores = copy_of
    (stores / "optuna.db").write_bytes(b"")
    spec.write_text(spec.read_text() + "lr = 2e-3\n")  # the runs were trained at 1e-3
    done = run_runner(run_args(spec, stores))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adopted" not in done.stderr
    assert len(trial_runs(stores, "three")) == 6  # the grid trained afresh beside the old runs


def test_an_emptied_mlflow_store_is_refused_with_the_way_out(copy_of):
    spec, stores = copy_of
    (stores / "mlflow.db").write_bytes(b"")
    for leftover in stores.glob("mlflow.db-*"):
        leftover.unlink()
    optuna_before = (stores / "optuna.db").read_bytes()
    line = error_line(run_runner(run_args(spec, stores)))
    assert "3 finished trial(s) whose MLflow runs are not in" in line
    assert "optuna delete-study --study-name three-smoke" in line and "TRACKING_URI" in line
    assert (stores / "optuna.db").read_bytes() == optuna_before
    assert trial_runs(stores, "three") == []  # no experiment, no run was created


def test_a_study_whose_every_trial_failed_exits_non_zero(tmp_path, data_env):
    spec = three_betas(tmp_path, extra="lr = 10.0\nlikelihood = \"gaussian_learned\"\n")
    done = run_runner(run_args(spec, tmp_path / "stores"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: every trial of three-smoke failed (3 this run); the first: non-finite " \
           "loss at epoch 1" in done.stderr
