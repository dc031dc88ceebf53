"""Checks of sweep values that would otherwise fail only once a run has started.

Each function returns problem lines (one line each, the bad value quoted with ``repr`` so a
newline in it cannot split the line) instead of raising, so that ``load_sweep`` can list every
problem at once. Nothing here loads a model or imports a backend: the model arguments a backend
accepts are read from the source files of lm-eval, transformers and vLLM.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# A run name names folders (runs/<name>, models/<name>) and files (cache/<name>_rank0.db).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 100
NAME_RULE = f"letters, digits, '.', '_', '-' only, starting with a letter or digit, at most {MAX_NAME} characters"

# Model arguments the sweep passes to lm-eval itself (simple_evaluate's own parameter): lm-eval
# would pass them twice and the model class would raise.
SWEEP_SETS = {"device": "the sweep's 'device:' key"}
# Config attributes every transformers config has; with the keys of the model's config.json, the
# keys that transformers' from_pretrained applies to the config (HFLM passes its **kwargs there).
GENERIC_CONFIG_KEYS = (
    "attn_implementation",
    "experts_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_cache",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tie_word_embeddings",
)
# Loaders that read local files only; hub_documents may download, so its documents are not counted.
LOCAL_LOADERS = ("shakespeare", "local")


def unknown_keys(where: str, given: Iterable[str], known: Iterable[str]) -> list[str]:
    """One problem line per key not in ``known``, with the closest known key as a hint."""
    known = list(known)
    problems = []
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{where}: unknown key '{key}'{hint}; known keys: {', '.join(known)}")
    return problems


# --------------------------------------------------------------------------- names


def name_problem(name: str) -> str | None:
    """None if ``name`` can name a folder on any system, else the rule and a name that follows it."""
    if NAME_RE.fullmatch(name) and len(name) <= MAX_NAME:
        return None
    fixed = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._-")[:MAX_NAME] or "run1"
    return f"names folders, so: {NAME_RULE}; e.g. {fixed!r}"


def duplicate_names(names: list[str]) -> list[str]:
    """Two runs with one name, or with names that differ only in case (one folder on macOS, Windows)."""
    problems = [
        f"runs: two runs are named {n!r}; each run needs its own name (it names its folder)"
        for n in sorted({n for n in names if names.count(n) > 1})
    ]
    by_case: dict[str, set[str]] = {}
    for name in names:
        by_case.setdefault(name.lower(), set()).add(name)
    for group in sorted(sorted(g) for g in by_case.values() if len(g) > 1):
        problems.append(
            f"runs: run names {', '.join(map(repr, group))} differ only in case; on a case-insensitive "
            "file system they share one folder: rename one"
        )
    return problems


# --------------------------------------------------------------------------- numbers


def non_finite(value: Any, path: str) -> list[tuple[str, float]]:
    """(path, value) of every nan or infinity in a nested mapping / list."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in non_finite(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [bad for i, v in enumerate(value) for bad in non_finite(v, f"{path}[{i}]")]
    return []


def finite_problems(where: str, value: Any, path: str) -> list[str]:
    return [f"{where}: {p} is {v!r}; give a finite number" for p, v in non_finite(value, path)]


def whole_number(data: dict, key: str, default: int | None, problems: list[str], minimum: int = 1) -> int | None:
    """``data[key]`` as an int >= ``minimum`` (not bool, not a float), else a problem and ``default``."""
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"{key}: a whole number >= {minimum}, got {value!r}")
        return default
    return value


def documents(data: dict, problems: list[str]) -> tuple[tuple[int, ...] | None, int | None]:
    """``samples`` (document indices, the same for every task) or ``limit`` (first N documents)."""
    samples, limit = data.get("samples"), data.get("limit")
    if samples is not None and limit is not None:
        problems.append("samples and limit: give one (samples: document indices, limit: the first N documents)")
    if samples is not None:
        ok = isinstance(samples, list) and samples
        if not ok or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in samples):
            problems.append(f"samples: a list of document indices (integers >= 0), e.g. [35, 36, 37]; got {samples!r}")
            samples = None
        else:
            samples = tuple(samples)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"limit: a whole number of documents >= 1, got {limit!r}")
        limit = None
    return samples, limit


# --------------------------------------------------------------------------- documents per task


@functools.cache
def _texts(loader_name: str, keys_json: str) -> tuple[str, ...]:
    """The documents' texts, in task order (a document's index is its position here)."""
    import datasets

    from lm_eval_longshort.harness import datasets as loaders

    quiet = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()  # a check prints problems, not dataset progress bars
    try:
        return tuple(getattr(loaders, loader_name)(**json.loads(keys_json))["test"]["text"])
    finally:
        if quiet:
            datasets.enable_progress_bars()


def document_count(task, metadata: dict) -> int | None:
    """How many documents a task has (lm-eval's ``samples`` index into them), when its loader reads
    local files only (the embedded Shakespeare corpus, ``local`` files); None when not counted."""
    texts = task_texts(task, metadata)
    return None if texts is None else len(texts)


def task_texts(task, metadata: dict) -> tuple[str, ...] | None:
    """A task's document texts in order, when its loader reads local files only; else None."""
    if task.yaml_path is None:
        return None
    from lm_eval_longshort.harness.datasets import LOADER_KEYS
    from lm_eval_longshort.sweep.spec import task_yaml

    config = task_yaml(task.yaml_path)
    loader = config.get("custom_dataset")
    name = getattr(loader, "__name__", "")
    if getattr(loader, "__module__", "") != "lm_eval_longshort.harness.datasets" or name not in LOCAL_LOADERS:
        return None
    given = {**(config.get("metadata") or {}), **task.metadata, **metadata}
    keys = {k: given[k] for k in LOADER_KEYS[name] if k in given}
    return _texts(name, json.dumps(keys, sort_keys=True, default=str))


def sample_problems(samples: tuple[int, ...] | None, tasks, metadata: dict) -> list[str]:
    """Each document index beyond a task's documents (lm-eval would stop the run with an assertion)."""
    if not samples:
        return []
    problems, beyond = [], {}
    for task in tasks:
        try:
            count = document_count(task, metadata)
        except (OSError, ValueError, TypeError) as exc:
            first = (str(exc).splitlines() or [""])[0]
            problems.append(f"task {task.name}: its documents cannot be read to check samples: {first}")
            continue
        bad = sorted({s for s in samples if count is not None and s >= count})
        if bad:
            beyond.setdefault((count, tuple(bad)), []).append(task.name)
    for (count, bad), names in beyond.items():
        which = "index" if len(bad) == 1 else "indices"
        shown = bad[0] if len(bad) == 1 else list(bad)
        problems.append(
            f"samples: document {which} {shown} out of range for {', '.join(names)}: {count} documents, "
            f"valid indices 0 to {count - 1}"
        )
    return problems


# --------------------------------------------------------------------------- model arguments


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_names(path: Path | None, class_name: str, function: str = "__init__") -> set[str]:
    """What ``class_name.function`` accepts, read from source without importing it: its parameters,
    the class's annotated fields (dataclasses), and the literal keys it reads from ``kwargs``."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8")) if path else None
    except (OSError, SyntaxError, UnicodeDecodeError):
        tree = None
    names: set[str] = set()
    for cls in ast.walk(tree) if tree else ():
        if not (isinstance(cls, ast.ClassDef) and cls.name == class_name):
            continue
        for item in cls.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == function:
                names.update(a.arg for a in item.args.args + item.args.kwonlyargs)
                for node in ast.walk(item):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("pop", "get")
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "kwargs"
                        and node.args
                        and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)
                    ):
                        names.add(node.args[0].value)
    return {n for n in names if not n.startswith("_")} - {"self", "cls", "pretrained_model_name_or_path"}


@functools.cache
def backend_arguments(backend: str) -> frozenset[str]:
    """The model arguments a backend accepts (before the model's own config keys, for ``hf``).

    hf: lm-eval's HFLM constructor, plus what it forwards to transformers' ``from_pretrained``
    (its parameters and the keys it reads, and the project's list in harness/task.py). vllm:
    lm-eval's VLLM constructor, plus vLLM's ``LLM`` and ``EngineArgs`` (VLLM forwards the rest).
    """
    lm_eval_dir = _package_dir("lm_eval")
    models = lm_eval_dir / "models" if lm_eval_dir else None
    if backend == "vllm":
        vllm_dir = _package_dir("vllm")
        names = source_names(models / "vllm_causallms.py" if models else None, "VLLM")
        if vllm_dir:
            names |= source_names(vllm_dir / "entrypoints" / "llm.py", "LLM")
            names |= source_names(vllm_dir / "engine" / "arg_utils.py", "EngineArgs")
        return frozenset(names)
    from lm_eval_longshort.harness.task import _FROM_PRETRAINED_KEYS

    names = source_names(models / "huggingface.py" if models else None, "HFLM")
    if not names:  # the source moved: ask the class itself
        import inspect

        from lm_eval.models.huggingface import HFLM

        names = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    transformers_dir = _package_dir("transformers")
    if transformers_dir:
        names |= source_names(transformers_dir / "modeling_utils.py", "PreTrainedModel", "from_pretrained")
    return frozenset(names | _FROM_PRETRAINED_KEYS | set(GENERIC_CONFIG_KEYS))


def model_arg_problems(where: str, backend: str, model_args: dict, config_keys: Iterable[str] = ()) -> list[str]:
    """Unknown model arguments (with the closest known one), arguments the sweep sets elsewhere,
    and non-finite numbers. ``config_keys``: the model's config.json keys (hf applies them)."""
    problems = finite_problems(where, model_args, "model_args")
    accepted = backend_arguments(backend) | ({"pretrained"} | set(config_keys) if backend == "hf" else {"pretrained"})
    source = (
        "lm-eval's VLLM, vLLM's LLM or EngineArgs"
        if backend == "vllm"
        else "lm-eval's HFLM, transformers' from_pretrained, or a key of the model's config.json"
    )
    for key in model_args:
        if key in SWEEP_SETS:
            problems.append(f"{where}: model argument {key!r} is set by {SWEEP_SETS[key]}; move it there")
        elif key not in accepted:
            close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "check the spelling"
            problems.append(f"{where}: unknown model argument {key!r} ({hint}); {backend} takes arguments of {source}")
    return problems
