"""The engine against known values: KL, likelihoods, schedules, free bits, the IWAE bound,
active units; and real training on a data subset (loss falls, seeds reproduce, NaN stops)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from study.config import Config, burda_epochs
from study.likelihoods import (
    ContinuousBernoulli,
    Gaussian,
    bernoulli_entropy_floor,
    make_likelihood,
)
from study.model import build_model
from study.objective import (
    active_units,
    beta_at,
    elbo_terms,
    free_bits_kl,
    gaussian_kl,
    importance_weighted_bound,
)
from study.train import Callback, NonFiniteLoss, lr_at, train

SHAPE = (1, 28, 28)
D_PIX = 784


def _batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *SHAPE, generator=g)
    params = torch.randn(b, *SHAPE, generator=g)
    return x, params


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    q = D.Normal(mu, (0.5 * logvar).exp())
    p = D.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), D.kl_divergence(q, p))
    # a known value: mu = 1, sigma = 1 -> 1/2 nat
    assert float(gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]))) == pytest.approx(0.5)


def test_bernoulli_is_summed_bce():
    x, logits = _batch()
    lik = make_likelihood(Config(likelihood="bernoulli"))
    expected = -torch.stack(
        [F.binary_cross_entropy_with_logits(logits[i], x[i], reduction="sum") for i in range(6)]
    )
    torch.testing.assert_close(lik.log_prob(x, logits), expected)
    binary = (x > 0.5).float()
    torch.testing.assert_close(
        lik.log_prob(binary, logits), D.Bernoulli(logits=logits).log_prob(binary).flatten(1).sum(1)
    )


def test_gaussian_half_variance_is_sse_plus_constant():
    x, mu = _batch()
    lik = make_likelihood(Config(likelihood="gaussian"))  # default sigma^2 = 1/2
    sse = (x - mu).square().flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, mu), -sse - D_PIX / 2 * math.log(math.pi))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_gaussian_closed_form(sigma):
    x, mu = _batch(2)
    sse = (x - mu).square().flatten(1).sum(1)
    expected = -sse / (2 * sigma**2) - D_PIX * math.log(sigma) - D_PIX / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(Gaussian(sigma).log_prob(x, mu), expected)


def test_gaussian_learned_uses_its_sigma():
    x, mu = _batch(3)
    lik = make_likelihood(Config(likelihood="gaussian_learned", init_log_sigma=math.log(0.3)))
    torch.testing.assert_close(lik.log_prob(x, mu), Gaussian(0.3).log_prob(x, mu))
    assert lik.logged()["sigma"] == pytest.approx(0.3)
    assert sum(p.numel() for p in lik.parameters()) == 1


def test_laplace_closed_form():
    x, mu = _batch(4)
    lik = make_likelihood(Config(likelihood="laplace", laplace_scale=0.25))
    l1 = (x - mu).abs().flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, mu), -l1 / 0.25 - D_PIX * math.log(0.5))


def _cb_log_normalizer(lam):
    """log C(lam) = log(2 artanh(1 - 2 lam) / (1 - 2 lam)), Loaiza-Ganem & Cunningham 2019."""
    return math.log(2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam))


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.45, 0.7, 0.99])
def test_continuous_bernoulli_closed_form(lam):
    x = torch.tensor([[0.0, 0.2, 0.5, 1.0]])
    logits = torch.full_like(x, math.log(lam / (1 - lam)))
    expected = sum(
        xi * math.log(lam) + (1 - xi) * math.log(1 - lam) + _cb_log_normalizer(lam)
        for xi in x[0].tolist()
    )
    got = ContinuousBernoulli().log_prob(x, logits)
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_continuous_bernoulli_normalizer_near_half():
    x = torch.zeros(1, 1)
    at_half = ContinuousBernoulli().log_prob(x, torch.zeros(1, 1))  # lam = 1/2: log p(0) = log(1/2) + log 2
    assert float(at_half) == pytest.approx(0.0, abs=1e-5)
    for eps in (1e-7, 1e-4, 1e-3):
        logits = torch.tensor([[math.log((0.5 + eps) / (0.5 - eps))]])
        value = float(ContinuousBernoulli().log_prob(x, logits))
        assert math.isfinite(value)
        expected = math.log(0.5 - eps) + _cb_log_normalizer(0.5 + eps) if eps >= 1e-4 else 0.0
        assert value == pytest.approx(expected, abs=1e-3)
    # its mean is the distribution's mean, not lambda: for lam = 0.8 it is below 0.8
    lam = 0.8
    mean = float(ContinuousBernoulli().mean(torch.tensor([math.log(lam / (1 - lam))])))
    closed = lam / (2 * lam - 1) + 1 / (2 * math.atanh(1 - 2 * lam))
    assert mean == pytest.approx(closed, rel=1e-5) and mean < lam


def test_bernoulli_entropy_floor_is_bce_minimum():
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    floor = float(bernoulli_entropy_floor(x))
    expected = 2 * 0 + (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) + math.log(2)
    assert floor == pytest.approx(expected, rel=1e-5)
    logits = torch.logit(x.clamp(1e-6, 1 - 1e-6))
    bce = -float(make_likelihood(Config()).log_prob(x, logits))
    assert bce == pytest.approx(floor, abs=1e-4)


def test_unknown_likelihood_is_named():
    with pytest.raises(ValueError, match="unknown likelihood 'mse'"):
        make_likelihood(Config(likelihood="mse"))
    assert "likelihood = 'mse' is not one of" in Config(likelihood="mse").validate()[0]


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


def test_burda_lr_schedule():
    config = Config(lr=1e-3, lr_schedule="burda")
    assert burda_epochs(8) == 3280
    assert lr_at(config, 0) == pytest.approx(1e-3)
    # the authors' code rounds 10^(1 - i/7) to one decimal: 7.2, 5.2, ..., 1.0 (x 1e-4)
    assert lr_at(config, 1) == pytest.approx(7.2e-4)
    assert lr_at(config, 3) == pytest.approx(7.2e-4)
    assert lr_at(config, 4) == pytest.approx(5.2e-4)
    assert lr_at(config, 13) == pytest.approx(3.7e-4)
    assert lr_at(config, 3279) == pytest.approx(1e-4)
    assert lr_at(config, 3279) == pytest.approx(1e-3 * 10 ** (-7 / 7))


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


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_models_any_latent_dim(architecture):
    for z in (1, 3):
        config = Config(architecture=architecture, latent_dim=z, hidden=(16, 8))
        model = build_model(config, SHAPE)
        x = torch.rand(2, *SHAPE)
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (2, z)
        assert model.decode(model.sample(mu, logvar, k=3)).shape == (3, 2, *SHAPE)


class Recorder(Callback):
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_training_reduces_nelbo(tiny_config, likelihood):
    config = tiny_config.replace(likelihood=likelihood, epochs=3, test_iw_k=5)
    rec = Recorder()
    result = train(config, [rec], evaluate_at_end=False)
    nelbo = [m["val/nelbo"] for _, m in rec.epochs]
    assert [e for e, _ in rec.epochs] == [1, 2, 3]
    assert nelbo[-1] < nelbo[0]
    assert rec.steps and rec.steps[0][0] == config.step_log_every
    assert all(math.isfinite(m["train/kl"]) for _, m in rec.steps)
    final = result.final
    assert final["train/nelbo"] == pytest.approx(final["train/recon"] + final["train/kl"])
    kl_dims = [v for k, v in final.items() if k.startswith("val/kl_dim_")]
    assert len(kl_dims) == config.latent_dim
    assert sum(kl_dims) == pytest.approx(final["val/kl"], rel=1e-4)


def test_same_seed_same_metrics(tiny_config):
    config = tiny_config.replace(epochs=1, train_subset=1000, test_iw_k=10, test_subset=100)
    a = train(config)
    b = train(config)
    c = train(config.replace(seed=1))
    assert _same_but_time(a.history, b.history)
    assert a.test == b.test
    assert a.test["nelbo"] != c.test["nelbo"]
    assert {"recon", "kl", "nelbo", "iwae_nll", "active_units", "sse"} <= set(a.test)


def _same_but_time(h1, h2):
    strip = [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h1]
    return strip == [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h2]


def test_non_finite_loss_names_epoch_and_step(tiny_config):
    config = tiny_config.replace(lr=10.0, likelihood="gaussian_learned", epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch \d+ step \d+"):
        train(config, evaluate_at_end=False)


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
    from study.train import Trainer

    config = tiny_config.replace(epochs=1, train_subset=600, beta_schedule="linear", warmup=6,
                                 likelihood="gaussian_learned")
    eager, compiled = Trainer(config), Trainer(config.replace(compile=True))
    assert compiled.step_fn.compiled is not None
    lockstep = _Lockstep(eager, compiled)
    lockstep.run(epochs=1)
    assert len(set(lockstep.betas_seen)) == eager.steps_per_epoch  # every step's beta differed
    assert compiled.step_fn.compiled is not None  # no fallback happened


def test_the_compiled_whole_step_is_torch_adam(tiny_config):
    """The compiled step (torch.func gradient and Adam written out, one graph) updates the
    weights, a learned likelihood parameter and the optimizer's own state as eager autograd
    and torch.optim.Adam do, also for the IWAE bound: step by step from the same state, at
    every step of two epochs (bias corrections, a learning-rate stage change); trained freely,
    the two runs stay within Adam's bound on the steps, with exact step counts; and a compiled
    run's state resumes eagerly, going on at the step it reached."""
    from study.train import Trainer

    config = tiny_config.replace(epochs=3, train_subset=400, likelihood="gaussian_learned",
                                 iw_samples=3, adam_betas=(0.99, 0.999), adam_eps=1e-4,
                                 lr_schedule="burda")
    eager, compiled = Trainer(config), Trainer(config.replace(compile=True))
    start = eager.state_dict()
    _Lockstep(eager, compiled).run(epochs=2)

    for trainer in (eager, compiled):
        trainer.load_state_dict(start)
        for _ in range(2):
            trainer.run_epoch()
    assert compiled.step_fn.compiled is not None  # no fallback happened
    a, b = eager.state_dict(), compiled.state_dict()
    assert set(b["likelihood"]) == {"log_sigma"}
    steps = 2 * eager.steps_per_epoch
    for part in ("model", "likelihood"):
        bound = _drift_bound(config, start[part], 2, eager.steps_per_epoch)
        for name, value in a[part].items():
            assert ((b[part][name] - value).abs() <= bound[name]).all(), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(),
                                b["optimizer"]["state"].values(), strict=True):
        assert float(state_b["step"]) == float(state_a["step"]) == steps

    resumed = Trainer(config)
    resumed.load_state_dict(b)  # a compiled run's state goes on eagerly, from step `steps`
    _Lockstep(resumed, compiled).run(epochs=1)
    assert resumed.global_step == steps + eager.steps_per_epoch


def test_a_compile_failure_falls_back_to_eager_once(tiny_config, monkeypatch):
    from study.train import Trainer

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


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tiny_config, tmp_path):
    """Stop at an epoch end, save, load with weights_only (what a checkpoint file allows),
    resume: the weights, Adam's moments, history and test metrics are those of a run that was
    never stopped (dynamic binarization and a learning-rate stage change cross the stop)."""
    from study.train import Checkpointing, TrainingStopped, resume_problem

    config = tiny_config.replace(epochs=5, train_subset=600, binarize="dynamic",
                                 lr_schedule="burda", test_iw_k=5, checkpoint_minutes=60)
    straight = train(config)

    saved = []
    stop_after_epoch = 2
    checkpointing = Checkpointing(save=saved.append,
                                  stop=lambda: len(rec.epochs) == stop_after_epoch)
    rec = Recorder()
    with pytest.raises(TrainingStopped, match="stopped at the end of epoch 2 of 5") as stopped:
        train(config, [rec], checkpointing=checkpointing)
    assert stopped.value.epoch == 2 and len(saved) == 1  # 60 minutes never passed: one save
    path = tmp_path / "state.pt"
    torch.save(saved[0], path)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert resume_problem(config, state) is None
    assert "latent_dim 20 -> 8" in resume_problem(config.replace(latent_dim=8), state)
    assert resume_problem(config.replace(threads=1, checkpoint_minutes=0), state) is None

    rec = Recorder()
    resumed = train(config, [rec], resume=state)
    assert [e for e, _ in rec.epochs] == [3, 4, 5]  # only the epochs not yet run
    assert _same_but_time(resumed.history, straight.history)
    assert resumed.test == straight.test
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.seconds >= state["seconds"]


def test_checkpoints_follow_the_cadence(tiny_config):
    """checkpoint_minutes = 0 saves at every epoch end but the last; a finished run is never
    saved (it needs no resuming)."""
    from study.train import Checkpointing

    saved = []
    config = tiny_config.replace(epochs=3, train_subset=300, checkpoint_minutes=0, test_iw_k=2)
    train(config, checkpointing=Checkpointing(save=saved.append), evaluate_at_end=False)
    assert [s["epoch"] for s in saved] == [1, 2]
    assert [len(s["history"]) for s in saved] == [1, 2]
    assert "checkpoint_minutes must be >= 0" in " ".join(
        config.replace(checkpoint_minutes=-1).validate())


def test_burda_adam_is_the_authors_update():
    """BurdaAdam against yburda/iwae's `optimizers.py`, written out here step by step: second
    moments start at 1, step t moves by the moments before it with lr sqrt(1 - b2^t) /
    (1 - b1^t) and eps outside the root, and the moments see the gradient times grad_scale."""
    from study.train import BurdaAdam

    lr, (b1, b2), eps, scale = 1e-2, (0.99, 0.999), 1e-4, 20.0
    grads = [torch.tensor([0.5, -2.0, 0.0]), torch.tensor([0.1, 1.0, -3.0]),
             torch.tensor([-0.4, 0.2, 0.7])]
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = BurdaAdam([p], lr=lr, betas=(b1, b2), eps=eps, grad_scale=scale)
    theta, m, v = [1.0, -1.0, 0.5], [0.0] * 3, [1.0] * 3
    for t, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        theta = [th - alpha * mi / (math.sqrt(vi) + eps) for th, mi, vi in zip(theta, m, v, strict=True)]
        m = [b1 * mi + (1 - b1) * scale * gi for mi, gi in zip(m, g.tolist(), strict=True)]
        v = [b2 * vi + (1 - b2) * (scale * gi) ** 2 for vi, gi in zip(v, g.tolist(), strict=True)]
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        if t == 1:
            assert torch.equal(p.detach(), before)  # the first step moves nothing
        torch.testing.assert_close(p.detach(), torch.tensor(theta), rtol=1e-6, atol=1e-7)
    state = opt.state[p]
    torch.testing.assert_close(state["exp_avg"], torch.tensor(m))
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor(v))
    assert float(state["step"]) == 3


def test_the_compiled_whole_step_is_burda_adam(tiny_config):
    """With optimizer = adam_burda the compiled step applies BurdaAdam's update, in place on
    its state: step by step from the same state, the weights and moments BurdaAdam leaves at
    every step of two epochs; trained freely, within Adam's bound on the steps."""
    from study.train import BurdaAdam, Trainer

    config = tiny_config.replace(epochs=2, train_subset=400, batch_size=20, iw_samples=2,
                                 adam_betas=(0.99, 0.999), adam_eps=1e-4, lr_schedule="burda",
                                 optimizer="adam_burda", init="glorot")
    eager, compiled = Trainer(config), Trainer(config.replace(compile=True))
    assert isinstance(eager.optimizer, BurdaAdam)
    start = eager.state_dict()
    _Lockstep(eager, compiled).run(epochs=2)

    for trainer in (eager, compiled):
        trainer.load_state_dict(start)
        for _ in range(2):
            trainer.run_epoch()
    assert compiled.step_fn.compiled is not None
    a, b = eager.state_dict(), compiled.state_dict()
    steps = 2 * eager.steps_per_epoch
    bound = _drift_bound(config, start["model"], 2, eager.steps_per_epoch)
    for name, value in a["model"].items():
        assert ((b["model"][name] - value).abs() <= bound[name]).all(), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(),
                                b["optimizer"]["state"].values(), strict=True):
        assert float(state_b["step"]) == float(state_a["step"]) == steps


def test_glorot_init_is_the_authors(tiny_config):
    """init = glorot: Glorot-uniform weights (the log-variance half of the head at twice the
    bound), zero biases, and the decoder's output bias at the logit of the mean training
    image, so the untrained decoder's mean image is the data's (clipped to [0.001, 0.999])."""
    from study.train import Trainer

    config = tiny_config.replace(hidden=(200, 200), latent_dim=50, activation="tanh",
                                 init="glorot")
    trainer = Trainer(config)
    model, z = trainer.model, 50
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6
    head, out = model.encoder[-1][-1], model.decoder[-1]
    for layer in linears:
        n_out, n_in = layer.weight.shape
        if layer is head:
            bound = math.sqrt(6 / (n_in + z))
            halves = [(layer.weight[:z], bound), (layer.weight[z:], 2 * bound)]
        else:
            halves = [(layer.weight, math.sqrt(6 / (n_in + n_out)))]
        for w, b in halves:
            assert w.abs().max() <= b and w.abs().max() > 0.9 * b  # fills +-b, no wider
            assert w.std().item() == pytest.approx(b / math.sqrt(3), rel=0.05)  # uniform
        if layer is not out:
            assert not layer.bias.any()
    mean = trainer.splits.train.grey().mean(0).reshape(-1).clamp(0.001, 0.999)
    torch.testing.assert_close(torch.sigmoid(out.bias.detach()), mean, rtol=1e-4, atol=1e-6)
    assert Trainer(tiny_config).model.decoder[-1].bias.abs().max() < 0.1  # torch's default
    for other in (dict(architecture="conv"), dict(likelihood="gaussian")):
        assert any("init = 'glorot' needs architecture = 'mlp' and likelihood = 'bernoulli'" in p
                   for p in config.replace(**other).validate())


def test_a_state_saved_before_a_field_existed_resumes_with_its_default(tiny_config):
    """A resumable state whose config predates `optimizer` and `init` was made with their
    defaults: it resumes a run with the defaults and is refused by one with other values."""
    import dataclasses

    from study.train import resume_problem

    config = tiny_config.replace(epochs=3)
    old = dataclasses.asdict(config)
    del old["optimizer"], old["init"]
    state = {"format": 1, "config": old, "epoch": 1}
    assert resume_problem(config, state) is None
    problem = resume_problem(config.replace(optimizer="adam_burda"), state)
    assert problem and "optimizer 'adam' -> 'adam_burda'" in problem


def _denormals_kept_per_chunk(n_chunks: int) -> list[bool]:
    """Whether each of `n_chunks` equal slices of a parallel multiply by 1 still holds the
    denormal 2^-129 it started from (False: flushed to zero by the thread that computed it)."""
    # 2^-129 by its bit pattern: a float literal would be flushed on its way in
    x = torch.full((4_000_000,), 1 << 20, dtype=torch.int32).view(torch.float32)
    y = x * 1.0  # large enough that every intra-op thread computes a slice
    return [bool((part != 0).any()) for part in y.chunk(n_chunks)]


def _flushed_threads_expected(threads: int) -> int:
    """How many threads flush_denormals documents it sets with `threads` intra-op threads
    here: none on a CPU without the mode; all of them where torch's OpenMP runtime is a
    libgomp (what CI runs: Linux wheels ship one); else the calling thread alone."""
    if not torch.set_flush_denormal(False):
        return 0
    try:
        libgomp = "libgomp" in Path("/proc/self/maps").read_text()  # the libraries loaded
    except OSError:  # no /proc: not Linux, not libgomp
        libgomp = False
    openmp = "OpenMP" in torch.__config__.parallel_info()
    return threads if openmp and libgomp else 1


def test_a_trainer_flushes_denormals_on_every_thread(tiny_config):
    """torch.set_flush_denormal reaches only the calling thread; the Trainer must reach the
    OpenMP threads too (the slow path was measured at 5x on the compiled Adam kernel). Where
    torch's threads are not libgomp's it flushes the calling thread alone, and says so."""
    from study.denormals import flush_denormals
    from study.train import Trainer

    threads = torch.get_num_threads()
    n = max(2, threads)  # at least two, so that one thread's mode cannot pass for all
    torch.set_num_threads(n)
    expected = _flushed_threads_expected(n)
    fallback = expected == 1 and "OpenMP" in torch.__config__.parallel_info()

    def warned():
        return pytest.warns(RuntimeWarning, match="no libgomp found") if fallback \
            else nullcontext()

    try:
        with warned():
            assert flush_denormals(on=False) == expected  # each of them cleared
        assert all(_denormals_kept_per_chunk(n))
        if expected == 0:  # no such mode: the Trainer flushes nothing
            Trainer(tiny_config.replace(device="cpu"))
            assert all(_denormals_kept_per_chunk(n))
            return
        torch.set_flush_denormal(True)  # the main thread alone: the others keep their slices
        assert _denormals_kept_per_chunk(n) != [False] * n
        with warned():
            Trainer(tiny_config.replace(device="cpu"))
        kept = _denormals_kept_per_chunk(n)
        assert kept == [False] * n if expected == n else kept != [False] * n
    finally:
        torch.set_num_threads(threads)
        flush_denormals()
