"""The request type ``longshort_score`` and the LM method of that name.

lm-eval dispatches each Instance by ``getattr(lm, instance.request_type)`` and lm-eval
0.4.13 has no model plugins, so the method is attached to the base class ``LM`` (not only
``TemplateLM``: models such as ``dummy`` derive from ``LM`` directly and must get the clear
"use --model hf or --model vllm" error, not an AttributeError): plain ``--model hf`` and
``--model vllm`` then serve our requests. The method picks a backend
engine for the lm object and hands it every document of every longshort task at once.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from lm_eval.api.model import LM

from lm_eval_longshort.backends.base import ScoringEngine
from lm_eval_longshort.protocols.runner import Document, evaluate_documents
from lm_eval_longshort.protocols.settings import settings_from_json

REQUEST_TYPE = "longshort_score"
log = logging.getLogger(__name__)


def engine_for(lm) -> ScoringEngine:
    """The scoring engine of an lm-eval model object (created once, then cached on it)."""
    engine = getattr(lm, "_longshort_engine", None)
    if engine is not None:
        return engine
    from lm_eval.models.huggingface import HFLM

    kind = type(lm).__name__
    if isinstance(lm, HFLM):
        from lm_eval_longshort.backends.hf import HFEngine

        engine = HFEngine.from_hflm(lm)
    elif kind == "VLLM":
        from lm_eval_longshort.backends.vllm import VLLMEngine  # imports vllm: only here

        engine = VLLMEngine.from_lm_eval(lm)
    else:
        raise TypeError(
            f"longshort tasks need full-vocabulary log-probabilities, which the {kind!r} backend "
            "does not provide; run them with --model hf or --model vllm"
        )
    lm._longshort_engine = engine
    return engine


def longshort_score(self, requests, disable_tqdm: bool = False) -> list[dict]:
    """Score ``longshort_score`` Instances: arguments = (label, settings JSON); text from the doc."""
    engine = engine_for(self)
    by_task = defaultdict(list)
    for i, request in enumerate(requests):
        by_task[(request.task_name, request.args[1])].append(i)
    responses: list[dict | None] = [None] * len(requests)
    for (task, settings_json), indices in by_task.items():
        settings = settings_from_json(settings_json)
        docs = [Document(int(requests[i].doc.get("doc_index", requests[i].doc_id)), str(requests[i].doc.get("title", "")), requests[i].doc["text"])
                for i in indices]
        log.info("%s: scoring %d documents on the %s backend", task, len(docs), engine.name)
        for i, response in zip(indices, evaluate_documents(engine, settings, docs, task), strict=True):
            responses[i] = response
    return responses  # type: ignore[return-value]


def install() -> None:
    """Attach the method to lm-eval's LM base class (idempotent)."""
    if getattr(LM, REQUEST_TYPE, None) is not longshort_score:
        setattr(LM, REQUEST_TYPE, longshort_score)
