"""Likelihood-free metrics: the Frechet distance, the error profile and SSIM against values
worked out by hand; the probe and `quality_metrics` on real data (the classifier behind the
Frechet distance: test_classifier)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TARGET_ACCURACY
from torch import nn

from study import classifier, quality
from study.data import splits_for
from study.likelihoods import Gaussian
from study.model import VAE
from study.train import train

# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    scale = np.trace(np.cov(features, rowvar=False))
    assert abs(quality.frechet_distance(features, features)) <= 1e-6 * scale


def test_frechet_distance_one_dimensional_by_hand():
    # {-1, 1}: mean 0, unbiased variance 2; {2, 6}: mean 4, variance 8.
    # d = (0 - 4)^2 + 2 + 8 - 2 sqrt(2 * 8) = 16 + 10 - 8 = 18
    a, b = np.array([[-1.0], [1.0]]), np.array([[2.0], [6.0]])
    assert quality.frechet_distance(a, b) == pytest.approx(18.0, rel=1e-9)


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_diagonal_gaussians_closed_form(rotate):
    # Diagonal covariances commute: d = |m_a - m_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    # A common rotation Q changes neither, but makes C_a C_b a full matrix for sqrtm.
    mean_a, var_a = np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 9.0])
    mean_b, var_b = np.array([1.0, 1.0, 0.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0] if rotate else np.eye(3)
    got = quality.frechet_distance_from_stats(q @ mean_a, q @ np.diag(var_a) @ q.T,
                                              q @ mean_b, q @ np.diag(var_b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_grows_with_distortion():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(2000, 16))
    noise = rng.normal(size=features.shape)
    small = quality.frechet_distance(features, features + 0.1 * noise)
    large = quality.frechet_distance(features, features + 1.0 * noise)
    assert 0 < small < large


# --------------------------------------------------------------------------- error profile, SSIM


def test_error_profile_known_bins():
    # (true, reconstruction) pairs; bins are [0, .1), [.1, .2), ..., [.9, 1].
    pairs = [(0.0, 0.2), (0.05, 0.05),   # bin 0: errors .04 and 0
             (0.15, 0.45),               # bin 1: .09
             (0.55, 0.45),               # bin 5: .01
             (1.0, 0.5), (0.95, 1.0)]    # bin 9: .25 and .0025 (1.0 belongs to the last bin)
    images = torch.tensor([p[0] for p in pairs]).reshape(1, 1, 2, 3)
    recon = torch.tensor([p[1] for p in pairs]).reshape(1, 1, 2, 3)
    profile = quality.error_profile(images, recon)
    expected = {"err_bin_00": 0.02, "err_bin_01": 0.09, "err_bin_05": 0.01, "err_bin_09": 0.12625}
    assert profile.keys() == expected.keys()  # empty bins are omitted, never NaN
    for key, value in expected.items():
        assert profile[key] == pytest.approx(value, rel=1e-5)


def test_ssim_of_an_image_with_itself_is_one_and_lower_with_noise(mnist_test):
    images = mnist_test.grey()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    batch = len(images) // 3  # uneven batches exercise the per-image averaging
    same = quality.mean_ssim(images, images, batch)
    slightly = quality.mean_ssim(images, (images + 0.05 * noise).clamp(0, 1), batch)
    very = quality.mean_ssim(images, (images + 0.3 * noise).clamp(0, 1), batch)
    assert same == pytest.approx(1.0, abs=1e-6)
    assert very < slightly < 0.99


# --------------------------------------------------------------------------- quality_metrics


def _splits_of(config):
    return splits_for(config)


def test_quality_metrics_on_a_trained_model(tiny_config):
    result = train(tiny_config, evaluate_at_end=False)
    splits = _splits_of(tiny_config)
    net = classifier.get_classifier("mnist", tiny_config.data_root)
    metrics = quality.quality_metrics(result.model, result.likelihood, splits, tiny_config, net)
    bins = {f"err_bin_{b:02d}" for b in range(quality.N_BINS)}
    assert set(metrics) == {"ssim", "probe_accuracy", "frechet_distance",
                            "classifier_accuracy"} | bins
    without = quality.quality_metrics(result.model, result.likelihood, splits, tiny_config)
    assert set(without) == {"ssim", "probe_accuracy"} | bins  # no classifier, no Frechet
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["probe_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert 0 < metrics["ssim"] < 1
    assert metrics["frechet_distance"] > 0
    assert metrics["classifier_accuracy"] >= TARGET_ACCURACY["mnist"]
    assert result.model.training  # the model's mode is restored


def test_quality_metrics_of_a_perfect_autoencoder(tiny_config):
    # Encoder mean = the image itself, decoder = identity, Gaussian mean = decoder output:
    # every reconstruction is exact, so SSIM is 1 and every bin's error is 0.
    config = tiny_config.replace(train_subset=500, test_subset=200)
    splits = _splits_of(config)
    pixels = math.prod(splits.image_shape)
    encoder_mean = nn.Linear(pixels, 2 * pixels, bias=False)
    with torch.no_grad():
        encoder_mean.weight.copy_(torch.cat([torch.eye(pixels), torch.zeros(pixels, pixels)]))
    model = VAE(nn.Sequential(nn.Flatten(), encoder_mean), nn.Identity(),
                splits.image_shape, pixels)
    metrics = quality.quality_metrics(model, Gaussian(1.0), splits, config)
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    errors = [v for k, v in metrics.items() if k.startswith("err_bin_")]
    assert len(errors) == quality.N_BINS and max(errors) == 0
    assert metrics["probe_accuracy"] > 0.5  # a probe on raw pixels
