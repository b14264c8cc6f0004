"""What several test modules share, as plain functions and constants (the fixtures are in
conftest.py): spec text and writing, the runner in-process or as a process of its own, the
stores read back, servers and their ports, `paused`, and a recording training callback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import optuna
from mlflow import MlflowClient

from study.runner import main
from study.train import Callback

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = REPO / "test-artifacts"
"""Screenshots a person may look at after the tests (test_report writes there too)."""
# How long a wait may last before it counts as a hang. Each wait ends on an event (a page
# answers, a process exits, a state shows in a store), so a slow or busy machine only waits
# longer; nothing is timed.
WAIT_S = 300
DEADLINE_S = 600

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
"""The [fixed] table of a toy study: seconds per trial on the CPU."""

GRID = 'sampler = "grid"\n'


def interruptible_spec(betas: list[float], **fixed) -> str:
    """A grid over beta on 3,000 images whose trials last long enough to be interrupted;
    `fixed` adds to (or overrides) its [fixed] table."""
    table = {"train_subset": 3000, "val_size": 300, "test_subset": 200, "batch_size": 100,
             "test_iw_k": 5, "latent_dim": 4, **fixed}
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join([GRID.strip(), "[space]", f"beta = {json.dumps(betas)}", "[fixed]", *lines])

TARGET_ACCURACY = {"mnist": 0.98, "fashion": 0.88}
"""What each dataset's classifier behind the Frechet distance reaches on its test split."""

TRIAL_ARTIFACTS = {"checkpoint.pt", "kl_per_dimension.png", "latent_pca.png",
                   "reconstructions.png", "samples.png"}
"""What a finished trial run holds (no resume/ states: those are deleted at the end)."""


def write_spec(folder: Path, name: str, text: str) -> Path:
    """`text` (dedented) as the spec `<folder>/<name>.toml`; the study is named `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    return path


THREE_BETAS = """
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


def three_betas(folder: Path, name: str = "three", epochs: int = 1, extra: str = "") -> Path:
    """A spec of three grid points (beta), `epochs` epochs each, plus `extra` fixed fields."""
    return write_spec(folder, name, THREE_BETAS.format(epochs=epochs) + extra)


def finished_study(stores: Path, name: str = "three"):
    return optuna.load_study(study_name=f"{name}-smoke", storage=f"sqlite:///{stores}/optuna.db")


def store_args(folder: Path) -> list[str]:
    """--storage and --tracking-uri of the SQLite stores in `folder`."""
    return ["--storage", f"sqlite:///{folder}/optuna.db",
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]


def run_args(spec: Path, folder: Path, *extra: str) -> list[str]:
    """`run` of `spec`, profile smoke, on the CPU and the SQLite stores in `folder`."""
    return ["run", "--study", str(spec), "--profile", "smoke", "--device", "cpu",
            *store_args(folder), *extra]


def run_study(spec: Path, folder: Path, *extra: str) -> int:
    """The runner's `run`, in this process; its exit status."""
    return main(run_args(spec, folder, *extra))


def load(folder: Path, spec_name: str, profile: str = "smoke"):
    """The Optuna study `<spec>-<profile>` and the runs of that profile in experiment `<spec>`:
    (study, client, experiment, study runs, trial runs)."""
    study = optuna.load_study(study_name=f"{spec_name}-{profile}",
                              storage=f"sqlite:///{folder}/optuna.db")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(spec_name)
    runs = client.search_runs([experiment.experiment_id], f"tags.profile = '{profile}'",
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("run_kind") == "study"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    return study, client, experiment, parents, children


def trial_runs(folder: Path, experiment: str) -> list:
    """The trial runs (any status) of `experiment` in the SQLite store in `folder`."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.run_kind = 'trial'", max_results=1000)


# --------------------------------------------------------------------------- processes


def runner_env(env: dict | None = None) -> dict:
    """The environment of a runner process: OpenMP threads sleep rather than spin when they
    wait (on a shared 2-core machine spinning threads made an epoch 40x slower)."""
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}


def start_runner(args: list[str], log_path: Path, env: dict | None = None,
                 core: int | None = None) -> subprocess.Popen:
    """`python -m study.runner ARGS` in its own session, output to `log_path`. With `core`,
    as a machine of its own: pinned to that CPU core (so the runner gives torch one thread)
    with OMP_NUM_THREADS=1."""
    env = runner_env(env)
    prefix = []
    if core is not None:
        cores = sorted(os.sched_getaffinity(0))
        prefix = ["taskset", "-c", str(cores[core % len(cores)])]  # execs python: same pid
        env["OMP_NUM_THREADS"] = "1"
    with open(log_path, "wb") as log:
        return subprocess.Popen([*prefix, sys.executable, "-m", "study.runner", *args], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_runner(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m study.runner ARGS` as a user runs it, to its end; output captured."""
    return subprocess.run([sys.executable, "-m", "study.runner", *args], cwd=REPO,
                          env=runner_env(env), capture_output=True, text=True,
                          timeout=DEADLINE_S, check=False)


def finish(proc: subprocess.Popen, timeout: float = DEADLINE_S) -> int:
    """The exit status of `proc`; its process group is killed if it is still running then."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop(proc: subprocess.Popen) -> None:
    """Stop the process group of `proc` (TERM, then KILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_refused(capsys, argv: list[str], needle: str, folder: Path) -> str:
    """The runner, in this process, refuses `argv` with one line on stderr naming `needle`,
    exit status 2, and writes nothing to the stores' `folder`; that line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0], lines[0]
    assert not folder.exists(), "something was written to the stores"
    return lines[0]


def console_env(env: dict | None = None) -> dict:
    """The environment of a console script (`.venv/bin/vae-study`) run from another working
    directory: this checkout's packages first, as `python -m` from it imports them (a
    worktree may share another checkout's editable install)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


def vae_study() -> str:
    """The `vae-study` console script of this Python environment."""
    return str(Path(sys.executable).with_name("vae-study"))


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one stderr line of a refused command (MLflow's own INFO logging aside)."""
    lines = [line for line in done.stderr.strip().splitlines() if " INFO " not in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


def _stopped(task: Path) -> bool:
    """Whether thread `task` (/proc/PID/task/TID) is stopped, or gone."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tTZX"
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def paused(proc: subprocess.Popen):
    """The process group of `proc` stopped (SIGSTOP) for the block, once every thread of `proc`
    has stopped, so that nothing it does can move between reading its state and acting on
    it; continued (SIGCONT) afterwards, unless the block killed it. Linux only (/proc)."""
    os.killpg(proc.pid, signal.SIGSTOP)
    while not all(_stopped(task) for task in Path(f"/proc/{proc.pid}/task").iterdir()):
        time.sleep(0.001)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)


# --------------------------------------------------------------------------- SQLite stores


def read_rows(db: Path, query: str, *args) -> list | None:
    """The rows of `query`, read-only, straight from SQLite (opening a store could race the
    runner creating its schema); None while the file or its tables do not exist yet, or
    SQLite is busy (rarely, for a reader of a WAL database)."""
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return conn.execute(query, args).fetchall()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def sqlite_tables(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A loopback port nothing listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_health(base: str, proc: subprocess.Popen, log_path: Path, path: str,
                    wait_s: float = WAIT_S) -> None:
    """Poll GET base + path until it answers 200; fail if `proc` exits first or it hangs."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(base + path, timeout=5) as response:
                if response.status == 200:
                    return
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{base} did not start"
        time.sleep(0.5)


@contextlib.contextmanager
def serving(args: list[str], ready_path: str, log_path: Path):
    """`python -m study.runner ARGS --port P` in its own session; yields the base URL once
    GET ready_path answers 200; stops the whole process group afterwards."""
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "study.runner", *args, "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, log_path, ready_path)
        yield base
    finally:
        stop(proc)
        log.close()


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


# --------------------------------------------------------------------------- PostgreSQL

PG_USER = "vae"
PG_PASSWORD = "Pw-7d1e0c-not-in-logs"  # distinctive, so any leak is found


def pg_url(port: int, database: str, scheme: str = "postgresql",
           password: str = PG_PASSWORD) -> str:
    """A URL any installed driver serves; the study CLI also takes postgresql+psycopg2://."""
    return f"{scheme}://{PG_USER}:{password}@127.0.0.1:{port}/{database}"


# --------------------------------------------------------------------------- training


class Recorder(Callback):
    """Records what the training loop hands its callbacks."""

    def __init__(self):
        self.steps, self.epochs, self.ends = [], [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))

    def on_train_end(self, result):
        self.ends.append((result, dict(result.test)))


def same_but_time(h1: list[dict], h2: list[dict]) -> bool:
    """Whether two histories are equal but for their epoch timings."""
    strip = [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h1]
    return strip == [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h2]
