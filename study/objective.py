"""The objective: ELBO components (distortion and rate), the optimized loss with beta and
free bits, beta schedules, and the importance-weighted bound of Burda et al. 2016.

Units everywhere: nats per image, i.e. summed over pixels and latent dimensions and averaged
over the images of a batch. Per-dimension KLs are averaged over images, not summed over dims.
"""

from __future__ import annotations

import math

import torch

from study.config import Config
from study.likelihoods import Likelihood
from study.model import VAE


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) for each image and latent dimension, (B, Z).

    Closed form, Kingma & Welling 2014, Appendix B: -1/2 (1 + logvar - mu^2 - exp(logvar)).
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def beta_at(config: Config, step: int, steps_per_epoch: int) -> float:
    """The effective beta_t of `config`'s schedule at optimizer step `step` (0-based)."""
    t = step if config.schedule_unit == "step" else step / steps_per_epoch
    if config.beta_schedule == "constant":
        return config.beta
    if config.beta_schedule == "linear":
        if config.warmup <= 0:
            return config.beta
        return config.beta * min(1.0, t / config.warmup)
    if config.beta_schedule == "cyclical":
        # Fu et al. 2019: `cycles` cycles over the run, each rising linearly from 0 for a
        # fraction `cycle_ratio` of the cycle, then held at beta.
        total = config.epochs * (steps_per_epoch if config.schedule_unit == "step" else 1)
        period = total / config.cycles
        phase = (t % period) / period
        return config.beta * min(1.0, phase / config.cycle_ratio)
    raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}")


def free_bits_kl(kl_dim: torch.Tensor, floor: float) -> torch.Tensor:
    """Summed KL with each dimension's batch-mean KL floored at `floor` nats (Kingma et al. 2016).

    `kl_dim` is (B, Z); returns a scalar (nats per image). With floor = 0, the plain KL.
    """
    per_dim = kl_dim.mean(0)
    if floor > 0:
        per_dim = per_dim.clamp(min=floor)
    return per_dim.sum()


def elbo_terms(
    model: VAE,
    likelihood: Likelihood,
    x: torch.Tensor,
    beta: float = 1.0,
    free_bits: float = 0.0,
    iw_samples: int = 1,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ELBO components of a batch, each averaged over images (nats per image).
    `beta` may be a float or a 0-dim tensor; `eps`, when given, is the reparameterization noise
    ((B, Z), or (k, B, Z) for k > 1) in place of a draw from `generator`.

    recon   = -E_q[log p(x|z)]  (distortion; one sample per image, or the mean over k)
    kl      = KL(q(z|x) || p(z)) in closed form (rate), summed over latent dims
    nelbo   = recon + kl
    loss    = recon + beta * kl (with free bits), or for k > 1 the beta-weighted IWAE bound
    kl_dim  = (Z,) KL of each latent dimension
    mu      = (B, Z) posterior means, detached (evaluation reuses them; no second encode)
    """
    mu, logvar = model.encode(x)
    kl_dim = gaussian_kl(mu, logvar)
    kl = kl_dim.sum(1)
    if iw_samples == 1:
        z = model.sample(mu, logvar, generator=generator, eps=eps)
        log_px = likelihood.log_prob(x, model.decode(z))
        recon = -log_px.mean()
        loss = recon + beta * free_bits_kl(kl_dim, free_bits)
    else:
        z = model.sample(mu, logvar, k=iw_samples, generator=generator, eps=eps)  # (k, B, Z)
        log_px = likelihood.log_prob(
            x.expand(iw_samples, *x.shape).flatten(0, 1), model.decode(z).flatten(0, 1)
        ).view(iw_samples, -1)
        log_w = log_px + beta * log_prior_over_posterior(z, mu, logvar)
        loss = -(torch.logsumexp(log_w, 0) - math.log(iw_samples)).mean()
        recon = -log_px.mean()
    kl_mean = kl.mean()
    return {
        "loss": loss,
        "recon": recon,
        "kl": kl_mean,
        "nelbo": recon + kl_mean,
        "kl_dim": kl_dim.mean(0),
        "mu": mu.detach(),
    }


_LOG_2PI = math.log(2 * math.pi)


def log_prior_over_posterior(z, mu, logvar) -> torch.Tensor:
    """log p(z) - log q(z|x) for samples z (k, B, Z), summed over dimensions -> (k, B)."""
    log_p = -0.5 * (z.square() + _LOG_2PI)
    log_q = -0.5 * ((z - mu).square() / logvar.exp() + logvar + _LOG_2PI)
    return (log_p - log_q).sum(-1)


@torch.no_grad()
def importance_weighted_bound(
    model: VAE,
    likelihood: Likelihood,
    x: torch.Tensor,
    k: int,
    chunk: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log p(x) >= L_k = E[log (1/k) sum_i p(x, z_i) / q(z_i|x)] per image, (B,).

    Burda et al. 2016, eq. 8; k = 1 is the ELBO. Samples are drawn `chunk` at a time and
    combined with a running logsumexp, so memory is bounded by chunk * B images.
    """
    mu, logvar = model.encode(x)
    total = torch.full((x.shape[0],), -math.inf, device=x.device)
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        z = model.sample(mu, logvar, k=n, generator=generator)
        params = model.decode(z)
        log_px = likelihood.log_prob(
            x.expand(n, *x.shape).flatten(0, 1), params.flatten(0, 1)
        ).view(n, -1)
        log_w = log_px + log_prior_over_posterior(z, mu, logvar)
        total = torch.logaddexp(total, torch.logsumexp(log_w, 0))
    return total - math.log(k)


def active_units(posterior_means: torch.Tensor, threshold: float = 0.01) -> int:
    """Dimensions u with Cov_x(E_q[z_u]) > threshold (Burda et al. 2016, Section 5.2).

    `posterior_means` is (N, Z), the encoder means over a dataset.
    """
    return int((posterior_means.var(0) > threshold).sum())
