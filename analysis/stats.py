"""Statistics across seeds: means with 95% t-intervals, paired comparisons with effect sizes,
and distortion compared at a matched rate. Everything here is scipy.stats on numbers from
the runs frame; nothing is resampled or estimated by hand."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean; a single value gives (value, value).

    Usable as seaborn's `errorbar=` callable, which needs a finite pair.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return (math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2 or float(x.std(ddof=1)) == 0.0:
        return (mean, mean)
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=stats.sem(x))
    return (float(lo), float(hi))


def mean_ci(values, confidence: float = CONFIDENCE) -> dict[str, float]:
    """mean, lo, hi and n of the finite values; lo/hi are NaN for fewer than two values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    if n < 2:
        return {"mean": float(x[0]), "lo": math.nan, "hi": math.nan, "n": 1}
    lo, hi = t_interval(x, confidence)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": n}


def summarize(frame: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """One row per group of `by`: n, mean, lo, hi of `metric` across its runs (seeds)."""
    rows = []
    if metric not in frame:
        return pd.DataFrame(columns=[*by, "n", "mean", "lo", "hi"])
    for key, group in frame.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), **mean_ci(group[metric])})
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "lo", "hi"])


@dataclass
class Paired:
    """A paired comparison of `a` against `b`: differences a - b over matched units."""

    n: int
    mean_diff: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    t_p: float = math.nan
    """Two-sided paired t-test (scipy.stats.ttest_rel on the pairs)."""
    wilcoxon_p: float = math.nan
    """Two-sided Wilcoxon signed-rank test (exact for small n)."""
    d_z: float = math.nan
    """Cohen's d_z: mean difference over the standard deviation of the differences."""
    diffs: list[float] = field(default_factory=list)


def paired(a, b) -> Paired:
    """Paired statistics of matched arrays `a` and `b` (NaN pairs dropped)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    out = Paired(n=len(d), diffs=d.tolist())
    if len(d) == 0:
        return out
    out.mean_diff = float(d.mean())
    if len(d) < 2:
        return out
    out.lo, out.hi = t_interval(d)
    sd = float(d.std(ddof=1))
    if sd > 0:
        out.d_z = out.mean_diff / sd
        out.t_p = float(stats.ttest_rel(a, b).pvalue)
    elif out.mean_diff != 0:  # identical non-zero differences: as certain as it gets
        out.d_z = math.copysign(math.inf, out.mean_diff)
        out.t_p = 0.0
    else:
        out.d_z, out.t_p = 0.0, 1.0
    if np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.wilcoxon_p = float(stats.wilcoxon(d).pvalue)
    else:
        out.wilcoxon_p = 1.0
    return out


def pair_runs(frame: pd.DataFrame, side: str, a: str, b: str, on: list[str],
              metric: str) -> tuple[pd.Series, pd.Series]:
    """Values of `metric` for side == a and side == b matched on the columns `on`.

    Runs repeated for one unit are averaged first, so each unit counts once.
    """
    if metric not in frame:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    sub = frame[frame[side].isin([a, b])]
    table = sub.groupby([*on, side])[metric].mean().unstack(side)
    if a not in table or b not in table:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    table = table[[a, b]].dropna()
    return table[a], table[b]


def distortion_at_matched_rate(curve_a: pd.DataFrame, curve_b: pd.DataFrame,
                               rate: str, distortion: str, points: int = 50):
    """Mean distortion of two rate-distortion curves over their common range of rates.

    Each curve is the runs of one model family across beta (>= 2 points); distortion is
    interpolated linearly in rate on a grid over the overlap. None when the curves share
    no range of rates.
    """
    curves = []
    for curve in (curve_a, curve_b):
        c = curve[[rate, distortion]].dropna().sort_values(rate)
        if len(c) < 2:
            return None
        curves.append(c)
    lo = max(c[rate].iloc[0] for c in curves)
    hi = min(c[rate].iloc[-1] for c in curves)
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, points)
    return tuple(float(np.interp(grid, c[rate], c[distortion]).mean()) for c in curves)


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated when minimizing both `x` and `y`, sorted by `x`."""
    pts = frame.dropna(subset=[x, y]).sort_values([x, y])
    keep, best_y = [], math.inf
    for idx, row in pts.iterrows():
        if row[y] < best_y:
            keep.append(idx)
            best_y = row[y]
    return pts.loc[keep]
