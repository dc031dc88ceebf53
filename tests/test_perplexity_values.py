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

    # Forcing per-length passes gives the same numbers as the default single pass.
    per_length, _ = evaluate(
        hflm, "longshort_ppl_shakespeare", {"protocol": "truncate", "lengths": lengths, "single_pass": False}
    )
    for n in lengths:
        assert metric(per_length, f"ppl@{n}") == pytest.approx(metric(results, f"ppl@{n}"), rel=1e-5)


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
