"""Shards of one run: ``shards: K`` splits a run's documents into K pieces that workers claim like runs.

A run's documents, per task, are the sweep's ``samples`` (each once, in document order: the
order lm-eval scores them in), else the first ``limit`` documents, else every document of the
task, counted from its local files as ``sweep --check`` counts them, before any model loads.
Each task's documents are split into K contiguous pieces of near-equal size
(``numpy.array_split``: the first ``n mod K`` pieces hold one document more). Piece i of K is a
:class:`Work` like a whole run: lm-eval runs it with ``samples`` set to its documents, under its
own claim (``claims/<run>.shard<i>of<K>.claim``), cache (``cache/<run>.shard<i>of<K>``) and
folder (``runs/<run>/shards/<i>of<K>/``). Its recorded plan is the run's plus the piece (i, K
and its documents). When the last piece is finished, sweep/assemble.py writes the run's
results JSON from the pieces' per-document sums.

A sharded run's own plan holds ``shards: K`` (an unsharded run's plan has no such key): the
numbers equal the unsharded run's, but how they were computed is part of the record, and a
finished unsharded run is never silently taken for a sharded one or the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lm_eval_longshort.sweep import checks

if TYPE_CHECKING:  # spec imports this module
    from lm_eval_longshort.sweep.spec import RunSpec, Sweep, TaskSpec


@dataclass(frozen=True)
class Work:
    """What one worker claims and computes: a whole run (``count`` 1), or piece ``index`` of ``count``.

    ``documents``: a piece's document indices per task (None for a whole run, which scores the
    sweep's ``samples`` or ``limit``).
    """

    run: RunSpec
    index: int = 1
    count: int = 1
    documents: dict[str, tuple[int, ...]] | None = None

    @property
    def key(self) -> str:
        """Names its claim, cache and partial folder: the run's name, or ``<run>.shard<i>of<K>``."""
        return self.run.name if self.count == 1 else f"{self.run.name}.shard{self.index}of{self.count}"

    @property
    def folder(self) -> str:
        """Its folder under ``runs/``: ``<run>``, or ``<run>/shards/<i>of<K>``."""
        return self.run.name if self.count == 1 else f"{self.run.name}/shards/{self.index}of{self.count}"

    @property
    def label(self) -> str:
        """``''`` for a whole run, ``' shard i/K'`` for a piece (progress lines)."""
        return "" if self.count == 1 else f" shard {self.index}/{self.count}"

    def plan(self, sweep: Sweep) -> dict:
        """The run's plan, plus the piece (i, K, its documents per task) for a piece."""
        plan = sweep.run_plan(self.run)
        if self.count == 1:
            return plan
        documents = {task: list(docs) for task, docs in (self.documents or {}).items()}
        return {**plan, "shard": {"index": self.index, "of": self.count, "documents": documents}}

    def samples(self, sweep: Sweep) -> dict[str, list[int]] | None:
        """lm-eval's ``samples``: the piece's documents per task, or the sweep's for a whole run."""
        if self.documents is None:
            return sweep.samples_by_task()
        return {task: list(docs) for task, docs in self.documents.items()}

    def limit(self, sweep: Sweep) -> int | None:
        """lm-eval's ``limit``: the sweep's for a whole run; none for a piece (``samples`` says it)."""
        return sweep.limit if self.documents is None else None


def shard_count(entry: dict, data: dict, where: str, problems: list[str]) -> int:
    """A run's ``shards`` (its own, else the sweep-wide one, else 1), a whole number >= 1."""
    own = "shards" in entry
    value = entry["shards"] if own else data.get("shards", 1)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    prefix = f"{where}: " if own else ""
    problems.append(f"{prefix}shards: a whole number of pieces >= 1 (1: not split), got {value!r}")
    return 1


def selected(samples: tuple[int, ...] | None, limit: int | None, count: int | None) -> tuple[int, ...] | None:
    """The documents a run scores of a task with ``count`` documents (None: not counted), in order.

    >>> selected((5, 2, 2), None, 10), selected(None, 3, 10), selected(None, 30, 10)[-1], selected(None, None, None)
    ((2, 5), (0, 1, 2), 9, None)
    """
    if samples:
        return tuple(sorted({i for i in samples if count is None or i < count}))
    if count is None:
        return tuple(range(limit)) if limit else None
    return tuple(range(count if limit is None else min(count, limit)))


def run_documents(sweep: Sweep) -> dict[str, tuple[int, ...] | None]:
    """Each task's documents a run of ``sweep`` scores (None: the task's documents are not counted)."""
    return _documents(sweep.tasks, sweep.samples, sweep.limit, sweep.metadata)


def _documents(tasks, samples, limit, metadata) -> dict[str, tuple[int, ...] | None]:
    if samples:
        return {task.name: selected(samples, None, None) for task in tasks}
    return {task.name: selected(None, limit, checks.document_count(task, metadata)) for task in tasks}


def works(sweep: Sweep, run: RunSpec, documents: dict | None = None) -> list[Work]:
    """The work of ``run``: the run itself, or its ``shards`` pieces (``documents``: run_documents)."""
    if run.shards == 1:
        return [Work(run)]
    documents = run_documents(sweep) if documents is None else documents
    split = {task: np.array_split(np.asarray(docs, dtype=int), run.shards) for task, docs in documents.items()}
    return [
        Work(run, i + 1, run.shards, {task: tuple(int(d) for d in parts[i]) for task, parts in split.items()})
        for i in range(run.shards)
    ]


def problems(runs: tuple[RunSpec, ...], tasks: tuple[TaskSpec, ...], samples, limit, metadata: dict) -> list[str]:
    """Sharded runs that cannot be split: more pieces than documents, documents not counted, or a
    run name that is another run's piece key (they would share a claim and a cache)."""
    sharded = [run for run in runs if run.shards > 1]
    keys = {Work(run, i, run.shards).key for run in sharded for i in range(1, run.shards + 1)}
    out = [
        f"run {r.name!r}: the name is another run's piece (<run>.shard<i>of<K>); rename it"
        for r in runs
        if r.name in keys
    ]
    if not sharded or not tasks:
        return out
    try:
        documents = _documents(tasks, samples, limit, metadata)
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        return [*out, f"shards: the documents cannot be read to split them: {first}"]
    uncounted = [task for task, docs in documents.items() if docs is None]
    counts = {task: len(docs) for task, docs in documents.items() if docs is not None}
    for run in sharded:
        if uncounted:
            out.append(
                f"run {run.name!r}: shards: {run.shards} needs the number of documents of {', '.join(uncounted)}, "
                "which is not counted (the documents are not local files); set samples or limit"
            )
        fewest = min(counts.values(), default=run.shards)
        if run.shards > fewest:
            tasks_named = ", ".join(task for task, n in counts.items() if n == fewest)
            out.append(
                f"run {run.name!r}: shards: {run.shards} is more pieces than the run's {fewest} document(s) "
                f"({tasks_named}); give shards <= {fewest}, or more documents (samples or limit)"
            )
    return out


def describe(pieces: list[Work]) -> str:
    """``sweep --check``'s line for a sharded run: each piece's documents (per task when they differ)."""

    def listing(docs: dict[str, tuple[int, ...]]) -> str:
        shown = {tuple(d) for d in docs.values()}
        if len(shown) == 1:
            return _indices(next(iter(shown)))
        return ", ".join(f"{task} {_indices(d)}" for task, d in docs.items())

    parts = [f"{w.index}/{w.count}: {listing(w.documents or {})}" for w in pieces]
    return f"{pieces[0].count} shards; documents " + "; ".join(parts)


def _indices(docs: tuple[int, ...]) -> str:
    """``[0, 1, 2] (3)``, or ``0-99 (100)`` for a contiguous range longer than 3."""
    if len(docs) > 3 and list(docs) == list(range(docs[0], docs[-1] + 1)):
        return f"{docs[0]}-{docs[-1]} ({len(docs)})"
    return f"{list(docs)} ({len(docs)})"
