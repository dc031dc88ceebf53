"""ppl@L, bpb@L and the logged NLL sums of every protocol against plain transformers forwards.

Two real documents (the first two plays), two or three lengths, float32: the package's
numbers must match an independent computation to a relative 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from harness_run import evaluate, metric, response
from reference import plain_nll

REL = 1e-4


def doc_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def n_bytes(tokenizer, span: list[int]) -> int:
    return len(tokenizer.decode(span).encode("utf-8"))


def check_task(results, samples, expected: dict[int, list[tuple[float, int, int]]]) -> None:
    """expected[L] = per document (nll_sum, n_targets, n_bytes), in document order."""
    by_doc = sorted(samples, key=lambda s: s["doc_id"])
    for length, per_doc in expected.items():
        for sample, (nll, n, nb) in zip(by_doc, per_doc, strict=True):
            record = next(r for r in response(sample)["records"] if r["L"] == length)
            assert record["nll_sum"] == pytest.approx(nll, rel=REL)
            assert record["n_targets"] == n and record["n_bytes"] == nb
            assert record["doc_index"] == sample["doc_id"]
        total_nll = sum(x[0] for x in per_doc)
        assert metric(results, f"ppl@{length}") == pytest.approx(
            math.exp(total_nll / sum(x[1] for x in per_doc)), rel=REL
        )
        bpb = total_nll / (math.log(2) * sum(x[2] for x in per_doc))
        assert metric(results, f"bpb@{length}") == pytest.approx(bpb, rel=REL)
    assert metric(results, "skipped_docs") == 0
    assert metric(results, "ppl@max") == metric(results, f"ppl@{max(expected)}")


def test_ladder_matches_plain_forward(hflm, smol, plays):
    model, tok = smol
    lengths, w = [64, 192, 512], 64
    results, samples = evaluate(
        hflm, "longshort_ppl_shakespeare", {"protocol": "ladder", "lengths": lengths, "target_tokens": w}
    )
    c = max(lengths)
    expected, key_stats = {n: [] for n in lengths}, []
    for play in plays[:2]:
        ids = doc_ids(tok, play["text"])
        nll_by_length = {}
        for n in lengths:
            # The model reads ids[C-L : C+W-1]; the window below adds the last target token.
            nll = plain_nll(model, ids[c - n : c + w], first_scored=n)
            nll_by_length[n] = nll
            expected[n].append((float(nll.sum()), w, n_bytes(tok, ids[c : c + w])))
        long, short = nll_by_length[c].numpy(), nll_by_length[min(lengths)].numpy()
        key = (short - long > 2.0) & (-long > -2.0)
        key_stats.append((float(long[key].sum()), int(key.sum())))
    check_task(results, samples, expected)
    n_key = sum(k[1] for k in key_stats)
    assert metric(results, "key_frac") == pytest.approx(n_key / (2 * w))
    if n_key:
        assert metric(results, "keyppl") == pytest.approx(math.exp(sum(k[0] for k in key_stats) / n_key), rel=REL)
    else:
        assert math.isnan(metric(results, "keyppl"))


def test_truncate_matches_plain_forward_and_single_pass(hflm, smol, plays):
    model, tok = smol
    lengths = [96, 384]
    results, samples = evaluate(hflm, "longshort_ppl_shakespeare", {"protocol": "truncate", "lengths": lengths})
    expected = {n: [] for n in lengths}
    for play in plays[:2]:
        ids = doc_ids(tok, play["text"])
        for n in lengths:  # a separate plain pass per length (the YaRN / LongRoPE convention)
            nll = plain_nll(model, ids[:n], first_scored=1)
            expected[n].append((float(nll.sum()), n - 1, n_bytes(tok, ids[1:n])))
    check_task(results, samples, expected)
    check_positions(results, samples, [doc_ids(tok, p["text"]) for p in plays[:2]], model, lengths, 4, bos=None)

    # Forcing per-length passes gives the same numbers as the default single pass.
    per_length, _ = evaluate(
        hflm, "longshort_ppl_shakespeare", {"protocol": "truncate", "lengths": lengths, "single_pass": False}
    )
    for n in lengths:
        for name in ("ppl", "ppl_pos"):
            assert metric(per_length, f"{name}@{n}") == pytest.approx(metric(results, f"{name}@{n}"), rel=1e-5)


def reference_edges(lengths: list[int], per_doubling: int) -> list[int]:
    """docs/metrics.md's bins: 0, every rounded 2^(j/k) below C, and every length (C last)."""
    c = max(lengths)
    powers = [int(2 ** (j / per_doubling) + 0.5) for j in range(per_doubling * c.bit_length() + 1)]
    return sorted({0, *lengths} | {p for p in powers if p < c})


def check_positions(results, samples, docs_ids, model, lengths, per_doubling, bos) -> None:
    """The loss-against-position bins and ppl_pos@L against one plain forward over ids[0:C] per
    document (BOS prepended when given: then ids[0] is a target too); ppl@L against the bins' pool."""
    c, edges = max(lengths), reference_edges(lengths, per_doubling)
    expected_bins = np.zeros((len(edges) - 1, 2))  # pooled (NLL sum, targets) per bin, from the reference
    logged_bins = np.zeros((len(edges) - 1, 2))  # the same, from the package's logged bins
    for sample, ids in zip(sorted(samples, key=lambda s: s["doc_id"]), docs_ids, strict=True):
        window = ([bos] if bos is not None else []) + ids[:c]
        nll = plain_nll(model, window, first_scored=1).numpy()  # the NLL of ids[t] for every scorable t
        positions = np.arange(c - len(nll), c)  # t: the target's index in the document
        inside = [(positions >= lo) & (positions < hi) for lo, hi in zip(edges, edges[1:])]
        expected = np.array([(nll[m].sum(), m.sum()) for m in inside])
        got = response(sample)["positions"]
        assert got["edges"] == edges
        assert got["n_targets"] == expected[:, 1].astype(int).tolist()
        assert got["nll_sum"] == pytest.approx(expected[:, 0].tolist(), rel=REL, abs=1e-6)
        expected_bins += expected
        logged_bins += np.array([got["nll_sum"], got["n_targets"]]).T
    lows, highs, previous = np.array(edges[:-1]), np.array(edges[1:]), 0
    for n in lengths:
        new = (lows >= previous) & (highs <= n)  # positions previous .. n-1
        pooled = math.exp(expected_bins[new, 0].sum() / expected_bins[new, 1].sum())
        assert metric(results, f"ppl_pos@{n}") == pytest.approx(pooled, rel=REL)
        upto = highs <= n  # the cumulative ppl@L is the token-weighted pool of the bins up to L
        pooled = math.exp(logged_bins[upto, 0].sum() / logged_bins[upto, 1].sum())
        assert metric(results, f"ppl@{n}") == pytest.approx(pooled, rel=1e-9)
        previous = n


def test_truncate_positions_with_bos(hflm, smol, plays):
    """With a BOS, ids[0] is a target (predicted from the BOS alone): the first bin holds it."""
    model, tok = smol
    lengths = [64, 128]
    meta = {"protocol": "truncate", "lengths": lengths, "add_bos": True, "bins_per_doubling": 2}
    results, samples = evaluate(hflm, "longshort_ppl_shakespeare", meta, limit=1)
    check_positions(results, samples, [doc_ids(tok, plays[0]["text"])], model, lengths, 2, bos=tok.bos_token_id)


def independent_sliding(model, ids: list[int], window: int, stride: int) -> np.ndarray:
    """The HF "perplexity of fixed-length models" loop, written out here: each token scored once."""
    nlls, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end]
        new = end - prev_end  # tokens no earlier window scored
        first = max(len(chunk) - new, 1)
        nlls.append(plain_nll(model, chunk, first_scored=first).numpy())
        prev_end = end
        if end == len(ids):
            break
    return np.concatenate(nlls)


def test_sliding_matches_plain_forward(hflm, smol, plays):
    model, tok = smol
    lengths, doc_cap = [64, 128], 300
    results, samples = evaluate(
        hflm, "longshort_ppl_shakespeare", {"protocol": "sliding", "lengths": lengths, "max_doc_tokens": doc_cap}
    )
    expected = {n: [] for n in lengths}
    for play in plays[:2]:
        ids = doc_ids(tok, play["text"])[:doc_cap]
        for n in lengths:
            nll = independent_sliding(model, ids, n, n // 2)
            assert nll.size == doc_cap - 1  # every token but the first, exactly once
            expected[n].append((float(nll.sum()), nll.size, n_bytes(tok, ids[1:])))
    check_task(results, samples, expected)
