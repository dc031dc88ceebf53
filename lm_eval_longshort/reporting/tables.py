"""What ``report`` prints: per-length tables, scalar lines and the ± note (rendered by writers.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting import grouping, longtable
from lm_eval_longshort.reporting.runs import Run, finite
from lm_eval_longshort.reporting.writers import render_table

NO_KEY_TOKENS = "no key tokens"


def format_value(value: float | None) -> str:
    """5 significant digits; blank for a missing cell, "nan" for a NaN one."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    return f"{value:.5g}"


def format_with_error(value: float | None, error: float | None) -> str:
    """``"21.5±0.31"`` (value to 5 digits, standard error to 2); the value alone without one."""
    text = format_value(value)
    if text and finite(value) and finite(error):
        text += f"±{error:.2g}"
    return text


def short_task(task: str) -> str:
    """``longshort_ppl_shakespeare`` -> ``ppl_shakespeare`` (column and legend titles)."""
    return task.removeprefix("longshort_")


def _columns(run: Run) -> list[tuple[str, str]]:
    """(task, metric) columns: ppl tasks first, then misalign tasks, each with the catalogue's
    per-length metrics of its kind in catalogue order (``catalogue.shown``).

    Per-length metrics the catalogue does not list are appended so nothing is hidden.
    """
    columns: list[tuple[str, str]] = []
    for kind in catalogue.KINDS:
        known = catalogue.names(kind)
        for task in run.tasks_with(known):
            extra = sorted(set(run.per_length[task]) - set(known))
            columns += [(task, m) for m in (*catalogue.shown(kind, run.per_length[task]), *extra)]
    return columns


def format_length_table(run: Run) -> str:
    """One row per context length (ascending); columns ppl/bpb per ppl task, then
    symkl/sce/js/top1/tv per misalign task (``_columns``), each value of the run's long table
    with ±its standard error where the results hold one; missing cells blank."""
    columns = _columns(run)
    if not columns:
        return "(no per-length metrics: were these longshort_* tasks?)"
    table = longtable.index(longtable.run_rows(run))

    def cell(task: str, metric: str, length: int) -> str:
        row = table.get((run.label, task, metric, length))
        return format_with_error(row.value, row.stderr) if row else ""

    header = ["L"] + [metric for _, metric in columns]
    rows = [[str(L)] + [cell(t, m, L) for t, m in columns] for L in run.lengths]
    groups = [("", 1)]
    for task in dict.fromkeys(t for t, _ in columns):
        groups.append((short_task(task), sum(1 for t, _ in columns if t == task)))
    return render_table(header, rows, groups)


def _documents(n: int) -> str:
    return f"{n} document" if n == 1 else f"{n} documents"


def _scalar_text(run: Run, task: str, name: str, value: float, error: float | None) -> str:
    """``name=value±error``; a NaN keyppl means no target was a key token, and says so.

    keyppl pools key tokens; when they all came from one document, the delta-method error
    over documents is 0 by construction (not certainty): no ± then, and the line says why.
    """
    if name == "keyppl" and math.isnan(value):
        return f"keyppl: {NO_KEY_TOKENS}"
    if name == "keyppl":
        n_key_docs = run.contributing_documents(task, "keyppl")
        if n_key_docs is not None and n_key_docs < 2:
            return f"keyppl={format_value(value)} (no standard error: key tokens in {_documents(n_key_docs)} only)"
    return f"{name}={format_with_error(value, error)}"


def format_scalars(run: Run) -> str:
    """One line per task with its non-per-length metrics (ppl@max, keyppl, key_frac, ...)."""
    lines = []
    for task in sorted(run.scalars):
        errors = run.scalar_stderr.get(task, {})
        items = "  ".join(_scalar_text(run, task, k, v, errors.get(k)) for k, v in sorted(run.scalars[task].items()))
        if items:
            lines.append(f"{short_task(task)}: {items}")
    return "\n".join(lines)


def _too_few_documents(run: Run) -> dict[str, int]:
    """Tasks with per-length metrics that scored fewer than 2 documents (no standard error possible)."""
    counts = {task: run.scored_documents(task) for task in run.per_length}
    return {task: n for task, n in counts.items() if n is not None and n < 2}


def _error_note(run: Run) -> str:
    """What ± means, when any cell has one; else why the file holds no standard errors.

    Fewer than 2 scored documents is named before ``--bootstrap_iters 0``: a standard error
    over documents needs at least 2, whatever lm-eval was asked for.
    """
    few = _too_few_documents(run)
    few_text = ", ".join(f"{short_task(t)} {_documents(n)}" for t, n in sorted(few.items()))
    need = "a standard error over documents needs at least 2"
    if not any(finite(se) for metrics in run.stderr.values() for v in metrics.values() for se in v.values()):
        if few and len(few) == len(run.per_length):
            also = " (lm_eval also ran with --bootstrap_iters 0)" if run.bootstrap_iters == 0 else ""
            counts = set(few.values())
            scored = f"only {_documents(counts.pop())} scored" if len(counts) == 1 else f"scored: {few_text}"
            return f"(no standard errors: {scored}; {need}){also}"
        if run.bootstrap_iters == 0:
            return "(no standard errors in these results: lm_eval ran with --bootstrap_iters 0)"
        if run.bootstrap_iters is None:
            return "(no standard errors in these results: lm_eval ran with --bootstrap_iters 0, or an older version)"
        return "(no standard errors in these results)"
    methods = sorted({str((r or {}).get("stderr")) for r in run.longshort.values() if r and r.get("stderr")})
    how = f" ({', '.join(methods)} method)" if methods else ""
    note = f"± = standard error over documents{how}"
    return f"{note}; none where too few documents were scored ({few_text}; {need})" if few else note


def run_title(run: Run) -> str:
    """``== label  [hf, float32]  (path)``: who, on which backend and dtype, from where."""
    return f"== {run.label}  [{run.backend}, {run.dtype}]  ({run.path})"


def format_run_report(run: Run) -> str:
    """Title, per-length table, scalar lines and the ± note of one run."""
    parts = [run_title(run), format_length_table(run)]
    scalars = format_scalars(run)
    if scalars:
        parts.append(scalars)
    if _columns(run):
        parts.append(_error_note(run))
    return "\n".join(parts)


def format_report(runs: Sequence[Run]) -> str:
    """What ``report`` prints: each run's report, then which runs measured different things."""
    text = "\n\n".join(format_run_report(run) for run in runs)
    notes = grouping.describe_all(runs) if len(runs) > 1 else ""
    return f"{text}\n\n{notes}" if notes else text
