"""The command line: `vae-study {train,run,list,ui,dashboard}` (also `python -m study.runner`).

`run` checks its arguments and stores and hands the suite to `study.suite`; `ui` and
`dashboard` serve MLflow's UI and optuna-dashboard over the stores. Where each part of a
study lives: study.suite (set-up, checks, summary), study.workers (worker processes),
study.trial (one trial and its run), study.grid (which trial next), study.liveness (dead
workers), study.stores (store URLs and checks), study.tracking (MLflow).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path

import optuna_dashboard

from study.config import DEVICES
from study.errors import UsageError
from study.grid import parse_only
from study.single_run import EXPERIMENT, config_from_overrides, train_one
from study.specs import PROFILES, describe, load_spec, spec_names, suite_names
from study.stores import (
    artifact_root,
    check_storage,
    check_tracking_uri,
    default_storage,
    default_tracking_uri,
    driver_url,
    open_storage,
    redact,
    sqlite_path,
)
from study.suite import SuiteOptions, run_suite
from study.tracking import run_name
from study.train import resolve_device
from study.workers import available_cores


def worker_count(jobs: str, device: str) -> int:
    """--jobs: a count, or `auto`: one single-threaded worker per core on the CPU (the
    per-op overhead of small models does not shrink with threads, the matmuls do not need
    them), one worker on a GPU."""
    if jobs == "auto":
        if device not in DEVICES:
            return 1  # the device check names the problem
        return available_cores() if resolve_device(device) == "cpu" else 1
    try:
        count = int(jobs)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--jobs must be `auto` or a count >= 1, got {jobs!r}")
    return count


def cmd_run(args) -> int:
    if args.profile not in PROFILES:
        raise UsageError(f"unknown profile {args.profile!r}; choose one of {', '.join(PROFILES)}")
    jobs = worker_count(args.jobs, args.device)
    if args.device not in DEVICES:
        raise UsageError(f"unknown device {args.device!r}; choose one of {', '.join(DEVICES)}")
    if args.stop_after is not None and not args.stop_after > 0:
        raise UsageError(f"--stop-after must be > 0 minutes, got {args.stop_after}")
    if args.worker and not args.study:
        raise UsageError("--worker joins one study: name it with --study NAME (make worker STUDY=...)")
    specs, problems = [], []
    for name in args.study or suite_names(args.profile):
        try:
            specs.append(load_spec(name, args.profile))
        except UsageError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError(" | ".join(problems))
    only = parse_only(args.only, specs)
    resolve_device(args.device)
    options = SuiteOptions(storage=driver_url(args.storage or default_storage()),
                           tracking_uri=driver_url(args.tracking_uri or default_tracking_uri()),
                           device=args.device, jobs=jobs, worker=args.worker,
                           stop_after=args.stop_after, only=only)
    check_tracking_uri(options.tracking_uri)
    check_storage(options.storage)
    return run_suite(specs, options)


def cmd_list(args) -> int:
    names = spec_names() if args.all else suite_names(args.profile)
    for name in names:
        spec = load_spec(name, args.profile)
        print(("  " if spec.suite else "* ") + describe(spec))
    if args.all:
        print("(* = not in the default suite; run it with --study NAME)")
    return 0


def cmd_ui(args) -> int:
    """exec `mlflow server` over the same store and artifact folder the runner writes.

    Runs written straight to the store keep the artifact folder they were created with (the
    server reads it); experiments created through the server (runner workers given
    `--tracking-uri http://...`, possibly on other machines) get `mlflow-artifacts:/`, which
    the server proxies into the same folder (`--artifacts-destination`)."""
    uri = driver_url(args.tracking_uri or default_tracking_uri())
    if uri.startswith(("http://", "https://")):
        raise UsageError(f"{redact(uri)} is already a tracking server: open it in a browser; "
                         f"`ui` serves a database store (sqlite:///... or postgresql://...)")
    check_tracking_uri(uri)
    root = artifact_root(uri)
    root.mkdir(parents=True, exist_ok=True)
    # the store URI goes in the environment (mlflow server's MLFLOW_BACKEND_STORE_URI), not
    # on the command line, where any user's process list would show its password
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--default-artifact-root", "mlflow-artifacts:/", "--artifacts-destination", root.as_uri(),
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType="
          f"machine_learning over {redact(uri)} (artifacts in {root}); Ctrl-C stops it",
          flush=True)
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})
    return 0  # pragma: no cover - execv does not return


def cmd_dashboard(args) -> int:
    """optuna-dashboard over the Optuna storage (loopback unless --host says otherwise)."""
    url = driver_url(args.storage or default_storage())
    check_storage(url)
    db = sqlite_path(url) if "://" in url else Path(url)
    if db is not None and not db.exists():
        raise UsageError(f"no Optuna storage at {db}; run a study first (make study) or pass "
                         f"--storage")
    storage = open_storage(url)
    print(f"optuna-dashboard on http://{args.host}:{args.port} over {redact(url)}; Ctrl-C stops it",
          flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------- CLI


def cmd_train(args) -> int:
    """One model with KEY=VALUE overrides of Config, logged as one MLflow run; prints the
    run and the test metrics."""
    config = config_from_overrides(args.overrides)
    tracking_uri = driver_url(args.tracking_uri or default_tracking_uri())
    result = train_one(config, tracking_uri, args.experiment)
    print(f"trained {run_name(config)} in {result.seconds:.0f} s; MLflow experiment "
          f"{args.experiment!r} in {redact(tracking_uri)} (make ui)")
    print("test metrics (nats or SSE per image, summed over pixels, averaged over images):")
    for key in ("nelbo", "recon", "kl", "iwae_nll", "sse", "ssim", "active_units",
                "probe_accuracy", "frechet_distance"):
        if key in result.test:
            print(f"  {key:18s} {result.test[key]:.4g}")
    return 0


def version() -> str:
    try:
        return importlib.metadata.version("vae-study")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-study",
        description="Train VAEs one at a time or as Optuna studies tracked in MLflow, and "
                    "serve the MLflow UI and optuna-dashboard (also `python -m study.runner`).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    one = sub.add_parser(
        "train", help="train one model: vae-study train likelihood=gaussian beta=4",
        description="Train one VAE with the defaults of study.config.Config, changed by "
                    "KEY=VALUE overrides (values as in a spec's [fixed] table: 4, 1e-3, "
                    "true, [400, 200]; text as is), log it as one MLflow run in experiment "
                    "`single-runs` of the default store, and print its test metrics.")
    one.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="Config fields, e.g. likelihood=gaussian_optimal beta=4 epochs=5 "
                          "dataset=fashion device=cpu")
    one.add_argument("--tracking-uri", help="MLflow tracking URI (default: $VAE_TRACKING_URI, "
                     "else the project's mlruns/mlflow.db)")
    one.add_argument("--experiment", default=EXPERIMENT, help=f"default {EXPERIMENT}")
    one.set_defaults(func=cmd_train)
    add_run_parser(sub)
    add_server_parsers(sub)
    return parser


def add_run_parser(sub) -> None:
    run = sub.add_parser("run", help="run the default suite (or --study NAME) for a profile",
                         description="Run every study of the default suite (or --study NAME) "
                                     "for --profile; resumes, never redoes a finished trial.")
    run.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)} "
                     "(default: default)")
    run.add_argument("--study", action="append", metavar="NAME",
                     help="a spec name in study/specs/ or a path to a .toml spec; repeatable "
                          "(default: the suite)")
    run.add_argument("--jobs", default="1",
                     help="worker processes on the same storage: a count (default 1), or "
                          "auto (make's default): one per core on the CPU, one on a GPU; "
                          "each gets max(1, cores // N) torch threads")
    run.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}")
    run.add_argument("--storage", help="Optuna storage: a SQLAlchemy URL (default "
                     "sqlite:///<repo>/mlruns/optuna.db; postgresql://... for several machines) "
                     "or a journal file path (several processes on one machine)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default "
                     "sqlite:///<repo>/mlruns/mlflow.db, artifacts beside it; or http://host:port)")
    run.add_argument("--worker", action="store_true",
                     help="join an existing study on a shared storage; create nothing else")
    run.add_argument("--only", action="append", metavar="NAME=VALUE",
                     help="run only the grid points whose dimension NAME has VALUE (e.g. "
                          "variant=vae); repeatable, all must hold")
    run.add_argument("--stop-after", type=float, metavar="MINUTES",
                     help="after this many minutes, stop running trials at their next epoch "
                          "end with a resumable state (so does SIGTERM); the same command "
                          "resumes them")
    run.set_defaults(func=cmd_run)


def add_server_parsers(sub) -> None:
    """`list`, `ui` and `dashboard`."""
    lst = sub.add_parser("list", help="list the studies of the suite and their sizes",
                         description="Print each study's sampler, space and trial budget.")
    lst.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)}")
    lst.add_argument("--all", action="store_true", help="every spec, not only the suite")
    lst.set_defaults(func=cmd_list)

    ui = sub.add_parser("ui", help="serve the MLflow UI over the tracking store",
                        description="exec `mlflow server` over the store (its URI passed in "
                                    "the environment) and the store's artifact folder.")
    ui.add_argument("--tracking-uri", help="default sqlite:///<repo>/mlruns/mlflow.db")
    ui.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback)")
    ui.add_argument("--port", type=int, default=5000, help="default 5000")
    ui.set_defaults(func=cmd_ui)

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard over the Optuna storage",
                          description="Run optuna-dashboard over --storage.")
    dash.add_argument("--storage", help="default sqlite:///<repo>/mlruns/optuna.db")
    dash.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback)")
    dash.add_argument("--port", type=int, default=8080, help="default 8080")
    dash.set_defaults(func=cmd_dashboard)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with one line on stderr for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2)
        return int(exc.code or 0)
    # a resumed trial downloads its state: no progress bar per file amid the suite's own
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return UsageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
