"""A sweep's output folder: where each thing lives, and whether the work in it is this plan's.

A finished run counts only when the plan recorded in its results equals the sweep's; a run that
another live worker holds must be computing this sweep's plan too (one folder, one plan). The
layout of the folder is described in sweep/execute.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lm_eval_longshort.sweep import claims
from lm_eval_longshort.sweep.spec import Sweep, SweepError, plan_json

RESULTS_GLOB = "results_*.json"


@dataclass(frozen=True)
class Layout:
    """Where a sweep keeps each thing (see the module docstring)."""

    root: Path

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def partial_dir(self, name: str) -> Path:
        return self.root / ".partial" / name

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def claim(self, name: str) -> Path:
        return self.root / "claims" / f"{name}.claim"

    def cache(self, name: str) -> Path:
        return self.root / "cache" / name  # lm-eval appends "_rank0.db"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def results(self, name: str) -> Path | None:
        """The finished run's results JSON (the newest), or None."""
        found = sorted(self.run_dir(name).glob(RESULTS_GLOB))
        return found[-1] if found else None

    def failure(self, name: str) -> str | None:
        path = self.run_dir(name) / "failed.json"
        if not path.is_file():
            return None
        return str(json.loads(path.read_text(encoding="utf-8")).get("error", "?"))


def plan_differences(recorded: object, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys where a recorded plan differs from the current one.

    >>> plan_differences({"a": 1, "b": {"c": [1]}}, {"a": 1, "b": {"c": [2]}, "d": 0})
    ['b.c', 'd']
    """
    if not isinstance(recorded, dict):
        return [prefix or "plan"] if plan_json(recorded) != plan_json(current) else []
    keys = sorted(set(recorded) | set(current))
    out = []
    for key in keys:
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in recorded or key not in current:
            out.append(where)
        elif isinstance(current[key], dict) and isinstance(recorded[key], dict):
            out.extend(plan_differences(recorded[key], current[key], where))
        elif plan_json(recorded[key]) != plan_json(current[key]):
            out.append(where)
    return out


def recorded_plan(results_file: Path) -> dict | None:
    """The plan a sweep embedded in a finished run's results JSON (None: not written by a sweep)."""
    try:
        data = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepError(f"{results_file}: unreadable results file ({exc}); delete it to recompute the run") from None
    plan = (data.get("longshort_sweep") or {}).get("plan") if isinstance(data, dict) else None
    return plan if isinstance(plan, dict) else None


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(plan_json(plan).encode()).hexdigest()[:16]


def foreign_work(sweep: Sweep, layout: Layout) -> list[str]:
    """Runs in the folder that another plan computed or is computing, each with the keys that differ.

    A finished run counts only when the plan recorded in its results equals this sweep's; a run
    that another live worker holds must be computing this sweep's plan too (one folder, one plan).
    """
    problems = []
    for run in sweep.runs:
        current = sweep.run_plan(run)
        results = layout.results(run.name)
        if results is not None:
            plan = recorded_plan(results)
            if plan is None:
                problems.append(f"runs/{run.name}/{results.name} records no sweep plan (not written by this sweep)")
            elif differs := plan_differences(plan, current):
                problems.append(f"runs/{run.name} was computed with other {', '.join(differs)}")
            continue
        claim = layout.claim(run.name)
        info = claims.holder(claim)
        if info and info.get("plan") not in (None, plan_digest(current)) and not claims.is_stale(claim):
            problems.append(f"runs/{run.name} is being computed now by {claims.describe(claim)} with another plan")
    return problems


def check_output(sweep: Sweep, layout: Layout) -> None:
    """Refuse an output folder holding another plan's runs (edited sweep file, --quick vs full,
    results copied from elsewhere, or another sweep running there now): never reuse or mix them."""
    problems = foreign_work(sweep, layout)
    if problems:
        raise SweepError(
            f"{layout.root} holds work of another plan: " + "; ".join(problems) + ". Use another --output, "
            "or delete runs/<name> (and stop the other sweep) for each run to recompute it with this plan"
        )
