"""The KL-dynamics report's remedies: KL warm-up and free bits against constant β with the same
dataset, likelihood, β, latent_dim and seeds, and compared where collapse happens. The
warm-up's length is stated in epochs and in optimizer steps."""

from __future__ import annotations

import pandas as pd

from analysis import budgets, convergence, figures, stats, tables
from analysis.blocks import Figure, Missing, Notice, Section, Table, Text, ci_text

STUDY = "kl_dynamics"
CONSTANT = "constant β"
KEYS = ["dataset", "likelihood", "beta", "latent_dim"]
FINALS = (("val/kl", "final KL"), ("val/active_units", "active units"),
          ("val/recon", "final recon"), ("val/nelbo", "final −ELBO"))


def is_variant(runs: pd.DataFrame) -> pd.Series:
    warm = runs.get("beta_schedule", pd.Series("constant", index=runs.index)) != "constant"
    free = pd.to_numeric(runs.get("free_bits", pd.Series(0.0, index=runs.index))) > 0
    return warm | free


def variant_label(run) -> str:
    parts = []
    if run.get("beta_schedule", "constant") != "constant":
        unit = run.get("schedule_unit", "step")
        length = float(run.get("warmup", 0) or 0)
        parts.append(f"{run['beta_schedule']} warm-up over {length:g} {unit}"
                     f"{'s' if length != 1 else ''}")
    if float(run.get("free_bits", 0) or 0) > 0:
        parts.append(f"free bits λ = {run['free_bits']:g}")
    return " + ".join(parts) or CONSTANT


def warmup_text(run) -> str:
    """A warm-up's length in epochs and steps, from the run's warmup, schedule_unit,
    batch_size and training images."""
    per_epoch = budgets.steps_per_epoch(run)
    warmup = float(run.get("warmup", 0) or 0)
    if run.get("schedule_unit", "step") == "epoch":
        epochs, steps = warmup, warmup * per_epoch
    else:
        epochs, steps = warmup / per_epoch, warmup
    return (f"β rises linearly from 0 over {epochs:.3g} epoch{'s' if epochs != 1 else ''} = "
            f"{steps:,.0f} optimizer steps ({per_epoch:,} steps per epoch, "
            f"{budgets.budget_of(run).how()})")


def groups(runs: pd.DataFrame) -> list[pd.DataFrame]:
    """Per setting with a variant: its variant runs and the constant-β runs of the same
    setting and seeds, labelled by `variant` and `group`."""
    variants, base = runs[is_variant(runs)], runs[~is_variant(runs)]
    out = []
    for key, g in variants.groupby(KEYS):
        match = base
        for k, v in zip(KEYS, key, strict=True):
            match = match[match[k] == v]
        match = match[match["seed"].isin(g["seed"])]
        label = (f"{tables.dataset_label(key[0])}, {key[1]}, β = {key[2]:g}, "
                 f"latent_dim {key[3]:g}")
        both = pd.concat([match, g])
        out.append(both.assign(variant=[variant_label(r) for _, r in both.iterrows()],
                               group=label))
    return out


def missing_variants(runs: pd.DataFrame) -> list[Missing]:
    variants = runs[is_variant(runs)]
    has_warm = (variants.get("beta_schedule", pd.Series(dtype=str)) != "constant").any()
    has_free = (pd.to_numeric(variants.get("free_bits", pd.Series(dtype=float))) > 0).any()
    return [Missing(f"kl_dynamics has no finished run of {what}", tables.make_command(STUDY))
            for flag, what in ((has_warm, "a KL warm-up variant (beta_schedule=linear, "
                                          "warmup>0)"),
                               (has_free, "a free-bits variant (free_bits>0)")) if not flag]


def section(ctx, runs: pd.DataFrame, collapsed: pd.DataFrame) -> tuple[Section, list[Missing]]:
    """`collapsed`: the cells (dataset, beta, latent_dim) where collapse shows."""
    out = Section("KL warm-up and free bits")
    missing = missing_variants(runs)
    found = groups(runs)
    if not found:
        out.blocks.append(Notice("no warm-up or free-bits runs in kl_dynamics.",
                                 tables.make_command(STUDY)))
        return out, missing
    allruns = pd.concat(found)
    schedule = allruns.get("beta_schedule", pd.Series("constant", index=allruns.index))
    warm = allruns[schedule == "linear"]
    if not warm.empty:
        out.blocks.append(Text("The warm-up: " + warmup_text(warm.iloc[0]) + "."))
    h = ctx.store.history(allruns["run_id"], ["val/kl", "val/active_units", "val/recon"])
    h = h.merge(allruns[["run_id", "variant", "group"]], on="run_id")
    out.blocks.append(Figure(
        "warmup_free_bits", "KL warm-up and free bits against constant β",
        "Validation KL and active units after each epoch for each variant and the constant-β "
        "runs with the same dataset, likelihood, β, latent_dim and seeds; means across seeds "
        "with 95% t-intervals.",
        figures.to_png(figures.variants(h, [("val/kl", "validation KL (nats)"),
                                            ("val/active_units", "active units")])),
        tables.links(allruns, ctx.ui_url)))
    for both in found:
        out.blocks += [Text(t) for t in group_sentences(both)]
    out.blocks.append(Table.from_frame(final_table(found, collapsed), "Final values, means "
                                       "across seeds with 95% t-intervals"))
    out.blocks += [Text(t) for t in where_collapse(found, collapsed)]
    return out, missing


def group_sentences(both: pd.DataFrame) -> list[str]:
    const, out = both[both["variant"] == CONSTANT], []
    for variant, g in both[both["variant"] != CONSTANT].groupby("variant"):
        label = both["group"].iloc[0]
        if const.empty:
            out.append(f"{label}: {variant} has no constant-β run with the same setting and "
                       "seeds to compare with.")
            continue
        text = (f"{label}: with {variant} the final validation KL is {g['val/kl'].mean():.3g} "
                f"nats against {const['val/kl'].mean():.3g} with constant β; active units "
                f"{g['val/active_units'].mean():.3g} against "
                f"{const['val/active_units'].mean():.3g}; negative ELBO "
                f"{g['val/nelbo'].mean():.4g} against {const['val/nelbo'].mean():.4g} nats")
        status = convergence.cell_status(convergence.with_status(pd.concat([g, const]))
                                         [convergence.STATUS])
        if status != convergence.SETTLED:
            text += (f" (runs not all settled: {status}; these are the values at the end of "
                     f"training, not where longer training would leave them)")
        out.append(text + ".")
    return out


def _in(collapsed: pd.DataFrame, run) -> bool:
    return bool(((collapsed["dataset"] == run["dataset"]) & (collapsed["beta"] == run["beta"])
                 & (collapsed["latent_dim"] == run["latent_dim"])).any())


def final_table(found: list[pd.DataFrame], collapsed: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for both in found:
        for variant, g in both.groupby("variant", sort=False):
            row = {"setting": g["group"].iloc[0], "variant": variant, "seeds": len(g),
                   "collapse with constant β": "yes" if _in(collapsed, g.iloc[0]) else "no"}
            for col, label in FINALS:
                m = stats.mean_ci(g[col]) if col in g else stats.mean_ci([])
                row[label] = ci_text(m["mean"], m["lo"], m["hi"], 4)
            row["convergence (settled / still moving / cannot tell)"] = convergence.cell_text(g)
            rows.append(row)
    return pd.DataFrame(rows)


def where_collapse(found: list[pd.DataFrame], collapsed: pd.DataFrame) -> list[str]:
    """The remedies compared in the cells where collapse happens, or why they cannot be."""
    if collapsed.empty:
        return ["Collapse does not show in any cell (see “Collapse at the largest β and "
                "latent_dim”), so the remedies cannot be compared where it happens."]
    out = []
    for both in found:
        if not _in(collapsed, both.iloc[0]):
            continue
        const = both[both["variant"] == CONSTANT]
        if const.empty:
            continue
        base = const["val/active_units"].mean()
        parts = []
        for variant, g in both[both["variant"] != CONSTANT].groupby("variant"):
            parts.append(f"{variant}: {g['val/active_units'].mean():.3g} active units "
                         f"({g['val/active_units'].mean() - base:+.3g}), KL "
                         f"{g['val/kl'].mean():.3g} ({g['val/kl'].mean() - const['val/kl'].mean():+.3g}"
                         f" nats), −ELBO {g['val/nelbo'].mean():.4g} "
                         f"({g['val/nelbo'].mean() - const['val/nelbo'].mean():+.3g} nats)")
        out.append(f"Where collapse happens ({both['group'].iloc[0]}: {base:.3g} active units "
                   f"with constant β): " + "; ".join(parts) + ".")
    return out or ["No warm-up or free-bits run shares a setting with a cell where collapse "
                   "shows, so the remedies cannot be compared where it happens."]
