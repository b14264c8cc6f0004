"""Where the stores and data live and whether they can be used: the Optuna storage and the
MLflow tracking store (URLs, defaults, SQLite settings, recognizing a store before writing
to it, opening the Optuna storage) and the redaction of passwords in anything printed.

Imports no torch: the report builder and the CLI's checks load it cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import re
import sqlite3
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend

from study.errors import UsageError
from study.paths import stores_folder

CONNECT_TIMEOUT_S = 15
"""Seconds to wait for a database or tracking server before the one-line error."""
SQLITE_LOCK_TIMEOUT_S = 60
"""Seconds a SQLite connection waits for another process's write lock (trials write a few
rows an epoch, so waits are short)."""
HEARTBEAT_S = 30
"""Seconds between a running trial's heartbeats in an RDB storage."""
GRACE_S = 120
"""Seconds without a heartbeat after which a trial counts as dead (FAIL, re-queued)."""
MAX_RETRY = 2
"""Times a dead worker's trial is re-queued with the same params."""


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|secret)=)[^&\s]*")


def redact(text: str) -> str:
    """`text` with every password in URLs replaced by ***: user:pw@host and ?password=."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)



def default_tracking_uri() -> str:
    """$VAE_TRACKING_URI (how make passes TRACKING_URI: never on a command line), else
    sqlite:///<project>/mlruns/mlflow.db (study.paths)."""
    return os.environ.get("VAE_TRACKING_URI") or f"sqlite:///{stores_folder() / 'mlflow.db'}"


def driver_url(url: str) -> str:
    """`url` for the installed PostgreSQL driver: the postgres extra carries psycopg 3 only,
    so a postgresql+psycopg2:// URL is served by psycopg 3 when psycopg2 is not installed."""
    old = "postgresql+psycopg2://"
    if url.startswith(old) and importlib.util.find_spec("psycopg2") is None:
        return "postgresql+psycopg://" + url[len(old):]
    return url


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (4 slashes for an absolute path), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def artifact_root(tracking_uri: str) -> Path | None:
    """Where artifacts go: `artifacts/` beside a sqlite store, `<project>/mlruns/artifacts`
    for another database, None for a tracking server (it stores them itself)."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    db = sqlite_path(tracking_uri)
    if db is not None:
        return db.resolve().parent / "artifacts"
    return stores_folder() / "artifacts"


@functools.cache
def tune_sqlite() -> None:
    """Every SQLite connection this process opens (MLflow's and Optuna's stores) runs in WAL
    mode with synchronous=NORMAL: a commit no longer waits for an fsync of the whole database,
    which halves the cost of an MLflow write (docs/performance.md), and readers (the UI,
    other workers) no longer block writers. A process crash loses nothing committed; a power
    cut may lose the last commits, never the database. WAL is a property of the file (it
    leaves -wal and -shm files beside it)."""

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


def writable(path: Path) -> bool:
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
    what = f"the {'Optuna storage' if kind == 'optuna' else 'MLflow tracking store'}"
    db = sqlite_path(url)
    if db is not None:
        if not writable(db.parent):
            raise UsageError(f"{what} {redact(url)}: folder {db.parent} cannot be created or "
                             f"written; pass a writable path with {flag}")
        if db.exists() and not os.access(db, os.W_OK):
            raise UsageError(f"{what} {redact(url)} is not writable; fix its permissions or "
                             f"pass another {flag}")
        if not db.exists() or db.stat().st_size == 0:
            return
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


def default_storage() -> str:
    """$VAE_STORAGE (how make passes STORAGE: never on a command line), else
    sqlite:///<project>/mlruns/optuna.db (study.paths)."""
    return os.environ.get("VAE_STORAGE") or f"sqlite:///{stores_folder() / 'optuna.db'}"


def check_storage(url: str) -> None:
    """The Optuna storage must be reachable (30 s) and writable; UsageError otherwise."""
    if "://" in url:
        check_database(url, "optuna", "--storage / STORAGE=")
        return
    path = Path(url).resolve()
    if not writable(path.parent):
        raise UsageError(f"journal file {redact(url)}: its folder cannot be created or written; "
                         f"pass a writable path with --storage")
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
                raise UsageError(f"--storage {path} is an SQLite database, not an Optuna "
                                 f"journal file; pass sqlite:///{path} if it is an Optuna "
                                 f"storage, or another path for a journal")


def open_storage(url: str):
    """An Optuna storage: RDB (with heartbeats and retries) for a URL, a journal for a path."""
    if "://" not in url:
        path = Path(url).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if sqlite_path(url) is not None:
        sqlite_path(url).resolve().parent.mkdir(parents=True, exist_ok=True)
        tune_sqlite()
        engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith(("postgresql", "mysql")):
            engine_kwargs["connect_args"] = {"connect_timeout": 30}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY),
            )
        except Exception as exc:
            raise UsageError(f"cannot open the Optuna storage {redact(url)} "
                             f"({redact(str(exc).splitlines()[0])}); fix --storage") from None


