"""The training step, eager or compiled into one graph: step by step from the same state the
compiled step has the eager step's losses and updates the weights, a learned likelihood
parameter and the optimizer's state as torch's Adam or BurdaAdam does; trained freely the
two stay within Adam's bound on the steps; a compile failure falls back to eager once."""

from __future__ import annotations

import math

import pytest
import torch

from study.objective import beta_at
from study.optim import BurdaAdam, lr_at
from study.train import Trainer

U = 2.0**-24  # float32's unit roundoff: one rounding moves a value by at most U times itself
TINY = torch.finfo(torch.float32).tiny  # smaller values the Trainer's flush-to-zero may zero
# The compiled graph sums a gradient in another order than autograd. Float32 reassociation moves
# it by about sqrt(n) U = 3e-5 (Higham & Mary 2019) for the n ~ 2e5-term sums here, up to ~1e-3
# where IWAE's importance weights amplify the rounding of log-weights of hundreds of nats. This
# norm-wise bound stays above that and well below what it must catch: another noise draw moves
# the gradients of the weights by 10-100%, another loss scale by a factor.
GRAD_RTOL = 1e-2


def _adam_update(config, t: int, lr: float, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """How step t of `config`'s Adam moves the weights, from moments m and v (float64):
    torch's Adam uses the moments after the step, BurdaAdam the ones before it."""
    (b1, b2), eps = config.adam_betas, config.adam_eps
    if config.optimizer == "adam_burda":
        return -lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
    return -lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)


def _adam_step_bound(config, t: int) -> float:
    """The most step t of `config`'s Adam can move one weight, in units of its learning rate.

    By Cauchy-Schwarz over the moments' geometric weights, |m| / sqrt(v) after n gradients is
    at most (1 - b1) / sqrt(1 - b2) sqrt(sum_{j<n} (b1^2 / b2)^j) (BurdaAdam's v, which starts
    at 1, only more), and the step multiplies that by sqrt(1 - b2^t) / (1 - b1^t); eps only
    shrinks it. Kingma & Ba (2015, Sec. 2.1) give 1 as an approximate bound when
    (1 - b1) <= sqrt(1 - b2); this one is exact, and exceeds 1 slightly for long runs.
    """
    b1, b2 = config.adam_betas
    n = t - 1 if config.optimizer == "adam_burda" else t  # Burda's step t uses t - 1 gradients
    ratio = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(sum((b1 * b1 / b2) ** j for j in range(n)))
    return math.sqrt(1 - b2**t) / (1 - b1**t) * ratio


def _parameters(trainer) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": p for k, p in trainer.model.named_parameters()},
            **{f"likelihood.{k}": p for k, p in trainer.likelihood.named_parameters()}}


class _Lockstep:
    """Takes every step of `eager`'s training loop on `compiled` too, from the same state.

    It stands in for eager's step function, so `eager.run_epoch()` drives both with its
    batches, betas, noise generator and learning rates. Before each step it copies eager's
    weights and Adam moments into `compiled`, so only one step of float reassociation
    separates the two results, and `_check` compares them against Adam's arithmetic at the
    step t and learning rate it counts itself. `run` restores eager's own step function.
    """

    def __init__(self, eager, compiled):
        self.eager, self.compiled, self.config = eager, compiled, eager.config
        self.own_step, eager.step_fn = eager.step_fn, self
        self.t, self.epoch = eager.global_step, eager.epoch  # steps and epochs done
        self.eager_params, self.compiled_params = _parameters(eager), _parameters(compiled)
        self.betas_seen = []

    def run(self, epochs: int) -> None:
        try:
            for _ in range(epochs):
                self.eager.run_epoch()
        finally:
            self.eager.step_fn = self.own_step

    def begin_epoch(self, lr, first_step, steps):
        self.own_step.begin_epoch(lr, first_step, steps)
        self.compiled.step_fn.begin_epoch(lr, first_step, steps)

    def end_epoch(self, global_step):
        self.own_step.end_epoch(global_step)
        self.compiled.step_fn.end_epoch(global_step)
        self.epoch += 1
        for name, p in self.compiled_params.items():  # the compiled path counts per epoch
            counts = (self.compiled.optimizer.state[p]["step"],
                      self.eager.optimizer.state[self.eager_params[name]]["step"])
            assert [float(c) for c in counts] == [self.t, self.t], name

    def _synchronize(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Copy eager's weights and moments into compiled; (weights, m, v) before the step,
        float64. Without state yet, eager's Adam starts from m = 0 and v = 0 (Burda's v = 1):
        the compiled step must start there too."""
        before = {}
        with torch.no_grad():
            for name, pe in self.eager_params.items():
                pc = self.compiled_params[name]
                pc.copy_(pe)
                ours, theirs = self.eager.optimizer.state.get(pe), self.compiled.optimizer.state[pc]
                if ours:
                    assert float(ours["step"]) == self.t - 1, name
                    theirs["exp_avg"].copy_(ours["exp_avg"])
                    theirs["exp_avg_sq"].copy_(ours["exp_avg_sq"])
                    m, v = ours["exp_avg"], ours["exp_avg_sq"]
                else:
                    assert self.t == 1, name
                    m = torch.zeros_like(pe)
                    v = torch.ones_like(pe) if self.config.optimizer == "adam_burda" else m
                assert torch.equal(theirs["exp_avg"], m), name
                assert torch.equal(theirs["exp_avg_sq"], v), name
                before[name] = (pe.double(), m.double(), v.double())
        return before

    def __call__(self, x, beta, generator, i):
        self.t += 1
        before = self._synchronize()
        noise = generator.get_state()
        compiled_stats = self.compiled.step_fn(x, beta, generator, i)
        after_compiled = generator.get_state()
        generator.set_state(noise)
        eager_stats = self.own_step(x, beta, generator, i)
        assert torch.equal(generator.get_state(), after_compiled)  # the same draws
        self.betas_seen.append(beta)
        self._check(len(x), before, compiled_stats, eager_stats)
        return eager_stats

    def _check(self, batch, before, compiled_stats, eager_stats):
        config, t = self.config, self.t
        (b1, b2), eps = config.adam_betas, config.adam_eps
        lr = lr_at(config, self.epoch)
        scale = float(config.batch_size) if config.optimizer == "adam_burda" else 1.0
        # The step's (loss, recon, kl), a forward pass summed in another order: its sums hold
        # n = pixels x samples x images terms; ten times the sqrt(n) U they drift by.
        n = math.prod(self.eager.splits.train.shape) * config.iw_samples * batch
        torch.testing.assert_close(compiled_stats, eager_stats, rtol=10 * math.sqrt(n) * U,
                                   atol=0)
        if config.iw_samples == 1:  # the loss holds this step's beta of the schedule
            loss, recon, kl = compiled_stats.double().tolist()
            beta_t = beta_at(config, t - 1, self.eager.steps_per_epoch)
            # kl is summed over images and dims in another order inside the loss
            slack = 2 * U * abs(loss) + 3 * (batch + config.latent_dim) * U * beta_t * kl
            assert abs(loss - recon - beta_t * kl) <= slack, (t, loss, recon, kl, beta_t)
        for name, (theta, m0, v0) in before.items():
            pe, pc = self.eager_params[name], self.compiled_params[name]
            state_c = self.compiled.optimizer.state[pc]
            state_e = self.eager.optimizer.state[pe]
            m, v = state_c["exp_avg"].double(), state_c["exp_avg_sq"].double()
            # The gradient the compiled step fed its moments, read back from m = b1 m0 +
            # (1 - b1) g: m's few roundings, divided by (1 - b1), bound the reading's error.
            g = (m - b1 * m0) / (1 - b1)
            dg = 8 * U * (g.abs() + m0.abs()) + (2 * U * m.abs() + TINY) / (1 - b1)
            v_ref = b2 * v0 + (1 - b2) * g * g  # the same gradient in the second moment
            dv = 8 * U * v_ref + (1 - b2) * (2 * g.abs() + dg) * dg + TINY
            assert ((v - v_ref).abs() <= dv).all(), (name, t)
            g_eager = pe.grad.double() * scale  # autograd's, as the optimizer scales it
            assert (g - g_eager).norm() <= GRAD_RTOL * g_eager.norm() + dg.norm(), (name, t)
            # Each step is Adam's step t at the epoch's learning rate, to the roundings of its
            # arithmetic (eight: the scalars, sqrt, two divisions, eps, the product; twice that
            # for a compiler's rearranging) and the weight's own (half an ulp; one allowed).
            for p, state in ((pc, state_c), (pe, state_e)):
                moments = (m0, v0) if config.optimizer == "adam_burda" else (
                    state["exp_avg"].double(), state["exp_avg_sq"].double())
                ref = _adam_update(config, t, lr, *moments)
                after = p.detach().double()
                slack = 16 * U * ref.abs() + 2 * U * after.abs() + TINY * (1 + lr / (1 - b1**t) / eps)
                assert ((after - theta - ref).abs() <= slack).all(), (name, t, p is pc)


def _drift_bound(config, start: dict, epochs: int, steps_per_epoch: int) -> dict:
    """How far two runs of `epochs` epochs of Adam from the weights `start` may end apart:
    in each, step t moves each weight by at most lr_t _adam_step_bound(t) (its arithmetic
    rounded a few times) plus the rounding of the weight itself."""
    steps = epochs * steps_per_epoch
    most = sum(lr_at(config, (t - 1) // steps_per_epoch) * _adam_step_bound(config, t)
               for t in range(1, steps + 1))
    return {name: 2 * most * (1 + 16 * U) + 2 * steps * U * (value.abs() + most)
            for name, value in start.items()}


def test_compiled_step_trains_like_the_eager_one(tiny_config):
    """torch.compile draws the same noise as eager (outside the graph) and takes beta as a
    tensor: from the same weights, every step of a warm-up schedule has the losses of the eager
    step, with that step's beta in the loss, and updates the weights as Adam does."""
    config = tiny_config.replace(epochs=1, train_subset=600, beta_schedule="linear", warmup=6,
                                 likelihood="gaussian_learned")
    eager, compiled = Trainer(config), Trainer(config.replace(compile=True))
    assert compiled.step_fn.compiled is not None
    lockstep = _Lockstep(eager, compiled)
    lockstep.run(epochs=1)
    assert len(set(lockstep.betas_seen)) == eager.steps_per_epoch  # every step's beta differed
    assert compiled.step_fn.compiled is not None  # no fallback happened


def _lockstep_then_free(config, eager, compiled, parts) -> dict:
    """Two epochs in lockstep from the same state, then two trained freely from it again: the
    `parts` of the two states within Adam's bound on the steps, the step counts exact. The
    compiled trainer's state."""
    start = eager.state_dict()
    _Lockstep(eager, compiled).run(epochs=2)
    for trainer in (eager, compiled):
        trainer.load_state_dict(start)
        for _ in range(2):
            trainer.run_epoch()
    assert compiled.step_fn.compiled is not None  # no fallback happened
    a, b = eager.state_dict(), compiled.state_dict()
    for part in parts:
        bound = _drift_bound(config, start[part], 2, eager.steps_per_epoch)
        for name, value in a[part].items():
            assert ((b[part][name] - value).abs() <= bound[name]).all(), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(),
                                b["optimizer"]["state"].values(), strict=True):
        assert float(state_b["step"]) == float(state_a["step"]) == 2 * eager.steps_per_epoch
    return b


def test_the_compiled_whole_step_is_torch_adam(tiny_config):
    """The compiled step (torch.func gradient and Adam written out, one graph) updates the
    weights, a learned likelihood parameter and the optimizer's own state as eager autograd
    and torch.optim.Adam do, also for the IWAE bound: step by step from the same state, at
    every step of two epochs (bias corrections, a learning-rate stage change); trained freely,
    the two runs stay within Adam's bound on the steps, with exact step counts; and a compiled
    run's state resumes eagerly, going on at the step it reached."""
    config = tiny_config.replace(epochs=3, train_subset=400, likelihood="gaussian_learned",
                                 iw_samples=3, adam_betas=(0.99, 0.999), adam_eps=1e-4,
                                 lr_schedule="burda")
    eager, compiled = Trainer(config), Trainer(config.replace(compile=True))
    b = _lockstep_then_free(config, eager, compiled, parts=("model", "likelihood"))
    assert set(b["likelihood"]) == {"log_sigma"}
    steps = 2 * eager.steps_per_epoch

    resumed = Trainer(config)
    resumed.load_state_dict(b)  # a compiled run's state goes on eagerly, from step `steps`
    _Lockstep(resumed, compiled).run(epochs=1)
    assert resumed.global_step == steps + eager.steps_per_epoch


def test_a_compile_failure_falls_back_to_eager_once(tiny_config, monkeypatch):
    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    config = tiny_config.replace(epochs=1, train_subset=300)
    eager = Trainer(config)
    fallback = Trainer(config.replace(compile=True))
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C compiler.*eagerly"):
        m_fallback, steps_fallback, _ = fallback.run_epoch()
    assert fallback.step_fn.compiled is None
    m_eager, steps_eager, _ = eager.run_epoch()
    assert torch.allclose(steps_eager, steps_fallback)  # the same noise, the same steps


def test_the_compiled_whole_step_is_burda_adam(tiny_config):
    """With optimizer = adam_burda the compiled step applies BurdaAdam's update, in place on
    its state: step by step from the same state, the weights and moments BurdaAdam leaves at
    every step of two epochs; trained freely, within Adam's bound on the steps."""
    config = tiny_config.replace(epochs=2, train_subset=400, batch_size=20, iw_samples=2,
                                 adam_betas=(0.99, 0.999), adam_eps=1e-4, lr_schedule="burda",
                                 optimizer="adam_burda", init="glorot")
    eager, compiled = Trainer(config), Trainer(config.replace(compile=True))
    assert isinstance(eager.optimizer, BurdaAdam)
    _lockstep_then_free(config, eager, compiled, parts=("model",))
