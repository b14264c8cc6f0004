"""Runs frame -> the small tables every report shares: what a report was built from, the
design a study actually covers, run links for figures, and what is missing."""

from __future__ import annotations

import datetime as dt
import re

import pandas as pd

from analysis.blocks import Missing, RunLink
from analysis.runs import FINISHED, RunStore, redact, run_url
from analysis.verdicts import DATASET_LABELS, LIKELIHOOD_LABELS

STUDY_PURPOSE = {
    "loss_choice": "dataset × likelihood × β × seed: which likelihood suits which data",
    "kl_dynamics": "β × latent_dim, KL warm-up and free bits: how the KL term behaves",
    "search_mnist": "multi-objective search (val KL, val SSE) on MNIST: the Pareto front",
    "search_fashion": "multi-objective search (val KL, val SSE) on Fashion-MNIST",
    "burda2016": "reproduction of Burda et al. 2016 (IWAE); not used by these reports",
}


DATASET_ORDER = ("mnist", "fashion")


def ordered_datasets(names) -> list[str]:
    """MNIST, then Fashion-MNIST, then anything else alphabetically."""
    names = set(names)
    return [d for d in DATASET_ORDER if d in names] + sorted(names - set(DATASET_ORDER))


def make_command(study: str) -> str:
    return f"make study STUDY={study}"


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def likelihood_label(name: str) -> str:
    return LIKELIHOOD_LABELS.get(name, name)


def beta_label(beta: float) -> str:
    return f"β = {beta:g}"


def values_text(values) -> str:
    """Distinct values, sorted, as `a, b, c` (numbers with :g)."""
    vals = sorted({v for v in values if pd.notna(v)}, key=lambda v: (isinstance(v, str), v))
    return ", ".join(f"{v:.4g}" if isinstance(v, (int, float)) else str(v) for v in vals) or "—"


def kl_dim_columns(frame: pd.DataFrame, split: str = "val") -> list[str]:
    """`val/kl_dim_00`, ... present in the frame, in dimension order."""
    pattern = re.compile(rf"^{split}/kl_dim_(\d+)$")
    cols = [c for c in frame.columns if pattern.match(c)]
    return sorted(cols, key=lambda c: int(pattern.match(c).group(1)))


def links(runs: pd.DataFrame, ui_url: str) -> list[RunLink]:
    """A link to each run of `runs` in the MLflow UI, labelled by run name."""
    return [RunLink(str(r.run_name), run_url(ui_url, str(r.experiment_id), str(r.run_id)))
            for r in runs.itertuples()]


def provenance(store: RunStore | None, studies: list[str], extra=()) -> list[tuple[str, str]]:
    """(label, value) pairs saying what a report was built from."""
    built = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if store is None:
        return [("tracking store", "—"), ("built", built), *extra]
    frame = store.frame[store.frame["study"].isin(studies)]
    present = [s for s in studies if s in set(frame["study"])]
    counts = frame["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s.lower()}" for s in counts.index) or "none"

    def tag(name):
        col = f"tag/{name}"
        return values_text(frame[col]) if col in frame else "—"

    commits = "—"
    if "tag/git_commit" in frame:
        pairs = frame[["tag/git_commit", *(["tag/git_dirty"] if "tag/git_dirty" in frame
                                           else [])]].drop_duplicates()
        dirty = {True: " (uncommitted changes)", False: ""}
        commits = ", ".join(
            f"{r.iloc[0]}{dirty[len(r) > 1 and str(r.iloc[1]).lower() == 'true']}"
            for _, r in pairs.dropna(subset=["tag/git_commit"]).iterrows()) or "—"
    finished = frame[frame["status"] == FINISHED]
    repeated = len(store.duplicates(studies))
    return [
        ("tracking store", redact(store.tracking_uri)),
        ("studies", ", ".join(f"{s} (experiment {store.experiments[s]})" for s in present)
         or "none"),
        ("runs", f"{len(frame)} trial runs: {status}; statistics use the finished ones"),
        *([("repeated runs", repeated_text(repeated))] if repeated else []),
        ("profile", tag("profile")),
        ("datasets", values_text(finished.get("dataset", []))),
        ("seeds", values_text(finished.get("seed", []))),
        ("epochs", values_text(finished.get("epochs", []))),
        ("git commit", commits),
        ("device", tag("device")),
        ("torch", tag("torch_version")),
        ("built", built),
        *extra,
    ]


def repeated_text(n: int) -> str:
    """What the statistics did with `n` finished runs that repeated a counted grid point."""
    runs, verb = ("run", "is") if n == 1 else ("runs", "are")
    return (f"{n} finished {runs} repeated a grid point and seed already counted (same study, "
            f"profile, settings and seed) and {verb} skipped; the newest finished run of each "
            f"grid point and seed is used")


def missing_studies(store: RunStore | None, needed: dict[str, str]) -> list[Missing]:
    """Studies in `needed` (name -> what it is needed for) without finished runs."""
    out = []
    for study, purpose in needed.items():
        if store is None or store.finished(study).empty:
            out.append(Missing(f"no finished runs of {study} ({purpose})", make_command(study)))
    return out
