"""The report figures as a student reads them, on constructed frames (no training, no MLflow):
one colour per likelihood and per KL variant in every figure, whole epochs on every epoch
axis (a single epoch included), no text under 8 pt, and named rows on image grids."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.text import Text
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from analysis import figures


def drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig


def legend_colours(fig) -> dict[str, tuple]:
    """label -> colour of every legend entry in the figure, as RGB."""
    out = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            colour = (handle.get_color() if hasattr(handle, "get_color")
                      else handle.get_facecolor())
            out[text.get_text()] = to_rgb(colour)
    return out


def text_sizes(fig) -> list[tuple[str, float]]:
    """(text, size in pt) of every visible, non-empty text artist of a drawn figure."""
    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip()]


def assert_readable(fig) -> None:
    """Every text at least MIN_FONT_PT, inside the figure, and the figure no wider than the
    page shows unscaled."""
    figures.to_png(fig)  # laid out as the report saves it, and measured without redrawing
    assert fig.get_figwidth() <= figures.MAX_WIDTH_IN + 1e-9
    small = [(t, s) for t, s in text_sizes(fig) if s < figures.MIN_FONT_PT]
    assert not small, small
    # what is drawn (tick labels beyond the view limits are not) fits in the figure
    tight = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer())
    width, height = fig.get_size_inches()
    assert tight.x0 >= -0.02 and tight.y0 >= -0.02, tight
    assert tight.x1 <= width + 0.02 and tight.y1 <= height + 0.02, tight


# --------------------------------------------------------------------------- frames


def likelihood_runs(likelihoods) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    runs = pd.DataFrame([
        {"dataset": "MNIST", "likelihood": lik, "beta": beta, "seed": seed,
         "rate": 10 / beta + rng.normal(), "sse": 20 * beta + rng.normal(),
         "probe": 0.8 + 0.01 * rng.normal()}
        for lik in likelihoods for beta in (0.5, 1.0, 2.0) for seed in range(3)])
    summary = runs.groupby(["dataset", "likelihood", "beta"], as_index=False).agg(
        rate_mean=("rate", "mean"), sse_mean=("sse", "mean"))
    summary = summary.assign(rate_lo=summary["rate_mean"] - 1, rate_hi=summary["rate_mean"] + 1,
                             sse_lo=summary["sse_mean"] - 1, sse_hi=summary["sse_mean"] + 1)
    return runs, summary


def epoch_history(epochs: int, column: str, names) -> pd.DataFrame:
    """Long frame of two keys over `epochs` epochs (1-based), three seeds per name."""
    return pd.DataFrame([
        {column: name, "key": key, "step": step, "value": 1.0 + step + k + 0.1 * seed,
         "seed": seed}
        for k, name in enumerate(names) for key in ("val/kl", "val/recon")
        for step in range(1, epochs + 1) for seed in range(3)])


def epoch_figures(epochs: int) -> dict:
    """Every figure with an epoch axis, drawn from a history of `epochs` epochs."""
    by_beta = epoch_history(epochs, "beta_label", ["β = 1", "β = 4"]).assign(
        dataset="MNIST", beta=lambda f: f["beta_label"].str[-1].astype(float))
    variant = epoch_history(epochs, "variant", ["constant β", "free bits λ = 0.5"]).assign(
        group="MNIST, bernoulli, β = 1")
    sigma = epoch_history(epochs, "likelihood", ["Gaussian, learned σ"]).assign(
        dataset="MNIST", beta=1.0)
    elbo = epoch_history(epochs, "panel", ["MNIST, β = 1"])
    finals = pd.DataFrame({"dataset": "MNIST", "beta_label": "β = 1", "beta": 1.0,
                           "latent_dim": [2, 8], "active": [2, 5]})
    return {
        "curves_by_beta": figures.curves_by_beta(by_beta, [("val/kl", "epoch", "KL")], ["MNIST"]),
        "variants": figures.variants(variant, [("val/kl", "KL")]),
        "sigma_over_training": figures.sigma_over_training(
            sigma, ["MNIST"], {"Gaussian, learned σ": figures.colour("gaussian_learned")}),
        "elbo_decomposition": figures.elbo_decomposition(elbo, ["MNIST, β = 1"]),
        "active_units": figures.active_units(by_beta[by_beta["key"] == "val/kl"], finals,
                                             ["MNIST"]),
    }


def png(pixels: np.ndarray, rows=()) -> bytes:
    info = PngInfo()
    if rows:
        info.add_text(figures.ROWS_KEY, ";".join(rows))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="png", pnginfo=info)
    return buf.getvalue()


# --------------------------------------------------------------------------- tests


def test_a_likelihood_keeps_its_colour_whatever_else_the_figure_shows():
    runs, summary = likelihood_runs(["bernoulli", "gaussian", "laplace"])
    rd = figures.rate_distortion(runs, summary, [("sse", "SSE")], ["MNIST"],
                                 ["bernoulli", "gaussian", "laplace"])
    only = runs[runs["likelihood"].isin(["laplace", "gaussian"])]
    probe = figures.metric_by_beta(only, [("probe", "probe accuracy")], ["MNIST"],
                                   ["laplace", "gaussian"])
    first, second = legend_colours(drawn(rd)), legend_colours(drawn(probe))
    assert set(second) == {"laplace", "gaussian"}
    for name in second:  # laplace comes first in one list and last in the other
        assert first[name] == second[name] == to_rgb(figures.COLOURS[name])
    assert len(set(first.values())) == 3


def test_a_variant_keeps_its_colour_across_figures_and_kinds_share_one():
    one = epoch_history(2, "variant", ["constant β", "linear warm-up over 5 epochs"])
    two = epoch_history(2, "variant", ["free bits λ = 0.5", "constant β",
                                       "linear warm-up over 2 epochs"])
    a = legend_colours(drawn(figures.variants(one.assign(group="a"), [("val/kl", "KL")])))
    b = legend_colours(drawn(figures.variants(two.assign(group="b"), [("val/kl", "KL")])))
    assert a["constant β"] == b["constant β"] == to_rgb(figures.COLOURS["constant β"])
    assert a["linear warm-up over 5 epochs"] == b["linear warm-up over 2 epochs"]
    assert len({b[v] for v in b}) == 3
    assert figures.palette(["x", "y"]) == dict(reversed(figures.palette(["y", "x"]).items()))


@pytest.mark.parametrize("epochs", [1, 3])
def test_epoch_axes_show_whole_epochs(epochs):
    for name, fig in epoch_figures(epochs).items():
        drawn(fig)
        axes = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
        assert axes, name
        for ax in axes:
            lo, hi = ax.get_xlim()
            shown = [t.get_text() for t in ax.get_xticklabels()
                     if lo <= t.get_position()[0] <= hi and t.get_text()]
            assert shown and all(t.lstrip("−-").isdigit() for t in shown), (name, shown)
            if epochs == 1:
                assert shown == ["1"], (name, shown)
            else:
                assert {"1", "2", "3"} <= set(shown), (name, shown)


def test_a_single_epoch_elbo_decomposition_is_not_blank():
    fig = drawn(epoch_figures(1)["elbo_decomposition"])
    bars = [p for p in fig.axes[0].patches if p.get_height() > 0]
    assert len(bars) == 2  # distortion and, stacked on it, the rate


@pytest.mark.parametrize("epochs", [1, 3])
def test_epoch_figures_are_readable(epochs):
    for fig in epoch_figures(epochs).values():
        assert_readable(fig)


def test_likelihood_figures_are_readable_with_beta_labels_inside():
    runs, summary = likelihood_runs(["bernoulli", "gaussian"])
    fig = figures.rate_distortion(runs, summary, [("sse", "SSE")], ["MNIST"],
                                  ["bernoulli", "gaussian"])
    assert_readable(fig)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().startswith("β=")]
    assert len(labels) == 6
    axes_box = ax.get_window_extent()
    for t in labels:  # inside the axes, not drawn over its frame or cut off
        ext = t.get_window_extent()
        assert axes_box.x0 <= ext.x0 and ext.x1 <= axes_box.x1, t.get_text()
        assert axes_box.y0 <= ext.y0 and ext.y1 <= axes_box.y1, t.get_text()


def test_reconstruction_grid_names_its_rows_once():
    grid = np.zeros((62, 482, 3), np.uint8)
    cells = [("Fashion-MNIST\nbernoulli\nβ = 0.5, seed 0", "reconstructions", png(grid)),
             ("Fashion-MNIST\nbernoulli", "reconstructions",
              png(grid, ("original", "reconstruction")))]
    fig = drawn(figures.image_grid(cells, ("original", "reconstruction")))
    bare, labelled = fig.axes
    assert [t.get_text() for t in bare.get_yticklabels()] == ["original", "reconstruction"]
    top, bottom = (t.get_position()[1] for t in bare.get_yticklabels())
    assert top < 31 < bottom  # image rows run downwards: the originals are the top band
    assert labelled.get_yticklabels() == []  # the image names its rows itself
    assert bare.get_ylabel() == "Fashion-MNIST\nbernoulli\nβ = 0.5, seed 0"
    assert_readable(fig)


def test_a_grid_of_runs_keeps_its_row_labels_inside_the_figure():
    """Four runs of labels several lines long, as the report's reconstruction figure has."""
    grid = np.zeros((248, 497, 3), np.uint8)
    cells = [(f"{d}\n{lik}\nβ = 0.5, seed 0", "reconstructions", png(grid))
             for d in ("MNIST", "Fashion-MNIST") for lik in ("bernoulli", "gaussian")]
    assert_readable(figures.image_grid(cells, ("original", "reconstruction")))
