"""The figures of one trial, logged as artifacts of its run: test reconstructions, prior
samples, the validation KL per latent dimension over epochs, and the test posterior means
projected on their first two principal components.

Drawn within the trial's tracking time, so the matplotlib figures are built once per worker
process and only refilled afterwards (`TrialFigures`, owned by the worker).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torchvision.datasets import FashionMNIST
from torchvision.utils import make_grid

KL_COLOUR_RANGE = (0.01, 100.0)
"""Nats per image of the trial heatmap's fixed log colour scale. It is the same in every
trial, so heatmaps compare by eye across runs; its floor is a tenth of the reports' collapse
threshold (0.1 nats), as in the KL dynamics report, and values beyond it take the end colours
(the colour bar's triangles)."""
RECON_ROWS = ("original", "reconstruction")
"""The reconstruction grid's rows, top to bottom, written left of them."""
LABEL_WIDTH_PX = 110
ROWS_KEY = "rows"
"""PNG text key naming an image's rows: the reports (analysis.figures.ROWS_KEY, which may
not import this torch module) then do not name them a second time."""
PCA_EXTENT = 5.0
"""The projection's axes span +-PCA_EXTENT standard deviations of PC 1; points beyond are
drawn on the border."""


def write_png(pixels, path: Path, rows=()) -> None:
    """An (H, W, 3 or 4) uint8 array as PNG at zlib level 1: faster than PIL's default level
    6 and no larger for flat-coloured figures. `rows`: the row names the image shows, noted
    in its PNG text so that the reports do not write them a second time."""
    info = PngInfo()
    if rows:
        info.add_text(ROWS_KEY, ";".join(rows))
    Image.fromarray(np.asarray(pixels)).save(path, format="png", compress_level=1, pnginfo=info)


def grid_pixels(batch: torch.Tensor, nrow: int) -> np.ndarray:
    """Images in [0, 1] as one (H, W, 3) uint8 grid, as torchvision's save_image lays it out."""
    grid = make_grid(batch.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def save_grid(batch: torch.Tensor, nrow: int, path: Path) -> None:
    """Images in [0, 1] as one PNG grid, written at zlib level 1."""
    write_png(grid_pixels(batch, nrow), path)


def row_labels(names, height: int) -> np.ndarray:
    """(height, LABEL_WIDTH_PX, 3) uint8: `names` right-aligned, each centred on its equal
    band of the rows, black on white."""
    dpi = 100
    fig = Figure(figsize=(LABEL_WIDTH_PX / dpi, height / dpi), dpi=dpi, facecolor="white")
    for k, name in enumerate(names):
        fig.text(0.95, 1 - (k + 0.5) / len(names), name, ha="right", va="center", fontsize=9)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def class_names(dataset: str) -> list[str]:
    """The ten class names of a dataset: Fashion-MNIST's (torchvision's), else the digits."""
    return list(FashionMNIST.classes) if dataset == "fashion" else [str(k) for k in range(10)]


def sample_grid(model, likelihood, n: int, seed: int, path: Path) -> None:
    """Means of p(x|z) for z drawn from the prior N(0, I) (seeded)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 31)
    z = torch.randn(n, model.latent_dim, generator=gen, device=device)
    images = likelihood.mean(model.decode(z))
    save_grid(images, int(math.sqrt(n)), path)


def pca_coordinates(means: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The first two principal components of `means` (N, Z) in standard deviations of the
    first, and the fractions of the total variance they explain (a 1-D space gets a zero PC 2)."""
    centred = means.double() - means.double().mean(0)
    _, singular, v = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ v[:2].T
    variance = singular.square()
    explained = (variance[:2] / variance.sum().clamp_min(1e-300)).tolist()
    if coords.shape[1] == 1:
        coords, explained = torch.cat([coords, torch.zeros_like(coords)], 1), explained + [0.0]
    scale = coords[:, 0].std().clamp_min(1e-12) if len(coords) > 1 else torch.tensor(1.0)
    return (coords / scale).float(), explained


class Blitted:
    """A matplotlib figure whose axes, ticks, labels and colour bar are rendered once; each
    trial restores that background and draws only its own `artists` on it (matplotlib's
    blitting): laying out the text of ticks and labels was most of a trial's figure cost.
    `layout_artists` (an axis whose limits follow the data's shape) are left
    out of the base background and drawn onto a copy of it once per `layout`, the hashable
    the caller names the layout by. `Figure` objects, not pyplot: no global state, no GUI.
    Not thread-safe."""

    def __init__(self, fig, artists, layout_artists=(), layout=None):
        self.fig, self.artists, self.layout_artists = fig, list(artists), list(layout_artists)
        self.canvas = FigureCanvasAgg(fig)
        hidden = self.artists + self.layout_artists
        for artist in hidden:
            artist.set_visible(False)
        self.canvas.draw()
        self.base = self.canvas.copy_from_bbox(fig.bbox)
        for artist in hidden:
            artist.set_visible(True)
        self.backgrounds: dict = {}
        self.layout = None
        self.use(layout)

    def use(self, layout) -> None:
        """Switch to the background of `layout`, set up by the caller just before (limits),
        drawing its layout artists on the base background the first time."""
        if layout not in self.backgrounds:
            if self.layout_artists:
                self.canvas.restore_region(self.base)
                for artist in self.layout_artists:
                    self.fig.draw_artist(artist)
                self.backgrounds[layout] = self.canvas.copy_from_bbox(self.fig.bbox)
            else:
                self.backgrounds[layout] = self.base
        self.background, self.layout = self.backgrounds[layout], layout

    def save(self, path: Path) -> None:
        self.canvas.restore_region(self.background)
        for artist in sorted(self.artists, key=lambda a: a.get_zorder()):
            self.fig.draw_artist(artist)
        write_png(self.canvas.buffer_rgba(), path)


class TrialFigures:
    """The matplotlib figures of a trial, built once per worker process and size, then only
    refilled and blitted (see `Blitted`); `write` draws one trial's. Everything that could
    change their layout is fixed so that the background stays valid: the heatmap's colour
    scale (KL_COLOUR_RANGE) and the projection's axes (PCA_EXTENT standard deviations of PC 1)."""

    def __init__(self):
        self.heatmaps: dict[tuple[float, float], tuple] = {}  # figure size (in) -> figure
        self.projections: dict[tuple[str, ...], tuple] = {}  # class names -> figure
        self.labels: dict[int, np.ndarray] = {}  # grid height (px) -> row-label strip

    def reconstructions(self, model, likelihood, x: torch.Tensor, path: Path) -> None:
        """Test images (top row) above their mean reconstructions (bottom row), the rows
        named on the left (a strip drawn once per grid height)."""
        mu, _ = model.encode(x)
        grid = grid_pixels(torch.cat([x, likelihood.mean(model.decode(mu))]), len(x))
        if grid.shape[0] not in self.labels:
            self.labels[grid.shape[0]] = row_labels(RECON_ROWS, grid.shape[0])
        write_png(np.concatenate([self.labels[grid.shape[0]], grid], axis=1), path, RECON_ROWS)

    def heatmap(self, values, path: Path) -> None:
        """`values` (dims, epochs): validation KL per dimension and epoch, nats per image.
        One figure per size; a new shape (another latent_dim) draws only its axes onto the
        kept background, and later trials of that shape only blit."""
        dims, epochs = values.shape
        extent = (0.5, epochs + 0.5, dims - 0.5, -0.5)
        # few sizes, so that a search over latent_dim reuses figures: one up to 32 rows
        size = (max(4.0, 0.4 * epochs + 2.5), 3.0 if dims <= 32 else max(5.5, 0.04 * dims + 1.5))
        if size not in self.heatmaps:
            width, height = size
            fig = Figure(figsize=size, dpi=90)
            ax = fig.add_subplot()
            image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest",
                              norm=LogNorm(*KL_COLOUR_RANGE), extent=extent)
            ax.set_xlabel("epoch")
            ax.set_ylabel("latent dimension")
            ax.set_title("validation KL per dimension")
            fig.colorbar(image, ax=ax, label="nats per image (log)", extend="both")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.subplots_adjust(left=0.7 / width, bottom=0.55 / height, right=1 - 0.5 / width,
                                top=1 - 0.35 / height)
            self.heatmaps[size] = (Blitted(fig, [image, *ax.spines.values()],
                                            [ax.yaxis, ax.xaxis], extent), image)
        blitted, image = self.heatmaps[size]
        image.set_data(values)
        if blitted.layout != extent:
            image.set_extent(extent)  # and the axes' limits, hence the ticks
            blitted.use(extent)
        blitted.save(path)

    def scatter(self, coords, labels, explained, path: Path, names=None) -> None:
        """`coords` (N, 2) in standard deviations of PC 1, coloured by integer `labels` (N,)
        in 0..9 whose `names` the colour bar shows (digits by default); `explained` the two
        components' fractions of the variance. One marker line per class: Agg stamps a cached
        marker, much faster than a scatter collection. One figure per set of names."""
        names = tuple(names or class_names("mnist"))
        if names not in self.projections:
            cmap = matplotlib.colormaps["tab10"]
            fig = Figure(figsize=(6, 4.5), dpi=80)
            ax = fig.add_subplot()
            classes = [ax.plot([], [], "o", ms=3, mew=0, color=cmap(k))[0]
                       for k in range(len(names))]
            bar = fig.colorbar(ScalarMappable(Normalize(-0.5, len(names) - 0.5), cmap), ax=ax,
                               ticks=range(len(names)), label="class")
            bar.set_ticklabels(names)
            ax.set(xlim=(-PCA_EXTENT, PCA_EXTENT), ylim=(-PCA_EXTENT, PCA_EXTENT))
            ax.set_xlabel("PC 1 (100% of the variance)")
            ax.set_ylabel("PC 2 (100%)")
            ax.set_title("test posterior means, PCA (in sd of PC 1)")
            # the right margin holds the longest class name (Fashion-MNIST's "T-shirt/top")
            fig.subplots_adjust(left=0.12, bottom=0.12, right=0.82, top=0.92)
            texts = [ax.xaxis.label, ax.yaxis.label]
            self.projections[names] = (Blitted(fig, [*classes, *texts, *ax.spines.values()]),
                                       classes, texts)
        blitted, classes, (xlabel, ylabel) = self.projections[names]
        coords = np.clip(coords, -PCA_EXTENT, PCA_EXTENT)
        for k, line in enumerate(classes):
            line.set_data(coords[labels == k, 0], coords[labels == k, 1])
        xlabel.set_text(f"PC 1 ({explained[0]:.0%} of the variance)")
        ylabel.set_text(f"PC 2 ({explained[1]:.0%})")
        blitted.save(path)

    def kl_heatmap(self, history: list[dict[str, float]], path: Path) -> None:
        """Validation KL of each latent dimension (rows) over epochs (columns), nats per
        image."""
        keys = sorted(k for k in history[0] if k.startswith("val/kl_dim_"))
        values = torch.tensor([[h[k] for h in history] for k in keys])
        self.heatmap(values.numpy(), path)

    def latent_pca(self, means: torch.Tensor, labels: torch.Tensor, path: Path,
                   dataset: str = "mnist") -> None:
        """The test posterior means projected on their first two principal components."""
        coords, explained = pca_coordinates(means)
        self.scatter(coords.numpy(), labels.numpy(), explained, path, class_names(dataset))

    def write(self, result, splits, folder: Path) -> list[str]:
        """The trial's figures into `folder`; returns the file names."""
        folder.mkdir(parents=True, exist_ok=True)
        model, likelihood, config = result.model, result.likelihood, result.config
        model.eval()
        with torch.no_grad():
            x = splits.test.served(epoch=0)
            mu, _ = model.encode(x)
            self.reconstructions(model, likelihood, x[:16], folder / "reconstructions.png")
            sample_grid(model, likelihood, 64, config.seed, folder / "samples.png")
        model.train()
        self.kl_heatmap(result.history, folder / "kl_per_dimension.png")
        self.latent_pca(mu.cpu(), splits.test.labels.cpu(), folder / "latent_pca.png",
                        config.dataset)
        return sorted(p.name for p in folder.iterdir())
