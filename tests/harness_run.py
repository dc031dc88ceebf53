"""Run longshort tasks through lm-eval's own Python API (simple_evaluate) for the tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lm_eval
import lm_eval.tasks
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

# Where `pip install .` put the YAMLs (inside lm-eval's own task folder).
INSTALLED_TASKS = Path(lm_eval.tasks.__file__).parent / "longshort"


@functools.cache
def task_manager() -> TaskManager:
    """One task index for the whole session (building it costs seconds per process)."""
    return TaskManager()


def evaluate(lm, task: str, metadata: dict, limit: int | None = 2, **kwargs) -> tuple[dict, list[dict]]:
    """(results[task], logged samples) of one task with `metadata` overriding the YAML's.

    For several tasks at once, or simple_evaluate's whole output, use ``evaluate_tasks``.

    The task object is built as lm-eval's factory builds it (``cls(config=yaml)``, with
    ``--metadata`` merged over the YAML's metadata), so one task index serves every variant.
    """
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[build_task(task, metadata)],
        task_manager=task_manager(),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    return out["results"][task], out["samples"][task]


def evaluate_tasks(
    lm, tasks: list[str], metadata: dict, limit: int | None = 1, bootstrap_iters: int = 0, **kwargs
) -> dict:
    """simple_evaluate's whole output (results, samples, configs, ...) for ``tasks`` run in one call.

    ``metadata`` goes to a TaskManager, as ``lm_eval --metadata`` gives it: simple_evaluate merges
    its own ``metadata=`` argument into the task configs only when it builds the TaskManager itself
    (lm_eval/evaluator.py ~292). The index holds only the installed longshort folder (indexing all
    of lm-eval's tasks costs ~7 s per TaskManager). lm-eval's bootstrap stderr is off unless
    ``bootstrap_iters`` is given.
    """
    tm = TaskManager(include_path=str(INSTALLED_TASKS), include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=tm, bootstrap_iters=bootstrap_iters, **kwargs
    )


def build_task(task: str, metadata: dict):
    config = load_yaml(INSTALLED_TASKS / f"{task}.yaml")
    config["metadata"] = {**config.get("metadata", {}), **metadata}
    return config["class"](config=config)


def response(sample: dict) -> dict:
    """The logged response of one sample (lm-eval logs it as text; ours is JSON text)."""
    return json.loads(sample["resps"][0][0])


def metric(results: dict, name: str) -> float:
    return float(results[f"{name},none"])
