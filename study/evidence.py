"""Data evidence computed from the datasets themselves, no training: pixel-intensity
statistics, the Bernoulli entropy floor, and per-pixel loss curves of the study's own
likelihoods. A suite logs it as `evidence.json` on each study run, so the reports (which
only read runs, and never import torch) can show it.

Reductions: shares are over all pixels of all training images; the entropy floor is summed
over pixels and averaged over images (nats per image), like every loss in the study.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from study.data import load_splits
from study.likelihoods import LOG_PI, Bernoulli, Gaussian, bernoulli_entropy_floor
from study.paths import EVIDENCE_FILE

MID_GREY = (0.1, 0.9)
"""A pixel is mid-grey when 0.1 < x < 0.9, and ink (not background) when x > 0.1."""
TARGETS = (0.0, 0.25, 0.5, 1.0)
"""Target intensities of the per-pixel loss curves."""
ERROR = 0.1
"""How far from its target a prediction is in the cost-of-an-error table."""


def pixel_evidence(dataset: str, root) -> dict:
    """Statistics of all official training images of `dataset` (train and validation)."""
    splits = load_splits(dataset, root, val_size=1)
    images = torch.cat([splits.train.images, splits.val.images])
    histogram = torch.bincount(images.flatten().long(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    total = histogram.sum()
    mid = (levels > MID_GREY[0]) & (levels < MID_GREY[1])
    ink = levels > MID_GREY[0]
    # sum_i H(x_i) over all pixels, grouped by grey level: exact, and 256 evaluations
    # of the study's own entropy floor instead of 47 million
    floor = float((bernoulli_entropy_floor(levels.view(256, 1)) * histogram).sum())
    return {
        "dataset": dataset, "n_images": len(images),
        "n_pixels": math.prod(images.shape[1:]), "image_shape": list(images.shape[1:]),
        "histogram": [int(v) for v in histogram.tolist()],
        "mean": float((histogram * levels).sum() / total),
        "share_mid_grey": float(histogram[mid].sum() / total),
        "share_mid_grey_of_ink": float(histogram[mid].sum() / histogram[ink].sum()),
        "entropy_floor": floor / len(images),
    }


def loss_curves(targets=TARGETS, points: int = 199) -> list[dict]:
    """Per-pixel BCE minus its minimum, and squared error, against the prediction p, with
    their gradients d loss / d p by autograd; computed with the study's own likelihood
    objects (Bernoulli on logit(p); Gaussian with sigma^2 = 1/2, whose negative log-density
    is (p - x)^2 + log(pi)/2). Records: target, prediction, loss, value, gradient."""
    p = torch.linspace(0.0, 1.0, points + 2, dtype=torch.float64)[1:-1]
    rows = []
    for target in targets:
        x = torch.full((points, 1), float(target), dtype=torch.float64)
        for name in ("BCE − min", "squared error"):
            q = p.clone().unsqueeze(1).requires_grad_(True)
            if name == "BCE − min":
                value = -Bernoulli().log_prob(x, q.log() - (1 - q).log()) \
                    - bernoulli_entropy_floor(x)
            else:
                value = -Gaussian(math.sqrt(0.5)).log_prob(x, q) - LOG_PI / 2
            (grad,) = torch.autograd.grad(value.sum(), q)
            rows += [{"target": target, "prediction": round(a, 6), "loss": name,
                      "value": float(f"{b:.6g}"), "gradient": float(f"{c:.6g}")}
                     for a, b, c in zip(p.tolist(), value.detach().tolist(),
                                        grad.squeeze(1).tolist(), strict=True)]
    return rows


def cost_of_an_error(targets=TARGETS, error: float = ERROR) -> list[dict]:
    """For each target: the entropy floor H(x) and both losses at a prediction `error` away
    (towards the middle), computed exactly rather than read off the curves."""
    rows = []
    for target in targets:
        p = target + error if target + error < 1 else target - error
        x = torch.tensor([[float(target)]], dtype=torch.float64)
        q = torch.tensor([[p]], dtype=torch.float64)
        floor = float(bernoulli_entropy_floor(x))
        bce = float(-Bernoulli().log_prob(x, q.log() - (1 - q).log())) - floor
        sse = float(-Gaussian(math.sqrt(0.5)).log_prob(x, q)) - LOG_PI / 2
        rows.append({"target": target, "prediction": p, "entropy_floor": floor,
                     "bce_excess": bce, "squared_error": sse})
    return rows


def data_evidence(datasets, root) -> dict:
    """Everything the reports show about the data, as plain JSON values."""
    return {"pixels": {d: pixel_evidence(d, root) for d in sorted(datasets)},
            "loss_curves": loss_curves(), "cost_of_an_error": cost_of_an_error(),
            "mid_grey": list(MID_GREY), "targets": list(TARGETS), "error": ERROR}


def write_evidence(datasets, root, folder: Path) -> Path:
    path = Path(folder) / EVIDENCE_FILE
    path.write_text(json.dumps(data_evidence(datasets, root)))
    return path
