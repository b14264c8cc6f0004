"""The stores, recognized before anything is written to them: a damaged or swapped store, an
unreachable database or tracking server (one line, passwords redacted, nothing written),
two first runs on fresh SQLite files at once, a journal file storage; and redaction."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from helpers import (
    BETAS,
    DEADLINE_S,
    GRID,
    PG_PASSWORD,
    REPO,
    TINY,
    assert_refused,
    error_line,
    finished_study,
    free_port,
    pg_url,
    run_args,
    run_runner,
    sqlite_tables,
    start_runner,
    three_betas,
    trial_runs,
    write_spec,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from study.runner import main
from study.stores import redact


@pytest.mark.slow
def test_a_truncated_mlflow_store_gets_one_line(copy_of):
    spec, stores = copy_of
    db = stores / "mlflow.db"
    os.truncate(db, db.stat().st_size // 2)
    for leftover in stores.glob("mlflow.db-*"):
        leftover.unlink()
    line = error_line(run_runner(run_args(spec, stores)))
    assert line.startswith(f"error: the MLflow tracking store {db} is damaged")
    assert "restore it from a backup" in line


@pytest.mark.slow
@pytest.mark.parametrize("journal", [False, True])
def test_swapped_stores_are_recognized_before_anything_is_written(copy_of, journal):
    spec, stores = copy_of
    mlflow_db, optuna_db = stores / "mlflow.db", stores / "optuna.db"
    before = {p: p.read_bytes() for p in (mlflow_db, optuna_db)}
    storage = str(mlflow_db) if journal else f"sqlite:///{mlflow_db}"
    done = run_runner(["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
                       "--storage", storage, "--tracking-uri", f"sqlite:///{optuna_db}"])
    line = error_line(done)
    assert ("STORAGE and TRACKING_URI swapped" in line) or ("not an Optuna journal file" in line)
    assert {p: p.read_bytes() for p in before} == before
    assert "studies" not in sqlite_tables(mlflow_db)
    assert "experiments" not in sqlite_tables(optuna_db)


@pytest.mark.slow
def test_two_first_runs_at_once_both_succeed_and_share_the_grid(tmp_path, data_env):
    """Two first runs on fresh SQLite files: under the first-use lock one creates the schemas,
    the study and its experiment, the other finds them."""
    spec, stores = three_betas(tmp_path), tmp_path / "stores"
    procs = [start_runner(run_args(spec, stores), tmp_path / f"run{i}.log") for i in range(2)]
    codes = [p.wait(timeout=DEADLINE_S) for p in procs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    study = finished_study(stores)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["beta"] for t in complete) == BETAS  # each point once
    finished_runs = [r for r in trial_runs(stores, "three") if r.info.status == "FINISHED"]
    assert len(finished_runs) == len(BETAS)


@pytest.mark.slow
def test_a_journal_file_storage_works(tmp_path, data_env):
    spec = write_spec(tmp_path, "journal", GRID + TINY + "epochs = 1\n")
    journal = tmp_path / "optuna.journal"
    code = main(["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
                 "--storage", str(journal), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0
    study = optuna.load_study(study_name="journal-smoke",
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


# --------------------------------------------------------------------------- unreachable


def nowhere_spec(tmp_path):
    return write_spec(tmp_path, "nowhere", 'sampler = "grid"\n[fixed]\nepochs = 1\n')


@pytest.mark.parametrize("server", ["none listening", "wrong password"])
def test_an_unreachable_postgresql_storage_fails_at_once_in_one_line(tmp_path, request, server):
    """Nothing on the port, or a real PostgreSQL that refuses the password: one line, the
    password never shown."""
    password = "Pw-wrong-91c4" if server == "wrong password" else PG_PASSWORD
    port = request.getfixturevalue("postgres") if server == "wrong password" else free_port()
    storage = pg_url(port, "optuna", scheme="postgresql", password=password)
    done = subprocess.run(  # refused at once; the command gives up after 15 s anyway
        [sys.executable, "-m", "study.runner", "run", "--study", str(nowhere_spec(tmp_path)),
         "--profile", "smoke", "--device", "cpu", "--storage", storage,
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot reach the Optuna storage postgresql://vae:***@")
    assert "--storage" in lines[0]
    assert password not in done.stdout + done.stderr
    if server == "wrong password":
        assert "password authentication failed" in lines[0]


def test_an_unreachable_postgresql_tracking_uri_fails_at_once_in_one_line(tmp_path):
    uri = pg_url(free_port(), "mlflow")  # nothing listens there
    done = subprocess.run(  # refused at once; the command gives up after 15 s anyway
        [sys.executable, "-m", "study.runner", "run", "--study", str(nowhere_spec(tmp_path)),
         "--profile", "smoke", "--device", "cpu", "--storage", f"sqlite:///{tmp_path}/optuna.db",
         "--tracking-uri", uri],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot reach" in lines[0] and "vae:***@127.0.0.1" in lines[0]
    assert "--tracking-uri" in lines[0] or "TRACKING_URI" in lines[0]
    assert PG_PASSWORD not in done.stdout + done.stderr
    assert not (tmp_path / "optuna.db").exists()  # nothing written to Optuna either


def test_unreachable_storage_exits_2_and_redacts_the_password(capsys, fresh_stores):
    url = f"postgresql://vae:hunter2@127.0.0.1:{free_port()}/optuna"
    argv = ["run", "--profile", "smoke", "--storage", url,
            "--tracking-uri", f"sqlite:///{fresh_stores['folder']}/mlflow.db"]
    line = assert_refused(capsys, argv, "cannot reach the Optuna storage", fresh_stores["folder"])
    assert "hunter2" not in line and "vae:***@127.0.0.1" in line


def test_unreachable_tracking_server_exits_2_and_redacts_the_password(capsys, fresh_stores):
    uri = f"http://vae:hunter2@127.0.0.1:{free_port()}"
    argv = ["run", "--profile", "smoke",
            "--storage", f"sqlite:///{fresh_stores['folder']}/optuna.db", "--tracking-uri", uri]
    line = assert_refused(capsys, argv, "cannot reach the MLflow tracking server",
                          fresh_stores["folder"])
    assert "hunter2" not in line


@pytest.mark.parametrize("text,expected", [
    ("postgresql://user:s3cret@db:5432/optuna", "postgresql://user:***@db:5432/optuna"),
    ("http://a:b@host/x and https://c:d%40e@h2:1", "http://a:***@host/x and https://c:***@h2:1"),
    ("postgresql://db/optuna?user=u&password=pw", "postgresql://db/optuna?user=u&password=***"),
    ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
    ("http://host:5000", "http://host:5000"),
])
def test_redact(text, expected):
    assert redact(text) == expected
