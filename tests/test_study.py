"""Studies end to end on real data subsets: a real SQLite Optuna storage and a real MLflow
sqlite store in a temporary folder, trials that complete, one the median pruner really
prunes, one that really diverges; resumption; worker processes; and a real `mlflow server`
asked over its REST API."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from conftest import BROWSER_TIMEOUT_MS
from mlflow import MlflowClient
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from study.config import Config
from study.data import dataset_digest
from study.model import build_model
from study.runner import main

REPO = Path(__file__).resolve().parents[1]
# How long a wait on a server or the browser may last before it counts as a hang: each ends on
# an event (a page answers, a text shows), so a slow or busy machine only waits longer.
WAIT_S = 300
pytestmark = pytest.mark.slow

TINY = """
[fixed]
train_subset = 1000
val_size = 300
test_subset = 200
batch_size = 100
test_iw_k = 5
latent_dim = 4
step_log_every = 2
"""

# Order matters: the grid runs its points in this order. lr 1e-5 completes first; lr 1e-3
# beats it at epoch 1 and completes; lr 10 diverges (a NaN in the first epoch, checked
# below); lr 1e-8 is still at its initial loss after epoch 1, above the median of the
# completed trials, so the median pruner prunes it before epoch 2.
E2E = """
description = "two complete, one diverging, one pruned"
sampler = "grid"
pruner = { type = "median", n_startup_trials = 1, n_warmup_steps = 0 }
objectives = { "val/nelbo" = "minimize" }
[space]
lr = [1e-5, 1e-3, 10.0, 1e-8]
""" + TINY + """
likelihood = "gaussian_learned"
epochs = 2
"""

EPOCH_KEYS = ["train/loss", "train/recon", "train/kl", "train/nelbo", "val/recon", "val/kl",
              "val/nelbo", "val/active_units", "val/sse", "beta", "lr", "epoch_seconds",
              "likelihood/sigma"] + [f"val/kl_dim_{j:02d}" for j in range(4)]
STEP_KEYS = ["step/train_recon", "step/train_kl", "step/beta"]
TEST_KEYS = ["test/recon", "test/kl", "test/nelbo", "test/iwae_nll", "test/sse",
             "test/active_units"] + [f"test/kl_dim_{j:02d}" for j in range(4)]
ARTIFACTS = {"checkpoint.pt", "kl_per_dimension.png", "latent_pca.png", "reconstructions.png",
             "samples.png"}


def stores(folder: Path) -> list[str]:
    return ["--storage", f"sqlite:///{folder}/optuna.db",
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]


def run_study(spec: Path, folder: Path, *extra: str) -> int:
    return main(["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
                 *stores(folder), *extra])


def load(folder: Path, spec_name: str, profile: str = "smoke"):
    """The Optuna study `<spec>-<profile>` and the runs of that profile in experiment `<spec>`."""
    study = optuna.load_study(study_name=f"{spec_name}-{profile}",
                              storage=f"sqlite:///{folder}/optuna.db")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(spec_name)
    runs = client.search_runs([experiment.experiment_id], f"tags.profile = '{profile}'",
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("run_kind") == "study"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    return study, client, experiment, parents, children


@pytest.fixture(scope="module")
def data_env(data_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_DATA_ROOT", str(data_root))
        yield data_root


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, data_env):
    folder = tmp_path_factory.mktemp("e2e")
    spec = folder / "e2e.toml"
    spec.write_text(textwrap.dedent(E2E))
    assert run_study(spec, folder / "stores") == 0
    study, client, experiment, parents, children = load(folder / "stores", "e2e")
    by_lr = {t.params["lr"]: t for t in study.trials}
    runs = {r.info.run_id: r for r in children}
    return {"folder": folder / "stores", "study": study, "client": client,
            "experiment": experiment, "parents": parents, "children": children,
            "by_lr": by_lr, "runs": runs}


def run_of(e2e, trial):
    return e2e["runs"][trial.user_attrs["mlflow_run_id"]]


def test_one_parent_run_and_one_linked_child_run_per_trial(e2e):
    (parent,) = e2e["parents"]
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    assert len(e2e["children"]) == len(e2e["study"].trials) == 4
    for child in e2e["children"]:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    names = sorted(c.info.run_name for c in e2e["children"])
    assert names == [f"e2e-smoke/trial-{n:04d}" for n in range(4)]
    metrics = parent.data.metrics
    assert metrics["trials_complete"] == 2 and metrics["trials_pruned"] == 1
    assert metrics["trials_failed"] == 1
    assert math.isfinite(metrics["tracking_overhead_pct"]) and metrics["tracking_overhead_pct"] > 0
    assert e2e["client"].list_artifacts(parent.info.run_id)[0].path == "spec.json"
    experiment = e2e["client"].get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_trials_and_runs_link_both_ways(e2e):
    for trial in e2e["study"].trials:
        run = run_of(e2e, trial)
        assert run.data.tags["trial_number"] == str(trial.number)
        assert run.info.run_name == f"e2e-smoke/trial-{trial.number:04d}"
        assert run.data.tags["study"] == "e2e"
        assert run.data.tags["optuna_study"] == "e2e-smoke"
        assert trial.user_attrs["invocation"] == run.data.tags["mlflow.parentRunId"]


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
        tags = run.data.tags
        assert tags["profile"] == "smoke" and tags["dataset"] == "mnist"
        assert tags["dataset_digest"] == dataset_digest("mnist")
        assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
        assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__


def test_artifacts_exist_and_the_checkpoint_loads_with_weights_only(e2e, tmp_path):
    client = e2e["client"]
    run = run_of(e2e, e2e["by_lr"][1e-3])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == ARTIFACTS
    local = Path(client.download_artifacts(run.info.run_id, "", dst_path=str(tmp_path)))
    for name in ARTIFACTS - {"checkpoint.pt"}:
        assert (local / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    checkpoint = torch.load(local / "checkpoint.pt", weights_only=True)
    config = Config(**checkpoint["config"])
    assert config.lr == 1e-3 and config.extra["trial"] == e2e["by_lr"][1e-3].number
    model = build_model(config, (1, 28, 28))
    model.load_state_dict(checkpoint["state_dict"])
    assert set(checkpoint["likelihood_state"]) == {"log_sigma"}


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def serving(args: list[str], ready_path: str, log_path: Path):
    """`python -m study.runner ARGS --port P` in its own session; yields the base URL once
    GET ready_path answers 200; stops the whole process group afterwards."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "study.runner", *args, "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(base + ready_path, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{args[0]} did not start"
            time.sleep(1)
        yield base
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Stop the process group of `proc` (TERM, then KILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_text(page, wanted: list[str], timeout: float = 90) -> list[str]:
    """Wait until every string of `wanted` shows in the page's text; the ones still missing."""
    with contextlib.suppress(PlaywrightTimeoutError):
        page.wait_for_function("wanted => wanted.every(w => document.body?.innerText.includes(w))",
                               arg=wanted, timeout=timeout * 1000)
    text = page.evaluate("document.body ? document.body.innerText : ''")
    return [w for w in wanted if w not in text]


def look_at_the_ui(browser, base: str, experiment_id: str, run_id: str) -> dict:
    """The MLflow UI in headless Chromium, as a user meets it: the experiment's runs list shows
    the study's parent run; a trial's metric page, filtered to `nelbo`, draws the train and
    validation curves (each chart's legend names its metric key). Screenshots of both go to
    test-artifacts/."""
    from test_report import ARTIFACTS as SHOTS

    ml = "?workflowType=machine_learning"  # MLflow 3 opens its GenAI view otherwise
    with contextlib.closing(browser.new_page(viewport={"width": 1400, "height": 2000})) as page:
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        page.goto(f"{base}/#/experiments/{experiment_id}/runs{ml}")
        runs_page = not _wait_for_text(page, ["e2e-smoke/run-"])
        page.screenshot(path=SHOTS / "mlflow-ui-runs.png")
        page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics{ml}")
        page.locator("input[placeholder^=Search]").first.fill("nelbo", timeout=90_000)
        missing = _wait_for_text(page, ["(train/nelbo)", "(val/nelbo)"])
        points = page.locator(".scatterlayer .point")  # plotly's markers
        with contextlib.suppress(PlaywrightTimeoutError):  # 2 epochs of train and val, 1 test value
            points.nth(4).wait_for(state="attached", timeout=90_000)
        drawn = points.count()
        page.screenshot(path=SHOTS / "mlflow-ui-trial-nelbo.png")
    return {"runs_page": runs_page, "missing_curves": missing, "points_drawn": drawn}


def test_a_real_mlflow_server_serves_the_runs_over_rest(e2e, tmp_path, browser):
    uri = f"sqlite:///{e2e['folder']}/mlflow.db"
    with serving(["ui", "--tracking-uri", uri], "/health", tmp_path / "server.log") as base:
        found = http_json(base + "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [e2e["experiment"].experiment_id],
            "filter": "tags.study = 'e2e'", "max_results": 100})
        assert len(found["runs"]) == 5  # the parent and four trials
        trial_run = run_of(e2e, e2e["by_lr"][1e-3]).info.run_id
        query = urllib.parse.urlencode({"run_id": trial_run, "metric_key": "val/nelbo"})
        history = http_json(base + "/api/2.0/mlflow/metrics/get-history?" + query)["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]
        assert all(math.isfinite(m["value"]) for m in history)
        listed = http_json(base + "/api/2.0/mlflow/artifacts/list?"
                           + urllib.parse.urlencode({"run_id": trial_run}))
        assert {f["path"] for f in listed["files"]} == ARTIFACTS
        assert listening_on(int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}  # the default
        seen = look_at_the_ui(browser, base, e2e["experiment"].experiment_id, trial_run)
        assert seen["runs_page"], "the study's runs are not listed in the MLflow UI"
        assert not seen["missing_curves"], seen  # the ELBO curves of the trial are drawn
        assert seen["points_drawn"] >= 5, seen

        # the same server as the tracking URI of a study: runs and artifacts go through it
        spec = tmp_path / "remote.toml"
        spec.write_text(textwrap.dedent('sampler = "grid"\n' + TINY + "epochs = 1\n"))
        assert main(["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
                     "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", base]) == 0
        experiment = http_json(base + "/api/2.0/mlflow/experiments/get-by-name?"
                               + urllib.parse.urlencode({"experiment_name": "remote"}))
        runs = http_json(base + "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": "tags.run_kind = 'trial'"})["runs"]
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        listed = http_json(base + "/api/2.0/mlflow/artifacts/list?"
                           + urllib.parse.urlencode({"run_id": runs[0]["info"]["run_id"]}))
        assert {f["path"] for f in listed["files"]} == ARTIFACTS


def test_optuna_dashboard_serves_the_study(e2e, tmp_path):
    storage = f"sqlite:///{e2e['folder']}/optuna.db"
    with serving(["dashboard", "--storage", storage], "/api/studies",
                 tmp_path / "dashboard.log") as base:
        studies = http_json(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["e2e-smoke"]
        assert listening_on(int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}


def listening_on(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port`, from /proc/net/tcp{,6}."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.parametrize("command", ["ui", "dashboard"])
def test_the_servers_listen_on_loopback_unless_host_says_otherwise(e2e, tmp_path, command):
    store = ["--tracking-uri", f"sqlite:///{e2e['folder']}/mlflow.db"] if command == "ui" else \
        ["--storage", f"sqlite:///{e2e['folder']}/optuna.db"]
    ready = "/health" if command == "ui" else "/api/studies"
    with serving([command, *store, "--host", "0.0.0.0"], ready, tmp_path / "any.log") as base:
        assert listening_on(int(base.rsplit(":", 1)[1])) == {"0.0.0.0"}  # asked for: all


RESUME = """
sampler = "grid"
[space]
lr = [1e-3, 2e-3, 10.0]
""" + TINY + """
likelihood = "gaussian"
epochs = 1
"""


def test_running_again_resumes_without_duplicates(tmp_path, data_env, capsys):
    spec = tmp_path / "resume.toml"
    spec.write_text(textwrap.dedent(RESUME))
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
                 *stores(folder)])
    assert code == 2 and "no study 'resume-default'" in capsys.readouterr().err


def test_a_spec_changed_under_its_study_is_refused(tmp_path, data_env, capsys):
    """A study keeps the settings it was started with: after an edit that changes what its
    trials compute, running (or joining) it again gets one line naming the changed fields and
    the fix, exit 2, and adds no trial and no run; the original spec still runs."""
    spec = tmp_path / "changed.toml"
    original = textwrap.dedent('sampler = "grid"\n' + TINY + "epochs = 1\n")
    spec.write_text(original)
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
    spec.write_text(textwrap.dedent('sampler = "grid"\n[space]\nbeta = [0.5, 1.0]\n' + TINY
                                    + "epochs = 1\n"))
    assert run_study(spec, folder) == 2
    assert "(changed: space)" in capsys.readouterr().err
    study, _, _, parents, children = load(folder, "changed")
    assert len(study.trials) == 1 and len(parents) == 1 and len(children) == 1
    spec.write_text(original)
    assert run_study(spec, folder) == 0


def test_jobs_run_worker_processes_on_one_storage(tmp_path, data_env):
    spec = tmp_path / "jobs.toml"
    spec.write_text(textwrap.dedent("""
        sampler = "grid"
        [space]
        beta = [0.5, 1.0, 2.0, 4.0]
    """ + TINY + "epochs = 1\n"))
    folder = tmp_path / "stores"
    assert run_study(spec, folder, "--jobs", "2") == 0
    study, _, _, parents, children = load(folder, "jobs")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["beta"] for t in complete) == [0.5, 1.0, 2.0, 4.0]  # each once
    # two workers may pick the same grid point at once; the later steps aside (duplicate_of)
    # before it creates a run, so every other trial has exactly one run
    stepped_aside = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert all(t.state.name == "FAIL" for t in stepped_aside)
    assert len(complete) + len(stepped_aside) == len(study.trials)
    assert len(children) == len(study.trials) - len(stepped_aside) and len(parents) == 1
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.trials
            if "worker" in t.user_attrs}  # a trial that found no point left records none
    assert len(pids) >= 1 and str(os.getpid()) not in pids  # trials ran in workers, not here
    assert {r.data.params["threads"] for r in children} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}


def test_a_journal_file_storage_works(tmp_path, data_env):
    spec = tmp_path / "journal.toml"
    spec.write_text(textwrap.dedent('sampler = "grid"\n' + TINY + "epochs = 1\n"))
    journal = tmp_path / "optuna.journal"
    code = main(["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
                 "--storage", str(journal), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="journal-smoke",
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


def test_a_trial_whose_worker_died_is_failed_and_run_again(tmp_path, data_env, monkeypatch):
    """A RUNNING trial whose heartbeat stopped (its process was killed) is marked FAIL, its
    MLflow run is closed FAILED, and the same params run again in a new trial."""
    from study import stores
    from study.tracking import Tracker

    monkeypatch.setattr(stores, "HEARTBEAT_S", 1)
    monkeypatch.setattr(stores, "GRACE_S", 2)
    spec = tmp_path / "dead.toml"
    spec.write_text(textwrap.dedent('sampler = "grid"\n[space]\nbeta = [0.5, 1.0]\n'
                                    + TINY + "epochs = 1\n"))
    folder = tmp_path / "stores"
    storage = stores.open_storage(f"sqlite:///{folder}/optuna.db")
    study = optuna.create_study(study_name="dead-smoke", storage=storage)
    study.enqueue_trial({"beta": 0.5})
    dead = study.ask()
    dead.suggest_categorical("beta", [0.5, 1.0])
    tracker = Tracker(f"sqlite:///{folder}/mlflow.db")
    dead_run = tracker.start_run(tracker.experiment_id("dead"), "dead-smoke/trial-0000",
                                 {"run_kind": "trial", "profile": "smoke"})
    dead.set_user_attr("mlflow_run_id", dead_run)
    storage.record_heartbeat(dead._trial_id)  # then the worker "dies": no more heartbeats
    time.sleep(3)

    assert run_study(spec, folder) == 0
    study, client, _, _, _ = load(folder, "dead")
    trials = study.trials
    assert trials[0].state.name == "FAIL"
    assert client.get_run(dead_run).info.status == "FAILED"
    assert "worker died" in client.get_run(dead_run).data.tags["failure_reason"]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == {"beta": 0.5}
    assert sorted(t.params["beta"] for t in trials if t.state.name == "COMPLETE") == [0.5, 1.0]


def test_only_runs_the_matching_grid_points(tmp_path, data_env, capsys):
    """--only NAME=VALUE (ONLY= in make) runs part of a grid; a later run without it does the
    rest. A malformed pair, an unknown dimension or value, or a search get one line, exit 2,
    and create nothing."""
    spec = tmp_path / "only.toml"
    spec.write_text(textwrap.dedent('sampler = "grid"\nseeds = [0, 1]\n[space]\n'
                                    'beta = [0.5, 2.0]\n' + TINY + "epochs = 1\n"))
    folder = tmp_path / "stores"
    assert run_study(spec, folder, "--only", "beta=2.0") == 0
    study, _, _, _, children = load(folder, "only")
    done = sorted((t.params["seed"], t.params["beta"]) for t in study.trials
                  if t.state.name == "COMPLETE")
    assert done == [(0, 2.0), (1, 2.0)] and len(children) == 2
    assert run_study(spec, folder, "--only", "beta=2.0", "--only", "seed=1") == 0
    assert len(load(folder, "only")[0].trials) == 2  # nothing left that matches
    assert run_study(spec, folder) == 0
    study = load(folder, "only")[0]
    assert sorted((t.params["seed"], t.params["beta"]) for t in study.trials) == \
        [(0, 0.5), (0, 2.0), (1, 0.5), (1, 2.0)]

    capsys.readouterr()
    empty = tmp_path / "empty"
    for only, message in [("beta", "--only takes NAME=VALUE"),
                          ("lr=0.1", "has no grid dimension 'lr'; its dimensions are seed, beta"),
                          ("beta=3.0", "not one of beta's values in only (0.5, 2.0)")]:
        assert run_study(spec, empty, "--only", only) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    search = tmp_path / "search.toml"
    search.write_text(textwrap.dedent('sampler = "tpe"\ntrials = 2\n[space]\n'
                                      'beta = { low = 0.5, high = 2.0 }\n' + TINY))
    assert run_study(search, empty, "--only", "beta=1.0") == 2
    assert "--only selects grid points, but search is a tpe search" in capsys.readouterr().err
    assert not empty.exists()
