"""Training as a plain function: `train(config, callbacks) -> TrainResult`.

The whole split stays on the device; each epoch draws one seeded permutation and slices
batches from it (no DataLoader, no per-sample Python). Per-step statistics accumulate in a
device buffer, read once per epoch, so logging never stalls the loop. The step itself
(eager or compiled) is `study.step`; resumable states are `study.resume`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from study.classifier import Classifier
from study.config import Config
from study.data import Splits, splits_for
from study.denormals import flush_denormals
from study.errors import UsageError
from study.evaluate import evaluate_elbo, evaluate_test
from study.likelihoods import Likelihood, make_likelihood
from study.model import VAE, build_model, glorot_init
from study.objective import beta_at
from study.optim import lr_at, make_adam
from study.resume import Checkpointing, TrainingStopped, resume_problem, resume_state
from study.step import TrainingStep


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

    def on_train_end(self, result: TrainResult) -> None:
        """Once, after the last epoch and the test evaluation."""


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


class Trainer:
    """The model, likelihood, optimizer and noise of one run, advanced an epoch at a time.

    `train` drives it; the benchmark alternates its epochs with a baseline's.
    """

    def __init__(self, config: Config, splits: Splits | None = None):
        problems = config.validate()
        if problems:
            raise UsageError("invalid config: " + "; ".join(problems))
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = resolve_device(config.device)
        if self.device == "cpu":
            # Adam's moments of never-lit border pixels decay into the denormal range, where
            # the CPU computes many times slower; values below 1.2e-38 change no loss.
            flush_denormals()
        self.splits = splits if splits is not None else splits_for(config, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.splits.image_shape).to(self.device)
        if config.init == "glorot":
            glorot_init(self.model, self.splits.train.grey().mean(0))
        self.likelihood = make_likelihood(config).to(self.device)
        params = list(self.model.parameters()) + list(self.likelihood.parameters())
        self.optimizer = make_adam(params, config)
        self.step_fn = TrainingStep(self.model, self.likelihood, self.optimizer, config)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.steps_per_epoch = math.ceil(len(self.splits.train) / config.batch_size)
        self.epoch = 0  # epochs completed
        self._served = None
        self.global_step = 0

    def state_dict(self) -> dict:
        """Everything the next epoch depends on: the weights, Adam's moments, the noise
        generator and the counters (each epoch's order and binary draw follow from the seed
        and the epoch number). Tensors are copied to the CPU."""
        def cpu(tree):
            if isinstance(tree, torch.Tensor):
                return tree.detach().to("cpu", copy=True)
            if isinstance(tree, dict):
                return {k: cpu(v) for k, v in tree.items()}
            if isinstance(tree, (list, tuple)):
                return type(tree)(cpu(v) for v in tree)
            return tree

        return cpu({
            "model": self.model.state_dict(),
            "likelihood": self.likelihood.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "global_step": self.global_step,
        })

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output, on this trainer's device."""
        self.model.load_state_dict(state["model"])
        self.likelihood.load_state_dict(state["likelihood"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])

    def run_epoch(self) -> tuple[dict[str, float], torch.Tensor, list[float]]:
        """Train one epoch. Returns the epoch's train metrics, the per-step (loss, recon, kl)
        on the CPU, and the beta of every step. Raises NonFiniteLoss."""
        config, bs, n = self.config, self.config.batch_size, len(self.splits.train)
        t_epoch = time.perf_counter()
        lr = lr_at(config, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, device=self.device, generator=self.generator)
        if self._served is None:  # one buffer, refilled every epoch (see Split.served)
            train = self.splits.train
            self._served = torch.empty((len(train), *train.shape), device=self.device)
        x_all = self.splits.train.served(self.epoch, perm, out=self._served)  # batches: views
        stats = torch.empty(self.steps_per_epoch, 3, device=self.device)
        betas = [beta_at(config, self.global_step + i, self.steps_per_epoch)
                 for i in range(self.steps_per_epoch)]
        self.step_fn.begin_epoch(lr, self.global_step, self.steps_per_epoch)
        self.likelihood.calibrating = True
        try:
            for i in range(self.steps_per_epoch):
                stats[i] = self.step_fn(x_all[i * bs:(i + 1) * bs], betas[i], self.generator, i)
        finally:
            self.likelihood.calibrating = False
        self.step_fn.end_epoch(self.global_step + self.steps_per_epoch)
        stats = stats.cpu()  # the epoch's one synchronization
        bad = (~torch.isfinite(stats)).any(1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLoss(
                f"non-finite loss at epoch {self.epoch + 1} step {self.global_step + i + 1} "
                f"(step {i + 1} of the epoch; lr {lr:g}, beta {betas[i]:g})"
            )
        sizes = torch.full((self.steps_per_epoch,), float(bs))
        sizes[-1] = n - bs * (self.steps_per_epoch - 1)  # the last batch may be smaller
        w = sizes / n
        loss, recon, kl = (float((stats[:, j] * w).sum()) for j in range(3))
        self.likelihood.end_epoch(stats[:, 1], w, math.prod(self.splits.image_shape))
        self.epoch += 1
        self.global_step += self.steps_per_epoch
        metrics = {
            "train/loss": loss, "train/recon": recon, "train/kl": kl, "train/nelbo": recon + kl,
            "beta": betas[-1], "lr": lr, "epoch_seconds": time.perf_counter() - t_epoch,
        }
        return metrics, stats, betas

    def validate(self) -> dict[str, float]:
        """Validation metrics (val/*) and learned likelihood quantities (likelihood/*)."""
        val = evaluate_elbo(self.model, self.likelihood, self.splits.val, self.config,
                            seed=self.config.seed + 7)
        out = {f"val/{k}": v for k, v in val.items()}
        out.update({f"likelihood/{k}": v for k, v in self.likelihood.logged().items()})
        return out


def train(
    config: Config,
    callbacks: list[Callback] | tuple = (),
    splits: Splits | None = None,
    evaluate_at_end: bool = True,
    resume: dict | None = None,
    checkpointing: Checkpointing | None = None,
    classifier: Classifier | None = None,
) -> TrainResult:
    """Train a VAE as `config` says; validate each epoch; evaluate the test split at the end.

    Deterministic for a seed on the CPU, also across a stop and `resume` (a `resume_state`,
    checked with `resume_problem`): the resumed run ends with the weights and history of an
    uninterrupted one. Raises NonFiniteLoss naming the epoch and step, and TrainingStopped
    when `checkpointing.stop()` asks. `epoch_seconds` times the training steps only, not
    validation; `result.seconds` counts every part of a resumed run. The test metrics include
    the Frechet distance of samples when a `classifier` of the dataset is given (the caller
    prepares it: see study.classifier); training writes nothing anywhere.
    """
    trainer = Trainer(config, splits)
    result = TrainResult(config, trainer.model, trainer.likelihood, device=trainer.device)
    before = 0.0
    if resume is not None:
        problem = resume_problem(config, resume)
        if problem:
            raise UsageError(f"cannot resume: {problem}")
        trainer.load_state_dict(resume)
        result.history = [dict(row) for row in resume["history"]]
        before = float(resume["seconds"])
    for cb in callbacks:
        cb.on_train_start(trainer.model, trainer.likelihood, trainer.splits)
    t_start = last_save = time.perf_counter()
    while trainer.epoch < config.epochs:
        metrics, stats, betas = trainer.run_epoch()
        if trainer.epoch == 1:  # the early KL transient, every few steps of the first epoch
            for i in range(config.step_log_every - 1, trainer.steps_per_epoch,
                           config.step_log_every):
                for cb in callbacks:
                    cb.on_step(i + 1, {"train/recon": float(stats[i, 1]),
                                       "train/kl": float(stats[i, 2]), "beta": betas[i]})
        metrics.update(trainer.validate())
        result.history.append(metrics)
        for cb in callbacks:
            cb.on_epoch(trainer.epoch, metrics)
        if checkpointing is not None and trainer.epoch < config.epochs:
            stop, now = checkpointing.stop(), time.perf_counter()
            if stop or now - last_save >= 60 * config.checkpoint_minutes:
                checkpointing.save(resume_state(trainer.state_dict(), result.history,
                                                 before + now - t_start, config))
                last_save = time.perf_counter()
            if stop:
                raise TrainingStopped(trainer.epoch, config.epochs)
    result.seconds = before + time.perf_counter() - t_start
    if evaluate_at_end:
        result.test = evaluate_test(trainer.model, trainer.likelihood, trainer.splits, config,
                                    classifier)
    for cb in callbacks:
        cb.on_train_end(result)
    return result
