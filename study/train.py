"""Training as a plain function: `train(config, callbacks) -> TrainResult`.

The whole split stays on the device; each epoch draws one seeded permutation and slices
batches from it (no DataLoader, no per-sample Python). Per-step statistics accumulate in a
device buffer, read once per epoch, so logging never stalls the loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from study.config import Config
from study.data import Splits, load_splits
from study.denormals import flush_denormals
from study.errors import UsageError
from study.evaluate import evaluate_elbo, evaluate_test
from study.likelihoods import Likelihood, make_likelihood
from study.model import VAE, build_model, glorot_init
from study.objective import beta_at, elbo_terms


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the message names epoch and step."""


class TrainingStopped(Exception):
    """Training stopped at an epoch end because `Checkpointing.stop` asked; the state of that
    epoch end was saved first, so a later `train(..., resume=state)` goes on from it."""

    def __init__(self, epoch: int, epochs: int):
        super().__init__(f"stopped at the end of epoch {epoch} of {epochs}")
        self.epoch = epoch


@dataclass
class Checkpointing:
    """How `train` saves resumable states. `save(state)` receives `resume_state(...)` at the
    first epoch end `config.checkpoint_minutes` after the previous save (or the start), and at
    the epoch end where `stop()` first returns True; `train` then raises TrainingStopped.
    Nothing is saved after the last epoch: a finished run needs no resuming."""

    save: Callable[[dict], None]
    stop: Callable[[], bool] = lambda: False


RESUME_FORMAT = 1
# Fields that say where and how fast a run trains, not what it computes: a run may resume
# with other values of these (another device, thread count, compile setting or checkpoint
# cadence, another data folder) and still produce the run it started.
RUN_ONLY_FIELDS = ("device", "threads", "compile", "checkpoint_minutes", "data_root")


def resume_problem(config: Config, state: dict) -> str | None:
    """Why `state` cannot continue a run of `config` (None when it can): another format, or a
    config that differs in a field that changes the result."""
    if state.get("format") != RESUME_FORMAT:
        return f"resume format {state.get('format')!r}, expected {RESUME_FORMAT}"
    # A field added after the state was saved had its default then.
    saved = {**dataclasses.asdict(Config()), **state.get("config", {})}
    ours = dataclasses.asdict(config)
    differ = [name for name in Config.field_names()
              if name not in RUN_ONLY_FIELDS and _plain(saved[name]) != _plain(ours[name])]
    if differ:
        return "the config changed since the state was saved: " + ", ".join(
            f"{name} {saved.get(name)!r} -> {ours[name]!r}" for name in differ)
    if not 0 < state.get("epoch", 0) < config.epochs:
        return f"the state is at epoch {state.get('epoch')} of {config.epochs}"
    return None


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


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
    """Learning rate of epoch `epoch` (0-based).

    `burda`: stage i = 0..7 lasts 3^i epochs at lr * 10^(-i/7) (Burda et al. 2016, Sec. 5);
    as in the authors' code (yburda/iwae, experiments.py), the factor 10^(1 - i/7) is rounded
    to one decimal: 10, 7.2, 5.2, 3.7, 2.7, 1.9, 1.4, 1.0 (times lr / 10).
    """
    if config.lr_schedule == "constant":
        return config.lr
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return config.lr / 10 * round(10 ** (1 - stage / 7), 1)


class BurdaAdam(torch.optim.Optimizer):
    """Adam as yburda/iwae's `optimizers.py` writes it, for reproducing Burda et al. 2016.

    Against torch's Adam: the second moments start at 1, not 0 (until that decays, parameters
    with gradients well below 1 take smaller steps); the bias correction is folded
    into the step size, lr * sqrt(1 - beta2^t) / (1 - beta1^t), and eps is added to the
    uncorrected sqrt(v); each step moves the parameters by the moments from before it (Theano
    evaluates all updates of a step from the old values, so the first step moves nothing);
    and the moments see `grad_scale` times our gradient, because the authors differentiate the
    bound summed over the minibatch where we take the mean per image. State keys are torch's
    (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints and the compiled step treat it alike.
    """

    def __init__(self, params, lr=1e-3, betas=(0.99, 0.999), eps=1e-4, grad_scale=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, grad_scale=grad_scale))

    def init_state(self, param) -> dict:
        """The state of a parameter before its first step (also used by the compiled step)."""
        state = self.state[param]
        if not state:  # the step count on the CPU, as torch's Adam keeps it: reading it is free
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.ones_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("BurdaAdam takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.init_state(param)
                t = float(state["step"]) + 1
                alpha = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                param.sub_(alpha * m / (v.sqrt() + group["eps"]))  # the old moments
                g = param.grad * group["grad_scale"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["step"] += 1


def make_adam(params, config: Config) -> torch.optim.Optimizer:
    """`config.optimizer`'s Adam. torch's with the fused kernel (one pass over all parameters;
    ~6x faster steps on this CPU than the per-tensor loop, measured), falling back to the
    default where unsupported; or the authors' (`BurdaAdam`, gradient scale = batch size)."""
    kwargs = dict(lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    if config.optimizer == "adam_burda":
        return BurdaAdam(params, grad_scale=float(config.batch_size), **kwargs)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, **kwargs)


def _splits_for(config: Config, device: str) -> Splits:
    return load_splits(
        config.dataset, config.data_root, device=device, val_size=config.val_size,
        seed=config.seed, binarize=config.binarize,
        train_subset=config.train_subset, test_subset=config.test_subset,
    )


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
            # Adam's moments of pixels that are rarely or never lit (MNIST's border) decay
            # into the denormal range; the CPU then computes with them up to 100x slower. A
            # Burda step resumed at epoch 225 ran 1.4x slower than a fresh one until these
            # were flushed to zero (measured). Values below 1.2e-38 change nothing a loss can
            # see. On every intra-op thread, not only this one: see study.denormals.
            flush_denormals()
        self.splits = splits if splits is not None else _splits_for(config, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.splits.image_shape).to(self.device)
        if config.init == "glorot":
            glorot_init(self.model, self.splits.train.grey().mean(0))
        self.likelihood = make_likelihood(config).to(self.device)
        params = list(self.model.parameters()) + list(self.likelihood.parameters())
        self.optimizer = make_adam(params, config)
        self.step_fn = _Step(self.model, self.likelihood, self.optimizer, config)
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
        for i in range(self.steps_per_epoch):
            stats[i] = self.step_fn(x_all[i * bs:(i + 1) * bs], betas[i], self.generator, i)
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


def resume_state(trainer: Trainer, result: TrainResult, seconds: float) -> dict:
    """A resumable state: the trainer's, the history so far, the seconds trained so far and
    the config, all plain types and tensors (`torch.load(..., weights_only=True)` reads it)."""
    return {"format": RESUME_FORMAT, **trainer.state_dict(),
            "history": [dict(row) for row in result.history], "seconds": seconds,
            "config": dataclasses.asdict(trainer.config)}


def train(
    config: Config,
    callbacks: list[Callback] | tuple = (),
    splits: Splits | None = None,
    evaluate_at_end: bool = True,
    resume: dict | None = None,
    checkpointing: Checkpointing | None = None,
) -> TrainResult:
    """Train a VAE as `config` says; validate each epoch; evaluate the test split at the end.

    Deterministic for a seed on the CPU, also across a stop and `resume` (a `resume_state`,
    checked with `resume_problem`): the resumed run ends with the weights and history of an
    uninterrupted one. Raises NonFiniteLoss naming the epoch and step, and TrainingStopped
    when `checkpointing.stop()` asks. `epoch_seconds` times the training steps only, not
    validation; `result.seconds` counts every part of a resumed run.
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
                checkpointing.save(resume_state(trainer, result, before + now - t_start))
                last_save = time.perf_counter()
            if stop:
                raise TrainingStopped(trainer.epoch, config.epochs)
    result.seconds = before + time.perf_counter() - t_start
    if evaluate_at_end:
        result.test = evaluate_test(trainer.model, trainer.likelihood, trainer.splits, config)
    return result


class _Objective(torch.nn.Module):
    """The model and likelihood as one module whose forward is the training loss, so that
    torch.func can take the gradient with respect to all their parameters at once."""

    def __init__(self, model: VAE, likelihood: Likelihood, config: Config):
        super().__init__()
        self.model, self.likelihood = model, likelihood
        self.free_bits, self.iw_samples = config.free_bits, config.iw_samples

    def forward(self, x, eps, beta):
        terms = elbo_terms(self.model, self.likelihood, x, beta=beta, free_bits=self.free_bits,
                           iw_samples=self.iw_samples, eps=eps)
        return terms["loss"], torch.stack([terms["loss"], terms["recon"], terms["kl"]]).detach()


class _Step:
    """One training step, forward, backward and Adam: `step(x, beta, generator, i)` -> the
    step's (loss, recon, kl), detached. `begin_epoch` and `end_epoch` frame each epoch.

    Eager: elbo_terms, backward, the optimizer's fused Adam. With `config.compile`, the whole
    step is one torch.compile graph: the gradient by torch.func over the parameters, then
    Adam's update written out (torch.optim.Adam's arithmetic, in place on the model's
    parameters and on the optimizer's own exp_avg / exp_avg_sq, so its state_dict stays the
    truth). At batch 20 a step is mostly per-op overhead; one graph took it from 2.33 to 1.37
    ms on one thread (measured). Adam's bias corrections are computed per epoch outside the
    graph, in float64 as the fused kernel does (inside, Inductor recomputed them in every
    vector iteration: slower than eager). The noise is drawn here from the generator, in the
    same order and shape as the eager path draws it, and beta and the step's scalars go in as
    tensors, so nothing recompiles. If compiling fails, the first step says so once and the
    run goes on eagerly with the same noise and state: slower, never different.
    """

    def __init__(self, model: VAE, likelihood: Likelihood, optimizer: torch.optim.Optimizer,
                 config: Config):
        self.model, self.likelihood, self.optimizer = model, likelihood, optimizer
        self.config = config
        self.dtype = next(model.parameters()).dtype
        self.compiled = None
        if config.compile:
            self.objective = _Objective(model, likelihood, config)
            # On the CPU the graph's wrapper (its allocations and kernel calls) is generated
            # as C++ rather than Python: the same kernels, so the same numbers, and 1.58
            # against 1.67 s per epoch for the bench's model (median of 8, alternated in one
            # process); Burda's batch-20 epoch 4.37 against 4.53 s.
            on_cpu = next(model.parameters()).device.type == "cpu"
            self.compiled = torch.compile(self._whole, fullgraph=True, dynamic=False,
                                          options={"cpp_wrapper": True} if on_cpu else None)
        self.scalars = None

    # -- the compiled path
    def _adam_state(self):
        """(names -> parameter, exp_avg, exp_avg_sq) as the optimizer keeps them, created the
        way torch.optim.Adam creates them on its first step if it has not taken one yet."""
        params, m, v = {}, {}, {}
        by_id = {id(p): p for group in self.optimizer.param_groups for p in group["params"]}
        for name, param in self.objective.named_parameters():
            if id(param) not in by_id:
                continue
            if isinstance(self.optimizer, BurdaAdam):
                state = self.optimizer.init_state(param)
            else:
                state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param,
                                                       memory_format=torch.preserve_format)
            params[name] = param.detach()  # shares storage: updates land in the model
            m[name], v[name] = state["exp_avg"], state["exp_avg_sq"]
        return params, m, v

    def _whole(self, params, m, v, scalars, x, eps, beta):
        from torch.func import functional_call, grad

        def loss(p):
            return functional_call(self.objective, p, (x, eps, beta))

        grads, stats = grad(loss, has_aux=True)(params)
        (beta1, beta2), adam_eps = self.config.adam_betas, self.config.adam_eps
        step_size, bias2_sqrt = scalars[0], scalars[1]
        if self.config.optimizer == "adam_burda":  # BurdaAdam.step's arithmetic
            scale = float(self.config.batch_size)
            for name, param in params.items():
                param.sub_(step_size * m[name] / (v[name].sqrt() + adam_eps))
                g = grads[name] * scale
                m[name].lerp_(g, 1 - beta1)
                v[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            return stats
        for name, param in params.items():
            g = grads[name]
            m[name].lerp_(g, 1 - beta1)
            v[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            param.sub_(step_size * m[name] / (v[name].sqrt() / bias2_sqrt + adam_eps))
        return stats

    def begin_epoch(self, lr: float, first_step: int, steps: int) -> None:
        """Adam's per-step scalars lr / (1 - beta1^t) and sqrt(1 - beta2^t) of the epoch's
        steps t = first_step + 1, ... (float64, then float32), for the compiled path;
        BurdaAdam's step size lr sqrt(1 - beta2^t) / (1 - beta1^t) in the first column."""
        if self.compiled is None:
            return
        beta1, beta2 = self.config.adam_betas
        t = torch.arange(first_step + 1, first_step + steps + 1, dtype=torch.float64)
        if self.config.optimizer == "adam_burda":  # step size folds in both corrections
            scalars = [lr * (1 - beta2**t).sqrt() / (1 - beta1**t), torch.ones_like(t)]
        else:
            scalars = [lr / (1 - beta1**t), (1 - beta2**t).sqrt()]
        self.scalars = torch.stack(scalars, 1).to(
            self.dtype).to(next(self.model.parameters()).device)
        self._state = self._adam_state()

    def end_epoch(self, global_step: int) -> None:
        """The optimizer's step counts, which the compiled path does not touch per step."""
        if self.compiled is None:
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                self.optimizer.state[param]["step"].fill_(global_step)

    def __call__(self, x, beta, generator, i: int = 0) -> torch.Tensor:
        if self.compiled is not None:
            k, z = self.config.iw_samples, self.config.latent_dim
            shape = (len(x), z) if k == 1 else (k, len(x), z)
            eps = torch.randn(shape, device=x.device, dtype=self.dtype, generator=generator)
            beta_t = torch.as_tensor(beta, dtype=self.dtype, device=x.device)
            try:
                return self.compiled(*self._state, self.scalars[i], x, eps, beta_t)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, once
                import warnings

                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training "
                              f"eagerly", RuntimeWarning, stacklevel=2)
                self.compiled = None
                return self._eager(x, beta, eps=eps)
        return self._eager(x, beta, generator=generator)

    def _eager(self, x, beta, generator=None, eps=None) -> torch.Tensor:
        terms = elbo_terms(self.model, self.likelihood, x, beta=beta,
                           free_bits=self.config.free_bits, iw_samples=self.config.iw_samples,
                           generator=generator, eps=eps)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        with torch.no_grad():  # statistics only: no autograd node per step
            return torch.stack([terms["loss"], terms["recon"], terms["kl"]])
