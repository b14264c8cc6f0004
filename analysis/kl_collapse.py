"""The KL-dynamics report's collapse sections: per-dimension KL and collapsed dimensions, active
units against latent_dim, and collapse at the largest β and latent_dim. No sentence reads a
trend into runs that had not settled: for those it says what cannot be told."""

from __future__ import annotations

import pandas as pd

from analysis import convergence, figures, stats, tables
from analysis.blocks import Figure, Section, Table, Text, ci_text

SATURATION_TOLERANCE = 1.0
"""Active units saturate at the smallest latent_dim within this many units of the maximum."""
COLLAPSE_MARGIN = 1.0
"""A cell shows collapse when its mean active units (across seeds) are at least this many
below latent_dim: one whole unit, so rounding and a single borderline unit do not count."""
COLLAPSE_RULE = (
    f"The rule: a cell shows collapse when its mean number of active units across seeds is at "
    f"least {COLLAPSE_MARGIN:g} below latent_dim. In plain words: the model was given latent_dim "
    "dimensions to describe each image, and collapse means it left at least one of them unused "
    "on average. How many it leaves unused tells how much of the latent space the KL term has "
    "switched off.")
STATUS_COLUMN = "convergence (settled / still moving / cannot tell)"


def collapse(kl: pd.DataFrame, threshold: float) -> tuple[int, int | None]:
    """kl: dims x epochs. (dims below `threshold` after the last epoch, the first epoch
    after which at least that many were below it; None when none collapsed)."""
    counts = (kl < threshold).sum()
    final = int(counts.iloc[-1])
    if final == 0:
        return 0, None
    return final, int(counts.index[(counts >= final).values.argmax()])


def finals(base: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per run: dataset, beta, latent_dim, collapsed dims, their share, active units, status."""
    dim_cols = tables.kl_dim_columns(base)
    rows = []
    for _, r in base.iterrows():
        vals = r[dim_cols].dropna().astype(float)
        rows.append({"dataset": r["dataset"], "beta": r["beta"],
                     "latent_dim": int(r["latent_dim"]), "run_id": r["run_id"],
                     "collapsed": int((vals < threshold).sum()),
                     "collapsed_share": float((vals < threshold).mean()) if len(vals) else 0.0,
                     "active": r.get("val/active_units", float("nan")),
                     "status": convergence.run_convergence(r).status})
    return pd.DataFrame(rows, columns=["dataset", "beta", "latent_dim", "run_id", "collapsed",
                                       "collapsed_share", "active", "status"])


def cannot_tell(run) -> str:
    """The caveat for a run that had not settled, or '' for a settled one."""
    judged = convergence.run_convergence(run)
    if judged.status == convergence.SETTLED:
        return ""
    return (f"; the run had not settled ({judged.status}: {judged.reason}), so whether more "
            f"dimensions collapse with longer training cannot be told")


def heatmap_blocks(ctx, at_ref: pd.DataFrame, datasets) -> list:
    """One run per dataset and β: its per-dimension KL over training, and what collapsed."""
    dim_cols = tables.kl_dim_columns(at_ref)
    mats, used, sentences = [], [], []
    for d in datasets:
        n = tables.dataset_label(d)
        for beta, g in at_ref[at_ref["dataset"] == d].groupby("beta"):
            run = g.sort_values("seed").iloc[0]
            h = ctx.store.history([run["run_id"]], [c for c in dim_cols if pd.notna(run.get(c))])
            if h.empty:
                continue
            mat = h.pivot_table(index="key", columns="step", values="value")
            mat = mat.loc[mat.iloc[:, -1].sort_values(ascending=False).index]
            mat.index = [k.rsplit("_", 1)[-1] for k in mat.index]
            mats.append((n, tables.beta_label(beta), mat))
            used.append(run)
            final, by = collapse(mat, ctx.threshold)
            head = f"{n}, β = {beta:g} (seed {run['seed']:g}): "
            if final:
                sentences.append(
                    f"{head}{final} of {len(mat)} dimensions had collapsed (KL < "
                    f"{ctx.threshold:g} nats) by epoch {by} of {int(mat.columns[-1])}"
                    f"{cannot_tell(run)}.")
            else:
                sentences.append(
                    f"{head}none of the {len(mat)} dimensions had collapsed by epoch "
                    f"{int(mat.columns[-1])} (every final KL ≥ {ctx.threshold:g} nats; the "
                    f"smallest is {mat.iloc[:, -1].min():.3g}){cannot_tell(run)}.")
    if not mats:
        return []
    return [Figure(
        "kl_heatmaps", "Per-dimension KL over training",
        f"Validation KL of each latent dimension (rows, sorted by final KL) after each "
        f"epoch, log colour scale; values below {ctx.threshold:g} nats (collapsed) are "
        f"dark. One run per dataset and β (lowest seed, latent_dim as above).",
        figures.to_png(figures.kl_heatmaps(mats, ctx.threshold)),
        tables.links(pd.DataFrame(used), ctx.ui_url)), *[Text(s) for s in sentences]]


def per_dimension_section(ctx, base, at_ref, datasets, fin: pd.DataFrame) -> Section:
    section = Section("Per-dimension KL and collapsed dimensions",
                      heatmap_blocks(ctx, at_ref, datasets))
    if fin.empty or not tables.kl_dim_columns(base):
        return section
    names = [tables.dataset_label(d) for d in datasets]
    if not fin["collapsed"].any():
        unsettled = int((fin["status"] != convergence.SETTLED).sum())
        text = (f"No run has a collapsed dimension (final KL < {ctx.threshold:g} nats) at the "
                f"end of its training")
        text += (f"; {unsettled} of {len(fin)} runs had not settled, so whether dimensions "
                 f"collapse with longer training cannot be told from them." if unsettled else ".")
        section.blocks.append(Text(text))
    else:
        shown = fin.assign(dataset=fin["dataset"].map(tables.dataset_label))
        section.blocks.append(Figure(
            "collapsed_share", "Share of collapsed dimensions at the end of training",
            f"Share of latent dimensions with final validation KL < {ctx.threshold:g} nats, by "
            "β and latent_dim; mean across seeds with 95% t-intervals.",
            figures.to_png(figures.collapsed_share(shown, names)),
            tables.links(base, ctx.ui_url)))
    section.blocks.append(Table.from_frame(collapse_table(fin), "Final collapsed dimensions "
                          f"(KL < {ctx.threshold:g} nats) and active units"))
    return section


def collapse_table(fin: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (d, beta, z), g in fin.groupby(["dataset", "beta", "latent_dim"]):
        c, a = stats.mean_ci(g["collapsed"]), stats.mean_ci(g["active"])
        rows.append({"dataset": tables.dataset_label(d), "β": beta, "latent_dim": z,
                     "seeds": len(g),
                     "collapsed dims [95% CI]": ci_text(c["mean"], c["lo"], c["hi"], 3),
                     "active units [95% CI]": ci_text(a["mean"], a["lo"], a["hi"], 3),
                     STATUS_COLUMN: status_text(g["status"])})
    return pd.DataFrame(rows)


def status_text(statuses: pd.Series) -> str:
    """A cell's flag from its runs' statuses."""
    status = convergence.cell_status(statuses)
    if status == convergence.SETTLED:
        return status
    return f"{status}: {int((statuses == status).sum())} of {len(statuses)} runs"


def active_units_section(ctx, at_ref: pd.DataFrame, base: pd.DataFrame, names,
                         fin: pd.DataFrame, hist: pd.DataFrame) -> Section:
    """`hist`: val/active_units per epoch of the runs at the reference latent_dim."""
    section = Section("Active units")
    shown = fin.dropna(subset=["active"]).assign(
        dataset=lambda f: f["dataset"].map(tables.dataset_label),
        beta_label=lambda f: f["beta"].map(tables.beta_label))
    if hist.empty and shown.empty:
        return section
    section.blocks.append(Figure(
        "active_units", "Active units over training and against latent_dim",
        "Left: active units (Cov_x E_q[z_u] > 0.01) on the validation split after each "
        "epoch, by β, at the reference latent_dim. Right: final active units against "
        "latent_dim; the dashed line is latent_dim itself (every unit active). Means across "
        "seeds with 95% t-intervals.",
        figures.to_png(figures.active_units(hist, shown, names)),
        tables.links(base, ctx.ui_url)))
    section.blocks.extend(Text(s) for s in saturation_sentences(fin))
    return section


def saturation_sentences(fin: pd.DataFrame) -> list[str]:
    out = []
    for (d, beta), g in fin.dropna(subset=["active"]).groupby(["dataset", "beta"]):
        means = g.groupby("latent_dim")["active"].mean().sort_index()
        name = tables.dataset_label(d)
        pairs = ", ".join(f"{m:.3g} at {int(z)}" for z, m in means.items())
        if len(means) < 2:
            out.append(f"{name}, β = {beta:g}: {pairs} active units; one latent_dim only, so "
                       "saturation cannot be read.")
            continue
        head = f"{name}, β = {beta:g}: final active units {pairs} (mean across seeds, by " \
               f"latent_dim)"
        unsettled = sorted(int(z) for z, s in g.groupby("latent_dim")["status"]
                           if convergence.cell_status(s) != convergence.SETTLED)
        if unsettled:
            out.append(f"{head}; the runs at latent_dim {', '.join(map(str, unsettled))} had "
                       f"not settled, so whether active units saturate or keep rising with "
                       f"latent_dim cannot be told.")
            continue
        top = means.max()
        sat = int(means.index[(means >= top - SATURATION_TOLERANCE).values.argmax()])
        rising = sat == means.index[-1] and means.iloc[-1] - means.iloc[-2] > SATURATION_TOLERANCE
        tail = (f"still rising at the largest latent_dim ({int(means.index[-1])})" if rising else
                f"saturating from latent_dim = {sat} (within {SATURATION_TOLERANCE:g} unit of "
                f"the maximum, {top:.3g})")
        out.append(f"{head}; {tail}.")
    return out


def collapse_cells(fin: pd.DataFrame) -> pd.DataFrame:
    """Per dataset at the largest β and the largest latent_dim of the constant-β runs: active
    units (mean, interval), whether collapse shows, and the cell's convergence."""
    rows = []
    for d, sub in fin.dropna(subset=["active"]).groupby("dataset"):
        beta, z = sub["beta"].max(), sub["latent_dim"].max()
        g = sub[(sub["beta"] == beta) & (sub["latent_dim"] == z)]
        if g.empty:
            continue
        a = stats.mean_ci(g["active"])
        rows.append({"dataset": d, "beta": beta, "latent_dim": z, "seeds": len(g),
                     "active": a["mean"], "lo": a["lo"], "hi": a["hi"],
                     "collapse": a["mean"] <= z - COLLAPSE_MARGIN,
                     "flag": status_text(g["status"])})
    return pd.DataFrame(rows, columns=["dataset", "beta", "latent_dim", "seeds", "active", "lo",
                                       "hi", "collapse", "flag"])


def largest_section(cells: pd.DataFrame) -> Section:
    """Collapse at the largest β and latent_dim, per dataset, said plainly."""
    section = Section("Collapse at the largest β and latent_dim")
    if cells.empty:
        return section
    table = pd.DataFrame({
        "dataset": cells["dataset"].map(tables.dataset_label), "β": cells["beta"],
        "latent_dim": cells["latent_dim"], "seeds": cells["seeds"],
        "active units [95% CI]": [ci_text(r.active, r.lo, r.hi, 3) for r in cells.itertuples()],
        "share active": [f"{100 * r.active / r.latent_dim:.0f}%" for r in cells.itertuples()],
        "collapse": ["yes" if c else "no" for c in cells["collapse"]],
        STATUS_COLUMN: cells["flag"]})
    section.blocks.append(Table.from_frame(table, "Active units of the constant-β runs at the "
                                                  "largest β and latent_dim"))
    for r in cells.itertuples():
        head = (f"{tables.dataset_label(r.dataset)}, β = {r.beta:g}, latent_dim {r.latent_dim}: "
                f"{ci_text(r.active, r.lo, r.hi, 3)} of {r.latent_dim} units active "
                f"({100 * r.active / r.latent_dim:.0f}%, "
                + (f"mean across {r.seeds} seeds)" if r.seeds > 1 else "one seed)"))
        settled = r.flag == convergence.SETTLED
        if r.collapse:
            text = (f"{head}: collapse, {r.latent_dim - r.active:.3g} units on average carry no "
                    f"information at the end of training")
            text += "." if settled else (f"; the runs had not settled ({r.flag}), so more or "
                                         f"fewer units may be active after longer training.")
        else:
            text = f"{head}: no more than {COLLAPSE_MARGIN:g} unit inactive at the end of training"
            text += (", in settled runs." if settled else
                     f"; the runs had not settled ({r.flag}), so whether collapse appears with "
                     f"longer training cannot be told.")
        section.blocks.append(Text(text))
    section.blocks.append(Text(COLLAPSE_RULE))
    return section


def headline(cells: pd.DataFrame) -> str:
    """One sentence for the summary: active units at the largest β and latent_dim."""
    if cells.empty:
        return ""
    parts = [f"{tables.dataset_label(r.dataset)} at β = {r.beta:g}, latent_dim {r.latent_dim}: "
             f"{r.active:.3g} of {r.latent_dim} units active "
             f"({'collapse' if r.collapse else 'no collapse'}"
             f"{'' if r.flag == convergence.SETTLED else ', runs not settled'})"
             for r in cells.itertuples()]
    return "Largest β and latent_dim: " + "; ".join(parts) + "."
