"""The top-K coarse-grained divergences (vllm dense mode) on synthetic distributions: lower bounds,
valid error bounds, exact top1, and exact values when the lists hold the whole vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_eval_longshort.numerics.divergences import all_divergences
from lm_eval_longshort.numerics.topk import coarse_topk_divergences


def distributions(positions=400, vocab=300, spread=3.0, noise=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(positions, vocab, generator=gen, dtype=torch.float64) * spread, -1)
    logq = torch.log_softmax(logp + noise * torch.randn(positions, vocab, generator=gen, dtype=torch.float64), -1)
    return logp, logq


@pytest.mark.parametrize(("k", "noise"), [(1, 1.0), (10, 1.0), (40, 0.3), (40, 3.0)])
def test_lower_bounds_and_error_bounds(k, noise):
    logp, logq = distributions(noise=noise)
    exact = {name: value.numpy() for name, value in all_divergences(logp, logq).items()}
    (lp, ip), (lq, iq) = logp.topk(k, -1), logq.topk(k, -1)
    approx = coarse_topk_divergences(ip, lp, iq, lq)
    for name in ("sce", "symkl", "js", "tv"):
        assert np.all(approx[name] <= exact[name] + 1e-12), name
        assert np.all(approx[name] >= -1e-12), name
    for name in ("tv", "js"):
        assert np.all(exact[name] <= approx[name] + approx[f"{name}_err_bound"] + 1e-12), name
    assert np.all(approx["js_err_bound"] <= np.log(2) + 1e-12)  # <= (ln 2 / 2)(p_rest + q_rest) <= ln 2
    np.testing.assert_array_equal(approx["top1"], exact["top1"])


def test_full_lists_are_exact():
    logp, logq = distributions(positions=50, vocab=64)
    exact = all_divergences(logp, logq)
    (lp, ip), (lq, iq) = logp.topk(64, -1), logq.topk(64, -1)
    approx = coarse_topk_divergences(ip, lp, iq, lq)
    for name, value in exact.items():
        np.testing.assert_allclose(approx[name], value.numpy(), rtol=1e-9, atol=1e-9, err_msg=name)
    assert approx["tv_err_bound"].max() < 1e-9 and approx["js_err_bound"].max() < 1e-9


def test_disjoint_lists_put_everything_in_the_bucket():
    """No common id: P = Q = (bucket 1.0), every divergence 0, the bounds carry it all."""
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[0.0, 0.0, 0.4, 0.6]], dtype=torch.float64))
    approx = coarse_topk_divergences(torch.tensor([[0, 1]]), logp[:, :2], torch.tensor([[3, 2]]), logq[:, [3, 2]])
    for name in ("sce", "symkl", "js", "tv"):
        assert approx[name][0] == pytest.approx(0.0, abs=1e-9), name
    assert approx["top1"][0] == 0.0
    assert approx["tv_err_bound"][0] == pytest.approx(1.0)  # min(p_rest, q_rest) = min(1, 1)
    assert approx["js_err_bound"][0] == pytest.approx(np.log(2))
    exact = all_divergences(logp, logq)
    assert float(exact["tv"][0]) <= 1.0 and float(exact["js"][0]) <= np.log(2) + 1e-12


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"top-K shapes differ.*expected \[positions, K\]"):
        coarse_topk_divergences(
            torch.zeros(3, 4, dtype=torch.long),
            torch.zeros(3, 4),
            torch.zeros(3, 5, dtype=torch.long),
            torch.zeros(3, 5),
        )
