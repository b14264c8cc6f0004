"""Reproduction of Burda, Grosse & Salakhutdinov 2016 (IWAE), Table 1, one stochastic layer on
MNIST: the paper's test NLL next to ours from the `burda2016` runs, the budget behind ours, and
a verdict computed from both. Every number is nats per image: -log p(x) estimated by the
k-sample importance-weighted bound, summed over the pixels, averaged over the test images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from analysis import stats, tables
from analysis.blocks import Markdown, Report, Section, Table, Text
from analysis.runs import RunStore
from study.config import Config, burda_epochs

STUDY = "burda2016"
PAPER = "Burda, Grosse & Salakhutdinov 2016, Importance Weighted Autoencoders (ICLR 2016)"
SCHEDULE_STAGES = 8
"""Stages i = 0..7 of the paper's schedule; stage i has 3^i passes."""
PAPER_EPOCHS = burda_epochs(SCHEDULE_STAGES)
"""3,280 passes over the training set."""
PAPER_TEST_K = 5000
"""Importance samples of the paper's test bound."""
MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000
MNIST_PIXELS = 28 * 28
TOLERANCE_NATS = 1.0
"""A row is reproduced when the full budget was used and |ours - paper| is at most this."""
REPRODUCED = "reproduced (within 1 nat)"


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 1 (one stochastic layer, MNIST) and the settings that tell its runs
    apart: the training bound's k, the optimizer and the initialization."""

    label: str
    train_k: int
    nll: float
    """The paper's test NLL, nats per image (k = 5000 on the 10,000 test images)."""
    optimizer: str = "adam_burda"
    init: str = "glorot"


TABLE1 = (
    PaperRow("VAE (k = 1)", 1, 86.76),
    PaperRow("IWAE (k = 50)", 50, 84.78),
    # The spec's variants `vae`, `iwae_k50` and, not a row of the paper, `vae_torch`: its VAE
    # trained with torch's Adam and nn.Linear's initialization (so is every VAE run made before
    # the spec followed the authors').
    PaperRow("VAE (k = 1), torch.optim.Adam, nn.Linear init", 1, 86.76, "adam", "torch"),
)


@dataclass(frozen=True)
class Budget:
    """What the runs behind one row actually used (the smallest value across their runs)."""

    epochs: int
    train_images: int
    train_images_available: int
    """Training images left after the validation carve (59,600 with 400 held out)."""
    test_k: int
    test_images: int

    @property
    def full(self) -> bool:
        """The paper's whole schedule on all training images, k = 5000 on all test images."""
        return (self.epochs >= PAPER_EPOCHS and self.train_images >= self.train_images_available
                and self.test_k >= PAPER_TEST_K and self.test_images >= MNIST_TEST_IMAGES)

    def shortfalls(self) -> list[str]:
        """Each way this budget falls short of the paper's, as a phrase."""
        out = []
        if self.epochs < PAPER_EPOCHS:
            out.append(f"shortened schedule: {self.epochs:,} of {PAPER_EPOCHS:,} epochs")
        if self.train_images < self.train_images_available:
            out.append(f"trained on {self.train_images:,} of {self.train_images_available:,} images")
        if self.test_k < PAPER_TEST_K:
            out.append(f"test bound with k = {self.test_k:,}, not {PAPER_TEST_K:,}")
        if self.test_images < MNIST_TEST_IMAGES:
            out.append(f"evaluated on {self.test_images:,} of {MNIST_TEST_IMAGES:,} test images")
        return out


@dataclass(frozen=True)
class Row:
    """The paper's number for one Table 1 row next to ours across seeds."""

    paper: PaperRow
    mean: float
    lo: float
    hi: float
    n: int
    """Finished runs (seeds) behind `mean`."""
    budget: Budget | None
    active: float = math.nan
    """Active latent units (Burda et al.'s Cov_x(E_q[z_u]) > 0.01, on the test images), the
    mean over the same runs; Table 1 reports this count beside each NLL."""

    @property
    def gap(self) -> float:
        """ours - paper, nats per image; positive means our bound is looser."""
        return self.mean - self.paper.nll


def nats(value: float) -> str:
    """A value in nats as the page prints it: two decimals, like Table 1."""
    return f"{value:.2f}" if math.isfinite(value) else "—"


def signed_nats(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "—"


def ours_text(row: Row) -> str:
    """`mean [lo, hi]` (95% t-interval over seeds), or `value (1 seed)`."""
    if row.n == 0:
        return "—"
    if row.n == 1:
        return f"{nats(row.mean)} (1 seed)"
    return f"{nats(row.mean)} [{nats(row.lo)}, {nats(row.hi)}]"


def active_text(row: Row) -> str:
    """Our active units of 50: a whole number for one seed, the mean to one decimal for more."""
    if not math.isfinite(row.active):
        return "—"
    return f"{row.active:.0f} of 50" if row.n <= 1 else f"{row.active:.1f} of 50 (mean)"


def verdict(row: Row) -> str:
    """Reproduced only with the paper's full budget and a gap of at most 1 nat either way;
    otherwise what was run and why the gap does not count."""
    if row.n == 0 or row.budget is None:
        return "no finished runs"
    if not row.budget.full:
        return ("not a reproduction yet: " + "; ".join(row.budget.shortfalls())
                + "; the gap is not comparable")
    if abs(row.gap) <= TOLERANCE_NATS:
        return REPRODUCED
    return (f"not reproduced: the full budget was used and the gap of {signed_nats(row.gap)} nats "
            f"is not within 1 nat")


# --------------------------------------------------------------------------- from the runs


def _variant(runs: pd.DataFrame) -> pd.Series:
    """The spec variant of each run: the `variant` param, else the tag."""
    for col in ("variant", "tag/variant"):
        if col in runs:
            return runs[col].astype(str)
    return pd.Series("", index=runs.index)


def _setting(runs: pd.DataFrame, name: str) -> pd.Series:
    """A config param of each run as a string; Config's default where the run has none (a
    run made before the field existed computed with the default)."""
    default = str(getattr(Config(), name))
    if name not in runs:
        return pd.Series(default, index=runs.index)
    return runs[name].where(runs[name].notna() & (runs[name] != ""), default).astype(str)


def row_runs(runs: pd.DataFrame, paper: PaperRow) -> pd.Series:
    """Which runs belong to `paper`'s row: by what they computed (training k, optimizer,
    initialization), not by the variant's name, which has meant other settings over time."""
    return ((_setting(runs, "iw_samples") == str(paper.train_k))
            & (_setting(runs, "optimizer") == paper.optimizer)
            & (_setting(runs, "init") == paper.init))


def _int_or(value, default: int) -> int:
    """An integer param, or `default` where it is None (the whole split)."""
    return default if value is None or pd.isna(value) or value in ("None", "") else int(value)


def budget_of(runs: pd.DataFrame) -> Budget:
    """The smallest budget among `runs`: a row is as far along as its shortest run."""
    train, available, test = [], [], []
    for r in runs.to_dict("records"):
        left = MNIST_TRAIN_IMAGES - int(r["val_size"])
        available.append(left)
        train.append(min(_int_or(r.get("train_subset"), left), left))
        test_split = _int_or(r.get("test_subset"), MNIST_TEST_IMAGES)
        test.append(min(_int_or(r.get("test_iw_images"), test_split), test_split))
    return Budget(epochs=int(runs["epochs"].min()), train_images=min(train),
                  train_images_available=min(available), test_k=int(runs["test_iw_k"].min()),
                  test_images=min(test))


def rows_of(runs: pd.DataFrame) -> list[Row]:
    """One Row per Table 1 row from the finished runs of the study."""
    out = []
    for paper in TABLE1:
        mine = runs[row_runs(runs, paper)]
        ci = stats.mean_ci(mine["test/iwae_nll"]) if "test/iwae_nll" in mine else \
            stats.mean_ci([])
        budget = budget_of(mine) if not mine.empty else None
        active = stats.mean_ci(mine["test/active_units"])["mean"] \
            if "test/active_units" in mine else math.nan
        out.append(Row(paper, ci["mean"], ci["lo"], ci["hi"], ci["n"], budget, active))
    return out


def stages_text(epochs: int) -> str:
    """How much of the schedule `epochs` passes cover: `3 of 8 stages`, plus any part stage."""
    done = max(s for s in range(SCHEDULE_STAGES + 1) if burda_epochs(s) <= epochs)
    text = f"{done} of {SCHEDULE_STAGES} stages"
    extra = epochs - burda_epochs(done)
    if done < SCHEDULE_STAGES and extra > 0:
        text += f" and {extra:,} of the {3 ** done:,} passes of stage {done}"
    return text


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def run_seconds(store: RunStore, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: `wall` (training, evaluation and logging: the runner's `time/run_seconds`,
    summed over the parts of a stopped and resumed run; else the MLflow run's end - start)
    and `train` (the runner's `time/train_seconds`, training alone; NaN where not logged)."""
    client = store.client
    wall = []
    logged = runs["time/run_seconds"] if "time/run_seconds" in runs else \
        pd.Series(math.nan, index=runs.index)
    for run_id, seconds in zip(runs["run_id"], logged, strict=True):
        if pd.notna(seconds):
            wall.append(float(seconds))
            continue
        info = client.get_run(run_id).info
        ok = info.start_time and info.end_time
        wall.append((info.end_time - info.start_time) / 1000 if ok else math.nan)
    train = runs["time/train_seconds"] if "time/train_seconds" in runs else math.nan
    return pd.DataFrame({"wall": wall, "train": train}, index=runs.index)


def _time_text(seconds: pd.Series) -> str:
    s = seconds.dropna()
    if s.empty:
        return "—"
    if len(s) == 1:
        return duration(float(s.iloc[0]))
    return (f"{duration(float(s.sum()))} ({duration(float(s.min()))}–{duration(float(s.max()))} "
            f"per run)")


def machine_text(runs: pd.DataFrame) -> str:
    """device, machine (CPU or GPU model, where the runs were tagged with it) and torch."""
    def tag(name):
        col = f"tag/{name}"
        return tables.values_text(runs[col]) if col in runs else None

    parts = [tag("device") or "device not tagged"]
    if tag("machine"):
        parts[0] += f" ({tag('machine')})"
    parts.append(f"torch {tag('torch_version') or '—'}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Unfinished:
    """A run of the study that has not finished: stopped resumably, or still running."""

    label: str
    seed: int
    epoch: int
    """Epochs completed and logged."""
    epochs: int
    val_nelbo: float
    train_seconds: float
    """The run's training steps so far (its per-epoch `epoch_seconds`, summed)."""
    state: str
    """`running`, or why it stopped."""
    profile: str


def unfinished_runs(store: RunStore) -> list[Unfinished]:
    """The study's runs that are RUNNING, or were stopped with a resumable state (KILLED by
    SIGTERM or --stop-after): how far each got. Failed and pruned runs are not listed."""
    frame = store.frame
    runs = frame[frame["study"] == STUDY]
    stop = runs["tag/stop_reason"].fillna("") if "tag/stop_reason" in runs else \
        pd.Series("", index=runs.index)
    runs = runs[(runs["status"] == "RUNNING")
                | ((runs["status"] == "KILLED") & stop.str.contains("resume"))]
    label = pd.Series("", index=runs.index)
    for paper in reversed(TABLE1):
        label[row_runs(runs, paper)] = paper.label
    history = store.history(list(runs["run_id"]), ["val/nelbo", "epoch_seconds"])
    out = []
    for r in runs.assign(variant=_variant(runs), label=label).to_dict("records"):
        mine = history[history["run_id"] == r["run_id"]]
        curve = mine[mine["key"] == "val/nelbo"]
        last = curve.iloc[-1] if not curve.empty else None
        state = "running" if r["status"] == "RUNNING" else \
            str(r["tag/stop_reason"]).split(";")[0]
        out.append(Unfinished(
            r["label"] or r["variant"], int(r["seed"]),
            int(last["step"]) if last is not None else 0, int(r["epochs"]),
            float(last["value"]) if last is not None else math.nan,
            float(mine.loc[mine["key"] == "epoch_seconds", "value"].sum()), state,
            str(r.get("tag/profile", "default"))))
    return out


def unfinished_text(runs: list[Unfinished]) -> str:
    """One sentence per unfinished run; they count nowhere above until they finish."""
    lines = []
    for u in runs:
        lines.append(
            f"{u.label}, seed {u.seed}: epoch {u.epoch:,} of {u.epochs:,} "
            f"({stages_text(u.epoch)}), validation NELBO {nats(u.val_nelbo)} nats per image "
            f"(one posterior sample, not the k-sample test bound), after "
            f"{duration(u.train_seconds)} of training steps; {u.state}.")
    profiles = sorted({u.profile for u in runs})
    again = " or ".join(f'"make study STUDY={STUDY} PROFILE={p}"' for p in profiles)
    return (" ".join(lines) + f" Unfinished runs are not in Table 1. Running {again} again "
            f"resumes a stopped run from its last saved state.")


# --------------------------------------------------------------------------- the report


@dataclass
class Context:
    store: RunStore
    render_md: Callable[..., str]


def table1(rows: list[Row]) -> Table:
    return Table(
        ["Table 1 row", "paper (nats)", "ours (nats)", "gap, ours − paper (nats)", "seeds",
         "verdict", "active units, ours"],
        [[r.paper.label, nats(r.paper.nll), ours_text(r), signed_nats(r.gap) if r.n else "—",
          str(r.n), verdict(r), active_text(r)] for r in rows],
        caption=f"Test NLL on MNIST, one stochastic layer: −log p(x) estimated by the k-sample "
                f"importance-weighted bound, nats per image (summed over the {MNIST_PIXELS} "
                f"pixels, averaged over the test images); ours is the mean over seeds with a 95% "
                f"t-interval. The paper: k = {PAPER_TEST_K:,} on all {MNIST_TEST_IMAGES:,} test "
                f"images. Active units: latent dimensions u whose posterior mean varies across "
                f"the test images, Cov_x(E_q[z_u]) > 0.01 (the paper's Section 5.2 measure; "
                f"Table 1 gives its own count for each row). The last row is not the paper's: "
                f"the same VAE trained with torch's Adam and nn.Linear's initialization instead "
                f"of the authors' (see below), against the paper's VAE number.")


def budget_table(rows: list[Row], runs: pd.DataFrame, seconds: pd.DataFrame) -> Table:
    body = []
    for r in rows:
        if r.budget is None:
            continue
        b, mine = r.budget, row_runs(runs, r.paper)
        body.append([
            r.paper.label, f"{b.epochs:,} of {PAPER_EPOCHS:,}", stages_text(b.epochs),
            f"{b.train_images:,} of {b.train_images_available:,}", f"{b.test_k:,}",
            f"{b.test_images:,} of {MNIST_TEST_IMAGES:,}", _time_text(seconds.loc[mine, "wall"]),
            _time_text(seconds.loc[mine, "train"]), machine_text(runs[mine]),
        ])
    return Table(
        ["Table 1 row", "epochs (passes)", "schedule covered", "training images", "test k",
         "test images", "wall time: sum (per run)", "of which training", "machine"], body,
        caption=f"The budget behind our numbers (the shortest run of each row). The paper: "
                f"{PAPER_EPOCHS:,} epochs ({SCHEDULE_STAGES} stages, stage i has 3^i passes), "
                f"k = {PAPER_TEST_K:,} on {MNIST_TEST_IMAGES:,} test images. Wall time is each "
                f"run's training, test evaluation and logging, summed over the parts of a run "
                f"that was stopped and resumed.")


def budget_line(rows: list[Row]) -> str:
    """One sentence: the epochs used against the paper's, and the evaluation."""
    parts = []
    for r in rows:
        if r.budget is not None:
            b = r.budget
            parts.append(f"{r.paper.label}: {b.epochs:,} of {PAPER_EPOCHS:,} epochs "
                         f"({stages_text(b.epochs)}) on {b.train_images:,} training images, "
                         f"tested with k = {b.test_k:,} on {b.test_images:,} test images")
    return "Budget used: " + "; ".join(parts) + "."


def build(ctx: Context) -> Report | None:
    """The reproduction page, or None when the store has no burda2016 runs finished, running
    or stopped resumably."""
    store = ctx.store
    runs = store.finished(STUDY)
    unfinished = unfinished_runs(store)
    if runs.empty and not unfinished:
        return None
    rows = rows_of(runs)
    verdicts = [f"{r.paper.label}: {verdict(r)}." for r in rows]
    sections = [
        Section("Table 1", [table1(rows)] + ([Text(budget_line(rows))] if not runs.empty
                                             else [])),
        Section("Verdict", [Text(v) for v in verdicts]),
    ]
    if unfinished:
        sections.append(Section("Not finished yet", [Text(unfinished_text(unfinished))]))
    if not runs.empty:
        seconds = run_seconds(store, runs)
        sections.append(Section("Budget", [budget_table(rows, runs, seconds), Text(
            f"All runs together: {_time_text(seconds['wall'])} wall time on "
            f"{machine_text(runs)}.")]))
    sections.append(Section("Where this code differs from the paper", [Markdown(ctx.render_md(
        "reproduction_differences.md.j2", pixels=MNIST_PIXELS))]))
    summary = (f"Table 1 of {PAPER}, one stochastic layer on MNIST, test NLL in nats per "
               f"image. ")
    if runs.empty:
        summary += "No finished runs yet."
    else:
        ours = "; ".join(f"{r.paper.label} {ours_text(r)} against {nats(r.paper.nll)}"
                         for r in rows)
        distinct = {verdict(r) for r in rows}
        said = f"Every row: {distinct.pop()}." if len(distinct) == 1 else " ".join(verdicts)
        summary += f"Ours: {ours}. {said}"
    if unfinished:
        summary += (f" {len(unfinished)} run{'s' if len(unfinished) > 1 else ''} not finished "
                    f"yet: see below.")
    machines = tables.values_text(runs["tag/machine"]) if "tag/machine" in runs else "not tagged"
    return Report("reproduction", "Reproduction: Burda et al. 2016, Table 1", summary,
                  tables.provenance(store, [STUDY], extra=[("machine", machines)]), sections)
