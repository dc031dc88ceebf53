"""Divergences between next-token distributions given as log-probabilities.

Pure tensor code: no lm-eval, no model. Every function takes two tensors of
log-probabilities over the FULL vocabulary, ``logp`` (long context) and ``logq``
(short context), of shape ``[..., V]``, and reduces over the last axis. Inputs are
promoted to at least float32 so that sums over ~50k-entry vocabularies stay exact
enough (docs/metrics.md: divergences in float32 or wider).

Terms with zero probability contribute zero (the limit of x·log x as x -> 0), so
log-probabilities of -inf (masked vocabulary entries) are handled.
"""

from __future__ import annotations

import math

import torch

METRIC_NAMES = ("sce", "symkl", "js", "top1", "tv")


def _promote(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logp.shape != logq.shape:
        raise ValueError(f"distribution shapes differ: {tuple(logp.shape)} vs {tuple(logq.shape)}")
    dtype = torch.promote_types(torch.promote_types(logp.dtype, logq.dtype), torch.float32)
    return logp.to(dtype), logq.to(dtype)


def _weighted_sum(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Σ_v weight_v · value_v, treating weight_v = 0 terms as 0 even where value is ±inf."""
    return torch.where(weight > 0, weight * value, torch.zeros_like(value)).sum(-1)


def cross_entropy(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """H(p, q) = -Σ_v p_v log q_v."""
    logp, logq = _promote(logp, logq)
    return -_weighted_sum(logp.exp(), logq)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ_v p_v log p_v."""
    return cross_entropy(logp, logp)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v - log q_v)."""
    logp, logq = _promote(logp, logq)
    return _weighted_sum(logp.exp(), logp - logq)


def sce(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy, the paper's misalignment: H(p, q) + H(q, p).

    Equals KL(p‖q) + KL(q‖p) + H(p) + H(q), so it is H(p) + H(q) (not 0) when p = q.
    """
    return cross_entropy(logp, logq) + cross_entropy(logq, logp)


def symkl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Symmetric KL: KL(p‖q) + KL(q‖p) = Σ_v (p_v - q_v)(log p_v - log q_v); 0 iff p = q."""
    return kl(logp, logq) + kl(logq, logp)


def js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence: ½KL(p‖m) + ½KL(q‖m) with m = (p + q) / 2 (in nats, ≤ ln 2)."""
    logp, logq = _promote(logp, logq)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)


def tv(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Total variation distance: ½ Σ_v |p_v - q_v| (in [0, 1])."""
    logp, logq = _promote(logp, logq)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def top1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """1.0 where argmax p = argmax q, else 0.0 (agreement of the greedy next token)."""
    logp, logq = _promote(logp, logq)
    return (logp.argmax(-1) == logq.argmax(-1)).to(logp.dtype)


def all_divergences(logp: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of METRIC_NAMES for each leading index: {name: tensor[...]}."""
    logp, logq = _promote(logp, logq)
    p, q = logp.exp(), logq.exp()
    h_pq = -_weighted_sum(p, logq)
    h_qp = -_weighted_sum(q, logp)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return {
        "sce": h_pq + h_qp,
        "symkl": _weighted_sum(p, logp - logq) + _weighted_sum(q, logq - logp),
        "js": 0.5 * _weighted_sum(p, logp - logm) + 0.5 * _weighted_sum(q, logq - logm),
        "top1": (logp.argmax(-1) == logq.argmax(-1)).to(logp.dtype),
        "tv": 0.5 * (p - q).abs().sum(-1),
    }
