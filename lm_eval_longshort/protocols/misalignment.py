"""Long-Short Misalignment pairings: documents (token ids) -> long/short inputs to compare.

All randomness comes from ``numpy.random.default_rng([seed, doc_index, L])`` so a run
is reproducible and every logged pair can be recomputed (docs/metrics.md):
- ``last``: ``rng.choice(np.arange(ceil(min_ratio·L), L), size=pairs, replace=False)``
  short lengths, in draw order;
- ``dense``: one gap ``e = rng.integers(1, max_gap(L) + 1)``, ``max_gap(L) = min(L // 2, L - ceil(min_ratio·L))``
  (for the default min_ratio 0.5 that is L // 2; the bound keeps at least one compared position).
"""

from __future__ import annotations

import numpy as np

from lm_eval_longshort.protocols.requests import AlignedWindows, Prompt
from lm_eval_longshort.protocols.settings import MisalignSettings


def rng_for(s: MisalignSettings, doc_index: int, length: int) -> np.random.Generator:
    return np.random.default_rng([s.seed, doc_index, length])


def short_lengths(s: MisalignSettings, doc_index: int, length: int) -> list[int]:
    """The ``pairs`` distinct short lengths drawn for one document and long length L."""
    candidates = np.arange(s.min_short(length), length)
    return [int(x) for x in rng_for(s, doc_index, length).choice(candidates, size=s.pairs, replace=False)]


def max_gap(s: MisalignSettings, length: int) -> int:
    """Largest dense gap for L: B's context at the last position, L - e, must reach ceil(min_ratio·L)."""
    return min(length // 2, length - s.min_short(length))


def dense_gap(s: MisalignSettings, doc_index: int, length: int) -> int:
    """The offset e of window B = ids[e : e+L] for one document and L, drawn from [1, max_gap(L)]."""
    return int(rng_for(s, doc_index, length).integers(1, max_gap(s, length) + 1))


def needed_tokens(s: MisalignSettings, doc_index: int) -> int:
    if s.mode == "last":
        return s.longest
    return max(length + dense_gap(s, doc_index, length) for length in s.lengths)


def longest_input(s: MisalignSettings, bos: int | None) -> int:
    return s.longest + (1 if bos is not None else 0)


# last: every input ends at E = C, so all lengths predict the same next token ids[C].
def last_prompts(ids: np.ndarray, s: MisalignSettings, doc_index: int, bos, label: str):
    """Prompts in the order [long_L, short_L_1..short_L_pairs] for each L; per pair, its logged
    record and the (long, short) prompt indices whose distributions it compares."""
    end = s.longest
    prompts, records, rows = [], [], []
    for length in s.lengths:
        long_at = len(prompts)
        prompts.append(Prompt(tokens=ids[end - length : end], bos=bos, label=f"{label} L={length}"))
        for short in short_lengths(s, doc_index, length):
            records.append({"doc_index": doc_index, "end": end, "long_len": length, "short_len": short})
            rows.append((long_at, len(prompts)))
            prompts.append(Prompt(tokens=ids[end - short : end], bos=bos, label=f"{label} L={length} l={short}"))
    return prompts, records, rows


# dense: A = ids[0:L], B = ids[e:e+L]; compare A after ids[t] with B after the same token.
def dense_positions(s: MisalignSettings, length: int, gap: int) -> np.ndarray:
    """The positions t of A compared for gap e (B's are t - e): t >= e and t + 1 - e >= ceil(min_ratio·L)."""
    return np.arange(max(gap, s.min_short(length) + gap - 1), length)


def dense_pairs(ids: np.ndarray, s: MisalignSettings, doc_index: int, bos, label: str):
    pairs, layout = [], []
    for length in s.lengths:
        gap = dense_gap(s, doc_index, length)
        t = dense_positions(s, length, gap)
        first_t = int(t[0])
        pairs.append(
            AlignedWindows(
                long_tokens=ids[0:length],
                short_tokens=ids[gap : gap + length],
                long_positions=t,
                short_positions=t - gap,
                bos=bos,
                label=f"{label} L={length} e={gap}",
            )
        )
        layout.append(
            {
                "doc_index": doc_index,
                "L": length,
                "a_start": 0,
                "b_start": gap,
                "t_first": int(first_t),
                "t_last": int(length - 1),
                "n_positions": int(t.size),
                "long_ctx": [int(first_t + 1), int(length)],
                "short_ctx": [int(first_t + 1 - gap), int(length - gap)],
            }
        )
    return pairs, layout
