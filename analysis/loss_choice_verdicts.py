"""The loss-choice report's verdicts: the rules, each claim's verdict per β and pooled with the
cells that had not settled, the paired comparisons behind them, the verdicts at the default
budget beside the long one, and the loss-choice budget ladder's cells, metrics and verdicts."""

from __future__ import annotations

import pandas as pd

from analysis import budgets, convergence, ladder, tables, verdicts
from analysis.blocks import Bullets, Section, Table, Text, ci_text

VAL_SSE = verdicts.Metric("val/sse", "validation SSE", lower_is_better=True)
"""The metric of the ladder's verdicts: the curves hold validation values only."""


def verdict_section(runs: pd.DataFrame) -> tuple[Section, list[dict]]:
    """The rules, the generated verdicts (per β and pooled) and the paired comparisons behind
    them; and the index's rows (pooled verdict, per-β verdicts, flags)."""
    section = Section("Verdicts")
    section.blocks.append(Text("The verdicts follow from these rules, applied to the finished "
                               "loss_choice runs; the sentences below are generated from "
                               "their outcomes."))
    section.blocks.append(Bullets(verdicts.rules_text()))
    results = {claim: verdicts.claim_verdicts(runs, claim) for claim in verdicts.CLAIMS}
    index_rows = []
    for claim, by_beta in results.items():
        pooled = by_beta[-1]
        section.blocks.append(Text(" ".join(pooled.sentences())))
        if len(by_beta) > 1:
            section.blocks.append(Text(verdicts.per_beta_sentence(by_beta)))
        index_rows.append({
            "dataset": tables.dataset_label(claim.dataset), "claim": claim.text,
            "verdict": pooled.verdict,
            "per_beta": "; ".join(f"{v.beta}: {v.verdict}" for v in by_beta[:-1]) or "—",
            "flags": flag_text(pooled)})
    section.blocks.append(Table.from_frame(verdict_table(results), "Verdicts per β and pooled "
                                           "over β (pairs: of the test SSE, as people write it)"))
    detail = detail_table(results)
    if not detail.empty:
        section.blocks.append(Table.from_frame(
            detail, "Paired comparisons (difference = first − second likelihood; pairs share "
                    "dataset, β, seed, latent_dim and budget)", digits=3))
    return section, index_rows


def flag_text(v: verdicts.ClaimVerdict) -> str:
    """`settled`, the cells behind the verdict that were not, or — when no cell was run."""
    if not (v.primary.cells or v.calibrated.cells):
        return "—"
    return v.unsettled or convergence.SETTLED


def verdict_table(results: dict) -> pd.DataFrame:
    rows = []
    for claim, by_beta in results.items():
        for v in by_beta:
            rows.append({"dataset": tables.dataset_label(claim.dataset), "claim": claim.text,
                         "β": v.beta, "verdict": v.verdict,
                         "as people write it": v.primary.verdict,
                         "with a calibrated σ (σ-VAE)": v.calibrated.verdict,
                         "with a learned σ (beside, not in the rule)": v.learned.verdict,
                         "pairs": v.primary.pairs, "cells not settled": flag_text(v)})
    return pd.DataFrame(rows)


def detail_table(results: dict) -> pd.DataFrame:
    rows = []
    for by_beta in results.values():
        for v in by_beta:
            for comp in (v.primary, v.calibrated, v.learned):
                if comp.absent:
                    continue
                for o in comp.outcomes:
                    r = o.result
                    rows.append({
                        "dataset": tables.dataset_label(comp.dataset), "β": v.beta,
                        "comparison": comp.label, "metric": o.metric.label, "pairs": r.n,
                        "mean difference [95% CI]": ci_text(r.mean_diff, r.lo, r.hi),
                        "paired t p": verdicts.fmt_p(r.t_p),
                        "Wilcoxon p": verdicts.fmt_p(r.wilcoxon_p), "d_z": r.d_z,
                        "outcome": o.outcome,
                        "cells not settled": verdicts.describe_unsettled(comp.cells)
                        or convergence.SETTLED})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- default vs long


def default_vs_long(finished: pd.DataFrame) -> Section | None:
    """Each claim's verdict at the default budget beside the long one, per β and pooled, when
    the store holds finished loss_choice runs of two profiles; None otherwise."""
    long, default = budgets.long_and_default(finished)
    if long is None or default is None:
        return None
    section = Section("Verdicts at the default budget beside the long one")
    table = compare_profiles(default, long)
    same = int((table["same verdict"] == "yes").sum())
    section.blocks.append(Text(
        f"The same rules applied separately to the {len(default.runs)} finished runs of profile "
        f"{default.name}, {default.budget.full()}, and the {len(long.runs)} of profile "
        f"{long.name}, {long.budget.full()}."))
    section.blocks.append(Table.from_frame(table, "Each claim's verdict at the default budget "
                                                  "and at the long one"))
    differ = table[table["same verdict"] != "yes"]
    text = f"{same} of {len(table)} verdicts are the same at both budgets."
    head_d, head_l = heads(default, long)
    if not differ.empty:
        text += " Different: " + "; ".join(
            f"{r['claim']} at {r['β']} ({r[head_d]} at {default.epochs} epochs, {r[head_l]} "
            f"at {long.epochs})" for _, r in differ.iterrows()) + "."
    section.blocks.append(Text(text))
    return section


def heads(default: budgets.Profile, long: budgets.Profile) -> tuple[str, str]:
    """The verdict columns' headers: each profile with its budget."""
    return (f"verdict, {default.name}: {default.budget.text()}",
            f"verdict, {long.name}: {long.budget.text()}")


def compare_profiles(default: budgets.Profile, long: budgets.Profile) -> pd.DataFrame:
    """claim x β (each, pooled) -> verdict and pairs at each budget, and whether they agree."""
    rows = []
    head_d, head_l = heads(default, long)
    for claim in verdicts.CLAIMS:
        by_d = {v.beta: v for v in verdicts.claim_verdicts(default.runs, claim)}
        by_l = {v.beta: v for v in verdicts.claim_verdicts(long.runs, claim)}
        for where in dict.fromkeys([*by_d, *by_l]):
            vd, vl = by_d.get(where), by_l.get(where)
            rows.append({
                "dataset": tables.dataset_label(claim.dataset), "claim": claim.text,
                "β": where, head_d: vd.verdict if vd else "not run",
                head_l: vl.verdict if vl else "not run",
                "same verdict": "yes" if vd and vl and vd.verdict == vl.verdict else "no",
                f"pairs ({default.name})": vd.primary.pairs if vd else 0,
                f"pairs ({long.name})": vl.primary.pairs if vl else 0,
                f"not settled ({default.name})": flag_text(vd) if vd else "—",
                f"not settled ({long.name})": flag_text(vl) if vl else "—"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the ladder


def _cell_labels(cells: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"dataset": cells["dataset"].map(tables.dataset_label),
                         "likelihood": cells["likelihood"], "β": cells["beta"]})


def _ladder_verdicts(frame: pd.DataFrame) -> dict[tuple[str, str], str]:
    out = {}
    for claim in verdicts.CLAIMS:
        if claim.dataset not in set(frame["dataset"]):
            continue
        for v in verdicts.claim_verdicts(frame, claim, [VAL_SSE]):
            out[(f"{tables.dataset_label(claim.dataset)}: {claim.text}", v.beta)] = v.verdict
    return out


LADDER = ladder.LadderSpec(
    study="loss_choice", cells=["dataset", "likelihood", "beta"], labels=_cell_labels,
    metrics=[ladder.VAL_SSE, ladder.VAL_KL, ladder.ACTIVE_UNITS, ladder.SIGMA],
    verdicts=_ladder_verdicts)
