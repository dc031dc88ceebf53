"""Loading lm-eval results JSONs of the longshort tasks into :class:`Run` objects.

lm-eval (``--output_path DIR``) writes ``DIR/<model>/results_<timestamp>.json`` whose
``results`` map each task to flat metric keys ``"<metric>[@<L>],<filter>"`` (and
``"<metric>@<L>_stderr,<filter>"``). Our tasks report one metric per context length ``L``
plus a few scalars (``ppl@max``, ``keyppl``, ...), and write a ``longshort`` record into
``configs[task]``: the resolved settings, what was measured, the per-document sums and the
engine (backend, dtype). Files written before that record existed still load; their tasks
have ``longshort`` None (settings unknown).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_longshort.numerics import catalogue

RESULTS_GLOB = "results_*.json"

# "<key>,<filter>"; the key is parsed by catalogue.parse_key.
_KEY_RE = re.compile(r"^(?P<name>[^,]+),(?P<filter>.*)$")


class ReportingError(ValueError):
    """A user-facing problem with the results given (missing file, bad JSON, ambiguous choice)."""


@dataclass
class Run:
    """One evaluated model: per task, its per-length metrics (+ stderrs), scalars and record."""

    label: str
    path: Path
    per_length: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)
    model_args: str = ""
    sources: list[Path] = field(default_factory=list)
    metadata: dict[str, dict] = field(default_factory=dict)
    stderr: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    scalar_stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    longshort: dict[str, dict | None] = field(default_factory=dict)  # None: file predates it
    backend: str = "?"
    dtype: str = "?"
    bootstrap_iters: int | None = None  # lm-eval's --bootstrap_iters (0 turns standard errors off)

    def tasks_with(self, metrics: Iterable[str]) -> list[str]:
        """Sorted names of the tasks reporting any of ``metrics`` per length."""
        wanted = set(metrics)
        return sorted(t for t, m in self.per_length.items() if wanted & set(m))

    @property
    def ppl_tasks(self) -> list[str]:
        """Tasks with per-length perplexity metrics (classified by metric, not by task name)."""
        return self.tasks_with(catalogue.names("ppl"))

    @property
    def misalign_tasks(self) -> list[str]:
        """Tasks with per-length misalignment metrics (the catalogue's divergences)."""
        return self.tasks_with(catalogue.names("misalign"))

    @property
    def lengths(self) -> list[int]:
        """Every context length any task of this run reports, ascending."""
        return sorted({L for m in self.per_length.values() for v in m.values() for L in v})

    def value(self, task: str, metric: str, length: int) -> float | None:
        """``metric@length`` of ``task``, or None where the run does not report it."""
        return self.per_length.get(task, {}).get(metric, {}).get(length)

    def error(self, task: str, metric: str, length: int) -> float | None:
        """The standard error of ``metric@length`` of ``task``, or None where none was reported."""
        return self.stderr.get(task, {}).get(metric, {}).get(length)

    def measured(self, task: str) -> dict | None:
        """What ``task`` measured (settings, corpus, document set), or None for older files."""
        record = self.longshort.get(task)
        return record.get("measured") if record else None

    def scored_documents(self, task: str) -> int | None:
        """How many documents ``task`` scored (skipped ones not counted), or None if unknown."""
        record = self.longshort.get(task)
        if record and isinstance(record.get("documents"), list) and record["documents"]:
            return sum(1 for doc in record["documents"] if not doc.get("skipped"))
        count = self.scalars.get(task, {}).get("documents")
        return int(count) if finite(count) else None

    def contributing_documents(self, task: str, key: str) -> int | None:
        """How many scored documents have a positive denominator for ``key`` (e.g. ``keyppl``:
        documents with at least one key token), or None where the results hold no per-document sums."""
        record = self.longshort.get(task) or {}
        docs = [d for d in record.get("documents") or [] if not d.get("skipped")]
        if not docs or not all(isinstance(d.get("sums"), dict) and key in d["sums"] for d in docs):
            return None
        return sum(1 for d in docs if float(d["sums"][key][1]) > 0)

    def document_sums(self, task: str, metric: str, length: int | None) -> dict[tuple[int, str], list[float]]:
        """``{(doc_index, text sha1): [numerator, denominator]}`` of ``metric@length`` (of the
        scalar ``metric`` when ``length`` is None).

        Empty for older files and for skipped documents: paired differences need both.
        """
        record = self.longshort.get(task) or {}
        key, out = catalogue.key(metric, length), {}
        for doc in record.get("documents") or []:
            sums = (doc.get("sums") or {}).get(key)
            if sums is not None and not doc.get("skipped"):
                out[int(doc["doc_index"]), str(doc.get("sha1", ""))] = [float(s) for s in sums]
        return out


def _as_float(value) -> float | None:
    """The metric value as a float, or None for "N/A", None, bools and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _split_key(key: str) -> tuple[str, int | None, str, bool] | None:
    """``"ppl@4096_stderr,none"`` -> ``("ppl", 4096, "none", True)``; None if not a metric key."""
    match = _KEY_RE.match(key)
    if match is None:
        return None
    metric, length, is_stderr = catalogue.parse_key(match["name"])
    return metric, length, match["filter"], is_stderr


def parse_metric_key(key: str) -> tuple[str, int | None, str] | None:
    """Split ``"ppl@4096,none"`` into ``("ppl", 4096, "none")``.

    Scalars keep their full name and length None (``"ppl@max,none"`` -> ``("ppl@max",
    None, "none")``). Returns None for keys that are not metrics: stderr keys
    (``"ppl@4096_stderr,none"``) and keys without a filter (``"alias"``).
    """
    parsed = _split_key(key)
    if parsed is None or parsed[3]:
        return None
    return parsed[:3]


@dataclass
class _TaskMetrics:
    per_length: dict[str, dict[int, float]] = field(default_factory=dict)
    stderr: dict[str, dict[int, float]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    scalar_stderr: dict[str, float] = field(default_factory=dict)


def _parse_task_metrics(entry: dict) -> _TaskMetrics:
    """Per-length values, their stderrs and the scalars of one ``results[task]`` entry.

    If a metric appears under several filters, the ``none`` filter wins (our tasks
    only use ``none``; others would come from a user's custom filter list).
    """
    out = _TaskMetrics()
    chosen: dict[tuple[str, int | None, bool], str] = {}
    for key, raw in entry.items():
        parsed = _split_key(str(key))
        value = _as_float(raw)
        if parsed is None or value is None:
            continue
        metric, length, filt, is_stderr = parsed
        slot = (metric, length, is_stderr)
        if slot in chosen and (chosen[slot] == "none" or filt != "none"):
            continue
        chosen[slot] = filt
        if is_stderr and length is None:
            out.scalar_stderr[metric] = value
        elif is_stderr:
            out.stderr.setdefault(metric, {})[length] = value
        elif length is None:
            out.scalars[metric] = value
        else:
            out.per_length.setdefault(metric, {})[length] = value
    return out


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
    """The sweep run's name for a file a sweep wrote (``longshort_sweep.run``), else the basename
    of ``pretrained=`` (plus the GGUF file name, if any), else the file stem."""
    sweep = data.get("longshort_sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("run"), str) and sweep["run"]:
        return sweep["run"]
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


def _engine(data: dict, records: Iterable[dict | None]) -> tuple[str, str]:
    """(backend, dtype): from the tasks' longshort records, else from lm-eval's config."""
    for record in records:
        engine = (record or {}).get("engine") or {}
        if engine.get("backend"):
            return str(engine["backend"]), str(engine.get("dtype") or "?")
    config = data.get("config") or {}
    args = _model_args_dict(config.get("model_args"))
    return str(config.get("model") or "?"), args.get("dtype", "?")


def read_results_file(path: str | Path) -> Run:
    """One results JSON -> a Run (label from model_args; disambiguation happens in load_runs)."""
    path = Path(path)
    return run_from_results(_read_json(path), path)


def run_from_results(data: dict, path: str | Path) -> Run:
    """A Run from lm-eval's results (a results JSON's content, or ``simple_evaluate``'s output);
    ``path`` names where it came from."""
    path = Path(path)
    run = Run(label=default_label(data, path), path=path, sources=[path])
    run.model_args = _model_args_string(data)
    groups = _group_names(data)
    configs = data.get("configs") or {}
    for task, entry in data["results"].items():
        if task in groups or not isinstance(entry, dict):
            continue
        metrics = _parse_task_metrics(entry)
        if not metrics.per_length and not metrics.scalars:
            continue  # e.g. a group entry holding only "alias"
        config = configs.get(task) or {}
        run.per_length[task] = metrics.per_length
        run.stderr[task] = metrics.stderr
        run.scalars[task] = metrics.scalars
        run.scalar_stderr[task] = metrics.scalar_stderr
        run.metadata[task] = dict(config.get("metadata") or {})
        record = config.get("longshort")
        run.longshort[task] = record if isinstance(record, dict) else None
    run.backend, run.dtype = _engine(data, run.longshort.values())
    iters = (data.get("config") or {}).get("bootstrap_iters")
    run.bootstrap_iters = iters if isinstance(iters, int) and not isinstance(iters, bool) else None
    return run


def _model_args_string(data: dict) -> str:
    """model + model_args, normalised, to tell apart runs written into the same folder."""
    config = data.get("config") or {}
    args = _model_args_dict(config.get("model_args"))
    return f"{config.get('model', '')}:" + ",".join(f"{k}={v}" for k, v in sorted(args.items()))


def _merge_into(base: Run, newer: Run) -> None:
    """Add ``newer``'s tasks to ``base``; a task present in both takes ``newer``'s values."""
    for mine, theirs in (
        (base.per_length, newer.per_length),
        (base.scalars, newer.scalars),
        (base.metadata, newer.metadata),
        (base.stderr, newer.stderr),
        (base.scalar_stderr, newer.scalar_stderr),
        (base.longshort, newer.longshort),
    ):
        mine.update(theirs)
    base.sources.append(newer.path)
    base.path = newer.path
    base.backend, base.dtype = newer.backend, newer.dtype
    base.bootstrap_iters = newer.bootstrap_iters


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
            f"{len(labels)} label(s) given for {len(runs)} run(s); give one --label per run, in this order:\n{found}"
        )
    for run, label in zip(runs, labels):
        run.label = label


def finite(value: float | None) -> bool:
    """Whether a cell holds a real number (not missing, not NaN/inf)."""
    return value is not None and math.isfinite(value)
