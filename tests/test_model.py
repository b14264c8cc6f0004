"""The encoder and decoder: any latent size for both architectures, and the authors'
Glorot initialization of Burda et al. 2016."""

from __future__ import annotations

import math

import pytest
import torch

from study.config import Config
from study.model import build_model
from study.train import Trainer

SHAPE = (1, 28, 28)


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_models_any_latent_dim(architecture):
    for z in (1, 3):
        config = Config(architecture=architecture, latent_dim=z, hidden=(16, 8))
        model = build_model(config, SHAPE)
        x = torch.rand(2, *SHAPE)
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (2, z)
        assert model.decode(model.sample(mu, logvar, k=3)).shape == (3, 2, *SHAPE)


def test_glorot_init_is_the_authors(tiny_config):
    """init = glorot: Glorot-uniform weights (the log-variance half of the head at twice the
    bound), zero biases, and the decoder's output bias at the logit of the mean training
    image, so the untrained decoder's mean image is the data's (clipped to [0.001, 0.999])."""
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
