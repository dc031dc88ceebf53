"""Read lm-eval results JSONs of the longshort tasks; tabulate, plot and compare runs.

lm-eval (``--output_path DIR``) writes ``DIR/<model>/results_<timestamp>.json`` whose
``results`` map each task to flat metric keys ``"<metric>[@<L>],<filter>"``. Our tasks
report one metric per context length ``L`` (``"ppl@4096,none"``) plus a few scalars
(``"ppl@max,none"``, ``"keyppl,none"``, ...). This module turns those keys back into
``{task: {metric: {L: value}}}`` and builds the text table, the figure and the
cross-run correlation report on top.

Pure Python + numpy; matplotlib (Agg, no pyplot) is imported only when plotting.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PPL_METRICS = ("ppl", "bpb")
MISALIGN_METRICS = ("symkl", "sce", "js", "top1", "tv")
RESULTS_GLOB = "results_*.json"
PLOT_DPI = 120

# "<name>,<filter>" where <name> is "<metric>" or "<metric>@<suffix>".
_KEY_RE = re.compile(r"^(?P<name>[^,]+),(?P<filter>.*)$")
_LENGTH_RE = re.compile(r"^\d+$")

_TITLES = {
    "ppl": "Perplexity",
    "bpb": "Bits per byte",
    "symkl": "Symmetric KL (long vs short context)",
    "sce": "Symmetric cross-entropy (long vs short)",
    "js": "Jensen-Shannon divergence",
    "top1": "Top-1 agreement (long vs short)",
    "tv": "Total variation distance",
}
_YLABELS = {"ppl": "perplexity", "bpb": "bits / byte", "symkl": "symKL (nats / token)",
            "sce": "SCE (nats / token)", "js": "JS (nats / token)", "top1": "agreement rate",
            "tv": "TV distance"}


class ReportingError(ValueError):
    """A user-facing problem with the results given (missing file, bad JSON, ambiguous choice)."""


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One evaluated model: its per-length metrics and its scalar metrics, by task."""

    label: str
    path: Path
    per_length: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)
    model_args: str = ""
    sources: list[Path] = field(default_factory=list)
    metadata: dict[str, dict] = field(default_factory=dict)

    def tasks_with(self, metrics: Iterable[str]) -> list[str]:
        """Sorted names of the tasks reporting any of ``metrics`` per length."""
        wanted = set(metrics)
        return sorted(t for t, m in self.per_length.items() if wanted & set(m))

    @property
    def ppl_tasks(self) -> list[str]:
        """Tasks with per-length ppl/bpb (classified by metric, not by task name)."""
        return self.tasks_with(PPL_METRICS)

    @property
    def misalign_tasks(self) -> list[str]:
        """Tasks with per-length misalignment metrics (symkl, sce, js, top1, tv)."""
        return self.tasks_with(MISALIGN_METRICS)

    @property
    def lengths(self) -> list[int]:
        """Every context length any task of this run reports, ascending."""
        return sorted({L for m in self.per_length.values() for v in m.values() for L in v})

    def value(self, task: str, metric: str, length: int) -> float | None:
        """``metric@length`` of ``task``, or None where the run does not report it."""
        return self.per_length.get(task, {}).get(metric, {}).get(length)


def _as_float(value) -> float | None:
    """The metric value as a float, or None for "N/A", None, bools and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def parse_metric_key(key: str) -> tuple[str, int | None, str] | None:
    """Split ``"ppl@4096,none"`` into ``("ppl", 4096, "none")``.

    Scalars keep their full name and length None (``"ppl@max,none"`` -> ``("ppl@max",
    None, "none")``). Returns None for keys that are not metrics: stderr keys
    (``"ppl@4096_stderr,none"``) and keys without a filter (``"alias"``).
    """
    match = _KEY_RE.match(key)
    if match is None:
        return None
    name, filt = match["name"], match["filter"]
    if name.endswith("_stderr"):
        return None
    metric, sep, suffix = name.partition("@")
    if sep and _LENGTH_RE.match(suffix):
        return metric, int(suffix), filt
    return name, None, filt


def _parse_task_metrics(entry: dict) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Per-length and scalar metrics of one ``results[task]`` entry.

    If a metric appears under several filters, the ``none`` filter wins (our tasks
    only use ``none``; others would come from a user's custom filter list).
    """
    per_length: dict[str, dict[int, float]] = {}
    scalars: dict[str, float] = {}
    chosen: dict[tuple[str, int | None], str] = {}
    for key, raw in entry.items():
        parsed = parse_metric_key(str(key))
        value = _as_float(raw)
        if parsed is None or value is None:
            continue
        metric, length, filt = parsed
        slot = (metric, length)
        if slot in chosen and (chosen[slot] == "none" or filt != "none"):
            continue
        chosen[slot] = filt
        if length is None:
            scalars[metric] = value
        else:
            per_length.setdefault(metric, {})[length] = value
    return per_length, scalars


def _model_args_dict(model_args) -> dict[str, str]:
    """``model_args`` as a dict, whether lm-eval stored the CLI string or a dict."""
    if isinstance(model_args, dict):
        return {str(k): str(v) for k, v in model_args.items()}
    pairs = (part.split("=", 1) for part in str(model_args or "").split(",") if "=" in part)
    return {k.strip(): v.strip() for k, v in pairs}


def _basename(path_like: str) -> str:
    """Last component of a local path or hub id (``/x/y/`` -> ``y``)."""
    return path_like.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def default_label(data: dict, path: Path) -> str:
    """Basename of ``pretrained=`` (plus the GGUF file name, if any), else the file stem."""
    config = data.get("config") or {}
    args = _model_args_dict(config.get("model_args"))
    name = args.get("pretrained") or args.get("model") or data.get("model_name") or ""
    label = _basename(str(name))
    if label and args.get("gguf_file"):
        # An HF run and a GGUF run of the same checkpoint share `pretrained=`.
        label = f"{label}:{_basename(args['gguf_file'])}"
    return label or path.stem


def _group_names(data: dict) -> set[str]:
    """Names of lm-eval groups (they aggregate subtasks; we only report the subtasks)."""
    subtasks = data.get("group_subtasks") or {}
    return {name for name, members in subtasks.items() if members}


def _read_json(path: Path) -> dict:
    """The parsed results file, with errors that say what was expected."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportingError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ReportingError(
            f"{path}: not valid JSON ({exc}); pass a results_*.json written by lm_eval --output_path"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ReportingError(
            f"{path}: no 'results' object; is this an lm-eval results file? "
            "(samples_*.jsonl files are not; use the results_*.json next to them)"
        )
    return data


def read_results_file(path: str | Path) -> Run:
    """One results JSON -> a Run (label from model_args; disambiguation happens in load_runs)."""
    path = Path(path)
    data = _read_json(path)
    run = Run(label=default_label(data, path), path=path, sources=[path])
    run.model_args = _model_args_string(data)
    groups = _group_names(data)
    configs = data.get("configs") or {}
    for task, entry in data["results"].items():
        if task in groups or not isinstance(entry, dict):
            continue
        per_length, scalars = _parse_task_metrics(entry)
        if not per_length and not scalars:
            continue  # e.g. a group entry holding only "alias"
        run.per_length[task] = per_length
        run.scalars[task] = scalars
        run.metadata[task] = dict((configs.get(task) or {}).get("metadata") or {})
    return run


def _model_args_string(data: dict) -> str:
    """model + model_args, normalised, to tell apart runs written into the same folder."""
    config = data.get("config") or {}
    args = _model_args_dict(config.get("model_args"))
    return f"{config.get('model', '')}:" + ",".join(f"{k}={v}" for k, v in sorted(args.items()))


def _merge_into(base: Run, newer: Run) -> None:
    """Add ``newer``'s tasks to ``base``; a task present in both takes ``newer``'s values."""
    base.per_length.update(newer.per_length)
    base.scalars.update(newer.scalars)
    base.metadata.update(newer.metadata)
    base.sources.append(newer.path)
    base.path = newer.path


def _runs_in_directory(directory: Path) -> list[Run]:
    """All results_*.json under ``directory``, merged per (folder, model + model_args).

    Why merge: running the ppl and the misalign tasks in two lm_eval calls leaves two
    files in the same ``<model>/`` folder; they describe one model. Files are merged
    oldest to newest (lm-eval's timestamped names sort chronologically), so for a task
    evaluated several times the newest file wins.
    """
    files = sorted(directory.rglob(RESULTS_GLOB))
    if not files:
        raise ReportingError(
            f"{directory}: no {RESULTS_GLOB} under this directory; "
            f"run lm_eval with --output_path {directory} first, or pass the JSON file itself"
        )
    merged: dict[tuple[Path, str], Run] = {}
    for path in files:
        run = read_results_file(path)
        key = (path.parent, run.model_args)
        if key in merged:
            _merge_into(merged[key], run)
        else:
            merged[key] = run
    return list(merged.values())


def _disambiguate(runs: list[Run]) -> None:
    """Make labels unique: add the file name, then a counter if that is not enough."""
    for attempt in ("stem", "counter"):
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.label] = counts.get(run.label, 0) + 1
        seen: dict[str, int] = {}
        for run in runs:
            if counts[run.label] < 2:
                continue
            seen[run.label] = seen.get(run.label, 0) + 1
            if attempt == "stem":
                run.label = f"{run.label} ({run.path.stem})"
            else:
                run.label = f"{run.label} #{seen[run.label]}"


def load_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Runs from results JSON files and/or directories, in the order given.

    A file is one run. A directory is searched recursively for ``results_*.json``;
    files in the same folder with the same model + model_args are merged into one run
    (newest file wins per task, see ``_runs_in_directory``). ``labels`` replace the
    automatic labels one-to-one; duplicate labels get the results file name appended.
    """
    if not paths:
        raise ReportingError("no results given; pass results_*.json files or lm_eval --output_path folders")
    runs: list[Run] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _runs_in_directory(path)
        elif path.is_file():
            found = [read_results_file(path)]
        else:
            raise ReportingError(f"{path}: no such file or directory")
        for run in found:
            if run.path.resolve() not in seen:  # same file passed twice: keep it once
                seen.add(run.path.resolve())
                runs.append(run)
    if labels:
        _apply_labels(runs, labels)
    _disambiguate(runs)
    return runs


def _apply_labels(runs: list[Run], labels: Sequence[str]) -> None:
    """Replace automatic labels in order; the counts must match."""
    if len(labels) != len(runs):
        found = "\n".join(f"  {r.label}: {r.path}" for r in runs)
        raise ReportingError(
            f"{len(labels)} label(s) given for {len(runs)} run(s); give one --label per run, "
            f"in this order:\n{found}"
        )
    for run, label in zip(runs, labels):
        run.label = label


# --------------------------------------------------------------------------- text tables


def format_value(value: float | None) -> str:
    """5 significant digits; blank for a missing cell, "nan" for a NaN one."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    return f"{value:.5g}"


def short_task(task: str) -> str:
    """``longshort_ppl_shakespeare`` -> ``ppl_shakespeare`` (column and legend titles)."""
    return task.removeprefix("longshort_")


def _columns(run: Run) -> list[tuple[str, str]]:
    """(task, metric) columns: ppl tasks first (ppl, bpb), then misalign tasks.

    Per-length metrics outside the known lists are appended so nothing is hidden.
    """
    columns: list[tuple[str, str]] = []
    for tasks, known in ((run.ppl_tasks, PPL_METRICS), (run.misalign_tasks, MISALIGN_METRICS)):
        for task in tasks:
            extra = sorted(set(run.per_length[task]) - set(known))
            columns += [(task, m) for m in (*known, *extra)]
    return columns


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 groups: Sequence[tuple[str, int]] | None = None, left: int = 0) -> str:
    """Aligned plain-text table; ``groups`` = (title, n_columns) spans printed above the header.

    The first ``left`` columns are left-aligned (labels); the rest right-aligned (numbers).
    """
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    spans = list(groups or [])
    start = 0
    for title, n in spans:  # widen a group's last column if its title does not fit
        span = sum(widths[start:start + n]) + 2 * (n - 1)
        widths[start + n - 1] += max(0, len(title) - span)
        start += n

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return _join_groups(out, spans).rstrip()

    lines = []
    if spans:
        titles, start = [], 0
        for title, n in spans:
            titles.append(title.ljust(sum(widths[start:start + n]) + 2 * (n - 1)))
            start += n
        lines.append(" | ".join(titles).rstrip())
    lines.append(line(header))
    lines.append(_join_groups(["-" * w for w in widths], spans))
    lines.extend(line(r) for r in rows)
    return "\n".join(lines)


def _join_groups(cells: Sequence[str], spans: Sequence[tuple[str, int]]) -> str:
    """Join cells with two spaces inside a group and " | " between groups."""
    if not spans:
        return "  ".join(cells)
    parts, start = [], 0
    for _, n in spans:
        parts.append("  ".join(cells[start:start + n]))
        start += n
    return " | ".join(parts)


def format_length_table(run: Run) -> str:
    """One row per context length (ascending); columns ppl/bpb per ppl task, then
    symkl/sce/js/top1/tv per misalign task; missing cells blank."""
    columns = _columns(run)
    if not columns:
        return "(no per-length metrics: were these longshort_* tasks?)"
    header = ["L"] + [metric for _, metric in columns]
    rows = [[str(L)] + [format_value(run.value(t, m, L)) for t, m in columns] for L in run.lengths]
    groups = [("", 1)]
    for task in dict.fromkeys(t for t, _ in columns):
        groups.append((short_task(task), sum(1 for t, _ in columns if t == task)))
    return render_table(header, rows, groups)


def format_scalars(run: Run) -> str:
    """One line per task with its non-per-length metrics (ppl@max, keyppl, key_frac, ...)."""
    lines = []
    for task in sorted(run.scalars):
        items = "  ".join(f"{k}={format_value(v)}" for k, v in sorted(run.scalars[task].items()))
        if items:
            lines.append(f"{short_task(task)}: {items}")
    return "\n".join(lines)


def format_run_report(run: Run) -> str:
    """Title, per-length table and scalar lines of one run (what `report` prints)."""
    parts = [f"== {run.label}  ({run.path})", format_length_table(run)]
    scalars = format_scalars(run)
    if scalars:
        parts.append(scalars)
    return "\n".join(parts)


# --------------------------------------------------------------------------- plotting


def length_label(length: int) -> str:
    """Tick label for a context length: 1024 -> "1k", 1536 -> "1.5k", 1000 -> "1000"."""
    if length >= 1024 and length % 512 == 0:
        k = length / 1024
        return f"{k:g}k"
    return str(length)


def _series(runs: Sequence[Run], metric: str) -> list[tuple[Run, str, list[int], list[float]]]:
    """(run, task, lengths, values) for every task of every run reporting ``metric``."""
    out = []
    for run in runs:
        for task in run.tasks_with([metric]):
            points = sorted(run.per_length[task][metric].items())
            if points:
                out.append((run, task, [L for L, _ in points], [v for _, v in points]))
    return out


def _panel_metrics(runs: Sequence[Run]) -> list[str]:
    """Which panels to draw: perplexity, then symKL and SCE where any run has them."""
    present = [m for m in ("ppl", "symkl", "sce") if _series(runs, m)]
    if not present:
        raise ReportingError(
            "nothing to plot: no run has per-length ppl, symkl or sce metrics "
            "(run the longshort_ppl_* / longshort_misalign_* tasks first)"
        )
    return present


def _wants_log_y(values: Iterable[float]) -> bool:
    """Log y when all finite values are positive and span more than 10x."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 10


def _draw_panel(ax, runs: Sequence[Run], metric: str, trained_context: int | None) -> None:
    """One metric vs context length: a line per (run, task), colour = run, style = task."""
    series = _series(runs, metric)
    tasks = sorted({task for _, task, _, _ in series})
    styles = ["-", "--", ":", "-."]
    colours = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for run, task, xs, ys in series:
        name = run.label if len(tasks) == 1 else f"{run.label} · {short_task(task)}"
        ax.plot(xs, ys, marker="o", markersize=4, color=colours[run.label],
                linestyle=styles[tasks.index(task) % len(styles)], label=name)
    ticks = sorted({L for _, _, xs, _ in series for L in xs})
    if trained_context:
        ax.axvline(trained_context, color="0.4", linestyle="--", linewidth=1.2,
                   label=f"trained context ({length_label(trained_context)})")
        ticks = sorted(set(ticks) | {trained_context})
    _format_length_axis(ax, ticks)
    if _wants_log_y(v for *_, ys in series for v in ys):
        _log_y_axis(ax)
    title = _TITLES.get(metric, metric)
    ax.set_title(title if len(tasks) != 1 else f"{title}\n{short_task(tasks[0])}", fontsize=11)
    ax.set_ylabel(_YLABELS.get(metric, metric))
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
    ax.set_xticklabels([length_label(L) for L in ticks],
                       rotation=45 if len(ticks) > 8 else 0, fontsize=9)
    ax.set_xlabel("context length L (tokens)")


def plot_runs(runs: Sequence[Run], out_png: str | Path, trained_context: int | None = None,
              title: str | None = None) -> Path:
    """Save a figure of perplexity (and symKL / SCE, if present) vs context length.

    One panel per metric, side by side, each with a line per (run, task). No pyplot:
    a standalone Figure keeps the caller's matplotlib backend untouched.
    """
    from matplotlib.figure import Figure

    if not runs:
        raise ReportingError("no runs to plot")
    metrics = _panel_metrics(runs)
    fig = Figure(figsize=(5.6 * len(metrics), 4.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        _draw_panel(ax, runs, metric, trained_context)
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=PLOT_DPI)
    return out


# --------------------------------------------------------------------------- correlations


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r; NaN with fewer than 2 points or when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return math.nan
    return float(np.clip(float(dx @ dy) / denom, -1.0, 1.0))


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they occupy."""
    values, inverse, counts = np.unique(np.asarray(x, dtype=float), return_inverse=True,
                                        return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rho: Pearson r of the average ranks (ties handled)."""
    return pearson(average_ranks(x), average_ranks(y))


@dataclass
class Correlation:
    """Correlation of misalignment vs perplexity over ``n`` points; length None = pooled."""

    length: int | None
    n: int
    pearson: float
    spearman: float


def _correlate(length: int | None, pairs: Sequence[tuple[float, float]]) -> Correlation:
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    return Correlation(length, len(pairs), pearson(xs, ys), spearman(xs, ys))


@dataclass
class CompareResult:
    """Per-(run, L) rows and misalignment-vs-perplexity correlations across runs."""

    misalign_metric: str
    ppl_metric: str
    misalign_task: str
    ppl_task: str
    columns: list[str]
    rows: list[dict]
    per_length: list[Correlation]
    pooled: Correlation

    def _row_cells(self) -> list[list[str]]:
        return [[str(r.get(c, "")) if c in ("label", "L") else format_value(r.get(c))
                 for c in self.columns] for r in self.rows]

    def _corr_cells(self) -> list[list[str]]:
        cells = [[str(c.length), str(c.n), format_value(c.pearson), format_value(c.spearman)]
                 for c in self.per_length]
        p = self.pooled
        return cells + [["pooled", str(p.n), format_value(p.pearson), format_value(p.spearman)]]

    @property
    def _what(self) -> str:
        return (f"{self.misalign_metric}@L ({short_task(self.misalign_task)}) vs "
                f"{self.ppl_metric}@L ({short_task(self.ppl_task)})")

    def to_text(self) -> str:
        """Aligned plain-text tables for a terminal."""
        return "\n".join([
            render_table(self.columns, self._row_cells(), left=1), "",
            f"Correlation across runs of {self._what}",
            render_table(["L", "n", "pearson_r", "spearman_rho"], self._corr_cells()),
            _SMALL_N_NOTE,
        ])

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown: the rows table and the correlation table."""
        return "\n".join([
            f"## {self._what}", "", _markdown_table(self.columns, self._row_cells()), "",
            "### Correlation across runs", "",
            _markdown_table(["L", "n", "pearson_r", "spearman_rho"], self._corr_cells()), "",
            f"_{_SMALL_N_NOTE}_", "",
        ])

    def to_csv(self, path: str | Path, table: str = "rows") -> Path:
        """Write ``table`` = "rows" (one line per run and L) or "correlations" as CSV."""
        if table == "rows":
            header, body = self.columns, [[_csv_value(r.get(c)) for c in self.columns] for r in self.rows]
        elif table == "correlations":
            header = ["L", "n", "pearson_r", "spearman_rho"]
            body = [["pooled" if c.length is None else c.length, c.n, _csv_value(c.pearson),
                     _csv_value(c.spearman)] for c in (*self.per_length, self.pooled)]
        else:
            raise ValueError(f"table must be 'rows' or 'correlations', got {table!r}")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(buffer.getvalue(), encoding="utf-8")
        return out


_SMALL_N_NOTE = "n = points with both metrics finite; with n = 2 |r| = |rho| = 1 trivially."


def _csv_value(value):
    """Full precision in CSV; missing cells empty."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table; "|" in labels is escaped so it cannot break the columns."""
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _pick_task(runs: Sequence[Run], metric: str, requested: str | None, flag: str) -> str:
    """The single task providing ``metric``, or the one ``requested`` (full or short name)."""
    candidates = sorted({t for r in runs for t in r.tasks_with([metric])})
    if not candidates:
        available = sorted({m for r in runs for t in r.per_length.values() for m in t})
        raise ReportingError(
            f"no run reports per-length '{metric}'; per-length metrics present: "
            f"{', '.join(available) or 'none'}"
        )
    if requested:
        matches = [t for t in candidates if t == requested or short_task(t) == requested
                   or t.endswith("_" + requested)]
        if len(matches) != 1:
            raise ReportingError(
                f"{flag} {requested!r} matches {len(matches)} of the tasks reporting '{metric}': "
                f"{', '.join(candidates)}"
            )
        return matches[0]
    if len(candidates) > 1:
        raise ReportingError(
            f"several tasks report '{metric}': {', '.join(candidates)}; choose one with {flag}"
        )
    return candidates[0]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def compare_runs(runs: Sequence[Run], misalign_metric: str = "symkl", ppl_metric: str = "ppl",
                 ppl_task: str | None = None, misalign_task: str | None = None) -> CompareResult:
    """Rows per (run, L) and per-L / pooled correlations of misalignment@L vs ppl@L.

    A length enters when at least 2 runs report a finite ``misalign_metric`` or
    ``ppl_metric`` there; correlations use the runs with both finite. The tasks are
    found automatically when only one task reports each metric (else pass
    ``ppl_task`` / ``misalign_task``, full or short name).
    """
    p_task = _pick_task(runs, ppl_metric, ppl_task, "--ppl-task")
    m_task = _pick_task(runs, misalign_metric, misalign_task, "--misalign-task")
    ppl_cols = list(dict.fromkeys([*PPL_METRICS, ppl_metric]))
    mis_cols = [m for m in dict.fromkeys([*MISALIGN_METRICS, misalign_metric]) if m not in ppl_cols]
    columns = ["label", "L", *ppl_cols, *mis_cols]

    def present(run: Run, L: int) -> bool:
        return _finite(run.value(p_task, ppl_metric, L)) or _finite(run.value(m_task, misalign_metric, L))

    all_lengths = sorted({L for r in runs for L in r.lengths})
    rows, per_length, pooled = [], [], []
    for L in all_lengths:
        members = [r for r in runs if present(r, L)]
        if len(members) < 2:
            continue
        pairs = []
        for run in members:
            row = {"label": run.label, "L": L}
            row |= {m: run.value(p_task, m, L) for m in ppl_cols}
            row |= {m: run.value(m_task, m, L) for m in mis_cols}
            rows.append(row)
            x, y = run.value(m_task, misalign_metric, L), run.value(p_task, ppl_metric, L)
            if _finite(x) and _finite(y):
                pairs.append((x, y))
        per_length.append(_correlate(L, pairs))
        pooled += pairs
    if not rows:
        raise ReportingError(
            f"no context length is reported by 2 or more runs (for {misalign_metric} or {ppl_metric}); "
            "compare needs at least two runs evaluated at the same lengths"
        )
    return CompareResult(misalign_metric, ppl_metric, m_task, p_task, columns, rows,
                         per_length, _correlate(None, pooled))
