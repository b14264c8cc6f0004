"""The optimizers: the learning-rate stages of Burda et al. 2016, BurdaAdam against the
authors' update written out step by step, and which Adam a config gets."""

from __future__ import annotations

import math

import pytest
import torch

from study.config import Config, burda_epochs
from study.optim import BurdaAdam, lr_at, make_adam


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


def test_burda_adam_is_the_authors_update():
    """BurdaAdam against yburda/iwae's `optimizers.py`, written out here step by step: second
    moments start at 1, step t moves by the moments before it with lr sqrt(1 - b2^t) /
    (1 - b1^t) and eps outside the root, and the moments see the gradient times grad_scale."""
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


@pytest.mark.parametrize("optimizer, kind, grad_scale", [("adam", torch.optim.Adam, None),
                                                        ("adam_burda", BurdaAdam, 20.0)])
def test_make_adam_gives_the_configs_adam(optimizer, kind, grad_scale):
    """torch's Adam, or BurdaAdam whose moments see the gradient times the batch size (the
    authors differentiate the bound summed over the batch); lr, betas and eps as configured."""
    config = Config(optimizer=optimizer, batch_size=20, lr=3e-3, adam_betas=(0.99, 0.999),
                    adam_eps=1e-4)
    opt = make_adam([torch.nn.Parameter(torch.zeros(3))], config)
    assert type(opt) is kind
    (group,) = opt.param_groups
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (3e-3, (0.99, 0.999), 1e-4)
    assert group.get("grad_scale") == grad_scale
