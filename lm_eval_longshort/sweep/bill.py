"""What a sweep will cost before it runs: input tokens of the forward passes, per run and task.

For each run and longshort task, the documents the run scores are tokenized with the run's
tokenizer (no model is loaded), the protocol builds the document's requests exactly as the task
will, and the tokens each request feeds the model are summed (BOS included; a dense pair feeds
both windows). Documents too short for the protocol are left out, as the task skips them. Only tasks whose
documents are local files (the embedded corpus, ``local``) are counted; others are named as not
counted rather than guessed. A user multiplies by a measured tokens/second (printed as runs
finish) to size an allocation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from lm_eval_longshort.sweep import checks, shards
from lm_eval_longshort.sweep.spec import RunSpec, Sweep


@dataclass
class RunBill:
    """One run's input tokens per task (None: the task's documents are not local files)."""

    run: str
    tasks: dict[str, int | None] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)  # documents scored per task

    @property
    def tokens(self) -> int:
        return sum(v for v in self.tasks.values() if v is not None)


@dataclass(frozen=True)
class _ModelFacts:
    """The one engine fact building requests reads: whether positions depend on the sequence
    length (then ``truncate`` makes one pass per length), from the run's model config."""

    position_dependent: bool


def _facts(run: RunSpec) -> _ModelFacts:
    from transformers import AutoConfig

    from lm_eval_longshort.backends.hf import LENGTH_DEPENDENT_ROPE, rope_type

    if run.variant is not None:
        config = AutoConfig.for_model(**run.variant.config())
    else:
        config = AutoConfig.from_pretrained(_model_folder(run))
    return _ModelFacts(rope_type(config) in LENGTH_DEPENDENT_ROPE)


def fed_tokens(request) -> int:
    """Tokens one request feeds the model, BOS included (both windows of a dense pair)."""
    from lm_eval_longshort.protocols.requests import AlignedWindows

    if isinstance(request, AlignedWindows):
        return sum(len(s) for s in request.sequences())
    return request.n_inputs


@functools.cache
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _model_folder(run: RunSpec) -> str:
    """Where the run's tokenizer lives (a variant keeps its base model's tokenizer)."""
    return str(run.variant.base if run.variant is not None else run.model_args.get("pretrained"))


def run_bill(sweep: Sweep, run: RunSpec, documents: dict[str, tuple[int, ...]] | None = None) -> RunBill:
    """The input tokens ``run`` will read, per task (``documents``: only these, per task: a piece's)."""
    from lm_eval_longshort.harness.datasets import DATASET_KEYS
    from lm_eval_longshort.protocols.base import Document
    from lm_eval_longshort.protocols.runner import protocol_for, resolve_bos, tokenize
    from lm_eval_longshort.protocols.settings import parse_settings

    bill = RunBill(run.name)
    tokenizer, facts = _tokenizer(_model_folder(run)), _facts(run)
    for task in sweep.tasks:
        texts = checks.task_texts(task, sweep.metadata) if task.kind else None
        if texts is None:
            bill.tasks[task.name] = None
            continue
        given = {**task.metadata, **sweep.metadata}
        settings = parse_settings(task.kind, given, other_keys={"data keys": DATASET_KEYS})
        protocol, bos = protocol_for(settings), resolve_bos(tokenizer, settings.add_bos)
        tokens = scored = 0
        chosen = documents[task.name] if documents else shards.selected(sweep.samples, sweep.limit, len(texts))
        for index in chosen:
            ids = tokenize(tokenizer, texts[index])
            if len(ids) >= protocol.needed_tokens(index):
                asked = protocol.requests(Document(index, "", texts[index]), ids, bos, facts)
                tokens += sum(fed_tokens(request) for request in asked.requests)
                scored += 1
        bill.tasks[task.name], bill.documents[task.name] = tokens, scored
    return bill


def describe(bills: list[RunBill]) -> list[str]:
    """Lines for ``sweep --check``: each run's tokens by task, then the total."""
    lines = []
    for bill in bills:
        parts = [
            f"{task} {tokens:,} ({bill.documents[task]} docs)" if tokens is not None else f"{task} not counted"
            for task, tokens in bill.tasks.items()
        ]
        lines.append(f"  bill {bill.run}: {bill.tokens:,} input tokens: " + "; ".join(parts))
    total = sum(b.tokens for b in bills)
    uncounted = sorted({t for b in bills for t, v in b.tasks.items() if v is None})
    note = f" (not counted: {', '.join(uncounted)}: documents not local files)" if uncounted else ""
    lines.append(f"  bill total: {total:,} input tokens over {len(bills)} runs{note}")
    return lines
