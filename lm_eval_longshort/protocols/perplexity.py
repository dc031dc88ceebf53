"""Long-context perplexity protocols: documents (token ids) -> target windows -> per-length sums.

Each protocol is an object (``Ladder``, ``Truncate``, ``Sliding``; ``PROTOCOLS`` by name) built
on a pair of pure functions over one document: ``*_windows(ids, s, bos, label)`` lists what
to score, and ``*_summarize(ids, nlls, s, bos, decode)`` reduces the backend's per-token NLLs
to one record per context length L: ``{"L", "nll_sum", "n_targets", "n_bytes"}``
(docs/metrics.md, "Long-context perplexity").
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from lm_eval_longshort.protocols.base import Document, DocumentRequests, Protocol, bos_tokens
from lm_eval_longshort.protocols.requests import LengthLimitError, ScoringEngine, TargetWindow
from lm_eval_longshort.protocols.settings import PerplexitySettings

log = logging.getLogger(__name__)

Decode = Callable[[np.ndarray], str]


def needed_tokens(s: PerplexitySettings) -> int:
    """Document tokens a protocol needs; shorter documents are skipped for the whole task."""
    return PROTOCOLS[s.protocol](s).needed_tokens(doc_index=0)  # the same for every document


def longest_input(s: PerplexitySettings, bos: int | None) -> int:
    """Longest sequence (BOS included) the backend must accept."""
    return PROTOCOLS[s.protocol](s).longest_input(bos)


def _decoder(tokenizer) -> Decode:
    return lambda span: tokenizer.decode(span.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _n_bytes(decode: Decode, span: np.ndarray) -> int:
    return len(decode(span).encode("utf-8")) if len(span) else 0


def _record(length: int, nll: np.ndarray, n_bytes: int) -> dict:
    return {"L": int(length), "nll_sum": float(nll.sum()), "n_targets": int(nll.size), "n_bytes": int(n_bytes)}


# ladder: targets T = ids[C : C+W]; context L reads ids[C-L : C+W-1] and predicts each of T.
# A TargetWindow scores tokens[score_from:], so the window holds the W targets: ids[C-L : C+W].
def ladder_windows(ids: np.ndarray, s: PerplexitySettings, bos: int | None, label: str) -> list[TargetWindow]:
    c, w = s.longest, s.target_tokens
    return [
        TargetWindow(tokens=ids[c - length : c + w], score_from=length, bos=bos, label=f"{label} L={length}")
        for length in s.lengths
    ]


def ladder_summarize(ids, nlls, s: PerplexitySettings, bos, decode: Decode) -> dict:
    c, w = s.longest, s.target_tokens
    n_bytes = _n_bytes(decode, ids[c : c + w])  # same targets for every L
    records = [_record(length, nll, n_bytes) for length, nll in zip(s.lengths, nlls, strict=True)]
    nll_long, nll_short = nlls[-1], nlls[0]  # lengths are sorted: [-1] is C, [0] is min
    key = (nll_short - nll_long > s.alpha) & (-nll_long > s.beta)
    keys = {"n_key": int(key.sum()), "key_nll_sum": float(nll_long[key].sum()), "n_targets": int(w)}
    return {"records": records, "key_tokens": keys}


# truncate: context L reads ids[0:L] and scores every predictable token.
def truncate_windows(
    ids: np.ndarray, s: PerplexitySettings, bos: int | None, label: str, single_pass: bool
) -> list[TargetWindow]:
    first = 0 if bos is not None else 1
    if single_pass:
        return [
            TargetWindow(
                tokens=ids[: s.longest], score_from=first, bos=bos, label=f"{label} L<={s.longest}", feed_last=True
            )
        ]
    return [
        TargetWindow(tokens=ids[:length], score_from=first, bos=bos, label=f"{label} L={length}", feed_last=True)
        for length in s.lengths
    ]


def truncate_summarize(ids, nlls, s: PerplexitySettings, bos, decode: Decode) -> dict:
    first = 0 if bos is not None else 1
    records = []
    for i, length in enumerate(s.lengths):
        # One pass: the NLLs of ids[first:C]; length L keeps its first L - first (prefix sums).
        nll = nlls[0][: length - first] if len(nlls) == 1 else nlls[i]
        records.append(_record(length, nll, _n_bytes(decode, ids[first:length])))
    # The pass over ids[0:C] (the only one, or the last of the per-length passes) scores every
    # position t with context t: the loss-against-position bins and ppl_pos come from it.
    positions = position_sums(nlls[-1], first, position_edges(s))
    for record, previous in zip(records, (0, *s.lengths)):
        record["pos_nll_sum"], record["pos_n_targets"] = span_sums(positions, previous, record["L"])
    return {"records": records, "positions": positions}


# Loss against position: the targets of ids[0:C] in bins of log-spaced positions (docs/metrics.md).
def position_edges(s: PerplexitySettings) -> list[int]:
    """Bin edges over positions 0..C: 0, round(2^(j/k)) for j = 0, 1, ... (k bins per doubling) and
    every length, so each L is an edge; bin i holds the targets at positions edges[i] .. edges[i+1]-1."""
    k, c, edges, j = s.position_bins, s.longest, {0, *s.lengths}, 0
    while (edge := math.floor(2 ** (j / k) + 0.5)) < c:
        edges.add(edge)
        j += 1
    return sorted(edges)


def position_sums(nll: np.ndarray, first: int, edges: Sequence[int]) -> dict:
    """``{"edges", "nll_sum", "n_targets"}``: per bin of ``edges``, the NLL sum and count of the
    targets in it, from ``nll`` = the NLLs of ids[first : first + len(nll)] (one pass)."""
    cumulative = np.concatenate(([0.0], np.cumsum(nll, dtype=np.float64)))
    bounds = np.clip(np.asarray(edges) - first, 0, len(nll))
    return {
        "edges": [int(e) for e in edges],
        "nll_sum": [float(v) for v in np.diff(cumulative[bounds])],
        "n_targets": [int(v) for v in np.diff(bounds)],
    }


def span_sums(positions: dict, begin: int, end: int) -> tuple[float, int]:
    """(NLL sum, targets) of the bins covering positions begin .. end-1 (both must be edges)."""
    edges = positions["edges"]
    lo, hi = edges.index(begin), edges.index(end)
    return float(sum(positions["nll_sum"][lo:hi])), int(sum(positions["n_targets"][lo:hi]))


# sliding: windows of L tokens every S tokens over ids[0:D]; each token scored once.
def sliding_spans(n_doc: int, length: int, stride: int, bos: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a document of n_doc tokens."""
    spans, scored_until, begin = [], 0 if bos is not None else 1, 0
    while True:
        end = min(begin + length, n_doc)
        first = max(scored_until, begin + (0 if bos is not None else 1))
        spans.append((begin, end, first))
        scored_until = end
        if end >= n_doc:
            return spans
        begin += stride


def check_sliding(s: PerplexitySettings, bos: int | None) -> None:
    """Without a BOS a window's first token has no context: a stride of L would leave it unscored."""
    if bos is not None:
        return
    for length in s.lengths:
        if s.stride_for(length) >= length:
            raise ValueError(
                f"metadata stride={s.stride_for(length)} with window L={length} and no BOS token would leave the "
                f"first token of every later window unscored; use stride <= {length - 1} (or add_bos=true)"
            )


def _doc_end(ids: np.ndarray, s: PerplexitySettings) -> int:
    return min(len(ids), s.doc_tokens_cap())


def sliding_windows(ids: np.ndarray, s: PerplexitySettings, bos: int | None, label: str) -> list[TargetWindow]:
    windows = []
    for length in s.lengths:
        for begin, end, first in sliding_spans(_doc_end(ids, s), length, s.stride_for(length), bos):
            windows.append(
                TargetWindow(
                    tokens=ids[begin:end],
                    score_from=first - begin,
                    bos=bos,
                    label=f"{label} L={length}@{begin}",
                    feed_last=True,
                )
            )
    return windows


def sliding_summarize(ids, nlls, s: PerplexitySettings, bos, decode: Decode) -> dict:
    n_doc = _doc_end(ids, s)
    first = 0 if bos is not None else 1
    span_bytes = _n_bytes(decode, ids[first:n_doc])  # every L scores exactly ids[first:D]
    records, cursor = [], 0
    for length in s.lengths:
        count = len(sliding_spans(n_doc, length, s.stride_for(length), bos))
        nll = np.concatenate(nlls[cursor : cursor + count])
        cursor += count
        records.append(_record(length, nll, span_bytes))
    return {"records": records}


class PerplexityProtocol(Protocol):
    """What the three protocols share: target windows in, per-length NLL sums out."""

    settings: PerplexitySettings

    def needed_tokens(self, doc_index: int) -> int:
        return self.settings.longest  # truncate and sliding read ids[0:C] at least

    def longest_input(self, bos: int | None) -> int:
        return self.settings.longest + bos_tokens(bos)

    def ask(self, engine: ScoringEngine, requests: list[TargetWindow]) -> list[np.ndarray]:
        return engine.target_nll(requests, batch_tokens=self.settings.batch_tokens)

    def summarize(self, asked: DocumentRequests, answers: Sequence[np.ndarray], engine: ScoringEngine) -> dict:
        summary = self.records(asked.ids, answers, asked.bos, _decoder(engine.tokenizer))
        for record in summary["records"]:
            record["doc_index"] = asked.doc.doc_index
        summary["protocol"] = self.name
        return summary

    @abc.abstractmethod
    def records(self, ids: np.ndarray, nlls: Sequence[np.ndarray], bos: int | None, decode: Decode) -> dict:
        """``{"records": [one per L], ...}`` from the NLLs of the document's windows."""


class Ladder(PerplexityProtocol):
    name = "ladder"

    def needed_tokens(self, doc_index: int) -> int:
        return self.settings.longest + self.settings.target_tokens

    def longest_input(self, bos: int | None) -> int:
        # The window ids[C-L : C+W] is fed without its last token (a target, never a context).
        return self.settings.longest + self.settings.target_tokens - 1 + bos_tokens(bos)

    def input_tokens(self, n_doc: int, bos: int | None) -> int:
        s = self.settings
        return sum(length + s.target_tokens - 1 + bos_tokens(bos) for length in s.lengths)

    def check(self, engine: ScoringEngine, bos: int | None, task: str) -> None:
        s, need, extra = self.settings, self.longest_input(bos), bos_tokens(bos)
        if need > engine.max_length >= s.longest + extra:
            # max(lengths) fits, the targets after it do not: name the setting to change.
            raise LengthLimitError(
                f"task {task}: the ladder reads max(lengths) + target_tokens - 1 = {s.longest} + "
                f"{s.target_tokens} - 1 = {need - extra} tokens"
                f"{' plus a BOS' if extra else ''}, but the {engine.name} backend takes at most "
                f"{engine.max_length}; lower target_tokens (at most "
                f"{engine.max_length - s.longest - extra + 1}) or max(lengths), "
                f"or {engine.length_hint} (at least {need})"
            )
        super().check(engine, bos, task)

    def requests(self, doc: Document, ids: np.ndarray, bos: int | None, engine: ScoringEngine) -> DocumentRequests:
        return DocumentRequests(doc, ids, bos, ladder_windows(ids, self.settings, bos, doc.label))

    def records(self, ids: np.ndarray, nlls: Sequence[np.ndarray], bos: int | None, decode: Decode) -> dict:
        return ladder_summarize(ids, nlls, self.settings, bos, decode)


class Truncate(PerplexityProtocol):
    name = "truncate"

    def input_tokens(self, n_doc: int, bos: int | None) -> int:
        return self.settings.longest + bos_tokens(bos)

    def single_pass(self, engine: ScoringEngine) -> bool:
        """One pass for every length: as set, else unless positions depend on the sequence length."""
        single = self.settings.single_pass
        return single if single is not None else not engine.position_dependent

    def check(self, engine: ScoringEngine, bos: int | None, task: str) -> None:
        if self.single_pass(engine) and engine.position_dependent:
            log.warning(
                "single_pass=true on a model whose positions depend on sequence length: "
                "numbers for L < max(lengths) differ from per-length passes"
            )
        super().check(engine, bos, task)

    def requests(self, doc: Document, ids: np.ndarray, bos: int | None, engine: ScoringEngine) -> DocumentRequests:
        windows = truncate_windows(ids, self.settings, bos, doc.label, self.single_pass(engine))
        return DocumentRequests(doc, ids, bos, windows)

    def records(self, ids: np.ndarray, nlls: Sequence[np.ndarray], bos: int | None, decode: Decode) -> dict:
        return truncate_summarize(ids, nlls, self.settings, bos, decode)


class Sliding(PerplexityProtocol):
    name = "sliding"

    def input_tokens(self, n_doc: int, bos: int | None) -> int:
        return len(self.settings.lengths) * (min(n_doc, self.settings.doc_tokens_cap()) + bos_tokens(bos))

    def check(self, engine: ScoringEngine, bos: int | None, task: str) -> None:
        check_sliding(self.settings, bos)
        super().check(engine, bos, task)

    def requests(self, doc: Document, ids: np.ndarray, bos: int | None, engine: ScoringEngine) -> DocumentRequests:
        return DocumentRequests(doc, ids, bos, sliding_windows(ids, self.settings, bos, doc.label))

    def records(self, ids: np.ndarray, nlls: Sequence[np.ndarray], bos: int | None, decode: Decode) -> dict:
        return sliding_summarize(ids, nlls, self.settings, bos, decode)


PROTOCOLS: dict[str, type[PerplexityProtocol]] = {"ladder": Ladder, "truncate": Truncate, "sliding": Sliding}
