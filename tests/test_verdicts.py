"""The statistics and the verdict rules on constructed runs with known answers (no training,
no MLflow): t-intervals, paired comparisons, matched-rate distortion, the Pareto front, the
loss-scale audit, collapse counting, redaction, supports / contradicts / mixed / insufficient
data, the convergence flags, verdicts per beta beside the pooled one, and the collapse
sentences that must not read a trend into runs that had not settled."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import convergence, kl_collapse, loss_choice_verdicts, stats, verdicts
from analysis.evidence import loss_scale_audit
from analysis.kl_collapse import collapse
from analysis.runs import redact

# --------------------------------------------------------------------------- stats


def test_mean_ci_is_the_student_t_interval():
    out = stats.mean_ci([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd 1, n 3
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0)
    assert out["lo"] == pytest.approx(2.0 - half) and out["hi"] == pytest.approx(2.0 + half)
    assert half == pytest.approx(2.4841, abs=1e-4)


def test_mean_ci_of_one_seed_has_no_interval_and_errorbars_stay_finite():
    out = stats.mean_ci([4.0, float("nan")])
    assert out["n"] == 1 and out["mean"] == 4.0 and math.isnan(out["lo"])
    assert stats.t_interval([4.0]) == (4.0, 4.0)  # seaborn needs a finite pair


def test_paired_comparison_known_values():
    r = stats.paired([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4
    assert r.n == 3 and r.mean_diff == pytest.approx(3.0)
    assert r.d_z == pytest.approx(3.0)  # mean 3 / sd 1
    assert r.t_p == pytest.approx(2 * sps.t.sf(3 * math.sqrt(3), 2))
    assert r.wilcoxon_p == pytest.approx(0.25)  # exact: 2 / 2^3


def test_paired_drops_incomplete_pairs_and_handles_constant_differences():
    r = stats.paired([1.0, 2.0, float("nan")], [0.0, 1.0, 5.0])
    assert r.n == 2 and r.d_z == math.inf and r.t_p == 0.0
    assert stats.paired([1.0, 1.0], [1.0, 1.0]).t_p == 1.0


def test_distortion_at_matched_rate_interpolates_over_the_overlap():
    a = pd.DataFrame({"r": [0.0, 10.0], "d": [10.0, 0.0]})  # d = 10 - r
    b = pd.DataFrame({"r": [15.0, 5.0], "d": [10.0, 20.0]})  # d = 25 - r, unsorted
    da, db = stats.distortion_at_matched_rate(a, b, "r", "d")
    assert da == pytest.approx(2.5) and db == pytest.approx(17.5)  # mean over r in [5, 10]
    c = pd.DataFrame({"r": [20.0, 30.0], "d": [1.0, 0.0]})
    assert stats.distortion_at_matched_rate(a, c, "r", "d") is None


def test_pareto_front_minimizes_both():
    pts = pd.DataFrame({"x": [1, 2, 3, 2, 4], "y": [5, 3, 4, 6, 1]})
    front = stats.pareto_front(pts, "x", "y")
    assert list(zip(front["x"], front["y"], strict=True)) == [(1, 5), (2, 3), (4, 1)]


# --------------------------------------------------------------------------- evidence


@pytest.mark.parametrize("pixels", [784, 3072])
def test_loss_scale_audit_is_computed_from_d(pixels):
    audit = loss_scale_audit(pixels).set_index("loss as written (+ KL summed over z)")
    sigma2 = audit["implied σ² (at β = 1)"]
    beta = audit["effective β"]
    assert sigma2["SSE, summed over pixels"] == "0.5" and beta["SSE, summed over pixels"] == "1"
    assert sigma2["MSE, averaged over pixels"] == f"{pixels / 2:g}"
    assert beta["MSE, averaged over pixels"] == f"{pixels:g}"
    assert beta["BCE, summed over pixels"] == "1"
    assert beta["BCE, averaged over pixels"] == f"{pixels:g}"
    assert "Bernoulli" in sigma2["BCE, averaged over pixels"]


def test_collapse_counts_dimensions_and_the_epoch_they_had_collapsed_by():
    kl = pd.DataFrame([[1.0, 0.5, 0.004, 0.002],   # collapses at epoch 3
                       [2.0, 0.005, 0.003, 0.001],  # at epoch 2
                       [3.0, 2.0, 2.0, 2.0]], columns=[1, 2, 3, 4])
    assert collapse(kl, 0.01) == (2, 3)
    assert collapse(kl, 0.0001) == (0, None)


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://vae:hunter2@db:5432/mlflow", "postgresql://vae:***@db:5432/mlflow"),
    ("http://user:p%40ss@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ("sqlite:////repo/mlruns/mlflow.db", "sqlite:////repo/mlruns/mlflow.db"),
    ("postgresql://db/mlflow?user=vae&password=hunter2", "postgresql://db/mlflow?user=vae&password=***"),
    ("see postgresql+psycopg2://a:b@h/d and http://h:5000", "see postgresql+psycopg2://a:***@h/d and http://h:5000"),
])
def test_redact_hides_passwords_only(uri, shown):
    assert redact(uri) == shown


# --------------------------------------------------------------------------- verdict rules


def runs(dataset: str, effects: dict[str, dict[str, float]], seeds=(0, 1, 2),
         betas=(0.1, 1.0, 10.0), noise=0.01) -> pd.DataFrame:
    """Constructed finished runs: effects[likelihood][metric] is added to a base value per
    (beta, seed) unit, plus small seeded noise, so the paired differences are known."""
    rng = np.random.default_rng(0)
    base = {"test/sse": 40.0, "test/ssim": 0.6, "test/probe_accuracy": 0.8,
            "test/frechet_distance": 30.0}
    rows = []
    for lik, effect in effects.items():
        for beta in betas:
            for seed in seeds:
                row = {"dataset": dataset, "likelihood": lik, "beta": beta, "seed": seed,
                       "latent_dim": 16}
                for metric, value in base.items():
                    unit = 0.1 * seed + 0.05 * math.log10(beta)  # shared by the pair
                    row[metric] = value + unit + effect.get(metric, 0.0) + noise * rng.normal()
                rows.append(row)
    return pd.DataFrame(rows)


BETTER = {"test/sse": -5.0, "test/ssim": 0.1, "test/probe_accuracy": 0.05,
          "test/frechet_distance": -3.0}
WORSE = {k: -v for k, v in BETTER.items()}


def claim(name):
    return next(c for c in verdicts.CLAIMS if c.dataset == name)


def test_supports_when_the_favoured_likelihood_wins_every_metric():
    frame = runs("mnist", {"bernoulli": BETTER, "gaussian": {}})
    v = verdicts.claim_verdict(frame, claim("mnist"))
    assert v.primary.verdict == verdicts.SUPPORTS and v.verdict == verdicts.SUPPORTS
    assert all(o.outcome == verdicts.FAVOURS for o in v.primary.outcomes)
    assert all(o.result.n == 9 for o in v.primary.outcomes)
    assert v.calibrated.verdict == verdicts.INSUFFICIENT  # no gaussian_learned runs
    assert "supports “BCE suits MNIST”" in v.sentences()[0]


def test_contradicts_when_it_loses_every_metric():
    frame = runs("fashion", {"gaussian": WORSE, "bernoulli": {}})
    v = verdicts.claim_verdict(frame, claim("fashion"))
    assert v.verdict == verdicts.CONTRADICTS
    assert all(o.outcome == verdicts.AGAINST for o in v.primary.outcomes)
    assert "contradicts “MSE suits Fashion-MNIST”" in v.sentences()[0]


def test_mixed_when_metrics_disagree():
    effect = {"test/sse": -5.0, "test/probe_accuracy": -0.05}  # better SSE, worse probe
    frame = runs("mnist", {"bernoulli": effect, "gaussian": {}})
    v = verdicts.claim_verdict(frame, claim("mnist"))
    outcomes = {o.metric.key: o.outcome for o in v.primary.outcomes}
    assert outcomes["test/sse"] == verdicts.FAVOURS
    assert outcomes["test/probe_accuracy"] == verdicts.AGAINST
    assert outcomes["1-ssim"] == verdicts.NO_DIFFERENCE
    assert v.verdict == verdicts.MIXED


def test_no_significant_difference_anywhere_is_mixed_not_support():
    frame = runs("mnist", {"bernoulli": {}, "gaussian": {}}, noise=1.0)
    v = verdicts.claim_verdict(frame, claim("mnist"))
    assert all(o.outcome != verdicts.FAVOURS for o in v.primary.outcomes)
    assert v.verdict in (verdicts.MIXED, verdicts.CONTRADICTS)


def test_insufficient_data_below_the_minimum_pairs():
    frame = runs("mnist", {"bernoulli": BETTER, "gaussian": {}}, seeds=(0, 1), betas=(1.0,))
    v = verdicts.claim_verdict(frame, claim("mnist"))
    assert all(o.outcome == verdicts.INSUFFICIENT for o in v.primary.outcomes)
    assert v.verdict == verdicts.INSUFFICIENT


def test_insufficient_data_when_a_likelihood_was_never_run():
    frame = runs("fashion", {"bernoulli": {}})
    v = verdicts.claim_verdict(frame, claim("fashion"))
    assert v.verdict == verdicts.INSUFFICIENT and v.primary.absent == ["gaussian"]
    assert "not run" in v.primary.summary()


def test_only_with_a_calibrated_sigma():
    # fixed sigma^2 = 1/2 loses to BCE on Fashion-MNIST, the sigma-VAE's calibrated sigma
    # beats it; a sigma learned by Adam loses too, and is reported beside, not in Rule 3
    frame = runs("fashion", {"gaussian": WORSE, "bernoulli": {}, "gaussian_optimal": BETTER,
                             "gaussian_learned": WORSE})
    v = verdicts.claim_verdict(frame, claim("fashion"))
    assert v.primary.verdict == verdicts.CONTRADICTS
    assert v.calibrated.verdict == verdicts.SUPPORTS
    assert v.learned.verdict == verdicts.CONTRADICTS
    assert v.verdict == verdicts.MIXED
    text = " ".join(v.sentences())
    assert "only with a calibrated σ (gaussian_optimal)" in text
    assert "Its verdict (contradicts) is unlike the σ-VAE's (supports)." in text


def test_metrics_not_logged_are_left_out_of_the_count():
    frame = runs("mnist", {"bernoulli": BETTER, "gaussian": {}}).drop(
        columns=["test/frechet_distance", "test/ssim"])
    v = verdicts.claim_verdict(frame, claim("mnist"))
    assert [o.metric.key for o in v.primary.outcomes] == ["test/sse", "test/probe_accuracy"]
    assert v.verdict == verdicts.SUPPORTS


def test_matched_rate_compares_at_equal_kl():
    # bernoulli reaches lower SSE at every rate both curves cover
    rows = []
    for seed in range(3):
        for beta, rate in ((0.1, 30.0), (1.0, 20.0), (10.0, 10.0)):
            for lik, offset in (("bernoulli", 0.0), ("gaussian", 4.0 + seed)):
                rows.append({"dataset": "mnist", "likelihood": lik, "beta": beta, "seed": seed,
                             "latent_dim": 16, "test/kl": rate + offset,
                             "test/sse": 100.0 - rate + offset})
    v = verdicts.compare(pd.DataFrame(rows), "mnist", "bernoulli", "gaussian")
    matched = next(o for o in v.outcomes if o.metric is verdicts.MATCHED_RATE)
    assert matched.result.n == 3 and matched.outcome == verdicts.FAVOURS


# --------------------------------------------------------------------------- convergence

NAN = float("nan")


@pytest.mark.parametrize("row, status", [
    ({"epochs": 1}, convergence.CANNOT_TELL),  # one epoch logs no converge/*: no trend
    ({"epochs": 10}, convergence.CANNOT_TELL),  # a run from before the metrics existed
    ({"epochs": 10, "converge/val_nelbo_change": 0.4, "converge/val_nelbo_share": 0.02},
     convergence.SETTLED),
    ({"epochs": 10, "converge/val_nelbo_change": 1.0, "converge/val_nelbo_share": 0.05},
     convergence.SETTLED),  # the threshold itself is settled
    ({"epochs": 10, "converge/val_nelbo_change": 3.0, "converge/val_nelbo_share": 0.12},
     convergence.MOVING),  # a tenth of the fall in the last tenth: still falling evenly
    ({"epochs": 30, "converge/val_nelbo_change": -2.0, "converge/val_nelbo_share": -0.2},
     convergence.MOVING),  # rose again (over-fitting): moving too
    ({"epochs": 10, "converge/val_nelbo_change": -1.0, "converge/val_nelbo_share": NAN},
     convergence.CANNOT_TELL),  # never fell after epoch 1: no share to read
    ({"epochs": 10, "converge/val_nelbo_change": 0.1, "converge/val_nelbo_share": 0.01,
      "converge/log_sigma_change": -0.03}, convergence.MOVING),  # NELBO flat, sigma still moving
    ({"epochs": 10, "converge/val_nelbo_change": 0.1, "converge/val_nelbo_share": 0.01,
      "converge/log_sigma_change": 0.01}, convergence.SETTLED),
    ({"epochs": 10, "converge/val_nelbo_change": 5.0, "converge/val_nelbo_share": 0.3,
      "converge/log_sigma_change": 0.001}, convergence.MOVING),
])
def test_run_convergence(row, status):
    assert convergence.run_convergence(row).status == status


def test_one_epoch_says_why_it_cannot_tell():
    assert "one epoch" in convergence.run_convergence({"epochs": 1}).reason
    moving = convergence.run_convergence({"epochs": 10, "converge/val_nelbo_change": 3.0,
                                          "converge/val_nelbo_share": 0.12})
    assert moving.reason == ("its validation NELBO still fell by 3 nats (12% of its fall since "
                             "epoch 1) in its last tenth of epochs")


@pytest.mark.parametrize("statuses, cell", [
    ([convergence.SETTLED] * 3, convergence.SETTLED),
    ([convergence.SETTLED, convergence.MOVING, convergence.CANNOT_TELL], convergence.MOVING),
    ([convergence.SETTLED, convergence.CANNOT_TELL], convergence.CANNOT_TELL),
    ([], convergence.CANNOT_TELL),
])
def test_a_cell_is_settled_only_when_every_run_is(statuses, cell):
    assert convergence.cell_status(statuses) == cell


def test_flags_per_cell():
    settled = {"epochs": 10, "converge/val_nelbo_change": 0.1, "converge/val_nelbo_share": 0.01}
    moving = {"epochs": 10, "converge/val_nelbo_change": 4.0, "converge/val_nelbo_share": 0.2}
    frame = pd.DataFrame([{"likelihood": "a", **settled}, {"likelihood": "a", **moving},
                          {"likelihood": "a", **settled}, {"likelihood": "b", **settled},
                          {"likelihood": "c", "epochs": 1}])
    flags = convergence.flags(frame, ["likelihood"]).set_index("likelihood")["flag"]
    assert flags.to_dict() == {"a": "still moving: 1 of 3 runs", "b": "settled",
                               "c": "cannot tell: 1 of 1 run (one epoch)"}


# --------------------------------------------------------------------------- per beta


def beta_runs(effect_by_beta: dict[float, float], converge: dict | None = None) -> pd.DataFrame:
    """MNIST runs of bernoulli and gaussian, 3 seeds per beta: bernoulli's SSE minus
    gaussian's is effect_by_beta[beta] (the other metrics equal, up to noise)."""
    rows = []
    for beta, effect in effect_by_beta.items():
        rows.append(runs("mnist", {"bernoulli": {"test/sse": effect}, "gaussian": {}},
                         betas=(beta,)))
    frame = pd.concat(rows, ignore_index=True).drop(
        columns=["test/ssim", "test/probe_accuracy", "test/frechet_distance"])
    frame["epochs"] = 10
    for key, value in (converge or {}).items():
        frame[key] = value
    return frame


SETTLED_RUN = {"converge/val_nelbo_change": 0.1, "converge/val_nelbo_share": 0.01}


def test_per_beta_verdicts_stand_beside_the_pooled_one():
    # BCE wins clearly at beta 1 and loses at beta 4: pooled, the six differences (-5 x 3,
    # +1 x 3) show no significant difference, a "mixed" that hides two opposite verdicts
    frame = beta_runs({1.0: -5.0, 4.0: 1.0}, SETTLED_RUN)
    by_beta = verdicts.claim_verdicts(frame, claim("mnist"))
    assert [v.beta for v in by_beta] == ["β = 1", "β = 4", verdicts.POOLED]
    assert [v.verdict for v in by_beta] == [verdicts.SUPPORTS, verdicts.CONTRADICTS,
                                            verdicts.MIXED]
    assert [v.primary.pairs for v in by_beta] == [3, 3, 6]
    text = verdicts.per_beta_sentence(by_beta)
    assert text.startswith("“BCE suits MNIST” on MNIST, per β: at β = 1 supports (3 pairs); at "
                           "β = 4 contradicts (3 pairs); pooled over β: mixed (6 pairs).")
    assert "The per-β verdicts disagree" in text
    table = loss_choice_verdicts.verdict_table({claim("mnist"): by_beta})
    assert list(table["β"]) == ["β = 1", "β = 4", "pooled"]
    assert list(table["verdict"]) == ["supports", "contradicts", "mixed"]
    assert set(table["cells not settled"]) == {"settled"}


def test_per_beta_verdicts_that_agree_say_so():
    by_beta = verdicts.claim_verdicts(beta_runs({1.0: -5.0, 4.0: -4.0}), claim("mnist"))
    assert {v.verdict for v in by_beta} == {verdicts.SUPPORTS}
    assert "The βs that could be tested agree with the pooled verdict." in \
        verdicts.per_beta_sentence(by_beta)


def test_a_verdict_names_the_cells_that_had_not_settled():
    frame = beta_runs({1.0: -5.0, 4.0: -5.0}, SETTLED_RUN)
    still = (frame["likelihood"] == "bernoulli") & (frame["beta"] == 4.0) & (frame["seed"] == 2)
    frame.loc[still, "converge/val_nelbo_share"] = 0.3
    by_beta = {v.beta: v for v in verdicts.claim_verdicts(frame, claim("mnist"))}
    assert by_beta["β = 1"].unsettled == ""
    assert by_beta["β = 4"].unsettled == "still moving: bernoulli at β = 4 (1 of 3 runs)"
    pooled = " ".join(by_beta[verdicts.POOLED].sentences())
    assert ("Not every cell behind this verdict had settled, so it may change with longer "
            "training: still moving: bernoulli at β = 4 (1 of 3 runs).") in pooled
    one_epoch = beta_runs({1.0: -5.0}).assign(epochs=1)
    v = verdicts.claim_verdict(one_epoch, claim("mnist"))
    assert v.unsettled == "none of its 2 cells (likelihood × β) had settled: all cannot tell"


# --------------------------------------------------------------------------- collapse sentences


def finals_frame(status: str, active: dict[int, list[float]], beta: float = 4.0) -> pd.DataFrame:
    """Per-run finals (kl_collapse.finals' columns) of MNIST at `beta`: active[latent_dim] lists
    each seed's final active units."""
    return pd.DataFrame([{"dataset": "mnist", "beta": beta, "latent_dim": z, "run_id": f"{z}-{i}",
                          "collapsed": 0, "collapsed_share": 0.0, "active": a, "status": status}
                         for z, values in active.items() for i, a in enumerate(values)])


def test_no_trend_is_read_into_runs_that_had_not_settled():
    active = {16: [10.0, 10.0], 64: [14.0, 14.0]}  # still rising at the largest latent_dim
    settled = kl_collapse.saturation_sentences(finals_frame(convergence.SETTLED, active))
    assert "still rising at the largest latent_dim (64)" in settled[0]
    moving = kl_collapse.saturation_sentences(finals_frame(convergence.MOVING, active))
    assert "still rising" not in moving[0] and "saturating" not in moving[0]
    assert "had not settled, so whether active units saturate or keep rising with latent_dim " \
           "cannot be told" in moving[0]


@pytest.mark.parametrize("status, active, collapse, says", [
    (convergence.SETTLED, [10.0, 12.0], True, "collapse, 53 units on average carry no information"),
    (convergence.MOVING, [10.0, 12.0], True, "so more or fewer units may be active after longer"),
    (convergence.SETTLED, [64.0, 63.5], False, "no more than 1 unit inactive at the end of "
                                               "training, in settled runs"),
    (convergence.MOVING, [64.0, 64.0], False, "so whether collapse appears with longer training "
                                              "cannot be told"),
])
def test_collapse_at_the_largest_cell(status, active, collapse, says):
    fin = pd.concat([finals_frame(status, {16: [16.0, 16.0], 64: active}),
                     finals_frame(status, {64: [64.0, 64.0]}, beta=1.0)])
    cells = kl_collapse.collapse_cells(fin)
    assert len(cells) == 1 and (cells.iloc[0]["beta"], cells.iloc[0]["latent_dim"]) == (4.0, 64)
    assert bool(cells.iloc[0]["collapse"]) is collapse
    text = " ".join(b.text for b in kl_collapse.largest_section(cells).blocks
                    if hasattr(b, "text"))
    assert text.startswith(f"MNIST, β = 4, latent_dim 64: {np.mean(active):.3g}")
    assert says in text


@pytest.mark.parametrize("term", ["paired t-test", "Wilcoxon signed-rank", "Cohen's d_z",
                                  "SSE at matched rate", "A comparison", "The claim",
                                  "Per β and pooled", "Convergence"])
def test_each_rule_has_a_plain_reading_after_it(term):
    """Every rule the reports state carries two plain sentences after its formal wording."""
    rule = next(r for r in verdicts.rules_text() if term in r)
    formal, plain = rule.split(verdicts.PLAIN)
    assert term in formal
    assert plain.count(". ") + plain.endswith(".") == 2, plain
    assert all(verdicts.PLAIN in r for r in verdicts.rules_text())
