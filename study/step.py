"""One training step (forward, backward, Adam), eager or compiled into one graph.

Eager: elbo_terms, backward, the optimizer's own step. With `config.compile` the whole step
is one torch.compile graph: the gradient by torch.func over every parameter, then
`optim.adam_update` in place on the model's parameters and on the optimizer's own exp_avg /
exp_avg_sq, so its state_dict stays the truth and a compiled run resumes eagerly (and the
other way round). At small batches a step is mostly per-op overhead, which one graph removes.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, grad

from study.config import Config
from study.likelihoods import Likelihood
from study.model import VAE
from study.objective import elbo_terms
from study.optim import BurdaAdam, adam_update


class TrainingLoss(torch.nn.Module):
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


class TrainingStep:
    """`step(x, beta, generator, i)` -> the step's (loss, recon, kl), detached; `begin_epoch`
    and `end_epoch` frame each epoch.

    The compiled path draws the noise here from the generator, in the order and shape the
    eager path draws it, and takes beta and Adam's per-step scalars as tensors, so nothing
    recompiles and a seed trains the same either way, up to float reassociation. Adam's bias
    corrections are computed per epoch outside the graph, in float64 as the fused kernel does.
    If compiling fails, the first step says so once and the run goes on eagerly with the same
    noise and state: slower, never different.
    """

    def __init__(self, model: VAE, likelihood: Likelihood, optimizer: torch.optim.Optimizer,
                 config: Config):
        self.model, self.likelihood, self.optimizer = model, likelihood, optimizer
        self.config = config
        self.dtype = next(model.parameters()).dtype
        self.compiled = None
        self.scalars = None
        if config.compile:
            self.loss = TrainingLoss(model, likelihood, config)
            # on the CPU the graph's wrapper is C++: the same kernels, less per-call overhead
            on_cpu = next(model.parameters()).device.type == "cpu"
            self.compiled = torch.compile(self._whole, fullgraph=True, dynamic=False,
                                          options={"cpp_wrapper": True} if on_cpu else None)

    def _adam_state(self):
        """(names -> parameter, exp_avg, exp_avg_sq) as the optimizer keeps them, created the
        way torch.optim.Adam creates them on its first step if it has not taken one yet."""
        params, m, v = {}, {}, {}
        by_id = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name, param in self.loss.named_parameters():
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
        def loss(p):
            return functional_call(self.loss, p, (x, eps, beta))

        grads, stats = grad(loss, has_aux=True)(params)
        burda = self.config.optimizer == "adam_burda"
        scale = float(self.config.batch_size) if burda else 1.0
        for name, param in params.items():
            adam_update(param, grads[name], m[name], v[name], scalars[0], scalars[1],
                        self.config.adam_betas, self.config.adam_eps, burda=burda,
                        grad_scale=scale)
        return stats

    def begin_epoch(self, lr: float, first_step: int, steps: int) -> None:
        """Adam's per-step scalars of the epoch's steps t = first_step + 1, ... for the
        compiled path: lr / (1 - beta1^t) and sqrt(1 - beta2^t) (float64, then float32), or
        BurdaAdam's step size lr sqrt(1 - beta2^t) / (1 - beta1^t) and 1."""
        if self.compiled is None:
            return
        beta1, beta2 = self.config.adam_betas
        t = torch.arange(first_step + 1, first_step + steps + 1, dtype=torch.float64)
        if self.config.optimizer == "adam_burda":  # the step size folds in both corrections
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
        if self.compiled is None:
            return self._eager(x, beta, generator=generator)
        k, z = self.config.iw_samples, self.config.latent_dim
        shape = (len(x), z) if k == 1 else (k, len(x), z)
        eps = torch.randn(shape, device=x.device, dtype=self.dtype, generator=generator)
        beta_t = torch.as_tensor(beta, dtype=self.dtype, device=x.device)
        try:
            return self.compiled(*self._state, self.scalars[i], x, eps, beta_t)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, once
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training "
                          f"eagerly", RuntimeWarning, stacklevel=2)
            self.compiled = None
            return self._eager(x, beta, eps=eps)

    def _eager(self, x, beta, generator=None, eps=None) -> torch.Tensor:
        terms = elbo_terms(self.model, self.likelihood, x, beta=beta,
                           free_bits=self.config.free_bits, iw_samples=self.config.iw_samples,
                           generator=generator, eps=eps)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        with torch.no_grad():  # statistics only: no autograd node per step
            return torch.stack([terms["loss"], terms["recon"], terms["kl"]])
