"""The loss-choice report's background and data evidence: what the datasets themselves say
about the likelihoods (pixel statistics, the entropy floor, per-pixel loss curves, the
loss-scale audit), with no training. Every sentence is generated from the numbers here."""

from __future__ import annotations

import pandas as pd

from analysis import evidence, figures, tables
from analysis.blocks import Figure, Markdown, Missing, Notice, Section, Table, Text

EVIDENCE_COMMAND = "make study STUDY=loss_choice"
"""A study's start logs the data evidence on its study run."""


def background(ctx) -> Section:
    """`ctx`: the report's Context (its evidence and render_md)."""
    if not ctx.evidence:
        text = ctx.render_md("loss_choice_background.md.j2", D="D", shape="unread")
        return Section("Background", [Markdown(text), Notice(
            "the loss-scale audit needs D, the pixels per image, from the data evidence.",
            EVIDENCE_COMMAND)])
    first = next(iter(ctx.evidence.pixels.values()))
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


def data_evidence(ctx) -> tuple[Section, list[Missing]]:
    section = Section("Data evidence (from the datasets, no training)")
    if not ctx.evidence:
        section.blocks.append(Notice(f"no data evidence: {ctx.data_problem}.", EVIDENCE_COMMAND))
        return section, [Missing("the data evidence", EVIDENCE_COMMAND)]
    section.blocks += pixel_blocks(ctx.evidence)
    section.blocks += loss_blocks(ctx.evidence)
    return section, []


def pixel_blocks(data: evidence.Evidence) -> list:
    """The histogram, the pixel-statistics table and what they say, per dataset."""
    ev = [data.pixels[d] for d in tables.DATASET_ORDER if d in data.pixels]
    hist = pd.concat([pd.DataFrame({
        "dataset": tables.dataset_label(e.dataset), "level": e.levels,
        "share": e.histogram / e.histogram.sum()}) for e in ev])
    blocks = [Figure(
        "pixel_histograms", "Pixel intensities of the training images",
        "Share of all training pixels at each grey level (log scale), official train split "
        f"(train + validation); the band marks mid-grey values {data.mid_grey[0]:g} < x < "
        f"{data.mid_grey[1]:g}.",
        figures.to_png(figures.pixel_histograms(hist, data.mid_grey)))]
    rows = [{
        "dataset": tables.dataset_label(e.dataset), "images": e.n_images, "D (pixels)": e.n_pixels,
        "mean intensity": e.mean, "mid-grey share (all pixels)": f"{100 * e.share_mid_grey:.1f}%",
        f"mid-grey share of ink (x > {data.mid_grey[0]:g})": f"{100 * e.share_mid_grey_of_ink:.1f}%",
        "BCE entropy floor (nats / image)": e.entropy_floor,
        "floor per pixel (nats)": e.entropy_floor / e.n_pixels,
    } for e in ev]
    blocks.append(Table.from_frame(pd.DataFrame(rows), "Pixel statistics and the entropy floor "
                                   "Σᵢ H(xᵢ), averaged over images"))
    for e in ev:
        name = tables.dataset_label(e.dataset)
        blocks.append(Text(
            f"{name}: {100 * e.share_mid_grey:.1f}% of all pixels are mid-grey, and "
            f"{100 * e.share_mid_grey_of_ink:.1f}% of the ink pixels (x > {data.mid_grey[0]:g}) are. "
            f"No decoder "
            f"can bring the summed BCE of {name} below {e.entropy_floor:.1f} nats per image "
            f"(its entropy floor): that much of every BCE “reconstruction loss” reported on "
            f"{name} is the grey values' entropy, not reconstruction error."))
    if len(ev) == 2:
        lo, hi = sorted(ev, key=lambda e: e.share_mid_grey_of_ink)
        blocks.append(Text(
            f"Treating pixels as binary is a closer approximation on "
            f"{tables.dataset_label(lo.dataset)} ({100 * lo.share_mid_grey_of_ink:.0f}% of ink "
            f"mid-grey) than on {tables.dataset_label(hi.dataset)} "
            f"({100 * hi.share_mid_grey_of_ink:.0f}%); the floor is "
            f"{hi.entropy_floor / lo.entropy_floor:.1f} times higher on the latter."))
    return blocks


def loss_blocks(data: evidence.Evidence) -> list:
    """The per-pixel loss curves and the cost of one error, with what they say."""
    curves = data.curves
    blocks = [Figure(
        "loss_curves", "Per-pixel losses against the prediction",
        "Top: BCE minus its minimum H(x) (nats) and the squared error (p − x)², for targets "
        f"x = {', '.join(f'{t:g}' for t in data.targets)}. Bottom: their gradients with "
        "respect to the prediction p (clipped to ±10). Computed with the study's Bernoulli "
        "and fixed-σ Gaussian likelihood objects and autograd.",
        figures.to_png(figures.loss_curves(curves)))]
    cost = data.cost
    blocks.append(Table.from_frame(cost.rename(columns={
        "target": "target x", "prediction": "prediction p", "entropy_floor": "H(x) floor (nats)",
        "bce_excess": "BCE − H(x) at p", "squared_error": "(p − x)² at p"}),
        f"The cost of predicting {data.error:g} away from the target, per pixel"))
    edge = cost[cost["target"].isin([0.0, 1.0])]["bce_excess"].mean()
    mid = cost[cost["target"] == 0.5]["bce_excess"].iloc[0]
    blocks.append(Text(
        f"For the same error of {data.error:g} the squared error is the same everywhere, but BCE charges "
        f"{edge:.3f} nats at a black or white target and {mid:.3f} at x = 0.5: "
        f"{edge / mid:.1f} times more. BCE spends its effort on the saturated pixels; its "
        f"gradient in p, (p − x) / (p(1 − p)), grows without bound near 0 and 1, while the "
        f"squared error's gradient 2(p − x) is the same at every intensity."))
    return blocks
