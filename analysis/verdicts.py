"""Verdicts on "BCE suits MNIST" and "MSE suits Fashion-MNIST", computed from the runs by
stated rules; the report's sentences are generated from the outcomes, never written ahead.

Rule 1 (a metric): pair the runs of the two likelihoods that share dataset, beta, seed and
latent_dim; with at least MIN_PAIRS pairs a two-sided paired t-test at level ALPHA decides
whether the metric favours the claim, goes against it, or shows no difference.
Rule 2 (a comparison): supports when more than half of the tested metrics favour the claim
and none goes against it; contradicts when more than half go against it and none favours
it; insufficient data when no metric could be tested; mixed otherwise.
Rule 3 (the claim): the comparison with the rival as people write it (fixed sigma^2 = 1/2)
decides; when the calibrated comparison (the sigma-VAE's closed-form sigma) was run and
reaches a different, testable verdict, the claim is mixed. The Gaussian with a sigma learned
by Adam is compared too and reported beside it, outside the rule.
Per beta and pooled: every verdict is computed on the pairs at each beta alone and on all
pairs pooled; the pooled one is the headline and the per-beta ones stand beside it, so the
pairs of one beta cannot outvote another's unseen. A comparison names the cells (a
likelihood at a beta) it rests on that had not settled (analysis.convergence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis import convergence, stats

ALPHA = 0.05
MIN_PAIRS = 3
PAIR_ON = ["beta", "seed", "latent_dim", "epochs"]
"""Runs pair when they share these (and the dataset): runs of two budgets never pair."""
POOLED = "pooled"

SUPPORTS, CONTRADICTS, MIXED, INSUFFICIENT = "supports", "contradicts", "mixed", "insufficient data"
FAVOURS, AGAINST, NO_DIFFERENCE = "favours the claim", "against the claim", "no difference"

LIKELIHOOD_LABELS = {
    "bernoulli": "Bernoulli (BCE)",
    "gaussian": "Gaussian, fixed σ (MSE)",
    "gaussian_optimal": "Gaussian, calibrated σ (σ-VAE)",
    "gaussian_learned": "Gaussian, learned σ",
    "continuous_bernoulli": "continuous Bernoulli",
    "laplace": "Laplace (L1)",
}
DATASET_LABELS = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}


@dataclass(frozen=True)
class Metric:
    """A likelihood-free quality metric read from the runs (or derived from one column)."""

    key: str
    label: str
    lower_is_better: bool
    source: str | None = None
    """Column it is derived from as 1 - value (1 - SSIM); None: the column itself."""

    def values(self, frame: pd.DataFrame) -> pd.Series | None:
        column = self.source or self.key
        if column not in frame or frame[column].isna().all():
            return None
        return 1.0 - frame[column] if self.source else frame[column]


MATCHED_RATE = Metric("sse_at_matched_rate", "SSE at matched rate", lower_is_better=True)
"""SSE of the two rate-distortion curves (runs across beta of one seed) averaged over the
rates both reach: compares the likelihoods at equal KL rather than at equal beta."""
RATE, DISTORTION = "test/kl", "test/sse"

METRICS = [
    Metric("test/sse", "SSE (summed over pixels)", lower_is_better=True),
    Metric("1-ssim", "1 − SSIM", lower_is_better=True, source="test/ssim"),
    Metric("test/probe_accuracy", "linear-probe accuracy", lower_is_better=False),
    Metric("test/frechet_distance", "sample Fréchet distance", lower_is_better=True),
]


def with_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` plus the derived metric columns (e.g. 1-ssim)."""
    out = frame.copy()
    for m in METRICS:
        if m.source and m.source in out:
            out[m.key] = 1.0 - out[m.source]
    return out


@dataclass
class MetricOutcome:
    metric: Metric
    result: stats.Paired
    outcome: str

    def sentence(self, favoured: str, rival: str) -> str:
        r, m = self.result, self.metric
        if self.outcome == INSUFFICIENT:
            return (f"{m.label}: {r.n} pair(s) of {favoured} and {rival}, fewer than the "
                    f"{MIN_PAIRS} the rule needs.")
        direction = "lower" if r.mean_diff < 0 else "higher"
        return (
            f"{m.label}: {favoured} is {direction} than {rival} by {abs(r.mean_diff):.4g} on "
            f"average (95% CI of the difference {r.lo:.4g} to {r.hi:.4g}; n = {r.n} pairs; "
            f"paired t p = {fmt_p(r.t_p)}, Wilcoxon p = {fmt_p(r.wilcoxon_p)}; "
            f"d_z = {r.d_z:.2f}); {m.label} is better when "
            f"{'lower' if m.lower_is_better else 'higher'}: {self.outcome}."
        )


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def metric_outcome(metric: Metric, result: stats.Paired) -> MetricOutcome:
    """Rule 1. `result` holds differences favoured - rival."""
    if result.n < MIN_PAIRS:
        return MetricOutcome(metric, result, INSUFFICIENT)
    if not (result.t_p < ALPHA):
        return MetricOutcome(metric, result, NO_DIFFERENCE)
    better = result.mean_diff < 0 if metric.lower_is_better else result.mean_diff > 0
    return MetricOutcome(metric, result, FAVOURS if better else AGAINST)


def comparison_verdict(outcomes: list[MetricOutcome]) -> str:
    """Rule 2."""
    tested = [o for o in outcomes if o.outcome != INSUFFICIENT]
    if not tested:
        return INSUFFICIENT
    wins = sum(o.outcome == FAVOURS for o in tested)
    losses = sum(o.outcome == AGAINST for o in tested)
    if wins > len(tested) / 2 and losses == 0:
        return SUPPORTS
    if losses > len(tested) / 2 and wins == 0:
        return CONTRADICTS
    return MIXED


@dataclass
class Comparison:
    dataset: str
    favoured: str
    rival: str
    outcomes: list[MetricOutcome] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    """Likelihoods of the comparison without any finished run on the dataset."""
    cells: dict = field(default_factory=dict)
    """(likelihood, beta) -> (status, flag) of every cell behind the comparison."""

    @property
    def verdict(self) -> str:
        return INSUFFICIENT if self.absent else comparison_verdict(self.outcomes)

    @property
    def label(self) -> str:
        return f"{LIKELIHOOD_LABELS.get(self.favoured, self.favoured)} vs " \
               f"{LIKELIHOOD_LABELS.get(self.rival, self.rival)}"

    @property
    def pairs(self) -> int:
        """Pairs of the first metric tested (the SSE): what the verdict rests on."""
        return self.outcomes[0].result.n if self.outcomes else 0

    def summary(self) -> str:
        if self.absent:
            return (f"{self.label}: not run (no finished {' or '.join(self.absent)} runs on "
                    f"{DATASET_LABELS.get(self.dataset, self.dataset)}).")
        fav = [o.metric.label for o in self.outcomes if o.outcome == FAVOURS]
        against = [o.metric.label for o in self.outcomes if o.outcome == AGAINST]
        none = [o.metric.label for o in self.outcomes if o.outcome == NO_DIFFERENCE]
        parts = []
        if fav:
            parts.append(f"favoured on {', '.join(fav)}")
        if against:
            parts.append(f"against on {', '.join(against)}")
        if none:
            parts.append(f"no significant difference on {', '.join(none)}")
        if not parts:
            parts.append(f"no metric had {MIN_PAIRS} or more pairs")
        return f"{self.label}: {self.verdict} ({'; '.join(parts)})."


def compare(frame: pd.DataFrame, dataset: str, favoured: str, rival: str,
            metrics=METRICS) -> Comparison:
    """Rule 1 for every metric present, favoured vs rival on one dataset (and the SSE at a
    matched rate when the test rate and SSE were logged)."""
    sub = with_derived(frame[frame["dataset"] == dataset])
    on = [c for c in PAIR_ON if c in sub]
    comparison = Comparison(dataset, favoured, rival)
    comparison.absent = [lik for lik in (favoured, rival) if lik not in set(sub["likelihood"])]
    if comparison.absent:
        return comparison
    pair = sub[sub["likelihood"].isin([favoured, rival])]
    comparison.cells = cell_flags(pair)
    for metric in metrics:
        if metric.values(sub) is None:
            continue
        a, b = stats.pair_runs(sub, "likelihood", favoured, rival, on, metric.key)
        comparison.outcomes.append(metric_outcome(metric, stats.paired(a.values, b.values)))
    if RATE in sub and DISTORTION in sub and sub["beta"].nunique() > 1:
        a, b = matched_rate_pairs(sub, favoured, rival)
        comparison.outcomes.append(metric_outcome(MATCHED_RATE, stats.paired(a, b)))
    return comparison


def cell_flags(runs: pd.DataFrame) -> dict:
    """(likelihood, beta) -> (status, flag) for each cell of `runs`."""
    if runs.empty:
        return {}
    cells = convergence.flags(runs, ["likelihood", "beta"])
    return {(r["likelihood"], float(r["beta"])): (r["status"], r["flag"])
            for _, r in cells.iterrows()}


def describe_unsettled(cells: dict) -> str:
    """The cells of `cells` that had not settled, compactly; '' when all had."""
    unsettled = {k: v for k, v in cells.items() if v[0] != convergence.SETTLED}
    statuses = {status for status, _ in unsettled.values()}
    if not unsettled:
        return ""
    if len(unsettled) == len(cells) and len(statuses) == 1:
        return f"none of its {len(cells)} cells (likelihood × β) had settled: all {statuses.pop()}"
    parts = []
    for status in (convergence.MOVING, convergence.CANNOT_TELL):
        these = [f"{lik} at β = {beta:g} ({flag.split(': ', 1)[-1]})"
                 for (lik, beta), (st, flag) in unsettled.items() if st == status]
        if these:
            parts.append(f"{status}: " + ", ".join(these))
    return "; ".join(parts)


def matched_rate_pairs(frame: pd.DataFrame, favoured: str, rival: str):
    """Per seed (and latent_dim, budget): SSE of each likelihood's curve across beta, averaged
    over the rates both curves reach. Returns two matched lists."""
    units = [c for c in ("seed", "latent_dim", "epochs") if c in frame]
    a, b = [], []
    for _, unit in frame.groupby(units):
        curves = [unit[unit["likelihood"] == lik] for lik in (favoured, rival)]
        matched = stats.distortion_at_matched_rate(*curves, rate=RATE, distortion=DISTORTION)
        if matched is not None:
            a.append(matched[0])
            b.append(matched[1])
    return a, b


@dataclass(frozen=True)
class Claim:
    dataset: str
    text: str
    favoured: str
    rival: str
    calibrated: tuple[str, str]
    """(favoured, rival) of the comparison with a calibrated sigma (the sigma-VAE's)."""
    learned: tuple[str, str]
    """(favoured, rival) with a sigma learned by Adam: reported beside, outside Rule 3."""


CLAIMS = [
    Claim("mnist", "BCE suits MNIST", "bernoulli", "gaussian", ("bernoulli", "gaussian_optimal"),
          ("bernoulli", "gaussian_learned")),
    Claim("fashion", "MSE suits Fashion-MNIST", "gaussian", "bernoulli",
          ("gaussian_optimal", "bernoulli"), ("gaussian_learned", "bernoulli")),
]


@dataclass
class ClaimVerdict:
    claim: Claim
    primary: Comparison
    calibrated: Comparison
    learned: Comparison
    beta: str = POOLED
    """`pooled`, or `β = <value>` for the pairs at one beta only."""

    @property
    def verdict(self) -> str:
        """Rule 3."""
        p, c = self.primary.verdict, self.calibrated.verdict
        if p == INSUFFICIENT or c in (INSUFFICIENT, p):
            return p
        return MIXED

    @property
    def unsettled(self) -> str:
        """The cells behind the two comparisons of Rule 3 that had not settled ('' if none)."""
        return describe_unsettled({**self.primary.cells, **self.calibrated.cells})

    def sentences(self) -> list[str]:
        name = DATASET_LABELS.get(self.claim.dataset, self.claim.dataset)
        where = "" if self.beta == POOLED else f" at {self.beta}"
        p, c = self.primary.verdict, self.calibrated.verdict
        out = [f"On {name}{where}, the evidence {self._verb()} “{self.claim.text}”."]
        out.append(f"As people write it — {self.primary.summary()}")
        out.append(f"With a calibrated σ (σ-VAE) — {self.calibrated.summary()}")
        if c != INSUFFICIENT:
            if p != SUPPORTS and c == SUPPORTS:
                out.append("The claim holds only with a calibrated σ (gaussian_optimal), "
                           "not with a fixed σ² = ½.")
            elif p == SUPPORTS and c != SUPPORTS:
                out.append("The claim holds against a fixed σ² = ½ but not once σ is "
                           "calibrated.")
        out.append(self.learned_sentence())
        if self.unsettled:
            out.append("Not every cell behind this verdict had settled, so it may change with "
                       f"longer training: {self.unsettled}.")
        return out

    def learned_sentence(self) -> str:
        lv, cv = self.learned.verdict, self.calibrated.verdict
        if self.learned.absent:
            return f"With a learned σ — {self.learned.summary()}"
        same = "the same as" if lv == cv else "unlike"
        text = (f"With a learned σ — {self.learned.summary()} Its verdict ({lv}) is {same} "
                f"the σ-VAE's ({cv}).")
        unsettled = describe_unsettled(self.learned.cells)
        return text + (f" Its cells not settled: {unsettled}." if unsettled else "")

    def _verb(self) -> str:
        return {SUPPORTS: "supports", CONTRADICTS: "contradicts",
                MIXED: "is mixed on", INSUFFICIENT: "is insufficient to judge"}[self.verdict]


def claim_verdict(frame: pd.DataFrame, claim: Claim, metrics=METRICS,
                  beta: str = POOLED) -> ClaimVerdict:
    """The verdict on `claim` from the finished loss_choice runs in `frame` (all pooled)."""
    return ClaimVerdict(
        claim,
        compare(frame, claim.dataset, claim.favoured, claim.rival, metrics),
        compare(frame, claim.dataset, *claim.calibrated, metrics),
        compare(frame, claim.dataset, *claim.learned, metrics),
        beta,
    )


def claim_verdicts(frame: pd.DataFrame, claim: Claim, metrics=METRICS) -> list[ClaimVerdict]:
    """The verdict on `claim` at each beta of its dataset's runs, then pooled over beta."""
    betas = sorted(set(frame.loc[frame["dataset"] == claim.dataset, "beta"].dropna()))
    out = [claim_verdict(frame[frame["beta"] == b], claim, metrics, f"β = {b:g}") for b in betas]
    return [*out, claim_verdict(frame, claim, metrics)]


def _pairs(n: int) -> str:
    return f"{n} pair{'s' if n != 1 else ''}"


def per_beta_sentence(by_beta: list[ClaimVerdict]) -> str:
    """How the per-beta verdicts of one claim compare with the pooled one."""
    pooled = next(v for v in by_beta if v.beta == POOLED)
    each = [v for v in by_beta if v.beta != POOLED]
    if not each:
        return ""
    name = DATASET_LABELS.get(pooled.claim.dataset, pooled.claim.dataset)
    parts = "; ".join(f"at {v.beta} {v.verdict} ({_pairs(v.primary.pairs)})" for v in each)
    text = (f"“{pooled.claim.text}” on {name}, per β: {parts}; pooled over β: "
            f"{pooled.verdict} ({_pairs(pooled.primary.pairs)}).")
    testable = {v.verdict for v in each if v.verdict != INSUFFICIENT}
    if len(testable) > 1:
        text += (" The per-β verdicts disagree: the pooled verdict averages over a dependence "
                 "on β, and the per-β ones are the ones to read.")
    elif len(each) > 1 and testable and testable != {pooled.verdict}:
        text += " Every β that could be tested agrees, and the pooled verdict differs from them."
    elif len(each) > 1 and testable == {pooled.verdict}:
        text += " The βs that could be tested agree with the pooled verdict."
    return text


PLAIN = "In plain words: "
"""Opens the reading of a rule for a student, after its formal statement."""


def rules_text() -> list[str]:
    """The rules as the report states them, with this module's constants."""
    return [
        f"A metric: runs of the two likelihoods are paired when they share dataset, β, seed, "
        f"latent_dim and budget (epochs); with at least {MIN_PAIRS} pairs a two-sided paired "
        f"t-test at α = {ALPHA} decides whether the metric favours the claim, goes against it, "
        f"or shows no difference (the Wilcoxon signed-rank p and Cohen's d_z are reported "
        f"alongside); fewer pairs: insufficient data. " + PLAIN + "Each pair is one training of "
        "each likelihood under the same settings, so their difference shows the effect of the "
        "likelihood alone, and the t-test asks whether the average difference is larger than "
        "the seed-to-seed noise would make it by chance. 'Favours' or 'goes against' means it "
        "is; 'no difference' means the seeds disagree too much to tell, not that the two "
        "likelihoods are proven equal.",
        "The Wilcoxon signed-rank test: the same pairs, tested on the ranks of their "
        "differences instead of their values (two-sided; reported, it does not decide). "
        + PLAIN + "It asks the t-test's question without letting one odd seed dominate, since "
        "only the order of the differences counts. Where its p and the t-test's disagree, the "
        "verdict rests on a few large differences and deserves less trust.",
        "Cohen's d_z: the mean of the paired differences divided by their standard deviation. "
        + PLAIN + "It says how large the difference is compared with how much it varies from "
        "seed to seed, whatever the metric's unit. About 0.2 is small and 0.8 or more large, "
        "so a small p with a small d_z is a real but slight difference.",
        "A comparison: supports when more than half of the tested metrics favour the claim "
        "and none goes against it; contradicts when more than half go against it and none "
        "favours it; insufficient data when no metric could be tested; mixed otherwise. "
        + PLAIN + "Each metric votes for or against the claim, or abstains; the claim is "
        "supported only when most votes are for it and none against. Votes on both sides make "
        "it mixed: each likelihood wins on something.",
        "The claim: the comparison with the rival as people write it (Gaussian with fixed "
        "σ² = ½, i.e. plain SSE) decides; when the calibrated comparison (the σ-VAE's Gaussian, "
        "one shared σ set in closed form to the batch MSE) was run and reaches a different "
        "verdict, the claim is mixed. The Gaussian whose σ is learned by Adam is compared the "
        "same way and reported beside it, outside this rule. " + PLAIN + "The claim is judged "
        "against the Gaussian as most code writes it, plain squared error; if the fairer, "
        "calibrated Gaussian tells a different story, the verdict is mixed. The Gaussian "
        "with a learned σ is shown for comparison and does not change the verdict.",
        "Per β and pooled: each verdict is computed on the pairs at each β alone and on all "
        "pairs pooled over β. The pooled verdict is the headline; the per-β verdicts stand "
        "beside it, so the pairs at one β cannot outvote those at another unseen. At a single "
        "β the SSE at matched rate has no curve to interpolate and is left out. " + PLAIN +
        "The headline uses all pairs at once and the per-β verdicts repeat the test at each β "
        "alone. When they disagree, the answer depends on β, and the per-β ones are the ones "
        "to read.",
        "Metrics: " + "; ".join(
            f"{m.label} ({'lower' if m.lower_is_better else 'higher'} is better)"
            for m in METRICS) + f"; and {MATCHED_RATE.label}: for each seed, the SSE of each "
        "likelihood's rate-distortion curve across β, interpolated linearly in the rate "
        "(test KL) and averaged over the rates both curves reach, paired over seeds (this "
        "compares the likelihoods at equal KL instead of equal β). Metrics the runs did not "
        "log are left out of the count. " + PLAIN + "β trades reconstruction error against "
        "how much information the code carries (the rate), so at the same β two likelihoods "
        "may carry different amounts; the SSE at matched rate compares their errors at the "
        "same amount instead. The lower one reconstructs better for the same information.",
        convergence.rules_text(" A verdict names the cells it rests on that had not settled."),
    ]
