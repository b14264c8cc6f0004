"""The budget ladder, the budgets in epochs and steps, and the default-versus-long table: known
values on constructed curves and frames (no training), then one end-to-end check that builds
the reports with `python -m analysis.report` from a small real store holding runs of two
profiles (2 and 3 epochs on tiny subsets)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import budgets, ladder, loss_choice_verdicts, verdicts
from analysis.kl_remedies import warmup_text

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- stops changing


SAME_5 = ladder.VAL_SSE.same  # within 5% of the value at the longest budget


@pytest.mark.parametrize("values, same, stop", [
    ({1: 10.0, 3: 5.0, 10: 4.1, 30: 4.0}, SAME_5, 10),  # 4.1 is within 5% of 4.0, 5.0 is not
    ({1: 4.0, 3: 4.1, 10: 3.95, 30: 4.0}, SAME_5, 1),  # flat from the first budget
    ({1: 10.0, 3: 8.0, 10: 6.0, 30: 4.0}, SAME_5, None),  # never settles within the budgets
    ({1: 4.0, 3: 8.0, 10: 4.05, 30: 4.0}, SAME_5, 10),  # back within tolerance only from 10
    ({1: 4.0, 30: 4.0}, SAME_5, 1),
    ({30: 4.0}, SAME_5, None),  # one budget: nothing to compare
    ({1: 2.0, 3: 7.0, 10: 7.8, 30: 8.0}, ladder.ACTIVE_UNITS.same, 3),  # within one unit
    ({1: "mixed", 3: "supports", 10: "supports", 30: "supports"}, lambda a, b: a == b, 3),
    ({1: "supports", 3: "supports", 10: "supports", 30: "mixed"}, lambda a, b: a == b, None),
])
def test_stops_changing_at(values, same, stop):
    assert ladder.stops_changing_at(values, same) == stop


@pytest.mark.parametrize("longest, extra, rungs", [
    (30, (10,), [1, 3, 10, 30]), (3, (2,), [1, 2, 3]), (12, (), [1, 3, 10, 12]), (1, (), [1])])
def test_rungs(longest, extra, rungs):
    assert ladder.rungs_for(longest, extra) == rungs


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("params, images, per_epoch", [
    ({"val_size": 5000, "batch_size": 128, "train_subset": None}, 55_000, 430),
    ({"val_size": 500, "batch_size": 100, "train_subset": 1000}, 1000, 10),
    ({"val_size": 5000, "batch_size": 128, "train_subset": "None"}, 55_000, 430),
])
def test_steps_per_epoch_from_the_params(params, images, per_epoch):
    row = pd.Series({"epochs": 10, **params})
    assert budgets.train_images(row) == images
    assert budgets.steps_per_epoch(row) == per_epoch
    assert budgets.budget_of(row).steps == 10 * per_epoch


def test_warmup_is_stated_in_epochs_and_steps():
    row = pd.Series({"warmup": 2, "schedule_unit": "epoch", "val_size": 5000,
                     "batch_size": 128, "epochs": 10, "train_subset": None})
    assert "over 2 epochs = 860 optimizer steps" in warmup_text(row)
    steps = row.copy()
    steps.update({"warmup": 10, "schedule_unit": "step", "val_size": 500, "train_subset": 1000,
                  "batch_size": 100})
    assert "over 1 epoch = 10 optimizer steps" in warmup_text(steps)


# --------------------------------------------------------------------------- a constructed ladder


class CurveStore:
    """A RunStore stand-in: `history` serves constructed curves (run_id, key, step, value)."""

    def __init__(self, curves: pd.DataFrame):
        self.curves = curves

    def history(self, run_ids, keys):
        c = self.curves
        return c[c["run_id"].isin(list(run_ids)) & c["key"].isin(keys)].reset_index(drop=True)


def sse_curve(final: float, start: float, settle: int, epochs: int = 30) -> list[float]:
    """SSE per epoch falling linearly from `start` to `final` by epoch `settle`, flat after."""
    return [start + (final - start) * min(1.0, (e - 1) / max(settle - 1, 1))
            for e in range(1, epochs + 1)]


def ladder_runs(settle: dict[str, int], finals: dict[tuple[str, float], float]):
    """MNIST runs of profile full (30 epochs) for bernoulli, gaussian and gaussian_optimal at
    beta 1 and 4, seeds 0-2: each SSE curve ends at finals[(likelihood, beta)] (+ a seed
    offset shared by the pair) and is flat from epoch settle[likelihood]."""
    rows, curves = [], []
    for lik in ("bernoulli", "gaussian", "gaussian_optimal"):
        for beta in (1.0, 4.0):
            for seed in range(3):
                run_id = f"{lik}-{beta:g}-{seed}"
                rows.append({"run_id": run_id, "dataset": "mnist", "likelihood": lik,
                             "beta": beta, "seed": seed, "latent_dim": 20, "epochs": 30,
                             "batch_size": 128, "val_size": 5000, "train_subset": None,
                             "status": "FINISHED", "tag/profile": "full",
                             "beta_schedule": "constant"})
                sse = sse_curve(finals[(lik, beta)] + 0.3 * seed, 80.0 + 0.1 * seed,
                                settle[lik])
                curves += [(run_id, "val/sse", e, v) for e, v in enumerate(sse, start=1)]
    return pd.DataFrame(rows), pd.DataFrame(curves, columns=["run_id", "key", "step", "value"])


FINALS = {("bernoulli", 1.0): 20.0, ("gaussian", 1.0): 25.0, ("gaussian_optimal", 1.0): 22.0,
          ("bernoulli", 4.0): 30.0, ("gaussian", 4.0): 33.0, ("gaussian_optimal", 4.0): 35.0}


def test_the_ladder_finds_where_metrics_and_verdicts_settle():
    runs, curves = ladder_runs({"bernoulli": 8, "gaussian": 8, "gaussian_optimal": 8}, FINALS)
    built = ladder.build(CurveStore(curves), runs, loss_choice_verdicts.LADDER, extra=[10])
    assert built.rungs == [1, 3, 10, 30]
    assert set(built.metric_stops["stop"]) == {10}  # flat from epoch 8: 10 is the first rung
    verdict = built.verdicts.set_index(["where", "budget"])["verdict"]
    # at epoch 1 every curve starts near 80: no difference; from 10 on, bernoulli wins
    assert verdict[("β = 1", 30)] == verdicts.SUPPORTS
    assert verdict[("β = 1", 1)] != verdicts.SUPPORTS
    assert built.point == 10
    text = ladder.default_sentence(built, (budgets.budget_of(runs.iloc[0], 10), "its runs"))
    # by epoch 3 every curve has fallen 2/7 of its way: the order, and so the verdicts, hold
    assert "The verdicts stop changing at 3 epochs; the metrics' values stop changing at 10 " \
        "epochs. Results stop changing at 10 epochs (4,300 steps)" in text
    assert "That budget is at the point where the results stop changing" in text
    short = ladder.default_sentence(built, (budgets.budget_of(runs.iloc[0], 3), "its runs"))
    assert "short of where the results stop changing" in short


def test_a_ladder_that_never_settles_says_so_plainly():
    # gaussian still falls until epoch 30, and at 30 it overtakes bernoulli at beta 1
    finals = FINALS | {("gaussian", 1.0): 15.0}
    runs, curves = ladder_runs({"bernoulli": 8, "gaussian": 30, "gaussian_optimal": 8}, finals)
    built = ladder.build(CurveStore(curves), runs, loss_choice_verdicts.LADDER, extra=[10])
    assert built.point is None
    stops = built.metric_stops.set_index(["likelihood", "beta"])["stop"]
    assert pd.isna(stops[("gaussian", 1.0)]) and stops[("bernoulli", 1.0)] == 10
    text = ladder.default_sentence(built, (budgets.budget_of(runs.iloc[0], 10), "its runs"))
    assert "lies beyond the ladder" in text and "short of where the results stop changing" in text
    assert "The verdicts still change between the two longest budgets; the metrics' values " \
        "still change between the two longest budgets." in text
    assert "Its verdicts and numbers may both change with longer training." in text
    section = ladder.section(built, (budgets.budget_of(runs.iloc[0], 10), "its runs"))
    cells = [c for b in section.blocks if hasattr(b, "rows") for row in b.rows for c in row]
    assert "not within the ladder" in cells


def test_no_ladder_from_runs_of_one_epoch():
    runs, curves = ladder_runs({"bernoulli": 1, "gaussian": 1, "gaussian_optimal": 1}, FINALS)
    runs["epochs"] = 1
    result = ladder.build(CurveStore(curves), runs, loss_choice_verdicts.LADDER)
    assert isinstance(result, str) and "two or more" in result


# --------------------------------------------------------------------------- default vs long


def profile_runs(profile: str, epochs: int, effects: dict[float, float]) -> pd.DataFrame:
    """Finished MNIST runs of bernoulli and gaussian: test SSE of bernoulli = gaussian's +
    effects[beta] (+ noise), 3 seeds per beta."""
    rng = np.random.default_rng(epochs)
    rows = []
    for beta, effect in effects.items():
        for seed in range(3):
            for lik, shift in (("bernoulli", effect), ("gaussian", 0.0)):
                rows.append({"run_id": f"{profile}-{lik}-{beta:g}-{seed}", "dataset": "mnist",
                             "likelihood": lik, "beta": beta, "seed": seed, "latent_dim": 20,
                             "epochs": epochs, "batch_size": 128, "val_size": 5000,
                             "train_subset": None, "status": "FINISHED",
                             "tag/profile": profile,
                             "test/sse": 30.0 + seed + shift + 0.01 * rng.normal()})
    return pd.DataFrame(rows)


def test_default_beside_long_from_a_two_profile_frame():
    frame = pd.concat([profile_runs("default", 10, {1.0: -2.0, 4.0: -2.0}),
                       profile_runs("full", 30, {1.0: -2.0, 4.0: 2.0})])
    long, default = budgets.long_and_default(frame)
    assert (long.name, long.epochs, default.name, default.epochs) == ("full", 30, "default", 10)
    table = loss_choice_verdicts.compare_profiles(default, long).set_index(["claim", "β"])
    head_d, head_l = "verdict, default: 10 epochs (4,300 steps)", \
        "verdict, full: 30 epochs (12,900 steps)"
    mnist = table.loc["BCE suits MNIST"]
    assert list(mnist.index) == ["β = 1", "β = 4", "pooled"]
    assert mnist.loc["β = 1", head_d] == mnist.loc["β = 1", head_l] == verdicts.SUPPORTS
    assert mnist.loc["β = 4", head_d] == verdicts.SUPPORTS
    assert mnist.loc["β = 4", head_l] == verdicts.CONTRADICTS
    assert mnist.loc["β = 4", "same verdict"] == "no" and mnist.loc["β = 1", "same verdict"] == "yes"
    assert mnist.loc["pooled", "pairs (default)"] == 6 and mnist.loc["β = 1", "pairs (full)"] == 3
    section = loss_choice_verdicts.default_vs_long(frame)
    text = " ".join(b.text for b in section.blocks if hasattr(b, "text"))
    assert "BCE suits MNIST at β = 4 (supports at 10 epochs, contradicts at 30)" in text


def test_one_profile_gives_no_default_vs_long_table():
    assert loss_choice_verdicts.default_vs_long(profile_runs("full", 30, {1.0: -2.0})) is None


# --------------------------------------------------------------------------- end to end


def log_two_profiles(tracking_uri: str, artifact_root: Path, data_root: Path) -> None:
    """A miniature of the two profiles, trained for real on tiny MNIST subsets and logged as
    the runner logs them (per-epoch curves, test metrics, converge/*):

    loss_choice  full: bernoulli, gaussian, gaussian_optimal, gaussian_learned x beta {1, 4}
                 x seeds {0, 1, 2}, 3 epochs; default: the first three likelihoods, 2 epochs
    kl_dynamics  full: beta {1, 4} x {plain, warm-up over 1 epoch, free bits} x seeds {0, 1},
                 latent_dim 8, 3 epochs; default: the same at beta 4 (plain also at 1), 2 epochs
    """
    import mlflow
    import torch

    from study.config import Config
    from study.data import load_splits
    from study.tracking import final_metrics
    from study.train import Callback, train

    class Curves(Callback):
        def on_epoch(self, epoch, metrics):
            mlflow.log_metrics(metrics, step=epoch)

    base = Config(data_root=str(data_root), train_subset=500, val_size=200, test_subset=200,
                  batch_size=100, test_iw_k=5, test_iw_images=50, device="cpu", latent_dim=8)
    lik_grid = [("full", 3, ("bernoulli", "gaussian", "gaussian_optimal", "gaussian_learned")),
                ("default", 2, ("bernoulli", "gaussian", "gaussian_optimal"))]
    variants = {"plain": {}, "warmup": dict(beta_schedule="linear", warmup=1,
                                            schedule_unit="epoch"),
                "free_bits": dict(free_bits=0.25)}
    designs = {"loss_choice": [(p, base.replace(epochs=e, likelihood=lik, beta=b, seed=s,
                                                latent_dim=4))
                               for p, e, liks in lik_grid for lik in liks for b in (1.0, 4.0)
                               for s in range(3)],
               "kl_dynamics": [(p, base.replace(epochs=e, beta=b, seed=s, **v))
                               for p, e in (("full", 3), ("default", 2)) for b in (1.0, 4.0)
                               for name, v in variants.items() for s in range(2)
                               if p == "full" or b == 4.0 or name == "plain"]}
    previous, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    mlflow.set_tracking_uri(tracking_uri)
    torch.set_num_threads(1)
    splits = {}
    try:
        for study, configs in designs.items():
            exp = mlflow.create_experiment(study, (artifact_root / study).as_uri())
            for n, (profile, config) in enumerate(configs):
                key = config.seed
                if key not in splits:
                    splits[key] = load_splits("mnist", data_root, val_size=200, seed=key,
                                              train_subset=500, test_subset=200)
                with mlflow.start_run(experiment_id=exp, run_name=f"{study}/trial-{n:04d}",
                                      tags={"study": study, "profile": profile}):
                    mlflow.log_params(config.as_params())
                    result = train(config, [Curves()], splits=splits[key])
                    mlflow.log_metrics(final_metrics(result))
    finally:
        mlflow.set_tracking_uri(previous)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_profiles(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("two-profiles")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    log_two_profiles(uri, root / "artifacts", data_root)
    out = root / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--tracking-uri", uri, "--out", str(out),
         "--profile", "default"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def page_text(path: Path) -> str:
    """The text of a Markdown page with its escapes undone, for reading sentences."""
    return re.sub(r"\\([\\`*_\[\]|])", r"\1", path.read_text(encoding="utf-8"))


def test_reports_from_two_profiles_show_ladder_sigma_flags_and_comparison(two_profiles):
    loss = page_text(two_profiles / "loss_choice.md")
    html = (two_profiles / "loss_choice.html").read_text(encoding="utf-8")
    # the budget of this report's runs (profile default) and the ladder from the full runs
    assert "Each run trains 2 epochs (10 steps of 100 images, over 500 training images)." in loss
    assert "## Budget ladder: where the results stop changing" in loss
    assert "of profile full, 3 epochs (15 steps of 100 images, over 500 training images) each" \
        in loss
    assert "The default profile trains 2 epochs (10 steps of 100 images" in loss
    assert "according to the params of its 18 finished runs" in loss
    assert re.search(r"\| 1 epoch \(5 steps\) \| 2 epochs \(10 steps\) \| 3 epochs \(15 steps\) "
                     r"\| stops changing at \|", loss)
    # the sigma figure and its sentences; the flags column; per-beta and pooled verdicts
    assert 'id="fig-loss_choice-sigma_over_training"' in html
    assert re.search(r"MNIST, Gaussian, calibrated σ \(σ-VAE\), β = 1: σ = [\d.]+ after epoch 2",
                     loss)
    assert "convergence (settled / still moving / cannot tell) |" in loss
    assert re.search(r"\| MNIST \| BCE suits MNIST \| β = 4 \| [a-z ]+ \|", loss)
    assert re.search(r"\| MNIST \| BCE suits MNIST \| pooled \| [a-z ]+ \|", loss)
    assert "per β: at β = 1 " in loss and "pooled over β: " in loss
    # the default budget beside the long one, both in epochs and steps
    assert "## Verdicts at the default budget beside the long one" in loss
    assert "| verdict, default: 2 epochs (10 steps) | verdict, full: 3 epochs (15 steps) |" in loss
    index = (two_profiles / "index.html").read_text(encoding="utf-8")
    assert "verdict (pooled over β)" in index and "β = 1: " in index
    kl = page_text(two_profiles / "kl_dynamics.md")
    assert "## Collapse at the largest β and latent_dim" in kl
    assert "over 1 epoch = 5 optimizer steps" in kl
    assert "## Budget ladder: where the results stop changing" in kl
    assert "stops changing at" in kl and "convergence (settled / still moving / cannot tell)" in kl
    for page in (loss, kl):
        assert not re.search(r"\b(nan|NaN|None)\b", page)
