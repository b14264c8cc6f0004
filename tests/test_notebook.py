"""The tour notebook users open: executed as a user runs it (a real kernel, another working
directory, its own MLflow store), on the smallest budget."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_tour_runs_and_logs_its_two_runs(data_root, tmp_path, monkeypatch):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("VAE_TRACKING_URI", tracking)
    monkeypatch.setenv("VAE_DATA_ROOT", str(data_root))
    monkeypatch.setenv("TOUR_EPOCHS", "2")
    monkeypatch.setenv("TOUR_TRAIN_IMAGES", "1000")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(REPO / "notebooks" / "tour.ipynb", as_version=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(elsewhere)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "bernoulli" in text and "gaussian_optimal" in text and "test SSE" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the seaborn terms and the report's ELBO decomposition
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("single-runs")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["likelihood"] for r in runs) == ["bernoulli", "gaussian_optimal"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val/kl")]
        assert epochs == [1, 2]
    assert not (elsewhere / "mlruns").exists() and not (elsewhere / "data").exists()  # no
    # default is relative to the working directory
