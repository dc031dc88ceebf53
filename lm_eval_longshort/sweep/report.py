"""One report per sweep: per-length tables, correlations across runs, plots and CSV.

Built only from the runs' own results JSONs (loaded by ``reporting.load_runs``), so the
report can be regenerated at any time. Tables: one per (task, metric), a row per run and a
column per length, each value ± its standard error (delta method over documents, as lm-eval
reported it). Correlations: misalignment@L against perplexity across runs, at the same L and
against perplexity at the longest length, Pearson and Spearman (scipy, via reporting) with n
and a percentile bootstrap interval over runs. The Markdown holds no times or absolute paths,
so an interrupted-and-resumed sweep gives the same report as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_eval_longshort import reporting
from lm_eval_longshort.reporting import bands, grouping
from lm_eval_longshort.reporting.runs import Run, finite
from lm_eval_longshort.reporting.tables import format_value, format_with_error, render_table

PPL_TABLE_METRICS = ("ppl", "bpb")
MISALIGN_TABLE_METRICS = ("symkl", "sce", "top1")
CORRELATED = ("symkl", "sce")
SCALARS = ("keyppl", "key_frac")
CSV_METRICS = ("ppl", "bpb", "symkl", "sce", "js", "tv", "top1")
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
REPORT_NAME = "report.md"


# --------------------------------------------------------------------------- correlations


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of [B, n] arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_intervals(
    x: Sequence[float],
    y: Sequence[float],
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of Pearson r and Spearman rho, resampling runs with replacement.

    ``idx = default_rng(seed).integers(0, n, (draws, n))``; a draw where either side is constant
    has no correlation and is left out. NaN bounds with fewer than 3 runs (resampling 2 points
    can only give ±1) or when under half of the draws are usable.
    """
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    nan = (math.nan, math.nan)
    if x.size < 3:
        return {"pearson": nan, "spearman": nan}
    idx = np.random.default_rng(seed).integers(0, x.size, size=(draws, x.size))
    xs, ys = x[idx], y[idx]
    out = {}
    for name, (a, b) in {"pearson": (xs, ys), "spearman": (rankdata(xs, axis=1), rankdata(ys, axis=1))}.items():
        r = _rowwise_pearson(a, b)
        r = r[np.isfinite(r)]
        tail = (1 - level) / 2 * 100
        out[name] = (float(np.percentile(r, tail)), float(np.percentile(r, 100 - tail))) if r.size >= draws / 2 else nan
    return out


@dataclass
class CorrelationRow:
    """misalignment ``metric``@``length`` of ``task`` vs ``versus`` (e.g. ``ppl@16384``) across runs."""

    task: str
    metric: str
    length: int
    versus: str
    n: int
    pearson: float
    pearson_ci: tuple[float, float]
    spearman: float
    spearman_ci: tuple[float, float]
    runs: tuple[str, ...] = ()


def correlate(x: Sequence[float], y: Sequence[float]) -> tuple[int, float, float, dict]:
    """(n, Pearson r, Spearman rho, bootstrap intervals) over the pairs with both sides finite."""
    pairs = [(a, b) for a, b in zip(x, y) if finite(a) and finite(b)]
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
    return len(pairs), reporting.pearson(xs, ys), reporting.spearman(xs, ys), bootstrap_intervals(xs, ys)


def correlation_rows(runs: Sequence[Run], misalign_task: str, ppl_task: str) -> list[CorrelationRow]:
    """Per misalignment metric and length: against ppl at the same L, and against ppl at the
    longest length the ppl task measured (what length generalization is judged by)."""
    ppl_lengths = sorted({L for r in runs for L in r.per_length.get(ppl_task, {}).get("ppl", {})})
    if not ppl_lengths:
        return []
    longest = ppl_lengths[-1]
    rows = []
    for metric in CORRELATED:
        lengths = sorted({L for r in runs for L in r.per_length.get(misalign_task, {}).get(metric, {})})
        for target in ("same", longest):
            for L in lengths:
                ppl_at = L if target == "same" else target
                x = [r.value(misalign_task, metric, L) for r in runs]
                y = [r.value(ppl_task, "ppl", ppl_at) for r in runs]
                n, r_, rho, ci = correlate(x, y)
                used = tuple(r.label for r, a, b in zip(runs, x, y) if finite(a) and finite(b))
                rows.append(
                    CorrelationRow(
                        misalign_task,
                        metric,
                        L,
                        "ppl@L" if target == "same" else f"ppl@{longest}",
                        n,
                        r_,
                        ci["pearson"],
                        rho,
                        ci["spearman"],
                        used,
                    )
                )
    return rows


# --------------------------------------------------------------------------- tables


def _interval(ci: tuple[float, float]) -> str:
    return "" if not all(map(finite, ci)) else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def metric_table(runs: Sequence[Run], task: str, metric: str) -> str:
    """Markdown: a row per run, a column per length, cells value ± standard error."""
    lengths = sorted({L for r in runs for L in r.per_length.get(task, {}).get(metric, {})})
    rows = [
        [r.label] + [format_with_error(r.value(task, metric, L), r.error(task, metric, L)) for L in lengths]
        for r in runs
        if task in r.per_length
    ]
    return render_table(["run"] + [f"L={L}" for L in lengths], rows, markdown=True)


def scalar_table(runs: Sequence[Run], task: str) -> str | None:
    """Markdown: keyppl and key_frac (± se) per run, or None when the task reports neither."""
    names = [s for s in SCALARS if any(s in r.scalars.get(task, {}) for r in runs)]
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


def correlation_table(rows: Sequence[CorrelationRow]) -> str:
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
    """The finished runs (loaded, labelled by run name) and the failed ones with their errors."""

    runs: list[Run]
    failed: dict[str, str]
    pending: list[str]


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


def _tables_section(runs: Sequence[Run]) -> list[str]:
    out = ["## Per-length results (value ± standard error over documents)", ""]
    for kind, metrics in (("ppl", PPL_TABLE_METRICS), ("misalign", MISALIGN_TABLE_METRICS)):
        for task in _kind_tasks(runs, kind):
            out += [f"### {task}", "", f"Settings: {_settings_line(runs, task)}", ""]
            for metric in metrics:
                if any(metric in r.per_length.get(task, {}) for r in runs):
                    out += [f"**{metric}@L**", "", metric_table(runs, task, metric), ""]
            scalars = scalar_table(runs, task) if kind == "ppl" else None
            if scalars:
                out += ["**key tokens** (ladder: targets that long context helps)", "", scalars, ""]
    for kind in ("ppl", "misalign"):
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


def noise_table(runs: Sequence[Run], tasks: Sequence[str]) -> str:
    """Markdown: per misalignment task and metric, the median relative standard error (se / value)
    over runs and lengths: how precisely each mode measures with these documents."""
    rows = []
    for task in tasks:
        for metric in CORRELATED:
            ratios = [
                r.error(task, metric, L) / v
                for r in runs
                for L, v in r.per_length.get(task, {}).get(metric, {}).items()
                if finite(v) and v > 0 and finite(r.error(task, metric, L))
            ]
            if ratios:
                rows.append([task, metric, f"{float(np.median(ratios)):.3g}", str(len(ratios))])
    return render_table(["task", "metric", "median se / value", "cells"], rows, markdown=True)


def _correlation_section(runs: Sequence[Run]) -> tuple[list[str], list[CorrelationRow]]:
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
            noise_table(runs, mis_tasks),
            "",
        ]
    for ppl_task in _kind_tasks(runs, "ppl"):
        for task in _kind_tasks(runs, "misalign"):
            rows = correlation_rows(runs, task, ppl_task)
            all_rows += rows
            if rows:
                out += [f"### {task} vs {ppl_task}", "", correlation_table(rows), ""]
    return out, all_rows


def values_csv(runs: Sequence[Run]) -> str:
    """run, task, metric, L, value, stderr (L empty for scalars), full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "task", "metric", "L", "value", "stderr"])
    for r in runs:
        for task in r.per_length:
            for metric in CSV_METRICS:
                for L, v in sorted(r.per_length[task].get(metric, {}).items()):
                    writer.writerow([r.label, task, metric, L, repr(v), _csv(r.error(task, metric, L))])
            for name, v in sorted(r.scalars.get(task, {}).items()):
                writer.writerow([r.label, task, name, "", repr(v), _csv(r.scalar_stderr.get(task, {}).get(name))])
    return buffer.getvalue()


def correlations_csv(rows: Sequence[CorrelationRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
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
        ]
    )
    for c in rows:
        writer.writerow(
            [
                c.task,
                c.metric,
                c.length,
                c.versus,
                c.n,
                _csv(c.pearson),
                *map(_csv, c.pearson_ci),
                _csv(c.spearman),
                *map(_csv, c.spearman_ci),
                " ".join(c.runs),
            ]
        )
    return buffer.getvalue()


def _csv(value) -> str:
    return "" if value is None else repr(float(value))


def _plots(sweep, runs: Sequence[Run], folder: Path) -> list[str]:
    """Draw the three figures; Markdown lines embedding the ones drawn."""
    labels = [r.name for r in sweep.runs]
    ppl_tasks, mis_tasks = _kind_tasks(runs, "ppl"), _kind_tasks(runs, "misalign")
    trained = sweep.trained_context
    figures = []  # (title, draw(path), file name); panels bound now, not when drawn
    if ppl_tasks:
        ppl_panels = [bands.Panel(t, "ppl", f"Perplexity · {t}") for t in ppl_tasks]
        figures.append(
            (
                "Perplexity vs context length",
                lambda p: bands.plot_length_bands(runs, ppl_panels, p, trained, columns=len(ppl_panels), labels=labels),
                "ppl_vs_length.png",
            )
        )
    if mis_tasks:
        mis_panels = [bands.Panel(t, m, f"{m} · {t}") for t in mis_tasks for m in CORRELATED]
        figures.append(
            (
                "Misalignment vs context length",
                lambda p: bands.plot_length_bands(runs, mis_panels, p, trained, columns=len(CORRELATED), labels=labels),
                "misalignment_vs_length.png",
            )
        )
    if ppl_tasks and mis_tasks:
        dots = [bands.ScatterPanel(t, "symkl", ppl_tasks[0], title=f"symkl@L ({t}) vs ppl@L") for t in mis_tasks]
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
    corr_rows: list[CorrelationRow] = []
    if runs:
        body += _tables_section(runs)
        corr, corr_rows = _correlation_section(runs)
        body += corr + _plots(sweep, runs, folder)
    body += ["CSV: `values.csv` (every metric, full precision), `correlations.csv`.", ""]
    (folder / "values.csv").write_text(values_csv(runs), encoding="utf-8")
    (folder / "correlations.csv").write_text(correlations_csv(corr_rows), encoding="utf-8")
    out = folder / REPORT_NAME
    out.write_text("\n".join(head + body), encoding="utf-8")
    return out
