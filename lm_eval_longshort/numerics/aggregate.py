"""Corpus-level, token-weighted aggregation of per-document sums.

Each document contributes a pair ``(numerator, denominator)`` (for example the
sum of target NLLs and the number of targets); a corpus metric pools the pairs
before dividing, so long documents weigh by their token count (docs/metrics.md).
A document skipped by its protocol contributes ``None`` and is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

# One document's (numerator, denominator), or None for a skipped document.
Sums = Sequence[float] | None

# How a pooled ratio R = Σa/Σb becomes the reported value: ppl = exp(R), bpb = R / ln 2.
TRANSFORMS = ("identity", "exp", "bits")


def pooled_ratio(pairs: Iterable[Sums]) -> float:
    """Σ numerators / Σ denominators over the non-skipped pairs (NaN if the denominator is 0)."""
    num = den = 0.0
    for pair in pairs:
        if pair is None:
            continue
        num += float(pair[0])
        den += float(pair[1])
    return num / den if den > 0 else math.nan


def perplexity(pairs: Iterable[Sums]) -> float:
    """exp(Σ nll / Σ n_targets): token-weighted perplexity."""
    mean_nll = pooled_ratio(pairs)
    return math.exp(mean_nll) if not math.isnan(mean_nll) else math.nan


def bits_per_byte(pairs: Iterable[Sums]) -> float:
    """Σ nll / (ln 2 · Σ bytes), from (nll_sum, n_bytes) pairs."""
    return pooled_ratio(pairs) / math.log(2.0)


def maximum(values: Iterable[float | None]) -> float:
    """Largest non-None value (NaN if none), e.g. the ``approximate`` flag: 1.0 if any document was."""
    present = [float(v) for v in values if v is not None]
    return max(present) if present else math.nan


def count(values: Iterable[int | None]) -> int:
    """Σ of per-document counts (used for ``skipped_docs``)."""
    return int(sum(v for v in values if v is not None))


def _present(pairs: Iterable[Sums]) -> np.ndarray:
    """[n, 2] float64 array of the non-skipped (numerator, denominator) pairs."""
    rows = [(float(p[0]), float(p[1])) for p in pairs if p is not None]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def linearized(pairs: Iterable[Sums]) -> tuple[float, np.ndarray]:
    """(R, u): the pooled ratio and each document's influence on it.

    ``u_d = (a_d - R·b_d) / mean(b)`` is the first-order change of R per document (delta
    method); the u_d sum to 0, and ``se(R) = sqrt(Σ u_d² / (n(n-1)))``.
    """
    ab = _present(pairs)
    den = ab[:, 1].sum()
    if len(ab) == 0 or den <= 0:
        return math.nan, np.zeros(len(ab))
    ratio = ab[:, 0].sum() / den
    return float(ratio), (ab[:, 0] - ratio * ab[:, 1]) / ab[:, 1].mean()


def _transform(ratio: float, u: np.ndarray, transform: str) -> tuple[float, np.ndarray]:
    """The reported value and its per-document influences, for ``transform`` of TRANSFORMS."""
    if transform == "identity":
        return ratio, u
    if transform == "exp":  # d exp(R) = exp(R) dR
        value = math.exp(ratio) if math.isfinite(ratio) else math.nan
        return value, value * u
    if transform == "bits":
        return ratio / math.log(2.0), u / math.log(2.0)
    raise ValueError(f"transform={transform!r} must be one of {TRANSFORMS}")


def _se(u: np.ndarray) -> float:
    n = len(u)
    return math.sqrt(float(u @ u) / (n * (n - 1))) if n >= 2 else math.nan


def ratio_stderr(pairs: Iterable[Sums], transform: str = "identity") -> float:
    """Standard error of a pooled ratio over documents (delta method; documents are the unit).

    ``se(R) = sqrt(Σ_d (a_d - R·b_d)² / (n(n-1))) / mean(b)``; ``transform="exp"`` gives
    se(exp R) = exp(R)·se(R) (perplexity), ``"bits"`` se(R)/ln 2. NaN with fewer than 2 documents.

    >>> round(ratio_stderr([(2.0, 1.0), (4.0, 1.0), (3.0, 2.0)]), 4)
    0.7099
    """
    ratio, u = linearized(pairs)
    return _se(_transform(ratio, u, transform)[1])


def paired_difference(
    pairs_x: Sequence[Sums], pairs_y: Sequence[Sums], transform: str = "identity"
) -> tuple[float, float]:
    """(value_x - value_y, its standard error) for two ratios measured on the SAME documents.

    ``pairs_x[d]`` and ``pairs_y[d]`` belong to document d (e.g. two models, or two lengths of
    one run); the error comes from the per-document differences of the linearised values, so
    what the documents share cancels (a paired test, not the two errors combined). A document
    missing on either side (None) is left out of both.

    >>> d, se = paired_difference([(2.0, 1.0), (4.0, 1.0)], [(1.0, 1.0), (3.0, 1.0)])
    >>> d, se
    (1.0, 0.0)
    """
    if len(pairs_x) != len(pairs_y):
        raise ValueError(
            f"paired_difference needs one pair per document on both sides, got {len(pairs_x)} and {len(pairs_y)}"
        )
    both = [(x, y) for x, y in zip(pairs_x, pairs_y) if x is not None and y is not None]
    value_x, u_x = _transform(*linearized([x for x, _ in both]), transform)
    value_y, u_y = _transform(*linearized([y for _, y in both]), transform)
    return value_x - value_y, _se(u_x - u_y)


# Standard errors travel with the aggregation functions (the harness reads ``fn.stderr``).
pooled_ratio.stderr = ratio_stderr  # type: ignore[attr-defined]
perplexity.stderr = lambda pairs: ratio_stderr(pairs, "exp")  # type: ignore[attr-defined]
bits_per_byte.stderr = lambda pairs: ratio_stderr(pairs, "bits")  # type: ignore[attr-defined]
