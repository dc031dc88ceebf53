"""Independent reference computations for the tests: plain transformers forwards, numpy formulas,
the draw and position rules of docs/metrics.md restated.

Written without the package's code paths (nothing here imports lm_eval_longshort), so a test
comparing against these can fail when the package is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def plain_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Independent reference: one plain transformers forward, float32 log-softmax of every position.

    Row i is the distribution of the token after ids[: i + 1]. [len(ids), V]
    """
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def plain_nll(model, window: list[int], first_scored: int) -> torch.Tensor:
    """-log p(window[j] | window[:j]) for j >= first_scored, from one plain forward over the
    whole window (for length-dependent RoPE this is "the model reads the window"). float64 [n]"""
    logp = plain_token_logprobs(model, window)
    targets = torch.tensor(window[first_scored:])
    return -logp[first_scored - 1 : len(window) - 1].gather(1, targets[:, None])[:, 0].double()


# --------------------------------------------------------------------------- divergences


def numpy_divergences(logp: np.ndarray, logq: np.ndarray) -> dict[str, float]:
    """Textbook definitions in float64, one distribution pair (1-D arrays)."""
    p, q = np.exp(logp.astype(np.float64)), np.exp(logq.astype(np.float64))
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        keep = a > 0
        return float(np.sum(a[keep] * (np.log(a[keep]) - np.log(b[keep]))))

    def ce(a, b):
        keep = a > 0
        return float(-np.sum(a[keep] * np.log(b[keep])))

    return {
        "sce": ce(p, q) + ce(q, p),
        "symkl": kl(p, q) + kl(q, p),
        "js": 0.5 * kl(p, m) + 0.5 * kl(q, m),
        "tv": 0.5 * float(np.abs(p - q).sum()),
        "top1": float(np.argmax(p) == np.argmax(q)),
        "H_p": ce(p, p),
        "H_q": ce(q, q),
    }


# --------------------------------------------------------------------------- misalignment draws (docs/metrics.md)


def spec_rng(seed: int, doc_index: int, length: int) -> np.random.Generator:
    """docs/metrics.md: numpy.random.default_rng([seed, doc_index, L])."""
    return np.random.default_rng([seed, doc_index, length])


def last_short_lengths(seed: int, doc_index: int, length: int, pairs: int, min_ratio: float) -> np.ndarray:
    """`last` mode: ``pairs`` distinct short lengths l in [ceil(min_ratio * L), L - 1], in draw order."""
    low = math.ceil(min_ratio * length)
    return spec_rng(seed, doc_index, length).choice(np.arange(low, length), size=pairs, replace=False)


def dense_max_gap(length: int, min_ratio: float) -> int:
    """`dense` mode: the largest gap e, min(L // 2, L - ceil(min_ratio * L))."""
    return min(length // 2, length - math.ceil(min_ratio * length))


def dense_gap(seed: int, doc_index: int, length: int, min_ratio: float) -> int:
    """`dense` mode: the gap e drawn uniformly from [1, dense_max_gap]; window B = ids[e : e + L]."""
    return int(spec_rng(seed, doc_index, length).integers(1, dense_max_gap(length, min_ratio) + 1))


def dense_positions(length: int, gap: int, min_ratio: float) -> list[int]:
    """`dense` mode: the positions t of window A compared with position t - gap of B: both windows
    reach t (t >= gap) and B's context there, t + 1 - gap tokens, is at least ceil(min_ratio * L)."""
    low = math.ceil(min_ratio * length)
    return [t for t in range(length) if t >= gap and t + 1 - gap >= low]


# --------------------------------------------------------------------------- standard errors


def delta_terms(a, b) -> tuple[float, np.ndarray]:
    """R = Σa/Σb over documents and u_d = (a_d - R b_d)/mean(b), straight from the formula."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ratio = a.sum() / b.sum()
    return ratio, (a - ratio * b) / b.mean()


def terms_se(u: np.ndarray) -> float:
    """sqrt(Σu² / (n(n-1))): the delta-method standard error of R from its terms ``u`` (of a
    paired difference from the difference of two runs' terms)."""
    return math.sqrt((u**2).sum() / (len(u) * (len(u) - 1)))


def ratio_se(a, b) -> float:
    """The delta-method standard error of Σa/Σb over documents."""
    return terms_se(delta_terms(a, b)[1])


def weight_files_sha256(folder) -> str:
    """The resume key's weight digest of a checkpoint folder, restated: SHA-256 of the JSON list of
    [file name, SHA-256 of its bytes] over the folder's *.safetensors files, sorted by name."""
    import hashlib
    import json
    from pathlib import Path

    files = sorted(Path(folder).glob("*.safetensors"))
    listing = [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
