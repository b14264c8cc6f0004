"""A hostile user's faults, each reproduced on real stores and real processes: lost trials,
an emptied, damaged or swapped store, two first runs at once, a read-only data folder, a
runner killed under its workers, numbers in --only, and passwords on command lines."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DEADLINE_S = 600  # only a hang ends a wait this long; nothing here is timed

SPEC = """
sampler = "grid"
[space]
beta = [0.5, 1.0, 2.0]
[fixed]
train_subset = 500
val_size = 200
test_subset = 100
batch_size = 100
test_iw_k = 2
latent_dim = 4
epochs = {epochs}
"""
BETAS = [0.5, 1.0, 2.0]


def write_spec(folder: Path, name: str = "hostile", epochs: int = 1, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(SPEC.format(epochs=epochs)) + extra)
    return path


def runner(spec: Path, stores: Path, *extra: str, env: dict | None = None,
           background: bool = False, log: Path | None = None):
    """`python -m study.runner run` on the SQLite stores in `stores`, as a user runs it."""
    args = [sys.executable, "-m", "study.runner", "run", "--study", str(spec), "--profile",
            "smoke", "--device", "cpu", "--storage", f"sqlite:///{stores}/optuna.db",
            "--tracking-uri", f"sqlite:///{stores}/mlflow.db", *extra]
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    if background:
        out = open(log, "wb")  # noqa: SIM115 - closed by the caller's wait
        return subprocess.Popen(args, cwd=REPO, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=DEADLINE_S, check=False)


def trial_runs(stores: Path, experiment: str = "hostile") -> list:
    client = MlflowClient(f"sqlite:///{stores}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.run_kind = 'trial'", max_results=1000)


def tables(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


def error_line(done) -> str:
    """The one stderr line of a refused command (MLflow's own INFO logging aside)."""
    lines = [line for line in done.stderr.strip().splitlines() if " INFO " not in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """Stores holding one finished 3-point study; each test copies them."""
    folder = tmp_path_factory.mktemp("finished")
    spec = write_spec(folder)
    done = runner(spec, folder / "stores", env={"VAE_DATA_ROOT": str(data_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    return spec, folder / "stores"


@pytest.fixture
def copy_of(finished, tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    spec, stores = finished
    shutil.copytree(stores, tmp_path / "stores")
    shutil.copy(spec, tmp_path / spec.name)
    return tmp_path / spec.name, tmp_path / "stores"


def test_lost_optuna_trials_are_adopted_not_trained_again(copy_of):
    spec, stores = copy_of
    before = {r.info.run_id for r in trial_runs(stores)}
    (stores / "optuna.db").write_bytes(b"")  # `: > optuna.db`
    done = runner(spec, stores)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adopted 3 finished MLflow run(s)" in done.stderr
    assert {r.info.run_id for r in trial_runs(stores)} == before  # nothing trained twice
    study = optuna.load_study(study_name="hostile-smoke", storage=f"sqlite:///{stores}/optuna.db")
    assert sorted(t.params["beta"] for t in study.trials) == BETAS
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == before
    assert all(t.state.name == "COMPLETE" and t.user_attrs["adopted_from_mlflow"]
               for t in study.trials)


def test_runs_of_other_settings_are_not_adopted(copy_of):
    spec, stores = copy_of
    (stores / "optuna.db").write_bytes(b"")
    spec.write_text(spec.read_text() + "lr = 2e-3\n")  # the runs were trained at 1e-3
    done = runner(spec, stores)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adopted" not in done.stderr
    assert len(trial_runs(stores)) == 6  # the grid trained afresh beside the old runs


def test_an_emptied_mlflow_store_is_refused_with_the_way_out(copy_of):
    spec, stores = copy_of
    (stores / "mlflow.db").write_bytes(b"")
    for leftover in stores.glob("mlflow.db-*"):
        leftover.unlink()
    optuna_before = (stores / "optuna.db").read_bytes()
    line = error_line(runner(spec, stores))
    assert "3 finished trial(s) whose MLflow runs are not in" in line
    assert "optuna delete-study --study-name hostile-smoke" in line and "TRACKING_URI" in line
    assert (stores / "optuna.db").read_bytes() == optuna_before
    assert trial_runs(stores) == []  # no experiment, no run was created


def test_a_truncated_mlflow_store_gets_one_line(copy_of):
    spec, stores = copy_of
    db = stores / "mlflow.db"
    os.truncate(db, db.stat().st_size // 2)
    for leftover in stores.glob("mlflow.db-*"):
        leftover.unlink()
    line = error_line(runner(spec, stores))
    assert line.startswith(f"error: the MLflow tracking store {db} is damaged")
    assert "restore it from a backup" in line


@pytest.mark.parametrize("journal", [False, True])
def test_swapped_stores_are_recognized_before_anything_is_written(copy_of, journal):
    spec, stores = copy_of
    mlflow_db, optuna_db = stores / "mlflow.db", stores / "optuna.db"
    before = {p: p.read_bytes() for p in (mlflow_db, optuna_db)}
    storage = str(mlflow_db) if journal else f"sqlite:///{mlflow_db}"
    done = subprocess.run(
        [sys.executable, "-m", "study.runner", "run", "--study", str(spec), "--profile", "smoke",
         "--device", "cpu", "--storage", storage, "--tracking-uri", f"sqlite:///{optuna_db}"],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    line = error_line(done)
    assert ("STORAGE and TRACKING_URI swapped" in line) or ("not an Optuna journal file" in line)
    assert {p: p.read_bytes() for p in before} == before
    assert "studies" not in tables(mlflow_db) and "experiments" not in tables(optuna_db)


def test_two_first_runs_at_once_both_succeed_and_share_the_grid(data_root, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    spec, stores = write_spec(tmp_path), tmp_path / "stores"
    procs = [runner(spec, stores, background=True, log=tmp_path / f"run{i}.log")
             for i in range(2)]
    codes = [p.wait(timeout=DEADLINE_S) for p in procs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    study = optuna.load_study(study_name="hostile-smoke", storage=f"sqlite:///{stores}/optuna.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["beta"] for t in complete) == BETAS  # each point once
    finished_runs = [r for r in trial_runs(stores) if r.info.status == "FINISHED"]
    assert len(finished_runs) == len(BETAS)


def test_a_read_only_data_folder_serves_a_study(copy_of, data_root, tmp_path):
    """The data folder (with its cached classifiers) mounted read-only, as a shared dataset
    volume would be: the study reads everything it needs and writes nothing there."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True, check=False).returncode:
        pytest.fail("this test needs `unshare -rm` (util-linux, user namespaces) to mount the "
                    "data folder read-only")
    spec, _ = copy_of
    stores = tmp_path / "fresh"
    args = ["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
            "--storage", f"sqlite:///{stores}/optuna.db",
            "--tracking-uri", f"sqlite:///{stores}/mlflow.db"]
    data = str(Path(data_root).resolve())
    script = (f'mount --bind "{data}" "{data}" && mount -o remount,bind,ro "{data}" && '
              f'touch "{data}/probe" 2>/dev/null && exit 99; exec "$@"')
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m",
                           "study.runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=DEADLINE_S, check=False,
                          env={**os.environ, "VAE_DATA_ROOT": data})
    assert done.returncode != 99, "the data folder was still writable"
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r.info.status for r in trial_runs(stores)] == ["FINISHED"] * len(BETAS)


def test_a_study_whose_every_trial_failed_exits_non_zero(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    spec = write_spec(tmp_path, extra="lr = 10.0\nlikelihood = \"gaussian_learned\"\n")
    done = runner(spec, tmp_path / "stores")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: every trial of hostile-smoke failed (3 this run); the first: non-finite " \
           "loss at epoch 1" in done.stderr


def test_workers_die_with_a_killed_runner(data_root, tmp_path, monkeypatch):
    """kill -9 of a runner with two workers: the kernel's parent-death signal stops each
    worker at its epoch end (a resumable state, the run KILLED), and the last to go ends the
    invocation's study run; nothing trains on unsupervised."""
    import psutil

    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    spec, stores = write_spec(tmp_path, epochs=200), tmp_path / "stores"
    proc = runner(spec, stores, "--jobs", "2", background=True, log=tmp_path / "run.log")
    deadline = time.monotonic() + DEADLINE_S
    while len([r for r in trial_runs(stores) if r.info.status == "RUNNING"]) < 2:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children()
               if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=DEADLINE_S)
    assert not alive
    statuses = sorted(r.info.status for r in trial_runs(stores))
    assert statuses == ["KILLED", "KILLED"], statuses
    for run in trial_runs(stores):
        assert "the same command again to resume" in run.data.tags["stop_reason"]
    client = MlflowClient(f"sqlite:///{stores}/mlflow.db")
    (parent,) = client.search_runs([trial_runs(stores)[0].info.experiment_id],
                                   "tags.run_kind = 'study'")
    assert parent.info.status == "KILLED"
    assert parent.data.tags["stop_reason"] == f"the runner process {proc.pid} died"


def test_only_compares_numbers_as_numbers(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    spec = write_spec(tmp_path)
    done = runner(spec, tmp_path / "stores", "--only", "beta=1")  # the grid's 1.0
    assert done.returncode == 0, done.stderr[-3000:]
    assert [float(r.data.params["beta"]) for r in trial_runs(tmp_path / "stores")] == [1.0]
    line = error_line(runner(spec, tmp_path / "other", "--only", "beta=3"))
    assert "not one of beta's values in hostile (0.5, 1.0, 2.0)" in line


def test_make_prints_no_password(tmp_path):
    """make passes the store URLs through the environment: neither its echo of a recipe nor
    `make help` shows the password."""
    secret = "Pw-hostile-5e3b"
    urls = [f"STORAGE=postgresql://u:{secret}@127.0.0.1:1/optuna",
            f"TRACKING_URI=postgresql+psycopg2://u:{secret}@127.0.0.1:1/mlflow"]
    for target in ("help", "-n study", "-n worker", "-n report", "-n ui", "-n dashboard"):
        done = subprocess.run(["make", "-C", str(REPO), *target.split(), *urls, "STUDY=x"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert secret not in done.stdout + done.stderr, target
        if target == "help":
            assert "STORAGE=postgresql://u:***@127.0.0.1:1/optuna" in done.stdout
