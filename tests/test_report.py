"""The analysis reports, built from real runs: a session fixture trains tiny VAEs on real
MNIST / Fashion-MNIST subsets, logs them with the real MLflow client into a temporary sqlite
store in the runner's schema, and `python -m analysis.report` builds the reports from it.
The HTML is opened in a real headless Chromium driven by Playwright (the runs and the page
helpers: report_runs.py).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from report_runs import (
    ARTIFACTS,
    HOSTILE,
    HtmlText,
    decoded,
    fixture_config,
    inspect_page,
    log_fixture_runs,
    log_more_runs,
    parsed,
)
from test_figures import assert_readable

from analysis import figures, report, verdicts
from analysis.runs import load_runs, run_url

REPO = Path(__file__).resolve().parents[1]
# How long a command may run before it counts as a hang: it ends on its exit, so a slow or
# busy machine only waits longer.
WAIT_S = 300


# --------------------------------------------------------------------------- fixtures

UI = "http://mlflow.example.test:5000"


@pytest.fixture(scope="session")
def store(tmp_path_factory, data_root):
    """(tracking URI, {study: experiment id}) of the miniature studies."""
    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, log_fixture_runs(uri, root / "artifacts", data_root)


@pytest.fixture(scope="session")
def build(store, tmp_path_factory):
    """The reports built by the CLI from the miniature studies, and the figures they embed."""
    out = tmp_path_factory.mktemp("reports")
    drawn, to_png = [], figures.to_png
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "to_png", lambda fig: drawn.append(fig) or to_png(fig))
        # 0.1 nats: after two epochs on 1000 images a few dimensions are that quiet already
        rc = report.main(["--tracking-uri", store[0], "--out", str(out), "--ui-url", UI,
                          "--collapse-threshold", "0.1"])
    assert rc == 0
    return out, drawn


@pytest.fixture(scope="session")
def built(build):
    """The folder of the built reports."""
    return build[0]


PAGES = ("index", "loss_choice", "kl_dynamics")


# --------------------------------------------------------------------------- tests


def test_cli_writes_every_page_and_figure(built):
    for name in ("index.html", "loss_choice.html", "loss_choice.md", "kl_dynamics.html",
                 "kl_dynamics.md"):
        assert (built / name).stat().st_size > 1000, name
    for name in ("loss_choice", "kl_dynamics"):
        md = (built / f"{name}.md").read_text()
        referenced = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
        assert referenced, f"{name}.md has no figures"
        html_figures = parsed(built / f"{name}.html").images
        assert len(html_figures) == len(referenced)
        for rel in referenced:
            assert (built / rel).is_file(), rel


@pytest.mark.parametrize("page", ["loss_choice", "kl_dynamics"])
def test_every_figure_is_a_non_empty_image(built, page):
    srcs = parsed(built / f"{page}.html").images
    expected = {"loss_choice": 7, "kl_dynamics": 7}[page]
    assert len(srcs) == expected
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]  # embedded, never fetched
        pixels = decoded(base64.b64decode(src.split(",", 1)[1]))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.01, "a blank figure"


def test_every_figure_is_readable_at_its_embedded_size(build):
    """No text under 8 pt, none cut off, no figure the page has to shrink."""
    assert len(build[1]) == 14  # the figures of both pages
    for fig in build[1]:
        assert_readable(fig)


@pytest.mark.parametrize("page", PAGES)
def test_tables_have_no_nan(built, page):
    cells = parsed(built / f"{page}.html").cells
    assert cells
    bad = [c for c in cells if re.search(r"\b(nan|NaN|inf|None)\b", c)]
    assert not bad, bad[:5]
    if page != "index":
        md_rows = [ln for ln in (built / f"{page}.md").read_text().splitlines() if ln.startswith("|")]
        assert md_rows and not [r for r in md_rows if re.search(r"\b(nan|NaN|inf|None)\b", r)]


def test_report_states_what_it_was_built_from(built, store):
    uri, ids = store
    html = (built / "loss_choice.html").read_text()
    for fact in (f"loss_choice (experiment {ids['loss_choice']})", "16 trial runs: 16 finished",
                 "<dt>profile</dt><dd>test</dd>", "<dt>seeds</dt><dd>0, 1</dd>",
                 "<dt>epochs</dt><dd>1</dd>", "0123abc (uncommitted changes)", uri):
        assert fact in html, fact
    kl = (built / "kl_dynamics.html").read_text()
    assert "1 killed, 1 failed" in kl  # the search study's pruned and failed trials
    assert "repeated a grid point" not in html  # no two runs share a grid point and seed
    runs = load_runs(uri).finished("loss_choice")
    assert len(runs) == 16
    for run in runs.itertuples():  # every run is linked from the rate-distortion figure
        assert f'href="{run_url(UI, run.experiment_id, run.run_id)}"' in html


def test_sections_are_generated_from_the_numbers(built, store):
    text = (built / "loss_choice.md").read_text()
    audit_row = "| MSE, averaged over pixels | F.mse\\_loss(x\\_hat, x) | 1/784 | 392 |"
    for needle in ("Loss-scale audit for D = 784", audit_row,
                   "8.7% of all pixels are mid-grey", "49.7% of the ink pixels",
                   "39.8% of all pixels are mid-grey", "88.0% of the ink pixels",
                   "SSE (summed over pixels)", "1 − SSIM", "linear-probe accuracy"):
        assert needle in text, needle
    # the verdicts the report states are the rules applied to the same runs
    runs = load_runs(store[0]).finished("loss_choice")
    for claim in verdicts.CLAIMS:
        v = verdicts.claim_verdict(runs, claim)
        assert v.verdict in {verdicts.SUPPORTS, verdicts.CONTRADICTS, verdicts.MIXED}
        assert report.md_escape(" ".join(v.sentences())) in text
    # each rule the verdicts follow is read in plain words right after its formal wording
    rule = next(ln for ln in text.splitlines() if "The Wilcoxon signed-rank test:" in ln)
    assert rule.index("Wilcoxon") < rule.index("In plain words: ")
    kl = (built / "kl_dynamics.md").read_text()
    assert re.search(r"MNIST, latent\\_dim 8, β = 16: the validation KL is [\d.]+ nats after epoch 1", kl)
    per_beta = r"MNIST, β = (1|16) \(seed 0\): (\d+ of 8 dimensions had collapsed|none of the 8)"
    assert len(re.findall(per_beta, kl)) == 2
    assert "had collapsed (KL < 0.1 nats) by epoch" in kl.replace("&lt;", "<")
    assert "with free bits λ = 0.5 the final validation KL is" in kl
    assert "with linear warm-up over 10 steps the final validation KL is" in kl
    assert "search\\_mnist (MNIST): " in kl and "Pareto-optimal" in kl


def test_a_hostile_run_name_is_shown_as_text(built):
    html = (built / "loss_choice.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for page in PAGES:
        assert "<script" not in (built / f"{page}.html").read_text().lower(), page
    md = (built / "loss_choice.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "<script" not in md


@pytest.mark.parametrize("text", [
    "Burda, Grosse & Salakhutdinov", "a &amp; b, &#60; and &lt;", "<script>x</script>",
    "KL < 0.1 and k > 1", "latent_dim *beta* [link](x) `code` back\\slash"])
def test_markdown_escaping_renders_the_literal_text(text):
    """What md_escape writes, a Markdown renderer shows exactly as the original string, with
    no tag or emphasis made; a plain ampersand is left as it is in the .md text."""
    import markdown

    escaped = report.md_escape(text)
    rendered = markdown.markdown(escaped)
    assert HtmlText.of(rendered) == (text, ["p"])
    if "&" in text and not re.search(r"&#?\w+;", text):
        assert "&amp;" not in escaped


@pytest.mark.parametrize("page", PAGES)
def test_pages_render_in_chromium(built, page, browser):
    shot = ARTIFACTS / f"report-{page}.png"
    seen = inspect_page(built / f"{page}.html", shot, browser)
    assert not seen["console_errors"] and not seen["exceptions"] and not seen["log_errors"], seen
    assert not seen["dialogs"], "a script ran"
    assert all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]
    assert all(width > 0 and height > 0 for _, width, height in seen["images"]), seen["images"]
    assert len(seen["images"]) == {"index": 0, "loss_choice": 7, "kl_dynamics": 7}[page]
    assert shot.stat().st_size > 10_000
    if page == "loss_choice":
        assert HOSTILE in seen["text"]  # the escaped name reads as the literal string


def copy_store(uri: str, dest: Path) -> Path:
    """A consistent copy of the SQLite store at `uri` through SQLite's backup API: the stores run
    in WAL mode, so recent commits may still sit in the -wal file a plain file copy misses."""
    source = sqlite3.connect(uri[len("sqlite:///"):])
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    return dest


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


def test_a_build_reads_the_data_evidence_from_the_store_without_torch(store, tmp_path):
    """The reports never touch the datasets or torch: the pixel statistics and loss curves come
    from the evidence.json the study run logged. A progress line per page goes to stderr."""
    out = tmp_path / "reports"
    code = ("import sys; from analysis import report; "
            f"rc = report.main(['--tracking-uri', {store[0]!r}, '--out', {str(out)!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "VAE_DATA_ROOT": "/nonexistent"})
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("loss_choice", "kl_dynamics", "index"):
        assert f"report: building {page}" in result.stderr
    loss = (out / "loss_choice.md").read_text()
    assert "entropy floor" in loss and "no data evidence" not in loss
    assert "pixel_histograms" in loss and "loss_curves" in loss


def test_an_empty_or_missing_store_is_a_one_line_error(store, tmp_path, capsys):
    from mlflow import MlflowClient

    uri, ids = store
    copy = copy_store(uri, tmp_path / "empty.db")
    for experiment_id in ids.values():  # a store with experiments but no trial runs
        MlflowClient(tracking_uri=f"sqlite:///{copy}").delete_experiment(experiment_id)
    missing = tmp_path / "nowhere" / "mlflow.db"
    for target in (f"sqlite:///{copy}", f"sqlite:///{missing}"):
        capsys.readouterr()
        assert report.main(["--tracking-uri", target, "--out", str(tmp_path / "out")]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "make study" in lines[0], lines
        assert not (tmp_path / "out").exists()
    assert not missing.exists()  # reading never creates a store


def test_a_password_in_the_tracking_uri_is_redacted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert report.main(["--tracking-uri", "http://vae:hunter2@127.0.0.1:9",
                        "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.err + captured.out
    assert "error: cannot read the MLflow store http://vae:***@127.0.0.1:9" in captured.err


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "analysis.report", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 0
    for option in ("--tracking-uri", "--out", "--ui-url", "--profile", "--collapse-threshold"):
        assert option in result.stdout


def test_report_from_the_real_smoke_suite(tmp_path, data_root, monkeypatch, browser):
    """`make study PROFILE=smoke` then `make report`: the real runner's runs, not the fixture's."""
    from study import runner

    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    stores = tmp_path / "stores"
    stores.mkdir()
    uri = f"sqlite:///{stores / 'mlflow.db'}"
    assert runner.main(["run", "--profile", "smoke", "--device", "cpu",
                        "--storage", f"sqlite:///{stores / 'optuna.db'}",
                        "--tracking-uri", uri]) == 0
    out = tmp_path / "reports"
    # another profile's runs are not mixed in: asking for one the store lacks is an error
    assert report.main(["--tracking-uri", uri, "--out", str(tmp_path / "none"),
                        "--profile", "default"]) == 2
    assert not (tmp_path / "none" / "index.html").exists()
    assert report.main(["--tracking-uri", uri, "--out", str(out), "--ui-url", UI,
                        "--profile", "smoke"]) == 0
    assert "entropy floor" in (out / "loss_choice.md").read_text()  # the study run's evidence
    for page in PAGES:
        tables = parsed(out / f"{page}.html")
        assert tables.cells
        assert not [c for c in tables.cells if re.search(r"\b(nan|NaN|inf|None)\b", c)]
    for page in ("loss_choice", "kl_dynamics"):
        srcs = parsed(out / f"{page}.html").images
        assert srcs
        for src in srcs:
            pixels = decoded(base64.b64decode(src.split(",", 1)[1]))
            assert pixels[..., :3].std() > 0.01, "a blank figure"
    text = (out / "loss_choice.md").read_text()
    assert "Verdicts" in text and "profile" in text.lower()
    seen = inspect_page(out / "loss_choice.html", ARTIFACTS / "report-smoke-loss_choice.png", browser)
    assert not seen["console_errors"] and not seen["exceptions"] and not seen["log_errors"], seen
    assert all(width > 0 and height > 0 for _, width, height in seen["images"]), seen["images"]


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
