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


def build_task(task: str, metadata: dict):
    config = load_yaml(INSTALLED_TASKS / f"{task}.yaml")
    config["metadata"] = {**config.get("metadata", {}), **metadata}
    return config["class"](config=config)


def response(sample: dict) -> dict:
    """The logged response of one sample (lm-eval logs it as text; ours is JSON text)."""
    return json.loads(sample["resps"][0][0])


def metric(results: dict, name: str) -> float:
    return float(results[f"{name},none"])
