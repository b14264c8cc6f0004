"""The figures logged with every trial: blitted onto a cached background for speed, they must
be pixel for pixel what a full redraw of the same figure gives, trial after trial."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from study import trial_figures


def full_redraw(blitted) -> np.ndarray:
    """The same figure drawn from scratch, as savefig would draw it."""
    blitted.canvas.draw()
    return np.asarray(blitted.canvas.buffer_rgba()).copy()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"))


def test_heatmap_is_what_a_full_redraw_draws(tmp_path):
    figures = trial_figures.TrialFigures()
    rng = np.random.default_rng(0)
    first = 10 ** rng.uniform(-3, 2.5, size=(16, 5))  # below and above the fixed colour range
    second = 10 ** rng.uniform(-3, 2.5, size=(16, 5))
    figures.heatmap(first, tmp_path / "a.png")
    figures.heatmap(second, tmp_path / "b.png")  # the same shape: the cached background
    blitted, _ = figures.heatmaps[(4.5, 3.0)]
    assert np.array_equal(pixels(tmp_path / "b.png"), full_redraw(blitted))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    # another latent_dim on the same figure (a search): new limits and ticks, then back
    for dims in (8, 16, 8):
        figures.heatmap(second[:dims], tmp_path / f"dims{dims}.png")
        assert figures.heatmaps[(4.5, 3.0)][0] is blitted  # the figure was reused
        assert blitted.fig.axes[0].get_ylim() == (dims - 0.5, -0.5)
        assert np.array_equal(pixels(tmp_path / f"dims{dims}.png"), full_redraw(blitted))
    assert np.array_equal(pixels(tmp_path / "dims16.png"), pixels(tmp_path / "b.png"))
    assert len(blitted.backgrounds) == 2  # 16 rows, 8 rows: each rendered once


def test_projection_is_what_a_full_redraw_draws(tmp_path):
    figures = trial_figures.TrialFigures()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 10
    for name, scale in (("a", 1.0), ("b", 4.0)):
        means = torch.randn(600, 8, generator=gen) * torch.linspace(scale, 0.1, 8)
        coords, explained = trial_figures.pca_coordinates(means)
        figures.scatter(coords.numpy(), labels.numpy(), explained, tmp_path / f"{name}.png")
    blitted, _, (xlabel, _) = figures.projections[tuple("0123456789")]
    assert xlabel.get_text() == f"PC 1 ({explained[0]:.0%} of the variance)"
    assert np.array_equal(pixels(tmp_path / "b.png"), full_redraw(blitted))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


@pytest.mark.parametrize("dims", [1, 3])
def test_pca_coordinates_are_in_sd_of_pc1_with_the_variance_explained(dims):
    gen = torch.Generator().manual_seed(1)
    sds = torch.tensor([3.0, 1.0, 0.5][:dims])
    means = 7 + torch.randn(20000, dims, generator=gen) * sds
    coords, explained = trial_figures.pca_coordinates(means)
    assert coords.shape == (20000, 2)
    assert coords[:, 0].std().item() == pytest.approx(1.0, rel=1e-4)
    assert coords.mean(0).abs().max().item() < 1e-4  # centred
    expected = (sds**2 / (sds**2).sum()).tolist() + [0.0]
    assert explained == pytest.approx(expected[:2], abs=0.01)
    if dims == 1:
        assert coords[:, 1].abs().max().item() == 0
    else:  # PC 2 keeps its scale relative to PC 1: sd 1/3
        assert coords[:, 1].std().item() == pytest.approx(1 / 3, rel=0.03)


class Identity:
    """A stand-in model and likelihood: the code is the image and so is its reconstruction."""

    def encode(self, x):
        return x, None

    def decode(self, z):
        return z

    def mean(self, out):
        return out


def test_reconstructions_name_their_rows(tmp_path):
    figures = trial_figures.TrialFigures()
    x = torch.zeros(16, 1, 28, 28)  # black images: only the labels draw dark pixels on white
    figures.reconstructions(Identity(), Identity(), x, tmp_path / "r.png")
    image = Image.open(tmp_path / "r.png")
    assert image.info[trial_figures.ROWS_KEY] == "original;reconstruction"
    grid_height = 2 * (28 + 2) + 2  # two rows of images, padding 2
    assert image.size == (trial_figures.LABEL_WIDTH_PX + 16 * 30 + 2, grid_height)
    strip = np.asarray(image.convert("L"))[:, :trial_figures.LABEL_WIDTH_PX]
    top, bottom = strip[: grid_height // 2], strip[grid_height // 2:]
    assert (top < 128).any() and (bottom < 128).any()  # a name beside each row
    # "reconstruction" is the longer word: more of its band is ink
    assert (bottom < 128).sum() > (top < 128).sum()


@pytest.mark.parametrize("dataset", ["fashion", "mnist"])
def test_latent_colour_bar_names_the_classes(tmp_path, dataset):
    figures = trial_figures.TrialFigures()
    means = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    figures.latent_pca(means, torch.arange(100) % 10, tmp_path / "p.png", dataset)
    names = trial_figures.class_names(dataset)
    blitted, _, _ = figures.projections[tuple(names)]
    colour_bar = blitted.fig.axes[1]
    assert [t.get_text() for t in colour_bar.get_yticklabels()] == names
    expected = ("T-shirt/top", "Ankle boot") if dataset == "fashion" else ("0", "9")
    assert (names[0], names[-1]) == expected
    # every name inside the figure, not cut at its right edge
    tight = blitted.fig.get_tightbbox(blitted.canvas.get_renderer())
    assert tight.x1 <= blitted.fig.get_figwidth() + 0.02
