"""Paired differences between rows of the long table, on the documents both rows scored.

Two values measured on the same documents share those documents' difficulty, which cancels
in their difference (docs/metrics.md, "Paired differences"). Documents are matched by index
and text SHA-1; the error comes from numerics.aggregate.paired_difference, with the metric's
transform from the catalogue. ``compare`` and finetune's report take their differences here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.numerics.aggregate import paired_difference
from lm_eval_longshort.reporting.longtable import Row, index, lengths_of

DIFFERENCE_HEADER = ("label", "versus", "metric", "L", "versus_L", "difference", "stderr", "n_docs")


@dataclass
class Difference:
    """``metric@length`` of run ``label`` minus ``metric@versus_length`` of ``versus``, same documents."""

    label: str
    versus: str
    metric: str
    length: int
    versus_length: int
    difference: float
    stderr: float
    n_docs: int

    def cells(self) -> list:
        """The fields in DIFFERENCE_HEADER order."""
        return list(astuple(self))


def paired(x: Row, y: Row) -> Difference | None:
    """``x`` minus ``y`` on the documents both scored (None when they share none)."""
    docs = sorted(set(x.sums) & set(y.sums))  # matched by (doc_index, text sha1)
    if not docs:
        return None
    value, stderr = paired_difference(
        [x.sums[d] for d in docs], [y.sums[d] for d in docs], catalogue.transform(x.metric)
    )
    return Difference(x.run, y.run, x.metric, x.length, y.length, value, stderr, len(docs))


def _runs(rows: Iterable[Row]) -> list[str]:
    """Run labels in the order the rows give them."""
    return list(dict.fromkeys(r.run for r in rows))


def between_runs(rows: Sequence[Row], baseline: str, measures: Sequence[tuple[str, str]]) -> list[Difference]:
    """Every other run minus ``baseline``, per measured (task, metric) and length both report."""
    table, out = index(rows), []
    for run in _runs(rows):
        if run == baseline:
            continue
        for task, metric in measures:
            mine, theirs = lengths_of(rows, task, metric, run), lengths_of(rows, task, metric, baseline)
            for L in sorted(set(mine) & set(theirs)):
                difference = paired(table[run, task, metric, L], table[baseline, task, metric, L])
                out += [difference] if difference else []
    return out


def between_lengths(rows: Sequence[Row], measures: Sequence[tuple[str, str]]) -> list[Difference]:
    """Within each run, every length minus the shortest length, per measured (task, metric)."""
    table, out = index(rows), []
    for run in _runs(rows):
        for task, metric in measures:
            lengths = lengths_of(rows, task, metric, run)
            for L in lengths[1:]:
                difference = paired(table[run, task, metric, L], table[run, task, metric, lengths[0]])
                out += [difference] if difference else []
    return out
