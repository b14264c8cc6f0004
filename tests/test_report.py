"""The analysis reports, built from real runs: a session fixture (conftest.py) trains tiny VAEs on real
MNIST / Fashion-MNIST subsets, logs them with the real MLflow client into a temporary sqlite
store in the runner's schema, and `python -m analysis.report` builds the reports from it.
The HTML is opened in a real headless Chromium driven by Playwright (the runs and the page
helpers: report_runs.py).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from report_runs import (
    ARTIFACTS,
    HOSTILE,
    PAGES,
    UI,
    HtmlText,
    copy_store,
    decoded,
    inspect_page,
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


