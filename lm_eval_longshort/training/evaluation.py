"""`finetune`'s evaluation: the base model and every checkpoint measured as a sweep measures runs.

The models become the runs of a sweep file written under ``--output-dir`` (``eval/finetune_sweep.yaml``;
``lm-eval-longshort sweep eval/finetune_sweep.yaml --report-only`` rebuilds its report), with
the two tasks and the held-out plays of the checks (checks.task_metadata, Plan.eval_docs). The
sweep's own validation and executor run it (``load_sweep``, ``run_sweep``): per-length values
with standard errors over documents (the tasks' delta method), its report and values.csv. Paired
differences between models on the same documents come from ``compare`` on the sweep's results.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.training import checks
from lm_eval_longshort.training.checks import Plan

EVAL_FOLDER = "eval"  # the sweep's output folder under --output-dir
SWEEP_FILE = "finetune_sweep.yaml"
BASE = "base"
# Misalignment metrics whose paired differences are taken (perplexity's always are).
COMPARED = catalogue.names("misalign", correlate=True)
# Room above the longest input (L + the ladder's W) for the hf backend's max_length.
LENGTH_MARGIN = 8


class _PlainDumper(yaml.SafeDumper):
    """Writes a list shared by both tasks twice, not as a YAML anchor and alias: the file is for people too."""

    def ignore_aliases(self, data) -> bool:
        return True


class EvaluationFailed(RuntimeError):
    """A model's evaluation raised; the sweep recorded the error in its runs folder."""


@dataclass
class Measured:
    """The evaluation of every model: runs in order (labelled by run name), the sweep's report, differences."""

    runs: list  # reporting.Run
    sweep_report: Path
    differences: list  # reporting.Difference: x minus y on the same documents


def sweep_data(args: argparse.Namespace, plan: Plan, models: dict[str, Path], folder: Path) -> dict:
    """The sweep file's content: one run per model, the two tasks with the checks' metadata."""
    return {
        "name": "finetune",
        "description": f"`lm-eval-longshort finetune`: {', '.join(models)} on the held-out plays.",
        "backend": "hf",
        "device": "cpu",  # a CPU demonstration: measured where it was trained
        "model_args": {"dtype": "float32", "max_length": max(args.eval_lengths) + args.target_tokens + LENGTH_MARGIN},
        "tasks": [{"task": task, "metadata": metadata} for task, metadata in checks.task_metadata(args).items()],
        "samples": list(plan.eval_docs),
        "runs": [{"name": name, "model_args": {"pretrained": str(Path(p).resolve())}} for name, p in models.items()],
        "output": str(folder.resolve()),
    }


def pairs_to_compare(names: list[str]) -> list[tuple[str, str]]:
    """(x, y) for x − y: every regularized alpha against alpha 0, every checkpoint against the base."""
    zero = checks.run_name(0.0)
    pairs = [(n, zero) for n in names if n not in (BASE, zero) and zero in names]
    return pairs + [(n, BASE) for n in names if n != BASE and BASE in names]


def paired_differences(runs: list, pairs: list[tuple[str, str]]) -> list:
    """compare's paired differences of ppl and each COMPARED metric, for each (x, y), at every length."""
    from lm_eval_longshort import reporting

    by_label = {run.label: run for run in runs}
    found = {}
    for x, y in pairs:
        for metric in COMPARED:
            result = reporting.compare_runs([by_label[x], by_label[y]], misalign_metric=metric, baseline=y)
            for d in result.between_runs:  # ppl comes with each metric: kept once
                found.setdefault((d.label, d.versus, d.metric, d.length), d)
    return list(found.values())


def _run_sweep(path: Path):
    """Validate and run the sweep file; its outcome."""
    from lm_eval_longshort.sweep import SweepError, load_sweep
    from lm_eval_longshort.sweep.execute import run_sweep

    try:
        outcome = run_sweep(load_sweep(path))
    except SweepError as exc:  # the checks before training should have caught it: say where it is
        raise EvaluationFailed(f"the evaluation sweep {path} cannot run: {exc}") from exc
    if outcome.failed:
        errors = "; ".join(f"{name}: {error.splitlines()[0]}" for name, error in outcome.failed.items())
        raise EvaluationFailed(f"evaluation failed for {errors} (details: {path.parent}/runs/<run>/failed.json)")
    return outcome


def measure(args: argparse.Namespace, plan: Plan, models: dict[str, Path]) -> Measured:
    """Measure ``models`` ({run name: folder}) on the held-out plays; raise EvaluationFailed if one fails."""
    from lm_eval_longshort import reporting

    folder = plan.out / EVAL_FOLDER
    # An earlier evaluation here measured earlier checkpoints under the same names and paths: the
    # sweep would take those runs as finished, so they go.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / SWEEP_FILE
    data = sweep_data(args, plan, models, folder)
    path.write_text(yaml.dump(data, Dumper=_PlainDumper, sort_keys=False), encoding="utf-8")
    print(f"[finetune] evaluating {', '.join(models)} on {len(plan.eval_docs)} held-out plays: {path}", flush=True)
    outcome = _run_sweep(path)
    by_label = {run.label: run for run in reporting.load_runs([folder])}  # a sweep labels results by run name
    runs = [by_label[name] for name in models]
    return Measured(runs, outcome.report, paired_differences(runs, pairs_to_compare(list(models))))
