"""Divergences against independent numpy formulas, on random and on real distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import numpy_divergences, plain_token_logprobs

from lm_eval_longshort.numerics import divergences as D


def random_logprobs(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=gen) * scale, dim=-1)


def check_against_numpy(logp: torch.Tensor, logq: torch.Tensor, rtol: float) -> None:
    got = D.all_divergences(logp, logq)
    for i in range(logp.shape[0]):
        want = numpy_divergences(logp[i].numpy(), logq[i].numpy())
        for name in D.METRIC_NAMES:
            assert float(got[name][i]) == pytest.approx(want[name], rel=rtol, abs=1e-6), (name, i)
        # The single-metric functions agree with the fused one.
        for name in D.METRIC_NAMES:
            single = getattr(D, name)(logp[i : i + 1], logq[i : i + 1])[0]
            assert float(single) == pytest.approx(float(got[name][i]), rel=1e-5, abs=1e-7)


def test_random_distributions_match_numpy():
    check_against_numpy(random_logprobs(6, 5000, 0), random_logprobs(6, 5000, 1), rtol=1e-4)


def test_close_distributions_match_numpy():
    # Small divergences are where float32 cancellation would show.
    logp = random_logprobs(4, 3000, 2)
    logq = torch.log_softmax(logp + 0.05 * random_logprobs(4, 3000, 3), dim=-1)
    check_against_numpy(logp, logq, rtol=1e-3)


def test_real_model_distributions_match_numpy(smol, plays):
    model, tokenizer = smol
    ids = tokenizer(plays[1]["text"], add_special_tokens=False)["input_ids"][:300]
    long_rows = plain_token_logprobs(model, ids)[-3:]
    short_rows = plain_token_logprobs(model, ids[150:])[-3:]  # same end tokens, half the context
    check_against_numpy(long_rows, short_rows, rtol=1e-4)


def test_nearly_equal_distributions_keep_relative_precision():
    # symkl ~ 1e-6 and js ~ 1e-7: subtracting two O(1) float32 logs per entry would leave
    # nothing of them; the fused form keeps them to ~1e-4 of the float64 value.
    logp = random_logprobs(4, 20000, 6)
    logq = torch.log_softmax(logp + 1e-3 * torch.randn(4, 20000, generator=torch.Generator().manual_seed(7)), dim=-1)
    got = D.all_divergences(logp, logq)
    for i in range(4):
        want = numpy_divergences(logp[i].numpy(), logq[i].numpy())
        assert want["js"] < 1e-6
        for name in ("symkl", "js", "tv", "sce"):
            assert float(got[name][i]) == pytest.approx(want[name], rel=2e-3), (name, i)


def test_rows_with_zero_probabilities_mixed_with_ordinary_rows():
    # Rows needing the 0·log 0 = 0 convention are recomputed term by term; the others are not
    # affected; any leading shape works.
    logp = random_logprobs(6, 500, 8)
    logq = random_logprobs(6, 500, 9)
    logp[1, :100] = -math.inf  # p has no mass there, q has some: KL(q‖p) = inf
    logq[4, 50:60] = -math.inf
    logp[4, 50:60] = -math.inf  # both zero there: the entries drop out
    logp, logq = torch.log_softmax(logp, -1), torch.log_softmax(logq, -1)
    got = D.all_divergences(logp.reshape(2, 3, 500), logq.reshape(2, 3, 500))
    for i in range(6):
        want = numpy_divergences(logp[i].numpy(), logq[i].numpy())
        for name in D.METRIC_NAMES:
            value = float(got[name].reshape(6)[i])
            if math.isinf(want[name]):
                assert value == math.inf, (name, i)
            else:
                assert value == pytest.approx(want[name], rel=1e-4, abs=1e-6), (name, i)
    assert math.isinf(float(got["symkl"].reshape(6)[1])) and math.isfinite(float(got["symkl"].reshape(6)[4]))
    assert D.all_divergences(torch.zeros(0, 7), torch.zeros(0, 7))["js"].shape == (0,)
    single = D.all_divergences(logp[0], logq[0])  # one distribution pair: 0-d results
    assert single["tv"].shape == () and float(single["tv"]) == pytest.approx(float(got["tv"][0, 0]))


def test_identical_inputs_and_identities():
    logp = random_logprobs(5, 2000, 4)
    logq = random_logprobs(5, 2000, 5)
    same = D.all_divergences(logp, logp)
    assert torch.allclose(same["symkl"], torch.zeros(5), atol=1e-6)
    assert torch.allclose(same["js"], torch.zeros(5), atol=1e-6)
    assert torch.allclose(same["tv"], torch.zeros(5), atol=1e-6)
    assert torch.equal(same["top1"], torch.ones(5))
    assert torch.allclose(same["sce"], 2 * D.entropy(logp), rtol=1e-5)

    got = D.all_divergences(logp, logq)
    identity = got["symkl"] + D.entropy(logp) + D.entropy(logq)
    assert torch.allclose(got["sce"], identity, rtol=1e-5)
    for name in D.METRIC_NAMES:
        assert bool((got[name] >= 0).all()), name
    assert bool((got["js"] <= np.log(2) + 1e-6).all())
    assert bool((got["tv"] <= 1 + 1e-6).all())
    # Symmetric metrics are symmetric.
    swapped = D.all_divergences(logq, logp)
    for name in ("sce", "symkl", "js", "tv"):
        assert torch.allclose(got[name], swapped[name], rtol=1e-5)


def test_zero_probability_entries_are_handled():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    logq = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    got = D.all_divergences(logp, logq)
    assert torch.isfinite(got["js"]).all() and torch.isfinite(got["tv"]).all()
    assert float(got["tv"][0]) == pytest.approx(0.5)
    # rel 1e-5: where q >> p, log(2q/(p+q)) = d - w rounds at ulp(d) in float32.
    assert float(got["js"][0]) == pytest.approx(numpy_divergences(logp[0].numpy(), logq[0].numpy())["js"], rel=1e-5)
    # q puts mass where p has none: KL(q‖p) is infinite, and so are symkl and sce.
    assert torch.isinf(got["symkl"]).all() and torch.isinf(got["sce"]).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        D.symkl(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- distribution of misalignment

# docs/metrics.md: 20 log-spaced bins per decade from 1e-8 to 1e2; a percentile reads its bin's
# geometric centre, within a factor 10^(1/40) of the exact (inverted-CDF) percentile.
PERCENTILE_FACTOR = 10 ** (1 / 40)


def test_dp_is_the_next_token_probability_gain():
    logp, logq = random_logprobs(6, 300, 11), random_logprobs(6, 300, 12)
    nexts = torch.tensor([0, 5, 299, 17, 17, 100])
    got = D.position_values(logp, logq, nexts)
    p, q = logp.double().exp().numpy(), logq.double().exp().numpy()
    want = [p[i, int(t)] - q[i, int(t)] for i, t in enumerate(nexts)]
    np.testing.assert_allclose(got["dp"].numpy(), want, rtol=1e-5, atol=1e-8)
    assert "dp" not in D.position_values(logp, logq, None)  # no next tokens: divergences only


def test_histogram_percentiles_match_numpy_within_the_stated_resolution():
    from lm_eval_longshort.numerics import histogram

    rng = np.random.default_rng(3)
    # log-uniform over 1e-9 .. 1e1 (some below the lowest edge), plus exact zeros
    values = np.concatenate([10 ** rng.uniform(-9, 1, 997), np.zeros(3)])
    rng.shuffle(values)
    halves = values[:400], values[400:]
    one_run = histogram.counts(values)
    merged = histogram.merged([histogram.sparse(histogram.counts(h)) for h in halves])
    assert merged.dtype == np.int64 and np.array_equal(merged, one_run) and merged.sum() == 1000
    for q in (0.01, 0.5, 0.9, 0.99, 1.0):
        exact = float(np.quantile(values, q, method="inverted_cdf"))
        got = histogram.quantile(merged, q)
        if exact < 1e-8:
            assert got == 0.0  # the underflow bin (exact zeros among it) reads 0
        else:
            assert exact / PERCENTILE_FACTOR <= got <= exact * PERCENTILE_FACTOR, (q, exact, got)
    assert histogram.quantile(histogram.counts([5e3, 1.0]), 1.0) == 100.0  # overflow reads the top edge
    assert math.isnan(histogram.quantile(histogram.merged([]), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        histogram.counts([1.0, math.nan])
