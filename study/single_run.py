"""One model outside any study: `vae-study train KEY=VALUE ...` from the shell, and
`MlflowCallback` for the Python API, each giving one MLflow run in the experiment
`single-runs` of the default store (study.paths):

    from study.config import Config
    from study.single_run import MlflowCallback
    from study.train import train

    config = Config(likelihood="gaussian_optimal", beta=4.0, epochs=5)
    result = train(config, [MlflowCallback(config)])
    print(result.test["sse"])
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from study.classifier import Classifiers
from study.config import Config
from study.errors import UsageError
from study.spec_schema import RUNNER_FIELDS, ConfigFields, problem, set_fields, validated
from study.specs import toml_value
from study.stores import check_tracking_uri, default_tracking_uri
from study.tracking import (
    Tracker,
    TrialLogger,
    environment_tags,
    final_metrics,
    log_trial_artifacts,
    run_name,
)
from study.train import Callback, TrainResult, resolve_device, train
from study.trial_figures import TrialFigures

EXPERIMENT = "single-runs"
"""The MLflow experiment of runs trained one at a time (studies have one each)."""


def config_from_overrides(items: list[str], base: Config | None = None) -> Config:
    """`base` (default Config()) with KEY=VALUE overrides, typed as a spec's [fixed] table is;
    every problem of the overrides in one UsageError."""
    table, runner, problems = {}, {}, []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"{item!r} is not KEY=VALUE (e.g. likelihood=gaussian beta=4)")
        elif key not in Config.field_names():
            problems.append(f"unknown key {key!r} (Config fields: "
                            f"{', '.join(Config.field_names())})")
        elif key in RUNNER_FIELDS:
            runner[key] = toml_value(text) if key == "threads" else text
        else:
            table[key] = toml_value(text)
    fields, errors = validated(ConfigFields, table)
    problems += [problem(e) for e in errors]
    if problems:
        raise UsageError("; ".join(problems) + " -- see `vae-study train --help`")
    config = (base or Config()).replace(**set_fields(fields), **runner)
    invalid = config.validate()
    if invalid:
        raise UsageError("invalid config: " + "; ".join(invalid))
    return config


class MlflowCallback(Callback):
    """Logs one training run to MLflow: the config as params when training starts, every
    epoch's metrics as it goes (as a study's trial does), and at the end the test metrics,
    the figures and a checkpoint; then the run ends FINISHED. `run_id` names it. If
    training raises, call `fail(reason)` to end the run FAILED."""

    def __init__(self, config: Config, tracking_uri: str | None = None,
                 experiment: str = EXPERIMENT, name: str | None = None):
        self.config = config
        self.tracker = Tracker(tracking_uri or default_tracking_uri())
        self.experiment, self.name = experiment, name
        self.run_id: str | None = None
        self.logger: TrialLogger | None = None

    def on_train_start(self, model, likelihood, splits) -> None:
        config, self.splits = self.config, splits
        experiment_id = self.tracker.experiment_id(self.experiment)
        tags = {"run_kind": "single", "dataset": config.dataset,
                **environment_tags(resolve_device(config.device))}
        self.run_id = self.tracker.start_run(experiment_id, self.name or run_name(config), tags,
                                             config.as_params())
        self.logger = TrialLogger(self.tracker, self.run_id)

    def on_step(self, step, metrics) -> None:
        self.logger.on_step(step, metrics)

    def on_epoch(self, epoch, metrics) -> None:
        self.logger.on_epoch(epoch, metrics)

    def on_train_end(self, result: TrainResult) -> None:
        log_trial_artifacts(self.tracker, self.run_id, result, self.splits, TrialFigures())
        self.tracker.log_metrics(self.run_id, final_metrics(result), step=self.config.epochs)
        self.tracker.end_run(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        if self.run_id is not None:
            self.tracker.end_run(self.run_id, "FAILED", reason=reason)


class EpochLine(Callback):
    """One progress bar over the epochs, on stderr."""

    def __init__(self, epochs: int):
        self.bar = tqdm(total=epochs, unit="epoch", desc="train", file=sys.stderr)

    def on_epoch(self, epoch, metrics) -> None:
        self.bar.set_postfix_str(f"val/nelbo {metrics['val/nelbo']:.2f}")
        self.bar.update(1)

    def on_train_end(self, result) -> None:
        self.bar.close()


def train_one(config: Config, tracking_uri: str, experiment: str = EXPERIMENT) -> TrainResult:
    """Train `config` with its test metrics (the Frechet distance's classifier is trained
    once per dataset if the data folder has none) and log it as one MLflow run."""
    check_tracking_uri(tracking_uri)
    device = resolve_device(config.device)
    classifier = Classifiers(config.data_root).get(config.dataset, device)
    logger = MlflowCallback(config, tracking_uri, experiment)
    try:
        return train(config, [logger, EpochLine(config.epochs)], classifier=classifier)
    except BaseException as exc:
        logger.fail(f"{type(exc).__name__}: {exc}")
        raise
