"""One report per sweep: per-length tables, correlations across runs, plots and CSV.

Built only from the runs' own results JSONs (loaded by ``reporting.load_runs``), so the
report can be regenerated at any time, on the long table (reporting/longtable.py) and the
shared writers. Which metrics appear where is the catalogue's (numerics/catalogue.py):
tables, one per (task, ``table`` metric), a row per run and a column per length, each value ±
its standard error (delta method over documents, as lm-eval reported it); correlations of each
``correlate`` metric@L with perplexity across runs, at the same L and at the longest length,
Pearson and Spearman with n and a percentile bootstrap interval over runs (reporting/correlation.py);
the ``plot`` metrics' figures and, for ``truncate`` tasks, loss against position; values.csv,
every value. The Markdown holds no times or absolute paths, so an interrupted-and-resumed sweep
gives the same report as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_eval_longshort import reporting
from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting import bands, correlation, grouping, longtable
from lm_eval_longshort.reporting.correlation import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, LEVEL, Correlation
from lm_eval_longshort.reporting.longtable import Row
from lm_eval_longshort.reporting.runs import Run, finite
from lm_eval_longshort.reporting.tables import format_value, format_with_error
from lm_eval_longshort.reporting.writers import csv_text, render_table

__all__ = ["BOOTSTRAP_DRAWS", "BOOTSTRAP_SEED", "LEVEL", "SweepRuns", "write_report"]

VERSUS = "ppl"  # what misalignment is correlated with: perplexity, at L or at the longest length
REPORT_NAME = "report.md"
CORRELATIONS_HEADER = (
    "task",
    "metric",
    "L",
    "versus",
    "n",
    "pearson",
    "pearson_lo",
    "pearson_hi",
    "spearman",
    "spearman_lo",
    "spearman_hi",
    "runs",
)


# --------------------------------------------------------------------------- correlations


def correlate(x: Sequence[float], y: Sequence[float]) -> tuple[int, float, float, dict]:
    """(n, Pearson r, Spearman rho, bootstrap intervals) over the pairs with both sides finite."""
    c = correlation.correlate(x, y, intervals=True)
    return c.n, c.pearson, c.spearman, {"pearson": c.pearson_ci, "spearman": c.spearman_ci}


def correlation_rows(runs: Sequence[Run], misalign_task: str, ppl_task: str) -> list[Correlation]:
    """Per correlated misalignment metric and length: against ppl at the same L, and against ppl
    at the longest length the ppl task measured (what length generalization is judged by)."""
    ppl_lengths = sorted({L for r in runs for L in r.per_length.get(ppl_task, {}).get(VERSUS, {})})
    if not ppl_lengths:
        return []
    longest = ppl_lengths[-1]
    rows = []
    for metric in catalogue.names("misalign", correlate=True):
        lengths = sorted({L for r in runs for L in r.per_length.get(misalign_task, {}).get(metric, {})})
        for target in ("same", longest):
            for L in lengths:
                x = [r.value(misalign_task, metric, L) for r in runs]
                y = [r.value(ppl_task, VERSUS, L if target == "same" else target) for r in runs]
                c = correlation.correlate(x, y, L, [r.label for r in runs], intervals=True)
                c.task, c.metric = misalign_task, metric
                c.versus = f"{VERSUS}@L" if target == "same" else catalogue.key(VERSUS, longest)
                rows.append(c)
    return rows


# --------------------------------------------------------------------------- tables


def _interval(ci: tuple[float, float]) -> str:
    return "" if not all(map(finite, ci)) else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def metric_table(values: Sequence[Row], labels: Sequence[str], task: str, metric: str) -> str:
    """Markdown: a row per run of ``labels``, a column per length, cells value ± standard error."""
    lengths = longtable.lengths_of(values, task, metric)
    table = longtable.index(values)

    def cell(label: str, length: int) -> str:
        row = table.get((label, task, metric, length))
        return format_with_error(row.value, row.stderr) if row else ""

    rows = [[label] + [cell(label, L) for L in lengths] for label in labels]
    return render_table(["run"] + [f"L={L}" for L in lengths], rows, markdown=True)


def scalar_table(runs: Sequence[Run], task: str) -> str | None:
    """Markdown: the task's scalar table metrics (keyppl, key_frac) ± se per run, or None when it reports none."""
    listed = catalogue.names("ppl", per_length=False, table=True)
    names = [s for s in listed if any(s in r.scalars.get(task, {}) for r in runs)]
    if not names:
        return None
    rows = []
    for r in runs:
        values, errors = r.scalars.get(task, {}), r.scalar_stderr.get(task, {})
        cells = []
        for s in names:
            v = values.get(s)
            cells.append(
                reporting.tables.NO_KEY_TOKENS
                if s == "keyppl" and v is not None and math.isnan(v)
                else format_with_error(v, errors.get(s))
            )
        rows.append([r.label] + cells)
    return render_table(["run", *names], rows, markdown=True)


def correlation_table(rows: Sequence[Correlation]) -> str:
    header = ["metric", "L", "versus", "n", "Pearson r", f"{LEVEL:.0%} CI", "Spearman rho", f"{LEVEL:.0%} CI"]
    cells = [
        [
            c.metric,
            str(c.length),
            c.versus,
            str(c.n),
            format_value(c.pearson),
            _interval(c.pearson_ci),
            format_value(c.spearman),
            _interval(c.spearman_ci),
        ]
        for c in rows
    ]
    return render_table(header, cells, markdown=True)


# --------------------------------------------------------------------------- the report


@dataclass
class SweepRuns:
    """The finished runs and the failed ones.

    Attributes:
        runs: the finished runs, loaded, labelled by run name, in sweep order.
        failed: {run name: its error} of the runs that failed (a run in neither is "not run yet").
    """

    runs: list[Run]
    failed: dict[str, str]


def _kind_tasks(runs: Sequence[Run], kind: str) -> list[str]:
    """Tasks of this kind, in the order the first runs report them."""
    seen = {}
    for run in runs:
        for task in run.per_length:
            if grouping.task_kind(run, task) == kind:
                seen.setdefault(task, None)
    return list(seen)


def _settings_line(runs: Sequence[Run], task: str) -> str:
    """The task's recorded settings and document indices (from the first run that has them)."""
    for run in runs:
        record = run.longshort.get(task)
        if record:
            docs = [d["doc_index"] for d in record.get("documents") or [] if not d.get("skipped")]
            settings = {k: v for k, v in (record.get("settings") or {}).items() if k != "batch_tokens"}
            return f"`{json.dumps(settings, sort_keys=True)}`; documents {docs}"
    return "(no longshort record)"


def _runs_section(sweep, loaded: SweepRuns) -> list[str]:
    by_name = {r.label: r for r in loaded.runs}
    rows = []
    for spec in sweep.runs:
        variant = json.dumps(spec.variant.overrides, sort_keys=True) if spec.variant else "(as is)"
        model = Path(str(spec.model_args.get("pretrained", ""))).name
        run = by_name.get(spec.name)
        status = "finished" if run else "FAILED" if spec.name in loaded.failed else "not run yet"
        rows.append(
            [
                spec.name,
                spec.backend,
                run.dtype if run else str(spec.model_args.get("dtype", "?")),
                model,
                f"`{variant}`",
                status,
            ]
        )
    out = [
        "## Runs",
        "",
        render_table(["run", "backend", "dtype", "model", "config overrides", "status"], rows, markdown=True),
        "",
    ]
    for name, error in loaded.failed.items():
        out += [f"- **{name} failed**: `{error.splitlines()[0] if error else '?'}` (see runs/{name}/failed.json)"]
    return out + ([""] if loaded.failed else [])


def _tables_section(runs: Sequence[Run], values: Sequence[Row]) -> list[str]:
    out = ["## Per-length results (value ± standard error over documents)", ""]
    for kind in catalogue.KINDS:
        for task in _kind_tasks(runs, kind):
            out += [f"### {task}", "", f"Settings: {_settings_line(runs, task)}", ""]
            labels = [r.label for r in runs if task in r.per_length]
            for metric in catalogue.names(kind, table=True):
                if any(metric in r.per_length.get(task, {}) for r in runs):
                    out += [f"**{metric}@L**", "", metric_table(values, labels, task, metric), ""]
            scalars = scalar_table(runs, task) if kind == "ppl" else None
            if scalars:
                out += ["**key tokens** (ladder: targets that long context helps)", "", scalars, ""]
    for kind in catalogue.KINDS:
        for task in _kind_tasks(runs, kind):
            groups = grouping.group_results([(r, task) for r in runs if task in r.per_length], kind)
            if len(groups) > 1:
                out += [
                    f"Note: the runs' {task} results measured different things; do not compare them:",
                    "",
                    "```",
                    grouping.describe_split(groups),
                    "```",
                    "",
                ]
    return out


def noise_table(values: Sequence[Row], tasks: Sequence[str]) -> str:
    """Markdown: per misalignment task and correlated metric, the median relative standard error
    (se / value) over runs and lengths: how precisely each mode measures with these documents."""
    rows = []
    for task in tasks:
        for metric in catalogue.names("misalign", correlate=True):
            ratios = [
                r.stderr / r.value
                for r in values
                if r.task == task and r.metric == metric and r.length is not None
                if finite(r.value) and r.value > 0 and finite(r.stderr)
            ]
            if ratios:
                rows.append([task, metric, f"{float(np.median(ratios)):.3g}", str(len(ratios))])
    return render_table(["task", "metric", "median se / value", "cells"], rows, markdown=True)


def _correlation_section(runs: Sequence[Run], values: Sequence[Row]) -> tuple[list[str], list[Correlation]]:
    out = [
        "## Misalignment vs perplexity across runs",
        "",
        (
            f"Each row correlates a misalignment metric at length L with perplexity (at the same L, or at the "
            f"longest length) across the n runs. Intervals: {LEVEL:.0%} percentile bootstrap over runs "
            f"({BOOTSTRAP_DRAWS} draws, seed {BOOTSTRAP_SEED}); none below 3 runs. With n = 2, |r| = 1 trivially."
        ),
        "",
    ]
    all_rows = []
    mis_tasks = _kind_tasks(runs, "misalign")
    if mis_tasks:
        out += [
            "Precision of each misalignment measure (smaller ranks runs more reliably):",
            "",
            noise_table(values, mis_tasks),
            "",
        ]
    for ppl_task in _kind_tasks(runs, "ppl"):
        for task in mis_tasks:
            rows = correlation_rows(runs, task, ppl_task)
            all_rows += rows
            if rows:
                out += [f"### {task} vs {ppl_task}", "", correlation_table(rows), ""]
    return out, all_rows


def values_csv(runs: Sequence[Run]) -> str:
    """run, task, metric, L, value, stderr (L empty for scalars), full precision: the long table."""
    return longtable.values_csv(longtable.long_table(runs))


def correlations_csv(rows: Sequence[Correlation]) -> str:
    body = [
        [c.task, c.metric, c.length, c.versus, c.n, c.pearson, *c.pearson_ci, c.spearman, *c.spearman_ci]
        + [" ".join(c.runs)]
        for c in rows
    ]
    return csv_text(CORRELATIONS_HEADER, body)


def _plots(sweep, runs: Sequence[Run], folder: Path) -> list[str]:
    """Draw the figures (length curves, loss against position, misalignment vs perplexity); Markdown
    lines embedding the ones drawn."""
    labels = [r.name for r in sweep.runs]
    ppl_tasks, mis_tasks = _kind_tasks(runs, "ppl"), _kind_tasks(runs, "misalign")
    trained = sweep.trained_context
    figures = []  # (title, draw(path), file name); panels bound now, not when drawn
    if ppl_tasks:
        ppl_metrics = catalogue.names("ppl", plot=True)
        ppl_panels = [bands.Panel(t, m, f"{catalogue.title(m)} · {t}") for t in ppl_tasks for m in ppl_metrics]
        figures.append(
            (
                "Perplexity vs context length",
                lambda p: bands.plot_length_bands(runs, ppl_panels, p, trained, columns=len(ppl_panels), labels=labels),
                "ppl_vs_length.png",
            )
        )
    if mis_tasks:
        mis_metrics = catalogue.names("misalign", plot=True)
        mis_panels = [bands.Panel(t, m, f"{m} · {t}") for t in mis_tasks for m in mis_metrics]
        figures.append(
            (
                "Misalignment vs context length",
                lambda p: bands.plot_length_bands(
                    runs, mis_panels, p, trained, columns=len(mis_metrics), labels=labels
                ),
                "misalignment_vs_length.png",
            )
        )
    if any(reporting.position_curve(run, task) for run in runs for task in ppl_tasks):
        figures.append(
            (
                "Loss against position",
                lambda p: reporting.plot_positions(runs, p, trained, tasks=ppl_tasks, labels=labels),
                "loss_vs_position.png",
            )
        )
    if ppl_tasks and mis_tasks:
        x = catalogue.names("misalign", correlate=True)[0]
        title = f"{x}@L ({{}}) vs {VERSUS}@L"
        dots = [bands.ScatterPanel(t, x, ppl_tasks[0], VERSUS, title=title.format(t)) for t in mis_tasks]
        figures.append(
            (
                "Misalignment vs perplexity (each point a run at one L)",
                lambda p: bands.plot_scatter(runs, dots, p, columns=len(dots), labels=labels),
                "misalignment_vs_ppl.png",
            )
        )
    out = ["## Plots", ""]
    for title, draw, name in figures:
        try:
            draw(folder / name)
        except reporting.ReportingError as exc:
            out += [f"- {title}: not drawn ({exc})"]
            continue
        bands_note = "" if name.endswith("_ppl.png") else " (bands: ±1 standard error)"
        out += [f"**{title}**{bands_note}", "", f"![{title}]({name})", ""]
    return out


def write_report(sweep, loaded: SweepRuns, folder: Path) -> Path:
    """Write report.md, values.csv, correlations.csv and the PNGs into ``folder``; the .md path."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = loaded.runs
    head = [f"# Sweep `{sweep.name}`" + (" (--quick preset)" if sweep.quick else ""), ""]
    if sweep.description:
        head += [sweep.description.strip(), ""]
    head += [
        f"Sweep file: `{sweep.path.name}`; {len(runs)} of {len(sweep.runs)} runs finished"
        + (f", {len(loaded.failed)} failed" if loaded.failed else "")
        + ".",
        "",
    ]
    body = _runs_section(sweep, loaded)
    values = longtable.long_table(runs)
    corr_rows: list[Correlation] = []
    if runs:
        body += _tables_section(runs, values)
        corr, corr_rows = _correlation_section(runs, values)
        body += corr + _plots(sweep, runs, folder)
    body += ["CSV: `values.csv` (every metric, full precision), `correlations.csv`.", ""]
    (folder / "values.csv").write_text(longtable.values_csv(values), encoding="utf-8")
    (folder / "correlations.csv").write_text(correlations_csv(corr_rows), encoding="utf-8")
    out = folder / REPORT_NAME
    out.write_text("\n".join(head + body), encoding="utf-8")
    return out
