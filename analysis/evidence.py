"""The data evidence a suite logged as `evidence.json` on its study run (study.evidence
computes it from the datasets with the study's own likelihoods), read back without torch; and
the loss-scale audit, which needs only D.

Reductions: shares are over all pixels of all training images; the entropy floor is summed
over pixels and averaged over images (nats per image), like every loss in the study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.config import Config


@dataclass
class PixelEvidence:
    dataset: str
    n_images: int
    n_pixels: int
    """D, pixels per image (from the data's shape)."""
    image_shape: tuple[int, ...]
    """(C, H, W) of one image."""
    histogram: np.ndarray
    """Count of each of the 256 grey levels over all training pixels."""
    mean: float
    share_mid_grey: float
    share_mid_grey_of_ink: float
    entropy_floor: float
    """Mean over images of sum_i H(x_i): the least summed BCE any decoder can reach."""

    @property
    def levels(self) -> np.ndarray:
        return np.arange(256) / 255.0


@dataclass
class Evidence:
    pixels: dict[str, PixelEvidence]
    """Dataset name -> its pixel statistics."""
    curves: pd.DataFrame
    """target, prediction, loss, value, gradient: the per-pixel loss curves."""
    cost: pd.DataFrame
    """target, prediction, entropy_floor, bce_excess, squared_error: one error's cost."""
    mid_grey: tuple[float, float]
    """A pixel is mid-grey when mid_grey[0] < x < mid_grey[1], and ink when x > mid_grey[0]."""
    targets: tuple[float, ...]
    error: float
    """How far from its target the cost table's prediction is."""


def from_json(doc: dict) -> Evidence:
    """`evidence.json` as study.evidence.data_evidence wrote it -> Evidence."""
    pixels = {name: PixelEvidence(
        dataset=p["dataset"], n_images=int(p["n_images"]), n_pixels=int(p["n_pixels"]),
        image_shape=tuple(p["image_shape"]), histogram=np.asarray(p["histogram"], dtype=float),
        mean=p["mean"], share_mid_grey=p["share_mid_grey"],
        share_mid_grey_of_ink=p["share_mid_grey_of_ink"], entropy_floor=p["entropy_floor"],
    ) for name, p in doc["pixels"].items()}
    return Evidence(pixels, pd.DataFrame(doc["loss_curves"]), pd.DataFrame(doc["cost_of_an_error"]),
                    tuple(doc["mid_grey"]), tuple(doc["targets"]), float(doc["error"]))


def loss_scale_audit(n_pixels: int) -> pd.DataFrame:
    """The Gaussian sigma^2 and the beta that common ways of writing the loss imply.

    Every row is `w * recon + KL` with the KL summed over latent dims and both terms
    averaged over images; dividing by w gives recon + (1/w) KL, so the effective beta
    (relative to the likelihood summed over pixels) is 1/w. For squared error,
    w * SSE = SSE / (2 sigma^2) gives sigma^2 = 1 / (2w); Config.implied() turns that
    sigma back into the beta of plain SSE (2 sigma^2 beta), which must equal 1/w.
    """
    rows = []
    written = [
        ("SSE, summed over pixels", "F.mse_loss(x_hat, x, reduction='sum')", "gaussian", 1.0),
        ("MSE, averaged over pixels", "F.mse_loss(x_hat, x)", "gaussian", 1.0 / n_pixels),
        ("BCE, summed over pixels", "F.binary_cross_entropy(x_hat, x, reduction='sum')",
         "bernoulli", 1.0),
        ("BCE, averaged over pixels", "F.binary_cross_entropy(x_hat, x)", "bernoulli",
         1.0 / n_pixels),
    ]
    for label, code, likelihood, weight in written:
        effective_beta = 1.0 / weight
        if likelihood == "gaussian":
            sigma2 = 1.0 / (2.0 * weight)
            implied = Config(likelihood="gaussian", sigma=math.sqrt(sigma2), beta=1.0).implied()
            assert math.isclose(implied["sse_equivalent_beta"], effective_beta)
            sigma2_text = f"{sigma2:g}"
            sigma_text = f"{math.sqrt(sigma2):.3g}"
        else:
            sigma2_text = sigma_text = "— (Bernoulli, no σ)"
        rows.append({
            "loss as written (+ KL summed over z)": label,
            "code (per image)": code,
            "recon weight w": f"1/{n_pixels}" if weight != 1 else "1",
            "implied σ² (at β = 1)": sigma2_text,
            "implied σ": sigma_text,
            "effective β": f"{effective_beta:g}",
        })
    return pd.DataFrame(rows)
