"""Runs -> one pandas DataFrame: every trial run of every study with its params, final
metrics and tags as columns; metric histories and artifacts are fetched on demand.

Columns: `run_id`, `experiment_id`, `run_name`, `status`, `study`; the Config params under
their own names (numeric where every value parses, e.g. `beta`, `latent_dim`, `seed`); the
final (latest) value of each metric under its key (`val/kl`, `test/sse`), except ungrouped
keys, which get a `last/` prefix (`last/beta`, `last/lr`) so they never clash with a param;
tags as `tag/<name>` (`tag/git_commit`, `tag/profile`); `duplicate_of`, the run kept in place
of a finished run that repeated a grid point and seed already counted (NaN for runs that count).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from study.config import Config
from study.errors import UsageError
from study.resume import RUN_ONLY_FIELDS
from study.specs import VARIANT
from study.stores import redact  # one redaction for everything written or printed

FINISHED = "FINISHED"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
RESULT_FIELDS = tuple(name for name in Config.field_names() if name not in RUN_ONLY_FIELDS)
"""Config params that define a run's result (seed included); the run-only fields say only where
and how fast it trained."""


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _check_store_exists(tracking_uri: str) -> None:
    """A sqlite URI naming a missing file would make MLflow create an empty store: refuse."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return
    path = unquote(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).is_file():
        raise UsageError(
            f"no MLflow store at {path}; run `make study` first (or pass --tracking-uri)"
        )


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """mlflow.search_runs reads the global tracking URI: set it for the block only."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _numeric_where_possible(column: pd.Series) -> pd.Series:
    """Params arrive as strings: make a column numeric when every value (bar None) parses."""
    values = column.where(~column.isin(["None", "", "nan"]))
    parsed = pd.to_numeric(values, errors="coerce")
    if parsed.notna().sum() == values.notna().sum() and values.notna().any():
        if parsed.notna().all() and (parsed % 1 == 0).all():
            return parsed.astype("int64")
        return parsed
    return column


def duplicate_of(raw: pd.DataFrame, study: pd.Series) -> pd.Series:
    """Per run of mlflow.search_runs' frame, the run_id of the newest FINISHED run (by end time)
    with the same study, profile, result-defining params and variant, where that is another
    run; NaN otherwise. A grid point trained again (an emptied Optuna store, say) repeats a
    result already counted, and counting it as another seed fakes a zero-width interval."""
    finished = raw[raw["status"] == FINISHED]
    out = pd.Series(float("nan"), index=raw.index, dtype=object)
    if finished.empty:
        return out
    defaults = Config()

    def param(name, default):
        col = f"params.{name}"
        if col not in finished:
            return pd.Series(default, index=finished.index)
        # compared as logged; a run made before a field existed trained with its default
        return finished[col].fillna(default).astype(str)

    key = [study[finished.index].astype(str),
           finished.get("tags.profile", pd.Series("", index=finished.index)).fillna("")]
    key += [param(name, str(getattr(defaults, name))) for name in RESULT_FIELDS]
    key.append(param(VARIANT, ""))
    newest_first = finished.assign(_key=list(zip(*key, strict=True))).sort_values(
        ["end_time", "run_id"], ascending=False)
    kept = newest_first.groupby("_key", sort=False)["run_id"].transform("first")
    repeats = kept != newest_first["run_id"]
    out[kept.index[repeats]] = kept[repeats]
    return out


def tidy(raw: pd.DataFrame, experiment_names: dict[str, str]) -> pd.DataFrame:
    """mlflow.search_runs' frame -> one row per trial run with the columns of this module.

    A trial run carries a `likelihood` param (it trained a Config); parent runs of an
    invocation are left out.
    """
    if raw.empty:
        return pd.DataFrame(columns=["run_id", "experiment_id", "run_name", "status", "study",
                                     "duplicate_of"])
    trial = raw["params.likelihood"].notna() if "params.likelihood" in raw else raw["run_id"].isna()
    parents = set(raw.get(f"tags.{PARENT_TAG}", pd.Series(dtype=str)).dropna())
    raw = raw[trial & ~raw["run_id"].isin(parents)]
    by_experiment = raw["experiment_id"].astype(str).map(experiment_names)
    study = raw["tags.study"].fillna(by_experiment) if "tags.study" in raw else by_experiment
    out = {
        "run_id": raw["run_id"],
        "experiment_id": raw["experiment_id"].astype(str),
        "status": raw["status"],
        "start_time": raw.get("start_time"),
        "end_time": raw.get("end_time"),
        "duplicate_of": duplicate_of(raw, study),
    }
    for col in raw.columns:
        if col.startswith("params."):
            out[col[len("params."):]] = _numeric_where_possible(raw[col])
        elif col.startswith("metrics."):
            key = col[len("metrics."):]
            out[key if "/" in key else f"last/{key}"] = pd.to_numeric(raw[col], errors="coerce")
        elif col.startswith("tags."):
            out[f"tag/{col[len('tags.'):]}"] = raw[col]
    frame = pd.DataFrame(out)
    names = frame.get(f"tag/{RUN_NAME_TAG}")
    frame["run_name"] = names if names is not None else frame["run_id"]
    frame["run_name"] = frame["run_name"].fillna(frame["run_id"])
    frame["study"] = study
    return frame.sort_values(["study", "run_name"]).reset_index(drop=True)


@dataclass
class RunStore:
    """The trial runs of a tracking store, and access to their histories and artifacts."""

    tracking_uri: str
    frame: pd.DataFrame
    experiments: dict[str, str]
    """Study (experiment) name -> experiment id."""
    _histories: dict = field(default_factory=dict, repr=False)

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def studies(self) -> list[str]:
        """Studies with at least one trial run."""
        return sorted(self.frame["study"].dropna().unique())

    def finished(self, study: str | list[str]) -> pd.DataFrame:
        """FINISHED trial runs of one or more studies, one per grid point and seed (pruned and
        failed runs, and finished runs that repeated a counted one, are left out)."""
        frame = self._of(study)
        return frame[(frame["status"] == FINISHED) & frame["duplicate_of"].isna()].copy()

    def duplicates(self, study: str | list[str]) -> pd.DataFrame:
        """FINISHED runs of the studies that `finished` skips: each repeated the grid point and
        seed of the newer finished run named in its `duplicate_of`."""
        frame = self._of(study)
        return frame[frame["duplicate_of"].notna()].copy()

    def only(self, profile: str) -> RunStore:
        """The runs tagged with `profile` (sharing this store's fetched histories);
        UsageError when there are none."""
        tagged = self.frame.get("tag/profile")
        kept = self.frame[tagged == profile] if tagged is not None else self.frame.iloc[0:0]
        if kept.empty:
            found = sorted(tagged.dropna().unique()) if tagged is not None else []
            raise UsageError(
                f"no trial runs of profile {profile!r} in {redact(self.tracking_uri)} (found: "
                f"{', '.join(found) or 'none'}); run `make study PROFILE={profile}` or pass "
                f"PROFILE=<one of those>"
            )
        kept = kept.reset_index(drop=True)
        return RunStore(self.tracking_uri, kept, _experiments_by_study(kept), self._histories)

    def _of(self, study: str | list[str]) -> pd.DataFrame:
        names = [study] if isinstance(study, str) else list(study)
        return self.frame[self.frame["study"].isin(names)]

    def history(self, run_ids, keys) -> pd.DataFrame:
        """Long frame (run_id, key, step, value) of every logged value of `keys` in `run_ids`."""
        client = self.client
        rows = []
        for run_id in run_ids:
            for key in keys:
                cache_key = (run_id, key)
                if cache_key not in self._histories:
                    self._histories[cache_key] = [
                        (m.step, m.value) for m in client.get_metric_history(run_id, key)
                    ]
                rows.extend((run_id, key, s, v) for s, v in self._histories[cache_key])
        frame = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
        return frame.sort_values(["run_id", "key", "step"]).reset_index(drop=True)

    def study_artifact(self, study: str, name: str) -> dict | None:
        """The JSON artifact `name` of the newest study run (an invocation's run, not a
        trial's) of `study` that logged it; None when none did or the store cannot be read."""
        experiment = self.experiments.get(study)
        if experiment is None:
            return None
        client = self.client
        try:
            for run in client.search_runs([experiment], order_by=["attributes.start_time DESC"],
                                          max_results=200):
                if "likelihood" in run.data.params or PARENT_TAG in run.data.tags:
                    continue
                if name in {a.path for a in client.list_artifacts(run.info.run_id)}:
                    with tempfile.TemporaryDirectory() as tmp:
                        local = client.download_artifacts(run.info.run_id, name, tmp)
                        return json.loads(Path(local).read_text())
        except Exception:  # an unreachable artifact store or a damaged file: shown as missing
            return None
        return None

    def artifact_png(self, run_id: str, contains: str) -> bytes | None:
        """Bytes of the first PNG artifact of a run whose file name contains `contains`."""
        client = self.client

        def walk(path=None):
            for info in client.list_artifacts(run_id, path):
                if info.is_dir:
                    yield from walk(info.path)
                else:
                    yield info.path

        try:
            paths = sorted(walk())
        except Exception:  # an unreachable artifact store: the figure says the artifact is missing
            return None
        for path in paths:
            name = Path(path).name.lower()
            if name.endswith(".png") and contains in name:
                with tempfile.TemporaryDirectory() as tmp:
                    local = client.download_artifacts(run_id, path, tmp)
                    return Path(local).read_bytes()
        return None


def load_runs(tracking_uri: str, profile: str | None = None) -> RunStore:
    """Every trial run in the store at `tracking_uri` (only those tagged with `profile`, when
    given, so smoke and default runs in one store are not mixed: RunStore.only); UsageError
    when none."""
    import mlflow
    from mlflow import MlflowClient

    _check_store_exists(tracking_uri)
    try:
        experiments = MlflowClient(tracking_uri=tracking_uri).search_experiments()
    except Exception as exc:  # any failure to reach the store is the user's to fix
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot read the MLflow store {redact(tracking_uri)}: {redact(message)}"
        ) from exc
    names = {e.experiment_id: e.name for e in experiments}
    raw = pd.DataFrame()
    if names:
        with _tracking_uri(tracking_uri):
            raw = mlflow.search_runs(experiment_ids=list(names), output_format="pandas")
    frame = tidy(raw, names)
    if frame.empty:
        raise UsageError(
            f"no trial runs in {redact(tracking_uri)}; run `make study` "
            f"(or `make study STUDY=loss_choice`) first"
        )
    store = RunStore(tracking_uri, frame, _experiments_by_study(frame))
    return store if profile is None else store.only(profile)


def _experiments_by_study(frame: pd.DataFrame) -> dict[str, str]:
    return {study: str(frame.loc[frame["study"] == study, "experiment_id"].iloc[0])
            for study in set(frame["study"])}
