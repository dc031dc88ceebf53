"""Correlations across runs: Pearson and Spearman (scipy.stats) and percentile bootstrap intervals.

``compare`` correlates misalignment@L with perplexity@L across runs; the sweep report also gives
each correlation a percentile bootstrap interval over runs. Both use :func:`correlate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lm_eval_longshort.reporting.runs import finite

BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
NO_INTERVAL = (math.nan, math.nan)


def _usable(x: np.ndarray, y: np.ndarray) -> bool:
    """At least 2 points and neither side constant (else r is undefined: NaN)."""
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"correlation needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    return x.size >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r (scipy.stats.pearsonr); NaN with fewer than 2 points or a constant side."""
    from scipy import stats  # here: scipy.stats takes ~1 s to import, report/plot never need it

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(stats.pearsonr(x, y).statistic) if _usable(x, y) else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rho (scipy.stats.spearmanr: Pearson r of average ranks, ties handled)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(stats.spearmanr(x, y).statistic) if _usable(x, y) else math.nan


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of [B, n] arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_intervals(
    x: Sequence[float],
    y: Sequence[float],
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of Pearson r and Spearman rho, resampling runs with replacement.

    ``idx = default_rng(seed).integers(0, n, (draws, n))``; a draw where either side is constant
    has no correlation and is left out. NaN bounds with fewer than 3 runs (resampling 2 points
    can only give ±1) or when under half of the draws are usable. (``scipy.stats.bootstrap``
    keeps such draws, whose NaN makes every bound NaN: hence this small loop-free version.)
    """
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3:
        return {"pearson": NO_INTERVAL, "spearman": NO_INTERVAL}
    idx = np.random.default_rng(seed).integers(0, x.size, size=(draws, x.size))
    xs, ys = x[idx], y[idx]
    out = {}
    for name, (a, b) in {"pearson": (xs, ys), "spearman": (rankdata(xs, axis=1), rankdata(ys, axis=1))}.items():
        r = _rowwise_pearson(a, b)
        r = r[np.isfinite(r)]
        tail = (1 - level) / 2 * 100
        usable = r.size >= draws / 2
        out[name] = (float(np.percentile(r, tail)), float(np.percentile(r, 100 - tail))) if usable else NO_INTERVAL
    return out


@dataclass
class Correlation:
    """Correlation of misalignment vs perplexity over ``n`` points (runs); ``length`` None = pooled.

    Attributes:
        length: the context length L of the misalignment values (None: every length pooled).
        n: the points with both sides finite.
        pearson, spearman: r and rho (NaN below 2 points or with a constant side).
        pearson_ci, spearman_ci: percentile bootstrap intervals over runs (NaN: not computed).
        task, metric: the misalignment task and metric (empty where the caller holds them).
        versus: what the metric is correlated with, e.g. ``ppl@L`` or ``ppl@16384``.
        runs: the labels of the runs behind the n points.
    """

    length: int | None
    n: int
    pearson: float
    spearman: float
    pearson_ci: tuple[float, float] = NO_INTERVAL
    spearman_ci: tuple[float, float] = NO_INTERVAL
    task: str = ""
    metric: str = ""
    versus: str = ""
    runs: tuple[str, ...] = ()


def correlate(
    x: Sequence[float | None],
    y: Sequence[float | None],
    length: int | None = None,
    labels: Sequence[str] = (),
    intervals: bool = False,
) -> Correlation:
    """The correlation over the points with both sides finite (``labels`` name the points);
    with ``intervals``, bootstrap intervals as well."""
    keep = [i for i, (a, b) in enumerate(zip(x, y)) if finite(a) and finite(b)]
    xs, ys = [float(x[i]) for i in keep], [float(y[i]) for i in keep]
    ci = bootstrap_intervals(xs, ys) if intervals else {"pearson": NO_INTERVAL, "spearman": NO_INTERVAL}
    runs = tuple(labels[i] for i in keep) if labels else ()
    return Correlation(length, len(keep), pearson(xs, ys), spearman(xs, ys), ci["pearson"], ci["spearman"], runs=runs)
