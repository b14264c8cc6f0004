"""Evaluation on a held-out split: ELBO components, per-dimension KL, active units, the
importance-weighted bound, and likelihood-independent metrics that compare models trained
with different losses fairly. Validation is evaluated during training, test once at the end.

All values are per image: nats for likelihood terms, summed over pixels and latent dims and
averaged over images; SSE summed over pixels, averaged over images.
"""

from __future__ import annotations

import math

import torch

from study import quality
from study.classifier import Classifier
from study.config import Config
from study.data import Split
from study.likelihoods import Likelihood
from study.model import VAE
from study.objective import active_units, elbo_terms, importance_weighted_bound


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def evaluate_elbo(
    model: VAE, likelihood: Likelihood, split: Split, config: Config, seed: int = 0
) -> dict[str, float]:
    """recon / kl / nelbo, kl_dim_<jj>, active units and SSE of the mean reconstruction.

    One posterior sample per image from a generator seeded with `seed`, so the same model
    gives the same numbers. Returns floats keyed without a split prefix.
    """
    model.eval()
    x_all = split.served(epoch=0)
    device = x_all.device
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(split)
    sums = {"recon": 0.0, "kl": 0.0, "sse": 0.0}
    kl_dim = torch.zeros(model.latent_dim, device=device)
    means = []
    for sl in _batches(n, config.eval_batch_size):
        x = x_all[sl]
        terms = elbo_terms(model, likelihood, x, generator=gen)
        b = x.shape[0]
        sums["recon"] += float(terms["recon"]) * b
        sums["kl"] += float(terms["kl"]) * b
        kl_dim += terms["kl_dim"] * b
        mu = terms["mu"]
        means.append(mu)
        recon_mean = likelihood.mean(model.decode(mu))
        sums["sse"] += float((recon_mean - x).square().flatten(1).sum(1).sum())
    model.train()
    out = {k: v / n for k, v in sums.items()}
    out["nelbo"] = out["recon"] + out["kl"]
    out["mse"] = out["sse"] / x_all[0].numel()
    out["active_units"] = active_units(torch.cat(means))
    width = len(str(model.latent_dim - 1))
    for j, v in enumerate((kl_dim / n).tolist()):
        out[f"kl_dim_{j:0{max(2, width)}d}"] = v
    return out


@torch.no_grad()
def evaluate_iwae(
    model: VAE, likelihood: Likelihood, split: Split, k: int, images: int | None = None,
    seed: int = 0, batch_images: int = 100, chunk: int = 100,
) -> float:
    """Negative importance-weighted bound -L_k, nats per image, over the first `images` images."""
    model.eval()
    x_all = split.served(epoch=0)
    if images is not None:
        x_all = x_all[:images]
    gen = torch.Generator(device=x_all.device).manual_seed(seed)
    total = 0.0
    for sl in _batches(x_all.shape[0], batch_images):
        total += float(importance_weighted_bound(model, likelihood, x_all[sl], k, chunk, gen).sum())
    model.train()
    return -total / x_all.shape[0]


def convergence(history: list[dict[str, float]]) -> dict[str, float]:
    """How much a run was still changing at its end, from its per-epoch validation values,
    over its last tenth of epochs (at least the last one), keyed for logging:

    converge/val_nelbo_change  the validation NELBO's fall over those epochs, nats per image
                               (positive: still improving)
    converge/val_nelbo_share   that fall as a share of its fall since the first epoch
    converge/log_sigma_change  the change of a likelihood's log sigma over those epochs

    Empty for a run of one epoch: nothing can be said about its trend.
    """
    epochs = len(history)
    if epochs < 2:
        return {}
    back = max(1, math.ceil(epochs / 10))
    first, before, last = history[0], history[-1 - back], history[-1]
    change = before["val/nelbo"] - last["val/nelbo"]
    total = first["val/nelbo"] - last["val/nelbo"]
    out = {"converge/val_nelbo_change": change,
           "converge/val_nelbo_share": change / total if total > 0 else math.nan}
    if "likelihood/sigma" in last and "likelihood/sigma" in before:
        out["converge/log_sigma_change"] = math.log(last["likelihood/sigma"]
                                                    / before["likelihood/sigma"])
    return out


def evaluate_test(model: VAE, likelihood: Likelihood, splits, config: Config,
                  classifier: Classifier | None = None) -> dict[str, float]:
    """Every test metric of the engine, keyed without the `test/` prefix (the Frechet
    distance only with the dataset's `classifier`)."""
    out = evaluate_elbo(model, likelihood, splits.test, config, seed=config.seed + 17)
    out["iwae_nll"] = evaluate_iwae(
        model, likelihood, splits.test, config.test_iw_k, config.test_iw_images,
        seed=config.seed + 23,
    )
    out["iwae_k"] = config.test_iw_k
    out.update(quality.quality_metrics(model, likelihood, splits, config, classifier))
    return out
