"""What the report tests share: miniature studies trained on real data subsets and logged
with the real MLflow client in the runner's schema, a page opened in headless Chromium as a
reader meets it, and the tables and images of a built page."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
from conftest import BROWSER_TIMEOUT_MS, chromium
from helpers import ARTIFACTS_DIR

from study.config import Config
from study.data import dataset_digest, load_splits
from study.evidence import write_evidence
from study.train import Callback, train

ARTIFACTS = ARTIFACTS_DIR
HOSTILE = "<script>alert(1)</script>"
UI = "http://mlflow.example.test:5000"
"""The MLflow UI address run links point to in the reports built by the tests."""
PAGES = ("index", "loss_choice", "kl_dynamics")


# --------------------------------------------------------------------------- the runs


class LogToMlflow(Callback):
    """What the runner logs per step (first epoch) and per epoch."""

    def on_step(self, step, metrics):
        import mlflow

        mlflow.log_metrics({"step/" + k.replace("train/", "train_"): v
                            for k, v in metrics.items()}, step=step)

    def on_epoch(self, epoch, metrics):
        import mlflow

        mlflow.log_metrics(metrics, step=epoch)


def _grid_png(images: torch.Tensor, path: Path) -> Path:
    from torchvision.utils import save_image

    save_image(images, path, nrow=8, padding=1)
    return path


def log_trial(study, experiment_id, parent_id, number, config, splits, tmp, run_name=None,
               status="FINISHED"):
    import mlflow

    tags = {
        "study": study, "trial_number": str(number), "profile": "test",
        "dataset_digest": dataset_digest(config.dataset), "git_commit": "0123abc",
        "git_dirty": "true", "device": "cpu", "torch_version": torch.__version__,
    }
    name = run_name or f"{study}/trial-{number:04d}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent_id,
                          tags=tags) as run:
        mlflow.log_params(config.as_params())
        if status == "FAILED":
            mlflow.set_tag("failure_reason", "NonFiniteLoss: non-finite loss at epoch 1 step 3")
            mlflow.end_run(status="FAILED")
            return run.info.run_id
        result = train(config, [LogToMlflow()], splits=splits, evaluate_at_end=True)
        if status == "KILLED":
            mlflow.end_run(status="KILLED")
            return run.info.run_id
        mlflow.log_metrics({f"test/{k}": float(v) for k, v in result.test.items()})
        if study == "loss_choice":
            with torch.no_grad():
                x = splits.test.grey()[:16]
                recon = result.likelihood.mean(result.model.decode(result.model.encode(x)[0]))
                z = torch.randn(16, config.latent_dim, generator=torch.Generator().manual_seed(0))
                samples = result.likelihood.mean(result.model.decode(z))
            run_dir = Path(tmp) / run.info.run_id
            run_dir.mkdir()
            mlflow.log_artifact(str(_grid_png(torch.cat([x, recon.clamp(0, 1)]),
                                              run_dir / "reconstructions.png")), "figures")
            mlflow.log_artifact(str(_grid_png(samples.clamp(0, 1), run_dir / "samples.png")),
                                "figures")
        return run.info.run_id


def fixture_config(data_root: Path) -> Config:
    """The settings every fixture run shares (1 epoch on 1000 images)."""
    return Config(data_root=str(data_root), train_subset=1000, val_size=500, test_subset=300,
                  epochs=1, batch_size=100, test_iw_k=10, device="cpu", latent_dim=8,
                  step_log_every=2)


def log_fixture_runs(tracking_uri: str, artifact_root: Path, data_root: Path) -> dict:
    """A miniature of the runner's studies (1-2 epochs on ~1000 images each):

    loss_choice  2 datasets x {bernoulli, gaussian} x beta {0.5, 2} x seeds {0, 1}, 1 epoch
    kl_dynamics  MNIST x beta {1, 16} x latent_dim {2, 8}, plus a warm-up and a free-bits run,
                 2 epochs
    search_mnist 3 trials (one pruned -> KILLED, one FAILED)
    One loss_choice run is named `<script>alert(1)</script>`.
    """
    import mlflow

    previous, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    mlflow.set_tracking_uri(tracking_uri)
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    base = fixture_config(data_root)
    splits = {}

    def splits_for(config):
        key = (config.dataset, config.seed)
        if key not in splits:
            splits[key] = load_splits(config.dataset, data_root, val_size=config.val_size,
                                      seed=config.seed, train_subset=config.train_subset,
                                      test_subset=config.test_subset)
        return splits[key]

    designs = {
        "loss_choice": [
            base.replace(dataset=d, likelihood=lik, beta=b, seed=s)
            for d in ("mnist", "fashion") for lik in ("bernoulli", "gaussian")
            for b in (0.5, 2.0) for s in (0, 1)
        ],
        "kl_dynamics": [
            base.replace(beta=b, latent_dim=z, epochs=2) for b in (1.0, 16.0) for z in (2, 8)
        ] + [
            base.replace(beta=16.0, epochs=2, beta_schedule="linear", warmup=10),
            base.replace(beta=16.0, epochs=2, free_bits=0.5),
        ],
        "search_mnist": [
            base.replace(likelihood="gaussian", beta=0.3, latent_dim=4),
            base.replace(likelihood="bernoulli", beta=3.0, latent_dim=16),
            base.replace(likelihood="bernoulli", beta=1.0, latent_dim=8, seed=1),
            base.replace(likelihood="gaussian", beta=1.0, latent_dim=8),
        ],
    }
    ids = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for study, configs in designs.items():
                exp = mlflow.create_experiment(
                    study, artifact_location=(artifact_root / study).as_uri())
                ids[study] = exp
                with mlflow.start_run(experiment_id=exp, run_name=f"{study}/parent",
                                      tags={"study": study, "profile": "test"}) as parent:
                    parent_id = parent.info.run_id
                    if study == "loss_choice":  # as the suite logs it at a study's start
                        mlflow.log_artifact(str(write_evidence(("mnist", "fashion"), data_root,
                                                               Path(tmp))))
                for n, config in enumerate(configs):
                    name = HOSTILE if (study == "loss_choice" and n == 0) else None
                    status = {2: "KILLED", 3: "FAILED"}.get(n, "FINISHED") \
                        if study == "search_mnist" else "FINISHED"
                    log_trial(study, exp, parent_id, n, config, splits_for(config), tmp,
                               run_name=name, status=status)
    finally:
        mlflow.set_tracking_uri(previous)
        torch.set_num_threads(threads)
    return ids


# --------------------------------------------------------------------------- the browser


IMAGES_JS = """Promise.all(Array.from(document.images).map(img => img.decode().then(
    () => [img.alt, img.naturalWidth, img.naturalHeight],
    () => [img.alt, img.naturalWidth, img.naturalHeight])))"""


def inspect_page(page: Path, screenshot: Path | None = None, browser=None, width: int = 1280) -> dict:
    """Open `page` in a fresh tab of `browser` (a Chromium of its own without one): images, text,
    console errors, uncaught exceptions, dialogs, requests; the whole page to `screenshot`."""
    seen = {key: [] for key in ("console_errors", "log_errors", "exceptions", "dialogs", "requests")}

    def on_console(message):
        # Playwright reports the browser's own log (a failed load, blocked content) as console
        # messages without arguments, next to the page's console.error / console.assert calls
        if message.type in ("error", "assert"):
            seen["console_errors" if message.args else "log_errors"].append(message.text)

    def on_dialog(dialog):
        seen["dialogs"].append(dialog.message)
        dialog.dismiss()

    with (contextlib.nullcontext(browser) if browser else chromium()) as browser, \
            contextlib.closing(browser.new_page(viewport={"width": width, "height": 1000})) as tab:
        tab.set_default_timeout(BROWSER_TIMEOUT_MS)
        tab.on("console", on_console)
        tab.on("pageerror", lambda error: seen["exceptions"].append(str(error)))
        tab.on("dialog", on_dialog)
        tab.on("request", lambda request: seen["requests"].append(request.url))
        tab.goto(page.as_uri())  # returns once the load event has fired
        seen["images"] = tab.evaluate(IMAGES_JS)
        seen["text"] = tab.evaluate("document.body.textContent")
        if screenshot is not None:
            height = tab.evaluate("document.documentElement.scrollHeight")
            tab.screenshot(path=screenshot, full_page=True,
                           clip={"x": 0, "y": 0, "width": width, "height": min(height, 16000)})
    return seen


# --------------------------------------------------------------------------- more runs


def log_more_runs(tracking_uri: str, study: str, configs: list[Config], data_root: Path,
                  tmp: Path) -> list[str]:
    """Train `configs` and log them as further trial runs of `study` (its experiment created
    when the store has none), as a later invocation of the runner would; their run ids."""
    import mlflow

    previous, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    mlflow.set_tracking_uri(tracking_uri)
    torch.set_num_threads(1)
    try:
        experiment = mlflow.get_experiment_by_name(study)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
            study, artifact_location=(tmp / "artifacts" / study).as_uri())
        ids = []
        for number, config in enumerate(configs, start=100):
            splits = load_splits(config.dataset, data_root, val_size=config.val_size,
                                 seed=config.seed, train_subset=config.train_subset,
                                 test_subset=config.test_subset)
            ids.append(log_trial(study, experiment_id, None, number, config, splits, tmp))
        return ids
    finally:
        mlflow.set_tracking_uri(previous)
        torch.set_num_threads(threads)



# --------------------------------------------------------------------------- built pages


class HtmlText(HTMLParser):
    """The text of an HTML fragment with character references resolved, and its tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.tags = "", []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text += data

    @classmethod
    def of(cls, fragment: str) -> tuple[str, list[str]]:
        parser = cls()
        parser.feed(fragment)
        parser.close()
        return parser.text, parser.tags


class _Tables(HTMLParser):
    """Cells of every <table>, and the src of every <img>."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self._in_cell = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def parsed(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def decoded(png: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")


# --------------------------------------------------------------------------- stores


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
