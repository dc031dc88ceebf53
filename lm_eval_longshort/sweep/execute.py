"""Running a sweep: one model at a time through ``lm_eval.simple_evaluate``, restartable.

Output folder layout (``--output DIR``)::

    runs/<run>/plan.json           what the run computes (a finished run with another plan is refused)
    runs/<run>/results_<date>.json lm-eval's results JSON; its presence means the run finished
    runs/<run>/failed.json         the error of the last failed attempt
    models/<run>/                  the variant folder (config.json + linked weights), if derived
    cache/<run>_rank0.db           lm-eval's --use_cache database: per-document resume
    .partial/<run>/                where lm-eval writes before the results are moved into place
    report/                        report.md, values.csv, correlations.csv, *.png
    sweep_status.json              per run: status, seconds, error (times live here, not in the report)

A run is finished only when its results file was renamed into ``runs/<run>/`` (written
completely elsewhere first), so a half-written result is never taken as finished. Restarted,
the sweep skips finished runs and resumes the unfinished one document by document from its
cache. A run that raises is recorded as failed and the sweep goes on with the next one.
"""

from __future__ import annotations

import gc
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

from lm_eval_longshort.sweep import report
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

    total: int
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


def check_output(sweep: Sweep, layout: Layout) -> None:
    """Refuse an output folder whose finished runs were computed from another plan (edited
    sweep file, or --quick vs full into one folder): their results would be silently reused."""
    stale = []
    for run in sweep.runs:
        plan_file = layout.run_dir(run.name) / "plan.json"
        if (
            layout.results(run.name)
            and plan_file.is_file()
            and plan_json(json.loads(plan_file.read_text(encoding="utf-8"))) != plan_json(sweep.run_plan(run))
        ):
            stale.append(run.name)
    if stale:
        raise SweepError(
            f"{layout.root}: finished run(s) {', '.join(stale)} were computed with another definition (tasks, "
            "metadata, documents or model); use another --output, or delete runs/<name> for each to recompute it"
        )


# --------------------------------------------------------------------------- one run


def evaluate_run(sweep: Sweep, run: RunSpec, layout: Layout) -> Path:
    """Evaluate one run with lm-eval's API and its EvaluationTracker; the results JSON's final path."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    model_args = dict(run.model_args)
    if run.variant is not None:
        model_args["pretrained"] = str(run.variant.materialise(layout.model_dir(run.name)).resolve())
    partial = layout.partial_dir(run.name)
    shutil.rmtree(partial, ignore_errors=True)
    layout.cache(run.name).parent.mkdir(parents=True, exist_ok=True)
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


def run_sweep(sweep: Sweep, progress: Progress | None = None) -> SweepOutcome:
    """Run every unfinished run in order, then write the report; never raises for a failing run."""
    layout = Layout(Path(sweep.output))
    check_output(sweep, layout)
    progress = progress or Progress(len(sweep.runs))
    total = len(sweep.runs)
    progress.say(f"{sweep.name}: {total} runs x {len(sweep.tasks)} tasks -> {layout.root}")
    skipped, finished, failed, seconds = [], [], {}, {}
    for i, run in enumerate(sweep.runs, 1):
        label = f"run {i}/{total} {run.name}"
        if layout.results(run.name):
            skipped.append(run.name)
            progress.say(f"{label}: already finished, skipped ({layout.results(run.name).name})")
            continue
        layout.run_dir(run.name).mkdir(parents=True, exist_ok=True)
        (layout.run_dir(run.name) / "plan.json").write_text(json.dumps(sweep.run_plan(run), indent=2), encoding="utf-8")
        progress.say(
            f"{label}: starting ({run.backend}, {Path(str(run.model_args.get('pretrained'))).name}"
            f"{', variant' if run.variant else ''}); overall: {progress.estimate(total - i + 1)}"
        )
        began = time.monotonic()
        try:
            with progress.heartbeat(label):
                path = evaluate_run(sweep, run, layout)
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
    outcome = SweepOutcome(write_sweep_report(sweep, layout), finished, failed, skipped)
    progress.say(
        f"done in {_duration(time.monotonic() - progress.start)}: {len(finished)} run(s) scored, "
        f"{len(skipped)} already finished, {len(failed)} failed"
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
