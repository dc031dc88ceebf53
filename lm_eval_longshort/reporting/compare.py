"""``compare``: runs side by side, paired differences with standard errors, correlations.

For one ppl task and one misalign task, across runs: the per-(run, L) values (from the long
table, longtable.py); the paired difference of every run from a baseline run and of every
length from the shortest length of the same run, on the same documents (differences.py); and
Pearson / Spearman correlations (correlation.py) of misalignment@L with perplexity@L, per
length and pooled. The columns are the catalogue's per-length metrics of each kind. Runs with only one of the two
kinds (e.g. perplexity only) get values and paired differences of that kind, without
correlations. Runs whose results measured different things (grouping.py) are refused,
naming the keys that differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting import grouping
from lm_eval_longshort.reporting.correlation import Correlation, correlate, pearson, spearman
from lm_eval_longshort.reporting.differences import DIFFERENCE_HEADER, Difference, between_lengths, between_runs
from lm_eval_longshort.reporting.longtable import Row, index, long_table
from lm_eval_longshort.reporting.runs import ReportingError, Run, finite
from lm_eval_longshort.reporting.tables import format_value, format_with_error, short_task
from lm_eval_longshort.reporting.writers import csv_text, render_table, write_text

__all__ = ["CompareResult", "Correlation", "Difference", "compare_runs", "pearson", "spearman"]

_SMALL_N_NOTE = "n = points with both metrics finite; with n = 2 |r| = |rho| = 1 trivially."
_CORR_HEADER = ["L", "n", "pearson_r", "spearman_rho"]
_DIFF_HEADER = list(DIFFERENCE_HEADER)


# --------------------------------------------------------------------------- the result


@dataclass
class CompareResult:
    """Per-(run, L) rows, paired differences and misalignment-vs-perplexity correlations."""

    misalign_metric: str
    ppl_metric: str
    misalign_task: str | None  # None: no run reports misalignment (no correlations)
    ppl_task: str | None  # None: no run reports perplexity (no correlations)
    columns: list[str]
    rows: list[dict]
    per_length: list[Correlation]
    pooled: Correlation | None  # None when there is nothing to correlate (one kind only)
    runs: list[Run] = field(default_factory=list)
    between_runs: list[Difference] = field(default_factory=list)
    between_lengths: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def correlated(self) -> bool:
        """Whether both kinds were measured, so misalignment and perplexity are correlated."""
        return self.misalign_task is not None and self.ppl_task is not None

    @property
    def _what(self) -> str:
        sides = [
            f"{metric}@L ({short_task(task)})"
            for metric, task in ((self.misalign_metric, self.misalign_task), (self.ppl_metric, self.ppl_task))
            if task is not None
        ]
        return " vs ".join(sides)

    @property
    def _correlations(self) -> list[Correlation]:
        return [*self.per_length, self.pooled] if self.pooled is not None else list(self.per_length)

    def _run_cells(self) -> list[list[str]]:
        return [[r.label, r.backend, r.dtype, str(r.path)] for r in self.runs]

    def _row_cells(self) -> list[list[str]]:
        return [
            [
                str(r.get(c, ""))
                if c in ("label", "L")
                else format_with_error(r.get(c), r.get(catalogue.key(c, stderr=True)))
                for c in self.columns
            ]
            for r in self.rows
        ]

    def _corr_cells(self) -> list[list[str]]:
        return [
            [
                "pooled" if c.length is None else str(c.length),
                str(c.n),
                format_value(c.pearson),
                format_value(c.spearman),
            ]
            for c in self._correlations
        ]

    @staticmethod
    def _diff_cells(diffs: Sequence[Difference]) -> list[list[str]]:
        return [
            [
                d.label,
                d.versus,
                d.metric,
                str(d.length),
                str(d.versus_length),
                format_value(d.difference),
                format_value(d.stderr),
                str(d.n_docs),
            ]
            for d in diffs
        ]

    def _sections(self) -> list[tuple[str, list[str], list[list[str]], int]]:
        """(title, header, rows, n left-aligned columns) of every table, in print order."""
        sections = [
            ("Runs", ["label", "backend", "dtype", "results"], self._run_cells(), 4),
            ("Values (± standard error over documents)", self.columns, self._row_cells(), 1),
        ]
        if self.between_runs:
            sections.append(
                (
                    "Paired differences between runs on the same documents (label - versus)",
                    _DIFF_HEADER,
                    self._diff_cells(self.between_runs),
                    3,
                )
            )
        if self.between_lengths:
            sections.append(
                (
                    "Paired differences between lengths of one run (L - versus_L)",
                    _DIFF_HEADER,
                    self._diff_cells(self.between_lengths),
                    3,
                )
            )
        if self.correlated:
            sections.append((f"Correlation across runs of {self._what}", _CORR_HEADER, self._corr_cells(), 0))
        return sections

    @property
    def _footnotes(self) -> list[str]:
        return [_SMALL_N_NOTE, *self.notes] if self.correlated else list(self.notes)

    def to_text(self) -> str:
        """Aligned plain-text tables for a terminal."""
        parts = []
        for title, header, rows, left in self._sections():
            parts += [title, render_table(header, rows, left=left), ""]
        return "\n".join(parts + self._footnotes)

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown: one section per table."""
        parts = [f"## {self._what}", ""]
        for title, header, rows, _ in self._sections():
            parts += [f"### {title}", "", render_table(header, rows, markdown=True), ""]
        notes = [f"_{n}_" for n in self.notes]
        return "\n".join(parts + ([f"_{_SMALL_N_NOTE}_", "", *notes] if self.correlated else notes))

    def to_csv(self, path: str | Path, table: str = "rows") -> Path:
        """Write ``table`` = "rows" (one line per run and L), "correlations" or "differences"."""
        if table == "rows":
            header = [*self.columns, *(catalogue.key(c, stderr=True) for c in self.columns[2:])]
            body = [[r.get(c) for c in header] for r in self.rows]
        elif table == "correlations":
            header = _CORR_HEADER
            body = [
                ["pooled" if c.length is None else c.length, c.n, c.pearson, c.spearman] for c in self._correlations
            ]
        elif table == "differences":
            header = _DIFF_HEADER
            body = [d.cells() for d in (*self.between_runs, *self.between_lengths)]
        else:
            raise ValueError(f"table must be 'rows', 'correlations' or 'differences', got {table!r}")
        return write_text(path, csv_text(header, body))


# --------------------------------------------------------------------------- compare_runs


def _pick_task(runs: Sequence[Run], metric: str, requested: str | None, flag: str) -> str:
    """The single task providing ``metric``, or the one ``requested`` (full or short name)."""
    candidates = sorted({t for r in runs for t in r.tasks_with([metric])})
    if not candidates:
        available = sorted({m for r in runs for t in r.per_length.values() for m in t})
        raise ReportingError(
            f"no run reports per-length '{metric}'; per-length metrics present: {', '.join(available) or 'none'}"
        )
    if requested:
        matches = [t for t in candidates if t == requested or short_task(t) == requested or t.endswith("_" + requested)]
        if len(matches) != 1:
            raise ReportingError(
                f"{flag} {requested!r} matches {len(matches)} of the tasks reporting '{metric}': "
                f"{', '.join(candidates)}"
            )
        return matches[0]
    if len(candidates) > 1:
        raise ReportingError(f"several tasks report '{metric}': {', '.join(candidates)}; choose one with {flag}")
    return candidates[0]


def _pick_side(runs: Sequence[Run], metric: str, family: Sequence[str], requested: str | None, flag: str) -> str | None:
    """The task of one side (perplexity or misalignment), or None when no run reports any
    metric of ``family`` and no task was asked for: that side is then left out."""
    if requested is None and not any(r.tasks_with([*family, metric]) for r in runs):
        return None
    return _pick_task(runs, metric, requested, flag)


def check_comparable(runs: Sequence[Run], task: str, kind: str) -> None:
    """Refuse (ReportingError naming the differing keys and the groups) unless every run's
    result of ``task`` measured the same thing."""
    members = [(run, task) for run in runs if task in run.per_length]
    groups = grouping.group_results(members, kind)
    if len(groups) > 1:
        raise ReportingError(
            f"{grouping.describe_split(groups)}\n"
            "compare only compares runs that measured the same thing: pass the runs of one group, "
            "or rerun the others with the same --metadata, corpus and --limit/--samples"
        )


def _pick_baseline(runs: Sequence[Run], baseline: str | None) -> Run:
    """The run labelled ``baseline`` (default: the first run)."""
    if baseline is None:
        return runs[0]
    for run in runs:
        if run.label == baseline:
            return run
    raise ReportingError(f"--baseline {baseline!r} is not a run label; labels: {', '.join(r.label for r in runs)}")


def _cell(table: dict, run: Run, task: str | None, metric: str, length: int) -> Row | None:
    return table.get((run.label, task, metric, length))


def _table_rows(runs: Sequence[Run], table: dict, sides: Sequence[tuple[str, str, Sequence[str]]]):
    """(rows, per-length correlations, pooled points) for the lengths 2+ runs report.

    ``sides``: (task, metric, columns) of the perplexity side, then of the misalignment side,
    for the sides measured; a length counts for a run when either side's metric is finite
    there. With one side only there are rows but no correlations.
    """

    def value(run: Run, task: str, metric: str, length: int) -> float | None:
        row = _cell(table, run, task, metric, length)
        return row.value if row else None

    def present(run: Run, length: int) -> bool:
        return any(finite(value(run, task, metric, length)) for task, metric, _ in sides)

    rows, per_length, pooled = [], [], []
    for L in sorted({length for (_, _, _, length) in table if length is not None}):
        members = [r for r in runs if present(r, L)]
        if len(members) < 2:
            continue
        points = []
        for run in members:
            row = {"label": run.label, "L": L}
            for task, _, cols in sides:
                cells = {m: _cell(table, run, task, m, L) for m in cols}
                row |= {m: c.value if c else None for m, c in cells.items()}
                row |= {catalogue.key(m, stderr=True): c.stderr if c else None for m, c in cells.items()}
            rows.append(row)
            if len(sides) == 2:
                (p_task, ppl_metric, _), (m_task, misalign_metric, _) = sides
                x, y = value(run, m_task, misalign_metric, L), value(run, p_task, ppl_metric, L)
                points += [(x, y)] if finite(x) and finite(y) else []
        if len(sides) == 2:
            per_length.append(correlate([x for x, _ in points], [y for _, y in points], L))
        pooled += points
    return rows, per_length, pooled


def _columns(runs: Sequence[Run], task: str, kind: str, metric: str, taken: Sequence[str] = ()) -> list[str]:
    """The catalogue's per-length metrics of ``kind`` that ``task`` shows (plus ``metric``), less those ``taken``."""
    reported = {m for run in runs for m in run.per_length.get(task, {})}
    return [m for m in dict.fromkeys([*catalogue.shown(kind, reported), metric]) if m not in taken]


def compare_runs(
    runs: Sequence[Run],
    misalign_metric: str = "symkl",
    ppl_metric: str = "ppl",
    ppl_task: str | None = None,
    misalign_task: str | None = None,
    baseline: str | None = None,
) -> CompareResult:
    """Rows per (run, L), paired differences and per-L / pooled correlations.

    A length enters the rows and correlations when at least 2 runs report a finite
    ``misalign_metric`` or ``ppl_metric`` there; correlations use the runs with both
    finite. The tasks are found automatically when only one task reports each metric
    (else pass ``ppl_task`` / ``misalign_task``, full or short name). When no run reports
    any misalignment metric (or any perplexity metric) and no such task is asked for, that
    side is left out: values and paired differences of the other, no correlations.
    Differences between runs are taken against ``baseline`` (a run label; default the first run).
    """
    p_task = _pick_side(runs, ppl_metric, catalogue.names("ppl"), ppl_task, "--ppl-task")
    m_task = _pick_side(runs, misalign_metric, catalogue.names("misalign"), misalign_task, "--misalign-task")
    if p_task is None and m_task is None:
        available = sorted({m for r in runs for t in r.per_length.values() for m in t})
        raise ReportingError(
            "no run reports per-length perplexity or misalignment metrics (were these longshort_* tasks?); "
            f"per-length metrics present: {', '.join(available) or 'none'}"
        )
    for task, kind in ((p_task, "ppl"), (m_task, "misalign")):
        if task is not None:
            check_comparable(runs, task, kind)
    base = _pick_baseline(runs, baseline)
    ppl_cols = _columns(runs, p_task, "ppl", ppl_metric) if p_task is not None else []
    mis_cols = _columns(runs, m_task, "misalign", misalign_metric, ppl_cols) if m_task is not None else []
    sides = [(t, m, c) for t, m, c in ((p_task, ppl_metric, ppl_cols), (m_task, misalign_metric, mis_cols)) if t]
    values = long_table(runs, {t for t, _, _ in sides})
    rows, per_length, pooled = _table_rows(runs, index(values), sides)
    if not rows:
        which = " or ".join(m for m, t in ((misalign_metric, m_task), (ppl_metric, p_task)) if t is not None)
        raise ReportingError(
            f"no context length is reported by 2 or more runs (for {which}); "
            "compare needs at least two runs evaluated at the same lengths"
        )
    measures = [(t, m) for t, m, _ in sides]
    result = CompareResult(
        misalign_metric,
        ppl_metric,
        m_task,
        p_task,
        ["label", "L", *ppl_cols, *mis_cols],
        rows,
        per_length,
        correlate([x for x, _ in pooled], [y for _, y in pooled]) if len(sides) == 2 else None,
        list(runs),
        between_runs(values, base.label, measures),
        between_lengths(values, measures),
    )
    result.notes = _one_side_note(p_task, m_task) + _notes(runs)
    return result


def _one_side_note(p_task: str | None, m_task: str | None) -> list[str]:
    """Say so when only one kind was measured (hence no correlations)."""
    if m_task is None:
        return [
            "no run reports misalignment (no longshort_misalign_* task): perplexity values and "
            "paired differences only, no misalignment-vs-perplexity correlation"
        ]
    if p_task is None:
        return [
            "no run reports perplexity (no longshort_ppl_* task): misalignment values and "
            "paired differences only, no misalignment-vs-perplexity correlation"
        ]
    return []


def _notes(runs: Sequence[Run]) -> list[str]:
    """A warning when the runs differ in backend or dtype (comparable, but say so)."""
    if len({(r.backend, r.dtype) for r in runs}) > 1:
        return [
            "runs differ in backend or dtype (see Runs): their numbers differ by numeric precision as well as by model"
        ]
    return []
