"""The budget ladder: each metric and verdict of a study at increasing training budgets, and
the budget from which they stop changing, read from the validation curves of the store's
longest runs. A run's value after epoch b is what a run of b epochs with the same seed and
settings ends with (its learning rate and β schedule depend only on the epoch or step
reached), so every budget is read from the same runs. The test split is never read."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from analysis import budgets
from analysis.blocks import Bullets, Section, Table, Text
from analysis.runs import RunStore
from analysis.tables import ordered_datasets

LADDER_EPOCHS = (1, 3, 10, 30)
"""Budgets read off the curves (those up to the longest run), plus the longest itself and the
default profile's budget: roughly a factor of 3 apart, so each rung is a clear step."""
RELATIVE_TOLERANCE = 0.05
"""A value has stopped changing when it stays within 5% of its value at the longest budget, the
share the convergence flag allows too (of a run's NELBO fall, in its last tenth of epochs): a
finer tolerance would flag the last percent a VAE gains over long training, a coarser one
would pass curves that still visibly fall."""


@dataclass(frozen=True)
class LadderMetric:
    key: str
    """The per-epoch curve's key."""
    label: str
    relative: float = RELATIVE_TOLERANCE
    floor: float = 0.0
    """Absolute tolerance where the relative one would be tighter."""
    why: str = ""

    def same(self, value: float, reference: float) -> bool:
        if not (math.isfinite(value) and math.isfinite(reference)):
            return False
        return abs(value - reference) <= max(self.relative * abs(reference), self.floor)

    def tolerance_text(self) -> str:
        rel = f"{100 * self.relative:g}%" if self.relative else ""
        floor = f"{self.floor:g}" if self.floor else ""
        text = " or ".join(t for t in (rel, floor) if t)
        return f"{self.label}: within {text}{', whichever is larger' if rel and floor else ''}" \
               + (f" ({self.why})" if self.why else "")


VAL_SSE = LadderMetric("val/sse", "validation SSE (summed over pixels)")
VAL_KL = LadderMetric("val/kl", "validation KL (nats)", floor=0.1,
                      why="0.1 nats: a rate that small is noise when the KL is near zero")
ACTIVE_UNITS = LadderMetric("val/active_units", "validation active units", relative=0.0,
                            floor=1.0, why="one unit: they are counts")
SIGMA = LadderMetric("likelihood/sigma", "σ of a learned or calibrated Gaussian",
                     relative=RELATIVE_TOLERANCE / 2,
                     why="σ² is the MSE, so 2.5% of σ is 5% of the SSE")


@dataclass
class LadderSpec:
    """What one study's ladder reads: its cells, metrics and verdicts."""

    study: str
    cells: list[str]
    """Columns that define a cell (the seeds of a cell are averaged)."""
    labels: Callable[[pd.DataFrame], pd.DataFrame]
    """Cells frame -> the same rows as readable columns for a table."""
    metrics: list[LadderMetric]
    verdicts: Callable[[pd.DataFrame], dict[tuple[str, str], str]]
    """Runs at one budget (val/* columns) -> {(what, where): verdict}."""
    verdict_columns: tuple[str, str] = ("claim", "β")


@dataclass
class Ladder:
    spec: LadderSpec
    profile: budgets.Profile
    rungs: list[int]
    values: pd.DataFrame
    """cells + metric, budget, value (mean across the cell's runs)."""
    metric_stops: pd.DataFrame
    """cells + metric, stop (int, or None: only at the longest budget)."""
    verdicts: pd.DataFrame
    """what, where, budget, verdict."""
    verdict_stops: pd.DataFrame
    """what, where, stop."""
    excluded: list[str] = field(default_factory=list)

    @property
    def longest(self) -> int:
        return self.rungs[-1]

    @property
    def point(self) -> int | None:
        """The smallest budget from which every metric and verdict stays as at the longest;
        None when some still changed between the two longest budgets."""
        return _latest([*self.metric_stops["stop"], *self.verdict_stops["stop"]])

    @property
    def verdict_point(self) -> int | None:
        """The same for the verdicts alone."""
        return _latest(list(self.verdict_stops["stop"]))

    @property
    def metric_point(self) -> int | None:
        """The same for the metrics alone."""
        return _latest(list(self.metric_stops["stop"]))

    def changed_at(self, epochs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Metric series and verdicts that at `epochs` differ from the longest budget."""
        def moving(stops):
            return stops[[s is None or pd.isna(s) or s > epochs for s in stops["stop"]]]
        return moving(self.metric_stops), moving(self.verdict_stops)


def _latest(stops: list) -> int | None:
    """The latest of the stops; None when there are none or any is None."""
    if not stops or any(s is None or pd.isna(s) for s in stops):
        return None
    return int(max(stops))


def stops_changing_at(values: dict[int, object], same: Callable[[object, object], bool]) -> \
        int | None:
    """The smallest budget from which every later budget's value is `same` as the value at the
    longest budget; None when only the longest budget itself is (still changing between the
    two longest budgets), or when there is a single budget (nothing to compare)."""
    rungs = sorted(values)
    if len(rungs) < 2:
        return None
    reference, stop = values[rungs[-1]], rungs[-1]
    for budget in reversed(rungs[:-1]):
        if not same(values[budget], reference):
            break
        stop = budget
    return None if stop == rungs[-1] else stop


def rungs_for(longest: int, extra=()) -> list[int]:
    """The ladder's budgets up to `longest` epochs: LADDER_EPOCHS, `extra`, and `longest`."""
    return sorted({b for b in (*LADDER_EPOCHS, *extra) if 1 <= b <= longest} | {longest})


def prefix_consistent(runs: pd.DataFrame) -> pd.Series:
    """Runs whose prefix is a shorter run: a cyclical β schedule spreads its cycles over the
    whole run, so a prefix of it is not the run of fewer epochs."""
    return runs.get("beta_schedule", pd.Series("constant", index=runs.index)) != "cyclical"


def at_budgets(runs: pd.DataFrame, curves: pd.DataFrame, rungs: list[int]) -> pd.DataFrame:
    """One row per run and budget: the run's settings with `epochs` = the budget, and the value
    of each curve after that epoch under its key."""
    curves = curves[curves["step"].isin(rungs)]
    wide = curves.pivot_table(index=["run_id", "step"], columns="key", values="value")
    wide = wide.reset_index().rename(columns={"step": "budget"})
    final = [c for c in runs.columns if "/" in c]  # final metrics: never the budget's values
    meta = runs.drop(columns=final)
    out = meta.merge(wide, on="run_id")
    out["epochs"] = out["budget"]
    return out


def build(store: RunStore, finished: pd.DataFrame, spec: LadderSpec, extra=()) -> Ladder | str:
    """The ladder of `spec.study` from the longest profile among `finished` (the study's
    finished runs of every profile); a sentence saying why not when it cannot be built."""
    long, _ = budgets.long_and_default(finished)
    if long is None:
        return f"the store holds no finished {spec.study} runs with a profile tag"
    runs = long.runs[long.runs["epochs"] == long.epochs]
    excluded = [f"{len(long.runs) - len(runs)} shorter run(s) of profile {long.name}"] \
        if len(runs) < len(long.runs) else []
    consistent = prefix_consistent(runs)
    if not consistent.all():
        excluded.append(f"{int((~consistent).sum())} run(s) with a cyclical β schedule")
        runs = runs[consistent]
    if long.epochs < 2 or runs.empty:
        return (f"the longest {spec.study} runs in the store (profile {long.name}) train "
                f"{long.epochs} epoch(s): a ladder needs runs of two or more")
    rungs = rungs_for(long.epochs, extra)
    curves = store.history(runs["run_id"], [m.key for m in spec.metrics])
    frame = at_budgets(runs, curves, rungs)
    values, metric_stops = _metric_values(frame, spec)
    verdicts, verdict_stops = _verdict_values(frame, spec, rungs)
    return Ladder(spec, long, rungs, values, metric_stops, verdicts, verdict_stops, excluded)


def _metric_values(frame: pd.DataFrame, spec: LadderSpec):
    rows, stops = [], []
    for metric in spec.metrics:
        if metric.key not in frame:
            continue
        means = frame.dropna(subset=[metric.key]).groupby([*spec.cells, "budget"])[metric.key] \
            .mean()
        for cell, series in means.groupby(level=list(range(len(spec.cells)))):
            cell = cell if isinstance(cell, tuple) else (cell,)
            by_budget = {int(b): float(v) for b, v in zip(series.index.get_level_values(-1),
                                                          series.values, strict=True)}
            base = dict(zip(spec.cells, cell, strict=True))
            rows += [{**base, "metric": metric.key, "budget": b, "value": v}
                     for b, v in by_budget.items()]
            stops.append({**base, "metric": metric.key,
                          "stop": stops_changing_at(by_budget, metric.same)})
    return (pd.DataFrame(rows, columns=[*spec.cells, "metric", "budget", "value"]),
            pd.DataFrame(stops, columns=[*spec.cells, "metric", "stop"]))


def _verdict_values(frame: pd.DataFrame, spec: LadderSpec, rungs: list[int]):
    rows = []
    for budget in rungs:
        at = frame[frame["budget"] == budget]
        for (what, where), verdict in spec.verdicts(at).items():
            rows.append({"what": what, "where": where, "budget": budget, "verdict": verdict})
    table = pd.DataFrame(rows, columns=["what", "where", "budget", "verdict"])
    stops = []
    for (what, where), g in table.groupby(["what", "where"], sort=False):
        by_budget = dict(zip(g["budget"], g["verdict"], strict=True))
        stops.append({"what": what, "where": where,
                      "stop": stops_changing_at(by_budget, lambda a, b: a == b)})
    return table, pd.DataFrame(stops, columns=["what", "where", "stop"])


# --------------------------------------------------------------------------- the section

TITLE = "Budget ladder: where the results stop changing"


def stop_text(stop) -> str:
    return "not within the ladder" if stop is None or pd.isna(stop) else \
        f"{int(stop)} epoch{'s' if stop != 1 else ''}"


def section(result: Ladder | str, default: tuple[budgets.Budget, str] | None) -> Section:
    """The ladder as a report section; `default` is the default profile's budget and where it
    was read from (None: unknown)."""
    out = Section(TITLE)
    if isinstance(result, str):
        out.blocks.append(Text(f"No budget ladder: {result}. It is read from the validation "
                               f"curves of the longest runs in the store (the full profile)."))
        if default is not None:
            out.blocks.append(Text(f"The default profile trains {default[0].full()}, according "
                                   f"to {default[1]}. Without a ladder this report cannot say "
                                   f"whether that is enough."))
        return out
    ladder = result
    out.blocks.append(Text(source_text(ladder)))
    out.blocks.append(Text("A metric of a cell (the mean across its seeds) has stopped changing "
                           "from the smallest budget at which it and every later budget are "
                           "within its tolerance of the value at the longest budget; a verdict, "
                           "from the smallest budget at which it and every later budget give the "
                           "verdict of the longest. “Not within the ladder”: it still changed "
                           "between the two longest budgets. Tolerances:"))
    out.blocks.append(Bullets([m.tolerance_text() for m in ladder.spec.metrics]))
    out.blocks += metric_tables(ladder)
    if not ladder.verdicts.empty:
        out.blocks.append(verdict_table(ladder))
    out.blocks += [Text(t) for t in summary_sentences(ladder)]
    out.blocks.append(Text(default_sentence(ladder, default)))
    return out


def source_text(ladder: Ladder) -> str:
    p, budget = ladder.profile, ladder.profile.budget
    used = p.runs[p.runs["epochs"] == p.epochs]
    rungs = ", ".join(str(b) for b in ladder.rungs)
    text = (f"The ladder reads the per-epoch validation curves of the {len(used)} finished "
            f"{ladder.spec.study} runs of profile {p.name}, {budget.full()} each. A run's "
            f"value after epoch b is exactly what a run of b epochs "
            f"with the same seed and settings ends with, because its learning rate and β "
            f"schedule depend only on the epoch or step reached: the budgets {rungs} epochs "
            f"are read from the same runs, not trained again. Only validation values are "
            f"read; the test split plays no part in the ladder.")
    if ladder.excluded:
        text += " Left out: " + "; ".join(ladder.excluded) + "."
    return text


def metric_tables(ladder: Ladder) -> list[Table]:
    budget, cells = ladder.profile.budget, ladder.spec.cells
    tables = []
    for metric in ladder.spec.metrics:
        values = ladder.values[ladder.values["metric"] == metric.key]
        if values.empty:
            continue
        wide = values.pivot_table(index=cells, columns="budget", values="value").reset_index()
        stops = ladder.metric_stops[ladder.metric_stops["metric"] == metric.key]
        wide = wide.merge(stops.drop(columns="metric"), on=cells, how="left")
        if "dataset" in wide:  # MNIST first, as in every other table
            rank = {d: i for i, d in enumerate(ordered_datasets(wide["dataset"]))}
            wide = wide.sort_values("dataset", key=lambda c: c.map(rank), kind="stable")
            wide = wide.reset_index(drop=True)
        table = ladder.spec.labels(wide[cells])
        for b in ladder.rungs:
            table[budget.text(b)] = wide[b] if b in wide else math.nan
        table["stops changing at"] = [stop_text(s) for s in wide["stop"]]
        tables.append(Table.from_frame(table, f"Ladder of the {metric.label}: the mean across "
                                              f"seeds after each budget"))
    return tables


def verdict_table(ladder: Ladder) -> Table:
    budget = ladder.profile.budget
    what, where = ladder.spec.verdict_columns
    wide = ladder.verdicts.pivot(index=["what", "where"], columns="budget", values="verdict")
    # verdict_stops keeps the order the verdicts came in (each claim's betas, then pooled)
    wide = ladder.verdict_stops.merge(wide.reset_index(), on=["what", "where"], how="left")
    table = pd.DataFrame({what: wide["what"], where: wide["where"]})
    for b in ladder.rungs:
        table[budget.text(b)] = wide[b] if b in wide else "—"
    table["stops changing at"] = [stop_text(s) for s in wide["stop"]]
    return Table.from_frame(table, "Verdicts at each budget, by the report's rules on "
                                   "validation values")


def summary_sentences(ladder: Ladder) -> list[str]:
    out, longest = [], ladder.longest
    for metric in ladder.spec.metrics:
        stops = ladder.metric_stops[ladder.metric_stops["metric"] == metric.key]
        if stops.empty:
            continue
        open_ = stops[[s is None or pd.isna(s) for s in stops["stop"]]]
        if open_.empty:
            out.append(f"{metric.label}: every one of the {len(stops)} cells is within "
                       f"tolerance of its {longest}-epoch value from "
                       f"{stop_text(stops['stop'].max())} on.")
        else:
            names = _cell_names(ladder, open_)
            out.append(f"{metric.label}: {len(open_)} of {len(stops)} cells still changed "
                       f"beyond tolerance between the two longest budgets ({names}).")
    if not ladder.verdict_stops.empty:
        vs = ladder.verdict_stops
        open_ = vs[[s is None or pd.isna(s) for s in vs["stop"]]]
        if open_.empty:
            out.append(f"Verdicts: all {len(vs)} give their {longest}-epoch verdict from "
                       f"{stop_text(vs['stop'].max())} on.")
        else:
            out.append(f"Verdicts: {len(open_)} of {len(vs)} changed between the two longest "
                       f"budgets (" + "; ".join(f"{r['what']}, {r['where']}"
                                              for _, r in open_.iterrows()) + ").")
    return out


def _cell_names(ladder: Ladder, rows: pd.DataFrame, limit: int = 4) -> str:
    labels = ladder.spec.labels(rows[ladder.spec.cells].reset_index(drop=True))
    names = [", ".join(str(v) if isinstance(v, str) else f"{col} = {v:g}"
                       for col, v in zip(labels.columns, r, strict=True))
             for r in labels.itertuples(index=False)]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(names[:limit]) + more


def _phrase(stop) -> str:
    if stop is None or pd.isna(stop):
        return "still change between the two longest budgets"
    return f"stop changing at {stop_text(stop)}"


def conclusion(ladder: Ladder) -> str:
    """Where the verdicts, the metrics and the results as a whole stop changing."""
    vp, mp, point = ladder.verdict_point, ladder.metric_point, ladder.point
    text = ""
    if not ladder.verdict_stops.empty:
        text = f"The verdicts {_phrase(vp)}; the metrics' values {_phrase(mp)}. "
    if point is not None:
        return text + (f"Results stop changing at {ladder.profile.budget.text(point)}: from there "
                       f"on every metric and verdict of the ladder stays as at "
                       f"{ladder.longest} epochs.")
    return text + (f"The ladder shows no budget up to {ladder.longest} epochs from which every "
                   f"metric and verdict stays as at {ladder.longest} epochs: some still changed "
                   f"between the two longest budgets, so where the results stop changing lies "
                   f"beyond the ladder.")


def default_sentence(ladder: Ladder, default: tuple[budgets.Budget, str] | None) -> str:
    """Where the default profile's budget stands on the ladder, said plainly."""
    where = conclusion(ladder)
    if default is None:
        return where + " The default profile's budget is not known to this report."
    budget, source = default
    text = f"{where} The default profile trains {budget.full()}, according to {source}."
    point, vp = ladder.point, ladder.verdict_point
    if budget.epochs > ladder.longest:
        return text + (f" That is more than the ladder reaches ({ladder.longest} epochs): the "
                       f"ladder cannot tell whether that budget is enough.")
    if point is not None and budget.epochs >= point:
        at = "at" if budget.epochs == point else "past"
        return text + f" That budget is {at} the point where the results stop changing."
    metrics, verdicts = ladder.changed_at(budget.epochs)
    text += (f" That budget is short of where the results stop changing: at {budget.epochs} "
             f"epochs, {len(metrics)} of {len(ladder.metric_stops)} metric series and "
             f"{len(verdicts)} of {len(ladder.verdict_stops)} verdicts differ from their "
             f"{ladder.longest}-epoch values.")
    if vp is not None and budget.epochs >= vp and not ladder.verdict_stops.empty:
        return text + (" Its verdicts are those of the long runs; its numbers are not where "
                       "longer training takes them.")
    return text + " Its verdicts and numbers may both change with longer training."


def budget_sentence(runs: pd.DataFrame, result: Ladder | str) -> str:
    """The budget of a report's runs, and why: where it stands on the ladder."""
    parts = []
    for _, group in runs.groupby("epochs"):
        b = budgets.budget_of(group.iloc[0])
        parts.append(b.full())
    text = "Each run trains " + " or ".join(parts) + "."
    if isinstance(result, str):
        return text + f" Whether that is enough cannot be shown here: no budget ladder ({result})."
    mine, point = int(runs["epochs"].max()), result.point
    vp = result.verdict_point if not result.verdict_stops.empty else point
    text += (f" On the budget ladder below (up to {result.longest} epochs) the verdicts "
             f"{_phrase(vp)} and the metrics' values {_phrase(result.metric_point)}")
    if point is not None:
        relation = "at" if mine == point else "past" if mine > point else "short of"
        return text + f": {mine} epochs is {relation} the point where both have."
    if vp is not None and mine >= vp:
        return text + (f": at {mine} epochs the verdicts are those of the longest runs, but "
                       f"the numbers may still move with longer training.")
    return text + f": at {mine} epochs neither is shown to have stopped changing."


def headline(result: Ladder | str, runs: pd.DataFrame) -> str:
    """One sentence for a report's summary: where results stop changing, and this budget."""
    if isinstance(result, str):
        return "No budget ladder: " + result + "."
    mine = int(runs["epochs"].max()) if not runs.empty else None
    if result.point is None:
        return (f"Budget ladder (profile {result.profile.name}): results still changed between "
                f"{result.rungs[-2]} and {result.longest} epochs"
                + (f"; these runs train {stop_text(mine)}." if mine else "."))
    text = f"Budget ladder (profile {result.profile.name}): results stop changing at " \
           f"{stop_text(result.point)}"
    if mine is None:
        return text + "."
    relation = "at" if mine == result.point else "past" if mine > result.point else "short of"
    return text + f"; these runs train {stop_text(mine)}, {relation} that point."
