"""Training as a plain function on a real data subset: the loss falls, a seed reproduces its
run, a NaN stops it naming the epoch and step."""

from __future__ import annotations

import math

import pytest
from helpers import Recorder, same_but_time

from study.train import NonFiniteLoss, train


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
    assert same_but_time(a.history, b.history)
    assert a.test == b.test
    assert a.test["nelbo"] != c.test["nelbo"]
    assert {"recon", "kl", "nelbo", "iwae_nll", "active_units", "sse"} <= set(a.test)


def test_non_finite_loss_names_epoch_and_step(tiny_config):
    config = tiny_config.replace(lr=10.0, likelihood="gaussian_learned", epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch \d+ step \d+"):
        train(config, evaluate_at_end=False)
