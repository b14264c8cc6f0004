"""Every decoder distribution against its closed form, per image in nats: the Bernoulli
(summed BCE), the Gaussians (fixed, learned, and the sigma-VAE's calibrated one), Laplace
and the continuous Bernoulli."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from study.config import Config
from study.likelihoods import (
    ContinuousBernoulli,
    Gaussian,
    GaussianOptimal,
    bernoulli_entropy_floor,
    make_likelihood,
)

SHAPE = (1, 28, 28)
D_PIX = 784


def _batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *SHAPE, generator=g)
    params = torch.randn(b, *SHAPE, generator=g)
    return x, params


def test_bernoulli_is_summed_bce():
    x, logits = _batch()
    lik = make_likelihood(Config(likelihood="bernoulli"))
    expected = -torch.stack(
        [F.binary_cross_entropy_with_logits(logits[i], x[i], reduction="sum") for i in range(6)]
    )
    torch.testing.assert_close(lik.log_prob(x, logits), expected)
    binary = (x > 0.5).float()
    torch.testing.assert_close(
        lik.log_prob(binary, logits), D.Bernoulli(logits=logits).log_prob(binary).flatten(1).sum(1)
    )


def test_gaussian_half_variance_is_sse_plus_constant():
    x, mu = _batch()
    lik = make_likelihood(Config(likelihood="gaussian"))  # default sigma^2 = 1/2
    sse = (x - mu).square().flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, mu), -sse - D_PIX / 2 * math.log(math.pi))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_gaussian_closed_form(sigma):
    x, mu = _batch(2)
    sse = (x - mu).square().flatten(1).sum(1)
    expected = -sse / (2 * sigma**2) - D_PIX * math.log(sigma) - D_PIX / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(Gaussian(sigma).log_prob(x, mu), expected)


def test_gaussian_learned_uses_its_sigma():
    x, mu = _batch(3)
    lik = make_likelihood(Config(likelihood="gaussian_learned", init_log_sigma=math.log(0.3)))
    torch.testing.assert_close(lik.log_prob(x, mu), Gaussian(0.3).log_prob(x, mu))
    assert lik.logged()["sigma"] == pytest.approx(0.3)
    assert sum(p.numel() for p in lik.parameters()) == 1


# --------------------------------------------------------------------------- sigma-VAE


def _normal_log_prob(x, mu, sigma) -> torch.Tensor:
    """log N(x; mu, sigma^2) summed over pixels, per image, written out in float64."""
    sse = (x.double() - mu.double()).square().flatten(1).sum(1)
    return -sse / (2 * sigma**2) - D_PIX * math.log(sigma) - D_PIX / 2 * math.log(2 * math.pi)


@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_gaussian_optimal_calibrates_sigma_to_the_batch_mse(noise):
    """While calibrating, sigma^2 is the batch's MSE over every pixel, so -log p(x|z) averaged
    over the batch is (D/2)(1 + log(2 pi sigma^2)) (Rybkin et al. 2021, Sec. 3)."""
    x, eps = _batch(5)
    mu = x + noise * eps
    lik = make_likelihood(Config(likelihood="gaussian_optimal"))
    assert isinstance(lik, GaussianOptimal) and not list(lik.parameters())  # nothing learned
    lik.calibrating = True
    log_p = lik.log_prob(x, mu)
    mse = float((x.double() - mu.double()).square().mean())
    assert float(-log_p.mean()) == pytest.approx(D_PIX / 2 * (1 + math.log(2 * math.pi * mse)),
                                                 rel=1e-5)
    torch.testing.assert_close(log_p.double(), _normal_log_prob(x, mu, math.sqrt(mse)),
                               rtol=1e-5, atol=1e-3)
    # the batch sets sigma: half the batch has another MSE, so another sigma
    half = lik.log_prob(x[:3], mu[:3] + noise * eps[:3])
    mse_half = float((noise * 2 * eps[:3]).double().square().mean())
    torch.testing.assert_close(half.double(), _normal_log_prob(x[:3], mu[:3] + noise * eps[:3],
                                                               math.sqrt(mse_half)),
                               rtol=1e-5, atol=1e-3)


def test_gaussian_optimal_end_epoch_keeps_the_epochs_mse_and_evaluation_uses_it():
    """end_epoch recovers sigma^2 = the epoch's MSE from the steps' -log p and their shares
    of the images; out of training (not calibrating) every image is scored with that sigma,
    whatever the batch."""
    x, eps = _batch(6, b=10)
    mu = x + 0.2 * eps * torch.linspace(0.5, 2.0, 10).view(10, 1, 1, 1)  # unequal errors
    lik = GaussianOptimal()
    sizes = [4, 4, 2]  # the last batch smaller, as an epoch's last often is
    recon, start = [], 0
    lik.calibrating = True
    for size in sizes:
        recon.append(float(-lik.log_prob(x[start:start + size], mu[start:start + size]).mean()))
        start += size
    lik.calibrating = False
    weights = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    lik.end_epoch(torch.tensor(recon), weights, D_PIX)
    mse = float((x.double() - mu.double()).square().mean())  # over all 10 images
    assert float(lik.log_sigma.exp()) ** 2 == pytest.approx(mse, rel=1e-5)
    assert lik.logged()["sigma"] == pytest.approx(math.sqrt(mse), rel=1e-5)

    sigma = float(lik.log_sigma.exp())
    torch.testing.assert_close(lik.log_prob(x, mu).double(), _normal_log_prob(x, mu, sigma),
                               rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(lik.log_prob(x[:2], mu[:2]), lik.log_prob(x, mu)[:2])
    assert lik.state_dict().keys() == {"log_sigma"}  # saved with the model, for resuming


@pytest.mark.parametrize("error", [0.0, 1e-5])
def test_gaussian_optimal_keeps_sigma_at_least_e_minus_6(error):
    """A reconstruction closer than e^-6 RMS is scored at sigma = e^-6, as the authors clip
    it, so a perfect one cannot drive the density to infinity."""
    x, _ = _batch(7)
    mu = x + error
    lik = GaussianOptimal()
    lik.calibrating = True
    log_p = lik.log_prob(x, mu)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.double(), _normal_log_prob(x, mu, math.exp(-6)),
                               rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("error", [0.0, 1e-5])
def test_gaussian_optimal_evaluates_at_no_sigma_below_e_minus_6(error):
    """After an epoch whose steps were all at the floor, evaluation scores at sigma = e^-6."""
    x, _ = _batch(7)
    mu = x + error
    lik = GaussianOptimal()
    lik.calibrating = True
    recon = -lik.log_prob(x, mu).mean()
    lik.calibrating = False
    lik.end_epoch(recon.reshape(1), torch.ones(1), D_PIX)
    assert float(lik.log_sigma) >= GaussianOptimal.MIN_LOG_SIGMA - 1e-4


# --------------------------------------------------------------------------- the others


def test_laplace_closed_form():
    x, mu = _batch(4)
    lik = make_likelihood(Config(likelihood="laplace", laplace_scale=0.25))
    l1 = (x - mu).abs().flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, mu), -l1 / 0.25 - D_PIX * math.log(0.5))


def _cb_log_normalizer(lam):
    """log C(lam) = log(2 artanh(1 - 2 lam) / (1 - 2 lam)), Loaiza-Ganem & Cunningham 2019."""
    return math.log(2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam))


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.45, 0.7, 0.99])
def test_continuous_bernoulli_closed_form(lam):
    x = torch.tensor([[0.0, 0.2, 0.5, 1.0]])
    logits = torch.full_like(x, math.log(lam / (1 - lam)))
    expected = sum(
        xi * math.log(lam) + (1 - xi) * math.log(1 - lam) + _cb_log_normalizer(lam)
        for xi in x[0].tolist()
    )
    got = ContinuousBernoulli().log_prob(x, logits)
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_continuous_bernoulli_normalizer_near_half():
    x = torch.zeros(1, 1)
    at_half = ContinuousBernoulli().log_prob(x, torch.zeros(1, 1))  # lam = 1/2: log p(0) = log(1/2) + log 2
    assert float(at_half) == pytest.approx(0.0, abs=1e-5)
    for eps in (1e-7, 1e-4, 1e-3):
        logits = torch.tensor([[math.log((0.5 + eps) / (0.5 - eps))]])
        value = float(ContinuousBernoulli().log_prob(x, logits))
        assert math.isfinite(value)
        expected = math.log(0.5 - eps) + _cb_log_normalizer(0.5 + eps) if eps >= 1e-4 else 0.0
        assert value == pytest.approx(expected, abs=1e-3)
    # its mean is the distribution's mean, not lambda: for lam = 0.8 it is below 0.8
    lam = 0.8
    mean = float(ContinuousBernoulli().mean(torch.tensor([math.log(lam / (1 - lam))])))
    closed = lam / (2 * lam - 1) + 1 / (2 * math.atanh(1 - 2 * lam))
    assert mean == pytest.approx(closed, rel=1e-5) and mean < lam


def test_bernoulli_entropy_floor_is_bce_minimum():
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    floor = float(bernoulli_entropy_floor(x))
    expected = 2 * 0 + (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) + math.log(2)
    assert floor == pytest.approx(expected, rel=1e-5)
    logits = torch.logit(x.clamp(1e-6, 1 - 1e-6))
    bce = -float(make_likelihood(Config()).log_prob(x, logits))
    assert bce == pytest.approx(floor, abs=1e-4)


def test_unknown_likelihood_is_named():
    with pytest.raises(ValueError, match="unknown likelihood 'mse'"):
        make_likelihood(Config(likelihood="mse"))
    assert "likelihood = 'mse' is not one of" in Config(likelihood="mse").validate()[0]
