"""The sweep file: parse it, apply the ``--quick`` preset, and validate everything up front.

A sweep YAML lists runs (a backend and model_args, or a base model plus config overrides),
the tasks, the task metadata and the documents shared by every run. ``load_sweep`` turns it
into a :class:`Sweep` or raises one :class:`SweepError` naming every problem (unknown keys,
duplicate run names, a model that cannot be found, an override the model's config lacks, a
task that does not exist, bad metadata; and, in checks.py, model arguments the backend does not
take, document indices beyond a task's documents, names that cannot name a folder, nan or
infinity in numeric settings), before any model is loaded: a mistake in run 5 must not surface
an hour into run 1.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm_eval_longshort.sweep import checks, shards, variants
from lm_eval_longshort.sweep.checks import unknown_keys

BACKENDS = ("hf", "vllm")
EMBEDDED = "embedded"  # `base: embedded`: the SmolLM2 folder made by `lm-eval-longshort prepare`

SWEEP_KEYS = (
    "name",
    "description",
    "backend",
    "model_args",
    "base",
    "device",
    "tasks",
    "metadata",
    "samples",
    "limit",
    "bootstrap_iters",
    "trained_context",
    "runs",
    "quick",
    "output",
    "shards",
)
RUN_KEYS = ("name", "description", "backend", "model_args", "base", "rope", "overrides", "shards")
TASK_KEYS = ("task", "as", "metadata")
# What --quick may replace: metadata and model_args are merged over the full sweep's, the rest replaced.
QUICK_KEYS = ("metadata", "model_args", "samples", "limit", "bootstrap_iters", "runs")
DEFAULT_BOOTSTRAP_ITERS = 100  # lm-eval's: any value > 0 turns the (delta-method) standard errors on


class SweepError(ValueError):
    """The sweep file cannot run as written; the message names each problem and its fix."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of every run: ``name`` in the results, built from the registered ``source`` task.

    ``metadata`` holds this task's own keys (e.g. ``mode: dense``), on top of its YAML's; the
    sweep-wide metadata goes to lm-eval's ``metadata`` like ``--metadata``.
    """

    name: str
    source: str
    metadata: dict = field(default_factory=dict)
    yaml_path: Path | None = None
    kind: str | None = None  # "ppl" / "misalign" for longshort tasks, None for others

    def lm_eval_spec(self) -> str | dict:
        """What to put in simple_evaluate's ``tasks``: the name, or an inline config (renamed or
        with its own metadata), built from the registered YAML as lm-eval's factory would."""
        if self.name == self.source and not self.metadata:
            return self.name
        config = task_yaml(self.yaml_path)
        config["task"] = self.name
        config["metadata"] = {**(config.get("metadata") or {}), **self.metadata}
        return config


@dataclass(frozen=True)
class RunSpec:
    """One model of the sweep; ``variant`` (base folder + config overrides) when it is derived."""

    name: str
    backend: str
    model_args: dict
    variant: variants.Variant | None = None
    description: str = ""
    shards: int = 1  # pieces its documents are split into (sweep/shards.py)

    def plan(self) -> dict:
        """What this run computes, as JSON-able data (a finished run with another plan is stale)."""
        args = dict(self.model_args)
        if self.variant is not None:
            args.pop("pretrained", None)
        return {
            "name": self.name,
            "backend": self.backend,
            "model_args": args,
            "variant": self.variant.describe() if self.variant else None,
            **({"shards": self.shards} if self.shards > 1 else {}),  # an unsharded run's plan is unchanged
        }


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: every run has its model and every task its settings."""

    name: str
    path: Path
    tasks: tuple[TaskSpec, ...]
    metadata: dict
    runs: tuple[RunSpec, ...]
    samples: tuple[int, ...] | None = None
    limit: int | None = None
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS
    trained_context: int | None = None
    quick: bool = False
    output: Path | None = None
    description: str = ""
    task_manager: Any = field(default=None, compare=False, repr=False)  # lm-eval's, built once
    device: str | None = None  # lm-eval's --device; None: cuda if available, else cpu

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def samples_by_task(self) -> dict[str, list[int]] | None:
        """lm-eval's ``samples`` argument: the same document indices for every task."""
        if self.samples is None:
            return None
        return {task.name: list(self.samples) for task in self.tasks}

    def shared_plan(self) -> dict:
        """What every run shares (tasks, metadata, documents); part of each run's plan."""
        return {
            "tasks": [{"name": t.name, "source": t.source, "metadata": t.metadata} for t in self.tasks],
            "metadata": self.metadata,
            "samples": list(self.samples) if self.samples else None,
            "limit": self.limit,
            "bootstrap_iters": self.bootstrap_iters,
        }

    def run_plan(self, run: RunSpec) -> dict:
        return {"sweep": self.shared_plan(), "run": run.plan()}


# --------------------------------------------------------------------------- reading


def _read_yaml(path: Path) -> dict:
    """The sweep file as a mapping, or a SweepError saying what is wrong with it."""
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SweepError(f"{path}: not a readable YAML file ({exc})") from exc
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping with keys such as runs, tasks, metadata")
    return data


def _merge(base: dict | None, top: dict | None) -> dict:
    """``top`` over ``base`` (one level: model_args and metadata are flat)."""
    return {**(base or {}), **(top or {})}


def apply_quick(data: dict, path: Path) -> dict:
    """The sweep with its ``quick`` preset applied (metadata / model_args merged, the rest replaced)."""
    quick = data.get("quick")
    if not isinstance(quick, dict) or not quick:
        raise SweepError(
            f"{path}: --quick needs a 'quick:' section in the sweep file (keys: "
            f"{', '.join(QUICK_KEYS)}); this file has none"
        )
    out = {k: v for k, v in data.items() if k != "quick"}
    for key, value in quick.items():
        if key in ("metadata", "model_args"):
            out[key] = _merge(data.get(key), value)
        else:
            out[key] = value
    if "samples" in quick:
        out.pop("limit", None)
    if "limit" in quick:
        out.pop("samples", None)
    return out


# --------------------------------------------------------------------------- tasks


_MANAGERS: dict[str, Any] = {}
OWN_PREFIX = "longshort_"


def own_task_folder() -> Path | None:
    """Where lm-eval finds this package's task YAMLs: inside lm-eval (pip install), else the checkout."""
    import lm_eval.tasks

    for folder in (Path(lm_eval.tasks.__file__).parent / "longshort", Path(__file__).parents[2] / "task_configs"):
        if folder.is_dir():
            return folder
    return None


def _task_manager(metadata: dict, names: Iterable[str]):
    """lm-eval's task index with the sweep metadata, one per metadata and process.

    Indexing all of lm-eval's ~13,000 task YAMLs takes 20 s or more on 2 cores, so when every task
    is one of ours (``longshort_*``) only our folder is indexed.
    """
    from lm_eval.tasks import TaskManager

    folder = own_task_folder()
    own_only = folder is not None and all(str(n).startswith(OWN_PREFIX) for n in names)
    key = json.dumps([metadata, own_only], sort_keys=True, default=str)
    if key not in _MANAGERS:
        scope = {"include_path": str(folder), "include_defaults": False} if own_only else {}
        _MANAGERS[key] = TaskManager(metadata=dict(metadata) or None, **scope)
    return _MANAGERS[key]


def task_yaml(yaml_path: Path) -> dict:
    """A registered task's YAML as lm-eval's factory reads it (functions resolved): a fresh copy."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return copy.deepcopy(load_yaml(yaml_path, resolve_func=True))


def _task_kind(yaml_path: Path | None) -> str | None:
    """ "ppl" / "misalign" for a longshort task YAML (its class's KIND), else None."""
    if yaml_path is None:
        return None
    return getattr(task_yaml(yaml_path).get("class"), "KIND", None) or None


def _parse_task(entry: Any, index, problems: list[str], i: int) -> TaskSpec | None:
    """A TaskSpec from a name or ``{task, as, metadata}``; appends to ``problems`` instead of raising."""
    where = f"tasks[{i}]"
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or "task" not in entry:
        problems.append(f"{where}: give a task name, or a mapping with 'task' (and optional 'as', 'metadata')")
        return None
    problems += unknown_keys(where, entry, TASK_KEYS)
    source = str(entry["task"])
    found = index.get(source)
    if found is None:
        close = difflib.get_close_matches(source, list(index), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
        problems.append(f"{where}: no lm-eval task named '{source}'{hint}")
        return None
    if found.kind.name == "GROUP" or found.kind.name == "TAG":
        problems.append(
            f"{where}: '{source}' is a group; list its tasks one by one instead "
            "(each run's results then name every task)"
        )
        return None
    metadata = entry.get("metadata") or {}
    if not isinstance(metadata, dict):
        problems.append(f"{where}: metadata must be a mapping")
        metadata = {}
    name = str(entry.get("as") or source)
    return TaskSpec(name, source, dict(metadata), found.yaml_path, _task_kind(found.yaml_path))


def _check_task_settings(tasks: list[TaskSpec], metadata: dict, problems: list[str]) -> None:
    """Each longshort task's settings parse (unknown keys, bad values) as its task would parse them.

    The sweep passes model_args to the model only (not merged into task metadata, unlike
    ``lm_eval --model_args``), so a model argument in ``metadata`` is an unknown key here.
    """
    from lm_eval_longshort.harness.datasets import DATASET_KEYS
    from lm_eval_longshort.protocols.settings import parse_settings

    for task in tasks:
        overlap = sorted(set(task.metadata) & set(metadata))
        if overlap:
            problems.append(
                f"task {task.name}: {overlap} set both sweep-wide and for this task; lm-eval "
                "gives the sweep-wide value precedence, so set each key in one place only"
            )
        non_finite = checks.finite_problems(f"task {task.name}", {**task.metadata, **metadata}, "metadata")
        problems += non_finite
        if task.kind is None or non_finite:
            continue
        try:
            parse_settings(task.kind, {**task.metadata, **metadata}, other_keys={"data keys": DATASET_KEYS})
        except (ValueError, TypeError, OverflowError) as exc:
            problems.append(f"task {task.name}: {exc}")


def parse_tasks(data: dict, metadata: dict, index, problems: list[str]) -> tuple[TaskSpec, ...]:
    """The sweep's tasks, validated (names exist, results names unique, settings parse)."""
    entries = data.get("tasks")
    if not isinstance(entries, list) or not entries:
        problems.append("tasks: list at least one task (a name, or {task: NAME, as: NEW_NAME, metadata: {...}})")
        return ()
    tasks = [t for i, e in enumerate(entries) if (t := _parse_task(e, index, problems, i))]
    names = [t.name for t in tasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"tasks: '{name}' appears twice; give the second one another name with 'as:'")
    _check_task_settings(tasks, metadata, problems)
    return tuple(tasks)


# --------------------------------------------------------------------------- runs


def _resolve_base(base: Any, where: str, problems: list[str]) -> str | None:
    """The model a run starts from: ``embedded`` -> the prepared SmolLM2 folder."""
    if base is None:
        return None
    if str(base) == EMBEDDED:
        from lm_eval_longshort import assets

        located = assets.locate()
        if located is None or not located.converted:
            problems.append(f"{where}: base 'embedded' needs the embedded model: run `lm-eval-longshort prepare`")
            return None
        return str(located.model_dir)
    return str(base)


def _parse_run(entry: Any, data: dict, i: int, problems: list[str]) -> RunSpec | None:
    """One run: its backend, model_args (sweep's merged with its own), and variant if derived."""
    where = f"runs[{i}]"
    if not isinstance(entry, dict) or "name" not in entry:
        problems.append(f"{where}: each run is a mapping with at least 'name'")
        return None
    name = str(entry["name"])
    where = f"run {name!r}"
    problems += unknown_keys(where, entry, RUN_KEYS)
    if problem := checks.name_problem(name):
        problems.append(f"{where}: the run name {problem}")
    backend = str(entry.get("backend") or data.get("backend") or "hf")
    if backend not in BACKENDS:
        problems.append(f"{where}: backend '{backend}' is not one of {', '.join(BACKENDS)}")
    elif backend == "vllm" and not checks.installed("vllm"):
        problems.append(f"{where}: backend 'vllm' needs the vllm package, which is not installed")
    own, shared = entry.get("model_args") or {}, data.get("model_args") or {}
    if not isinstance(own, dict) or not isinstance(shared, dict):
        problems.append(f"{where}: model_args must be a mapping, e.g. {{dtype: float32, max_length: 4096}}")
        return None
    model_args = _merge(shared, own)
    if "pretrained" in (entry.get("model_args") or {}) and entry.get("base") is not None:
        problems.append(f"{where}: give either base or model_args.pretrained, not both")
    base = _resolve_base(entry.get("base", None if "pretrained" in model_args else data.get("base")), where, problems)
    model = base or model_args.get("pretrained")
    if model is None:
        problems.append(f"{where}: no model; set 'base' (e.g. base: {EMBEDDED}) or model_args.pretrained")
        return None
    problem = variants.check_model(str(model))
    if problem:
        problems.append(f"{where}: {problem}")
        return None
    variant = None
    if entry.get("rope") is not None or entry.get("overrides") is not None:
        try:
            variant = variants.make_variant(str(model), entry.get("rope"), entry.get("overrides"))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            return None
    model_args = {**model_args, "pretrained": str(model)}
    if backend == "hf" or (backend == "vllm" and checks.installed("vllm")):
        config_keys = variant.config() if variant else variants.model_config(str(model))
        problems += checks.model_arg_problems(where, backend, own, config_keys)
        shared = {k: v for k, v in shared.items() if k not in own}
        problems += checks.model_arg_problems("model_args (sweep-wide)", backend, shared, config_keys)
    pieces = shards.shard_count(entry, data, where, problems)
    return RunSpec(name, backend, model_args, variant, str(entry.get("description") or ""), pieces)


def parse_runs(data: dict, problems: list[str]) -> tuple[RunSpec, ...]:
    """Every run, validated; duplicate names are an error."""
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        problems.append("runs: list at least one run ({name: ..., base: embedded} or {name: ..., model_args: {...}})")
        return ()
    runs = [r for i, e in enumerate(entries) if (r := _parse_run(e, data, i, problems))]
    problems += checks.duplicate_names([str(e.get("name")) for e in entries if isinstance(e, dict) and "name" in e])
    return tuple(runs)


# --------------------------------------------------------------------------- documents and the rest


def load_sweep(path: str | Path, quick: bool = False, output: str | Path | None = None) -> Sweep:
    """Read and validate a sweep file; raise SweepError naming every problem at once.

    Nothing here loads a model: models are checked by their config files (local folder or the
    Hugging Face cache), tasks against lm-eval's task index, settings by the tasks' own parser.
    """
    path = Path(path)
    data = _read_yaml(path)
    problems = unknown_keys(str(path), data, SWEEP_KEYS)
    names_output = output is None and not data.get("output")  # sweep_results/<name>
    if names_output and data.get("name") is not None and (problem := checks.name_problem(str(data["name"]))):
        problems.append(f"name: the sweep name {str(data['name'])!r} {problem}")
    if isinstance(data.get("quick"), dict):
        problems += unknown_keys(f"{path}: quick", data["quick"], QUICK_KEYS)
    if quick:
        data = apply_quick(data, path)
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        problems.append("metadata: a mapping of task settings, e.g. {lengths: [1024, 4096]}")
        metadata = {}
    entries = data.get("tasks") if isinstance(data.get("tasks"), list) else []
    manager = _task_manager(metadata, [e.get("task") if isinstance(e, dict) else e for e in entries])
    tasks = parse_tasks(data, metadata, manager.task_index, problems)
    runs = parse_runs(data, problems)
    samples, limit = checks.documents(data, problems)
    problems += checks.sample_problems(samples, tasks, metadata)
    problems += shards.problems(runs, tasks, samples, limit, metadata)
    bootstrap = checks.whole_number(data, "bootstrap_iters", DEFAULT_BOOTSTRAP_ITERS, problems, minimum=0)
    trained = checks.whole_number(data, "trained_context", None, problems)
    if problems:
        problems = list(dict.fromkeys(problems))  # a sweep-wide problem once, not once per run
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SweepError(f"{path}: {len(problems)} problem(s), nothing was run:\n{listing}")
    name = str(data.get("name") or path.stem) + ("-quick" if quick else "")
    out = Path(output) if output is not None else Path(data.get("output") or Path("sweep_results") / name)
    if quick and output is None and data.get("output"):
        out = Path(f"{data['output']}-quick")
    sweep = Sweep(
        name=name,
        path=path,
        tasks=tasks,
        metadata=dict(metadata),
        runs=runs,
        samples=samples,
        limit=limit,
        bootstrap_iters=int(bootstrap),
        trained_context=trained,
        quick=quick,
        output=out,
        description=str(data.get("description") or ""),
        task_manager=manager,
        device=str(data["device"]) if data.get("device") else None,
    )
    return sweep
