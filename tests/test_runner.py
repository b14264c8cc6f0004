"""The command line: `ui` (a real `mlflow server` over the study's store, asked over REST and
looked at in Chromium) and `dashboard`, each on loopback unless --host says otherwise; `run`
with --only, --jobs and its refusals (one line, exit 2, nothing written); help, list and
--version; and make, whose echo and processes show no password, and whose `system` step names
what it cannot install."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import urllib.parse

import psutil
import pytest
from conftest import BROWSER_TIMEOUT_MS
from helpers import (
    ARTIFACTS_DIR,
    GRID,
    PG_PASSWORD,
    PG_USER,
    REPO,
    TINY,
    TRIAL_ARTIFACTS,
    assert_refused,
    console_env,
    free_port,
    http_json,
    listening_on,
    load,
    pg_url,
    run_study,
    serving,
    vae_study,
    wait_for_health,
    write_spec,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from study import runner
from study.errors import UsageError
from study.runner import main
from study.workers import available_cores


def run_of(e2e, lr: float):
    return e2e["runs"][e2e["by_lr"][lr].user_attrs["mlflow_run_id"]]


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
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    ml = "?workflowType=machine_learning"  # MLflow 3 opens its GenAI view otherwise
    with contextlib.closing(browser.new_page(viewport={"width": 1400, "height": 2000})) as page:
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        page.goto(f"{base}/#/experiments/{experiment_id}/runs{ml}")
        runs_page = not _wait_for_text(page, ["e2e-smoke/run-"])
        page.screenshot(path=ARTIFACTS_DIR / "mlflow-ui-runs.png")
        page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics{ml}")
        page.locator("input[placeholder^=Search]").first.fill("nelbo", timeout=90_000)
        missing = _wait_for_text(page, ["(train/nelbo)", "(val/nelbo)"])
        points = page.locator(".scatterlayer .point")  # plotly's markers
        with contextlib.suppress(PlaywrightTimeoutError):  # 2 epochs of train and val, 1 test value
            points.nth(4).wait_for(state="attached", timeout=90_000)
        drawn = points.count()
        page.screenshot(path=ARTIFACTS_DIR / "mlflow-ui-trial-nelbo.png")
    return {"runs_page": runs_page, "missing_curves": missing, "points_drawn": drawn}


@pytest.mark.slow
def test_a_real_mlflow_server_serves_the_runs_over_rest(e2e, tmp_path, browser):
    uri = f"sqlite:///{e2e['folder']}/mlflow.db"
    with serving(["ui", "--tracking-uri", uri], "/health", tmp_path / "server.log") as base:
        found = http_json(base + "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [e2e["experiment"].experiment_id],
            "filter": "tags.study = 'e2e'", "max_results": 100})
        assert len(found["runs"]) == 5  # the parent and four trials
        trial_run = run_of(e2e, 1e-3).info.run_id
        query = urllib.parse.urlencode({"run_id": trial_run, "metric_key": "val/nelbo"})
        history = http_json(base + "/api/2.0/mlflow/metrics/get-history?" + query)["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]
        assert all(math.isfinite(m["value"]) for m in history)
        listed = http_json(base + "/api/2.0/mlflow/artifacts/list?"
                           + urllib.parse.urlencode({"run_id": trial_run}))
        assert {f["path"] for f in listed["files"]} == TRIAL_ARTIFACTS
        assert listening_on(int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}  # the default
        seen = look_at_the_ui(browser, base, e2e["experiment"].experiment_id, trial_run)
        assert seen["runs_page"], "the study's runs are not listed in the MLflow UI"
        assert not seen["missing_curves"], seen  # the ELBO curves of the trial are drawn
        assert seen["points_drawn"] >= 5, seen

        # the same server as the tracking URI of a study: runs and artifacts go through it
        spec = write_spec(tmp_path, "remote", GRID + TINY + "epochs = 1\n")
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
        assert {f["path"] for f in listed["files"]} == TRIAL_ARTIFACTS


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study(e2e, tmp_path):
    storage = f"sqlite:///{e2e['folder']}/optuna.db"
    with serving(["dashboard", "--storage", storage], "/api/studies",
                 tmp_path / "dashboard.log") as base:
        studies = http_json(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["e2e-smoke"]
        assert listening_on(int(base.rsplit(":", 1)[1])) == {"127.0.0.1"}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ui", "dashboard"])
def test_the_servers_listen_on_loopback_unless_host_says_otherwise(e2e, tmp_path, command):
    store = ["--tracking-uri", f"sqlite:///{e2e['folder']}/mlflow.db"] if command == "ui" else \
        ["--storage", f"sqlite:///{e2e['folder']}/optuna.db"]
    ready = "/health" if command == "ui" else "/api/studies"
    with serving([command, *store, "--host", "0.0.0.0"], ready, tmp_path / "any.log") as base:
        assert listening_on(int(base.rsplit(":", 1)[1])) == {"0.0.0.0"}  # asked for: all


def test_dashboard_refuses_a_missing_store(capsys, fresh_stores):
    assert_refused(capsys, ["dashboard", "--storage",
                            f"sqlite:///{fresh_stores['folder']}/optuna.db"],
                   "no Optuna storage", fresh_stores["folder"])


# --------------------------------------------------------------------------- run


@pytest.mark.slow
def test_only_runs_the_matching_grid_points(tmp_path, data_env, capsys):
    """--only NAME=VALUE (ONLY= in make) runs part of a grid; a later run without it does the
    rest. A malformed pair, an unknown dimension or value, or a search get one line, exit 2,
    and create nothing."""
    spec = write_spec(tmp_path, "only", GRID + "seeds = [0, 1]\n[space]\nbeta = [0.5, 2.0]\n"
                      + TINY + "epochs = 1\n")
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
    search = write_spec(tmp_path, "search", 'sampler = "tpe"\ntrials = 2\n[space]\n'
                        'beta = { low = 0.5, high = 2.0 }\n' + TINY)
    assert run_study(search, empty, "--only", "beta=1.0") == 2
    assert "--only selects grid points, but search is a tpe search" in capsys.readouterr().err
    assert not empty.exists()


@pytest.mark.parametrize("jobs, device, expected", [
    ("auto", "cpu", "cores"), ("auto", "cuda", 1), ("auto", "gpu?", 1),
    ("1", "cpu", 1), ("3", "cuda", 3),
    ("0", "cpu", "--jobs must be `auto` or a count >= 1, got '0'"),
    ("two", "cpu", "--jobs must be `auto` or a count >= 1, got 'two'"),
])
def test_jobs_is_a_count_or_auto(monkeypatch, jobs, device, expected):
    """--jobs auto: one single-threaded worker per core on the CPU, one on a GPU (an unknown
    device is left to the device check)."""
    monkeypatch.setattr(runner, "resolve_device", lambda name: name)  # as if cuda were there
    if isinstance(expected, str) and expected.startswith("--jobs"):
        with pytest.raises(UsageError, match=expected):
            runner.worker_count(jobs, device)
        return
    cores = available_cores()
    assert runner.worker_count(jobs, device) == (cores if expected == "cores" else expected)


def test_bad_names_exit_2(capsys, fresh_stores):
    folder, args = fresh_stores["folder"], fresh_stores["args"]
    assert_refused(capsys, ["run", "--study", "nope", *args], "unknown study 'nope'", folder)
    assert_refused(capsys, ["run", "--profile", "huge", *args], "unknown profile 'huge'", folder)
    assert_refused(capsys, ["run", "--jobs", "0", *args],
                   "--jobs must be `auto` or a count >= 1", folder)
    assert_refused(capsys, ["run", "--worker", *args], "--worker joins one study", folder)


def test_stop_after_must_be_positive(capsys, fresh_stores):
    assert_refused(capsys, ["run", "--study", "loss_choice", "--stop-after", "0",
                            *fresh_stores["args"]],
                   "--stop-after must be > 0 minutes, got 0.0", fresh_stores["folder"])


# --------------------------------------------------------------------------- help, list, version


@pytest.mark.parametrize("command", [[], ["run"], ["train"], ["list"], ["ui"], ["dashboard"]])
def test_every_command_has_help(capsys, command):
    assert main([*command, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_list_prints_the_suite(capsys):
    assert main(["list", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    suite = ["kl_dynamics", "loss_choice", "search_fashion", "search_mnist"]
    assert all(f"{name}-smoke" in out for name in suite)


def test_version_prints_the_packages_version():
    """The console script a user runs, against the version pyproject.toml declares."""
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(),
                         re.M).group(1)
    done = subprocess.run([vae_study(), "--version"], env=console_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"vae-study {declared}"


# --------------------------------------------------------------------------- make


def test_make_prints_no_password():
    """make passes the store URLs through the environment: neither its echo of a recipe nor
    `make help` shows the password."""
    secret = "Pw-make-5e3b"
    urls = [f"STORAGE=postgresql://u:{secret}@127.0.0.1:1/optuna",
            f"TRACKING_URI=postgresql+psycopg2://u:{secret}@127.0.0.1:1/mlflow"]
    for target in ("help", "-n study", "-n worker", "-n report", "-n ui", "-n dashboard"):
        done = subprocess.run(["make", "-C", str(REPO), *target.split(), *urls, "STUDY=x"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert secret not in done.stdout + done.stderr, target
        if target == "help":
            assert "STORAGE=postgresql://u:***@127.0.0.1:1/optuna" in done.stdout


def test_make_ui_keeps_a_postgresql_password_off_every_command_line(postgres, tmp_path):
    """`TRACKING_URI=postgresql://... make ui`: the MLflow server it starts reads the store,
    and no process on the machine (make, the runner, the server, its workers) has the password
    in its command line, nor does anything it prints."""
    port, log_path = free_port(), tmp_path / "ui.log"
    env = {**os.environ, "TRACKING_URI": pg_url(postgres, "mlflow"), "PORT": str(port)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "-C", str(REPO), "ui"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, log_path, "/health")
        found = http_json(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 10})
        assert "experiments" in found  # the server reached the PostgreSQL store
        server = psutil.Process(proc.pid).children(recursive=True)
        assert server, "make ui started no process"
        leaks = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(PG_PASSWORD in arg for arg in p.info["cmdline"] or ()):
                leaks.append((p.info["pid"], p.info["cmdline"]))
        assert not leaks
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    shown = log_path.read_text()
    assert PG_PASSWORD not in shown and f"{PG_USER}:***@127.0.0.1:{postgres}/mlflow" in shown


def test_make_system_names_missing_packages_in_one_line_where_it_cannot_install(tmp_path):
    """A user who cannot install packages (not root) gets one line from `make test`'s first
    step naming what is missing and the command, exit status 2, and nothing else runs."""
    demote = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 else []
    done = subprocess.run([*demote, "make", "-C", str(REPO), "system", "CHROMIUM=no-such-chromium"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "chromium" in lines[0] and "apt-get install -y chromium" in lines[0]
    assert "installing" not in done.stdout
