"""Entry point: MLflow runs -> reports/. `python -m analysis.report --tracking-uri URI --out DIR`
writes index.html, loss_choice.html/.md and kl_dynamics.html/.md (figures of the Markdown
under DIR/figures/), and reproduction.html/.md when the store has finished burda2016 runs.
The HTML is self-contained: figures are embedded, nothing is fetched. A build writes into
DIR/.staging-<pid>/ and moves its files into place once all are built, so a killed build
leaves the previous pages whole.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import sys
from pathlib import Path

from analysis import kl_dynamics, loss_choice, reproduction, tables
from analysis.evidence import from_json
from analysis.runs import FINISHED, RunStore, load_runs, redact
from study.errors import UsageError
from study.paths import EVIDENCE_FILE
from study.stores import default_tracking_uri

TEMPLATES = Path(__file__).with_name("templates")
DEFAULT_UI = "http://127.0.0.1:5000"
EXPECTED_STUDIES = ("loss_choice", "kl_dynamics", "search_mnist", "search_fashion")
STAGING_PREFIX = ".staging-"
"""A build writes into `<out>/.staging-<pid>/` and moves the files into place at the end."""


# --------------------------------------------------------------------------- rendering

_MD_SPECIAL = re.compile(r"([\\`*_\[\]])")
_MD_ENTITY_START = re.compile(r"&(?=#?[A-Za-z0-9]+;)")


def md_escape(text) -> str:
    """A user or generated string as literal Markdown text: HTML tags and emphasis disarmed.
    An ampersand is escaped only where it would start a character reference (`&lt;`), so
    "Grosse & Salakhutdinov" stays readable in the .md file and renders the same."""
    text = _MD_ENTITY_START.sub("&amp;", str(text)).replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_cell(text) -> str:
    return md_escape(text).replace("|", "\\|").replace("\n", " ")


def md_url(url) -> str:
    return str(url).replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def environments():
    """(html, markdown) jinja2 environments; autoescape is on for HTML."""
    import jinja2
    import markdown
    from markupsafe import Markup

    loader = jinja2.FileSystemLoader(TEMPLATES)
    html_env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    md_env = jinja2.Environment(loader=loader, autoescape=False, keep_trailing_newline=True,
                                undefined=jinja2.StrictUndefined)
    html_env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    # Markdown blocks come only from this package's templates filled with computed numbers.
    html_env.filters["markdown_html"] = lambda src: Markup(
        markdown.markdown(src, extensions=["tables"]))
    md_env.filters.update(md=md_escape, md_cell=md_cell, md_url=md_url)
    return html_env, md_env


def write(path: Path, text: str) -> None:
    """Write `text` with any password in a URI redacted."""
    path.write_text(redact(text), encoding="utf-8")


# --------------------------------------------------------------------------- building


def read_evidence(store: RunStore):
    """The data evidence the newest loss_choice study run logged, or (None, why not)."""
    doc = store.study_artifact(loss_choice.STUDY, EVIDENCE_FILE)
    if doc is None:
        return None, (f"no {loss_choice.STUDY} study run in the store has logged "
                      f"{EVIDENCE_FILE} (it is logged when a study starts)")
    return from_json(doc), None


def study_rows(store: RunStore, ui_url: str) -> list[dict]:
    frame = store.frame
    names = list(dict.fromkeys([*EXPECTED_STUDIES, *sorted(set(frame["study"]))]))
    rows = []
    for name in names:
        runs = frame[frame["study"] == name]
        counts = runs["status"].value_counts()
        exp = store.experiments.get(name)
        rows.append({
            "name": name, "purpose": tables.STUDY_PURPOSE.get(name, "—"), "runs": len(runs),
            "finished": int(counts.get(FINISHED, 0)), "killed": int(counts.get("KILLED", 0)),
            "failed": int(counts.get("FAILED", 0)), "experiment_id": exp,
            "url": f"{ui_url.rstrip('/')}/#/experiments/{exp}" if exp else None,
            "command": tables.make_command(name),
        })
    return rows


def build_reports(tracking_uri: str, out: Path, ui_url: str = DEFAULT_UI,
                  collapse_threshold: float = kl_dynamics.COLLAPSE_THRESHOLD,
                  profile: str | None = None) -> list[Path]:
    """Read the runs (of `profile`, when given), build the reports (the reproduction only
    when its runs exist) and the index under `out`; the paths written. Every profile is read
    once: the budget ladder and the default-versus-long table use the long profile's runs
    whatever `profile` says.

    Every page and figure is written to a staging folder inside `out` first and moved into
    place only once all were built, index.html last: a build that is killed leaves the
    previous build's pages whole (its staging folder is removed by the next build)."""
    everything = load_runs(tracking_uri)
    store = everything.only(profile) if profile is not None else everything
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        built = build_into(staging, store, ui_url, collapse_threshold, everything)
        return publish(staging, out, built)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_into(folder: Path, store: RunStore, ui_url: str, collapse_threshold: float,
               everything: RunStore | None = None) -> list[Path]:
    """Every report, its figures and the index written under `folder`; their paths relative
    to it, index.html last. `everything`: every profile's runs (default: `store`)."""
    html_env, md_env = environments()

    def render_md(name, **values):
        return md_env.get_template(name).render(**values)

    progress("loss_choice")
    evidence, data_problem = read_evidence(everything or store)
    loss_report, verdict_rows = loss_choice.build(loss_choice.Context(
        store, ui_url, evidence, data_problem, render_md, everything))
    progress("kl_dynamics")
    kl_report = kl_dynamics.build(kl_dynamics.Context(
        store, ui_url, render_md, collapse_threshold, everything))
    reports = [loss_report, kl_report]
    progress("reproduction")
    repro_report = reproduction.build(reproduction.Context(store, render_md))
    if repro_report is not None:
        reports.append(repro_report)

    (folder / "figures").mkdir()
    written = []
    for report in reports:
        report.number_figures()
        for fig in report.figures():
            fig.name = f"{report.name}-{fig.name}"
            path = Path("figures") / f"{fig.name}.png"
            (folder / path).write_bytes(fig.png)
            written.append(path)
        for ext, env in (("html", html_env), ("md", md_env)):
            path = Path(f"{report.name}.{ext}")
            write(folder / path, env.get_template(f"report.{ext}.j2").render(report=report))
            written.append(path)
    progress("index")
    missing = {}
    for m in loss_report.missing + kl_report.missing:
        missing.setdefault(m.what, m)
    index = html_env.get_template("index.html.j2").render(
        reports=reports, verdicts=verdict_rows,
        studies=study_rows(store, ui_url),
        built_from=tables.provenance(store, sorted(set(store.frame["study"]))),
        missing=list(missing.values()))
    write(folder / "index.html", index)
    return [*written, Path("index.html")]


def progress(page: str) -> None:
    """One line on stderr per page as the build reaches it (a build takes tens of seconds)."""
    print(f"report: building {page}", file=sys.stderr, flush=True)


def publish(staging: Path, out: Path, built: list[Path]) -> list[Path]:
    """Move the files `built` under `staging` to the same paths under `out`, in order (index.html
    last, so it never links a page of the build before that page is in place); their new paths.
    os.replace swaps each file whole: a reader sees the old page or the new one, never a part."""
    (out / "figures").mkdir(exist_ok=True)
    for rel in built:
        os.replace(staging / rel, out / rel)
    return [out / rel for rel in built]


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders in `out` of builds whose process is gone (killed mid-build);
    a build still running keeps its own."""
    for folder in out.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Build the analysis reports (index, loss choice, KL dynamics, and the "
                    "Burda et al. 2016 reproduction when its runs exist) from the "
                    "MLflow runs of the studies. Builds from whatever studies have run and "
                    "lists what is missing; an empty store is an error (exit status 2).")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $VAE_TRACKING_URI, else "
                             "sqlite:///<project>/mlruns/mlflow.db, as for vae-study)")
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="output folder (default: reports)")
    parser.add_argument("--ui-url", default=DEFAULT_UI,
                        help=f"base URL of the MLflow UI for run links (default: {DEFAULT_UI})")
    parser.add_argument("--collapse-threshold", type=float,
                        default=kl_dynamics.COLLAPSE_THRESHOLD,
                        help="KL (nats) below which a latent dimension counts as collapsed "
                             f"(default: {kl_dynamics.COLLAPSE_THRESHOLD})")
    parser.add_argument("--profile", default=None,
                        help="only runs of this study profile (smoke, default, full); "
                             "default: every run in the store")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if not args.collapse_threshold > 0:
            raise UsageError(f"--collapse-threshold must be > 0, got {args.collapse_threshold}")
        written = build_reports(uri, args.out, args.ui_url, args.collapse_threshold,
                                args.profile)
    except UsageError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return UsageError.exit_code
    pages = [p for p in written if p.suffix in (".html", ".md")]
    print(f"wrote {len(pages)} pages and {len(written) - len(pages)} figures to {args.out}: "
          + ", ".join(p.name for p in pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
