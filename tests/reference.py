"""Independent reference computations for the tests: plain transformers forwards, numpy loops.

Written without the package's code paths (no engine, no protocol functions), so a test
comparing against these can fail when the package is wrong.
"""

from __future__ import annotations

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
