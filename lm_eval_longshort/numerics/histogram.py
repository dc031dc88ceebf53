"""Fixed log-spaced histograms of per-position values: exact integer counts that merge by addition.

The distribution of a per-position divergence (``symkl`` in ``dense`` misalignment) is kept per
document and length as counts over FIXED bins, the same for every run, so documents, shards and
workers merge exactly by adding counts, and pooled percentiles are read from the merged counts
(docs/metrics.md, "The distribution of misalignment").

Bins: ``EDGES`` are ``PER_DECADE`` log-spaced edges per decade from ``LOW`` to ``HIGH``; bin 0
(underflow) holds every value below ``LOW`` (exact zeros, and rounding just below 0), bin i
(1 <= i < len(EDGES)) holds ``EDGES[i-1] <= v < EDGES[i]``, the last bin (overflow) every value
``>= HIGH``. A percentile is read as the geometric centre of the bin holding the exact
(inverted-CDF) percentile, so it is within a factor ``RESOLUTION`` of it; in the underflow bin it
reads 0, in the overflow bin ``HIGH`` (a lower bound). No torch, no lm-eval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

LOW, HIGH, PER_DECADE = 1e-8, 1e2, 20
EDGES = np.logspace(math.log10(LOW), math.log10(HIGH), round(math.log10(HIGH / LOW)) * PER_DECADE + 1)
N_BINS = len(EDGES) + 1  # underflow, the log-spaced bins, overflow
# A bin spans a factor 10^(1/PER_DECADE); its geometric centre is within the square root of that
# of any value in it: 10^(1/40) = 1.0593 (±5.9%) for 20 bins per decade.
RESOLUTION = 10 ** (1 / (2 * PER_DECADE))

# A histogram as logged and recorded: [[bin, count], ...] for the bins with a count, bins ascending.
Sparse = list[list[int]]


def counts(values) -> np.ndarray:
    """int64 [N_BINS] counts of ``values`` (any float array; NaN is refused) in the fixed bins."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(values).any():
        raise ValueError("a histogram of per-position values got NaN")
    return np.bincount(np.searchsorted(EDGES, values, side="right"), minlength=N_BINS).astype(np.int64)


def sparse(dense: np.ndarray) -> Sparse:
    """The non-zero bins of ``dense`` counts as [[bin, count], ...] (JSON-friendly, compact)."""
    return [[int(i), int(dense[i])] for i in np.flatnonzero(dense)]


def merged(histograms: Iterable[Sparse | None]) -> np.ndarray:
    """int64 [N_BINS]: the sum of sparse histograms (None, a skipped document, is left out)."""
    total = np.zeros(N_BINS, dtype=np.int64)
    for histogram in histograms:
        for index, count in histogram or ():
            total[int(index)] += int(count)
    return total


def bin_value(index: int) -> float:
    """What a percentile in bin ``index`` reads: 0 (underflow), the geometric centre, or HIGH (overflow)."""
    if index == 0:
        return 0.0
    if index >= len(EDGES):
        return float(HIGH)
    return float(math.sqrt(EDGES[index - 1] * EDGES[index]))


def quantile(dense: np.ndarray, q: float) -> float:
    """The q-quantile (0 < q <= 1) read from ``dense`` counts: the bin holding the k-th smallest
    value, k = ceil(q·n) (numpy's ``method="inverted_cdf"``); NaN for an empty histogram."""
    n = int(dense.sum())
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q * n - 1e-9 * n))  # q·n computed in floats: 0.9 · 10 may be 9.000000000000002
    return bin_value(int(np.searchsorted(np.cumsum(dense), rank)))


def pooled_quantile(q: float):
    """The aggregation of a percentile metric: merge the documents' sparse histograms, read the q-quantile.

    No standard error (the harness reports N/A): a percentile is not a ratio of per-document sums.
    """

    def aggregate(histograms: Iterable[Sparse | None]) -> float:
        return quantile(merged(histograms), q)

    aggregate.__name__ = f"pooled_quantile_{q:g}"
    return aggregate
