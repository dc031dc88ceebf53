"""Long-Short Misalignment pairings: documents (token ids) -> long/short inputs to compare.

Two modes, each an object (``Last``, ``Dense``; ``MODES`` by name) built on the pure functions below.

All randomness comes from ``numpy.random.default_rng([seed, doc_index, L])`` so a run
is reproducible and every logged pair can be recomputed (docs/metrics.md):
- ``last``: ``rng.choice(np.arange(ceil(min_ratio·L), L), size=pairs, replace=False)``
  short lengths, in draw order;
- ``dense``: one gap ``e = rng.integers(1, max_gap(L) + 1)``, ``max_gap(L) = min(L // 2, L - ceil(min_ratio·L))``
  (for the default min_ratio 0.5 that is L // 2; the bound keeps at least one compared position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lm_eval_longshort.numerics import catalogue, histogram
from lm_eval_longshort.numerics.divergences import METRIC_NAMES, all_divergences
from lm_eval_longshort.protocols.base import Document, DocumentRequests, Protocol, bos_tokens
from lm_eval_longshort.protocols.requests import AlignedWindows, Prompt, ScoringEngine
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
    """Document tokens the mode needs for document ``doc_index`` (dense: its drawn gaps)."""
    return MODES[s.mode](s).needed_tokens(doc_index)


def longest_input(s: MisalignSettings, bos: int | None) -> int:
    return MODES[s.mode](s).longest_input(bos)


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
                next_tokens=ids[t + 1],  # the document holds ids[L]: it needs L + e >= L + 1 tokens
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


class MisalignProtocol(Protocol):
    """What both modes share: no input is longer than max(lengths) tokens plus a BOS."""

    settings: MisalignSettings

    def longest_input(self, bos: int | None) -> int:
        return self.settings.longest + bos_tokens(bos)


class Last(MisalignProtocol):
    """Suffix pairs ending at E = C: full next-token distributions after each prompt, compared per pair."""

    name = "last"

    def needed_tokens(self, doc_index: int) -> int:
        return self.settings.longest

    def input_tokens(self, n_doc: int, bos: int | None) -> int:
        s = self.settings
        return sum((length + bos_tokens(bos)) * (1 + s.pairs) for length in s.lengths)

    def requests(self, doc: Document, ids: np.ndarray, bos: int | None, engine: ScoringEngine) -> DocumentRequests:
        prompts, records, rows = last_prompts(ids, self.settings, doc.doc_index, bos, doc.label)
        return DocumentRequests(doc, ids, bos, prompts, layout=(records, rows))

    def ask(self, engine: ScoringEngine, requests: list[Prompt]) -> torch.Tensor:
        return engine.last_logprobs(requests, batch_tokens=self.settings.batch_tokens)  # [n_prompts, V]

    def summarize(self, asked: DocumentRequests, answers: torch.Tensor, engine: ScoringEngine) -> dict:
        records, rows = asked.layout  # rows: (long, short) prompt indices of each pair
        long_rows, short_rows = (torch.tensor(r) for r in zip(*rows, strict=True))
        values = all_divergences(answers[long_rows], answers[short_rows])
        for i, record in enumerate(records):
            record.update({name: float(values[name][i]) for name in METRIC_NAMES})
        return {"pairs": records, "mode": self.name}


class Dense(MisalignProtocol):
    """Two overlapping windows A = ids[0:L], B = ids[e:e+L], compared position by position."""

    name = "dense"

    def needed_tokens(self, doc_index: int) -> int:
        return max(length + dense_gap(self.settings, doc_index, length) for length in self.settings.lengths)

    def input_tokens(self, n_doc: int, bos: int | None) -> int:
        return sum(2 * (length + bos_tokens(bos)) for length in self.settings.lengths)

    def requests(self, doc: Document, ids: np.ndarray, bos: int | None, engine: ScoringEngine) -> DocumentRequests:
        pairs, layout = dense_pairs(ids, self.settings, doc.doc_index, bos, doc.label)
        return DocumentRequests(doc, ids, bos, pairs, layout=layout)

    def ask(self, engine: ScoringEngine, requests: list[AlignedWindows]) -> list[dict[str, np.ndarray]]:
        s = self.settings
        return engine.aligned_divergences(requests, topk=s.topk, batch_tokens=s.batch_tokens)

    def summarize(
        self, asked: DocumentRequests, answers: Sequence[dict[str, np.ndarray]], engine: ScoringEngine
    ) -> dict:
        for group, per_position in zip(asked.layout, answers, strict=True):
            # Every per-position array: the metrics, plus error bounds from approximate backends
            # (tv_err_bound -> tv_err_bound_sum).
            group.update({f"{name}_sum": float(np.sum(array)) for name, array in per_position.items()})
            # The distribution of each summarised metric (symkl): fixed-bin counts and the exact maximum.
            for name in catalogue.summarised():
                group[f"{name}_hist"] = histogram.sparse(histogram.counts(per_position[name]))
                group[f"{name}_max"] = float(np.max(per_position[name]))
        return {"groups": asked.layout, "mode": self.name, "approximate": engine.approximate_dense}


MODES: dict[str, type[MisalignProtocol]] = {"last": Last, "dense": Dense}
