"""Scoring with a vLLM engine (what ``--model vllm`` loads): ``from_lm_eval`` picks the route.

Two routes, picked from how lm-eval's ``VLLM`` started the engine:

- hidden states (``vllm_hidden.VLLMHiddenStateEngine``, engine args ``runner=pooling,
  convert=embed, pooler_config={"task": "token_embed"}``): the final hidden state of every prompt
  position, the checkpoint's LM head applied here in float32. Exact for every metric.
- prompt log-probabilities (``vllm_logprobs.VLLMEngine``, any other engine): dense misalignment
  is approximated from top-K lists (reported as ``approximate``).

``vllm_common`` holds what both share (the engine base, prompts, chunks). These four modules are
the only ones that import vllm; this one is the entry the harness imports.
"""

from __future__ import annotations

import logging

from lm_eval_longshort.backends.vllm_common import VLLMBase
from lm_eval_longshort.backends.vllm_hidden import POOLING_EXAMPLE, VLLMHiddenStateEngine
from lm_eval_longshort.backends.vllm_logprobs import VLLMEngine

__all__ = ["VLLMEngine", "VLLMHiddenStateEngine", "from_lm_eval"]

log = logging.getLogger(__name__)
_route_hint_logged = False


def from_lm_eval(lm, **kwargs) -> VLLMBase:
    """Wrap lm-eval's VLLM (``--model vllm``): its ``vllm.LLM`` and HF tokenizer.

    A pooling engine (``runner=pooling``) gets the hidden-state route, any other the
    prompt log-probability route.
    """
    dp = int(getattr(lm, "data_parallel_size", 1) or 1)
    llm = getattr(lm, "model", None)
    if dp > 1 or llm is None:
        raise ValueError(
            f"longshort tasks need data_parallel_size=1 with --model vllm (got data_parallel_size={dp}): "
            "with data parallelism lm-eval runs vLLM inside Ray workers and keeps no engine in this "
            "process to ask for log-probabilities or hidden states. Use tensor_parallel_size=N to "
            "spread one model over N GPUs, or run one lm_eval process per GPU (CUDA_VISIBLE_DEVICES), "
            "each on a shard of the documents (--limit / --samples)"
        )
    if str(getattr(llm.llm_engine.model_config, "runner_type", "generate")) == "pooling":
        return VLLMHiddenStateEngine(llm, lm.tokenizer, **kwargs)
    _log_route_hint()
    return VLLMEngine(llm, lm.tokenizer, **kwargs)


def _log_route_hint() -> None:
    """Say once per process that the hidden-state route is faster and exact."""
    global _route_hint_logged
    if not _route_hint_logged:
        _route_hint_logged = True
        log.warning(
            "vllm backend: scoring through prompt log-probabilities (dense misalignment approximated from "
            "top-K lists). The hidden-state route is exact for every metric and faster: start the engine "
            "as a pooling model, %s",
            POOLING_EXAMPLE,
        )
