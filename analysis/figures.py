"""Figures: tidy frames in, matplotlib Figures out (seaborn for every statistical plot).

No pyplot: each function builds a `matplotlib.figure.Figure` of its own, so nothing global
changes and no display backend is needed. Error bars are 95% t-intervals across seeds
(`analysis.stats.t_interval`), never seaborn's bootstrap.
"""

from __future__ import annotations

import contextlib
import io
import zlib

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from analysis.stats import t_interval

DPI = 96
MAX_WIDTH_IN = 11.5
"""Widest figure (inches at DPI) the report pages show unscaled: 8 pt stays 8 pt on the page."""
MIN_FONT_PT = 8
ROWS_KEY = "rows"  # PNG text by which a trial's image grid names its rows (study.trial_figures)

_CB = sns.color_palette("colorblind", 10)
COLOURS = {
    "bernoulli": _CB[0], "gaussian": _CB[1], "gaussian_learned": _CB[2],
    "continuous_bernoulli": _CB[3], "laplace": _CB[4], "gaussian_optimal": _CB[5],
    "BCE − min": _CB[0], "squared error": _CB[1],  # the two likelihoods' per-pixel losses
    # kl_dynamics variants (analysis.kl_remedies.variant_label), by kind
    "constant β": _CB[7], "warm-up": _CB[6], "free bits": _CB[9],
    "warm-up + free bits": _CB[8],
}
"""One colour per likelihood and per kind of KL variant, the same in every figure and panel."""


@contextlib.contextmanager
def _style():
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        yield


def _grid(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2, **kw):
    width = min(width, MAX_WIDTH_IN / ncols)  # wider would shrink the page's text below 8 pt
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def to_png(fig: Figure) -> bytes:
    # constrained layout places tick labels from the last draw's layout: the first draw
    # leaves too little margin for long ones and cuts the labels left of them
    fig.draw_without_rendering()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def colour(name: str) -> tuple:
    """The fixed colour of a likelihood or a KL variant (by kind: a warm-up of any length
    shares one colour); any other name gets one from a hash of it, the same in every run."""
    if name in COLOURS:
        return COLOURS[name]
    kinds = [k for k in ("warm-up", "free bits") if k in name]
    if kinds:
        return COLOURS[" + ".join(kinds)]
    return _CB[zlib.crc32(name.encode()) % len(_CB)]


def palette(names) -> dict:
    """name -> its fixed colour (`colour`), whatever the list and its order."""
    return {name: colour(name) for name in names}


def epoch_axis(ax, steps) -> None:
    """Whole epochs (min_n_ticks=1, or MaxNLocator falls back to fractions with one integer
    in view); a single epoch is centred on an axis one epoch wide."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    steps = pd.unique(pd.Series(steps).dropna())
    if len(steps) == 1:
        ax.set_xlim(steps[0] - 0.5, steps[0] + 0.5)


def ordered_palette(levels) -> dict:
    """Sequential colours for ordered levels (betas, latent dims)."""
    colours = sns.color_palette("viridis", max(len(levels), 1))
    return dict(zip(levels, colours, strict=False))


# --------------------------------------------------------------------------- data evidence


def pixel_histograms(hist: pd.DataFrame, mid_grey=(0.1, 0.9)) -> Figure:
    """hist: dataset, level (0..1), count. One panel per dataset, log counts."""
    datasets = list(dict.fromkeys(hist["dataset"]))
    with _style():
        fig, axes = _grid(1, len(datasets), 4.6, 3.2)
        for ax, name in zip(axes[0], datasets, strict=True):
            sub = hist[hist["dataset"] == name]
            sns.histplot(data=sub, x="level", weights="share", bins=51, binrange=(0, 1),
                         ax=ax, color="#4c72b0", element="bars")
            ax.axvspan(*mid_grey, color="orange", alpha=0.12, label="mid-grey 0.1 < x < 0.9")
            ax.set_yscale("log")
            ax.set(title=name, xlabel="pixel intensity x", ylabel="share of pixels")
            ax.legend(loc="upper center", fontsize="small")
    return fig


def loss_curves(curves: pd.DataFrame) -> Figure:
    """curves: target, prediction, loss, value, gradient (analysis.evidence.loss_curves)."""
    targets = sorted(curves["target"].unique())
    losses = list(dict.fromkeys(curves["loss"]))
    colours = palette(losses)
    with _style():
        fig, axes = _grid(2, len(targets), 3.3, 2.8)
        for j, t in enumerate(targets):
            sub = curves[curves["target"] == t]
            sns.lineplot(data=sub, x="prediction", y="value", hue="loss", hue_order=losses,
                         palette=colours, ax=axes[0, j], legend=j == 0)
            axes[0, j].set(title=f"target x = {t:g}", xlabel="prediction p",
                           ylabel="loss per pixel (nats / SE)", ylim=(0, 1.5))
            sns.lineplot(data=sub, x="prediction", y="gradient", hue="loss", hue_order=losses,
                         palette=colours, ax=axes[1, j], legend=False)
            axes[1, j].axhline(0, color="grey", lw=0.8)
            axes[1, j].set(xlabel="prediction p", ylabel="d loss / d p", ylim=(-10, 10))
    return fig


# --------------------------------------------------------------------------- loss choice


def rate_distortion(runs: pd.DataFrame, summary: pd.DataFrame, distortions: list[tuple],
                    datasets: list[str], likelihoods: list[str]) -> Figure:
    """runs: one row per run with dataset, likelihood, rate and each distortion column.
    summary: dataset, likelihood, beta, rate_mean, <col>_mean/_lo/_hi, rate_lo/_hi.
    distortions: (column, label). Points: runs; line: means across seeds by beta; bars: 95% t."""
    colours = palette(likelihoods)
    with _style():
        fig, axes = _grid(len(distortions), len(datasets), 4.8, 3.5)
        for i, (col, label) in enumerate(distortions):
            for j, name in enumerate(datasets):
                ax = axes[i, j]
                sub = runs[runs["dataset"] == name]
                sns.scatterplot(data=sub, x="rate", y=col, hue="likelihood", palette=colours,
                                hue_order=likelihoods, ax=ax, alpha=0.35, s=18, legend=False)
                for lik in likelihoods:
                    s = summary[(summary["dataset"] == name) & (summary["likelihood"] == lik)]
                    s = s.dropna(subset=[f"{col}_mean"]).sort_values("rate_mean")
                    if s.empty:
                        continue
                    ax.errorbar(s["rate_mean"], s[f"{col}_mean"],
                                yerr=[s[f"{col}_mean"] - s[f"{col}_lo"],
                                      s[f"{col}_hi"] - s[f"{col}_mean"]],
                                xerr=[s["rate_mean"] - s["rate_lo"], s["rate_hi"] - s["rate_mean"]],
                                color=colours[lik], marker="o", ms=4, capsize=2, lw=1.2,
                                label=lik)
                    for _, row in s.iterrows():
                        ax.annotate(f"β={row['beta']:g}", (row["rate_mean"], row[f"{col}_mean"]),
                                    fontsize=MIN_FONT_PT, alpha=0.8, xytext=(3, 3),
                                    textcoords="offset points")
                ax.margins(x=0.15, y=0.12)  # the β labels right of and above the points
                ax.set(title=f"{name}", xlabel="rate R = test KL (nats)", ylabel=label)
                if i == 0 and j == 0:
                    ax.legend(fontsize="small")
    return fig


def error_by_intensity(bins: pd.DataFrame, datasets, likelihoods) -> Figure:
    """bins: dataset, likelihood, run_id, intensity (bin centre), mse. Lines: mean over runs."""
    colours = palette(likelihoods)
    with _style():
        fig, axes = _grid(1, len(datasets), 4.8, 3.4)
        for ax, name in zip(axes[0], datasets, strict=True):
            sub = bins[bins["dataset"] == name]
            sns.lineplot(data=sub, x="intensity", y="mse", hue="likelihood", palette=colours,
                         hue_order=[h for h in likelihoods if h in set(sub["likelihood"])],
                         errorbar=t_interval, marker="o", ax=ax)
            ax.set_yscale("log")
            ax.set(title=name, xlabel="true pixel intensity (bin centre, width 0.1)",
                   ylabel="MSE per pixel")
    return fig


def _read_png(png: bytes) -> tuple[np.ndarray, bool]:
    """Pixels in [0, 1] and whether the image names its own rows (PNG text ROWS_KEY)."""
    image = Image.open(io.BytesIO(png))
    return np.asarray(image.convert("RGBA")) / 255.0, ROWS_KEY in image.info


def image_grid(cells: list[tuple[str, str, bytes | None]], inner_rows=()) -> Figure:
    """cells: (row label, column label, PNG bytes or None), laid out rows x columns.
    inner_rows: names of the equal bands stacked inside each image, top to bottom (originals
    above reconstructions), written beside images that do not carry them already."""
    rows = list(dict.fromkeys(r for r, _, _ in cells))
    cols = list(dict.fromkeys(c for _, c, _ in cells))
    read = {(r, c): _read_png(png) if png else (None, False) for r, c, png in cells}
    images = {key: im for key, (im, _) in read.items()}
    # each column as wide as its images need at a common row height (grids differ in shape)
    widths = []
    for c in cols:
        shapes = [im.shape for (_, cc), im in images.items() if cc == c and im is not None]
        widths.append(max((w / h for h, w, *_ in shapes), default=1.0))
    # room left of the images for row labels and band names: 9 pt is under 0.08 in a char
    chars = max(len(line) for r in rows for line in r.split("\n"))
    margin = 0.5 + 0.08 * (chars + max((len(n) for n in inner_rows), default=0))
    row_height = min(2.6, (MAX_WIDTH_IN - margin) / sum(widths))
    fig = Figure(figsize=(row_height * sum(widths) + margin, row_height * len(rows) + 0.5),
                 layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False,
                        gridspec_kw={"width_ratios": widths})
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images.get((r, c))
            if image is not None:
                ax.imshow(image, cmap="gray")
                if inner_rows and not read[(r, c)][1]:
                    band = image.shape[0] / len(inner_rows)
                    ax.set_yticks([band * (k + 0.5) for k in range(len(inner_rows))],
                                  inner_rows, fontsize=9)
            else:
                ax.text(0.5, 0.5, "no artifact logged", ha="center", va="center", fontsize=9)
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(r, fontsize=9, rotation=0, ha="right", va="center")
    return fig


def metric_by_beta(runs: pd.DataFrame, metrics: list[tuple], datasets, likelihoods) -> Figure:
    """Point plots of metrics (column, label) against beta, hue likelihood, 95% t-intervals."""
    colours = palette(likelihoods)
    with _style():
        fig, axes = _grid(len(metrics), len(datasets), 4.6, 3.2)
        for i, (col, label) in enumerate(metrics):
            for j, name in enumerate(datasets):
                sub = runs[(runs["dataset"] == name)].dropna(subset=[col])
                hues = [h for h in likelihoods if h in set(sub["likelihood"])]
                # seaborn spreads a numeric dodge over (levels - 1) gaps: one level divides by 0
                sns.pointplot(data=sub, x="beta", y=col, hue="likelihood", palette=colours,
                              hue_order=hues, errorbar=t_interval,
                              dodge=0.3 if len(hues) > 1 else False, ax=axes[i, j],
                              markersize=4, capsize=0.1, legend=(i == 0 and j == 0))
                axes[i, j].set(title=name, xlabel="β", ylabel=label)
    return fig


def sigma_over_training(hist: pd.DataFrame, datasets, colours: dict) -> Figure:
    """hist: dataset, likelihood (label), beta, step (epoch), value (sigma); one column per
    dataset, one row per beta, hue likelihood (colours: label -> colour); 95% t-intervals
    across seeds."""
    betas = sorted(hist["beta"].unique())
    likelihoods = list(colours)
    with _style():
        fig, axes = _grid(len(betas), len(datasets), 4.6, 3.1)
        for i, beta in enumerate(betas):
            for j, name in enumerate(datasets):
                ax = axes[i, j]
                sub = hist[(hist["dataset"] == name) & (hist["beta"] == beta)]
                if not sub.empty:
                    sns.lineplot(data=sub, x="step", y="value", hue="likelihood",
                                 hue_order=[h for h in likelihoods if h in set(sub["likelihood"])],
                                 palette=colours, errorbar=t_interval, marker="o", ax=ax)
                    ax.set_yscale("log")
                    ax.legend(fontsize="small", title=None)
                ax.set(title=f"{name}, β = {beta:g}", xlabel="epoch", ylabel="σ")
                epoch_axis(ax, sub["step"])
    return fig


# --------------------------------------------------------------------------- KL dynamics


def curves_by_beta(hist: pd.DataFrame, panels: list[tuple], datasets) -> Figure:
    """hist: dataset, beta_label, key, step, value (one row per run and step).
    panels: (key, xlabel, ylabel); one row per panel, one column per dataset."""
    levels = list(dict.fromkeys(hist.sort_values("beta")["beta_label"]))
    colours = ordered_palette(levels)
    with _style():
        fig, axes = _grid(len(panels), len(datasets), 4.6, 3.1)
        for i, (key, xlabel, ylabel) in enumerate(panels):
            for j, name in enumerate(datasets):
                sub = hist[(hist["dataset"] == name) & (hist["key"] == key)]
                ax = axes[i, j]
                if sub.empty:
                    ax.text(0.5, 0.5, f"{key} not logged", ha="center", transform=ax.transAxes)
                else:
                    sns.lineplot(data=sub, x="step", y="value", hue="beta_label",
                                 hue_order=[lv for lv in levels if lv in set(sub["beta_label"])],
                                 palette=colours, errorbar=t_interval, marker="o", ax=ax)
                    ax.legend(fontsize="small", title=None)
                    epoch_axis(ax, sub["step"])
                ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
    return fig


def kl_heatmaps(mats: list[tuple[str, str, pd.DataFrame]], threshold: float) -> Figure:
    """mats: (row label, column label, frame dims x epochs of KL in nats, sorted)."""
    rows = list(dict.fromkeys(r for r, _, _ in mats))
    cols = list(dict.fromkeys(c for _, c, _ in mats))
    vmax = max(float(np.nanmax(m.values)) for _, _, m in mats)
    norm = LogNorm(vmin=threshold / 10, vmax=max(vmax, threshold))
    lookup = {(r, c): m for r, c, m in mats}
    with _style():
        fig, axes = _grid(len(rows), len(cols), 3.6, 3.4)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                ax = axes[i, j]
                mat = lookup.get((r, c))
                if mat is None:
                    ax.set_axis_off()
                    continue
                # before the heatmap: seaborn thins its tick labels by their size
                ax.tick_params(labelsize=MIN_FONT_PT)
                sns.heatmap(mat.clip(lower=threshold / 10), ax=ax, norm=norm, cmap="magma",
                            cbar=j == len(cols) - 1, cbar_kws={"label": "KL (nats, log)"})
                ax.set(title=f"{r}, {c}", xlabel="epoch", ylabel="latent dim (by final KL)")
    return fig


def active_units(hist: pd.DataFrame, finals: pd.DataFrame, datasets) -> Figure:
    """hist: dataset, beta_label, step, value (val/active_units).
    finals: dataset, beta_label, latent_dim, active (final, per run)."""
    levels = list(dict.fromkeys(
        pd.concat([hist, finals]).sort_values("beta")["beta_label"]))
    colours = ordered_palette(levels)
    with _style():
        fig, axes = _grid(len(datasets), 2, 4.6, 3.1)
        for i, name in enumerate(datasets):
            sub = hist[hist["dataset"] == name]
            if not sub.empty:
                sns.lineplot(data=sub, x="step", y="value", hue="beta_label", palette=colours,
                             errorbar=t_interval, marker="o", ax=axes[i, 0])
            axes[i, 0].set(title=f"{name}: active units over training", xlabel="epoch",
                           ylabel="active units")
            epoch_axis(axes[i, 0], sub["step"])
            fin = finals[finals["dataset"] == name]
            if not fin.empty:
                sns.lineplot(data=fin, x="latent_dim", y="active", hue="beta_label",
                             palette=colours, errorbar=t_interval, marker="o", ax=axes[i, 1])
                dims = sorted(fin["latent_dim"].unique())
                axes[i, 1].plot(dims, dims, ls="--", color="grey", lw=0.8, label="all active")
                axes[i, 1].set_xscale("log", base=2)
                axes[i, 1].set_xticks(dims, [str(int(d)) for d in dims])
            axes[i, 1].set(title=f"{name}: final active units", xlabel="latent_dim",
                           ylabel="active units")
            for ax in axes[i]:
                if ax.get_legend() is not None:
                    ax.legend(fontsize="small", title=None)
    return fig


def collapsed_share(table: pd.DataFrame, datasets) -> Figure:
    """table: dataset, beta, latent_dim, collapsed_share (per run)."""
    dims = sorted(table["latent_dim"].unique())
    colours = ordered_palette(dims)
    with _style():
        fig, axes = _grid(1, len(datasets), 4.6, 3.1)
        for ax, name in zip(axes[0], datasets, strict=True):
            sub = table[table["dataset"] == name]
            sns.barplot(data=sub, x="beta", y="collapsed_share", hue="latent_dim",
                        palette=colours, errorbar=t_interval, ax=ax)
            ax.set(title=name, xlabel="β", ylabel="share of dims collapsed", ylim=(0, 1.05))
            ax.legend(title="latent_dim", fontsize="small")
    return fig


def variants(hist: pd.DataFrame, keys: list[tuple]) -> Figure:
    """hist: group (dataset, beta, latent_dim label), variant, key, step, value.
    One row per group, one column per key."""
    groups = list(dict.fromkeys(hist["group"]))
    names = list(dict.fromkeys(hist["variant"]))
    colours = palette(names)
    with _style():
        fig, axes = _grid(len(groups), len(keys), 4.6, 3.1)
        for i, g in enumerate(groups):
            for j, (key, label) in enumerate(keys):
                ax = axes[i, j]
                sub = hist[(hist["group"] == g) & (hist["key"] == key)]
                shown = [v for v in names if v in set(sub["variant"])]
                sns.lineplot(data=sub, x="step", y="value", hue="variant", style="variant",
                             hue_order=shown, style_order=shown, palette=colours,
                             errorbar=t_interval, marker="o", ax=ax)
                ax.set(title=g, xlabel="epoch", ylabel=label)
                ax.legend(fontsize="small", title=None)
                epoch_axis(ax, sub["step"])
    return fig


def rd_plane(points: pd.DataFrame, fronts: pd.DataFrame, datasets, likelihoods) -> Figure:
    """points: dataset, rate, distortion, likelihood, study, latent_dim.
    fronts: dataset, rate, distortion (Pareto-optimal search runs)."""
    colours = palette(likelihoods)
    with _style():
        fig, axes = _grid(1, len(datasets), 5.2, 4.0)
        for ax, name in zip(axes[0], datasets, strict=True):
            sub = points[points["dataset"] == name]
            sns.scatterplot(data=sub, x="rate", y="distortion", hue="likelihood",
                            hue_order=[h for h in likelihoods if h in set(sub["likelihood"])],
                            palette=colours, style="study", size="latent_dim", sizes=(15, 120),
                            alpha=0.75, ax=ax, legend="full")
            front = fronts[fronts["dataset"] == name].sort_values("rate")
            if not front.empty:
                ax.step(front["rate"], front["distortion"], where="post", color="black",
                        lw=1.2, label="Pareto front (search)")
                ax.scatter(front["rate"], front["distortion"], facecolors="none",
                           edgecolors="black", s=60)
            ax.set(title=name, xlabel="rate R = val KL (nats)",
                   ylabel="distortion = val SSE (summed over pixels)")
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def elbo_decomposition(hist: pd.DataFrame, panels: list[str]) -> Figure:
    """hist: panel, key (val/recon, val/kl), step, value; one run per panel."""
    ncols = min(len(panels), 4)
    nrows = -(-len(panels) // ncols)
    colours = sns.color_palette("colorblind", 2)
    with _style():
        fig, axes = _grid(nrows, ncols, 3.8, 3.0)
        for ax, panel in zip(axes.flat, panels, strict=False):
            sub = hist[hist["panel"] == panel].pivot_table(index="step", columns="key",
                                                           values="value")
            recon, kl = sub.get("val/recon"), sub.get("val/kl")
            if recon is None or kl is None:
                continue
            if len(sub) == 1 and (recon >= 0).all():  # a stack of one epoch has no width
                ax.bar(sub.index, recon, 0.5, color=colours[0], label="distortion (recon)")
                ax.bar(sub.index, kl, 0.5, bottom=recon, color=colours[1], label="rate (KL)")
            elif (recon >= 0).all():
                ax.stackplot(sub.index, recon, kl, labels=["distortion (recon)", "rate (KL)"],
                             colors=colours, alpha=0.8)
            else:  # continuous densities can make the recon term negative: lines, not a stack
                ax.plot(sub.index, recon, color=colours[0], marker="o", ms=4,
                        label="distortion (recon)")
                ax.plot(sub.index, recon + kl, color=colours[1], marker="o", ms=4,
                        label="negative ELBO")
            ax.set(title=panel, xlabel="epoch", ylabel="nats per image")
            epoch_axis(ax, sub.index)
            ax.legend(fontsize="small", loc="upper right")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_axis_off()
    return fig
