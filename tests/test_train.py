"""Training as a plain function on a real data subset: the loss falls, a seed reproduces its
run, a NaN stops it naming the epoch and step, and the callbacks are called as documented."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Recorder, same_but_time

from study.errors import UsageError
from study.train import NonFiniteLoss, resolve_device, train


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


@pytest.mark.parametrize("evaluate_at_end", [True, False])
def test_on_train_end_is_called_once_with_the_result(tiny_config, evaluate_at_end):
    """After the last epoch and the test evaluation: the callback sees the result train
    returns, with its test metrics already there when they are computed."""
    config = tiny_config.replace(epochs=2, train_subset=300, test_subset=100, test_iw_k=2)
    rec = Recorder()
    result = train(config, [rec], evaluate_at_end=evaluate_at_end)
    assert len(rec.ends) == 1
    seen, test_then = rec.ends[0]
    assert seen is result
    assert [e for e, _ in rec.epochs] == [1, 2] and len(result.history) == 2
    assert test_then == result.test
    if evaluate_at_end:
        assert {"nelbo", "iwae_nll", "sse"} <= set(test_then)
    else:
        assert test_then == {}


def test_on_train_end_is_not_called_when_training_fails(tiny_config):
    rec = Recorder()
    config = tiny_config.replace(lr=10.0, likelihood="gaussian_learned", epochs=3)
    with pytest.raises(NonFiniteLoss):
        train(config, [rec], evaluate_at_end=False)
    assert rec.ends == []


@pytest.mark.parametrize("cuda, mps, asked, expected", [
    (True, True, "auto", "cuda"), (False, True, "auto", "mps"), (False, False, "auto", "cpu"),
    (True, False, "cpu", "cpu"), (True, False, "cuda", "cuda"),
    (False, False, "cuda", "device cuda requested but no CUDA GPU is visible"),
    (False, False, "mps", "device mps requested but MPS is unavailable"),
])
def test_resolve_device(monkeypatch, cuda, mps, asked, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    if expected.startswith("device"):
        with pytest.raises(UsageError, match=expected):
            resolve_device(asked)
    else:
        assert resolve_device(asked) == expected
