"""The loss-choice report's trained-model evidence: rate and distortion across β, error by
true pixel intensity, reconstructions and samples, linear probe and Fréchet distance, from the
finished `loss_choice` runs. Every sentence is generated from the numbers here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis import convergence, figures, stats, tables, verdicts
from analysis.blocks import Figure, Notice, Section, Table, Text, ci_text
from analysis.runs import RunStore

STUDY = "loss_choice"
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_optimal", "gaussian_learned",
               "continuous_bernoulli")
DISTORTIONS = [("test/sse", "SSE (summed over pixels)"), ("1-ssim", "1 − SSIM")]
QUALITY = [("test/probe_accuracy", "linear-probe accuracy"),
           ("test/frechet_distance", "sample Fréchet distance")]
ERR_BINS = 10
MID_BINS, EXTREME_BINS = range(2, 8), (0, ERR_BINS - 1)
CONVERGENCE_COLUMN = "convergence (settled / still moving / cannot tell)"


def reference_beta(betas) -> float:
    """The beta closest to 1 on a log scale (the plain ELBO when it was run)."""
    betas = sorted(set(float(b) for b in betas))
    return min(betas, key=lambda b: (abs(math.log(b)), b))


@dataclass
class Evidence:
    """What the trained-model sections share: the runs, their labels and the summary."""

    store: RunStore
    ui: str
    runs: pd.DataFrame
    """Finished runs with the derived metrics and `rate`."""
    datasets: list[str]
    names: list[str]
    """Dataset labels, in the order of `datasets`."""
    likelihoods: list[str]
    labelled: pd.DataFrame
    """`runs` with `dataset` replaced by its label."""
    distortions: list[tuple[str, str]]
    quality: list[tuple[str, str]]
    summary: pd.DataFrame


def evidence(store: RunStore, ui: str, runs: pd.DataFrame) -> Evidence:
    runs = verdicts.with_derived(runs)
    runs["rate"] = runs["test/kl"] if "test/kl" in runs else runs.get("val/kl")
    datasets = tables.ordered_datasets(runs["dataset"])
    liks = [lik for lik in LIKELIHOODS if lik in set(runs["likelihood"])] + sorted(
        set(runs["likelihood"]) - set(LIKELIHOODS))
    names = [tables.dataset_label(d) for d in datasets]
    labelled = runs.assign(dataset=runs["dataset"].map(tables.dataset_label))
    distortions = [(c, lab) for c, lab in DISTORTIONS if c in runs and runs[c].notna().any()]
    quality = [(c, lab) for c, lab in QUALITY if c in runs and runs[c].notna().any()]
    summary = summary_frame(labelled, [c for c, _ in distortions + quality])
    rank = {name: i for i, name in enumerate(names)}
    lrank = {lik: i for i, lik in enumerate(liks)}
    summary = summary.assign(_d=summary["dataset"].map(rank), _l=summary["likelihood"].map(lrank))
    summary = summary.sort_values(["_d", "_l", "beta"]).drop(columns=["_d", "_l"])
    flags = convergence.flags(labelled, ["dataset", "likelihood", "beta"])
    summary = summary.merge(flags[["dataset", "likelihood", "beta", "flag"]],
                            on=["dataset", "likelihood", "beta"], how="left")
    return Evidence(store, ui, runs, datasets, names, liks, labelled, distortions, quality,
                    summary)


def summary_frame(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per dataset x likelihood x beta: rate and every metric, mean and 95% t-interval."""
    keys = ["dataset", "likelihood", "beta"]
    out = stats.summarize(runs, keys, "rate").rename(
        columns={"mean": "rate_mean", "lo": "rate_lo", "hi": "rate_hi"})
    for m in metrics:
        s = stats.summarize(runs, keys, m).drop(columns="n").rename(
            columns={"mean": f"{m}_mean", "lo": f"{m}_lo", "hi": f"{m}_hi"})
        out = out.merge(s, on=keys, how="left")
    return out


def rate_distortion_section(ev: Evidence) -> Section:
    section = Section("Rate and distortion across β")
    if ev.distortions and ev.labelled["rate"].notna().any():
        section.blocks.append(Figure(
            "rate_distortion", "Rate-distortion curves across β, by likelihood",
            "Each point is a run (test split); lines join the means across seeds at each β, "
            "with 95% t-intervals in both rate and distortion. Distortions are "
            "likelihood-free, so curves of different likelihoods are comparable; a curve "
            "below and to the left is better.",
            figures.to_png(figures.rate_distortion(ev.labelled, ev.summary, ev.distortions,
                                                   ev.names, ev.likelihoods)),
            tables.links(ev.runs, ev.ui)))
    summary = ev.summary
    cols = {"dataset": "dataset", "likelihood": "likelihood", "beta": "β", "n": "seeds"}
    table = summary[list(cols)].rename(columns=cols)
    table["rate: test KL (nats)"] = [ci_text(*r) for r in
                                     summary[["rate_mean", "rate_lo", "rate_hi"]].values]
    for c, lab in ev.distortions + ev.quality:
        table[lab] = [ci_text(*r) for r in summary[[f"{c}_mean", f"{c}_lo", f"{c}_hi"]].values]
    table[CONVERGENCE_COLUMN] = summary["flag"].fillna(convergence.CANNOT_TELL).values
    section.blocks.append(Table.from_frame(table, "Means across seeds with 95% t-intervals "
                                           "[lo, hi] (scipy.stats.t); one seed: no interval. "
                                           "Last column: whether the cell's runs had settled"))
    section.blocks.extend(Text(t) for t in rd_sentences(summary, ev.datasets))
    section.blocks.extend(Text(t) for t in unsettled_sentences(summary))
    return section


def rd_sentences(summary: pd.DataFrame, datasets) -> list[str]:
    out = []
    for d in datasets:
        name = tables.dataset_label(d)
        sub = summary[summary["dataset"] == name].dropna(subset=["test/sse_mean"]) \
            if "test/sse_mean" in summary else pd.DataFrame()
        if sub.empty:
            continue
        ref = reference_beta(sub["beta"])
        at = sub[sub["beta"] == ref].sort_values("test/sse_mean")
        parts = [f"{r['likelihood']} {r['test/sse_mean']:.4g} at a rate of "
                 f"{r['rate_mean']:.3g} nats" for _, r in at.iterrows()]
        out.append(f"{name}, β = {ref:g}: test SSE per image (mean across seeds) — "
                   + "; ".join(parts) + ".")
    return out


def unsettled_sentences(summary: pd.DataFrame) -> list[str]:
    """Which cells of the table had not settled, or that all had."""
    flags = summary["flag"].fillna(convergence.CANNOT_TELL)
    if (flags == convergence.SETTLED).all():
        return ["Every cell of the table had settled (the thresholds are stated under “Design "
                "and budget”)."]
    moving = summary[flags.str.startswith(convergence.MOVING)]
    unknown = summary[flags.str.startswith(convergence.CANNOT_TELL)]
    out = []
    for cells, what in ((moving, "had not settled: their numbers may still change with longer "
                                 "training"),
                        (unknown, "cannot be told settled or not (runs of one epoch, or no "
                                  "converge/* metrics)")):
        if not cells.empty:
            names = ", ".join(f"{r['dataset']} {r['likelihood']} β = {r['beta']:g}"
                              for _, r in cells.iterrows())
            out.append(f"{len(cells)} of {len(summary)} cells {what}: {names}.")
    return out


def intensity_section(ev: Evidence) -> Section:
    section = Section("Error by true pixel intensity")
    bin_cols = [f"test/err_bin_{b:02d}" for b in range(ERR_BINS)]
    if not all(c in ev.runs for c in bin_cols):
        section.blocks.append(Notice("the runs logged no test/err_bin_XX metrics.",
                                     tables.make_command(STUDY)))
        return section
    runs, rows = ev.runs, []
    for d in ev.datasets:
        sub = runs[runs["dataset"] == d]
        ref = reference_beta(sub["beta"])
        for r in sub[sub["beta"] == ref].itertuples():
            for b, c in enumerate(bin_cols):
                v = runs.at[r.Index, c]
                if pd.notna(v):
                    rows.append({"dataset": tables.dataset_label(d), "d": d, "beta": ref,
                                 "likelihood": r.likelihood, "run_id": r.run_id,
                                 "intensity": (b + 0.5) / ERR_BINS, "bin": b, "mse": v})
    bins = pd.DataFrame(rows)
    used = runs[runs["run_id"].isin(bins["run_id"])]
    refs = ", ".join(f"{tables.dataset_label(d)}: β = "
                     f"{reference_beta(runs[runs.dataset == d].beta):g}" for d in ev.datasets)
    section.blocks.append(Figure(
        "error_by_intensity", "Reconstruction error by true pixel intensity",
        "Mean squared error of the mean reconstruction per pixel, for test pixels whose "
        f"true intensity falls in each bin of width 0.1, at the β closest to 1 ({refs}); "
        "mean across seeds with 95% t-intervals.",
        figures.to_png(figures.error_by_intensity(bins, ev.names, ev.likelihoods)),
        tables.links(used, ev.ui)))
    section.blocks.extend(Text(t) for t in intensity_sentences(bins, ev.datasets))
    return section


def intensity_sentences(bins: pd.DataFrame, datasets) -> list[str]:
    out = []
    for d in datasets:
        sub = bins[bins["d"] == d]
        if sub.empty:
            continue
        mid = sub[sub["bin"].isin(MID_BINS)].groupby("likelihood")["mse"].mean()
        ext = sub[sub["bin"].isin(EXTREME_BINS)].groupby("likelihood")["mse"].mean()
        order = mid.sort_values().index
        out.append(
            f"{tables.dataset_label(d)} (β = {sub['beta'].iloc[0]:g}): on mid-grey pixels "
            f"(true intensity 0.2–0.8) the mean squared error per pixel is "
            + ", ".join(f"{lik} {mid[lik]:.3g}" for lik in order)
            + "; on black or white pixels (< 0.1 or ≥ 0.9) it is "
            + ", ".join(f"{lik} {ext[lik]:.3g}" for lik in order if lik in ext) + ".")
    return out


def images_section(ev: Evidence) -> Section:
    section = Section("Reconstructions and samples")
    recons, samples, used = [], [], []
    for d in ev.datasets:
        sub = ev.runs[ev.runs["dataset"] == d]
        ref = reference_beta(sub["beta"])
        for lik in ev.likelihoods:
            pick = sub[(sub["likelihood"] == lik) & (sub["beta"] == ref)].sort_values("seed")
            if pick.empty:
                continue
            run = pick.iloc[0]
            recon = ev.store.artifact_png(run["run_id"], "recon")
            sample = ev.store.artifact_png(run["run_id"], "sample")
            if recon or sample:
                used.append(run)
            where = f"β = {ref:g}, seed {run['seed']:g}"
            recons.append((f"{tables.dataset_label(d)}\n{lik}\n{where}", "reconstructions", recon))
            samples.append((tables.dataset_label(d), f"{lik}\n{where}", sample))
    if not used:
        section.blocks.append(Notice("the runs logged no reconstruction or sample images.",
                                     tables.make_command(STUDY)))
        return section
    links = tables.links(pd.DataFrame(used), ev.ui)
    section.blocks.append(Figure(
        "reconstructions", "Reconstructions by likelihood",
        "The reconstruction-grid artifact of one run per dataset and likelihood (β closest "
        "to 1, lowest seed), as the run logged it: test images and their reconstructions.",
        figures.to_png(figures.image_grid(recons, ("original", "reconstruction"))), links))
    section.blocks.append(Figure(
        "samples", "Samples by likelihood, side by side",
        "The sample-grid artifact of the same runs: decoded means of z drawn from the "
        "prior N(0, I).", figures.to_png(figures.image_grid(samples)), links))
    return section


def quality_section(ev: Evidence) -> Section:
    section = Section("Linear probe and sample Fréchet distance")
    if not ev.quality:
        section.blocks.append(Notice("the runs logged no test/probe_accuracy or "
                                     "test/frechet_distance.", tables.make_command(STUDY)))
        return section
    section.blocks.append(Figure(
        "probe_frechet", "Representation and sample quality across β",
        "Linear-probe accuracy of a logistic regression on the encoder means (higher is "
        "better) and Fréchet distance between decoded prior samples and test images in a "
        "classifier's features (lower is better), as logged by the runs; means across "
        "seeds with 95% t-intervals.",
        figures.to_png(figures.metric_by_beta(ev.labelled, ev.quality, ev.names,
                                              ev.likelihoods)),
        tables.links(ev.runs, ev.ui)))
    section.blocks.extend(Text(t) for t in quality_sentences(ev.summary, ev.quality,
                                                             ev.datasets))
    runs = ev.runs
    if "test/classifier_accuracy" in runs and "test/frechet_distance" in runs:
        acc = runs.groupby("dataset")["test/classifier_accuracy"].mean().dropna()
        section.blocks.append(Text(
            "The Fréchet distance is measured in the features of a small CNN classifier "
            "trained on each dataset; its own test accuracy is "
            + ", ".join(f"{a:.4f} on {tables.dataset_label(d)}" for d, a in acc.items())
            + "."))
    return section


def quality_sentences(summary: pd.DataFrame, metrics, datasets) -> list[str]:
    out = []
    for d in datasets:
        name = tables.dataset_label(d)
        sub = summary[summary["dataset"] == name]
        if sub.empty:
            continue
        at = sub[sub["beta"] == reference_beta(sub["beta"])]
        for col, label in metrics:
            vals = at.dropna(subset=[f"{col}_mean"])
            if vals.empty:
                continue
            best = vals.sort_values(f"{col}_mean", ascending="accuracy" not in col).iloc[0]
            out.append(
                f"{name}, β = {at['beta'].iloc[0]:g}, {label}: "
                + "; ".join(
                    f"{r['likelihood']} "
                    f"{ci_text(r[f'{col}_mean'], r[f'{col}_lo'], r[f'{col}_hi'], 4)}"
                    for _, r in vals.iterrows())
                + f" (best: {best['likelihood']}).")
    return out
