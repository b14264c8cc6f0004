"""The loss-choice report: background, data evidence from the datasets, trained-model
evidence from the `loss_choice` study, and a verdict per dataset computed by stated rules.
Every sentence about results is generated from the numbers here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from analysis import evidence, figures, stats, tables, verdicts
from analysis.blocks import (
    Bullets,
    Figure,
    Markdown,
    Missing,
    Notice,
    Report,
    Section,
    Table,
    Text,
    ci_text,
)
from analysis.runs import RunStore

STUDY = "loss_choice"
DATASETS = tables.DATASET_ORDER
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "continuous_bernoulli")
MIN_SEEDS, MIN_BETAS, MIN_DECADES = 3, 4, 2
"""The design of the study: >= 4 betas over >= 2 decades, >= 3 seeds per cell."""
DISTORTIONS = [("test/sse", "SSE (summed over pixels)"), ("1-ssim", "1 − SSIM")]
QUALITY = [("test/probe_accuracy", "linear-probe accuracy"),
           ("test/frechet_distance", "sample Fréchet distance")]
ERR_BINS = 10
MID_BINS, EXTREME_BINS = range(2, 8), (0, ERR_BINS - 1)


@dataclass
class Context:
    store: RunStore | None
    ui_url: str
    evidence: dict[str, evidence.PixelEvidence] = field(default_factory=dict)
    data_problem: str | None = None
    render_md: Callable[..., str] | None = None
    """Callable(template name, **values) -> Markdown text of a background template."""


def reference_beta(betas) -> float:
    """The beta closest to 1 on a log scale (the plain ELBO when it was run)."""
    betas = sorted(set(float(b) for b in betas))
    return min(betas, key=lambda b: (abs(math.log(b)), b))


def _labels(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["dataset_name"] = out["dataset"].map(tables.dataset_label)
    return out


# --------------------------------------------------------------------------- sections


def background(ctx: Context) -> Section:
    if not ctx.evidence:
        text = ctx.render_md("loss_choice_background.md.j2", D="D", shape="unread")
        return Section("Background", [Markdown(text), Notice(
            "the loss-scale audit needs D, the pixels per image, from the data.", "make data")])
    first = next(iter(ctx.evidence.values()))
    d, shape = first.n_pixels, "×".join(str(s) for s in first.image_shape)
    blocks = [Markdown(ctx.render_md("loss_choice_background.md.j2", D=d, shape=shape))]
    audit = evidence.loss_scale_audit(d)
    blocks.append(Table.from_frame(audit, caption=f"Loss-scale audit for D = {d}"))
    mse = audit.iloc[1]
    blocks.append(Text(
        f"Averaging the squared error over the {d} pixels while summing the KL is a "
        f"Gaussian with σ² = {mse['implied σ² (at β = 1)']} (σ = {mse['implied σ']} on a 0–1 "
        f"pixel scale), or equivalently plain SSE with β = {mse['effective β']}: relative to "
        f"the reconstruction, the KL term weighs {mse['effective β']} times more than in the "
        f"ELBO of a Gaussian with σ² = ½. Averaging BCE over pixels does the same to the "
        f"Bernoulli ELBO."))
    return Section("Background", blocks)


def data_evidence(ctx: Context) -> tuple[Section, list[Missing]]:
    section = Section("Data evidence (from the datasets, no training)")
    if not ctx.evidence:
        section.blocks.append(Notice(f"the datasets could not be read ({ctx.data_problem}).",
                                     "make data"))
        return section, [Missing("the datasets (data evidence)", "make data")]
    ev = list(ctx.evidence.values())
    hist = pd.concat([pd.DataFrame({
        "dataset": tables.dataset_label(e.dataset), "level": e.levels,
        "share": e.histogram / e.histogram.sum()}) for e in ev])
    section.blocks.append(Figure(
        "pixel_histograms", "Pixel intensities of the training images",
        "Share of all training pixels at each grey level (log scale), official train split "
        "(train + validation); the band marks mid-grey values 0.1 < x < 0.9.",
        figures.to_png(figures.pixel_histograms(hist, evidence.MID_GREY))))
    rows = [{
        "dataset": tables.dataset_label(e.dataset), "images": e.n_images, "D (pixels)": e.n_pixels,
        "mean intensity": e.mean, "mid-grey share (all pixels)": f"{100 * e.share_mid_grey:.1f}%",
        "mid-grey share of ink (x > 0.1)": f"{100 * e.share_mid_grey_of_ink:.1f}%",
        "BCE entropy floor (nats / image)": e.entropy_floor,
        "floor per pixel (nats)": e.entropy_floor / e.n_pixels,
    } for e in ev]
    section.blocks.append(Table.from_frame(pd.DataFrame(rows), "Pixel statistics and the "
                                           "entropy floor Σᵢ H(xᵢ), averaged over images"))
    for e in ev:
        name = tables.dataset_label(e.dataset)
        section.blocks.append(Text(
            f"{name}: {100 * e.share_mid_grey:.1f}% of all pixels are mid-grey, and "
            f"{100 * e.share_mid_grey_of_ink:.1f}% of the ink pixels (x > 0.1) are. No decoder "
            f"can bring the summed BCE of {name} below {e.entropy_floor:.1f} nats per image "
            f"(its entropy floor): that much of every BCE “reconstruction loss” reported on "
            f"{name} is the grey values' entropy, not reconstruction error."))
    if len(ev) == 2:
        lo, hi = sorted(ev, key=lambda e: e.share_mid_grey_of_ink)
        section.blocks.append(Text(
            f"Treating pixels as binary is a closer approximation on "
            f"{tables.dataset_label(lo.dataset)} ({100 * lo.share_mid_grey_of_ink:.0f}% of ink "
            f"mid-grey) than on {tables.dataset_label(hi.dataset)} "
            f"({100 * hi.share_mid_grey_of_ink:.0f}%); the floor is "
            f"{hi.entropy_floor / lo.entropy_floor:.1f} times higher on the latter."))
    curves = evidence.loss_curves()
    section.blocks.append(Figure(
        "loss_curves", "Per-pixel losses against the prediction",
        "Top: BCE minus its minimum H(x) (nats) and the squared error (p − x)², for targets "
        f"x = {', '.join(f'{t:g}' for t in evidence.TARGETS)}. Bottom: their gradients with "
        "respect to the prediction p (clipped to ±10). Computed with the study's Bernoulli "
        "and fixed-σ Gaussian likelihood objects and autograd.",
        figures.to_png(figures.loss_curves(curves))))
    cost = evidence.cost_of_an_error()
    section.blocks.append(Table.from_frame(cost.rename(columns={
        "target": "target x", "prediction": "prediction p", "entropy_floor": "H(x) floor (nats)",
        "bce_excess": "BCE − H(x) at p", "squared_error": "(p − x)² at p"}),
        "The cost of predicting 0.1 away from the target, per pixel"))
    edge = cost[cost["target"].isin([0.0, 1.0])]["bce_excess"].mean()
    mid = cost[cost["target"] == 0.5]["bce_excess"].iloc[0]
    section.blocks.append(Text(
        f"For the same error of 0.1 the squared error is the same everywhere, but BCE charges "
        f"{edge:.3f} nats at a black or white target and {mid:.3f} at x = 0.5: "
        f"{edge / mid:.1f} times more. BCE spends its effort on the saturated pixels; its "
        f"gradient in p, (p − x) / (p(1 − p)), grows without bound near 0 and 1, while the "
        f"squared error's gradient 2(p − x) is the same at every intensity."))
    return section, []


def design(runs: pd.DataFrame) -> tuple[list[Missing], list[str]]:
    """What the loss_choice runs cover, against the study's design."""
    missing, notes = [], []
    cmd = tables.make_command(STUDY)
    for d in DATASETS:
        for lik in LIKELIHOODS:
            cell = runs[(runs["dataset"] == d) & (runs["likelihood"] == lik)]
            name = f"{tables.dataset_label(d)} × {lik}"
            if cell.empty:
                missing.append(Missing(f"loss_choice has no finished runs for {name}", cmd))
                continue
            seeds, betas = cell["seed"].nunique(), sorted(cell["beta"].unique())
            decades = math.log10(max(betas) / min(betas))
            short = []
            if seeds < MIN_SEEDS:
                short.append(f"{seeds} seed(s) where the design asks for ≥ {MIN_SEEDS}")
            if len(betas) < MIN_BETAS or decades < MIN_DECADES - 1e-9:
                short.append(f"{len(betas)} β value(s) over {decades:.1f} decades where it "
                             f"asks for ≥ {MIN_BETAS} over ≥ {MIN_DECADES}")
            if short:
                missing.append(Missing(f"loss_choice {name} has {' and '.join(short)}", cmd))
    if not runs.empty:
        notes.append(
            f"{len(runs)} finished runs: datasets {tables.values_text(runs['dataset'])}; "
            f"likelihoods {tables.values_text(runs['likelihood'])}; β "
            f"{tables.values_text(runs['beta'])}; seeds {tables.values_text(runs['seed'])}; "
            f"latent_dim {tables.values_text(runs['latent_dim'])}; epochs "
            f"{tables.values_text(runs['epochs'])}.")
    return missing, notes


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


def trained_evidence(ctx: Context, runs: pd.DataFrame) -> list[Section]:
    store, ui = ctx.store, ctx.ui_url
    runs = verdicts.with_derived(runs)
    runs["rate"] = runs["test/kl"] if "test/kl" in runs else runs.get("val/kl")
    datasets = tables.ordered_datasets(runs["dataset"])
    liks = [lik for lik in LIKELIHOODS if lik in set(runs["likelihood"])] + sorted(
        set(runs["likelihood"]) - set(LIKELIHOODS))
    names = [tables.dataset_label(d) for d in datasets]
    labelled = _labels(runs).assign(dataset=lambda f: f["dataset_name"])
    sections = []

    # --- rate-distortion
    rd = Section("Rate and distortion across β")
    distortions = [(c, lab) for c, lab in DISTORTIONS if c in runs and runs[c].notna().any()]
    present_quality = [(c, lab) for c, lab in QUALITY if c in runs and runs[c].notna().any()]
    summary = summary_frame(labelled, [c for c, _ in distortions + present_quality])
    if distortions and labelled["rate"].notna().any():
        rd.blocks.append(Figure(
            "rate_distortion", "Rate-distortion curves across β, by likelihood",
            "Each point is a run (test split); lines join the means across seeds at each β, "
            "with 95% t-intervals in both rate and distortion. Distortions are "
            "likelihood-free, so curves of different likelihoods are comparable; a curve "
            "below and to the left is better.",
            figures.to_png(figures.rate_distortion(labelled, summary, distortions, names, liks)),
            tables.links(runs, ui)))
    rank = {name: i for i, name in enumerate(names)}
    lrank = {lik: i for i, lik in enumerate(liks)}
    summary = summary.assign(_d=summary["dataset"].map(rank), _l=summary["likelihood"].map(lrank))
    summary = summary.sort_values(["_d", "_l", "beta"]).drop(columns=["_d", "_l"])
    cols = {"dataset": "dataset", "likelihood": "likelihood", "beta": "β", "n": "seeds"}
    table = summary[list(cols)].rename(columns=cols)
    table["rate: test KL (nats)"] = [ci_text(*r) for r in
                                     summary[["rate_mean", "rate_lo", "rate_hi"]].values]
    for c, lab in distortions + present_quality:
        table[lab] = [ci_text(*r) for r in summary[[f"{c}_mean", f"{c}_lo", f"{c}_hi"]].values]
    rd.blocks.append(Table.from_frame(table, "Means across seeds with 95% t-intervals "
                                             "[lo, hi] (scipy.stats.t); one seed: no interval"))
    rd.blocks.extend(Text(t) for t in rd_sentences(summary, datasets))
    rd.blocks.extend(Text(t) for t in learned_sigma_sentences(runs, datasets))
    sections.append(rd)

    # --- error by intensity
    section = Section("Error by true pixel intensity")
    bin_cols = [f"test/err_bin_{b:02d}" for b in range(ERR_BINS)]
    if all(c in runs for c in bin_cols):
        rows = []
        for d in datasets:
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
        refs = ", ".join(f"{tables.dataset_label(d)}: β = {reference_beta(runs[runs.dataset == d].beta):g}"
                         for d in datasets)
        section.blocks.append(Figure(
            "error_by_intensity", "Reconstruction error by true pixel intensity",
            "Mean squared error of the mean reconstruction per pixel, for test pixels whose "
            "true intensity falls in each bin of width 0.1, at the β closest to 1 "
            f"({refs}); "
            "mean across seeds with 95% t-intervals.",
            figures.to_png(figures.error_by_intensity(bins, names, liks)),
            tables.links(used, ui)))
        section.blocks.extend(Text(t) for t in intensity_sentences(bins, datasets))
    else:
        section.blocks.append(Notice("the runs logged no test/err_bin_XX metrics.",
                                     tables.make_command(STUDY)))
    sections.append(section)

    # --- reconstructions and samples
    section = Section("Reconstructions and samples")
    recons, samples, used = [], [], []
    for d in datasets:
        sub = runs[runs["dataset"] == d]
        ref = reference_beta(sub["beta"])
        for lik in liks:
            pick = sub[(sub["likelihood"] == lik) & (sub["beta"] == ref)].sort_values("seed")
            if pick.empty:
                continue
            run = pick.iloc[0]
            recon = store.artifact_png(run["run_id"], "recon")
            sample = store.artifact_png(run["run_id"], "sample")
            if recon or sample:
                used.append(run)
            where = f"β = {ref:g}, seed {run['seed']:g}"
            recons.append((f"{tables.dataset_label(d)}\n{lik}\n{where}", "reconstructions", recon))
            samples.append((tables.dataset_label(d), f"{lik}\n{where}", sample))
    if used:
        links = tables.links(pd.DataFrame(used), ui)
        section.blocks.append(Figure(
            "reconstructions", "Reconstructions by likelihood",
            "The reconstruction-grid artifact of one run per dataset and likelihood (β closest "
            "to 1, lowest seed), as the run logged it: test images and their reconstructions.",
            figures.to_png(figures.image_grid(recons)), links))
        section.blocks.append(Figure(
            "samples", "Samples by likelihood, side by side",
            "The sample-grid artifact of the same runs: decoded means of z drawn from the "
            "prior N(0, I).", figures.to_png(figures.image_grid(samples)), links))
    else:
        section.blocks.append(Notice("the runs logged no reconstruction or sample images.",
                                     tables.make_command(STUDY)))
    sections.append(section)

    # --- probe and Frechet distance
    section = Section("Linear probe and sample Fréchet distance")
    if present_quality:
        section.blocks.append(Figure(
            "probe_frechet", "Representation and sample quality across β",
            "Linear-probe accuracy of a logistic regression on the encoder means (higher is "
            "better) and Fréchet distance between decoded prior samples and test images in a "
            "classifier's features (lower is better), as logged by the runs; means across "
            "seeds with 95% t-intervals.",
            figures.to_png(figures.metric_by_beta(labelled, present_quality, names, liks)),
            tables.links(runs, ui)))
        section.blocks.extend(Text(t) for t in quality_sentences(summary, present_quality,
                                                                 datasets))
        if "test/classifier_accuracy" in runs and "test/frechet_distance" in runs:
            acc = runs.groupby("dataset")["test/classifier_accuracy"].mean().dropna()
            section.blocks.append(Text(
                "The Fréchet distance is measured in the features of a small CNN classifier "
                "trained on each dataset; its own test accuracy is "
                + ", ".join(f"{a:.4f} on {tables.dataset_label(d)}" for d, a in acc.items())
                + "."))
    else:
        section.blocks.append(Notice("the runs logged no test/probe_accuracy or "
                                     "test/frechet_distance.", tables.make_command(STUDY)))
    sections.append(section)
    return sections


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


def learned_sigma_sentences(runs: pd.DataFrame, datasets) -> list[str]:
    """What the calibrated decoder learned: its sigma, and the beta of plain SSE it equals."""
    learned = runs[runs["likelihood"] == "gaussian_learned"]
    if learned.empty or "likelihood/sigma" not in learned:
        return []
    out = []
    for d in datasets:
        sub = learned[learned["dataset"] == d].dropna(subset=["likelihood/sigma"])
        if sub.empty:
            continue
        parts = []
        for beta, g in sub.groupby("beta"):
            sigma = g["likelihood/sigma"].mean()
            parts.append(f"β = {beta:g}: σ = {sigma:.3g} (σ² = {sigma**2:.3g}, plain-SSE β "
                         f"2σ²β = {2 * sigma**2 * beta:.3g})")
        out.append(f"{tables.dataset_label(d)}, Gaussian with learned σ, final σ (mean across "
                   f"seeds) — " + "; ".join(parts) + ". A fixed σ² = ½ would give plain-SSE β = β.")
    return out


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


def quality_sentences(summary: pd.DataFrame, metrics, datasets) -> list[str]:
    out = []
    for d in datasets:
        name = tables.dataset_label(d)
        sub = summary[summary["dataset"] == name]
        if sub.empty:
            continue
        ref = reference_beta(sub["beta"])
        at = sub[sub["beta"] == ref]
        for col, label in metrics:
            vals = at.dropna(subset=[f"{col}_mean"])
            if vals.empty:
                continue
            best = vals.sort_values(f"{col}_mean", ascending="accuracy" not in col).iloc[0]
            out.append(
                f"{name}, β = {ref:g}, {label}: "
                + "; ".join(
                    f"{r['likelihood']} "
                    f"{ci_text(r[f'{col}_mean'], r[f'{col}_lo'], r[f'{col}_hi'], 4)}"
                    for _, r in vals.iterrows())
                + f" (best: {best['likelihood']}).")
    return out


def verdict_section(runs: pd.DataFrame) -> tuple[Section, list[dict]]:
    """The rules, the generated verdicts and the paired comparisons behind them."""
    section = Section("Verdicts")
    section.blocks.append(Text("The verdicts follow from these rules, applied to the finished "
                               "loss_choice runs; the sentences below are generated from "
                               "their outcomes."))
    section.blocks.append(Bullets(verdicts.rules_text()))
    results = [verdicts.claim_verdict(runs, claim) for claim in verdicts.CLAIMS]
    rows = []
    for v in results:
        section.blocks.append(Text(" ".join(v.sentences())))
        rows.append({"dataset": tables.dataset_label(v.claim.dataset), "claim": v.claim.text,
                     "verdict": v.verdict, "as people write it": v.primary.verdict,
                     "with a calibrated σ": v.calibrated.verdict})
    section.blocks.append(Table.from_frame(pd.DataFrame(rows), "Verdicts"))
    detail = []
    for v in results:
        for comp in (v.primary, v.calibrated):
            if comp.absent:
                continue
            for o in comp.outcomes:
                r = o.result
                detail.append({
                    "dataset": tables.dataset_label(comp.dataset), "comparison": comp.label,
                    "metric": o.metric.label, "pairs": r.n,
                    "mean difference [95% CI]": ci_text(r.mean_diff, r.lo, r.hi),
                    "paired t p": verdicts.fmt_p(r.t_p),
                    "Wilcoxon p": verdicts.fmt_p(r.wilcoxon_p), "d_z": r.d_z,
                    "outcome": o.outcome})
    if detail:
        section.blocks.append(Table.from_frame(
            pd.DataFrame(detail), "Paired comparisons (difference = first − second likelihood; "
                                  "pairs share dataset, β, seed and latent_dim)", digits=3))
    return section, rows


def build(ctx: Context) -> tuple[Report, list[dict]]:
    """The report and its verdict rows (for the index)."""
    store = ctx.store
    sections = [background(ctx)]
    data_section, missing = data_evidence(ctx)
    sections.append(data_section)
    runs = store.finished(STUDY) if store is not None else pd.DataFrame()
    missing += tables.missing_studies(store, {STUDY: "the trained-model evidence and verdicts"})
    if runs.empty:
        sections.append(Section("Trained-model evidence", [Notice(
            "no finished runs of the loss_choice study.", tables.make_command(STUDY))]))
        verdict_rows = []
        summary = "No loss_choice runs yet: background and data evidence only."
    else:
        design_missing, notes = design(runs)
        missing += design_missing
        trained = trained_evidence(ctx, runs)
        trained[0].blocks[:0] = [Text(n) for n in notes]
        sections += trained
        section, verdict_rows = verdict_section(runs)
        sections.append(section)
        summary = " ".join(f"{r['dataset']}: “{r['claim']}” — {r['verdict']}." for r in verdict_rows)
    report = Report(
        "loss_choice", "Loss choice: which likelihood suits which data", summary,
        tables.provenance(store, [STUDY], extra=[("data evidence", ctx.data_problem or
                                                   "official train splits under the data root")]),
        sections, missing)
    return report, verdict_rows

