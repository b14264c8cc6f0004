"""A suite run: the studies of `make study` set up (their Optuna studies checked against the
spec and against the MLflow runs, their experiments and this invocation's study runs, the
classifiers the test metrics need), their workers run, and the summary logged and printed.

Names. A spec `loss_choice` run with profile `default` is the Optuna study
`loss_choice-default` (profiles never share trials); its MLflow experiment is `loss_choice`
(one per study, whatever the profile), with one study run per invocation
(`loss_choice-default/run-<time>`, tag run_kind=study) and one child run per trial
(run_kind=trial), both tagged study=loss_choice and profile=default.

Every run is a resumption: a grid runs each point until it has one finished (COMPLETE or
PRUNED) trial; a search runs until `trials` trials are finished. A point whose trial failed
is tried again by the next invocation, not within the same one.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState, create_trial
from tqdm import tqdm

from study import classifier as classifiers
from study.errors import UsageError
from study.evidence import write_evidence
from study.grid import FINISHED, count_states
from study.liveness import close_dead_parent_runs, say, this_process
from study.paths import default_data_root
from study.resume import RUN_ONLY_FIELDS
from study.specs import Spec
from study.stores import first_use_lock, open_storage, redact, writable
from study.tracking import NOTE, Tracker, environment_tags
from study.train import resolve_device
from study.trial import Job
from study.workers import StopRequest, available_cores, run_processes, work


@dataclass(frozen=True)
class SuiteOptions:
    """How to run a suite: what the command line says, checked by the CLI."""

    storage: str
    tracking_uri: str
    device: str = "auto"
    jobs: int = 1
    worker: bool = False
    """Join studies another invocation started; create nothing else."""
    stop_after: float | None = None
    only: tuple[tuple[str, str], ...] = ()


@dataclass
class Prepared:
    spec: Spec
    job: Job
    parent_run_id: str
    created_parent: bool
    all_failed: str | None = None
    """Set by finish_study when every trial of the study failed: why, in a line."""


# --------------------------------------------------------------------------- checks


def spec_settings(spec: Spec) -> dict:
    """What a study's trials compute, as plain JSON: the fixed config (less the fields that
    only say where and how fast it runs), the variants' bundles, the search space (its
    dimensions sorted: their order changes the grid's order, not its points) and the
    objectives."""
    fixed = {k: v for k, v in dataclasses.asdict(spec.base).items()
             if k not in RUN_ONLY_FIELDS and k != "extra"}
    return json.loads(json.dumps({"fixed": fixed, "variants": spec.variants,
                                  "space": sorted(d.describe() for d in spec.dimensions),
                                  "objectives": [list(o) for o in spec.objectives]},
                                 default=str))


def check_settings(study, spec: Spec, storage_label: str) -> None:
    """A study keeps the settings of its first invocation: a spec edited since would mix two
    settings under one study, its finished grid points counting for the new setting. Refuse
    that, naming what changed; record the settings of a study that has none yet."""
    ours, theirs = spec_settings(spec), study.user_attrs.get("settings")
    if theirs is None:
        study.set_user_attr("settings", ours)
        return
    theirs = {**theirs, "space": sorted(theirs.get("space", []))}  # a set of dimensions
    if theirs == ours:
        return
    changed = [k for k in sorted({*ours["fixed"], *theirs["fixed"]})
               if ours["fixed"].get(k) != theirs["fixed"].get(k)]
    changed += [k for k in ("variants", "space", "objectives")
                if k in theirs and ours.get(k) != theirs.get(k)]
    if not changed:  # recorded before a kind of setting was: the same study, now complete
        study.set_user_attr("settings", ours)
        return
    raise UsageError(
        f"study {study.study_name!r} was run with other settings than spec {spec.name!r} has "
        f"now (changed: {', '.join(changed)}); delete it (`.venv/bin/optuna delete-study "
        f"--study-name {study.study_name} --storage {storage_label}`) or give the spec a new name")


def trial_runs(tracker: Tracker, experiment_id: str, study_name: str) -> list:
    """Every trial run (any status) that the Optuna study `study_name` logged in the
    experiment, read in pages."""
    runs, token = [], None
    while True:
        page = tracker.client.search_runs(
            [experiment_id], f"tags.run_kind = 'trial' and tags.optuna_study = '{study_name}'",
            max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def reconcile_with_mlflow(study, spec: Spec, tracker: Tracker, options: SuiteOptions) -> int:
    """Check the Optuna study against the MLflow runs it names, before anything is written.

    Finished trials whose runs the tracking store no longer holds (an emptied or replaced
    mlflow.db) are refused: the reports could never show them and the study would never run
    them again. FINISHED runs of this study that no trial names (an emptied or replaced
    optuna.db) are adopted as COMPLETE trials when their logged settings are exactly what the
    spec gives that point, so nothing is trained twice. Returns how many were adopted."""
    experiment = tracker.client.get_experiment_by_name(spec.name)
    runs = trial_runs(tracker, experiment.experiment_id, spec.study_name) if experiment else []
    trials = study.get_trials(deepcopy=False)
    in_store = {r.info.run_id for r in runs}
    lost = [t.number for t in trials if t.state.name in FINISHED
            and t.user_attrs.get("mlflow_run_id") not in in_store]
    if lost:
        raise UsageError(
            f"study {spec.study_name!r} has {len(lost)} finished trial(s) whose MLflow runs "
            f"are not in {redact(options.tracking_uri)} (was the tracking store emptied or "
            f"replaced?); point --tracking-uri / TRACKING_URI at the store that holds them, or "
            f"rebuild from scratch: `.venv/bin/optuna delete-study --study-name "
            f"{spec.study_name} --storage {redact(options.storage)}`, then run again")
    named = {t.user_attrs.get("mlflow_run_id") for t in trials}
    adopted = 0
    for run in runs:
        if run.info.status == "FINISHED" and run.info.run_id not in named \
                and adopt(study, spec, run):
            adopted += 1
    if adopted:
        say(f"{spec.study_name}: adopted {adopted} finished MLflow run(s) that the Optuna "
            f"storage did not know (lost trials); they are not trained again")
    return adopted


def adopt(study, spec: Spec, run) -> bool:
    """Add `run` to the study as a COMPLETE trial if its logged params are exactly what the
    spec gives one of its points (and it logged the objectives); whether it was added."""
    logged = run.data.params
    params = {d.name: d.from_param(logged.get(d.name, "")) for d in spec.dimensions}
    values = [run.data.metrics.get(m) for m in spec.metrics]
    if any(v is None for v in [*params.values(), *values]):
        return False
    expected = spec.config_for(params).as_params()
    if any(logged.get(k) != v for k, v in expected.items() if k not in RUN_ONLY_FIELDS):
        return False  # trained with other settings: not this study's result
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, params=params, values=values,
        distributions={d.name: d.distribution() for d in spec.dimensions},
        user_attrs={"mlflow_run_id": run.info.run_id, "adopted_from_mlflow": True,
                    "invocation": run.data.tags.get("mlflow.parentRunId", "")}))
    return True


# --------------------------------------------------------------------------- set-up


def datasets_of(spec: Spec) -> set[str]:
    """The datasets a study's trials train on."""
    if spec.sampler == "grid":
        return {spec.config_for(point).dataset for point in spec.grid()}
    dims = {d.name: d for d in spec.dimensions}
    return set(dims["dataset"].choices) if "dataset" in dims else {spec.base.dataset}


def prepare_classifiers(specs: list[Spec], data_root: str, device: str) -> None:
    """Train, before any trial, the classifier each dataset's Frechet distance needs, once
    (cached in the data folder); a data folder that cannot hold them is refused here rather
    than failing every trial."""
    for dataset in sorted(set().union(*(datasets_of(s) for s in specs))):
        path = classifiers.cache_path(dataset, data_root)
        if path.exists():
            continue
        if not writable(path.parent):
            raise UsageError(f"{path.parent} cannot be written and holds no {dataset} classifier "
                             f"(for the test metrics' Frechet distance); run once with a "
                             f"writable data folder, or set VAE_DATA_ROOT to one")
        say(f"training the {dataset} classifier behind the Frechet distance (once; cached in "
            f"{path})")
        classifiers.get_classifier(dataset, data_root, device)


def create_parent_run(study, spec: Spec, tracker: Tracker, experiment_id: str,
                      options: SuiteOptions) -> str:
    """This invocation's study run, with the spec and the data evidence (study.evidence) as
    artifacts; linked from the study."""
    tags = {"study": spec.name, "profile": spec.profile, "run_kind": "study",
            NOTE: spec.description,
            "runner_process": json.dumps(this_process()),
            "optuna_study": spec.study_name, "optuna_storage": redact(options.storage),
            "sampler": spec.sampler, "pruner": spec.pruner, "jobs": options.jobs,
            **environment_tags(resolve_device(options.device))}
    params = {"sampler": spec.sampler, "pruner": spec.pruner, "trials": spec.size(),
              "objectives": json.dumps(dict(spec.objectives)), "epochs": spec.base.epochs,
              "space": "; ".join(d.describe() for d in spec.dimensions)}
    parent = tracker.start_run(experiment_id,
                               f"{spec.study_name}/run-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags, params)
    with tempfile.TemporaryDirectory() as tmp:  # the spec, and the data evidence reports show
        Path(tmp, "spec.json").write_text(json.dumps(spec.table, indent=2, default=str))
        write_evidence(datasets_of(spec), default_data_root(), Path(tmp))
        tracker.log_artifacts(parent, Path(tmp))
    for key, value in {"spec": spec.name, "profile": spec.profile,
                       "mlflow_parent_run_id": parent, "mlflow_experiment_id": experiment_id,
                       "description": spec.description}.items():
        study.set_user_attr(key, value)
    return parent


def prepare_study(spec: Spec, options: SuiteOptions, storage, tracker: Tracker) -> Prepared:
    """Create (or, as a --worker, find) the study, check it, find or create its experiment
    and this invocation's study run. Nothing here trains."""
    name, label = spec.study_name, redact(options.storage)
    if options.worker:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise UsageError(f"no study {name!r} in {label}; start it first with "
                             f"`make study STUDY={spec.name} PROFILE={spec.profile}`") from None
    else:
        study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions,
                                    load_if_exists=True)
        found = [d.name.lower() for d in study.directions]
        if found != spec.directions:
            raise UsageError(f"study {name!r} exists with directions {found}, but the spec asks "
                             f"for {spec.directions}; rename the spec or delete the study")
    check_settings(study, spec, label)
    if not options.worker:  # the dashboard names the objectives rather than "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(spec.metrics)
    reconcile_with_mlflow(study, spec, tracker, options)
    experiment_id = tracker.experiment_id(spec.name, create=not options.worker)
    if not options.worker and spec.description:  # the UI shows it as the description
        tracker.client.set_experiment_tag(experiment_id, NOTE, spec.description)
    if options.worker:
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if not parent:
            raise UsageError(f"study {name!r} has no MLflow parent run; start it with "
                             f"`make study` before joining it with `make worker`")
    else:
        close_dead_parent_runs(tracker, experiment_id)
        parent = create_parent_run(study, spec, tracker, experiment_id, options)
    job = Job(spec_ref=str(spec.path), profile=spec.profile, storage=options.storage,
              tracking_uri=options.tracking_uri, experiment_id=experiment_id,
              invocation=parent, device=options.device, data_root=default_data_root(),
              jobs=options.jobs)
    return Prepared(spec, job, parent, created_parent=not options.worker)


def prepare_all(specs: list[Spec], options: SuiteOptions):
    """(storage, tracker, prepared studies); the study runs already created are ended FAILED
    when the suite cannot start."""
    preps: list[Prepared] = []
    with first_use_lock(options.storage, options.tracking_uri):  # two first runs: one creates
        storage = open_storage(options.storage)
        tracker = Tracker(options.tracking_uri)
        try:
            for spec in specs:
                preps.append(prepare_study(spec, options, storage, tracker))
        except BaseException:
            end_parent_runs(preps, tracker)
            raise
    try:  # outside the lock: training a classifier takes minutes
        prepare_classifiers(specs, default_data_root(), resolve_device(options.device))
    except BaseException:
        end_parent_runs(preps, tracker)
        raise
    return storage, tracker, preps


def end_parent_runs(preps: list[Prepared], tracker: Tracker) -> None:
    for prep in preps:
        if prep.created_parent:
            tracker.end_run(prep.parent_run_id, "FAILED", reason="the suite did not start")


# --------------------------------------------------------------------------- running


def finish_study(prep: Prepared, storage, tracker: Tracker, wall: float, status: str) -> dict:
    """Log this invocation's counts and the measured tracking overhead on the study run."""
    study = optuna.load_study(study_name=prep.spec.study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get("invocation") == prep.job.invocation]
    train = sum(t.user_attrs.get("train_seconds", 0.0) for t in mine)
    tracking = sum(t.user_attrs.get("tracking_seconds", 0.0) for t in mine)
    total = sum(t.user_attrs.get("tracking_total_seconds", 0.0) for t in mine)
    counts = count_states(mine)
    failed = [t for t in mine if t.state.name == "FAIL" and "duplicate_of" not in t.user_attrs
              and "stopped" not in t.user_attrs]
    if failed and not any(t.state.name in FINISHED for t in trials):
        prep.all_failed = (f"every trial of {prep.spec.study_name} failed ({len(failed)} "
                           f"this run); the first: "
                           f"{failed[0].user_attrs.get('failure_reason', 'no reason recorded')}")
    summary = {
        "trials_complete": counts["COMPLETE"], "trials_pruned": counts["PRUNED"],
        "trials_failed": counts["FAIL"],
        "trials_finished_total": sum(count_states(trials)[s] for s in FINISHED),
        "wall_seconds": wall, "train_seconds": train,
        "tracking_seconds": tracking, "tracking_total_seconds": total,
    }
    if train > 0:
        summary["tracking_overhead_pct"] = 100 * tracking / train
        summary["tracking_total_overhead_pct"] = 100 * total / train
    if prep.created_parent:
        tracker.log_metrics(prep.parent_run_id, summary, step=0)
        tracker.end_run(prep.parent_run_id, status)
    return summary


def progress_count(storage, preps: list[Prepared]) -> int:
    done = 0
    for prep in preps:
        study = optuna.load_study(study_name=prep.spec.study_name, storage=storage)
        counts = count_states(study.get_trials(deepcopy=False))
        done += min(prep.spec.size(), counts["COMPLETE"] + counts["PRUNED"])
    return done


def run_workers(jobs: list[Job], options: SuiteOptions, stop: StopRequest, progress,
                bar) -> int:
    """The workers of `jobs`, here (one) or spawned (several); the exit status."""
    if options.jobs == 1:
        def on_trial(name):
            bar.n = progress()
            bar.set_description(name)
        work(jobs, stop, on_trial=on_trial)
        return 0
    return run_processes(jobs, options.jobs, stop, progress, bar)


def print_summary(preps: list[Prepared], summaries: list[dict]) -> None:
    for prep, summary in zip(preps, summaries, strict=True):
        overhead = summary.get("tracking_overhead_pct")
        print(f"{prep.spec.study_name}: {summary['trials_complete']} complete, "
              f"{summary['trials_pruned']} pruned, {summary['trials_failed']} failed this run; "
              f"{summary['trials_finished_total']}/{prep.spec.size()} finished"
              + (f"; tracking {overhead:.2f}% of training time "
                 f"({summary['tracking_total_overhead_pct']:.1f}% with artifacts)"
                 if overhead is not None else ""))


def run_suite(specs: list[Spec], options: SuiteOptions) -> int:
    """Prepare the studies, run their workers, log and print the summary; the exit status
    (0; 1 when every trial of a study failed or a worker crashed; 2 for a usage error in a
    worker; 128 + SIGTERM when stopped by it)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    storage, tracker, preps = prepare_all(specs, options)
    threads = max(1, available_cores() // options.jobs)
    stop = StopRequest(time.time() + 60 * options.stop_after if options.stop_after else None)
    jobs = [replace(p.job, threads=threads, stop_at=stop.deadline, only=options.only)
            for p in preps]
    print(f"running {len(preps)} stud{'y' if len(preps) == 1 else 'ies'} "
          f"({', '.join(p.spec.study_name for p in preps)}), profile {specs[0].profile}, "
          f"{options.jobs} worker process(es) x {threads} torch thread(s)\n"
          f"  Optuna storage {redact(options.storage)}\n"
          f"  MLflow tracking {redact(options.tracking_uri)}", flush=True)
    bar = tqdm(total=sum(p.spec.size() for p in preps), initial=progress_count(storage, preps),
               desc="suite", unit="trial")
    t0 = time.perf_counter()
    status, code = "FINISHED", 0
    try:
        code = run_workers(jobs, options, stop, lambda: progress_count(storage, preps), bar)
        status = "FAILED" if code else status
        if stop.reason and not code:
            status = "KILLED"
            code = 128 + signal.SIGTERM if stop.reason.startswith("SIGTERM") else 0
    except KeyboardInterrupt:
        status, code = "KILLED", 130
    except BaseException:
        status = "FAILED"
        raise
    finally:
        bar.n = progress_count(storage, preps)
        bar.close()
        wall = time.perf_counter() - t0
        summaries = [finish_study(p, storage, tracker, wall, status) for p in preps]
    print_summary(preps, summaries)
    for prep in preps:
        if prep.all_failed:
            print(f"error: {redact(prep.all_failed)}; see failure_reason on the runs "
                  f"(make ui)", file=sys.stderr)
            code = code or 1
    if stop.reason:
        print(f"stopped ({stop.reason}): running trials saved a resumable state; the same "
              f"command resumes them.")
    print(f"took {wall:.0f} s. Look at the runs with `make ui` (MLflow, "
          f"{redact(options.tracking_uri)}), the studies with `make dashboard` (Optuna), and "
          f"the reports with `make report` (reports/index.html).")
    return code
