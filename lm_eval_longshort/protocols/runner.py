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

from lm_eval_longshort.backends.base import ScoringEngine
from lm_eval_longshort.numerics.divergences import METRIC_NAMES, all_divergences
from lm_eval_longshort.protocols import misalignment as mis
from lm_eval_longshort.protocols import perplexity as ppl
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
    """Plain-text token ids, no special tokens (METRICS.md: tokenized once)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def resolve_bos(tokenizer, add_bos: str) -> int | None:
    """The BOS id to prepend to every window, or None (``auto``: as the tokenizer does for plain text)."""
    bos = tokenizer.bos_token_id
    if add_bos == "false":
        return None
    if add_bos == "true":
        if bos is None:
            raise ValueError("metadata add_bos=true but the tokenizer has no BOS token; use add_bos=false")
        return int(bos)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = len(with_special) > len(plain) and with_special[0] == bos
    return int(bos) if adds_bos else None


def evaluate_documents(
    engine: ScoringEngine, settings: PerplexitySettings | MisalignSettings, docs: Sequence[Document], task: str
) -> list[dict]:
    """One response per document, in order; skipped documents get ``{"skipped": True, ...}``."""
    tokenizer = engine.tokenizer
    bos = resolve_bos(tokenizer, settings.add_bos)
    family = ppl if settings.kind == "ppl" else mis
    engine.check_lengths(family.longest_input(settings, bos), f"task {task} at max(lengths)={settings.max_length}")
    if settings.kind == "ppl":
        ppl.check_sliding(settings, bos)

    token_ids = [tokenize(tokenizer, d.text) for d in docs]
    usable, responses = [], []
    for doc, ids in zip(docs, token_ids, strict=True):
        need = ppl.needed_tokens(settings) if settings.kind == "ppl" else mis.needed_tokens(settings, doc.doc_index)
        base = {"doc_index": doc.doc_index, "title": doc.title, "n_tokens": int(len(ids))}
        if len(ids) < need:
            log.warning("%s: skipping document %d (%r): %d tokens, the protocol needs %d",
                        task, doc.doc_index, doc.title, len(ids), need)
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

    docs_ids = [(docs[i], token_ids[i], responses[i]) for i in usable]
    backend_budget = engine.batch_tokens
    if settings.batch_tokens is not None:  # this task's budget; the engine is shared by tasks
        engine.batch_tokens = settings.batch_tokens
    try:
        if settings.kind == "ppl":
            _score_perplexity(engine, settings, docs_ids, bos)
        elif settings.mode == "last":
            _score_last(engine, settings, docs_ids, bos)
        else:
            _score_dense(engine, settings, docs_ids, bos)
    finally:
        engine.batch_tokens = backend_budget
    return responses


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
        log.warning("single_pass=true on a model whose positions depend on sequence length: "
                    "numbers for L < max(lengths) differ from per-length passes")
    plan = []
    for doc, ids, _ in docs_ids:
        if s.protocol == "ladder":
            windows = ppl.ladder_windows(ids, s, bos, _label(doc))
        elif s.protocol == "truncate":
            windows = ppl.truncate_windows(ids, s, bos, _label(doc), single)
        else:
            windows = ppl.sliding_windows(ids, s, bos, _label(doc))
        plan.append(windows)
    nlls = engine.target_nll([w for windows in plan for w in windows])
    summarize = {"ladder": ppl.ladder_summarize, "truncate": ppl.truncate_summarize,
                 "sliding": ppl.sliding_summarize}[s.protocol]
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
    prompts, layouts = [], []
    for doc, ids, _ in docs_ids:
        doc_prompts, layout = mis.last_prompts(ids, s, doc.doc_index, bos, _label(doc))
        for pair in layout:
            pair["_long"] += len(prompts)
            pair["_short"] += len(prompts)
        prompts.extend(doc_prompts)
        layouts.append(layout)
    logprobs = engine.last_logprobs(prompts)  # [n_prompts, V]
    for (_, _, response), layout in zip(docs_ids, layouts, strict=True):
        long_rows = torch.tensor([p.pop("_long") for p in layout])
        short_rows = torch.tensor([p.pop("_short") for p in layout])
        values = all_divergences(logprobs[long_rows], logprobs[short_rows])
        for i, pair in enumerate(layout):
            pair.update({name: float(values[name][i]) for name in METRIC_NAMES})
        response["pairs"] = layout
        response["mode"] = "last"


def _score_dense(engine: ScoringEngine, s: MisalignSettings, docs_ids, bos) -> None:
    pairs, layouts = [], []
    for doc, ids, _ in docs_ids:
        doc_pairs, layout = mis.dense_pairs(ids, s, doc.doc_index, bos, _label(doc))
        pairs.extend(doc_pairs)
        layouts.append(layout)
    values = engine.aligned_divergences(pairs, topk=s.topk)
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
