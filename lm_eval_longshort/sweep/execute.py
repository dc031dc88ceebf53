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
from lm_eval_longshort.sweep.folder import RESULTS_GLOB, Layout, check_output, foreign_work, plan_digest
from lm_eval_longshort.sweep.spec import RunSpec, Sweep

HEARTBEAT_S = 60.0
POLL_S = float(os.environ.get("LONGSHORT_SWEEP_POLL_S", "10"))  # how often a waiting worker looks again


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
    path = layout.root / "sweep_status.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=2), encoding="utf-8")
    os.replace(tmp, path)  # several workers write it: each write whole


def _throughput(sweep: Sweep, run: RunSpec, seconds: float) -> str:
    """`` (N input tokens, R tokens/s)`` for a finished run, from its bill ('' when not countable)."""
    from lm_eval_longshort.sweep import bill

    try:
        tokens = bill.run_bill(sweep, run).tokens
    except Exception:  # noqa: BLE001 - a progress line must never fail a finished run
        return ""
    return f" ({tokens:,} input tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s)" if tokens else ""


def _failed_since(layout: Layout, name: str, since: float) -> bool:
    """True when a worker recorded this run's failure after this worker started."""
    path = layout.run_dir(name) / "failed.json"
    return path.is_file() and path.stat().st_mtime >= since


def _claim_run(sweep: Sweep, run: RunSpec, layout: Layout) -> claims.Claim | None:
    """This worker's claim on an unfinished run, or None (finished meanwhile, or another worker has it).

    Checked again once claimed: a run may have finished between the first look and the claim,
    and another plan's worker may have started beside this one (then both stop, mixing nothing).
    """
    layout.run_dir(run.name).mkdir(parents=True, exist_ok=True)
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


@dataclass
class _Worker:
    """One worker's pass over the sweep: what it scored, skipped, saw fail, and waits for."""

    sweep: Sweep
    layout: Layout
    progress: Progress
    started: float = field(default_factory=time.time)
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)

    def settled(self, name: str) -> bool:
        return name in self.finished or name in self.skipped or name in self.failed

    def visit(self, i: int, run: RunSpec) -> str:
        """Settle a run if possible: 'done' (now or before), 'scored' (by this worker), 'held' (elsewhere)."""
        label, layout = f"run {i}/{len(self.sweep.runs)} {run.name}", self.layout
        if layout.results(run.name):
            self.skipped.append(run.name)
            how = "finished by another worker" if run.name in self.announced else "already finished"
            self.progress.say(f"{label}: {how}, skipped ({layout.results(run.name).name})")
            return "done"
        if _failed_since(layout, run.name, self.started):
            self.failed[run.name] = layout.failure(run.name) or "?"
            self.progress.say(f"{label}: failed in another worker, skipped")
            return "done"
        claim = _claim_run(self.sweep, run, layout)
        if claim is None:
            if run.name not in self.announced:
                self.announced.add(run.name)
                holder = claims.describe(layout.claim(run.name))
                self.progress.say(f"{label}: running in another worker ({holder}); waiting to take it over if it stops")
            return "held"
        self._score(label, i, run, claim)
        return "scored"

    def _score(self, label: str, i: int, run: RunSpec, claim: claims.Claim) -> None:
        layout, progress, total = self.layout, self.progress, len(self.sweep.runs)
        plan = json.dumps(self.sweep.run_plan(run), indent=2)
        (layout.run_dir(run.name) / "plan.json").write_text(plan, encoding="utf-8")
        progress.say(
            f"{label}: starting ({run.backend}, {Path(str(run.model_args.get('pretrained'))).name}"
            f"{', variant' if run.variant else ''}); overall: {progress.estimate(total - i + 1)}"
        )
        began = time.monotonic()
        with claim:  # held until the outcome (results or failed.json) is on disk
            try:
                with progress.heartbeat(label):
                    path = evaluate_run(self.sweep, run, layout, claim)
            except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
                self.failed[run.name] = error = _record_failure(layout, run, exc)
                took = _duration(time.monotonic() - began)
                progress.say(f"{label}: FAILED after {took}: {error.splitlines()[0]}")
            else:
                (layout.run_dir(run.name) / "failed.json").unlink(missing_ok=True)
                took = time.monotonic() - began
                self.seconds[run.name] = took
                progress.durations.append(took)
                self.finished.append(run.name)
                left = sum(not self.settled(r.name) for r in self.sweep.runs)
                progress.say(
                    f"{label}: finished in {_duration(took)}{_throughput(self.sweep, run, took)} -> {path}; "
                    f"overall: {progress.estimate(left)}"
                )
            finally:
                _release_memory()
                _status(layout, self.sweep, self.seconds)


def run_sweep(sweep: Sweep, progress: Progress | None = None, poll_s: float = POLL_S) -> SweepOutcome:
    """Settle every run: score the unfinished ones no other worker holds, wait for those another
    worker holds (taking one over if its holder stops), then write the report; never raises for a
    failing run. Any number of workers may run this on one output folder."""
    layout = Layout(Path(sweep.output))
    check_output(sweep, layout)
    progress = progress or Progress()
    progress.say(f"{sweep.name}: {len(sweep.runs)} runs x {len(sweep.tasks)} tasks -> {layout.root}")
    worker = _Worker(sweep, layout, progress)
    while True:
        visits = [worker.visit(i, run) for i, run in enumerate(sweep.runs, 1) if not worker.settled(run.name)]
        if "held" not in visits:
            break
        if "scored" not in visits:
            time.sleep(poll_s)
    outcome = SweepOutcome(_write_report_once(sweep, layout), worker.finished, worker.failed, worker.skipped)
    progress.say(
        f"done in {_duration(time.monotonic() - progress.start)}: {len(worker.finished)} run(s) scored here, "
        f"{len(worker.skipped)} finished elsewhere or before, {len(worker.failed)} failed"
    )
    if outcome.report:
        progress.say(f"report: {outcome.report}")
    return outcome


def _write_report_once(sweep: Sweep, layout: Layout) -> Path | None:
    """The report, written by one worker at a time (another writing it now: skipped here)."""
    claim = claims.try_claim(layout.root / "claims" / "report.claim")
    if claim is None:
        return None
    with claim:
        return write_sweep_report(sweep, layout)


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
    return report.SweepRuns(runs, failed)


def write_sweep_report(sweep: Sweep, layout: Layout) -> Path | None:
    """The report of whatever has finished (None when nothing has)."""
    loaded = load_finished(sweep, layout)
    if not loaded.runs:
        print("[sweep] no run finished: no report", file=sys.stderr)
        return None
    return report.write_report(sweep, loaded, layout.report_dir)
