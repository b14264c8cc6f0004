"""The KL-dynamics report: how the KL term evolves over training for each beta, which latent
dimensions collapse, how many units stay active as latent_dim grows, whether collapse shows at
the largest β and latent_dim, what KL warm-up and free bits change there, where the runs sit
in the rate-distortion plane, and the budget ladder. Sentences about results are generated
from the numbers here; none reads a trend into runs that had not settled."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from analysis import budgets, convergence, figures, kl_collapse, kl_remedies, ladder, stats, tables
from analysis.blocks import Figure, Markdown, Missing, Notice, Report, Section, Text
from analysis.runs import RunStore

STUDY = "kl_dynamics"
SEARCH_STUDIES = ("search_mnist", "search_fashion")
COLLAPSE_THRESHOLD = 0.01
"""A latent dimension has collapsed when its KL is below this many nats."""
collapse = kl_collapse.collapse  # the per-dimension count, tested on its own
variant_label = kl_remedies.variant_label


@dataclass
class Context:
    store: RunStore | None
    ui_url: str
    render_md: Callable[..., str] | None = None
    threshold: float = COLLAPSE_THRESHOLD
    every_profile: RunStore | None = None
    """Every profile's runs in the store (the ladder reads the long ones). None: `store`."""

    @property
    def all_runs(self) -> RunStore | None:
        return self.every_profile if self.every_profile is not None else self.store


def reference_latent(base: pd.DataFrame) -> dict[str, int]:
    """Per dataset, the latent_dim run most often (ties: the larger) for per-beta views."""
    out = {}
    for d, sub in base.groupby("dataset"):
        counts = sub["latent_dim"].value_counts()
        out[d] = int(max(counts[counts == counts.max()].index))
    return out


def _hist(ctx: Context, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """History of `keys` joined with the runs' dataset, beta, latent_dim and seed."""
    h = ctx.store.history(runs["run_id"], keys)
    meta = runs[["run_id", "dataset", "beta", "latent_dim", "seed"]]
    h = h.merge(meta, on="run_id")
    h["beta_label"] = h["beta"].map(tables.beta_label)
    return h


def _range(values) -> str:
    lo, hi = min(values), max(values)
    return f"a rate of {lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"rates {lo:.3g}–{hi:.3g}"


def kl_over_training_section(ctx: Context, at_ref: pd.DataFrame, ref: dict[str, int]) -> Section:
    section = Section("KL over training, by β")
    datasets = tables.ordered_datasets(ref)
    names = [tables.dataset_label(d) for d in datasets]
    hist = _hist(ctx, at_ref, ["val/kl", "step/train_kl"])
    hist["dataset"] = hist["dataset"].map(tables.dataset_label)
    section.blocks.append(Figure(
        "kl_over_training", "Total KL against epoch and against step in the first epoch",
        "Top: validation KL (nats per image, summed over latent dimensions) after each epoch. "
        "Bottom: training-batch KL at optimizer steps of the first epoch. One line per β at "
        "latent_dim " + ", ".join(f"{n}: {ref[d]}" for d, n in zip(datasets, names, strict=True))
        + "; mean across seeds with 95% t-intervals.",
        figures.to_png(figures.curves_by_beta(
            hist, [("val/kl", "epoch", "validation KL (nats)"),
                   ("step/train_kl", "step (first epoch)", "training KL (nats)")], names)),
        tables.links(at_ref, ctx.ui_url)))
    for d, n in zip(datasets, names, strict=True):
        for beta, g in hist[hist["dataset"] == n].groupby("beta"):
            text = kl_sentence(g, f"{n}, latent_dim {ref[d]}, β = {beta:g}")
            if text:
                section.blocks.append(Text(text))
    return section


def kl_sentence(g: pd.DataFrame, head: str) -> str:
    """The validation KL after the first and last epochs and the first epoch's training KL."""
    epochs = g[g["key"] == "val/kl"].groupby("step")["value"].mean()
    steps = g[g["key"] == "step/train_kl"].groupby("step")["value"].mean()
    if epochs.empty:
        return ""
    text = f"{head}: the validation KL is {epochs.iloc[0]:.3g} nats after epoch {epochs.index[0]}"
    if len(epochs) > 1:
        text += f" and {epochs.iloc[-1]:.3g} after epoch {epochs.index[-1]}"
    if not steps.empty and steps.idxmax() == steps.index[-1]:
        text += (f"; in the first epoch the training KL rises to {steps.iloc[-1]:.3g} "
                 f"nats by step {steps.index[-1]}, its highest value")
    elif not steps.empty:
        text += (f"; in the first epoch the training KL peaks at {steps.max():.3g} nats "
                 f"at step {steps.idxmax()} and ends the epoch at {steps.iloc[-1]:.3g}")
    return text + "."


def rd_section(ctx: Context) -> tuple[Section, list[Missing]]:
    section = Section("The rate-distortion plane")
    store, ui = ctx.store, ctx.ui_url
    studies = [STUDY, "loss_choice", *SEARCH_STUDIES]
    runs = store.finished(studies) if store is not None else pd.DataFrame()
    missing = []
    if runs.empty or "val/kl" not in runs or "val/sse" not in runs:
        section.blocks.append(Notice("no finished runs with val/kl and val/sse.",
                                     tables.make_command(STUDY)))
        return section, missing
    points = runs.dropna(subset=["val/kl", "val/sse"]).copy()
    points["rate"], points["distortion"] = points["val/kl"], points["val/sse"]
    fronts, sentences = [], []
    for study in SEARCH_STUDIES:
        search = points[points["study"] == study]
        if search.empty:
            missing.append(Missing(f"no finished runs of {study} (its Pareto front)",
                                   tables.make_command(study)))
            continue
        for d, g in search.groupby("dataset"):
            front = stats.pareto_front(g, "rate", "distortion")
            fronts.append(front.assign(dataset=d))
            others = points[(points["dataset"] == d) & (points["study"] != study)]
            dominated = sum(
                ((front["rate"] <= r.rate) & (front["distortion"] <= r.distortion)).any()
                for r in others.itertuples())
            sentences.append(
                f"{study} ({tables.dataset_label(d)}): {len(front)} of {len(g)} finished trials "
                f"are Pareto-optimal in (val KL, val SSE), with likelihoods "
                f"{tables.values_text(front['likelihood'])}, latent_dim "
                f"{tables.values_text(front['latent_dim'])} and β "
                f"{tables.values_text(front['beta'])}, at "
                f"{_range(front['rate'])} nats; the front dominates "
                f"{dominated} of the {len(others)} runs of the other studies on this dataset.")
    fronts = pd.concat(fronts) if fronts else pd.DataFrame(columns=["dataset", "rate",
                                                                     "distortion"])
    datasets = tables.ordered_datasets(points["dataset"])
    points["latent_dim"] = points["latent_dim"].astype(int)
    liks = list(dict.fromkeys(points.sort_values("likelihood")["likelihood"]))
    shown = points.assign(dataset=points["dataset"].map(tables.dataset_label))
    fronts = fronts.assign(dataset=fronts["dataset"].map(tables.dataset_label))
    section.blocks.append(Figure(
        "rate_distortion_plane", "Rate-distortion plane (Alemi et al. 2018)",
        "Every finished run of kl_dynamics, loss_choice and the search studies at its final "
        "epoch: rate = validation KL, distortion = validation SSE of the mean reconstruction "
        "(likelihood-free). Colour: likelihood; marker: study; size: latent_dim. The black "
        "steps join the Pareto-optimal trials of the search study (both objectives minimized).",
        figures.to_png(figures.rd_plane(shown, fronts, [tables.dataset_label(d) for d in datasets],
                                        liks)),
        tables.links(points, ui)))
    section.blocks.extend(Text(s) for s in sentences)
    return section, missing


def elbo_section(ctx: Context, base: pd.DataFrame, ref: dict[str, int]) -> Section:
    section = Section("ELBO decomposition over training")
    picks = []
    for d in tables.ordered_datasets(ref):
        sub = base[(base["dataset"] == d) & (base["latent_dim"] == ref[d])]
        for beta, g in sub.groupby("beta"):
            picks.append((f"{tables.dataset_label(d)}, β = {beta:g}", g.sort_values("seed").iloc[0]))
    if not picks:
        return section
    runs = pd.DataFrame([r for _, r in picks])
    h = ctx.store.history(runs["run_id"], ["val/recon", "val/kl"])
    h = h.merge(pd.DataFrame({"run_id": runs["run_id"], "panel": [p for p, _ in picks]}),
                on="run_id")
    section.blocks.append(Figure(
        "elbo_decomposition", "Negative ELBO = distortion + rate, over training",
        "Validation distortion (recon) and rate (KL) stacked, nats per image, for one run per "
        "dataset and β (lowest seed, reference latent_dim).",
        figures.to_png(figures.elbo_decomposition(h, [p for p, _ in picks])),
        tables.links(runs, ctx.ui_url)))
    for panel, run in picks:
        g = h[h["panel"] == panel].pivot_table(index="step", columns="key", values="value")
        if g.empty or "val/kl" not in g:
            continue
        last = g.iloc[-1]
        total = last["val/recon"] + last["val/kl"]
        text = (f"{panel} ({run['likelihood']}): after epoch {g.index[-1]} the negative ELBO is "
                f"{total:.4g} nats, of which the rate is {last['val/kl']:.3g} "
                f"({100 * last['val/kl'] / total:.1f}%) and the distortion "
                f"{last['val/recon']:.4g}")
        if len(g) > 1:
            text += (f"; since epoch {g.index[0]} the distortion changed by "
                     f"{last['val/recon'] - g['val/recon'].iloc[0]:+.3g} and the rate by "
                     f"{last['val/kl'] - g['val/kl'].iloc[0]:+.3g} nats")
        section.blocks.append(Text(text + "."))
    return section


def design_section(runs: pd.DataFrame, base: pd.DataFrame, ref: dict[str, int],
                   ladder_result) -> Section:
    return Section("Design and budget", [Text(
        f"{len(runs)} finished runs ({len(base)} with constant β and no free bits): "
        f"datasets {tables.values_text(runs['dataset'])}; likelihoods "
        f"{tables.values_text(runs['likelihood'])}; β {tables.values_text(runs['beta'])}; "
        f"latent_dim {tables.values_text(runs['latent_dim'])}; seeds "
        f"{tables.values_text(runs['seed'])}; epochs {tables.values_text(runs['epochs'])}. "
        f"Views by β use latent_dim "
        + ", ".join(f"{ref[d]} on {tables.dataset_label(d)}" for d in tables.ordered_datasets(ref))
        + " (the one run most often)."), Text(budgets.profile_text(runs)),
        Text(ladder.budget_sentence(runs, ladder_result)),
        Text(convergence.rules_text(" Every table below flags its cells; sentences about "
                                    "runs that had not settled say what cannot be told "
                                    "instead of reading a trend."))])


def _ladder_labels(cells: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"dataset": cells["dataset"].map(tables.dataset_label),
                         "β": cells["beta"], "latent_dim": cells["latent_dim"],
                         "variant": cells["remedy"]})


def _ladder_verdicts(frame: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Collapse (mean active units at least a unit below latent_dim) per cell."""
    out = {}
    for (d, beta, z, remedy), g in frame.groupby(["dataset", "beta", "latent_dim", "remedy"]):
        active = g["val/active_units"].mean() if "val/active_units" in g else float("nan")
        if active == active:
            out[(f"{tables.dataset_label(d)}, β = {beta:g}, latent_dim {z}", remedy)] = \
                "collapse" if active <= z - kl_collapse.COLLAPSE_MARGIN else "no collapse"
    return out


LADDER = ladder.LadderSpec(
    study=STUDY, cells=["dataset", "beta", "latent_dim", "remedy"], labels=_ladder_labels,
    metrics=[ladder.ACTIVE_UNITS, ladder.VAL_KL, ladder.VAL_SSE], verdicts=_ladder_verdicts,
    verdict_columns=("setting", "variant"))


def build_ladder(ctx: Context):
    everything = ctx.all_runs
    finished = everything.finished(STUDY) if everything is not None else pd.DataFrame()
    if finished.empty:
        return "the store holds no finished kl_dynamics runs", None
    finished["remedy"] = [variant_label(r) for _, r in finished.iterrows()]
    default = budgets.default_budget(everything, STUDY)
    extra = [default[0].epochs] if default else ()
    return ladder.build(everything, finished, LADDER, extra), default


def trained_sections(ctx: Context, runs: pd.DataFrame, ladder_result) -> tuple[list, list, str]:
    """Design, KL over training, collapse, active units and remedies: (sections, missing,
    a sentence on collapse at the largest β and latent_dim)."""
    base = runs[~kl_remedies.is_variant(runs)]
    ref = reference_latent(base)
    missing = [Missing(f"kl_dynamics has no finished runs on {tables.dataset_label(d)}",
                       tables.make_command(STUDY))
               for d in ("mnist", "fashion") if d not in set(runs["dataset"])]
    if base["latent_dim"].nunique() < 2:
        missing.append(Missing("kl_dynamics covers a single latent_dim (the full profile "
                               "compares two)", tables.make_command(STUDY) + " PROFILE=full"))
    sections = [design_section(runs, base, ref, ladder_result)]
    cells = pd.DataFrame(columns=["dataset", "beta", "latent_dim"])
    headline = ""
    if not base.empty:
        at_ref = base[base.apply(lambda r: r["latent_dim"] == ref[r["dataset"]], axis=1)]
        datasets = tables.ordered_datasets(ref)
        fin = kl_collapse.finals(base, ctx.threshold)
        hist = _hist(ctx, at_ref, ["val/active_units"])
        hist["dataset"] = hist["dataset"].map(tables.dataset_label)
        all_cells = kl_collapse.collapse_cells(fin)
        cells = all_cells[all_cells["collapse"]]
        headline = kl_collapse.headline(all_cells)
        sections += [kl_over_training_section(ctx, at_ref, ref),
                     kl_collapse.per_dimension_section(ctx, base, at_ref, datasets, fin),
                     kl_collapse.active_units_section(
                         ctx, at_ref, base, [tables.dataset_label(d) for d in datasets], fin,
                         hist),
                     kl_collapse.largest_section(all_cells)]
    remedies, more = kl_remedies.section(ctx, runs, cells)
    return [*sections, remedies], missing + more, headline


def build(ctx: Context) -> Report:
    store = ctx.store
    sections = [Section("Background", [Markdown(ctx.render_md(
        "kl_dynamics_background.md.j2", threshold=f"{ctx.threshold:g}"))])]
    missing = tables.missing_studies(store, {STUDY: "KL over training, collapse, active units"})
    runs = store.finished(STUDY) if store is not None else pd.DataFrame()
    ladder_result, default = build_ladder(ctx)
    if runs.empty:
        sections.append(Section("KL over training", [Notice(
            "no finished runs of the kl_dynamics study.", tables.make_command(STUDY))]))
        summary = "No kl_dynamics runs yet."
    else:
        more_sections, more, collapsed = trained_sections(ctx, runs, ladder_result)
        sections += more_sections
        missing += more
        base = runs[~kl_remedies.is_variant(runs)]
        summary = (f"{len(runs)} kl_dynamics runs: KL over training for β "
                   f"{tables.values_text(base['beta'])}, collapse below {ctx.threshold:g} nats, "
                   f"active units for latent_dim {tables.values_text(base['latent_dim'])}. "
                   + (collapsed + " " if collapsed else "") + ladder.headline(ladder_result, runs))
    rd, more = rd_section(ctx)
    sections.append(rd)
    missing += more
    base = runs[~kl_remedies.is_variant(runs)] if not runs.empty else runs
    if not base.empty:
        sections.append(elbo_section(ctx, base, reference_latent(base)))
    sections.append(ladder.section(ladder_result, default))
    return Report("kl_dynamics", "KL dynamics: how the KL term behaves in training", summary,
                  tables.provenance(store, [STUDY, *SEARCH_STUDIES]), sections, missing)
