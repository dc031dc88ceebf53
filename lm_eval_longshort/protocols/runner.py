"""Score a task's documents on a backend: tokenize, skip what is too short, plan, score, summarize.

``plan_task`` checks a task and groups its usable documents into chunks; ``score_chunks``
scores each chunk with one engine call, so the backend batches across documents, and the
harness commits (and on a rerun resumes) chunk by chunk. What each protocol does is its
object's (``protocol_for``). The result is one small JSON-able record per document (lm-eval
logs it with --log_samples).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from more_itertools import constrained_batches

from lm_eval_longshort.protocols import misalignment, perplexity
from lm_eval_longshort.protocols.base import Document, Protocol
from lm_eval_longshort.protocols.requests import ScoringEngine
from lm_eval_longshort.protocols.settings import MisalignSettings, PerplexitySettings

log = logging.getLogger(__name__)

# The registry: task family -> protocol or mode name -> its class.
PROTOCOLS: dict[str, dict[str, type[Protocol]]] = {"ppl": perplexity.PROTOCOLS, "misalign": misalignment.MODES}


def protocol_for(settings: PerplexitySettings | MisalignSettings) -> Protocol:
    """The protocol object that scores a task with these settings."""
    return PROTOCOLS[settings.kind][settings.variant](settings)


class TooFewDocumentsError(ValueError):
    """Every document of a task is shorter than its protocol needs."""


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Plain-text token ids, no special tokens (docs/metrics.md: tokenized once)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def resolve_bos(tokenizer, add_bos: bool | None) -> int | None:
    """The BOS id to prepend to every window, or None (``None``/auto: as the tokenizer does for plain text)."""
    bos = tokenizer.bos_token_id
    if add_bos is False:
        return None
    if add_bos is True:
        if bos is None:
            raise ValueError("metadata add_bos=true but the tokenizer has no BOS token; use add_bos=false")
        return int(bos)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = len(with_special) > len(plain) and with_special[0] == bos
    return int(bos) if adds_bos else None


@dataclass
class TaskPlan:
    """A task's documents, checked and tokenized, ready to score (``plan_task``).

    ``responses[i]`` is document i's response: complete for a skipped document, filled in by
    ``score_chunks`` for a usable one. ``chunks`` lists the usable documents in scoring
    groups of about ``batch_tokens`` input tokens; a chunk is scored (and cached) as a unit,
    and the grouping depends only on the documents, so a resumed run batches exactly as an
    uninterrupted one and gives identical numbers.
    """

    task: str
    settings: PerplexitySettings | MisalignSettings
    protocol: Protocol  # what scores the documents: protocol_for(settings)
    bos: int | None  # the BOS id the engine prepends to every request, or None
    docs: list[Document]
    token_ids: list[np.ndarray]  # per document, [n] token ids
    responses: list[dict]
    chunks: list[list[int]]  # indices into docs


def needed_tokens(settings: PerplexitySettings | MisalignSettings, doc_index: int) -> int:
    """Document tokens the task's protocol needs (shorter documents are skipped)."""
    return protocol_for(settings).needed_tokens(doc_index)


def plan_task(
    engine: ScoringEngine, settings: PerplexitySettings | MisalignSettings, docs: Sequence[Document], task: str
) -> TaskPlan:
    """Check and tokenize a task's documents; raise before any scoring if the task cannot run."""
    protocol = protocol_for(settings)
    bos = resolve_bos(engine.tokenizer, settings.add_bos)
    protocol.check(engine, bos, task)
    token_ids = [tokenize(engine.tokenizer, d.text) for d in docs]
    usable, responses = [], []
    for doc, ids in zip(docs, token_ids, strict=True):
        need = protocol.needed_tokens(doc.doc_index)
        base = {"doc_index": doc.doc_index, "title": doc.title, "n_tokens": int(len(ids))}
        if len(ids) < need:
            log.warning(
                "%s: skipping document %d (%r): %d tokens, the protocol needs %d",
                task,
                doc.doc_index,
                doc.title,
                len(ids),
                need,
            )
            responses.append({**base, "skipped": True, "needed_tokens": int(need)})
        else:
            usable.append(len(responses))
            responses.append({**base, "skipped": False})
    if not usable:
        shortest = ", ".join(f"#{r['doc_index']} {r['title']!r}: {r['n_tokens']} tokens" for r in responses[:10])
        raise TooFewDocumentsError(
            f"task {task}: every document is too short for {protocol.describe()} (needs "
            f"{responses[0]['needed_tokens']} tokens): {shortest}. Use shorter lengths or longer documents."
        )
    # Consecutive documents, about ``budget`` input tokens a chunk (at least one document each).
    budget = settings.batch_tokens or engine.batch_tokens
    cost = {i: protocol.input_tokens(len(token_ids[i]), bos) for i in usable}
    chunks = [list(c) for c in constrained_batches(usable, budget, get_len=cost.__getitem__, strict=False)]
    return TaskPlan(task, settings, protocol, bos, list(docs), token_ids, responses, chunks)


@dataclass(frozen=True)
class ChunkWork:
    """One chunk as an engine replica needs it: the protocol, its (document, token ids), the BOS id."""

    protocol: Protocol
    docs: list[tuple[Document, np.ndarray]]
    bos: int | None


def score_chunk(engine: ScoringEngine, work: ChunkWork) -> list[dict]:
    """The fields each document of ``work`` adds to its response (module level: a data-parallel
    engine sends it to its replicas)."""
    return work.protocol.score(engine, work.docs, work.bos)


def score_chunks(engine: ScoringEngine, plan: TaskPlan, chunks: Sequence[Sequence[int]]) -> Iterator[Sequence[int]]:
    """Score each chunk of ``plan`` (usable document indices) with one engine call, filling in its
    documents' responses; yield each chunk once it is filled in, in the order chunks finish.

    The engine decides where chunks run (``ScoringEngine.map_chunks``): one after another here, on
    several replicas at once for a data-parallel engine. A chunk is the same engine call wherever it
    runs, so the numbers do not depend on that. The task's own ``batch_tokens`` (if set) goes down
    with the engine call: the engine is shared by the tasks of one lm-eval call, so nothing of it is
    changed here.
    """
    work = [ChunkWork(plan.protocol, [(plan.docs[i], plan.token_ids[i]) for i in chunk], plan.bos) for chunk in chunks]
    costs = [sum(plan.protocol.input_tokens(len(ids), plan.bos) for _, ids in w.docs) for w in work]
    for k, summaries in engine.map_chunks(score_chunk, work, costs):
        for i, summary in zip(chunks[k], summaries, strict=True):
            plan.responses[i].update(summary)
        yield chunks[k]


def evaluate_documents(
    engine: ScoringEngine, settings: PerplexitySettings | MisalignSettings, docs: Sequence[Document], task: str
) -> list[dict]:
    """One response per document, in order; skipped documents get ``{"skipped": True, ...}``."""
    plan = plan_task(engine, settings, docs, task)
    for _ in score_chunks(engine, plan, plan.chunks):
        pass
    return plan.responses
