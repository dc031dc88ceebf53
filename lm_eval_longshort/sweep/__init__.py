"""`lm-eval-longshort sweep SWEEP.yaml`: many models (or RoPE variants of one), one report.

spec      read the sweep YAML, apply --quick, validate everything before any model loads
checks    the validation rules spec applies (model arguments, documents, names, numbers)
variants  a base model folder + config overrides (RoPE scaling) -> a loadable model folder
claims    one worker per run across processes and hosts sharing the output folder
shards    `shards: K`: a run's documents in K pieces that workers claim like runs
assemble  a sharded run's results JSON from its pieces' per-document sums
execute   one run at a time through lm_eval.simple_evaluate; skip finished, claim, resume, record failures
report    Markdown tables ± standard errors, correlations across runs, PNG plots, CSV
"""

from __future__ import annotations

import argparse
import sys

from lm_eval_longshort.sweep.spec import RunSpec, Sweep, SweepError, TaskSpec, load_sweep

__all__ = ["RunSpec", "Sweep", "SweepError", "TaskSpec", "add_arguments", "load_sweep", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sweep` subcommand's options."""
    parser.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (runs, tasks, metadata)")
    parser.add_argument(
        "--quick", action="store_true", help="use the file's quick: preset (fewer documents and lengths)"
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="output folder (default: the file's output:, else sweep_results/NAME[-quick])",
    )
    parser.add_argument("--check", action="store_true", help="validate the sweep and print its plan; run nothing")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the runs already finished; run nothing"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="start N worker processes on this folder; they split the runs (more workers, here or on other "
        "hosts, may join by running the same command without --workers)",
    )
    parser.add_argument(
        "--gpus",
        default=None,
        metavar="0,1,...",
        help="CUDA devices to split between the workers (each gets its share as CUDA_VISIBLE_DEVICES)",
    )


def _print_plan(sweep: Sweep) -> None:
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs, output {sweep.output}")
    for task in sweep.tasks:
        extra = f" (from {task.source}, {task.metadata})" if task.name != task.source or task.metadata else ""
        print(f"  task {task.name}{extra}")
    print(f"  metadata {sweep.metadata}; documents {list(sweep.samples) if sweep.samples else f'limit {sweep.limit}'}")
    from lm_eval_longshort.sweep import shards

    for run in sweep.runs:
        variant = f" + {run.variant.overrides}" if run.variant else ""
        print(f"  run {run.name}: {run.backend} {run.model_args}{variant}")
        if run.shards > 1:
            print(f"    {shards.describe(shards.works(sweep, run))}")


def _worker_devices(args: argparse.Namespace) -> list[list[str]] | None:
    """Each local worker's devices (None: no --workers/--gpus, run in this process); checked first."""
    if args.workers is None and args.gpus is None:
        return None
    from lm_eval_longshort.sweep import workers

    gpus = workers.parse_gpus(args.gpus)
    count = 1 if args.workers is None else args.workers
    return workers.device_groups(count, gpus, workers.visible_gpus() if gpus else 0)


def _start_workers(args: argparse.Namespace, sweep: Sweep, groups: list[list[str]]) -> int:
    """Check the folder, then run the plain sweep command once per worker."""
    from lm_eval_longshort.sweep import folder, workers

    gpus = any(groups)
    folder.check_output(sweep, folder.Layout(sweep.output))
    command = [sys.executable, "-m", "lm_eval_longshort.cli", "sweep", str(args.sweep), "--output", str(sweep.output)]
    print(f"[sweep] {len(groups)} workers on {sweep.output}" + (f", devices {groups}" if gpus else ""), flush=True)
    return workers.start_workers(command + (["--quick"] if args.quick else []), groups)


def run(args: argparse.Namespace) -> int:
    """Validate, then run (or only check / only report); 0 when every run finished, 1 if one failed,
    2 for a sweep that cannot run as written."""
    from lm_eval_longshort.sweep import execute, folder

    try:
        groups = _worker_devices(args)
        sweep = load_sweep(args.sweep, quick=args.quick, output=args.output)
        if args.check:
            _print_plan(sweep)
            from lm_eval_longshort.sweep import bill

            print("\n".join(bill.describe([bill.run_bill(sweep, run) for run in sweep.runs])))
            return 0
        if args.report_only:
            layout = folder.Layout(sweep.output)
            folder.check_output(sweep, layout)
            path = execute.write_sweep_report(sweep, layout)
            print(f"report: {path}" if path else "no finished run: nothing to report")
            return 0 if path else 1
        if groups is not None:
            return _start_workers(args, sweep, groups)
        outcome = execute.run_sweep(sweep)
    except SweepError as exc:
        print(f"lm-eval-longshort sweep: error: {exc}", file=sys.stderr)
        return 2
    return outcome.exit_code
