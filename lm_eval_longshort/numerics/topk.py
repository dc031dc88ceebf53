"""Divergences from top-K lists only: a coarse-grained lower bound plus an error bound.

When a backend returns, per position, only the K most likely ids of p and of q (with their
exact log-probabilities), the full-vocabulary divergences cannot be computed. What can be
computed exactly is the divergence between COARSE-GRAINED distributions over the partition

    {each id in BOTH top-K lists}  ∪  {one bucket "rest" holding every other id},

with bucket masses p_rest = 1 - Σ_common p_v and q_rest = 1 - Σ_common q_v.

Why this is a lower bound: merging vocabulary entries is a deterministic Markov map, so by the
data-processing inequality KL(P‖Q) ≤ KL(p‖q) (both directions, hence symkl), JS(P,Q) ≤ JS(p,q)
and TV(P,Q) ≤ TV(p,q). Entropy also drops under merging (H(p) = H(P) + Σ_i P_i H(p | cell i)),
so each cross-entropy H(P,Q) = H(P) + KL(P‖Q) ≤ H(p,q), and sce is a lower bound too.

How far below (the ``*_err_bound`` arrays; only the bucket can hide divergence, since every
common id is its own cell):
- tv: exact - coarse = ½(Σ_rest |p_v - q_v| - |p_rest - q_rest|)
      ≤ ½(p_rest + q_rest - |p_rest - q_rest|) = min(p_rest, q_rest).
- js: JS = Σ_v f(p_v, q_v) with f(a, b) = ½a·ln(2a/(a+b)) + ½b·ln(2b/(a+b)), and
      0 ≤ f(a, b) ≤ (ln 2 / 2)(a + b). So exact - coarse = Σ_rest f(p_v, q_v) - f(p_rest, q_rest)
      ≤ (ln 2 / 2)(p_rest + q_rest) - f(p_rest, q_rest)   (≤ (ln 2 / 2)(p_rest + q_rest)).
- symkl, sce: no finite bound: an id outside q's top-K may have any q_v ≤ the K-th largest,
  down to 0, so KL(p‖q) is unbounded from this information.
- top1: exact (up to exact ties): each list holds its own argmax, whatever the overlap.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lm_eval_longshort.numerics.divergences import all_divergences

LN2_HALF = math.log(2.0) / 2.0
REST_FLOOR = 1e-12


def _xlogy_half(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """½a·ln(2a/(a+b)), 0 where a = 0."""
    safe = torch.where(a > 0, a, torch.ones_like(a))
    value = 0.5 * safe * torch.log(2.0 * safe / (safe + b))
    return torch.where(a > 0, value, torch.zeros_like(a))


def js_term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """f(a, b): one cell's contribution to the Jensen-Shannon divergence."""
    return _xlogy_half(a, b) + _xlogy_half(b, a)


def _align(ids_p: torch.Tensor, ids_q: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of p's ids: is it also in q's list, and q's log-prob there (-inf if not). [P, K] each."""
    order = ids_q.argsort(dim=1)
    sorted_ids = ids_q.gather(1, order)
    where = torch.searchsorted(sorted_ids, ids_p).clamp(max=ids_q.shape[1] - 1)
    common = sorted_ids.gather(1, where) == ids_p
    q_on_p = torch.where(common, logq.gather(1, order).gather(1, where), torch.full_like(logq, -math.inf))
    return common, q_on_p


def coarse_topk_divergences(ids_p, logp, ids_q, logq) -> dict[str, np.ndarray]:
    """Lower bounds of every METRIC_NAMES divergence from top-K lists, plus error bounds.

    ``ids_*``: [P, K] int ids, ``log*``: [P, K] their log-probabilities (p: long context,
    q: short context), one row per compared position. Returns float64 [P] arrays:
    sce, symkl, js, tv (coarse-grained lower bounds), top1 (exact), tv_err_bound,
    js_err_bound (exact - coarse ≤ bound).
    """
    ids_p, ids_q = torch.as_tensor(ids_p, dtype=torch.int64), torch.as_tensor(ids_q, dtype=torch.int64)
    logp, logq = torch.as_tensor(logp, dtype=torch.float64), torch.as_tensor(logq, dtype=torch.float64)
    if not ids_p.shape == logp.shape == ids_q.shape == logq.shape or ids_p.dim() != 2:
        raise ValueError(
            f"top-K shapes differ: ids_p {tuple(ids_p.shape)}, logp {tuple(logp.shape)}, "
            f"ids_q {tuple(ids_q.shape)}, logq {tuple(logq.shape)}; expected [positions, K] each"
        )
    common, q_on_p = _align(ids_p, ids_q, logq)
    minus_inf = torch.full_like(logp, -math.inf)
    p_common = torch.where(common, logp, minus_inf)
    # Rounding (float32 log-softmax upstream) can push 1 - Σ to 0 or below although every id
    # outside the lists has p_v > 0: a floor keeps a 0-vs-rounding-noise bucket from making
    # KL infinite. The floor itself moves a metric by ~1e-10; float32 noise in a rest mass
    # (~1e-6) moves symkl by ~1e-5.
    p_rest = (1.0 - p_common.exp().sum(1)).clamp(min=REST_FLOOR)
    q_rest = (1.0 - q_on_p.exp().sum(1)).clamp(min=REST_FLOOR)
    coarse_p = torch.cat([p_common, p_rest.log()[:, None]], dim=1)
    coarse_q = torch.cat([q_on_p, q_rest.log()[:, None]], dim=1)
    values = all_divergences(coarse_p, coarse_q)
    top_p = ids_p.gather(1, logp.argmax(1, keepdim=True))[:, 0]
    top_q = ids_q.gather(1, logq.argmax(1, keepdim=True))[:, 0]
    values["top1"] = (top_p == top_q).double()
    values["tv_err_bound"] = torch.minimum(p_rest, q_rest)
    values["js_err_bound"] = (LN2_HALF * (p_rest + q_rest) - js_term(p_rest, q_rest)).clamp(min=0.0)
    return {name: value.double().numpy() for name, value in values.items()}
