"""The long table every report builds on: one row per value of a run.

``report``, ``compare``, the sweep report and finetune's report read their numbers from these
rows: (run, task, metric, L, value, standard error, per-document sums). The sums, one
(numerator, denominator) pair per scored document as the task recorded them, are what paired
differences need (differences.py). ``values.csv`` is this table written out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting.runs import Run
from lm_eval_longshort.reporting.writers import csv_text

# A document, as paired differences match it: (doc_index, SHA-1 of its text).
DocumentKey = tuple[int, str]
RowKey = tuple[str, str, str, int | None]
VALUES_HEADER = ("run", "task", "metric", "L", "value", "stderr")


@dataclass(frozen=True)
class Row:
    """One value: ``metric`` (at context length ``length``) of ``task`` in run ``run``.

    Attributes:
        run: the run's label.
        task: the lm-eval task name.
        metric: the catalogue name (``ppl``, ``symkl``, ``keyppl``...).
        length: the context length L; None for a metric reported once per task.
        value: the value as the results report it (NaN where it is undefined).
        stderr: its standard error; None where the results hold none.
        sums: {(doc_index, text sha1): [numerator, denominator]} of every scored document;
            empty for results without per-document sums (older files) and for counts.
    """

    run: str
    task: str
    metric: str
    length: int | None
    value: float
    stderr: float | None
    sums: dict[DocumentKey, list[float]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> RowKey:
        return self.run, self.task, self.metric, self.length


def _document_sums(run: Run, task: str) -> dict[str, dict[DocumentKey, list[float]]]:
    """{metric key: {(doc_index, sha1): [a, b]}} over the task's scored documents, from its record."""
    out: dict[str, dict[DocumentKey, list[float]]] = {}
    for doc in (run.longshort.get(task) or {}).get("documents") or []:
        if doc.get("skipped"):
            continue
        for key, sums in (doc.get("sums") or {}).items():
            if sums is not None:
                out.setdefault(key, {})[int(doc["doc_index"]), str(doc.get("sha1", ""))] = [float(s) for s in sums]
    return out


def run_rows(run: Run, tasks: Collection[str] | None = None) -> list[Row]:
    """The rows of one run: per task, the per-length metrics in catalogue order (lengths
    ascending), then the task's other metrics by name."""
    rows = []
    for task, per_length in run.per_length.items():
        if tasks is not None and task not in tasks:
            continue
        sums = _document_sums(run, task)
        for metric in sorted(per_length, key=catalogue.order):
            for length, value in sorted(per_length[metric].items()):
                rows.append(
                    Row(
                        run.label,
                        task,
                        metric,
                        length,
                        value,
                        run.error(task, metric, length),
                        sums.get(catalogue.key(metric, length), {}),
                    )
                )
        errors = run.scalar_stderr.get(task, {})
        for name, value in sorted(run.scalars.get(task, {}).items()):
            rows.append(Row(run.label, task, name, None, value, errors.get(name), sums.get(name, {})))
    return rows


def long_table(runs: Iterable[Run], tasks: Collection[str] | None = None) -> list[Row]:
    """Every value of ``runs`` (of ``tasks`` only, when given), run by run."""
    return [row for run in runs for row in run_rows(run, tasks)]


def index(rows: Iterable[Row]) -> dict[RowKey, Row]:
    """{(run, task, metric, length): row}."""
    return {row.key: row for row in rows}


def lengths_of(rows: Iterable[Row], task: str, metric: str, run: str | None = None) -> list[int]:
    """The context lengths at which ``metric`` of ``task`` has a row (of ``run`` only, when given), ascending."""
    return sorted(
        {
            r.length
            for r in rows
            if r.task == task and r.metric == metric and r.length is not None and (run is None or r.run == run)
        }
    )


def values_csv(rows: Iterable[Row]) -> str:
    """The long table as CSV: run, task, metric, L (empty for a scalar), value, stderr, at full precision."""
    return csv_text(VALUES_HEADER, ([r.run, r.task, r.metric, r.length, r.value, r.stderr] for r in rows))
