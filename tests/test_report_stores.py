"""The reports built from stores that are not whole: a partial store, degenerate subsets of
the suite, grid points trained again, and a build killed part-way. The miniature studies are
conftest.py's `store` (report_runs.py); each test works on a copy.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from report_runs import PAGES, UI, copy_store, fixture_config, log_more_runs, parsed

from analysis import report
from analysis.runs import load_runs

REPO = Path(__file__).resolve().parents[1]


def test_partial_store_builds_and_lists_what_is_missing(store, tmp_path):
    from mlflow import MlflowClient

    uri, ids = store
    copy = copy_store(uri, tmp_path / "mlflow.db")
    partial = f"sqlite:///{copy}"
    client = MlflowClient(tracking_uri=partial)
    for study in ("kl_dynamics", "search_mnist"):
        client.delete_experiment(ids[study])
    for run in client.search_runs([ids["loss_choice"]], max_results=1000):
        if "likelihood" not in run.data.params:  # the study run, and with it the data evidence
            client.delete_run(run.info.run_id)
    out = tmp_path / "reports"
    assert report.main(["--tracking-uri", partial, "--out", str(out)]) == 0
    kl = (out / "kl_dynamics.html").read_text()
    index = (out / "index.html").read_text()
    for command in ("make study STUDY=kl_dynamics", "make study STUDY=search_mnist",
                    "make study STUDY=search_fashion", "make study STUDY=loss_choice"):
        assert command in index, command
    for command in ("make study STUDY=kl_dynamics", "make study STUDY=search_mnist"):
        assert command in kl, command
    assert "no finished runs of kl_dynamics" in kl
    loss = (out / "loss_choice.html").read_text()
    assert "make study STUDY=loss_choice" in loss and "no data evidence" in loss
    assert len(parsed(out / "loss_choice.html").images) == 5  # no study run: no data evidence
    assert "Verdicts" in loss  # the trained-model evidence stands on the runs alone
    # the story first: Missing data closes each page, once
    mds = [(out / f"{n}.md").read_text() for n in ("kl_dynamics", "loss_choice")]
    for headings in ([re.findall(r"<h2[^>]*>([^<]+)</h2>", h) for h in (kl, loss, index)]
                     + [re.findall(r"^## (.+)$", md, flags=re.M) for md in mds]):
        assert headings[-1] == "Missing data" and headings.count("Missing data") == 1


# --------------------------------------------------------------------------- degenerate subsets


def subset_store(uri: str, dest: Path, keep) -> str:
    """A copy of the store at `uri` where every trial run for which keep(study, params) is false
    is deleted (MLflow's soft delete: search_runs no longer returns it)."""
    from mlflow import MlflowClient

    target = f"sqlite:///{copy_store(uri, dest)}"
    client = MlflowClient(tracking_uri=target)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            params = run.data.params
            if "likelihood" in params and not keep(experiment.name, params):
                client.delete_run(run.info.run_id)
    return target


def _one_run_each(study, p):
    return {
        "loss_choice": (p["dataset"], p["likelihood"], p["beta"], p["seed"])
        == ("fashion", "gaussian", "0.5", "1"),
        "kl_dynamics": (p["beta"], p["latent_dim"], p["beta_schedule"], p["free_bits"])
        == ("1.0", "2", "constant", "0.0"),
        "search_mnist": p["beta"] == "0.3",
    }[study]


DEGENERATE = {
    # the README's `ONLY=likelihood=bernoulli`: one likelihood, no pair for any verdict
    "bernoulli_only": lambda study, p: study == "loss_choice" and p["likelihood"] == "bernoulli",
    # one dataset, likelihood, beta, seed, latent_dim and search trial per study
    "one_run_each": _one_run_each,
    # warm-up and free bits without a constant-beta run to compare with
    "kl_variants_only": lambda study, p: study == "kl_dynamics" and (
        p["beta_schedule"] != "constant" or float(p["free_bits"]) > 0),
}


@pytest.mark.parametrize("subset", list(DEGENERATE))
def test_every_page_builds_from_a_degenerate_subset(store, tmp_path, subset):
    uri = subset_store(store[0], tmp_path / "mlflow.db", DEGENERATE[subset])
    out = tmp_path / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--tracking-uri", uri, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for page in PAGES:
        assert (out / f"{page}.html").stat().st_size > 1000, page
        cells = parsed(out / f"{page}.html").cells
        assert not [c for c in cells if re.search(r"\b(nan|NaN|inf|None)\b", c)], page
    for page in ("loss_choice", "kl_dynamics"):
        md = (out / f"{page}.md").read_text()
        for rel in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
            assert (out / rel).stat().st_size > 1000, rel


# --------------------------------------------------------------------------- repeated runs


def test_a_grid_point_trained_again_counts_once(store, data_root, tmp_path):
    """Issue #19, 4.1: with its Optuna store emptied the runner trains every point again and
    MLflow holds two FINISHED runs of one grid point and seed. The reports count the newest
    once and say how many runs they skipped; a new seed or a changed setting still counts."""
    from mlflow import MlflowClient

    copy = f"sqlite:///{copy_store(store[0], tmp_path / 'mlflow.db')}"
    before = load_runs(copy).frame

    def run_id(study, **params):
        match = before[before["study"] == study]
        for name, value in params.items():
            match = match[match[name] == value]
        assert len(match) == 1, params
        return match["run_id"].iloc[0]

    point = dict(dataset="mnist", likelihood="bernoulli", beta=0.5)
    first = run_id("loss_choice", **point, seed=0)
    # as in the issue, seed 0 is the only seed of this point
    MlflowClient(tracking_uri=copy).delete_run(run_id("loss_choice", **point, seed=1))
    base = fixture_config(data_root)
    elsewhere = tmp_path / "elsewhere"  # the same data under another path, as on another machine
    elsewhere.symlink_to(Path(data_root).resolve(), target_is_directory=True)
    again, new_seed, other_lr = log_more_runs(copy, "loss_choice", [
        # trained again elsewhere: only the fields that say where and how fast differ
        base.replace(**point, seed=0, device="auto", threads=1, checkpoint_minutes=0.0,
                     data_root=str(elsewhere)),
        base.replace(**point | {"likelihood": "gaussian"}, seed=2),
        base.replace(dataset="fashion", beta=2.0, seed=0, lr=2e-3),
    ], data_root, tmp_path)
    log_more_runs(copy, "kl_dynamics", [base.replace(beta=1.0, latent_dim=2, epochs=2)],
                  data_root, tmp_path)
    burda = base.replace(optimizer="adam_burda", init="glorot")
    log_more_runs(copy, "burda2016", [burda, burda], data_root, tmp_path)

    out = tmp_path / "reports"
    assert report.main(["--tracking-uri", copy, "--out", str(out)]) == 0
    md = (out / "loss_choice.md").read_text()
    cells = re.search(r"^\| MNIST \| bernoulli \| 0\.5 \| (\d+) \| ([^|]+) \|", md, re.M)
    assert cells.group(1) == "1" and "[" not in cells.group(2)  # no zero-width interval
    assert re.search(r"^\| MNIST \| gaussian \| 0\.5 \| 3 \|", md, re.M)
    repro = (out / "reproduction.md").read_text()
    assert re.search(r"^\| VAE \(k = 1\) \| [^|]+ \| [^|]+ \| [^|]+ \| 1 \|", repro, re.M)
    used = "the newest finished run of each grid point and seed is used"
    for page, skipped in (("loss_choice", "1 finished run"), ("kl_dynamics", "1 finished run"),
                          ("reproduction", "1 finished run"), ("index", "3 finished runs")):
        for ext in ("html", "md") if page != "index" else ("html",):
            text = (out / f"{page}.{ext}").read_text()
            assert f"{skipped} repeated a grid point and seed already counted" in text, page
            assert used in text, page

    runs = load_runs(copy)
    counted = set(runs.finished("loss_choice")["run_id"])
    assert again in counted and first not in counted  # the newest finished run is kept
    assert runs.frame.set_index("run_id").at[first, "duplicate_of"] == again
    assert {new_seed, other_lr} <= counted and len(counted) == 17
    assert len(runs.finished("kl_dynamics")) == 6 and len(runs.finished("burda2016")) == 1


# --------------------------------------------------------------------------- a killed build


def test_a_killed_build_leaves_the_previous_pages_whole(store, tmp_path):
    """Issue #19, 4.3: SIGKILL of `python -m analysis.report` in the middle of its build leaves
    every page of the previous build as it was, and the next build clears what it left."""
    # loss_choice only: each build takes seconds
    uri = subset_store(store[0], tmp_path / "mlflow.db", lambda study, _: study == "loss_choice")
    out = tmp_path / "reports"
    args = ["--tracking-uri", uri, "--out", str(out)]
    assert report.main([*args, "--ui-url", UI]) == 0

    def files():
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and not p.relative_to(out).parts[0].startswith(".staging-")}

    previous = files()
    page = out / "loss_choice.html"
    before = page.stat()
    # another UI address changes every run link, so each new page differs from its old one
    build = subprocess.Popen(
        [sys.executable, "-m", "analysis.report", *args, "--ui-url", "http://other.test:5000"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / f".staging-{build.pid}"
    try:
        # kill once the build has started writing: its staging folder exists, or (a build
        # writing in place) loss_choice.html has been opened
        while build.poll() is None:
            now = page.stat()
            if staging.exists() or (now.st_mtime_ns, now.st_size, now.st_ino) != (
                    before.st_mtime_ns, before.st_size, before.st_ino):
                break
            time.sleep(0.001)
        build.send_signal(signal.SIGKILL)
    finally:
        build.kill()
        build.wait(timeout=60)
    assert build.returncode == -signal.SIGKILL, "the build ended before it was killed"
    assert files() == previous  # every page and figure of the previous build, byte for byte
    assert staging.is_dir()  # what the killed build left

    assert report.main([*args, "--ui-url", UI]) == 0
    assert not list(out.glob(".staging-*"))
    for name in ("index.html", "loss_choice.html", "loss_choice.md", "kl_dynamics.html",
                 "kl_dynamics.md"):
        assert (out / name).stat().st_size > 1000, name
