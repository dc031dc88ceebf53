"""Score a task's documents on a backend: tokenize, skip what is too short, plan, score, summarize.

One call handles every document of one task so the backend can batch across documents.
The result is one small JSON-able record per document (lm-eval logs it with --log_samples).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lm_eval_longshort.numerics.divergences import METRIC_NAMES, all_divergences
from lm_eval_longshort.protocols import misalignment as mis
from lm_eval_longshort.protocols import perplexity as ppl
from lm_eval_longshort.protocols.requests import LengthLimitError, ScoringEngine
from lm_eval_longshort.protocols.settings import MisalignSettings, PerplexitySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    doc_index: int  # position in the task's document list (seeds the misalignment draws)
    title: str
    text: str


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
    ``score_documents`` for a usable one. ``chunks`` lists the usable documents in scoring
    groups of about ``batch_tokens`` input tokens; a chunk is scored (and cached) as a unit,
    and the grouping depends only on the documents, so a resumed run batches exactly as an
    uninterrupted one and gives identical numbers.
    """

    task: str
    settings: PerplexitySettings | MisalignSettings
    bos: int | None
    docs: list[Document]
    token_ids: list[np.ndarray]
    responses: list[dict]
    chunks: list[list[int]]


def needed_tokens(settings: PerplexitySettings | MisalignSettings, doc_index: int) -> int:
    """Document tokens the task's protocol needs (shorter documents are skipped)."""
    return ppl.needed_tokens(settings) if settings.kind == "ppl" else mis.needed_tokens(settings, doc_index)


def check_engine(engine: ScoringEngine, settings: PerplexitySettings | MisalignSettings, task: str) -> int | None:
    """Every check that needs only the settings and the backend; returns the BOS id to prepend."""
    bos = resolve_bos(engine.tokenizer, settings.add_bos)
    if settings.kind == "ppl":
        ppl.check_sliding(settings, bos)
        need = ppl.longest_input(settings, bos)
        if settings.protocol == "ladder" and need > engine.max_length >= settings.longest + (bos is not None):
            # max(lengths) fits, the targets after it do not: name the setting to change.
            raise LengthLimitError(
                f"task {task}: the ladder reads max(lengths) + target_tokens - 1 = {settings.longest} + "
                f"{settings.target_tokens} - 1 = {need - (bos is not None)} tokens"
                f"{' plus a BOS' if bos is not None else ''}, but the {engine.name} backend takes at most "
                f"{engine.max_length}; lower target_tokens (at most "
                f"{engine.max_length - settings.longest - (bos is not None) + 1}) or max(lengths), "
                f"or {engine.length_hint} (at least {need})"
            )
    else:
        need = mis.longest_input(settings, bos)
    engine.check_lengths(need, f"task {task} at max(lengths)={settings.longest}")
    return bos


def plan_task(
    engine: ScoringEngine, settings: PerplexitySettings | MisalignSettings, docs: Sequence[Document], task: str
) -> TaskPlan:
    """Check and tokenize a task's documents; raise before any scoring if the task cannot run."""
    bos = check_engine(engine, settings, task)
    token_ids = [tokenize(engine.tokenizer, d.text) for d in docs]
    usable, responses = [], []
    for doc, ids in zip(docs, token_ids, strict=True):
        need = needed_tokens(settings, doc.doc_index)
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
            f"task {task}: every document is too short for {_describe(settings)} (needs "
            f"{responses[0]['needed_tokens']} tokens): {shortest}. Use shorter lengths or longer documents."
        )
    budget = settings.batch_tokens or engine.batch_tokens
    costs = {i: _input_tokens(settings, len(token_ids[i]), bos) for i in usable}
    return TaskPlan(task, settings, bos, list(docs), token_ids, responses, _chunk(usable, costs, budget))


def _input_tokens(s: PerplexitySettings | MisalignSettings, n_doc: int, bos: int | None) -> int:
    """About how many tokens the backend reads for one document (sizes the scoring chunks)."""
    extra = 1 if bos is not None else 0
    if s.kind == "ppl":
        if s.protocol == "ladder":
            return sum(length + s.target_tokens - 1 + extra for length in s.lengths)
        if s.protocol == "truncate":
            return s.longest + extra
        n = min(n_doc, s.doc_tokens_cap())
        return len(s.lengths) * (n + extra)
    if s.mode == "last":
        return sum((length + extra) * (1 + s.pairs) for length in s.lengths)
    return sum(2 * (length + extra) for length in s.lengths)


def _chunk(indices: list[int], costs: dict[int, int], budget: int) -> list[list[int]]:
    """Consecutive groups of documents whose input tokens stay within ``budget`` (at least one each)."""
    chunks: list[list[int]] = []
    used = budget
    for i in indices:
        if used + costs[i] > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += costs[i]
    return chunks


def score_documents(engine: ScoringEngine, plan: TaskPlan, indices: Sequence[int]) -> None:
    """Score the usable documents ``indices`` of ``plan``, filling in their responses.

    The task's own ``batch_tokens`` (if set) goes down with each engine call: the engine is
    shared by the tasks of one lm-eval call, so nothing of it is changed here.
    """
    s = plan.settings
    docs_ids = [(plan.docs[i], plan.token_ids[i], plan.responses[i]) for i in indices]
    if s.kind == "ppl":
        _score_perplexity(engine, s, docs_ids, plan.bos)
    elif s.mode == "last":
        _score_last(engine, s, docs_ids, plan.bos)
    else:
        _score_dense(engine, s, docs_ids, plan.bos)


def evaluate_documents(
    engine: ScoringEngine, settings: PerplexitySettings | MisalignSettings, docs: Sequence[Document], task: str
) -> list[dict]:
    """One response per document, in order; skipped documents get ``{"skipped": True, ...}``."""
    plan = plan_task(engine, settings, docs, task)
    for chunk in plan.chunks:
        score_documents(engine, plan, chunk)
    return plan.responses


def _describe(s) -> str:
    name = s.protocol if s.kind == "ppl" else s.mode
    return f"{s.kind} {name} with lengths {list(s.lengths)}"


def _label(doc: Document) -> str:
    return f"document #{doc.doc_index} ({doc.title!r})"


def _decoder(tokenizer):
    return lambda span: tokenizer.decode(span.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _score_perplexity(engine: ScoringEngine, s: PerplexitySettings, docs_ids, bos) -> None:
    single = s.single_pass if s.single_pass is not None else not engine.position_dependent
    if s.protocol == "truncate" and single and engine.position_dependent:
        log.warning(
            "single_pass=true on a model whose positions depend on sequence length: "
            "numbers for L < max(lengths) differ from per-length passes"
        )
    plan = []
    for doc, ids, _ in docs_ids:
        if s.protocol == "ladder":
            windows = ppl.ladder_windows(ids, s, bos, _label(doc))
        elif s.protocol == "truncate":
            windows = ppl.truncate_windows(ids, s, bos, _label(doc), single)
        else:
            windows = ppl.sliding_windows(ids, s, bos, _label(doc))
        plan.append(windows)
    nlls = engine.target_nll([w for windows in plan for w in windows], batch_tokens=s.batch_tokens)
    summarize = {"ladder": ppl.ladder_summarize, "truncate": ppl.truncate_summarize, "sliding": ppl.sliding_summarize}[
        s.protocol
    ]
    decode = _decoder(engine.tokenizer)
    cursor = 0
    for (doc, ids, response), windows in zip(docs_ids, plan, strict=True):
        doc_nlls = nlls[cursor : cursor + len(windows)]
        cursor += len(windows)
        response.update(summarize(ids, doc_nlls, s, bos, decode))
        for record in response["records"]:
            record["doc_index"] = doc.doc_index
        response["protocol"] = s.protocol


def _score_last(engine: ScoringEngine, s: MisalignSettings, docs_ids, bos) -> None:
    prompts, per_doc = [], []
    for doc, ids, _ in docs_ids:
        doc_prompts, records, rows = mis.last_prompts(ids, s, doc.doc_index, bos, _label(doc))
        per_doc.append((records, [(a + len(prompts), b + len(prompts)) for a, b in rows]))
        prompts.extend(doc_prompts)
    logprobs = engine.last_logprobs(prompts, batch_tokens=s.batch_tokens)  # [n_prompts, V]
    for (_, _, response), (records, rows) in zip(docs_ids, per_doc, strict=True):
        long_rows, short_rows = (torch.tensor(r) for r in zip(*rows, strict=True))
        values = all_divergences(logprobs[long_rows], logprobs[short_rows])
        for i, record in enumerate(records):
            record.update({name: float(values[name][i]) for name in METRIC_NAMES})
        response["pairs"] = records
        response["mode"] = "last"


def _score_dense(engine: ScoringEngine, s: MisalignSettings, docs_ids, bos) -> None:
    pairs, layouts = [], []
    for doc, ids, _ in docs_ids:
        doc_pairs, layout = mis.dense_pairs(ids, s, doc.doc_index, bos, _label(doc))
        pairs.extend(doc_pairs)
        layouts.append(layout)
    values = engine.aligned_divergences(pairs, topk=s.topk, batch_tokens=s.batch_tokens)
    cursor = 0
    for (_, _, response), layout in zip(docs_ids, layouts, strict=True):
        for group in layout:
            per_position = values[cursor]
            cursor += 1
            # Every per-position array: the metrics, plus error bounds from approximate backends
            # (tv_err_bound -> tv_err_bound_sum).
            group.update({f"{name}_sum": float(np.sum(array)) for name, array in per_position.items()})
        response["groups"] = layout
        response["mode"] = "dense"
        response["approximate"] = engine.approximate_dense
