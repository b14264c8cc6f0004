"""σ over training for the Gaussians whose σ is not fixed: the σ-VAE's calibrated σ (set in
closed form to the batch MSE) and the σ learned by Adam. A figure of `likelihood/sigma` per
epoch and generated sentences: the final σ, whether it had settled, and the β of plain SSE
it amounts to."""

from __future__ import annotations

import math

import pandas as pd

from analysis import convergence, figures, tables
from analysis.blocks import Figure, Notice, Section, Text
from analysis.runs import RunStore
from analysis.verdicts import LIKELIHOOD_LABELS

SIGMA_LIKELIHOODS = ("gaussian_optimal", "gaussian_learned")
KEY = "likelihood/sigma"


def section(store: RunStore, runs: pd.DataFrame, ui: str, study: str) -> Section:
    out = Section("σ over training")
    sub = runs[runs["likelihood"].isin(SIGMA_LIKELIHOODS)]
    if sub.empty:
        out.blocks.append(Notice("no finished runs of gaussian_optimal (σ-VAE) or "
                                 "gaussian_learned: no σ to show.", tables.make_command(study)))
        return out
    hist = store.history(sub["run_id"], [KEY])
    hist = hist.merge(sub[["run_id", "dataset", "likelihood", "beta", "seed"]], on="run_id")
    datasets = tables.ordered_datasets(sub["dataset"])
    names = [tables.dataset_label(d) for d in datasets]
    if not hist.empty:
        shown = hist.assign(dataset=hist["dataset"].map(tables.dataset_label),
                            likelihood=hist["likelihood"].map(LIKELIHOOD_LABELS))
        out.blocks.append(Figure(
            "sigma_over_training", "σ of the calibrated and the learned Gaussian over training",
            "The shared σ after each epoch (`likelihood/sigma`), on a 0–1 pixel scale: the "
            "σ-VAE's calibrated σ (σ² = the epoch's training MSE, in closed form) and the σ "
            "learned by Adam; one panel per dataset (columns) and β (rows), mean across seeds "
            "with 95% t-intervals, log scale.",
            figures.to_png(figures.sigma_over_training(shown, names, {
                LIKELIHOOD_LABELS[lik]: c
                for lik, c in figures.palette(SIGMA_LIKELIHOODS).items()})),
            tables.links(sub, ui)))
    for d in datasets:
        for lik in SIGMA_LIKELIHOODS:
            for beta, cell in sub[(sub["dataset"] == d) & (sub["likelihood"] == lik)] \
                    .groupby("beta"):
                out.blocks.append(Text(cell_sentence(cell, d, lik, beta)))
    return out


def cell_sentence(cell: pd.DataFrame, dataset: str, likelihood: str, beta: float) -> str:
    """The final σ of one cell, the plain-SSE β it amounts to, and whether it had settled."""
    name = f"{tables.dataset_label(dataset)}, {LIKELIHOOD_LABELS[likelihood]}, β = {beta:g}"
    sigma = cell[KEY].mean() if KEY in cell else math.nan
    epochs = int(cell["epochs"].max()) if "epochs" in cell else 0
    if not math.isfinite(sigma):
        return f"{name}: the runs logged no final σ."
    text = (f"{name}: σ = {sigma:.3g} after epoch {epochs} (mean across {len(cell)} "
            f"seed{'s' if len(cell) != 1 else ''}; at that σ, σ² = {sigma**2:.3g}, the loss "
            f"trades SSE for KL as plain SSE with β = 2σ²β = {2 * sigma**2 * beta:.3g} does). ")
    return text + settled_text(cell)


def settled_text(cell: pd.DataFrame) -> str:
    judged = [convergence.sigma_convergence(r) for _, r in cell.iterrows()]
    changes = [float(r[convergence.SIGMA]) for _, r in cell.iterrows()
               if convergence.SIGMA in r and pd.notna(r[convergence.SIGMA])]
    n = len(cell)
    if not changes:
        return ("Whether σ had settled cannot be told: runs of one epoch have no trend to read."
                if (cell.get("epochs", pd.Series([0])) == 1).all() else
                "Whether σ had settled cannot be told: the runs logged no converge/* metrics.")
    moving = [j for j in judged if j is not None and j.status == convergence.MOVING]
    lo, hi = f"{min(changes):+.3f}", f"{max(changes):+.3f}"
    span = lo if lo == hi else f"{lo} to {hi}"
    if not moving and len(changes) == n:
        return (f"σ had settled: log σ moved by {span} over the last tenth of epochs "
                f"(threshold ±{convergence.LOG_SIGMA_SETTLED:g}) in every run.")
    if not moving:
        return (f"σ had settled in the {len(changes)} of {n} runs that could tell "
                f"(log σ moved by {span} over their last tenth of epochs).")
    return (f"σ had not settled: log σ still moved by {span} over the last tenth of epochs, "
            f"beyond ±{convergence.LOG_SIGMA_SETTLED:g} in {len(moving)} of {n} runs, so "
            f"longer training would leave it elsewhere.")
