"""The loss-choice report: background, data evidence from the datasets, trained-model
evidence from the `loss_choice` study, σ over training, a verdict per claim (per β and
pooled) computed by stated rules, the verdicts at the default budget beside the long one, and
the budget ladder. Every sentence about results is generated from the numbers here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from analysis import budgets, convergence, evidence, ladder, sigma, tables
from analysis import loss_choice_data as data
from analysis import loss_choice_trained as trained
from analysis import loss_choice_verdicts as judged
from analysis.blocks import Missing, Notice, Report, Section, Text
from analysis.runs import RunStore

STUDY = trained.STUDY
DATASETS = tables.DATASET_ORDER
REQUIRED = ("bernoulli", "gaussian", "gaussian_optimal")
"""The likelihoods the claims compare: as people write them, and the σ-VAE's Gaussian."""
OPTIONAL = ("gaussian_learned", "continuous_bernoulli")
"""Rows shown when run (the continuous Bernoulli is in the full profile only)."""
MIN_SEEDS, MIN_BETAS = 3, 2
"""The design: >= 3 seeds per cell (an interval, and pairs for the verdicts at each β), >= 2
betas (a verdict per β, and a rate-distortion curve of two points)."""


@dataclass
class Context:
    store: RunStore | None
    """The runs this report is about (one profile when --profile is given)."""
    ui_url: str
    evidence: evidence.Evidence | None = None
    """The data evidence a study run logged (None: see data_problem)."""
    data_problem: str | None = None
    render_md: Callable[..., str] | None = None
    """Callable(template name, **values) -> Markdown text of a background template."""
    every_profile: RunStore | None = None
    """Every profile's runs in the store: the ladder and the default-versus-long table read
    the long runs even when the report is about the default ones. None: `store`."""

    @property
    def all_runs(self) -> RunStore | None:
        return self.every_profile if self.every_profile is not None else self.store


def design(runs: pd.DataFrame) -> tuple[list[Missing], list[str]]:
    """What the loss_choice runs cover, against the study's design."""
    missing, notes = [], []
    cmd = tables.make_command(STUDY)
    for d in DATASETS:
        for lik in (*REQUIRED, *OPTIONAL):
            cell = runs[(runs["dataset"] == d) & (runs["likelihood"] == lik)]
            name = f"{tables.dataset_label(d)} × {lik}"
            if cell.empty:
                if lik in REQUIRED:
                    missing.append(Missing(f"loss_choice has no finished runs for {name}", cmd))
                continue
            seeds, betas = cell["seed"].nunique(), cell["beta"].nunique()
            short = []
            if seeds < MIN_SEEDS:
                short.append(f"{seeds} seed(s) where the design asks for ≥ {MIN_SEEDS}")
            if betas < MIN_BETAS:
                short.append(f"{betas} β value(s) where it asks for ≥ {MIN_BETAS}")
            if short:
                missing.append(Missing(f"loss_choice {name} has {' and '.join(short)}", cmd))
    if runs.empty:
        return missing, notes
    absent = [lik for lik in OPTIONAL if lik not in set(runs["likelihood"])]
    notes.append(
        f"{len(runs)} finished runs: datasets {tables.values_text(runs['dataset'])}; "
        f"likelihoods {tables.values_text(runs['likelihood'])}; β "
        f"{tables.values_text(runs['beta'])}; seeds {tables.values_text(runs['seed'])}; "
        f"latent_dim {tables.values_text(runs['latent_dim'])}; epochs "
        f"{tables.values_text(runs['epochs'])}."
        + (f" Not run here: {', '.join(absent)} (optional rows)." if absent else ""))
    notes.append(beta_design_text(sorted(runs["beta"].unique())))
    return missing, notes


def beta_design_text(betas) -> str:
    """What the βs of the runs can and cannot tell."""
    values = ", ".join(f"{b:g}" for b in betas)
    if len(betas) < 2:
        return (f"One β ({values}): the verdicts stand at that β only; no rate-distortion curve "
                f"and no SSE at matched rate can be drawn.")
    text = (f"{len(betas)} βs ({values}): each verdict is computed at every β and pooled, so "
            f"the report can tell whether a claim holds at each β and which way β moves each "
            f"metric.")
    if len(betas) == 2:
        text += (" Two points cannot show the shape of a rate-distortion curve: the SSE at "
                 "matched rate interpolates a straight line between them, and nothing below "
                 f"β = {betas[0]:g} or above β = {betas[-1]:g} is measured.")
    return text


def design_section(ctx: Context, notes: list[str], runs: pd.DataFrame,
                   ladder_result) -> Section:
    """What the runs are, which profile, their budget and why, and the convergence rules."""
    section = Section("Design and budget", [Text(n) for n in notes])
    section.blocks.append(Text(budgets.profile_text(runs)))
    section.blocks.append(Text(ladder.budget_sentence(runs, ladder_result)))
    section.blocks.append(Text(convergence.rules_text(
        " Every table below has a column flagging its cells, and every verdict names the cells "
        "it rests on that had not settled.")))
    return section


def build(ctx: Context) -> tuple[Report, list[dict]]:
    """The report and its verdict rows (for the index)."""
    store, everything = ctx.store, ctx.all_runs
    sections = [data.background(ctx)]
    data_section, missing = data.data_evidence(ctx)
    sections.append(data_section)
    runs = store.finished(STUDY) if store is not None else pd.DataFrame()
    missing += tables.missing_studies(store, {STUDY: "the trained-model evidence and verdicts"})
    default = budgets.default_budget(everything, STUDY)
    all_finished = everything.finished(STUDY) if everything is not None else pd.DataFrame()
    ladder_result = ladder.build(everything, all_finished, judged.LADDER,
                                 extra=[default[0].epochs] if default else ()) \
        if not all_finished.empty else "the store holds no finished loss_choice runs"
    verdict_rows = []
    if runs.empty:
        sections.append(Section("Trained-model evidence", [Notice(
            "no finished runs of the loss_choice study.", tables.make_command(STUDY))]))
        summary = "No loss_choice runs yet: background and data evidence only."
    else:
        design_missing, notes = design(runs)
        missing += design_missing
        sections.append(design_section(ctx, notes, runs, ladder_result))
        ev = trained.evidence(store, ctx.ui_url, runs)
        sections += [trained.rate_distortion_section(ev),
                     sigma.section(store, runs, ctx.ui_url, STUDY),
                     trained.intensity_section(ev), trained.images_section(ev),
                     trained.quality_section(ev)]
        section, verdict_rows = judged.verdict_section(runs)
        sections.append(section)
        summary = " ".join(f"{r['dataset']}: “{r['claim']}” — {r['verdict']} (per β: "
                           f"{r['per_beta']})." for r in verdict_rows)
        summary += " " + ladder.headline(ladder_result, runs)
    versus = judged.default_vs_long(all_finished) if not all_finished.empty else None
    if versus is not None:
        sections.append(versus)
    sections.append(ladder.section(ladder_result, default))
    report = Report(
        "loss_choice", "Loss choice: which likelihood suits which data", summary,
        tables.provenance(store, [STUDY], extra=[("data evidence", ctx.data_problem or (
            "the official train splits, as the newest loss_choice study run logged them "
            "(evidence.json)"))]),
        sections, missing)
    return report, verdict_rows
