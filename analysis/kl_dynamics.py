"""The KL-dynamics report: how the KL term evolves over training for each beta, which latent
dimensions collapse, how many units stay active as latent_dim grows, what KL warm-up and
free bits change, and where the runs sit in the rate-distortion plane. Sentences about
results are generated from the numbers here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from analysis import figures, stats, tables
from analysis.blocks import Figure, Markdown, Missing, Notice, Report, Section, Table, Text, ci_text
from analysis.runs import RunStore

STUDY = "kl_dynamics"
SEARCH_STUDIES = ("search_mnist", "search_fashion")
COLLAPSE_THRESHOLD = 0.01
"""A latent dimension has collapsed when its KL is below this many nats."""
SATURATION_TOLERANCE = 1.0
"""Active units saturate at the smallest latent_dim within this many units of the maximum."""


@dataclass
class Context:
    store: RunStore | None
    ui_url: str
    render_md: Callable[..., str] | None = None
    threshold: float = COLLAPSE_THRESHOLD
    every_profile: RunStore | None = None
    """Every profile's runs in the store (not read yet by this report). None: `store`."""


def _is_variant(runs: pd.DataFrame) -> pd.Series:
    warm = runs.get("beta_schedule", pd.Series("constant", index=runs.index)) != "constant"
    free = pd.to_numeric(runs.get("free_bits", pd.Series(0.0, index=runs.index))) > 0
    return warm | free


def variant_label(run) -> str:
    parts = []
    if run.get("beta_schedule", "constant") != "constant":
        unit = run.get("schedule_unit", "step")
        parts.append(f"{run['beta_schedule']} warm-up over {run.get('warmup', 0):g} {unit}s")
    if float(run.get("free_bits", 0) or 0) > 0:
        parts.append(f"free bits λ = {run['free_bits']:g}")
    return " + ".join(parts) or "constant β"


def reference_latent(base: pd.DataFrame) -> dict[str, int]:
    """Per dataset, the latent_dim run most often (ties: the larger) for per-beta views."""
    out = {}
    for d, sub in base.groupby("dataset"):
        counts = sub["latent_dim"].value_counts()
        out[d] = int(max(counts[counts == counts.max()].index))
    return out


def collapse(kl: pd.DataFrame, threshold: float) -> tuple[int, int | None]:
    """kl: dims x epochs. (dims below `threshold` after the last epoch, the first epoch
    after which at least that many were below it; None when none collapsed)."""
    counts = (kl < threshold).sum()
    final = int(counts.iloc[-1])
    if final == 0:
        return 0, None
    return final, int(counts.index[(counts >= final).values.argmax()])


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


def kl_sections(ctx: Context, base: pd.DataFrame, ref: dict[str, int]) -> list[Section]:
    store, ui = ctx.store, ctx.ui_url
    datasets = tables.ordered_datasets(ref)
    at_ref = base[base.apply(lambda r: r["latent_dim"] == ref[r["dataset"]], axis=1)]
    names = [tables.dataset_label(d) for d in datasets]
    sections = []

    # --- KL over training
    section = Section("KL over training, by β")
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
        tables.links(at_ref, ui)))
    for d, n in zip(datasets, names, strict=True):
        sub = hist[hist["dataset"] == n]
        for beta, g in sub.groupby("beta"):
            epochs = g[g["key"] == "val/kl"].groupby("step")["value"].mean()
            steps = g[g["key"] == "step/train_kl"].groupby("step")["value"].mean()
            if epochs.empty:
                continue
            text = (f"{n}, latent_dim {ref[d]}, β = {beta:g}: the validation KL is "
                    f"{epochs.iloc[0]:.3g} nats after epoch {epochs.index[0]}")
            if len(epochs) > 1:
                text += f" and {epochs.iloc[-1]:.3g} after epoch {epochs.index[-1]}"
            if not steps.empty and steps.idxmax() == steps.index[-1]:
                text += (f"; in the first epoch the training KL rises to {steps.iloc[-1]:.3g} "
                         f"nats by step {steps.index[-1]}, its highest value")
            elif not steps.empty:
                text += (f"; in the first epoch the training KL peaks at {steps.max():.3g} nats "
                         f"at step {steps.idxmax()} and ends the epoch at {steps.iloc[-1]:.3g}")
            section.blocks.append(Text(text + "."))
    sections.append(section)

    # --- per-dimension KL, collapse
    section = Section("Per-dimension KL and collapsed dimensions")
    dim_cols = tables.kl_dim_columns(base)
    mats, used, sentences = [], [], []
    for d, n in zip(datasets, names, strict=True):
        sub = at_ref[at_ref["dataset"] == d]
        for beta, g in sub.groupby("beta"):
            run = g.sort_values("seed").iloc[0]
            cols = [c for c in dim_cols if pd.notna(run.get(c))]
            h = store.history([run["run_id"]], cols)
            if h.empty:
                continue
            mat = h.pivot_table(index="key", columns="step", values="value")
            mat = mat.loc[mat.iloc[:, -1].sort_values(ascending=False).index]
            mat.index = [k.rsplit("_", 1)[-1] for k in mat.index]
            mats.append((n, tables.beta_label(beta), mat))
            used.append(run)
            final, by = collapse(mat, ctx.threshold)
            z = len(mat)
            if final:
                sentences.append(
                    f"{n}, β = {beta:g} (seed {run['seed']:g}): {final} of {z} dimensions had "
                    f"collapsed (KL < {ctx.threshold:g} nats) by epoch {by} of "
                    f"{int(mat.columns[-1])}.")
            else:
                sentences.append(
                    f"{n}, β = {beta:g} (seed {run['seed']:g}): none of the {z} dimensions "
                    f"collapsed (every final KL ≥ {ctx.threshold:g} nats; the smallest is "
                    f"{mat.iloc[:, -1].min():.3g}).")
    if mats:
        section.blocks.append(Figure(
            "kl_heatmaps", "Per-dimension KL over training",
            f"Validation KL of each latent dimension (rows, sorted by final KL) after each "
            f"epoch, log colour scale; values below {ctx.threshold:g} nats (collapsed) are "
            f"dark. One run per dataset and β (lowest seed, latent_dim as above).",
            figures.to_png(figures.kl_heatmaps(mats, ctx.threshold)),
            tables.links(pd.DataFrame(used), ui)))
        section.blocks.extend(Text(s) for s in sentences)
    rows = []
    for _, r in base.iterrows():
        vals = r[dim_cols].dropna().astype(float)
        rows.append({"dataset": r["dataset"], "beta": r["beta"],
                     "latent_dim": int(r["latent_dim"]),
                     "run_id": r["run_id"], "collapsed": int((vals < ctx.threshold).sum()),
                     "collapsed_share": float((vals < ctx.threshold).mean()) if len(vals) else 0.0,
                     "active": r.get("val/active_units", float("nan"))})
    finals = pd.DataFrame(rows)
    if not finals.empty and dim_cols and not finals["collapsed"].any():
        section.blocks.append(Text(
            f"No run has a collapsed dimension (final KL < {ctx.threshold:g} nats) at the end "
            "of training."))
    elif not finals.empty and dim_cols:
        shown = finals.assign(dataset=finals["dataset"].map(tables.dataset_label))
        section.blocks.append(Figure(
            "collapsed_share", "Share of collapsed dimensions at the end of training",
            f"Share of latent dimensions with final validation KL < {ctx.threshold:g} nats, by "
            "β and latent_dim; mean across seeds with 95% t-intervals.",
            figures.to_png(figures.collapsed_share(shown, names)),
            tables.links(base, ui)))
    if not finals.empty and dim_cols:
        table = []
        for (d, beta, z), g in finals.groupby(["dataset", "beta", "latent_dim"]):
            c, a = stats.mean_ci(g["collapsed"]), stats.mean_ci(g["active"])
            table.append({"dataset": tables.dataset_label(d), "β": beta, "latent_dim": z,
                          "seeds": len(g),
                          "collapsed dims [95% CI]": ci_text(c["mean"], c["lo"], c["hi"], 3),
                          "active units [95% CI]": ci_text(a["mean"], a["lo"], a["hi"], 3)})
        section.blocks.append(Table.from_frame(pd.DataFrame(table), "Final collapsed "
                              f"dimensions (KL < {ctx.threshold:g} nats) and active units"))
    sections.append(section)

    # --- active units
    section = Section("Active units")
    au_hist = _hist(ctx, at_ref, ["val/active_units"])
    au_hist["dataset"] = au_hist["dataset"].map(tables.dataset_label)
    fin = finals.dropna(subset=["active"]).assign(
        dataset=lambda f: f["dataset"].map(tables.dataset_label),
        beta_label=lambda f: f["beta"].map(tables.beta_label))
    if not au_hist.empty or not fin.empty:
        section.blocks.append(Figure(
            "active_units", "Active units over training and against latent_dim",
            "Left: active units (Cov_x E_q[z_u] > 0.01) on the validation split after each "
            "epoch, by β, at the reference latent_dim. Right: final active units against "
            "latent_dim; the dashed line is latent_dim itself (every unit active). Means across "
            "seeds with 95% t-intervals.",
            figures.to_png(figures.active_units(au_hist, fin, names)),
            tables.links(base, ui)))
        section.blocks.extend(Text(s) for s in saturation_sentences(finals))
    sections.append(section)
    return sections


def saturation_sentences(finals: pd.DataFrame) -> list[str]:
    out = []
    for (d, beta), g in finals.dropna(subset=["active"]).groupby(["dataset", "beta"]):
        means = g.groupby("latent_dim")["active"].mean().sort_index()
        name = tables.dataset_label(d)
        pairs = ", ".join(f"{m:.3g} at {int(z)}" for z, m in means.items())
        if len(means) < 2:
            out.append(f"{name}, β = {beta:g}: {pairs} active units; one latent_dim only, so "
                       "saturation cannot be read.")
            continue
        top = means.max()
        sat = int(means.index[(means >= top - SATURATION_TOLERANCE).values.argmax()])
        rising = sat == means.index[-1] and means.iloc[-1] - means.iloc[-2] > SATURATION_TOLERANCE
        tail = (f"still rising at the largest latent_dim ({int(means.index[-1])})" if rising else
                f"saturating from latent_dim = {sat} (within {SATURATION_TOLERANCE:g} unit of "
                f"the maximum, {top:.3g})")
        out.append(f"{name}, β = {beta:g}: final active units {pairs} (mean across seeds, "
                   f"by latent_dim); {tail}.")
    return out


def variant_section(ctx: Context, runs: pd.DataFrame) -> tuple[Section, list[Missing]]:
    section = Section("KL warm-up and free bits")
    store, ui = ctx.store, ctx.ui_url
    variants = runs[_is_variant(runs)]
    base = runs[~_is_variant(runs)]
    missing = []
    has_warm = (variants.get("beta_schedule", pd.Series(dtype=str)) != "constant").any()
    has_free = (pd.to_numeric(variants.get("free_bits", pd.Series(dtype=float))) > 0).any()
    for flag, what in ((has_warm, "a KL warm-up variant (beta_schedule=linear, warmup>0)"),
                       (has_free, "a free-bits variant (free_bits>0)")):
        if not flag:
            missing.append(Missing(f"kl_dynamics has no finished run of {what}",
                                   tables.make_command(STUDY)))
    if variants.empty:
        section.blocks.append(Notice("no warm-up or free-bits runs in kl_dynamics.",
                                     tables.make_command(STUDY)))
        return section, missing
    keys = ["dataset", "likelihood", "beta", "latent_dim"]
    groups, members = [], []
    for key, g in variants.groupby(keys):
        match = base
        for k, v in zip(keys, key, strict=True):
            match = match[match[k] == v]
        match = match[match["seed"].isin(g["seed"])]
        label = (f"{tables.dataset_label(key[0])}, {key[1]}, β = {key[2]:g}, "
                 f"latent_dim {key[3]:g}")
        both = pd.concat([match, g])
        both = both.assign(variant=[variant_label(r) for _, r in both.iterrows()], group=label)
        groups.append(both)
        members.append(both)
    allruns = pd.concat(members)
    h = store.history(allruns["run_id"], ["val/kl", "val/active_units", "val/recon"])
    h = h.merge(allruns[["run_id", "variant", "group"]], on="run_id")
    section.blocks.append(Figure(
        "warmup_free_bits", "KL warm-up and free bits against constant β",
        "Validation KL and active units after each epoch for each variant and the constant-β "
        "runs with the same dataset, likelihood, β, latent_dim and seeds; means across seeds "
        "with 95% t-intervals.",
        figures.to_png(figures.variants(h, [("val/kl", "validation KL (nats)"),
                                            ("val/active_units", "active units")])),
        tables.links(allruns, ui)))
    rows = []
    for both in groups:
        for variant, g in both.groupby("variant", sort=False):
            row = {"setting": g["group"].iloc[0], "variant": variant, "seeds": len(g)}
            for col, label in (("val/kl", "final KL"), ("val/active_units", "active units"),
                               ("val/recon", "final recon"), ("val/nelbo", "final −ELBO")):
                m = stats.mean_ci(g[col]) if col in g else stats.mean_ci([])
                row[label] = ci_text(m["mean"], m["lo"], m["hi"], 4)
            rows.append(row)
        const = both[both["variant"] == "constant β"]
        for variant, g in both[both["variant"] != "constant β"].groupby("variant"):
            if const.empty:
                section.blocks.append(Text(
                    f"{both['group'].iloc[0]}: {variant} has no constant-β run with the same "
                    "setting and seeds to compare with."))
                continue
            section.blocks.append(Text(
                f"{both['group'].iloc[0]}: with {variant} the final validation KL is "
                f"{g['val/kl'].mean():.3g} nats against {const['val/kl'].mean():.3g} with "
                f"constant β; active units {g['val/active_units'].mean():.3g} against "
                f"{const['val/active_units'].mean():.3g}; negative ELBO "
                f"{g['val/nelbo'].mean():.4g} against {const['val/nelbo'].mean():.4g} nats."))
    section.blocks.append(Table.from_frame(pd.DataFrame(rows), "Final values, means across "
                                           "seeds with 95% t-intervals"))
    return section, missing


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


def build(ctx: Context) -> Report:
    store = ctx.store
    sections = [Section("Background", [Markdown(ctx.render_md(
        "kl_dynamics_background.md.j2", threshold=f"{ctx.threshold:g}"))])]
    missing = tables.missing_studies(store, {STUDY: "KL over training, collapse, active units"})
    runs = store.finished(STUDY) if store is not None else pd.DataFrame()
    if runs.empty:
        sections.append(Section("KL over training", [Notice(
            "no finished runs of the kl_dynamics study.", tables.make_command(STUDY))]))
        summary = "No kl_dynamics runs yet."
    else:
        base = runs[~_is_variant(runs)]
        ref = reference_latent(base)
        for d in ("mnist", "fashion"):
            if d not in set(runs["dataset"]):
                missing.append(Missing(f"kl_dynamics has no finished runs on "
                                       f"{tables.dataset_label(d)}", tables.make_command(STUDY)))
        if base["latent_dim"].nunique() < 2:
            missing.append(Missing("kl_dynamics covers a single latent_dim",
                                   tables.make_command(STUDY)))
        sections.append(Section("Design", [Text(
            f"{len(runs)} finished runs ({len(base)} with constant β and no free bits): "
            f"datasets {tables.values_text(runs['dataset'])}; likelihoods "
            f"{tables.values_text(runs['likelihood'])}; β {tables.values_text(runs['beta'])}; "
            f"latent_dim {tables.values_text(runs['latent_dim'])}; seeds "
            f"{tables.values_text(runs['seed'])}; epochs {tables.values_text(runs['epochs'])}. "
            f"Views by β use latent_dim "
            + ", ".join(f"{ref[d]} on {tables.dataset_label(d)}"
                        for d in tables.ordered_datasets(ref))
            + " (the one run most often).")]))
        if not base.empty:
            sections += kl_sections(ctx, base, ref)
        variant, more = variant_section(ctx, runs)
        sections.append(variant)
        missing += more
        summary = (f"{len(runs)} kl_dynamics runs: KL over training for β "
                   f"{tables.values_text(base['beta'])}, collapse below {ctx.threshold:g} nats, "
                   f"active units for latent_dim {tables.values_text(base['latent_dim'])}.")
    rd, more = rd_section(ctx)
    sections.append(rd)
    missing += more
    if not runs.empty and not base.empty:
        sections.append(elbo_section(ctx, base, ref))
    return Report("kl_dynamics", "KL dynamics: how the KL term behaves in training", summary,
                  tables.provenance(store, [STUDY, *SEARCH_STUDIES]), sections, missing)
