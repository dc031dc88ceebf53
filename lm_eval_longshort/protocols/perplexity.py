"""Long-context perplexity protocols: documents (token ids) -> target windows -> per-length sums.

Each protocol is a pair of pure functions over one document:
``windows(ids, s, bos, label)`` lists what to score, and ``summarize(ids, nlls, s, bos, decode)``
reduces the backend's per-token NLLs to one record per context length L:
``{"L", "nll_sum", "n_targets", "n_bytes"}`` (docs/metrics.md, "Long-context perplexity").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lm_eval_longshort.protocols.requests import TargetWindow
from lm_eval_longshort.protocols.settings import PerplexitySettings

Decode = Callable[[np.ndarray], str]


def needed_tokens(s: PerplexitySettings) -> int:
    """Document tokens a protocol needs; shorter documents are skipped for the whole task."""
    if s.protocol == "ladder":
        return s.longest + s.target_tokens
    return s.longest  # truncate and sliding read ids[0:C] at least


def longest_input(s: PerplexitySettings, bos: int | None) -> int:
    """Longest sequence (BOS included) the backend must accept."""
    extra = 1 if bos is not None else 0
    if s.protocol == "ladder":
        # The window ids[C-L : C+W] is fed without its last token (a target, never a context).
        return s.longest + s.target_tokens - 1 + extra
    return s.longest + extra


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
    return {"records": records}


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
    if s.protocol != "sliding" or bos is not None:
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
