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

from lm_eval_longshort.numerics import catalogue

# The divergences the catalogue lists (kind misalign), in its order; each has a kernel below.
METRIC_NAMES = catalogue.divergences()


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


# name -> kernel: the function of the metric's name. A divergence added to the catalogue at run
# time (a plugin, a test) registers its kernel here before anything is scored.
METRICS = {name: globals()[name] for name in METRIC_NAMES if callable(globals().get(name))}


def all_divergences(logp: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every divergence of the catalogue for each leading index: {name: tensor[...]}.

    Fused for speed (dense misalignment evaluates this at every compared position of a 49k
    vocabulary): a few elementwise passes shared by all metrics (``_fused``), on CPU a few
    rows at a time so the temporaries stay in cache. Rows where that shortcut meets 0·∞
    (an entry with zero probability, log-prob -inf) come out NaN and are recomputed with the
    term-by-term definitions of the single-metric functions.
    """
    logp, logq = _promote(logp, logq)
    shape = logp.shape[:-1]
    flat_p, flat_q = logp.reshape(-1, logp.shape[-1]), logq.reshape(-1, logq.shape[-1])  # [n, V]
    names = catalogue.divergences()
    missing = [name for name in names if name not in METRICS]
    if missing:
        raise KeyError(f"no kernel for the catalogue's divergence(s) {missing}: add them to divergences.METRICS")
    rows = flat_p.shape[0] if flat_p.is_cuda else CPU_BLOCK_ROWS
    blocks = [_with_others(_fused(a, b), a, b, names) for a, b in zip(flat_p.split(rows), flat_q.split(rows))]
    if not blocks:
        return {name: flat_p.new_zeros(shape) for name in names}
    values = {name: torch.cat([block[name] for block in blocks]) for name in names}  # [n] each
    redo = torch.isnan(torch.stack(list(values.values()))).any(0)
    if bool(redo.any()):
        for name in names:
            values[name][redo] = METRICS[name](flat_p[redo], flat_q[redo])
    return {name: value.reshape(shape) for name, value in values.items()}


def dp(logp_next: torch.Tensor, logq_next: torch.Tensor) -> torch.Tensor:
    """p(next) - q(next) from the actual next token's log-probabilities under the long and the
    short context: how much the long context raises it (positive where long context helps)."""
    return logp_next.exp() - logq_next.exp()


def next_token_values(logp_next: torch.Tensor, logq_next: torch.Tensor) -> dict[str, torch.Tensor]:
    """The catalogue's next-token metrics (``dp``), each a function of the same name of the next
    token's two log-probabilities (the vLLM top-K route reads those without full distributions)."""
    logp_next, logq_next = _promote(logp_next, logq_next)
    return {name: globals()[name](logp_next, logq_next) for name in catalogue.next_token_metrics()}


def position_values(logp: torch.Tensor, logq: torch.Tensor, next_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What dense misalignment keeps per compared position: every divergence (``all_divergences``)
    and, when the next tokens ``next_ids`` [...] are known, the next-token metrics."""
    values = all_divergences(logp, logq)
    if next_ids is None:
        return values
    index = next_ids.to(device=logp.device, dtype=torch.long)[..., None]
    return values | next_token_values(logp.gather(-1, index)[..., 0], logq.gather(-1, index)[..., 0])


def _with_others(fused: dict, logp: torch.Tensor, logq: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """``fused`` plus, from its own kernel, every catalogue divergence the fused pass does not compute."""
    return fused | {name: METRICS[name](logp, logq) for name in names if name not in fused}


# Rows per CPU block: ~5 float32 temporaries of 4 rows x 49k entries stay within L2.
CPU_BLOCK_ROWS = 4


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v·b_v over the last axis."""
    return torch.linalg.vecdot(a, b)


def _fused(logp: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    """All metrics of [n, V] rows from shared passes: exact algebra, no 0·∞ guard.

    With d = log q - log p and w = log((p + q) / 2p) = log1p(expm1(d) / 2):
      sce = -Σ p log q - Σ q log p;   symkl = -Σ (p - q)·d;   tv = ½ Σ |p - q|;
      js = ½ Σ p·(-w) + ½ Σ q·(d - w)          (log(2q / (p + q)) = d - w).
    Nothing subtracts two large logs: d is a difference of nearby float32 numbers (exact when p
    and q are within a factor 2) and w comes from expm1/log1p, so small divergences keep their
    relative precision.
    """
    p, q = logp.exp(), logq.exp()  # [n, V]
    d = logq - logp
    sce = -(_dot(p, logq) + _dot(q, logp))
    scratch = p - q
    symkl = -_dot(scratch, d)
    tv = 0.5 * scratch.abs_().sum(-1)
    # js only from here. Clamping d at 30 changes p·w by < e^-30·q·d (negligible) and keeps the
    # rounding of d - w (where q >> p) at ulp(30) ~ 2e-6 absolute per unit of q.
    d.clamp_(max=30.0)
    w = torch.expm1(d, out=scratch).mul_(0.5).log1p_()
    js = 0.5 * (_dot(q, d) - _dot(p, w) - _dot(q, w))
    top1 = (logp.argmax(-1) == logq.argmax(-1)).to(logp.dtype)
    return dict(sce=sce, symkl=symkl, js=js, top1=top1, tv=tv)
