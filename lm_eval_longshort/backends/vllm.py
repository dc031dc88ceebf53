"""Scoring with a vLLM engine (what ``--model vllm`` loads): ``from_lm_eval`` picks the route.

Two routes, picked from how lm-eval's ``VLLM`` started the engine:

- hidden states (``vllm_hidden.VLLMHiddenStateEngine``, engine args ``runner=pooling,
  convert=embed, pooler_config={"task": "token_embed"}``): the final hidden state of every prompt
  position, the checkpoint's LM head applied here in float32. Exact for every metric.
- prompt log-probabilities (``vllm_logprobs.VLLMEngine``, any other engine): dense misalignment
  is approximated from top-K lists (reported as ``approximate``).

``vllm_common`` holds what both share (the engine base, prompts, chunks); ``vllm_parallel`` runs
``data_parallel_size`` engines in Ray actors. These modules are the only ones that import vllm;
this one is the entry the harness imports.
"""

from __future__ import annotations

import logging

from lm_eval_longshort.backends.vllm_common import VLLMBase
from lm_eval_longshort.backends.vllm_hidden import POOLING_EXAMPLE, VLLMHiddenStateEngine
from lm_eval_longshort.backends.vllm_logprobs import VLLMEngine
from lm_eval_longshort.backends.vllm_parallel import VLLMDataParallel

__all__ = ["VLLMDataParallel", "VLLMEngine", "VLLMHiddenStateEngine", "from_lm_eval", "route_engine"]

log = logging.getLogger(__name__)
_route_hint_logged = False


def from_lm_eval(lm, **kwargs) -> VLLMBase | VLLMDataParallel:
    """Wrap lm-eval's VLLM (``--model vllm``): its ``vllm.LLM`` and HF tokenizer.

    A pooling engine (``runner=pooling``) gets the hidden-state route, any other the prompt
    log-probability route. With ``data_parallel_size=N`` lm-eval keeps no engine: N engines with
    the same arguments start in Ray actors (``vllm_parallel``), each on the same route.
    """
    if int(getattr(lm, "data_parallel_size", 1) or 1) > 1:
        engine = VLLMDataParallel.start(lm, **kwargs)
        if engine.name == VLLMEngine.name:
            _log_route_hint()
        return engine
    return route_engine(lm.model, lm.tokenizer, **kwargs)


def route_engine(llm, tokenizer, *, hint: bool = True, **kwargs) -> VLLMBase:
    """Our engine around a started ``vllm.LLM``, on the route it was started for (``hint``: log
    once that the hidden-state route is better when it is not the one)."""
    if str(getattr(llm.llm_engine.model_config, "runner_type", "generate")) == "pooling":
        return VLLMHiddenStateEngine(llm, tokenizer, **kwargs)
    if hint:
        _log_route_hint()
    return VLLMEngine(llm, tokenizer, **kwargs)


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
