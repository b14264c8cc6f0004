"""Encoders and decoders: q(z|x) as a diagonal Gaussian with one fused (mean, log-variance)
head, a decoder that returns distribution parameters (logits or means), never squashed values."""

from __future__ import annotations

import math

import torch
from torch import nn

from study.config import Config

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
}


def mlp(widths: list[int], activation: str) -> nn.Sequential:
    """Linear layers between consecutive widths, the activation after every one but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Encoder -> (mu, logvar) of q(z|x); decoder z -> per-pixel distribution parameters.

    Input shape (C, H, W) comes from the data. `forward` is not defined on purpose: the
    objective asks for `encode`, `sample` and `decode` separately.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, image_shape, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x), each (B, latent_dim)."""
        return self.encoder(x).chunk(2, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Distribution parameters for p(x|z), shaped (..., C, H, W)."""
        out = self.decoder(z.reshape(-1, z.shape[-1]))
        return out.reshape(*z.shape[:-1], *self.image_shape)

    @staticmethod
    def sample(mu, logvar, k: int | None = None, generator=None, eps=None) -> torch.Tensor:
        """Reparameterized z = mu + sigma * eps; with `k`, shape (k, B, latent_dim). `eps`, when
        given, is the standard normal noise itself (drawn by the caller, same shape)."""
        if eps is None:
            shape = mu.shape if k is None else (k, *mu.shape)
            eps = torch.randn(shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return mu + (0.5 * logvar).exp() * eps


def glorot_init(model: VAE, mean_image: torch.Tensor) -> None:
    """The initialization of Burda et al.'s code (yburda/iwae, `nnet.py`, `iwae.py`) for an
    mlp VAE: every weight uniform on +-sqrt(6 / (n_in + n_out)) (Glorot & Bengio 2010), every
    bias 0, and the decoder's output bias at the logit of `mean_image` (the mean training
    image, clipped to [0.001, 0.999]), so the untrained decoder already draws the mean image.

    Their encoder has separate mean and sigma = exp(linear) heads of width latent_dim; our
    fused head's two halves are drawn as two such layers, the log-variance half at twice the
    scale, because log sigma^2 = 2 log sigma.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules()):
        raise ValueError("glorot init needs an mlp VAE")
    head = model.encoder[-1][-1]
    out = model.decoder[-1]
    with torch.no_grad():
        for layer in linears:
            n_out, n_in = layer.weight.shape
            if layer is head:
                z = n_out // 2
                bound = math.sqrt(6.0 / (n_in + z))
                layer.weight[:z].uniform_(-bound, bound)
                layer.weight[z:].uniform_(-2 * bound, 2 * bound)
            else:
                bound = math.sqrt(6.0 / (n_in + n_out))
                layer.weight.uniform_(-bound, bound)
            layer.bias.zero_()
        out.bias.copy_(torch.logit(mean_image.reshape(-1).clamp(0.001, 0.999)))


def build_model(config: Config, image_shape) -> VAE:
    """The VAE named by `config.architecture`, sized from the data's image shape."""
    c, h, w = image_shape
    n_pixels = c * h * w
    z = config.latent_dim
    if config.architecture == "mlp":
        widths = list(config.hidden)
        encoder = nn.Sequential(nn.Flatten(), mlp([n_pixels, *widths, 2 * z], config.activation))
        decoder = mlp([z, *reversed(widths), n_pixels], config.activation)
        return VAE(encoder, decoder, image_shape, z)
    if config.architecture == "conv":
        if h % 4 or w % 4:
            raise ValueError(f"the conv model needs height and width divisible by 4, got {h}x{w}")
        act = ACTIVATIONS[config.activation]
        feat = 64 * (h // 4) * (w // 4)  # two stride-2 convolutions: H -> H/2 -> H/4
        encoder = nn.Sequential(
            nn.Conv2d(c, 32, 4, stride=2, padding=1), act(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), act(),
            nn.Flatten(), nn.Linear(feat, 256), act(), nn.Linear(256, 2 * z),
        )
        decoder = nn.Sequential(
            nn.Linear(z, 256), act(), nn.Linear(256, feat), act(),
            nn.Unflatten(1, (64, h // 4, w // 4)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), act(),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
        )
        return VAE(encoder, decoder, image_shape, z)
    raise ValueError(f"unknown architecture {config.architecture!r}; choose mlp or conv")
