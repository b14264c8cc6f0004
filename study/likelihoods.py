"""Decoder distributions p(x|z): each is one small object with `log_prob` and `mean`.

`log_prob(x, params)` returns log p(x|z) in nats for each image, summed over pixels and with
every normalizing constant; `params` is the decoder's raw output (logits or means), shaped
like `x`. Gaussian and Laplace densities are continuous, so their nats are not comparable
with the Bernoulli's probability mass; compare models with the likelihood-free metrics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from study.config import Config


def _per_image(log_p: torch.Tensor) -> torch.Tensor:
    """Sum a per-pixel log-density over every non-batch dimension."""
    return log_p.flatten(1).sum(1)


class Likelihood(nn.Module):
    """Base: subclasses define log_prob (per image, nats) and mean (the reconstruction)."""

    name = "base"
    calibrating = False
    """True during training steps: a likelihood fitted to each batch (GaussianOptimal) uses
    the batch; evaluation scores with what training fitted."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logged(self) -> dict[str, float]:
        """Learned quantities worth tracking (e.g. a learned sigma)."""
        return {}

    def end_epoch(self, recon: torch.Tensor, weights: torch.Tensor, pixels: int) -> None:
        """After each training epoch: `recon` holds each step's -log p (nats per image),
        `weights` each step's share of the epoch's images, `pixels` D. Most keep nothing."""


class Bernoulli(Likelihood):
    """What users write as BCE: `binary_cross_entropy_with_logits(..., reduction='sum')`.

    On grey targets this is not a normalized likelihood (the Bernoulli has support {0, 1});
    its minimum over predictions is the binary entropy of x, not 0.
    """

    name = "bernoulli"

    def log_prob(self, x, params):
        return -_per_image(F.binary_cross_entropy_with_logits(params, x, reduction="none"))

    def mean(self, params):
        return torch.sigmoid(params)


class Gaussian(Likelihood):
    """What users write as MSE: N(x; mu, sigma^2) with a fixed sigma.

    log p = -SSE / (2 sigma^2) - D log(sigma) - (D/2) log(2 pi); with sigma^2 = 1/2 this is
    exactly -SSE - (D/2) log(pi).
    """

    name = "gaussian"

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = float(sigma)

    def log_prob(self, x, params):
        return _per_image(D.Normal(params, self.sigma, validate_args=False).log_prob(x))

    def mean(self, params):
        return params


class GaussianLearned(Likelihood):
    """One shared learned log-sigma: the calibrated decoder of Rybkin et al. 2021 (sigma-VAE)."""

    name = "gaussian_learned"

    def __init__(self, init_log_sigma: float = 0.0):
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(float(init_log_sigma)))

    def log_prob(self, x, params):
        return _per_image(D.Normal(params, self.log_sigma.exp(), validate_args=False).log_prob(x))

    def mean(self, params):
        return params

    def logged(self):
        return {"sigma": float(self.log_sigma.detach().exp())}


class GaussianOptimal(Likelihood):
    """The sigma-VAE's calibrated decoder (Rybkin, Daniilidis & Levine 2021, Sec. 3): one
    shared sigma set in closed form to its maximum-likelihood value, sigma^2 = the mean
    squared error over the batch's pixels, instead of being learned. At that sigma,
    -log p(x|z) averaged over the batch is exactly (D/2)(1 + log(2 pi sigma^2)).

    While `calibrating` (training steps), each batch uses its own sigma (detached: at the
    optimum the loss does not change with sigma). A held-out image is scored with the fixed
    sigma of the last training epoch (the buffer `log_sigma`, set by `end_epoch` from the
    epoch's steps), so evaluation is one fixed density. sigma is kept >= e^-6, as the
    authors clip it, so a perfect reconstruction cannot drive the density to infinity."""

    name = "gaussian_optimal"
    MIN_LOG_SIGMA = -6.0

    def __init__(self):
        super().__init__()
        self.register_buffer("log_sigma", torch.zeros(()))

    def log_prob(self, x, params):
        if self.calibrating:
            mse = (x - params).detach().square().mean()
            log_sigma = (0.5 * mse.log()).clamp_min(self.MIN_LOG_SIGMA)
        else:
            log_sigma = self.log_sigma
        return _per_image(D.Normal(params, log_sigma.exp(), validate_args=False).log_prob(x))

    def mean(self, params):
        return params

    def logged(self):
        return {"sigma": float(self.log_sigma.exp())}

    def end_epoch(self, recon, weights, pixels):
        # each step's sigma^2 from its -log p = (D/2)(1 + log(2 pi sigma^2)); their
        # image-weighted mean is the epoch's mean squared error
        sigma2 = (2 * recon.double() / pixels - 1).exp() / (2 * math.pi)
        log_sigma = float(0.5 * (sigma2 * weights.double()).sum().log())
        self.log_sigma.fill_(max(log_sigma, self.MIN_LOG_SIGMA))  # as the steps were clipped


class ContinuousBernoulli(Likelihood):
    """Loaiza-Ganem & Cunningham 2019: the Bernoulli with its normalizer on [0, 1].

    torch's implementation uses a Taylor expansion of the log-normalizer near lambda = 1/2,
    where the closed form is 0/0. The reconstruction is the distribution's mean, not lambda.
    """

    name = "continuous_bernoulli"

    def log_prob(self, x, params):
        return _per_image(D.ContinuousBernoulli(logits=params, validate_args=False).log_prob(x))

    def mean(self, params):
        return D.ContinuousBernoulli(logits=params, validate_args=False).mean


class Laplace(Likelihood):
    """L1 with a scale b: log p = -|x - mu| / b - log(2 b) per pixel."""

    name = "laplace"

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def log_prob(self, x, params):
        return _per_image(D.Laplace(params, self.scale, validate_args=False).log_prob(x))

    def mean(self, params):
        return params


def make_likelihood(config: Config) -> Likelihood:
    """The decoder distribution named by `config.likelihood`."""
    factories = {
        "bernoulli": lambda: Bernoulli(),
        "gaussian": lambda: Gaussian(config.sigma),
        "gaussian_learned": lambda: GaussianLearned(config.init_log_sigma),
        "gaussian_optimal": lambda: GaussianOptimal(),
        "continuous_bernoulli": lambda: ContinuousBernoulli(),
        "laplace": lambda: Laplace(config.laplace_scale),
    }
    if config.likelihood not in factories:
        raise ValueError(
            f"unknown likelihood {config.likelihood!r}; choose one of {', '.join(factories)}"
        )
    return factories[config.likelihood]()


def bernoulli_entropy_floor(x: torch.Tensor) -> torch.Tensor:
    """Minimum of summed BCE over predictions for grey targets x: sum of H(x_i), per image."""
    eps = torch.finfo(x.dtype).tiny
    h = -(x * (x + eps).log() + (1 - x) * (1 - x + eps).log())
    return _per_image(h)


LOG_PI = math.log(math.pi)
