"""Corpus-level, token-weighted aggregation of per-document sums.

Each document contributes a pair ``(numerator, denominator)`` (for example the
sum of target NLLs and the number of targets); a corpus metric pools the pairs
before dividing, so long documents weigh by their token count (METRICS.md).
A document skipped by its protocol contributes ``None`` and is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Pair = Sequence[float] | None


def pooled_ratio(pairs: Iterable[Pair]) -> float:
    """Σ numerators / Σ denominators over the non-skipped pairs (NaN if the denominator is 0)."""
    num = den = 0.0
    for pair in pairs:
        if pair is None:
            continue
        num += float(pair[0])
        den += float(pair[1])
    return num / den if den > 0 else math.nan


def perplexity(pairs: Iterable[Pair]) -> float:
    """exp(Σ nll / Σ n_targets): token-weighted perplexity."""
    mean_nll = pooled_ratio(pairs)
    return math.exp(mean_nll) if not math.isnan(mean_nll) else math.nan


def bits_per_byte(pairs: Iterable[Pair]) -> float:
    """Σ nll / (ln 2 · Σ bytes), from (nll_sum, n_bytes) pairs."""
    return pooled_ratio(pairs) / math.log(2.0)


def maximum(values: Iterable[float | None]) -> float:
    """Largest non-None value (NaN if none), e.g. the ``approximate`` flag: 1.0 if any document was."""
    present = [float(v) for v in values if v is not None]
    return max(present) if present else math.nan


def count(values: Iterable[int | None]) -> int:
    """Σ of per-document counts (used for ``skipped_docs``)."""
    return int(sum(v for v in values if v is not None))
