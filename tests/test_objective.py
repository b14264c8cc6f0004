"""The objective against known values: the KL in closed form, beta schedules, free bits, the
ELBO terms' reductions, the IWAE bound and active units."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from study.config import Config
from study.likelihoods import make_likelihood
from study.model import build_model
from study.objective import (
    active_units,
    beta_at,
    elbo_terms,
    free_bits_kl,
    gaussian_kl,
    importance_weighted_bound,
)

SHAPE = (1, 28, 28)
D_PIX = 784


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    q = D.Normal(mu, (0.5 * logvar).exp())
    p = D.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), D.kl_divergence(q, p))
    # a known value: mu = 1, sigma = 1 -> 1/2 nat
    assert float(gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]))) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "config, step, expected",
    [
        (Config(beta=2.0), 500, 2.0),
        (Config(beta=2.0, beta_schedule="linear", warmup=100), 0, 0.0),
        (Config(beta=2.0, beta_schedule="linear", warmup=100), 25, 0.5),
        (Config(beta=2.0, beta_schedule="linear", warmup=100), 100, 2.0),
        (Config(beta=2.0, beta_schedule="linear", warmup=100), 1000, 2.0),
        # warm-up counted in epochs of 50 steps: step 75 is epoch 1.5 of 3
        (Config(beta=1.0, beta_schedule="linear", warmup=3, schedule_unit="epoch"), 75, 0.5),
        # 4 cycles over 10 epochs of 100 steps: period 250 steps, rising for 125
        (Config(beta=1.0, beta_schedule="cyclical", epochs=10), 0, 0.0),
        (Config(beta=1.0, beta_schedule="cyclical", epochs=10), 50, 0.4),
        (Config(beta=1.0, beta_schedule="cyclical", epochs=10), 125, 1.0),
        (Config(beta=1.0, beta_schedule="cyclical", epochs=10), 200, 1.0),
        (Config(beta=1.0, beta_schedule="cyclical", epochs=10), 250, 0.0),
        (Config(beta=1.0, beta_schedule="cyclical", epochs=10), 300, 0.4),
    ],
)
def test_beta_schedules(config, step, expected):
    steps_per_epoch = 50 if config.schedule_unit == "epoch" else 100
    assert beta_at(config, step, steps_per_epoch) == pytest.approx(expected)


def test_free_bits_floor_each_dimension():
    kl_dim = torch.tensor([[0.1, 2.0, 0.0], [0.3, 4.0, 0.0]])  # batch means 0.2, 3.0, 0.0
    assert float(free_bits_kl(kl_dim, 0.0)) == pytest.approx(3.2)
    assert float(free_bits_kl(kl_dim, 0.5)) == pytest.approx(0.5 + 3.0 + 0.5)


def _small_model(seed=0, likelihood="bernoulli"):
    config = Config(latent_dim=4, hidden=(32,), likelihood=likelihood)
    torch.manual_seed(seed)
    return build_model(config, SHAPE), make_likelihood(config)


def test_iwae_bound_k1_is_elbo_and_k50_not_below():
    model, lik = _small_model()
    x = (torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    with torch.no_grad():
        terms = elbo_terms(model, lik, x, generator=torch.Generator().manual_seed(5))
        bound1 = importance_weighted_bound(model, lik, x, k=1, generator=torch.Generator().manual_seed(5))
    # same noise: the k = 1 bound is -(recon + kl) up to the analytic vs sampled KL;
    # averaged over many draws they agree
    many = torch.stack([
        importance_weighted_bound(model, lik, x, k=1, generator=torch.Generator().manual_seed(s))
        for s in range(200)
    ]).mean()
    assert float(-many) == pytest.approx(float(terms["nelbo"]), rel=2e-3)
    assert bound1.shape == (64,)
    bound50 = importance_weighted_bound(model, lik, x, k=50, chunk=7,
                                        generator=torch.Generator().manual_seed(6))
    assert float(bound50.mean()) >= float(many) - 1e-3
    # chunking does not change the estimate's expectation: one chunk vs many chunks agree closely
    bound50_one_chunk = importance_weighted_bound(model, lik, x, k=50, chunk=50,
                                                  generator=torch.Generator().manual_seed(6))
    assert float(bound50.mean()) == pytest.approx(float(bound50_one_chunk.mean()), rel=2e-3)


def test_elbo_terms_reductions():
    model, lik = _small_model(likelihood="gaussian")
    x = torch.rand(10, *SHAPE, generator=torch.Generator().manual_seed(1))
    terms = elbo_terms(model, lik, x, beta=3.0, generator=torch.Generator().manual_seed(2))
    mu, logvar = model.encode(x)
    kl = gaussian_kl(mu, logvar)
    torch.testing.assert_close(terms["kl"], kl.sum(1).mean())  # summed over dims, mean over images
    torch.testing.assert_close(terms["kl_dim"], kl.mean(0))
    torch.testing.assert_close(terms["nelbo"], terms["recon"] + terms["kl"])
    torch.testing.assert_close(terms["loss"], terms["recon"] + 3.0 * terms["kl"])
    # recon: -log p summed over pixels (~ SSE + D/2 log pi), averaged over images
    assert float(terms["recon"].detach()) > D_PIX / 2 * math.log(math.pi)


def test_iwae_training_objective_is_bound():
    model, lik = _small_model()
    x = (torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    with torch.no_grad():
        vae = torch.stack([elbo_terms(model, lik, x, generator=torch.Generator().manual_seed(s))["loss"]
                           for s in range(30)]).mean()
        iwae = torch.stack([elbo_terms(model, lik, x, iw_samples=20,
                                       generator=torch.Generator().manual_seed(s))["loss"]
                            for s in range(30)]).mean()
    assert float(iwae) <= float(vae) + 1e-3


def test_active_units_constructed():
    g = torch.Generator().manual_seed(0)
    means = torch.zeros(1000, 5)
    means[:, 0] = torch.randn(1000, generator=g)  # var ~ 1: active
    means[:, 1] = 0.2 * torch.randn(1000, generator=g)  # var ~ 0.04: active
    means[:, 2] = 0.05 * torch.randn(1000, generator=g)  # var ~ 0.0025: inactive
    means[:, 3] = 3.0  # constant: inactive
    assert active_units(means) == 2

