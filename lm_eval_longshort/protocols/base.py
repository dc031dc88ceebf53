"""What every protocol is: one object per perplexity protocol or misalignment mode.

A ``Protocol`` holds a task's settings and answers, for one document at a time: how many tokens
it needs, what the engine is asked for it (``requests``) and what its response logs from the
answers (``summarize``). ``score`` runs those steps for a group of documents with one engine
call, so the engine batches across documents. The five protocols live in ``perplexity.py`` and
``misalignment.py``; ``runner.protocol_for`` picks one from the settings.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_eval_longshort.protocols.requests import Request, ScoringEngine
from lm_eval_longshort.protocols.settings import MisalignSettings, PerplexitySettings


def bos_tokens(bos: int | None) -> int:
    """Input tokens a BOS adds to every sequence: 1, or 0 without one."""
    return 0 if bos is None else 1


@dataclass(frozen=True)
class Document:
    doc_index: int  # position in the task's document list (seeds the misalignment draws)
    title: str
    text: str

    @property
    def label(self) -> str:
        """How requests and errors name the document."""
        return f"document #{self.doc_index} ({self.title!r})"


@dataclass
class DocumentRequests:
    """What one document asks the engine, and what its summary needs besides the answers."""

    doc: Document
    ids: np.ndarray  # [n] the document's token ids, no BOS
    bos: int | None  # the BOS id the engine prepends to every request, or None
    requests: list[Request]  # answered in this order
    layout: Any = None  # the protocol's own records of the requests (pairs, dense groups), or None


class Protocol(abc.ABC):
    """A perplexity protocol or misalignment mode of one task (docs/metrics.md)."""

    name: str  # as logged in a response: "ladder", "truncate", "sliding", "last" or "dense"

    def __init__(self, settings: PerplexitySettings | MisalignSettings):
        self.settings = settings

    @abc.abstractmethod
    def needed_tokens(self, doc_index: int) -> int:
        """Document tokens this protocol needs (shorter documents are skipped for the whole task)."""

    @abc.abstractmethod
    def longest_input(self, bos: int | None) -> int:
        """Longest sequence (BOS included) the engine must accept."""

    @abc.abstractmethod
    def input_tokens(self, n_doc: int, bos: int | None) -> int:
        """About how many tokens the engine reads for a document of ``n_doc`` tokens (sizes the
        scoring chunks)."""

    @abc.abstractmethod
    def requests(self, doc: Document, ids: np.ndarray, bos: int | None, engine: ScoringEngine) -> DocumentRequests:
        """What the engine is asked for one document."""

    @abc.abstractmethod
    def ask(self, engine: ScoringEngine, requests: list[Request]) -> Sequence:
        """The engine's answers, one per request (requests of several documents at once)."""

    @abc.abstractmethod
    def summarize(self, asked: DocumentRequests, answers: Sequence, engine: ScoringEngine) -> dict:
        """The fields a document's response adds, from the answers to its requests."""

    def check(self, engine: ScoringEngine, bos: int | None, task: str) -> None:
        """Every check that needs only the settings and the engine (before any document is read)."""
        engine.check_lengths(self.longest_input(bos), f"task {task} at max(lengths)={self.settings.longest}")

    def describe(self) -> str:
        return f"{self.settings.kind} {self.name} with lengths {list(self.settings.lengths)}"

    def score(self, engine: ScoringEngine, docs: Sequence[tuple[Document, np.ndarray]], bos: int | None) -> list[dict]:
        """Per document of ``docs`` ((document, token ids) pairs), the fields its response adds.

        Every request of every document goes to the engine in one call.
        """
        asked = [self.requests(doc, ids, bos, engine) for doc, ids in docs]
        answers = self.ask(engine, [request for a in asked for request in a.requests])
        ends = itertools.accumulate(len(a.requests) for a in asked)
        return [
            self.summarize(a, answers[end - len(a.requests) : end], engine) for a, end in zip(asked, ends, strict=True)
        ]
