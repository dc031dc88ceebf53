"""A sweep's output folder: where each thing lives, whether the work in it is this plan's, and
``sweep_status.json``.

A finished run (or piece of a sharded run, sweep/shards.py) counts only when the plan recorded
in its results equals the sweep's; work that another live worker holds must be computing this
sweep's plan too (one folder, one plan). The layout of the folder is described in sweep/execute.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lm_eval_longshort.sweep import claims, shards
from lm_eval_longshort.sweep.spec import Sweep, SweepError

RESULTS_GLOB = "results_*.json"


@dataclass(frozen=True)
class Layout:
    """Where a sweep keeps each thing (see the module docstring)."""

    root: Path

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def work_dir(self, work: shards.Work) -> Path:
        """A whole run's folder, or a piece's (``runs/<run>/shards/<i>of<K>``)."""
        return self.root / "runs" / work.folder

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
        return newest_results(self.run_dir(name))

    def failure(self, name: str) -> str | None:
        """The error of the run's last failed attempt, or None."""
        return recorded_failure(self.run_dir(name))


def newest_results(folder: Path) -> Path | None:
    """The newest results JSON in a run's (or piece's) folder, or None: not finished."""
    found = sorted(folder.glob(RESULTS_GLOB))
    return found[-1] if found else None


def recorded_failure(folder: Path) -> str | None:
    """The error recorded in a run's (or piece's) ``failed.json``, or None."""
    path = folder / "failed.json"
    if not path.is_file():
        return None
    return str(json.loads(path.read_text(encoding="utf-8")).get("error", "?"))


def plan_json(plan: dict) -> str:
    """Canonical JSON of a plan (compared between invocations)."""
    return json.dumps(plan, sort_keys=True, default=str)


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
    """Runs and pieces in the folder that another plan computed or is computing, each with the keys
    that differ.

    A finished run counts only when the plan recorded in its results equals this sweep's; a run
    that another live worker holds must be computing this sweep's plan too (one folder, one plan).
    The pieces of a sharded run not yet assembled are checked the same way.
    """
    problems = []
    documents = shards.run_documents(sweep) if any(run.shards > 1 for run in sweep.runs) else None
    for run in sweep.runs:
        problems += _foreign(sweep, layout, shards.Work(run))  # a sharded run's claim: its assembly
        if run.shards > 1 and layout.results(run.name) is None:
            for piece in shards.works(sweep, run, documents):
                problems += _foreign(sweep, layout, piece)
    return problems


def _foreign(sweep: Sweep, layout: Layout, work: shards.Work) -> list[str]:
    """What is foreign about one run or piece: its results, else its live claim, with another plan."""
    current, where = work.plan(sweep), f"runs/{work.folder}"
    results = newest_results(layout.work_dir(work))
    if results is not None:
        plan = recorded_plan(results)
        if plan is None:
            return [f"{where}/{results.name} records no sweep plan (not written by this sweep)"]
        differs = plan_differences(plan, current)
        return [f"{where} was computed with other {', '.join(differs)}"] if differs else []
    claim = layout.claim(work.key)
    info = claims.holder(claim)
    if info and info.get("plan") not in (None, plan_digest(current)) and not claims.is_stale(claim):
        return [f"{where} is being computed now by {claims.describe(claim)} with another plan"]
    return []


def check_output(sweep: Sweep, layout: Layout) -> None:
    """Refuse an output folder holding another plan's runs (edited sweep file, --quick vs full,
    results copied from elsewhere, or another sweep running there now): never reuse or mix them."""
    problems = foreign_work(sweep, layout)
    if problems:
        raise SweepError(
            f"{layout.root} holds work of another plan: " + "; ".join(problems) + ". Use another --output, "
            "or delete runs/<name> (and stop the other sweep) for each run to recompute it with this plan"
        )


# --------------------------------------------------------------------------- sweep_status.json


def run_failure(layout: Layout, pieces: list[shards.Work]) -> str | None:
    """A run's recorded failure: its own, else its first failed shard's."""
    own = layout.failure(pieces[0].run.name)
    failed = [(w, recorded_failure(layout.work_dir(w))) for w in pieces if w.count > 1]
    return own or next((f"shard {w.index}/{w.count}: {error}" for w, error in failed if error), None)


def _state(layout: Layout, work: shards.Work, seconds: dict[str, float]) -> dict:
    folder = layout.work_dir(work)
    finished = newest_results(folder) is not None
    error = None if finished else recorded_failure(folder) or None
    state = "finished" if finished else "failed" if error else "pending"
    return {"status": state, "seconds_this_session": seconds.get(work.key), "error": error}


def write_status(layout: Layout, works: dict[str, list[shards.Work]], seconds: dict[str, float]) -> None:
    """sweep_status.json: each run's status, seconds and error; a sharded run's shards under ``shards``."""
    status = {}
    for name, pieces in works.items():
        finished = layout.results(name) is not None
        error = None if finished else run_failure(layout, pieces) or None
        state = "finished" if finished else "failed" if error else "pending"
        took = [seconds[w.key] for w in pieces if w.key in seconds]
        status[name] = {"status": state, "seconds_this_session": sum(took) if took else None, "error": error}
        if pieces[0].count > 1:
            status[name]["shards"] = {f"{w.index}of{w.count}": _state(layout, w, seconds) for w in pieces}
    path = layout.root / "sweep_status.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=2), encoding="utf-8")
    os.replace(tmp, path)  # several workers write it: each write whole
