"""Data evidence computed from the datasets themselves, no training: pixel-intensity
statistics, the Bernoulli entropy floor, per-pixel loss curves and the loss-scale audit.

Reductions: shares are over all pixels of all training images; the entropy floor is summed
over pixels and averaged over images (nats per image), like every loss in the study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from study.config import Config

MID_GREY = (0.1, 0.9)
"""A pixel is mid-grey when 0.1 < x < 0.9, and ink (not background) when x > 0.1."""
TARGETS = (0.0, 0.25, 0.5, 1.0)
"""Target intensities of the per-pixel loss curves."""


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


def pixel_evidence(dataset: str, root: Path) -> PixelEvidence:
    """Statistics of all official training images of `dataset` (train and validation)."""
    import torch

    from study.data import load_splits
    from study.likelihoods import bernoulli_entropy_floor

    splits = load_splits(dataset, root, val_size=1)
    images = torch.cat([splits.train.images, splits.val.images])
    histogram = torch.bincount(images.flatten().long(), minlength=256).numpy()
    levels = np.arange(256) / 255.0
    total = histogram.sum()
    mid = (levels > MID_GREY[0]) & (levels < MID_GREY[1])
    ink = levels > MID_GREY[0]
    # sum_i H(x_i) over all pixels, grouped by grey level: exact, and 256 evaluations
    # of the study's own entropy floor instead of 47 million
    per_level = bernoulli_entropy_floor(torch.arange(256, dtype=torch.float64).div(255).view(256, 1))
    floor = float((per_level.numpy() * histogram).sum())
    return PixelEvidence(
        dataset=dataset,
        n_images=len(images),
        n_pixels=int(np.prod(images.shape[1:])),
        image_shape=tuple(images.shape[1:]),
        histogram=histogram,
        mean=float((histogram * levels).sum() / total),
        share_mid_grey=float(histogram[mid].sum() / total),
        share_mid_grey_of_ink=float(histogram[mid].sum() / histogram[ink].sum()),
        entropy_floor=floor / len(images),
    )


def loss_curves(targets=TARGETS, points: int = 399) -> pd.DataFrame:
    """Per-pixel BCE minus its minimum, and squared error, against the prediction p.

    Computed with the study's own likelihood objects (Bernoulli on logit(p); Gaussian with
    sigma^2 = 1/2, whose negative log-density is (p - x)^2 + log(pi)/2), and their gradients
    d loss / d p by autograd. Long frame: target, prediction, loss, value, gradient.
    """
    import torch

    from study.likelihoods import LOG_PI, Bernoulli, Gaussian, bernoulli_entropy_floor

    p = torch.linspace(0.0, 1.0, points + 2, dtype=torch.float64)[1:-1]
    rows = []
    for target in targets:
        x = torch.full((points, 1), float(target), dtype=torch.float64)
        for name in ("BCE − min", "squared error"):
            q = p.clone().unsqueeze(1).requires_grad_(True)
            if name == "BCE − min":
                logits = q.log() - (1 - q).log()
                value = -Bernoulli().log_prob(x, logits) - bernoulli_entropy_floor(x)
            else:
                value = -Gaussian(math.sqrt(0.5)).log_prob(x, q) - LOG_PI / 2
            (grad,) = torch.autograd.grad(value.sum(), q)
            rows.append(pd.DataFrame({
                "target": target, "prediction": p.numpy(), "loss": name,
                "value": value.detach().numpy(), "gradient": grad.squeeze(1).numpy(),
            }))
    return pd.concat(rows, ignore_index=True)


def cost_of_an_error(targets=TARGETS, error: float = 0.1) -> pd.DataFrame:
    """For each target: the entropy floor H(x) and both losses at a prediction `error` away."""
    import torch

    from study.likelihoods import bernoulli_entropy_floor

    curves = loss_curves(targets, points=999)
    rows = []
    for target in targets:
        p = target + error if target + error < 1 else target - error
        at = curves[(curves["target"] == target)]
        nearest = at.iloc[(at["prediction"] - p).abs().argsort()[:2]]
        bce = nearest[nearest["loss"] == "BCE − min"]["value"].iloc[0]
        sse = nearest[nearest["loss"] == "squared error"]["value"].iloc[0]
        h = float(bernoulli_entropy_floor(torch.tensor([[target]], dtype=torch.float64)))
        rows.append({"target": target, "prediction": p, "entropy_floor": h,
                     "bce_excess": float(bce), "squared_error": float(sse)})
    return pd.DataFrame(rows)


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
