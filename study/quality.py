"""Likelihood-independent test metrics, so models trained with different decoder likelihoods
compare on equal terms: SSIM and a per-intensity error profile of the mean reconstruction, a
linear probe on posterior means, and a Frechet distance of generated samples measured in the
features of a small CNN classifier (study.classifier).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytorch_msssim
import scipy.linalg
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from study.classifier import Classifier
from study.config import Config
from study.data import Split, Splits
from study.likelihoods import Likelihood
from study.model import VAE

N_BINS = 10
"""Equal-width bins of the true pixel intensity over [0, 1] for the error profile."""
SSIM_WINDOW = 11
"""pytorch-msssim's default Gaussian window (sigma 1.5, Wang et al. 2004). It fits 28x28
images: the filter runs without padding, leaving an 18x18 map of local SSIM values per image
and never skipping the smoothing (which it would for sides below 11)."""
PROBE_TRAIN_IMAGES = 10_000
"""At most this many training images fit the linear probe (lbfgs converges in seconds)."""
PROBE_MAX_ITER = 1000
"""lbfgs iterations of the probe: enough to converge on 10k standardized posterior means."""
PROBE_SEED = 0
"""Fixed seed of the probe's logistic regression."""
SAMPLE_SEED_OFFSET = 29
"""The prior samples behind `frechet_distance` use seed `config.seed + SAMPLE_SEED_OFFSET`."""
SQRTM_OFFSET = 1e-6
"""Added to both covariances' diagonals when sqrt(C1 C2) is not finite (as pytorch-fid does)."""


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def posterior_means(model: VAE, split: Split, batch_size: int) -> torch.Tensor:
    """Mean of q(z|x), (N, latent_dim), for the images as the model sees them (epoch 0)."""
    x = split.served(epoch=0)
    return torch.cat([model.encode(x[sl])[0] for sl in _batches(len(x), batch_size)])


@torch.no_grad()
def decoded_means(model: VAE, likelihood: Likelihood, z: torch.Tensor,
                  batch_size: int) -> torch.Tensor:
    """The likelihood's mean `likelihood.mean(model.decode(z))` per latent row, clamped to
    [0, 1] so every likelihood is judged as an image; shaped (N, C, H, W)."""
    return torch.cat([likelihood.mean(model.decode(z[sl])).clamp(0, 1)
                      for sl in _batches(len(z), batch_size)])


def mean_ssim(images: torch.Tensor, recon: torch.Tensor, batch_size: int) -> float:
    """SSIM (data range 1) of each image with its reconstruction, itself averaged over the
    positions of the Gaussian window, then averaged over images."""
    total = 0.0
    for sl in _batches(len(images), batch_size):
        per_image = pytorch_msssim.ssim(images[sl], recon[sl], data_range=1.0,
                                        win_size=SSIM_WINDOW, size_average=False)
        total += float(per_image.sum())
    return total / len(images)


def error_profile(images: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """`err_bin_XX`: squared error per pixel, averaged over all pixels (of all images) whose
    true intensity lies in bin XX of N_BINS equal bins over [0, 1]; bin N_BINS - 1 includes 1.

    Empty bins have no key (never NaN).
    """
    bins = (images * N_BINS).long().clamp(0, N_BINS - 1).flatten()
    squared = (recon - images).square().flatten().double()
    totals = torch.bincount(bins, weights=squared, minlength=N_BINS)
    counts = torch.bincount(bins, minlength=N_BINS)
    return {f"err_bin_{b:02d}": float(totals[b] / counts[b])
            for b in range(N_BINS) if counts[b] > 0}


def probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                   test_features: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy (fraction of test rows classified right) of a multinomial logistic
    regression on standardized features, fitted on the training rows."""
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=PROBE_SEED),
    )
    # one BLAS thread: numpy's pool and torch's fight over the cores otherwise
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(train_features, train_labels)
        return float(probe.score(test_features, test_labels))


def frechet_distance_from_stats(mean_a: np.ndarray, cov_a: np.ndarray,
                                mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||m_a - m_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)): the Frechet (2-Wasserstein)
    distance between the Gaussians N(m_a, C_a) and N(m_b, C_b).

    (C_a C_b) has real non-negative eigenvalues; sqrtm may return tiny imaginary parts from
    rounding, so the real part is kept, as in pytorch-fid.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(cov_a)) * SQRTM_OFFSET
            covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean.real))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F): the sample mean
    over rows and the unbiased sample covariance, in float64."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    # atleast_2d: np.cov of a single feature is a 0-d array
    return frechet_distance_from_stats(a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)),
                                       b.mean(0), np.atleast_2d(np.cov(b, rowvar=False)))


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@torch.no_grad()
def quality_metrics(model: VAE, likelihood: Likelihood, splits: Splits, config: Config,
                    net: Classifier | None = None) -> dict[str, float]:
    """Likelihood-free metrics on the test split, keyed without the `test/` prefix.

    ssim and err_bin_XX compare each grey test image with the mean reconstruction at its
    posterior mean (encoded as the model sees it: binarized where the config binarizes);
    probe_accuracy fits a linear probe on the posterior means of at most
    PROBE_TRAIN_IMAGES training images; frechet_distance compares classifier features of the
    grey test images with those of as many decoded prior samples z ~ N(0, I) (seeded), in
    the features of the dataset's classifier `net`; classifier_accuracy is that classifier's
    own accuracy on the full official test split. Both are left out without a `net`.
    """
    was_training = model.training
    model.eval()
    test, batch = splits.test, config.eval_batch_size
    images = test.grey()
    mu = posterior_means(model, test, batch)
    recon = decoded_means(model, likelihood, mu, batch)
    out = {"ssim": mean_ssim(images, recon, batch)}
    out.update(error_profile(images, recon))

    n_probe = min(PROBE_TRAIN_IMAGES, len(splits.train))
    probe_split = dataclasses.replace(splits.train, images=splits.train.images[:n_probe],
                                      labels=splits.train.labels[:n_probe])
    out["probe_accuracy"] = probe_accuracy(
        _numpy(posterior_means(model, probe_split, batch)), probe_split.labels.cpu().numpy(),
        _numpy(mu), test.labels.cpu().numpy(),
    )

    if net is not None:
        gen = torch.Generator(device=mu.device).manual_seed(config.seed + SAMPLE_SEED_OFFSET)
        z = torch.randn(len(test), model.latent_dim, generator=gen, device=mu.device)
        samples = decoded_means(model, likelihood, z, batch)
        out["frechet_distance"] = frechet_distance(_numpy(net.features(images)),
                                                   _numpy(net.features(samples)))
        out["classifier_accuracy"] = net.test_accuracy
    model.train(was_training)
    return out
