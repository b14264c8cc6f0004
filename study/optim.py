"""The optimizers: the learning rate of each epoch, torch's Adam (fused) or the authors' Adam
of Burda et al. 2016, and the one Adam update that BurdaAdam and the compiled step share."""

from __future__ import annotations

import math

import torch

from study.config import Config


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


def adam_update(param, grad, exp_avg, exp_avg_sq, step_size, bias2_sqrt, betas, eps,
                burda: bool = False, grad_scale: float = 1.0) -> None:
    """One Adam step of one parameter, in place on it and its two moments.

    torch.optim.Adam's arithmetic (Kingma & Ba 2015, Alg. 1, with torch's placement of eps):
    the moments take the gradient, then the parameter moves by
    step_size * m / (sqrt(v) / bias2_sqrt + eps), step_size = lr / (1 - beta1^t) and
    bias2_sqrt = sqrt(1 - beta2^t). With `burda`, yburda/iwae's: the parameter moves first,
    by the moments from before this step, step_size * m / (sqrt(v) + eps) with the bias
    corrections folded into step_size, and the moments see grad * grad_scale.
    """
    beta1, beta2 = betas
    if burda:  # Theano evaluates a step's updates from the old values
        param.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() + eps))
    g = grad * grad_scale if grad_scale != 1.0 else grad
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if not burda:
        param.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + eps))


def burda_step_size(lr: float, betas: tuple[float, float], t) -> float:
    """BurdaAdam's step size at step t (1-based): lr sqrt(1 - beta2^t) / (1 - beta1^t)."""
    beta1, beta2 = betas
    return lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)


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
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.init_state(param)
                alpha = burda_step_size(group["lr"], group["betas"], float(state["step"]) + 1)
                adam_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], alpha,
                            1.0, group["betas"], group["eps"], burda=True,
                            grad_scale=group["grad_scale"])
                state["step"] += 1


def make_adam(params, config: Config) -> torch.optim.Optimizer:
    """`config.optimizer`'s Adam: torch's with the fused kernel (one pass over all
    parameters), falling back to the default where unsupported; or the authors' (BurdaAdam,
    gradient scale = batch size)."""
    kwargs = dict(lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    if config.optimizer == "adam_burda":
        return BurdaAdam(params, grad_scale=float(config.batch_size), **kwargs)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, **kwargs)
