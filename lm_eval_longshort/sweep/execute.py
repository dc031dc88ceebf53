"""Running a sweep: one run (or shard of a run) at a time per worker through
``lm_eval.simple_evaluate``, restartable, shareable by several workers on one output folder.

Output folder layout (``--output DIR``)::

    runs/<run>/plan.json           what the run computes (for people; the plan that counts is in the results)
    runs/<run>/results_<date>.json lm-eval's results JSON with the run's plan; its presence means finished
    runs/<run>/failed.json         the error of the last failed attempt
    runs/<run>/shards/<i>of<K>/    a shard of a run with ``shards: K``: the same three files, its own plan
    claims/<run>.claim             the worker computing the run now (sweep/claims.py), or assembling its shards
    claims/<run>.shard<i>of<K>.claim   the worker computing shard i of K
    models/<run>/                  the variant folder (config.json + linked weights), if derived
    cache/<run>_rank0.db           lm-eval's --use_cache file: resume chunk by chunk
    cache/<run>.shard<i>of<K>_rank0.db   shard i's
    .partial/<run>/                where lm-eval writes before the results are moved into place
    report/                        report.md, values.csv, correlations.csv, *.png
    sweep_status.json              per run (and shard): status, seconds, error (times live here, not in the report)

A run is finished only when its results file was renamed into ``runs/<run>/`` (written
completely elsewhere first) and the plan recorded in it is this sweep's. A worker claims a run
(or a shard) before computing it; other workers skip it, or take it over when the holder is
gone, resuming from its cache. The worker that finds every shard of a run finished assembles the
run's results from them (sweep/assemble.py). Work that raises is recorded as failed and the
worker goes on with the next; the worker that leaves nothing unfinished writes the report.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_longshort.sweep import assemble, claims, report, shards
from lm_eval_longshort.sweep.folder import (
    RESULTS_GLOB,
    Layout,
    check_output,
    foreign_work,
    newest_results,
    plan_digest,
    recorded_failure,
    run_failure,
    write_status,
)
from lm_eval_longshort.sweep.progress import Progress, duration
from lm_eval_longshort.sweep.shards import Work
from lm_eval_longshort.sweep.spec import RunSpec, Sweep

POLL_S = float(os.environ.get("LONGSHORT_SWEEP_POLL_S", "10"))  # how often a waiting worker looks again


# --------------------------------------------------------------------------- one run


def evaluate_run(sweep: Sweep, work: Work, layout: Layout, claim: claims.Claim | None = None) -> Path:
    """Evaluate one run, or one shard of a run, with lm-eval's API and its EvaluationTracker; the
    results JSON's final path.

    With a ``claim``, the results are moved into place only while the claim is still this
    worker's (a worker that stalled past the heartbeat limit lost its run to another)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from lm_eval_longshort.harness.resume import check_cache_file

    run = work.run
    model_args = dict(run.model_args)
    if run.variant is not None:
        model_args["pretrained"] = str(run.variant.materialise(layout.model_dir(run.name)).resolve())
    partial = layout.partial_dir(work.key)
    shutil.rmtree(partial, ignore_errors=True)
    layout.cache(work.key).parent.mkdir(parents=True, exist_ok=True)
    check_cache_file(f"{layout.cache(work.key)}_rank0.db")  # lm-eval would fail on it with a bare traceback
    tracker = EvaluationTracker(output_path=str(partial))
    results = lm_eval.simple_evaluate(
        model=run.backend,
        model_args=model_args,
        tasks=[t.lm_eval_spec() for t in sweep.tasks],
        samples=work.samples(sweep),
        limit=work.limit(sweep),
        use_cache=str(layout.cache(work.key)),
        bootstrap_iters=sweep.bootstrap_iters,
        device=sweep.resolved_device(),
        evaluation_tracker=tracker,
        task_manager=sweep.task_manager,
        metadata=sweep.metadata,
        log_samples=False,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results (this process is not rank 0)")
    results["longshort_sweep"] = {"sweep": sweep.name, "run": run.name, "plan": work.plan(sweep)}
    tracker.save_results_aggregated(results=results, samples=None)
    written = sorted(partial.rglob(RESULTS_GLOB))
    if not written:
        raise RuntimeError(f"lm-eval did not write a results file under {partial} (see its log above)")
    if claim is not None and not claim.held():
        shutil.rmtree(partial, ignore_errors=True)
        holder = claims.describe(layout.claim(work.key))
        raise RuntimeError(f"run {run.name}{work.label} was taken over by {holder} after this worker stalled")
    final = layout.work_dir(work) / written[-1].name
    os.replace(written[-1], final)  # atomic: from here on the run (or shard) counts as finished
    shutil.rmtree(partial, ignore_errors=True)
    return final


def _record_failure(layout: Layout, work: Work, exc: BaseException) -> str:
    error = f"{type(exc).__name__}: {exc}"
    (layout.work_dir(work) / "failed.json").write_text(
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
    """What one worker did: ``finished`` (runs and shards, by key) it scored, ``skipped`` (finished
    elsewhere or before), ``failed`` ({key: error}; a sharded run with a failed shard is failed too),
    and the sharded runs it ``assembled``."""

    report: Path | None
    finished: list[str]
    failed: dict[str, str]
    skipped: list[str]
    assembled: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _throughput(sweep: Sweep, work: Work, seconds: float) -> str:
    """`` (N input tokens, R tokens/s)`` for a finished run or shard, from its bill ('' when not countable)."""
    from lm_eval_longshort.sweep import bill

    try:
        tokens = bill.run_bill(sweep, work.run, work.documents).tokens
    except Exception:  # noqa: BLE001 - a progress line must never fail a finished run
        return ""
    return f" ({tokens:,} input tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s)" if tokens else ""


def _failed_since(folder: Path, since: float) -> bool:
    """True when a worker recorded this run's (or shard's) failure after this worker started."""
    path = folder / "failed.json"
    return path.is_file() and path.stat().st_mtime >= since


def _claim(sweep: Sweep, work: Work, layout: Layout) -> claims.Claim | None:
    """This worker's claim on an unfinished run or shard, or None (finished meanwhile, or another
    worker has it). A sharded run's own claim is held while its shards are assembled.

    Checked again once claimed: the work may have finished between the first look and the claim,
    and another plan's worker may have started beside this one (then both stop, mixing nothing).
    """
    layout.work_dir(work).mkdir(parents=True, exist_ok=True)
    claim = claims.try_claim(layout.claim(work.key), plan=plan_digest(work.plan(sweep)))
    if claim is None:
        return None
    if newest_results(layout.work_dir(work)):
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
    assembled: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)
    works: dict[str, list[Work]] = field(default_factory=dict)  # per run: itself, or its shards

    def __post_init__(self) -> None:
        sharded = any(run.shards > 1 for run in self.sweep.runs)
        documents = shards.run_documents(self.sweep) if sharded else None
        self.works = {run.name: shards.works(self.sweep, run, documents) for run in self.sweep.runs}
        self.unit = "run(s) or shard(s)" if sharded else "run(s)"

    def settled(self, key: str) -> bool:
        return key in self.finished or key in self.skipped or key in self.failed or key in self.assembled

    def left(self) -> int:
        """Runs and shards not settled yet (a sharded run counts its shards)."""
        return sum(not self.settled(w.key) for pieces in self.works.values() for w in pieces)

    def visit(self, i: int, run: RunSpec) -> set[str]:
        """Settle a run if possible; what happened to its work: 'done' (now or before), 'scored'
        (by this worker), 'held' (elsewhere)."""
        label, pieces = f"run {i}/{len(self.sweep.runs)} {run.name}", self.works[run.name]
        if pieces[0].count == 1:
            return {self._visit_work(label, pieces[0])}
        if self.layout.results(run.name):
            return {self._visit_work(label, Work(run))}  # assembled before: skipped
        states = {self._visit_work(label + w.label, w) for w in pieces if not self.settled(w.key)}
        if "held" in states:
            return states
        failed = [w for w in pieces if w.key in self.failed]
        if failed:
            self.failed[run.name] = f"shard {failed[0].index}/{failed[0].count}: {self.failed[failed[0].key]}"
            return states
        return states | {self._assemble(label, run, pieces)}

    def _visit_work(self, label: str, work: Work) -> str:
        """Settle one run or shard: score it if no other worker holds it."""
        folder = self.layout.work_dir(work)
        if results := newest_results(folder):
            self.skipped.append(work.key)
            how = "finished by another worker" if work.key in self.announced else "already finished"
            self.progress.say(f"{label}: {how}, skipped ({results.name})")
            return "done"
        if _failed_since(folder, self.started):
            self.failed[work.key] = recorded_failure(folder) or "?"
            self.progress.say(f"{label}: failed in another worker, skipped")
            return "done"
        claim = _claim(self.sweep, work, self.layout)
        if claim is None:
            if work.key not in self.announced:
                self.announced.add(work.key)
                holder = claims.describe(self.layout.claim(work.key))
                self.progress.say(f"{label}: running in another worker ({holder}); waiting to take it over if it stops")
            return "held"
        self._score(label, work, claim)
        return "scored"

    def _score(self, label: str, work: Work, claim: claims.Claim) -> None:
        layout, progress, run = self.layout, self.progress, work.run
        plan = json.dumps(work.plan(self.sweep), indent=2)
        (layout.work_dir(work) / "plan.json").write_text(plan, encoding="utf-8")
        progress.say(
            f"{label}: starting ({run.backend}, {Path(str(run.model_args.get('pretrained'))).name}"
            f"{', variant' if run.variant else ''}); overall: {progress.estimate(self.left(), self.unit)}"
        )
        began = time.monotonic()
        with claim:  # held until the outcome (results or failed.json) is on disk
            try:
                with progress.heartbeat(label):
                    path = evaluate_run(self.sweep, work, layout, claim)
            except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
                self.failed[work.key] = error = _record_failure(layout, work, exc)
                took = duration(time.monotonic() - began)
                progress.say(f"{label}: FAILED after {took}: {error.splitlines()[0]}")
            else:
                (layout.work_dir(work) / "failed.json").unlink(missing_ok=True)
                took = time.monotonic() - began
                self.seconds[work.key] = took
                progress.durations.append(took)
                self.finished.append(work.key)
                progress.say(
                    f"{label}: finished in {duration(took)}{_throughput(self.sweep, work, took)} -> {path}; "
                    f"overall: {progress.estimate(self.left(), self.unit)}"
                )
            finally:
                _release_memory()
                write_status(layout, self.works, self.seconds)

    def _assemble(self, label: str, run: RunSpec, pieces: list[Work]) -> str:
        """Assemble a run whose shards are all finished, unless another worker does it now."""
        whole = Work(run)
        claim = _claim(self.sweep, whole, self.layout)
        if claim is None:
            return self._visit_work(label, whole) if self.layout.results(run.name) else "held"
        with claim:
            try:
                path = assemble.assemble(self.sweep, run, self.layout, pieces, claim)
            except Exception as exc:  # noqa: BLE001 - recorded like a failing run
                self.failed[run.name] = error = _record_failure(self.layout, whole, exc)
                self.progress.say(f"{label}: FAILED to assemble its {len(pieces)} shards: {error.splitlines()[0]}")
            else:
                (self.layout.run_dir(run.name) / "failed.json").unlink(missing_ok=True)
                self.assembled.append(run.name)
                self.progress.say(f"{label}: finished, assembled from its {len(pieces)} shards -> {path}")
            finally:
                write_status(self.layout, self.works, self.seconds)
        return "scored"


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
        visits = set()
        for i, run in enumerate(sweep.runs, 1):
            if not worker.settled(run.name):
                visits |= worker.visit(i, run)
        if "held" not in visits:
            break
        if "scored" not in visits:
            time.sleep(poll_s)
    report_path = _write_report_once(sweep, layout)
    outcome = SweepOutcome(report_path, worker.finished, worker.failed, worker.skipped, worker.assembled)
    assembled = f", {len(worker.assembled)} assembled here from shards" if worker.assembled else ""
    progress.say(
        f"done in {duration(time.monotonic() - progress.start)}: {len(worker.finished)} {worker.unit} scored "
        f"here, {len(worker.skipped)} finished elsewhere or before, {len(worker.failed)} failed{assembled}"
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
    failed = {}
    for run in sweep.runs:
        error = None if layout.results(run.name) else run_failure(layout, shards.works(sweep, run))
        if error:
            failed[run.name] = error
    return report.SweepRuns(runs, failed)


def write_sweep_report(sweep: Sweep, layout: Layout) -> Path | None:
    """The report of whatever has finished (None when nothing has)."""
    loaded = load_finished(sweep, layout)
    if not loaded.runs:
        print("[sweep] no run finished: no report", file=sys.stderr)
        return None
    return report.write_report(sweep, loaded, layout.report_dir)
