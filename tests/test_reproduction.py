"""The burda2016 spec's smoke profile end to end: both Table 1 rows (VAE, IWAE k = 50) train
with the paper's settings at toy size and log the importance-weighted test bound; the
reproduction page built from those runs states the paper's numbers, ours, the budget and a
verdict; the verdict rule on constructed rows."""

from __future__ import annotations

import math
import sqlite3

import optuna
import pytest
from mlflow import MlflowClient
from report_runs import ARTIFACTS, HOSTILE, inspect_page, parsed

from analysis import report
from analysis import reproduction as repro
from analysis.runs import load_runs
from study import runner

PAPER = {"vae": ("VAE (k = 1)", 86.76), "iwae_k50": ("IWAE (k = 50)", 84.78),
         "vae_torch": ("VAE (k = 1), torch.optim.Adam, nn.Linear init", 86.76)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_root):
    """The smoke study run once: {"uri", "storage", "runs": {variant: mlflow Run}}."""
    root = tmp_path_factory.mktemp("burda2016")
    storage = f"sqlite:///{root / 'optuna.db'}"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_DATA_ROOT", str(data_root))
        assert runner.main(["run", "--profile", "smoke", "--study", "burda2016", "--device",
                            "cpu", "--storage", storage, "--tracking-uri", uri]) == 0
    study = optuna.load_study(study_name="burda2016-smoke", storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    client = MlflowClient(tracking_uri=uri)
    runs = {t.params.get("variant"): client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    return {"uri": uri, "storage": storage, "trials": trials, "runs": runs}


@pytest.fixture(scope="module")
def built(smoke, tmp_path_factory):
    """`python -m analysis.report --profile smoke` over the smoke study's store."""
    out = tmp_path_factory.mktemp("reports")
    assert report.main(["--tracking-uri", smoke["uri"], "--out", str(out),
                        "--profile", "smoke"]) == 0
    return out


def test_burda2016_smoke_end_to_end(smoke):
    assert len(smoke["trials"]) == 3
    runs = smoke["runs"]
    assert set(runs) == {"vae", "iwae_k50", "vae_torch"}
    for variant, run in runs.items():
        params = run.data.params
        # the authors' Adam and initialization, except in the row that measures torch's
        torch_row = variant == "vae_torch"
        assert params["optimizer"] == ("adam" if torch_row else "adam_burda")
        assert params["init"] == ("torch" if torch_row else "glorot")
        assert params["binarize"] == "dynamic" and params["hidden"] == "(200, 200)"
        assert params["activation"] == "tanh" and params["latent_dim"] == "50"
        assert params["batch_size"] == "20" and params["adam_eps"] == "0.0001"
        assert params["lr_schedule"] == "burda" and params["val_size"] == "400"
        assert params["iw_samples"] == ("50" if variant == "iwae_k50" else "1")
        nll = run.data.metrics["test/iwae_nll"]
        assert math.isfinite(nll) and nll > 0
        # the k-sample bound is never above the ELBO's negative on average
        assert nll <= run.data.metrics["test/nelbo"] + 1.0
        assert run.data.tags["machine"]  # the CPU model (or GPU name) that ran the trial


def _rows(cells: list[str], width: int) -> dict[str, list[str]]:
    """The first table row starting with each Table 1 label, from a flat list of cells."""
    rows = {}
    for i, text in enumerate(cells):
        if text in {label for label, _ in PAPER.values()}:
            rows.setdefault(text, cells[i:i + width])
    return rows


def test_reproduction_page_from_the_smoke_runs(smoke, built):
    html_page, md_page = built / "reproduction.html", built / "reproduction.md"
    assert html_page.is_file() and md_page.is_file()
    assert 'href="reproduction.html"' in (built / "index.html").read_text()
    html, md = html_page.read_text(), md_page.read_text()
    table = _rows(parsed(html_page).cells, 7)  # the Table 1 table comes first
    for variant, (label, paper) in PAPER.items():
        ours = smoke["runs"][variant].data.metrics["test/iwae_nll"]  # read back from MLflow
        row = table[label]
        assert row[1] == f"{paper:.2f}"
        assert row[2] == f"{ours:.2f} (1 seed)"
        assert row[3] == f"{ours - paper:+.2f}"  # the gap is ours - paper
        assert row[4] == "1"
        assert row[5].startswith("not a reproduction yet: shortened schedule: 1 of 3,280 epochs")
        assert row[5].endswith("the gap is not comparable")
        assert "k = 5, not 5,000" in row[5] and "200 of 10,000 test images" in row[5]
        active = smoke["runs"][variant].data.metrics["test/active_units"]
        assert row[6] == f"{active:.0f} of 50"
        md_row = (f"| {label} | {paper:.2f} | {ours:.2f} (1 seed) | {ours - paper:+.2f} | 1 | "
                  f"not a reproduction yet: shortened schedule: 1 of 3,280 epochs")
        assert md_row in md, md_row
        budget = (f"{label}: 1 of 3,280 epochs (1 of 8 stages) on 1,000 training images, "
                  f"tested with k = 5 on 200 test images")
        assert budget in html and budget in md
    assert "Budget used: " in html
    machine = smoke["runs"]["vae"].data.tags["machine"]
    assert f"cpu ({report.md_escape(machine)})" in md
    assert "Table 1 of Burda, Grosse & Salakhutdinov 2016" in md  # no double escape
    for fact in ("Where this code differs from the paper", "yburda/iwae", "0.99",
                 "59,600 / 400", "Dynamic binarization"):
        assert fact in md and fact in html, fact
    reduction = "nats per image (summed over the 784 pixels, averaged over the test images)"
    assert reduction in md and reduction in html
    assert "reproduced (within 1 nat)" not in html + md
    seen = inspect_page(html_page, ARTIFACTS / "report-reproduction.png")
    assert not seen["console_errors"] and not seen["exceptions"] and not seen["log_errors"], seen
    assert not seen["dialogs"], "a script ran"
    assert all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]
    assert "86.76" in seen["text"] and "84.78" in seen["text"]
    assert "Where this code differs from the paper" in seen["text"]


def copy_store(smoke, tmp_path) -> str:
    """A copy of the smoke study's MLflow store, to change without touching the original."""
    copy = tmp_path / "mlflow.db"
    # sqlite's backup, not a file copy: the latest writes may still sit in the write-ahead log
    source, dest = sqlite3.connect(smoke["uri"][len("sqlite:///"):]), sqlite3.connect(copy)
    source.backup(dest)
    source.close()
    dest.close()
    return f"sqlite:///{copy}"


def test_a_hostile_tag_is_shown_as_text(smoke, tmp_path):
    uri = copy_store(smoke, tmp_path)
    MlflowClient(tracking_uri=uri).set_tag(smoke["runs"]["vae"].info.run_id, "machine", HOSTILE)
    out = tmp_path / "reports"
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--profile", "smoke"]) == 0
    html, md = (out / "reproduction.html").read_text(), (out / "reproduction.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "<script" not in md.lower()


def test_a_stopped_run_is_listed_as_unfinished_not_counted(smoke, tmp_path):
    """A run stopped with a resumable state (what SIGTERM or --stop-after leave) is reported
    with how far it got and how to resume it; its numbers stay out of Table 1. A failed run
    is not listed."""
    uri = copy_store(smoke, tmp_path)
    client = MlflowClient(tracking_uri=uri)
    vae, iwae = smoke["runs"]["vae"].info.run_id, smoke["runs"]["iwae_k50"].info.run_id
    client.set_tag(vae, "stop_reason", "stopped at the end of epoch 1 of 1 (SIGTERM received); "
                                       "run the same command again to resume from there")
    client.update_run(vae, status="KILLED")
    store = load_runs(uri, "smoke")
    (unfinished,) = repro.unfinished_runs(store)
    assert (unfinished.label, unfinished.seed, unfinished.epoch) == ("VAE (k = 1)", 0, 1)
    assert unfinished.state == "stopped at the end of epoch 1 of 1 (SIGTERM received)"
    val = client.get_metric_history(vae, "val/nelbo")[-1].value
    assert unfinished.val_nelbo == val
    page = repro.build(repro.Context(store, render_md=lambda *a, **k: ""))
    text = page.summary + " ".join(
        getattr(b, "text", "") for s in page.sections for b in s.blocks)
    assert "1 run not finished yet" in page.summary
    assert (f"VAE (k = 1), seed 0: epoch 1 of 1 (1 of 8 stages), validation NELBO "
            f"{val:.2f} nats per image") in text
    assert '"make study STUDY=burda2016 PROFILE=smoke" again resumes' in text
    vae_row, iwae_row, torch_row = repro.rows_of(store.finished(repro.STUDY))
    assert vae_row.n == 0 and iwae_row.n == 1 and torch_row.n == 1  # the stopped run is not

    client.update_run(vae, status="FAILED")
    assert repro.unfinished_runs(load_runs(uri, "smoke")) == []
    client.update_run(iwae, status="FAILED")
    client.update_run(smoke["runs"]["vae_torch"].info.run_id, status="FAILED")
    assert repro.build(repro.Context(load_runs(uri, "smoke"), render_md=lambda *a, **k: "")) \
        is None


def test_no_burda2016_runs_no_page(smoke):
    store = load_runs(smoke["uri"], "smoke")
    store.frame = store.frame[store.frame["study"] != repro.STUDY]
    assert repro.build(repro.Context(store, render_md=lambda *a, **k: "")) is None


FULL = repro.Budget(epochs=3280, train_images=59_600, train_images_available=59_600,
                    test_k=5000, test_images=10_000)
SHORT = repro.Budget(epochs=13, train_images=59_600, train_images_available=59_600,
                     test_k=1000, test_images=1000)


@pytest.mark.parametrize("budget, gap, expected", [
    (FULL, 0.4, ["reproduced (within 1 nat)"]),
    (FULL, -0.99, ["reproduced (within 1 nat)"]),
    (FULL, 2.0, ["not reproduced", "+2.00 nats", "not within 1 nat"]),
    (FULL, -2.0, ["not reproduced", "-2.00 nats", "not within 1 nat"]),
    (SHORT, 0.1, ["not a reproduction yet", "shortened schedule: 13 of 3,280 epochs",
                  "k = 1,000, not 5,000", "1,000 of 10,000 test images", "not comparable"]),
    (repro.Budget(3280, 59_600, 59_600, 1000, 10_000), 0.1,
     ["not a reproduction yet", "k = 1,000, not 5,000", "not comparable"]),
    (repro.Budget(3280, 1000, 59_600, 5000, 10_000), 0.1,
     ["not a reproduction yet", "trained on 1,000 of 59,600 images", "not comparable"]),
])
def test_verdict_rule(budget, gap, expected):
    paper = repro.TABLE1[0]
    row = repro.Row(paper, paper.nll + gap, math.nan, math.nan, 1, budget)
    text = repro.verdict(row)
    for phrase in expected:
        assert phrase in text, (phrase, text)
    if expected[0] != repro.REPRODUCED:
        assert repro.REPRODUCED not in text
    assert repro.verdict(repro.Row(paper, math.nan, math.nan, math.nan, 0, None)) == \
        "no finished runs"


@pytest.mark.parametrize("epochs, expected", [
    (1, "1 of 8 stages"), (4, "2 of 8 stages"), (13, "3 of 8 stages"),
    (20, "3 of 8 stages and 7 of the 27 passes of stage 3"), (3280, "8 of 8 stages"),
])
def test_stages_covered(epochs, expected):
    assert repro.stages_text(epochs) == expected


def test_several_seeds_give_a_t_interval():
    import pandas as pd
    from scipy import stats

    values = [86.1, 86.9, 87.4]
    runs = pd.DataFrame({
        "variant": ["vae"] * 3, "test/iwae_nll": values, "seed": [0, 1, 2], "epochs": 3280,
        "val_size": 400, "train_subset": "None", "test_subset": "None", "test_iw_k": 5000,
        "test_iw_images": "None",
    })
    vae, iwae, torch_row = repro.rows_of(runs.assign(optimizer="adam_burda", init="glorot"))
    lo, hi = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
    assert repro.ours_text(vae) == f"{sum(values) / 3:.2f} [{lo:.2f}, {hi:.2f}]"
    assert vae.n == 3 and vae.budget == FULL and repro.verdict(vae) == repro.REPRODUCED
    assert iwae.n == 0 and repro.verdict(iwae) == "no finished runs"
    assert torch_row.n == 0


def test_runs_join_rows_by_what_they_computed():
    """A run's row follows its settings, not the variant's name: VAE runs made before the spec
    had `optimizer` and `init` (no such params: torch's Adam and init) land in the torch row."""
    import pandas as pd

    runs = pd.DataFrame({
        "variant": ["vae", "vae", "vae_torch", "iwae_k50"],
        "optimizer": [None, "adam_burda", "adam", "adam_burda"],
        "init": [None, "glorot", "torch", "glorot"],
        "iw_samples": ["1", "1", "1", "50"],
        "test/iwae_nll": [88.0, 86.5, 89.0, 84.9], "seed": [0, 0, 1, 0], "epochs": 3280,
        "val_size": 400, "train_subset": "None", "test_subset": "None", "test_iw_k": 5000,
        "test_iw_images": "None",
    })
    vae, iwae, torch_row = repro.rows_of(runs)
    assert (vae.n, vae.mean) == (1, 86.5) and (iwae.n, iwae.mean) == (1, 84.9)
    assert torch_row.n == 2 and torch_row.mean == pytest.approx(88.5)
    assert repro.verdict(vae) == repro.REPRODUCED and "not reproduced" in repro.verdict(torch_row)
