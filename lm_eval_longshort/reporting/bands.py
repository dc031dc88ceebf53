"""Sweep figures: a metric against context length with error bands, and misalignment vs perplexity.

``plots.py`` draws ``plot``'s figure (error bars, one row per comparable group); a sweep's runs
all measured the same thing, so here each panel is one (task, metric) with a line per run and a
shaded ±1 standard-error band, and a scatter panel puts each run's misalignment@L against its
perplexity. Colours follow the order of ``labels`` in every figure of a report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting import plots
from lm_eval_longshort.reporting.runs import ReportingError, Run, finite


@dataclass
class Panel:
    """One axes: ``metric`` of ``task`` for every run that reports it."""

    task: str
    metric: str
    title: str = ""


@dataclass
class ScatterPanel:
    """One scatter: x = ``metric``@L of ``misalign_task``, y = ``ppl_metric``@(L or ``ppl_length``)."""

    misalign_task: str
    metric: str
    ppl_task: str
    ppl_metric: str = "ppl"
    ppl_length: int | None = None  # None: the same L as x
    title: str = ""
    lengths: list[int] = field(default_factory=list)  # empty: every length both report


def colours_for(labels: Sequence[str]) -> dict[str, str]:
    """A matplotlib colour per run label, fixed by order (C0, C1, ...)."""
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def _draw_bands(ax, runs: Sequence[Run], panel: Panel, colours: dict[str, str], trained_context: int | None) -> bool:
    """Lines with ±1 stderr bands; False when no run has a finite value for this panel."""
    series = plots._series([(run, panel.task) for run in runs], panel.metric)
    if not series:
        return False
    for s in series:
        colour = colours.get(s.run.label, "0.3")
        ax.plot(s.lengths, s.values, marker="o", markersize=4, color=colour, label=s.run.label)
        lo = [v - e if math.isfinite(e) else v for v, e in zip(s.values, s.errors)]
        hi = [v + e if math.isfinite(e) else v for v, e in zip(s.values, s.errors)]
        ax.fill_between(s.lengths, lo, hi, color=colour, alpha=0.18, linewidth=0)
    plots.finish_length_axes(ax, series, trained_context)
    ax.set_title(panel.title or f"{panel.metric} · {panel.task}", fontsize=10)
    ax.set_ylabel(catalogue.label(panel.metric))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True


def _figure(n_panels: int, columns: int):
    from matplotlib.figure import Figure

    columns = max(1, min(columns, n_panels))
    rows = math.ceil(n_panels / columns)
    fig = Figure(figsize=(5.6 * columns, 4.4 * rows), layout="constrained")
    return fig, [ax for row in fig.subplots(rows, columns, squeeze=False) for ax in row]


def plot_length_bands(
    runs: Sequence[Run],
    panels: Sequence[Panel],
    out_path: str | Path,
    trained_context: int | None = None,
    title: str | None = None,
    columns: int = 2,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save one panel per (task, metric): value vs context length, a line and band per run."""
    return _save(
        runs,
        len(panels),
        out_path,
        columns,
        labels,
        title,
        "no finite value in any panel",
        lambda ax, i, colours: _draw_bands(ax, runs, panels[i], colours, trained_context),
    )


def _save(runs, n_panels, out_path, columns, labels, title, empty, draw) -> Path:
    """Lay out ``n_panels`` axes, ``draw(ax, i, colours)`` each, hide the empty ones, save."""
    out = plots.check_output_path(out_path)
    fig, axes = _figure(n_panels, columns)
    colours = colours_for(labels or [r.label for r in runs])
    drawn = [draw(ax, i, colours) for i, ax in enumerate(axes[:n_panels])]
    if not any(drawn):
        raise ReportingError(f"nothing to plot for {out.name}: {empty}")
    for ax, ok in zip(axes, drawn + [False] * (len(axes) - len(drawn))):
        if not ok:
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=plots.PLOT_DPI)
    return out


def scatter_points(run: Run, panel: ScatterPanel) -> list[tuple[int, float, float]]:
    """(L, misalignment@L, perplexity) of one run where both are finite."""
    points = []
    for L in panel.lengths or run.lengths:
        x = run.value(panel.misalign_task, panel.metric, L)
        y = run.value(panel.ppl_task, panel.ppl_metric, panel.ppl_length or L)
        if finite(x) and finite(y):
            points.append((L, float(x), float(y)))
    return points


def _draw_scatter(ax, runs: Sequence[Run], panel: ScatterPanel, colours: dict[str, str]) -> bool:
    """A point per (run, L), coloured by run, marker by L; False when there is no point."""
    markers = "osD^v<>Ph*"
    lengths = sorted({L for run in runs for L, _, _ in scatter_points(run, panel)})
    any_point = False
    for run in runs:
        for L, x, y in scatter_points(run, panel):
            ax.scatter(
                x,
                y,
                color=colours.get(run.label, "0.3"),
                marker=markers[lengths.index(L) % len(markers)],
                s=36,
                label=f"{run.label} · L={plots.length_label(L)}",
            )
            any_point = True
    if not any_point:
        return False
    xs = [x for run in runs for _, x, _ in scatter_points(run, panel)]
    ys = [y for run in runs for _, _, y in scatter_points(run, panel)]
    if plots._wants_log_y(xs):
        ax.set_xscale("log")
    if plots._wants_log_y(ys):
        plots._log_y_axis(ax)
    versus = f"@{plots.length_label(panel.ppl_length)}" if panel.ppl_length else "@L"
    ax.set_xlabel(f"{panel.metric}@L ({panel.misalign_task})")
    ax.set_ylabel(f"{panel.ppl_metric}{versus} ({panel.ppl_task})")
    ax.set_title(panel.title or f"{panel.metric}@L vs {panel.ppl_metric}{versus}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=2)
    return True


def plot_scatter(
    runs: Sequence[Run],
    panels: Sequence[ScatterPanel],
    out_path: str | Path,
    title: str | None = None,
    columns: int = 2,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save misalignment@L against perplexity, one panel per ScatterPanel."""
    return _save(
        runs,
        len(panels),
        out_path,
        columns,
        labels,
        title,
        "no run has both metrics at any length",
        lambda ax, i, colours: _draw_scatter(ax, runs, panels[i], colours),
    )
