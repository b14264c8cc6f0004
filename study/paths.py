"""Where vae-study keeps its data and stores when nobody says: one answer for every entry
point (make, the `vae-study` CLI, the Python API, the reports), from any working directory.

The project folder is the checkout the package runs from (an editable install or `python -m`
in the repository), else `$XDG_CACHE_HOME/vae-study` (`~/.cache/vae-study`) for an installed
package. Data go to `<project>/data`, the MLflow and Optuna stores to `<project>/mlruns/`.
`VAE_DATA_ROOT`, `VAE_TRACKING_URI` and `VAE_STORAGE` override them.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[1]
EVIDENCE_FILE = "evidence.json"
"""The study run's artifact holding the data evidence (study.evidence writes, reports read)."""


def project_root() -> Path:
    """The checkout holding this package, or the user's cache folder for an installed one."""
    if (PACKAGE_PARENT / "pyproject.toml").is_file() and (PACKAGE_PARENT / "study").is_dir():
        return PACKAGE_PARENT
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vae-study"


def default_data_root() -> str:
    """$VAE_DATA_ROOT, else <project>/data (where `make data` puts the datasets)."""
    return os.environ.get("VAE_DATA_ROOT") or str(project_root() / "data")


def stores_folder() -> Path:
    """<project>/mlruns: the default MLflow and Optuna stores and the artifacts."""
    return project_root() / "mlruns"
