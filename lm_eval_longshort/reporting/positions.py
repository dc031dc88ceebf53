"""Loss against position: the ``truncate`` protocol's per-position bins, pooled over documents, and their figure.

Each scored document's record (``configs[task].longshort.documents[i].positions``) holds, per bin
of positions ``edges[i] .. edges[i+1]-1``, the NLL sum and the number of targets there. A bin's
value is the token-weighted mean NLL over documents (the catalogue's ``positions`` pool), with the
delta-method standard error over documents like every other metric (docs/metrics.md, "Loss
against position"). ``plot --positions`` and the sweep report draw it: log position axis, the
trained-context line, a ±1 standard-error band, one line per run, one panel per group of
results that measured the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_longshort.numerics import aggregate, catalogue
from lm_eval_longshort.reporting import grouping, plots
from lm_eval_longshort.reporting.runs import ReportingError, Run
from lm_eval_longshort.reporting.tables import short_task


def curve_metric() -> catalogue.Metric:
    """The catalogue's loss-against-position entry (its title, label and protocol)."""
    (metric,) = (m for m in catalogue.metrics("ppl", per_length=False) if m.pool == "positions")
    return metric


@dataclass
class PositionCurve:
    """One run's loss against position for one task: a point per bin with targets in it."""

    run: Run
    task: str
    bins: list[tuple[int, int]]  # [lo, hi): the positions of each drawn bin
    values: list[float]  # pooled mean NLL (nats / token)
    errors: list[float]  # its standard error over documents (NaN with fewer than 2 documents)
    documents: int

    @property
    def positions(self) -> list[float]:
        """Where each bin is drawn: the geometric mean of max(lo, 1) and hi."""
        return [math.sqrt(max(lo, 1) * hi) for lo, hi in self.bins]


def position_curve(run: Run, task: str) -> PositionCurve | None:
    """``task``'s pooled bins in ``run``, or None where its records hold none (not ``truncate``, older files)."""
    docs = [d for d in (run.longshort.get(task) or {}).get("documents") or [] if not d.get("skipped")]
    records = [d.get("positions") for d in docs]
    if not records or any(r is None for r in records):
        return None
    edges = records[0]["edges"]
    if any(r["edges"] != edges for r in records):
        raise ReportingError(f"{run.label}: task {task}'s documents have different position bins; rerun the task")
    curve = PositionCurve(run, task, [], [], [], len(records))
    for i, bin_ in enumerate(zip(edges, edges[1:])):
        pairs = [(r["nll_sum"][i], r["n_targets"][i]) for r in records]
        if sum(n for _, n in pairs) == 0:
            continue  # e.g. position 0 without a BOS: never a target
        curve.bins.append(bin_)
        curve.values.append(aggregate.pooled_ratio(pairs))
        curve.errors.append(aggregate.ratio_stderr(pairs))
    return curve


def _groups_with_curves(
    runs: Sequence[Run], tasks: Sequence[str] | None
) -> list[tuple[grouping.Group, list[PositionCurve]]]:
    """Each group of comparable ppl results that has curves (in grouping order), with its members' curves."""
    out = []
    for group in grouping.groups_by_kind(runs).get("ppl", []):
        curves = [position_curve(run, task) for run, task in group.members if tasks is None or task in tasks]
        if curves := [c for c in curves if c is not None]:
            out.append((group, curves))
    if out:
        return out
    metric = curve_metric()
    used = sorted({str((run.measured(t) or {}).get("protocol", "?")) for run in runs for t in run.ppl_tasks})
    raise ReportingError(
        f"no loss against position in these results: it comes from protocol {' / '.join(metric.only)} only "
        f"(these used {', '.join(used) or 'no perplexity task'}); rerun with --metadata "
        f'\'{{"protocol": "{metric.only[0]}"}}\''
    )


def _draw(ax, curves: Sequence[PositionCurve], colours: dict[str, str], trained_context: int | None, title: str):
    """Loss against position: a line and ±1 standard-error band per run, log2 position axis."""
    for curve in curves:
        colour = colours.get(curve.run.label, "0.3")
        x = curve.positions
        ax.plot(x, curve.values, color=colour, linewidth=1.4, label=f"{curve.run.label} ({curve.documents} docs)")
        lo = [v - e if math.isfinite(e) else v for v, e in zip(curve.values, curve.errors)]
        hi = [v + e if math.isfinite(e) else v for v, e in zip(curve.values, curve.errors)]
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0)
    end = max(hi for c in curves for _, hi in c.bins)
    ticks = [2**j for j in range(0, end.bit_length(), 2 if end > 2**12 else 1)] + [end]
    if trained_context:
        label = f"trained context ({plots.length_label(trained_context)})"
        ax.axvline(trained_context, color="0.4", linestyle="--", linewidth=1.2, label=label)
        ticks.append(trained_context)
    plots._format_length_axis(ax, sorted(set(ticks)))
    ax.set_xlabel("position t (tokens of context before the target)")
    ax.set_ylabel(curve_metric().label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot_positions(
    runs: Sequence[Run],
    out_path: str | Path,
    trained_context: int | None = None,
    title: str | None = None,
    tasks: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save loss against position: a panel per group of comparable results (of ``tasks`` only, when
    given), a line per run; a ReportingError naming ``truncate`` when no result has the bins."""
    from matplotlib.figure import Figure

    out = plots.check_output_path(out_path)
    groups = _groups_with_curves(runs, tasks)
    fig = Figure(figsize=(7.0, 4.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels or [r.label for r in runs])}
    differing = grouping.differing_keys([group for group, _ in groups])
    for ax, (group, curves) in zip(axes, groups):
        heading = f"{curve_metric().title} · {', '.join(sorted({short_task(c.task) for c in curves}))}"
        if len(groups) > 1:
            heading += f"\n{grouping.settings_text(group, differing)}"
        _draw(ax, curves, colours, trained_context, heading)
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=plots.PLOT_DPI)
    return out
