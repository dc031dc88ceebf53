"""Running a sweep: one run at a time per worker through ``lm_eval.simple_evaluate``, restartable,
shareable by several workers on one output folder.

Output folder layout (``--output DIR``)::

    runs/<run>/plan.json           what the run computes (for people; the plan that counts is in the results)
    runs/<run>/results_<date>.json lm-eval's results JSON with the run's plan; its presence means finished
    runs/<run>/failed.json         the error of the last failed attempt
    claims/<run>.claim             the worker computing the run now (sweep/claims.py)
    models/<run>/                  the variant folder (config.json + linked weights), if derived
    cache/<run>_rank0.db           lm-eval's --use_cache file: resume chunk by chunk
    .partial/<run>/                where lm-eval writes before the results are moved into place
    report/                        report.md, values.csv, correlations.csv, *.png
    sweep_status.json              per run: status, seconds, error (times live here, not in the report)

A run is finished only when its results file was renamed into ``runs/<run>/`` (written
completely elsewhere first) and the plan recorded in it is this sweep's. A worker claims a run
before computing it; other workers skip it, or take it over when the holder is gone, resuming
from its cache. A run that raises is recorded as failed and the worker goes on with the next one;
the worker that leaves nothing unfinished writes the report.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_longshort.sweep import claims, report
from lm_eval_longshort.sweep.spec import RunSpec, Sweep, SweepError, plan_json

RESULTS_GLOB = "results_*.json"
HEARTBEAT_S = 60.0


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


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Progress:
    """Per-run and overall progress lines with time estimates (mean of the runs scored so far)."""

    write: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    durations: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        self.write(f"[sweep] {text}")

    def estimate(self, remaining: int) -> str:
        if not self.durations:
            return "estimate after the first run"
        mean = sum(self.durations) / len(self.durations)
        return f"about {_duration(mean * remaining)} left for {remaining} run(s)"

    def expected(self) -> float | None:
        return sum(self.durations) / len(self.durations) if self.durations else None

    @contextmanager
    def heartbeat(self, label: str):
        """Print ``label: running for ...`` every HEARTBEAT_S seconds while the block runs."""
        stop = threading.Event()
        began = time.monotonic()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                expected = self.expected()
                hint = f" (runs so far took {_duration(expected)} on average)" if expected else ""
                self.say(f"{label}: running for {_duration(time.monotonic() - began)}{hint}")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=1)


# --------------------------------------------------------------------------- checks before work


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


# --------------------------------------------------------------------------- one run


def evaluate_run(sweep: Sweep, run: RunSpec, layout: Layout, claim: claims.Claim | None = None) -> Path:
    """Evaluate one run with lm-eval's API and its EvaluationTracker; the results JSON's final path.

    With a ``claim``, the results are moved into place only while the claim is still this
    worker's (a worker that stalled past the heartbeat limit lost its run to another)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from lm_eval_longshort.harness.resume import check_cache_file

    model_args = dict(run.model_args)
    if run.variant is not None:
        model_args["pretrained"] = str(run.variant.materialise(layout.model_dir(run.name)).resolve())
    partial = layout.partial_dir(run.name)
    shutil.rmtree(partial, ignore_errors=True)
    layout.cache(run.name).parent.mkdir(parents=True, exist_ok=True)
    check_cache_file(f"{layout.cache(run.name)}_rank0.db")  # lm-eval would fail on it with a bare traceback
    tracker = EvaluationTracker(output_path=str(partial))
    results = lm_eval.simple_evaluate(
        model=run.backend,
        model_args=model_args,
        tasks=[t.lm_eval_spec() for t in sweep.tasks],
        samples=sweep.samples_by_task(),
        limit=sweep.limit,
        use_cache=str(layout.cache(run.name)),
        bootstrap_iters=sweep.bootstrap_iters,
        device=sweep.resolved_device(),
        evaluation_tracker=tracker,
        task_manager=sweep.task_manager,
        metadata=sweep.metadata,
        log_samples=False,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results (this process is not rank 0)")
    results["longshort_sweep"] = {"sweep": sweep.name, "run": run.name, "plan": sweep.run_plan(run)}
    tracker.save_results_aggregated(results=results, samples=None)
    written = sorted(partial.rglob(RESULTS_GLOB))
    if not written:
        raise RuntimeError(f"lm-eval did not write a results file under {partial} (see its log above)")
    if claim is not None and not claim.held():
        shutil.rmtree(partial, ignore_errors=True)
        holder = claims.describe(layout.claim(run.name))
        raise RuntimeError(f"run {run.name} was taken over by {holder} after this worker stalled")
    final = layout.run_dir(run.name) / written[-1].name
    os.replace(written[-1], final)  # atomic: from here on the run counts as finished
    shutil.rmtree(partial, ignore_errors=True)
    return final


def _record_failure(layout: Layout, run: RunSpec, exc: BaseException) -> str:
    error = f"{type(exc).__name__}: {exc}"
    (layout.run_dir(run.name) / "failed.json").write_text(
        json.dumps({"error": error, "traceback": traceback.format_exc()}, indent=2), encoding="utf-8"
    )
    return error


def _release_memory() -> None:
    """Free the finished model before the next one loads."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    report: Path | None
    finished: list[str]
    failed: dict[str, str]
    skipped: list[str]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _status(layout: Layout, sweep: Sweep, seconds: dict[str, float]) -> None:
    status = {}
    for run in sweep.runs:
        state = "finished" if layout.results(run.name) else "failed" if layout.failure(run.name) else "pending"
        status[run.name] = {
            "status": state,
            "seconds_this_session": seconds.get(run.name),
            "error": layout.failure(run.name) if state == "failed" else None,
        }
    (layout.root / "sweep_status.json").write_text(json.dumps(status, indent=2), encoding="utf-8")


def _held_elsewhere(layout: Layout, name: str) -> bool:
    path = layout.claim(name)
    return claims.holder(path) is not None and not claims.is_stale(path)


def _failed_since(layout: Layout, name: str, since: float) -> bool:
    """True when another worker recorded this run's failure after this worker started."""
    path = layout.run_dir(name) / "failed.json"
    return path.is_file() and path.stat().st_mtime >= since


def _claim_run(sweep: Sweep, run: RunSpec, layout: Layout) -> claims.Claim | None:
    """This worker's claim on an unfinished run, or None (finished meanwhile, or another worker has it).

    Checked again once claimed: a run may have finished between the first look and the claim,
    and another plan's worker may have started beside this one (then both stop, mixing nothing).
    """
    claim = claims.try_claim(layout.claim(run.name), plan=plan_digest(sweep.run_plan(run)))
    if claim is None:
        return None
    if layout.results(run.name):
        claim.release()
        return None
    problems = foreign_work(sweep, layout)
    if problems:
        claim.release()
        check_output(sweep, layout)
    return claim


def run_sweep(sweep: Sweep, progress: Progress | None = None) -> SweepOutcome:
    """Run every unfinished run that no other worker holds, then write the report when nothing is
    left to compute (the last worker to finish writes it); never raises for a failing run."""
    layout = Layout(Path(sweep.output))
    check_output(sweep, layout)
    progress = progress or Progress()
    total = len(sweep.runs)
    progress.say(f"{sweep.name}: {total} runs x {len(sweep.tasks)} tasks -> {layout.root}")
    skipped, finished, failed, seconds, elsewhere = [], [], {}, {}, []
    started = time.time()
    for i, run in enumerate(sweep.runs, 1):
        label = f"run {i}/{total} {run.name}"
        if layout.results(run.name):
            skipped.append(run.name)
            progress.say(f"{label}: already finished, skipped ({layout.results(run.name).name})")
            continue
        if _failed_since(layout, run.name, started):
            failed[run.name] = layout.failure(run.name) or "?"
            progress.say(f"{label}: failed in another worker, skipped")
            continue
        layout.run_dir(run.name).mkdir(parents=True, exist_ok=True)
        claim = _claim_run(sweep, run, layout)
        if claim is None:
            if layout.results(run.name):
                skipped.append(run.name)
                progress.say(f"{label}: finished by another worker, skipped")
            else:
                elsewhere.append(run.name)
                progress.say(f"{label}: running in another worker ({claims.describe(layout.claim(run.name))}), skipped")
            continue
        (layout.run_dir(run.name) / "plan.json").write_text(json.dumps(sweep.run_plan(run), indent=2), encoding="utf-8")
        progress.say(
            f"{label}: starting ({run.backend}, {Path(str(run.model_args.get('pretrained'))).name}"
            f"{', variant' if run.variant else ''}); overall: {progress.estimate(total - i + 1)}"
        )
        began = time.monotonic()
        with claim:  # held until the outcome (results or failed.json) is on disk
            try:
                with progress.heartbeat(label):
                    path = evaluate_run(sweep, run, layout, claim)
            except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
                failed[run.name] = _record_failure(layout, run, exc)
                progress.say(
                    f"{label}: FAILED after {_duration(time.monotonic() - began)}: {failed[run.name].splitlines()[0]}"
                )
            else:
                (layout.run_dir(run.name) / "failed.json").unlink(missing_ok=True)
                took = time.monotonic() - began
                seconds[run.name] = took
                progress.durations.append(took)
                finished.append(run.name)
                progress.say(
                    f"{label}: finished in {_duration(took)} -> {path}; overall: "
                    f"{i}/{total} done, {progress.estimate(total - i)}"
                )
            finally:
                _release_memory()
                _status(layout, sweep, seconds)
    still_running = [name for name in elsewhere if _held_elsewhere(layout, name)]
    report_path = None
    if still_running:
        progress.say(
            f"{len(still_running)} run(s) still running in other workers ({', '.join(still_running)}): "
            "the worker that finishes last writes the report"
        )
    else:
        report_path = write_sweep_report(sweep, layout)
    outcome = SweepOutcome(report_path, finished, failed, skipped)
    progress.say(
        f"done in {_duration(time.monotonic() - progress.start)}: {len(finished)} run(s) scored, "
        f"{len(skipped)} already finished, {len(elsewhere)} in other workers, {len(failed)} failed"
    )
    if outcome.report:
        progress.say(f"report: {outcome.report}")
    return outcome


def load_finished(sweep: Sweep, layout: Layout) -> report.SweepRuns:
    """The finished runs' results (labelled by run name, in sweep order) and the failures."""
    from lm_eval_longshort import reporting

    done = [(run.name, layout.results(run.name)) for run in sweep.runs if layout.results(run.name)]
    runs = reporting.load_runs([p for _, p in done], labels=[n for n, _ in done]) if done else []
    failed = {
        run.name: layout.failure(run.name) or ""
        for run in sweep.runs
        if not layout.results(run.name) and layout.failure(run.name)
    }
    pending = [run.name for run in sweep.runs if not layout.results(run.name) and run.name not in failed]
    return report.SweepRuns(runs, failed, pending)


def write_sweep_report(sweep: Sweep, layout: Layout) -> Path | None:
    """The report of whatever has finished (None when nothing has)."""
    loaded = load_finished(sweep, layout)
    if not loaded.runs:
        print("[sweep] no run finished: no report", file=sys.stderr)
        return None
    return report.write_report(sweep, loaded, layout.report_dir)
