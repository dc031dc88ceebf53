"""The figure: the catalogue's plot metrics (perplexity, symKL, SCE) against context length, with error bars.

One column per metric; one row per group of results that measured the same thing (see
grouping.py), so results that measured different tokens never share a panel. matplotlib
is imported only here, and only its object API (no pyplot): the caller's backend stays as is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting import grouping
from lm_eval_longshort.reporting.runs import ReportingError, Run, finite
from lm_eval_longshort.reporting.tables import short_task

PLOT_DPI = 120


def panel_metrics() -> tuple[str, ...]:
    """The metrics drawn as panels (the catalogue's ``plot`` entries), in catalogue order."""
    return catalogue.names(plot=True)


@dataclass
class Series:
    """One line: ``metric`` of (run, task) at ``lengths``, with standard errors (NaN: none)."""

    run: Run
    task: str
    lengths: list[int]
    values: list[float]
    errors: list[float]


def length_label(length: int) -> str:
    """Tick label for a context length: 1024 -> "1k", 1536 -> "1.5k", 1000 -> "1000"."""
    if length >= 1024 and length % 512 == 0:
        k = length / 1024
        return f"{k:g}k"
    return str(length)


def check_output_path(path: str | Path) -> Path:
    """The figure path, if matplotlib can write its extension; else a ReportingError naming the fix.

    Checked before any drawing: without it ``-o x.pdfx`` ends in a matplotlib traceback and
    ``-o noext`` silently writes ``noext.png``.
    """
    from matplotlib.figure import Figure

    out = Path(path)
    formats = sorted(Figure().canvas.get_supported_filetypes())
    suffix = out.suffix.lower().lstrip(".")
    known = ", ".join(f".{f}" for f in formats)
    if not suffix:
        raise ReportingError(f"-o {out}: no file extension; add one, e.g. -o {out}.png (known: {known})")
    if suffix not in formats:
        raise ReportingError(f"-o {out}: matplotlib cannot write '.{suffix}' files; use one of {known}")
    return out


def _series(members: Iterable[tuple[Run, str]], metric: str) -> list[Series]:
    """A Series per (run, task) reporting ``metric`` with at least one finite value."""
    out = []
    for run, task in members:
        points = sorted(run.per_length.get(task, {}).get(metric, {}).items())
        if any(finite(v) for _, v in points):
            errors = [run.error(task, metric, L) for L, _ in points]
            out.append(
                Series(
                    run,
                    task,
                    [L for L, _ in points],
                    [v for _, v in points],
                    [e if finite(e) else math.nan for e in errors],
                )
            )
    return out


def _panels(
    runs: Sequence[Run], by_kind: dict[str, list[grouping.Group]]
) -> list[tuple[str, list[tuple[grouping.Group, list[Series]]]]]:
    """[(metric, [(group, its series)])]: the columns, each with one entry per drawable group."""
    columns = []
    metrics = panel_metrics()
    for metric in metrics:
        kind = catalogue.get(metric).kind
        cells = [(g, s) for g in by_kind.get(kind, []) if (s := _series(g.members, metric))]
        if cells:
            columns.append((metric, cells))
    if columns:
        return columns
    if any(run.tasks_with(metrics) for run in runs):
        raise ReportingError(
            f"nothing to plot: every {_words(metrics, 'and')} value in these results is NaN; "
            "see skipped_docs in `lm-eval-longshort report` and use longer documents or shorter lengths"
        )
    raise ReportingError(
        f"nothing to plot: no run has per-length {_words(metrics, 'or')} metrics "
        "(run the longshort_ppl_* / longshort_misalign_* tasks first)"
    )


def _words(names: Sequence[str], conjunction: str) -> str:
    """``ppl, symkl and sce``."""
    return f" {conjunction} ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else list(names))


def _wants_log_y(values: Iterable[float]) -> bool:
    """Log y when all finite values are positive and span more than 10x."""
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def finish_length_axes(ax, series: Sequence[Series], trained_context: int | None) -> None:
    """x ticks at the evaluated lengths (plus a dashed trained-context line), log y when values span >10x."""
    ticks = sorted({L for s in series for L in s.lengths})
    if trained_context:
        ax.axvline(
            trained_context,
            color="0.4",
            linestyle="--",
            linewidth=1.2,
            label=f"trained context ({length_label(trained_context)})",
        )
        ticks = sorted(set(ticks) | {trained_context})
    _format_length_axis(ax, ticks)
    if _wants_log_y(v for s in series for v in s.values):
        _log_y_axis(ax)


def _draw_panel(
    ax, series: Sequence[Series], metric: str, colours: dict[str, str], trained_context: int | None, subtitle: str
) -> None:
    """One metric vs context length: a line per run with ±1 standard-error bars."""
    for s in series:
        errors = [e if math.isfinite(e) else 0.0 for e in s.errors]  # no bar where no error
        ax.errorbar(
            s.lengths,
            s.values,
            yerr=errors if any(errors) else None,
            marker="o",
            markersize=4,
            capsize=3,
            color=colours[s.run.label],
            label=s.run.label,
        )
    finish_length_axes(ax, series, trained_context)
    ax.set_title(f"{catalogue.title(metric)}\n{subtitle}", fontsize=10)
    ax.set_ylabel(catalogue.label(metric))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _log_y_axis(ax) -> None:
    """Log y with plain-number ticks at 1-2-5 steps (bare powers of ten are hard to read)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _format_length_axis(ax, ticks: Sequence[int]) -> None:
    """log2 x axis with ticks exactly at the evaluated lengths (1k, 4k, 12k, ...)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(ticks)))
    ax.xaxis.set_minor_locator(NullLocator())  # log minor ticks would add unlabeled clutter
    ax.set_xticklabels([length_label(L) for L in ticks], rotation=45 if len(ticks) > 8 else 0, fontsize=9)
    ax.set_xlabel("context length L (tokens)")


def _subtitle(group: grouping.Group, series: Sequence[Series], groups: Sequence[grouping.Group]) -> str:
    """The task, plus what sets this group apart when its kind has several groups."""
    text = short_task(series[0].task)
    if len(groups) > 1:
        index = next(i for i, g in enumerate(groups, 1) if g is group)
        text += f" · group {index}: {grouping.settings_text(group, grouping.differing_keys(groups))}"
    return text


def plot_runs(
    runs: Sequence[Run], out_path: str | Path, trained_context: int | None = None, title: str | None = None
) -> Path:
    """Save a figure of perplexity (and symKL / SCE, if present) vs context length (:func:`draw_runs`)."""
    return _save(draw_runs, runs, out_path, trained_context, title)


def _save(draw, runs: Sequence[Run], out_path: str | Path, trained_context: int | None, title: str | None) -> Path:
    """Check the path, draw ``draw(runs, trained_context, title)`` and save it there."""
    out = check_output_path(out_path)
    fig = draw(runs, trained_context, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=PLOT_DPI)
    return out


def draw_runs(runs: Sequence[Run], trained_context: int | None = None, title: str | None = None):
    """The figure (a matplotlib Figure): a column per ``plot`` metric of the catalogue.

    Columns: metrics; rows: groups of results that measured the same thing (one row when
    all did). Each panel has a line per run with standard-error bars where reported.
    """
    from matplotlib.figure import Figure

    if not runs:
        raise ReportingError("no runs to plot")
    by_kind = grouping.groups_by_kind(runs)
    columns = _panels(runs, by_kind)
    n_rows = max(len(cells) for _, cells in columns)
    fig = Figure(figsize=(5.6 * len(columns), 4.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    colours = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for col, (metric, cells) in enumerate(columns):
        for row in range(n_rows):
            if row >= len(cells):
                axes[row][col].set_axis_off()
                continue
            group, series = cells[row]
            subtitle = _subtitle(group, series, by_kind[catalogue.get(metric).kind])
            _draw_panel(axes[row][col], series, metric, colours, trained_context, subtitle)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- the distribution of misalignment

# One line style per distribution summary (p50, p90, p99, max), in catalogue order.
SUMMARY_STYLES = ("-", "--", "-.", ":")


def distribution_summaries() -> dict[str, tuple[str, ...]]:
    """{per-position metric: its distribution summaries in catalogue order} (symkl: p50, p90, p99, max)."""
    return {
        of: tuple(m.name for m in catalogue.metrics(per_length=True) if m.of == of) for of in catalogue.summarised()
    }


def draw_distribution(runs: Sequence[Run], trained_context: int | None = None, title: str | None = None):
    """The figure of ``plot --distribution``: per summarised metric (symkl) and group of results
    that measured the same thing, one panel of its percentiles and maximum against context length
    (a colour per run, a line style per summary; no error bars: a percentile has no standard error)."""
    from matplotlib.figure import Figure

    by_kind = grouping.groups_by_kind(runs)
    panels = []  # (per-position metric, group, {summary: its series})
    for of, summaries in distribution_summaries().items():
        for group in by_kind.get(catalogue.get(of).kind, []):
            lines = {m: series for m in summaries if (series := _series(group.members, m))}
            if lines:
                panels.append((of, group, lines))
    if not panels:
        names = _words([m for summaries in distribution_summaries().values() for m in summaries], "or")
        raise ReportingError(
            f"nothing to plot: no run reports {names} per length (the distribution of misalignment: "
            "run a longshort_misalign_* task with mode dense)"
        )
    fig = Figure(figsize=(6.4, 4.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    colours = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, (of, group, lines) in zip(axes, panels, strict=True):
        drawn = []
        for style, (summary, series) in zip(itertools.cycle(SUMMARY_STYLES), lines.items()):
            for line in series:
                colour, label = colours[line.run.label], f"{line.run.label} {summary}"
                ax.plot(line.lengths, line.values, linestyle=style, marker="o", markersize=3, color=colour, label=label)
            drawn += series
        finish_length_axes(ax, drawn, trained_context)
        subtitle = _subtitle(group, drawn, by_kind[catalogue.get(of).kind])
        ax.set_title(f"Distribution of per-position {of}: percentiles and maximum\n{subtitle}", fontsize=10)
        ax.set_ylabel(catalogue.label(next(iter(lines))))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def plot_distribution(
    runs: Sequence[Run], out_path: str | Path, trained_context: int | None = None, title: str | None = None
) -> Path:
    """Save :func:`draw_distribution`'s figure."""
    return _save(draw_distribution, runs, out_path, trained_context, title)
