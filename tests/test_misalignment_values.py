"""Misalignment metrics (last and dense) against plain transformers forwards and numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness_run import evaluate, metric, response
from reference import dense_gap, dense_positions, last_short_lengths, numpy_divergences, plain_token_logprobs

NAMES = ("sce", "symkl", "js", "top1", "tv")
SEED = 1234


def test_last_mode_matches_plain_forward(hflm, smol, plays):
    model, tok = smol
    lengths, pairs, ratio = [64, 256], 3, 0.5
    results, samples = evaluate(
        hflm, "longshort_misalign_shakespeare", {"mode": "last", "lengths": lengths, "pairs": pairs, "min_ratio": ratio}
    )
    end = max(lengths)
    expected = {n: [] for n in lengths}
    logged = sorted((p for s in samples for p in response(s)["pairs"]), key=lambda p: (p["doc_index"], p["long_len"]))
    for doc_index, play in enumerate(plays[:2]):
        ids = tok(play["text"], add_special_tokens=False)["input_ids"]
        for n in lengths:
            # The draw rule of docs/metrics.md, re-stated in reference.py: distinct l in [ceil(ratio*L), L-1].
            shorts = last_short_lengths(SEED, doc_index, n, pairs, ratio)
            p_long = plain_token_logprobs(model, ids[end - n : end])[-1].numpy()
            for short in shorts:
                q_short = plain_token_logprobs(model, ids[end - int(short) : end])[-1].numpy()
                expected[n].append((doc_index, int(short), numpy_divergences(p_long, q_short)))
    for n in lengths:
        got = [p for p in logged if p["long_len"] == n]
        assert [(p["doc_index"], p["short_len"]) for p in got] == [(d, s) for d, s, _ in expected[n]]
        for pair, (_, _, want) in zip(got, expected[n], strict=True):
            assert pair["end"] == end
            for name in NAMES:
                assert pair[name] == pytest.approx(want[name], rel=1e-3, abs=1e-6), name
        for name in NAMES:
            mean = np.mean([want[name] for _, _, want in expected[n]])
            assert metric(results, f"{name}@{n}") == pytest.approx(mean, rel=1e-3, abs=1e-6), name
    # Same seed, same numbers, run after run.
    again, _ = evaluate(
        hflm, "longshort_misalign_shakespeare", {"mode": "last", "lengths": lengths, "pairs": pairs, "min_ratio": ratio}
    )
    assert {k: v for k, v in again.items() if "@" in k} == {k: v for k, v in results.items() if "@" in k}


# docs/metrics.md, "The distribution of misalignment": 20 log-spaced bins per decade, a percentile
# read at its bin's geometric centre, so within a factor 10^(1/40) of the exact value.
PERCENTILE_FACTOR = 10 ** (1 / 40)


def test_dense_mode_matches_plain_forward(hflm, smol, plays):
    model, tok = smol
    lengths, ratio = [64, 160], 0.5
    results, samples = evaluate(
        hflm, "longshort_misalign_shakespeare", {"mode": "dense", "lengths": lengths, "min_ratio": ratio}
    )
    groups = {(g["doc_index"], g["L"]): g for s in samples for g in response(s)["groups"]}
    for n in lengths:
        sums, count, symkl, gains = dict.fromkeys(NAMES, 0.0), 0, [], []
        for doc_index, play in enumerate(plays[:2]):
            ids = tok(play["text"], add_special_tokens=False)["input_ids"]
            gap = dense_gap(SEED, doc_index, n, ratio)  # in [1, n // 2] at ratio 0.5
            a = plain_token_logprobs(model, ids[0:n])  # row t: after ids[t], context t + 1
            b = plain_token_logprobs(model, ids[gap : gap + n])  # row t - gap: after ids[t], context t + 1 - gap
            doc_sums, doc_count, doc_symkl = dict.fromkeys(NAMES, 0.0), 0, []
            for t in dense_positions(n, gap, ratio):
                want = numpy_divergences(a[t].numpy(), b[t - gap].numpy())
                for name in NAMES:
                    doc_sums[name] += want[name]
                doc_count += 1
                doc_symkl.append(want["symkl"])
                # dp: the probability of the token that actually follows, ids[t + 1], long minus short
                gains.append(float(a[t, ids[t + 1]].double().exp() - b[t - gap, ids[t + 1]].double().exp()))
            group = groups[(doc_index, n)]
            assert group["b_start"] == gap and group["n_positions"] == doc_count
            for name in NAMES:
                assert group[f"{name}_sum"] == pytest.approx(doc_sums[name], rel=1e-3, abs=1e-5), name
                sums[name] += doc_sums[name]
            assert group["symkl_max"] == pytest.approx(max(doc_symkl), rel=1e-4)  # exact, not a bin edge
            assert sum(c for _, c in group["symkl_hist"]) == doc_count
            count += doc_count
            symkl += doc_symkl
        for name in NAMES:
            assert metric(results, f"{name}@{n}") == pytest.approx(sums[name] / count, rel=1e-3, abs=1e-6), name
        assert metric(results, f"dp@{n}") == pytest.approx(np.mean(gains), rel=1e-3, abs=1e-6)
        assert metric(results, f"symkl_max@{n}") == max(groups[(d, n)]["symkl_max"] for d in (0, 1))
        assert metric(results, f"symkl_max@{n}") == pytest.approx(max(symkl), rel=1e-4)
        for q in (50, 90, 99):  # pooled over both documents, within the stated resolution
            exact = float(np.quantile(symkl, q / 100, method="inverted_cdf"))
            reported = metric(results, f"symkl_p{q}@{n}")
            assert exact / (PERCENTILE_FACTOR * 1.002) <= reported <= exact * PERCENTILE_FACTOR * 1.002, (q, exact)


def test_identical_short_input_gives_zero_divergence(smol, plays):
    """Invariant on the engine: comparing an input with itself gives symkl = js = tv = 0, top1 = 1."""
    from lm_eval_longshort.backends.hf import HFEngine
    from lm_eval_longshort.numerics.divergences import all_divergences
    from lm_eval_longshort.protocols.requests import Prompt

    model, tok = smol
    ids = np.asarray(tok(plays[0]["text"], add_special_tokens=False)["input_ids"][:100])
    engine = HFEngine(model, tok, 1024, progress=False)
    rows = engine.last_logprobs([Prompt(ids, None, "a"), Prompt(ids, None, "b")])
    values = all_divergences(rows[0:1], rows[1:2])
    assert float(values["symkl"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(values["tv"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(values["top1"][0]) == 1.0
    reference = plain_token_logprobs(model, ids.tolist())[-1]
    assert torch.allclose(rows[0], reference, atol=1e-4)
