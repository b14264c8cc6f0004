"""MLflow tracking for studies: where runs and artifacts live, one child run per trial with
its metrics and artifacts, and redaction of passwords in any URL we print or log.

Runs are written through `MlflowClient` (no fluent active-run state, so nothing leaks between
trials or threads). A trial's run is linked to its study invocation's parent run by the
`mlflow.parentRunId` tag, which is exactly what `mlflow.start_run(parent_run_id=...)` writes;
`nested=True` is never used (it makes orphans when trials run in parallel).

Every logged value is per image: nats for likelihood terms (summed over pixels and latent
dimensions, averaged over images), SSE summed over pixels and averaged over images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import math
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from study.errors import UsageError
from study.train import Callback, TrainResult

REPO = Path(__file__).resolve().parents[1]
CONNECT_TIMEOUT_S = 15
"""Seconds to wait for a database or tracking server before the one-line error: with the
interpreter and imports, an unreachable store is reported within the 30 s the issue allows."""
EXPERIMENT_KIND = "mlflow.experimentKind"
"""The experiment tag MLflow's UI reads to choose its model-training view over the GenAI one."""
SQLITE_LOCK_TIMEOUT_S = 60
"""Seconds a SQLite connection waits for another process's write lock."""
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_TAG_LENGTH = 5000


# --------------------------------------------------------------------------- redaction

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|secret)=)[^&\s]*")


def redact(text: str) -> str:
    """`text` with every password in URLs replaced by ***: user:pw@host and ?password=."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)


# --------------------------------------------------------------------------- locations


def default_tracking_uri(repo: Path = REPO) -> str:
    """$VAE_TRACKING_URI (how make passes TRACKING_URI: never on a command line), else
    sqlite:///<repo>/mlruns/mlflow.db."""
    return os.environ.get("VAE_TRACKING_URI") or \
        f"sqlite:///{Path(repo).resolve() / 'mlruns' / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (4 slashes for an absolute path), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def artifact_root(tracking_uri: str, repo: Path = REPO) -> Path | None:
    """Where artifacts go: `artifacts/` beside a sqlite store, `<repo>/mlruns/artifacts` for
    another database, None for a tracking server (it stores them itself)."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    db = sqlite_path(tracking_uri)
    if db is not None:
        return db.resolve().parent / "artifacts"
    return Path(repo).resolve() / "mlruns" / "artifacts"


@functools.cache
def tune_sqlite() -> None:
    """Every SQLite connection this process opens (MLflow's and Optuna's stores) runs in WAL
    mode with synchronous=NORMAL: a commit no longer waits for an fsync of the whole database,
    which halved the cost of each MLflow write here (log_batch of 30 metrics 15.5 -> 8.2 ms,
    set_tags 5.7 -> 3.2 ms), and readers (the UI, other workers) no longer block writers. A
    process crash loses nothing committed; a power cut may lose the last commits, never the
    database. WAL is a property of the file (it leaves -wal and -shm files beside it)."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "connect")
    def _pragmas(dbapi_connection, _record):
        if type(dbapi_connection).__module__.split(".")[0] not in ("sqlite3", "pysqlite2"):
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        except Exception:  # a read-only or busy file: keep SQLite's defaults
            pass
        finally:
            cursor.close()


@contextlib.contextmanager
def first_use_lock(*urls: str):
    """Hold an exclusive lock on the folder of each SQLite store in `urls` for the block.

    Two first runs on fresh SQLite files would both create the schema (Optuna's and MLflow's
    alembic version rows collide) and both create the study's experiment; under this lock one
    creates, the other finds. A folder lock (flock on its descriptor) leaves no lock file, and
    never touches the database files, whose own POSIX locks SQLite manages."""
    folders = sorted({str(sqlite_path(u).resolve().parent) for u in urls
                      if sqlite_path(u) is not None})
    with contextlib.ExitStack() as stack:
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def _writable(path: Path) -> bool:
    """True when `path` could be created: its nearest existing ancestor is a writable dir."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


STORE_TABLES = {"optuna": {"studies", "trials", "version_info"},
                "mlflow": {"experiments", "runs", "metrics"}}
"""Tables that mark a database as an Optuna storage or an MLflow tracking store."""
STORE_NAMES = {"optuna": "an Optuna storage", "mlflow": "an MLflow tracking store"}
SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_tables(db: Path) -> set[str]:
    """The tables of an existing SQLite file; DatabaseError when it is not an intact one."""
    import sqlite3

    with open(db, "rb") as fh:
        header = fh.read(100)
    if not header.startswith(SQLITE_HEADER):
        raise sqlite3.DatabaseError("file is not a database")
    # The header's page count is valid when its change counter matches (offsets 24 and 92):
    # a file shorter than that many pages was cut short (SQLite reports it only on reading).
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if header[24:28] == header[92:96]:
        pages = int.from_bytes(header[28:32], "big")
        if db.stat().st_size < pages * page_size:
            raise sqlite3.DatabaseError("database disk image is malformed (file cut short)")
    conn = sqlite3.connect(db, timeout=SQLITE_LOCK_TIMEOUT_S)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


def check_database(url: str, kind: str, flag: str) -> None:
    """Reach the SQLAlchemy database of `kind` ("optuna" or "mlflow") within
    CONNECT_TIMEOUT_S and recognize it before anything writes to it: an empty or new
    database, or one holding that kind's tables. Raise UsageError (redacted) for an
    unreachable, unwritable or damaged database, or one that holds the other kind's tables
    (STORAGE and TRACKING_URI swapped)."""
    import sqlalchemy

    what = f"the {'Optuna storage' if kind == 'optuna' else 'MLflow tracking store'}"
    db = sqlite_path(url)
    if db is not None:
        if not _writable(db.parent):
            raise UsageError(f"{what} {redact(url)}: folder {db.parent} cannot be created or "
                             f"written; pass a writable path with {flag}")
        if db.exists() and not os.access(db, os.W_OK):
            raise UsageError(f"{what} {redact(url)} is not writable; fix its permissions or "
                             f"pass another {flag}")
        if not db.exists() or db.stat().st_size == 0:
            return
        import sqlite3

        try:
            tables = _sqlite_tables(db)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise UsageError(f"{what} {db} is damaged ({exc}); restore it from a backup, or "
                             f"move it away to start afresh, or pass another {flag}") from None
    else:
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith(
            ("postgresql", "mysql")) else {}
        try:
            engine = sqlalchemy.create_engine(url, connect_args=connect_args)
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
                tables = set(sqlalchemy.inspect(conn).get_table_names())
            engine.dispose()
        except Exception as exc:  # any driver error means: not usable now
            reason = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
            raise UsageError(f"cannot reach {what} {redact(url)} ({reason}); start the "
                             f"database or fix {flag}") from None
    other = "mlflow" if kind == "optuna" else "optuna"
    if STORE_TABLES[other] <= tables:
        raise UsageError(
            f"{what} {redact(url)} holds {STORE_NAMES[other]}, not {STORE_NAMES[kind]}: "
            f"are STORAGE and TRACKING_URI swapped? Optuna and MLflow each need their own "
            f"database (default mlruns/optuna.db and mlruns/mlflow.db); fix {flag}")


def check_tracking_uri(uri: str) -> None:
    """The tracking store must answer within CONNECT_TIMEOUT_S; raise UsageError otherwise."""
    flag = "--tracking-uri / TRACKING_URI="
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
                response.read(64)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"cannot reach the MLflow tracking server {redact(uri)} ({reason}); "
                             f"start it (make ui) or fix {flag}") from None
        return
    if "://" not in uri or uri.startswith("file:"):
        raise UsageError(f"tracking URI {redact(uri)} is a file store, which MLflow 3.13+ no "
                         f"longer supports; use sqlite:///<path>/mlflow.db or http://host:port")
    check_database(uri, "mlflow", flag)


@functools.cache
def git_state(repo: str = str(REPO)) -> tuple[str, str]:
    """(commit, dirty) of the working tree: dirty is "true" when tracked files differ."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, dirty


@functools.cache
def machine_name(device: str) -> str:
    """What ran the trial: the GPU's name on cuda, else the CPU model from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def environment_tags(device: str) -> dict[str, str]:
    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "device": device,
            "machine": machine_name(device), "torch_version": torch.__version__}


# --------------------------------------------------------------------------- runs


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One MLflow store: experiments, parent and trial runs, batched logging."""

    def __init__(self, tracking_uri: str, repo: Path = REPO):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.artifacts = artifact_root(tracking_uri, repo)
        if sqlite_path(tracking_uri) is not None:
            tune_sqlite()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._artifact_uris: dict[str, str] = {}  # run id -> artifact URI, from create_run

    def experiment_id(self, name: str, create: bool = True) -> str:
        """The experiment `name` (restored if deleted), created with an explicit artifact
        location under the artifact root when `create`."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        if not create:
            raise UsageError(f"no MLflow experiment {name!r} in {redact(self.uri)}; start the "
                             f"study first (make study STUDY=...) before joining it")
        location = None
        if self.artifacts is not None:
            folder = self.artifacts / re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
            location = folder.as_uri()
        from mlflow.exceptions import MlflowException

        try:  # MLflow 3's UI opens experiments in its GenAI view unless told they train models
            return self.client.create_experiment(
                name, artifact_location=location,
                tags={EXPERIMENT_KIND: "custom_model_development"})
        except MlflowException as exc:  # another process created it since we looked
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, experiment_id: str, name: str, tags: dict, params: dict | None = None,
                  parent_run_id: str | None = None) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {k: redact(str(v))[:MAX_TAG_LENGTH] for k, v in tags.items()}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(experiment_id, tags=tags, run_name=name)
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One log_batch call for all of `metrics` at `step` (non-numbers are skipped)."""
        self.log_metric_rows(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        items = [Metric(k, float(v), now, int(s)) for k, v, s in rows
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))[:MAX_TAG_LENGTH])
                                            for k, v in tags.items()])

    def end_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run FINISHED, KILLED (pruned, interrupted; `reason` as `stop_reason`) or
        FAILED (`reason` as `failure_reason`)."""
        if reason:
            self.set_tags(run_id, {"failure_reason" if status == "FAILED" else "stop_reason": reason})
        self.client.set_terminated(run_id, status=status, end_time=_now_ms())
        self._artifact_uris.pop(run_id, None)

    def reopen_run(self, run_id: str, name: str, tags: dict) -> None:
        """Set a stopped or failed run RUNNING again (a resumed trial goes on in it): new name
        and `tags`, the old end's failure_reason / stop_reason removed."""
        run = self.client.get_run(run_id)
        for key in ("failure_reason", "stop_reason"):
            if key in run.data.tags:
                self.client.delete_tag(run_id, key)
        self.client.update_run(run_id, status="RUNNING", name=name)
        self.set_tags(run_id, tags)
        self._artifact_uris[run_id] = run.info.artifact_uri

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Every file of `folder` into the run's artifacts (under `artifact_path`). For a run
        this tracker created, the artifact repository comes from the URI create_run returned;
        MlflowClient would first fetch the whole run (params, tags, latest metrics): 15 ms."""
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            self.client.log_artifacts(run_id, str(folder), artifact_path)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(uri, tracking_uri=self.uri).log_artifacts(str(folder),
                                                                          artifact_path)


class TrialLogger(Callback):
    """Logs a trial's curves to its run, one log_batch call per step, and times itself.

    Per epoch (step = epoch number): every key of the engine's epoch metrics (train/*, val/*,
    val/kl_dim_<jj>, beta, lr, epoch_seconds, likelihood/sigma). Within the first epoch, every
    `step_log_every` optimizer steps (step = global step): `step/train_recon`, `step/train_kl`
    and `step/beta`. These keys are distinct from the per-epoch `train/recon`, `train/kl` and
    `beta` on purpose: one metric key must have one x-axis, and mixing global steps with epoch
    numbers in one series would make the curves unreadable. The engine hands the first-epoch
    steps over together after that epoch; they go in the same log_batch as the epoch's values.

    `seconds` is the wall time spent inside this callback: the tracking cost during training.
    """

    STEP_KEYS = {"train/recon": "step/train_recon", "train/kl": "step/train_kl",
                 "beta": "step/beta"}

    def __init__(self, tracker: Tracker, run_id: str, logged_through: int = 0):
        self.tracker, self.run_id = tracker, run_id
        self.logged_through = logged_through
        """A resumed run's epochs up to here are in the store already (logged before a kill,
        after the last checkpoint): their recomputed values, the same numbers, are not
        logged twice."""
        self.seconds = 0.0
        self._pending: list[tuple[str, float, int]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        t = time.perf_counter()
        self._pending += [(self.STEP_KEYS.get(k, f"step/{k}"), v, step) for k, v in metrics.items()]
        self.seconds += time.perf_counter() - t

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch <= self.logged_through:
            return
        t = time.perf_counter()
        rows, self._pending = self._pending, []
        rows += [(k, v, epoch) for k, v in metrics.items()]
        self.tracker.log_metric_rows(self.run_id, rows)
        self.seconds += time.perf_counter() - t


# --------------------------------------------------------------------------- final results


def final_metrics(result: TrainResult) -> dict[str, float]:
    """`test/<key>` for every key the engine's test evaluation returns, plus quantities that
    only exist at the end (the SSE-equivalent beta of a learned Gaussian sigma)."""
    out = {f"test/{k}": v for k, v in result.test.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    config = result.config
    if config.likelihood == "gaussian_learned" and result.final.get("likelihood/sigma"):
        sigma = result.final["likelihood/sigma"]
        out["likelihood/sse_equivalent_beta"] = 2 * sigma**2 * config.beta
    return out


def write_artifacts(result: TrainResult, splits, folder: Path) -> list[str]:
    """The trial's figures and checkpoint into `folder`; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    model, likelihood, config = result.model, result.likelihood, result.config
    model.eval()
    with torch.no_grad():
        x = splits.test.served(epoch=0)
        mu, _ = model.encode(x)
        labels = splits.test.labels
        recon_grid(model, likelihood, x[:16], folder / "reconstructions.png")
        sample_grid(model, likelihood, 64, config.seed, folder / "samples.png")
    model.train()
    kl_heatmap(result.history, folder / "kl_per_dimension.png")
    latent_pca(mu.cpu(), labels.cpu(), folder / "latent_pca.png")
    save_checkpoint(result, folder / "checkpoint.pt")
    return sorted(p.name for p in folder.iterdir())


def save_grid(batch: torch.Tensor, nrow: int, path: Path) -> None:
    """Images in [0, 1] as one PNG grid: torchvision's save_image, written at zlib level 1."""
    from torchvision.utils import make_grid

    grid = make_grid(batch.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    write_png(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy(),
              path)


def recon_grid(model, likelihood, x: torch.Tensor, path: Path) -> None:
    """Test images (top row) above their mean reconstructions (bottom row)."""
    mu, _ = model.encode(x)
    recon = likelihood.mean(model.decode(mu))
    save_grid(torch.cat([x, recon]), len(x), path)


def sample_grid(model, likelihood, n: int, seed: int, path: Path) -> None:
    """Means of p(x|z) for z drawn from the prior N(0, I) (seeded)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 31)
    z = torch.randn(n, model.latent_dim, generator=gen, device=device)
    images = likelihood.mean(model.decode(z))
    save_grid(images, int(math.sqrt(n)), path)


KL_COLOUR_RANGE = (0.01, 100.0)
"""Nats per image of the trial heatmap's fixed log colour scale. It is the same in every
trial, so heatmaps compare by eye across runs; its floor is a tenth of the reports' collapse
threshold (0.1 nats), as in the KL dynamics report, and values beyond it take the end colours
(the colour bar's triangles)."""
PCA_EXTENT = 5.0
"""The projection's axes span +-PCA_EXTENT standard deviations of PC 1; points beyond are
drawn on the border."""


def write_png(pixels, path: Path) -> None:
    """An (H, W, 3 or 4) uint8 array as PNG at zlib level 1: for a trial's heatmap 3.0 ms
    against 5.0 ms at PIL's default level 6, for the same file size (flat-coloured figures)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(pixels)).save(path, format="png", compress_level=1)


class _Blitted:
    """A matplotlib figure whose axes, ticks, labels and colour bar are rendered once; each
    trial restores that background and draws only its own `artists` on it (matplotlib's
    blitting). Laying out and rendering the text of ticks and labels was most of the cost of a
    trial's figures (50-70 ms each on this CPU even with reused figures); this draws only
    what changes. `layout_artists` (an axis whose limits follow the data's shape) are left
    out of the base background and drawn onto a copy of it once per `layout`, the hashable
    the caller names the layout by. `Figure` objects, not pyplot: no global state, no GUI.
    Not thread-safe."""

    def __init__(self, fig, artists, layout_artists=(), layout=None):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.fig, self.artists, self.layout_artists = fig, list(artists), list(layout_artists)
        self.canvas = FigureCanvasAgg(fig)
        hidden = self.artists + self.layout_artists
        for artist in hidden:
            artist.set_visible(False)
        self.canvas.draw()
        self.base = self.canvas.copy_from_bbox(fig.bbox)
        for artist in hidden:
            artist.set_visible(True)
        self.backgrounds: dict = {}
        self.layout = None
        self.use(layout)

    def use(self, layout) -> None:
        """Switch to the background of `layout`, set up by the caller just before (limits),
        drawing its layout artists on the base background the first time."""
        if layout not in self.backgrounds:
            if self.layout_artists:
                self.canvas.restore_region(self.base)
                for artist in self.layout_artists:
                    self.fig.draw_artist(artist)
                self.backgrounds[layout] = self.canvas.copy_from_bbox(self.fig.bbox)
            else:
                self.backgrounds[layout] = self.base
        self.background, self.layout = self.backgrounds[layout], layout

    def save(self, path: Path) -> None:
        self.canvas.restore_region(self.background)
        for artist in sorted(self.artists, key=lambda a: a.get_zorder()):
            self.fig.draw_artist(artist)
        write_png(self.canvas.buffer_rgba(), path)


class _Figures:
    """The two matplotlib figures of a trial, built once per process and size, then only
    refilled and blitted (see `_Blitted`). Everything that could change their layout is fixed
    so that the background stays valid: the heatmap's colour scale (KL_COLOUR_RANGE) and the
    projection's axes (PCA_EXTENT standard deviations of PC 1)."""

    def __init__(self):
        self.heatmaps: dict[tuple[float, float], tuple] = {}  # figure size (in) -> figure
        self.projection: tuple | None = None

    def heatmap(self, values, path: Path) -> None:
        """`values` (dims, epochs): validation KL per dimension and epoch, nats per image.
        One figure per size; the first time a shape is drawn on it (another latent_dim) only
        its axes are drawn onto the kept background (~12 ms, against ~45 ms for a full draw and
        ~150 ms for a new figure); later trials of that shape only blit (~6 ms)."""
        dims, epochs = values.shape
        extent = (0.5, epochs + 0.5, dims - 0.5, -0.5)
        # few sizes, so that a search over latent_dim reuses figures: one up to 32 rows
        size = (max(4.0, 0.4 * epochs + 2.5), 3.0 if dims <= 32 else max(5.5, 0.04 * dims + 1.5))
        if size not in self.heatmaps:
            from matplotlib.colors import LogNorm
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator

            width, height = size
            fig = Figure(figsize=size, dpi=90)
            ax = fig.add_subplot()
            image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest",
                              norm=LogNorm(*KL_COLOUR_RANGE), extent=extent)
            ax.set_xlabel("epoch")
            ax.set_ylabel("latent dimension")
            ax.set_title("validation KL per dimension")
            fig.colorbar(image, ax=ax, label="nats per image (log)", extend="both")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.subplots_adjust(left=0.7 / width, bottom=0.55 / height, right=1 - 0.5 / width,
                                top=1 - 0.35 / height)
            self.heatmaps[size] = (_Blitted(fig, [image, *ax.spines.values()],
                                            [ax.yaxis, ax.xaxis], extent), image)
        blitted, image = self.heatmaps[size]
        image.set_data(values)
        if blitted.layout != extent:
            image.set_extent(extent)  # and the axes' limits, hence the ticks
            blitted.use(extent)
        blitted.save(path)

    def scatter(self, coords, labels, explained, path: Path) -> None:
        """`coords` (N, 2) in standard deviations of PC 1, coloured by integer `labels` (N,)
        in 0..9; `explained` the two components' fractions of the variance. One marker line
        per class: Agg stamps a cached marker, about 10x faster than a scatter collection."""
        import numpy as np

        if self.projection is None:
            import matplotlib
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize
            from matplotlib.figure import Figure

            cmap = matplotlib.colormaps["tab10"]
            fig = Figure(figsize=(5, 4.5), dpi=80)
            ax = fig.add_subplot()
            classes = [ax.plot([], [], "o", ms=3, mew=0, color=cmap(k))[0] for k in range(10)]
            fig.colorbar(ScalarMappable(Normalize(-0.5, 9.5), cmap), ax=ax, ticks=range(10),
                         label="class")
            ax.set(xlim=(-PCA_EXTENT, PCA_EXTENT), ylim=(-PCA_EXTENT, PCA_EXTENT))
            ax.set_xlabel("PC 1 (100% of the variance)")
            ax.set_ylabel("PC 2 (100%)")
            ax.set_title("test posterior means, PCA (in sd of PC 1)")
            fig.subplots_adjust(left=0.14, bottom=0.12, right=0.95, top=0.92)
            texts = [ax.xaxis.label, ax.yaxis.label]
            self.projection = (_Blitted(fig, [*classes, *texts, *ax.spines.values()]), classes,
                               texts)
        blitted, classes, (xlabel, ylabel) = self.projection
        coords = np.clip(coords, -PCA_EXTENT, PCA_EXTENT)
        for k, line in enumerate(classes):
            line.set_data(coords[labels == k, 0], coords[labels == k, 1])
        xlabel.set_text(f"PC 1 ({explained[0]:.0%} of the variance)")
        ylabel.set_text(f"PC 2 ({explained[1]:.0%})")
        blitted.save(path)


_FIGURES = _Figures()


def kl_heatmap(history: list[dict[str, float]], path: Path) -> None:
    """Validation KL of each latent dimension (rows) over epochs (columns), nats per image."""
    keys = sorted(k for k in history[0] if k.startswith("val/kl_dim_"))
    values = torch.tensor([[h[k] for h in history] for k in keys])
    _FIGURES.heatmap(values.numpy(), path)


def pca_coordinates(means: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The first two principal components of `means` (N, Z) in standard deviations of the
    first, and the fractions of the total variance they explain (a 1-D space gets a zero PC 2)."""
    centred = means.double() - means.double().mean(0)
    _, singular, v = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ v[:2].T
    variance = singular.square()
    explained = (variance[:2] / variance.sum().clamp_min(1e-300)).tolist()
    if coords.shape[1] == 1:
        coords, explained = torch.cat([coords, torch.zeros_like(coords)], 1), explained + [0.0]
    scale = coords[:, 0].std().clamp_min(1e-12) if len(coords) > 1 else torch.tensor(1.0)
    return (coords / scale).float(), explained


def latent_pca(means: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """The test posterior means projected on their first two principal components."""
    coords, explained = pca_coordinates(means)
    _FIGURES.scatter(coords.numpy(), labels.numpy(), explained, path)


def save_checkpoint(result: TrainResult, path: Path) -> None:
    """Plain types only, so `torch.load(path, weights_only=True)` reads it back."""
    torch.save({
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "likelihood_state": {k: v.detach().cpu() for k, v in result.likelihood.state_dict().items()},
        "config": dataclasses.asdict(result.config),
    }, path)


RESUME_ARTIFACTS = "resume"
RESUME_SLOTS = ("state-a.pt", "state-b.pt")
"""A run's resumable state alternates between two artifact files, so that a kill while one
is being written leaves the other, one checkpoint older, to resume from."""


class ResumeStates:
    """Saves a trial's resumable states (`study.train.resume_state`) as artifacts of its run,
    under resume/, and finds the newest one that loads. Loading uses weights_only=True."""

    def __init__(self, tracker: Tracker, run_id: str, last_slot: str | None = None):
        self.tracker, self.run_id = tracker, run_id
        self.last_slot = last_slot
        self.seconds = 0.0

    def save(self, state: dict) -> None:
        t = time.perf_counter()
        slot = RESUME_SLOTS[1] if self.last_slot == RESUME_SLOTS[0] else RESUME_SLOTS[0]
        with tempfile.TemporaryDirectory(prefix="vae-resume-") as tmp:
            torch.save(state, Path(tmp) / slot)
            self.tracker.log_artifacts(self.run_id, Path(tmp), RESUME_ARTIFACTS)
        self.last_slot = slot
        self.seconds += time.perf_counter() - t

    @staticmethod
    def newest(tracker: Tracker, run_id: str) -> tuple[dict, str] | None:
        """(state, slot) of the newest state of `run_id` that loads; None if it has none."""
        import mlflow.artifacts

        names = {Path(f.path).name for f in tracker.client.list_artifacts(run_id, RESUME_ARTIFACTS)}
        best = None
        with tempfile.TemporaryDirectory(prefix="vae-resume-") as tmp:
            for slot in RESUME_SLOTS:
                if slot not in names:
                    continue
                try:
                    path = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=f"{RESUME_ARTIFACTS}/{slot}", dst_path=tmp,
                        tracking_uri=tracker.uri)
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception:  # a file cut short by a kill: the other slot is older
                    continue
                if best is None or state.get("epoch", 0) > best[0].get("epoch", 0):
                    best = (state, slot)
        return best


def last_logged_epoch(tracker: Tracker, run_id: str) -> int:
    """The last epoch whose per-epoch metrics are in the run (0 if none)."""
    history = tracker.client.get_metric_history(run_id, "epoch_seconds")
    return max((m.step for m in history), default=0)


def log_trial_artifacts(tracker: Tracker, run_id: str, result: TrainResult, splits) -> None:
    """The figures and checkpoint of a finished trial, written to a temporary folder and
    logged in one call."""
    with tempfile.TemporaryDirectory(prefix="vae-artifacts-") as tmp:
        write_artifacts(result, splits, Path(tmp))
        tracker.log_artifacts(run_id, Path(tmp))
