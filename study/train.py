"""Training as a plain function: `train(config, callbacks) -> TrainResult`.

The whole split stays on the device; each epoch draws one seeded permutation and slices
batches from it (no DataLoader, no per-sample Python). Per-step statistics accumulate in a
device buffer, read once per epoch, so logging never stalls the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from study.config import Config
from study.data import Splits, load_splits
from study.errors import UsageError
from study.evaluate import evaluate_elbo, evaluate_test
from study.likelihoods import Likelihood, make_likelihood
from study.model import VAE, build_model
from study.objective import beta_at, elbo_terms


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the message names epoch and step."""


class Callback:
    """Hooks the loop calls; override what you need. Raising stops training (e.g. pruning)."""

    def on_train_start(self, model: VAE, likelihood: Likelihood, splits: Splits) -> None:
        """Once, after the model is built and before the first step."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """First epoch only, every `config.step_log_every` steps (global step, 1-based)."""

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """After each epoch (1-based) with train/*, val/*, beta, lr, epoch_seconds."""


@dataclass
class TrainResult:
    config: Config
    model: VAE
    likelihood: Likelihood
    history: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def resolve_device(name: str) -> str:
    """`auto` -> cuda, then mps, then cpu; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA GPU is visible; use DEVICE=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps requested but MPS is unavailable; use DEVICE=cpu or auto")
    return name


def lr_at(config: Config, epoch: int) -> float:
    """Learning rate of epoch `epoch` (0-based). `burda`: stage i lasts 3^i epochs at
    lr * 10^(-i/7) (Burda et al. 2016, Section 5)."""
    if config.lr_schedule == "constant":
        return config.lr
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return config.lr * 10 ** (-stage / 7)


def _splits_for(config: Config, device: str) -> Splits:
    return load_splits(
        config.dataset, config.data_root, device=device, val_size=config.val_size,
        seed=config.seed, binarize=config.binarize,
        train_subset=config.train_subset, test_subset=config.test_subset,
    )


def train(
    config: Config,
    callbacks: list[Callback] | tuple = (),
    splits: Splits | None = None,
    evaluate_at_end: bool = True,
) -> TrainResult:
    """Train a VAE as `config` says; validate each epoch; evaluate the test split at the end.

    Deterministic for a seed on the CPU. Raises NonFiniteLoss naming the epoch and step.
    """
    problems = config.validate()
    if problems:
        raise UsageError("invalid config: " + "; ".join(problems))
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if splits is None:
        splits = _splits_for(config, device)

    torch.manual_seed(config.seed)
    model = build_model(config, splits.image_shape).to(device)
    likelihood = make_likelihood(config).to(device)
    params = list(model.parameters()) + list(likelihood.parameters())
    optimizer = torch.optim.Adam(
        params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
        foreach=device != "cpu" or None,
    )
    step_fn = _compiled_step(model, likelihood, config)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1)

    n = len(splits.train)
    bs = config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    result = TrainResult(config, model, likelihood, device=device)
    for cb in callbacks:
        cb.on_train_start(model, likelihood, splits)
    t_start = time.perf_counter()
    global_step = 0
    for epoch in range(config.epochs):
        t_epoch = time.perf_counter()
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x_all = splits.train.served(epoch)
        perm = torch.randperm(n, device=device, generator=gen)
        stats = torch.empty(steps_per_epoch, 4, device=device)  # loss, recon, kl, batch size
        betas = [beta_at(config, global_step + i, steps_per_epoch) for i in range(steps_per_epoch)]
        for i in range(steps_per_epoch):
            x = x_all[perm[i * bs:(i + 1) * bs]]
            terms = step_fn(x, betas[i], gen)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            stats[i, 0] = terms["loss"].detach()
            stats[i, 1] = terms["recon"].detach()
            stats[i, 2] = terms["kl"].detach()
            stats[i, 3] = x.shape[0]
        stats = stats.cpu()
        bad = (~torch.isfinite(stats[:, :3])).any(1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch + 1} step {global_step + i + 1} "
                f"(step {i + 1} of the epoch; lr {lr:g}, beta {betas[i]:g})"
            )
        if epoch == 0:
            for i in range(config.step_log_every - 1, steps_per_epoch, config.step_log_every):
                for cb in callbacks:
                    cb.on_step(i + 1, {"train/recon": float(stats[i, 1]),
                                       "train/kl": float(stats[i, 2]), "beta": betas[i]})
        global_step += steps_per_epoch
        w = stats[:, 3] / stats[:, 3].sum()
        loss, recon, kl = (float((stats[:, j] * w).sum()) for j in range(3))
        train_seconds = time.perf_counter() - t_epoch
        metrics = {
            "train/loss": loss, "train/recon": recon, "train/kl": kl, "train/nelbo": recon + kl,
            "beta": betas[-1], "lr": lr, "epoch_seconds": train_seconds,
        }
        val = evaluate_elbo(model, likelihood, splits.val, config, seed=config.seed + 7)
        metrics.update({f"val/{k}": v for k, v in val.items()})
        metrics.update({f"likelihood/{k}": v for k, v in likelihood.logged().items()})
        result.history.append(metrics)
        for cb in callbacks:
            cb.on_epoch(epoch + 1, metrics)
    result.seconds = time.perf_counter() - t_start
    if evaluate_at_end:
        result.test = evaluate_test(model, likelihood, splits, config)
    return result


def _compiled_step(model: VAE, likelihood: Likelihood, config: Config):
    """The forward pass of one step, optionally through torch.compile (falls back cleanly)."""

    def step(x, beta, gen):
        return elbo_terms(model, likelihood, x, beta=beta, free_bits=config.free_bits,
                          iw_samples=config.iw_samples, generator=gen)

    if not config.compile:
        return step
    try:
        compiled = torch.compile(step, dynamic=False)
    except Exception:  # compile unavailable on this platform: eager is correct, only slower
        return step
    return compiled
