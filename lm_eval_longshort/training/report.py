"""`finetune`'s report: the settings, the training curves' ends, the held-out values and the
paired differences (Markdown), and its CSV files.

Every held-out number comes from the evaluation sweep's results (evaluation.Measured): values and
standard errors as the sweep reads them (``reporting.Run``), differences from ``compare``. The
sweep's own report (every metric, correlations, plots, values.csv) sits next to it in ``eval/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.training.checks import MIS_TASK, PPL_TASK, Plan

# The metrics the report tabulates, and the task measuring each.
METRICS = (("ppl", PPL_TASK), *((m, MIS_TASK) for m in catalogue.names("misalign", correlate=True)))
REPORT_NAME = "finetune_regularizer.md"
HEAD_STEPS = 5  # the training table averages the first / last this many logged steps


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per dict, full precision, header from the first row's keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _with_error(value: float | None, error: float | None, signed: bool = False) -> str:
    """``1.2345 ± 0.0123`` (``+1.2345 ± ...`` when signed); ``n/a`` where a number is missing."""
    if value is None or error is None:
        return "n/a"
    return f"{value:+.4f} ± {error:.4f}" if signed else f"{value:.4f} ± {error:.4f}"


def command_line(args: argparse.Namespace) -> str:
    """The options of this run, as one would type them (for the report)."""
    parts = []
    for action, value in sorted(vars(args).items()):
        if action.startswith("_") or action == "command" or value is None or value is False:
            continue
        flag = "--" + action.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(f"{flag} {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _header(args: argparse.Namespace, plan: Plan, titles: list[str], measured, minutes: float) -> list[str]:
    cfg = plan.configs[0]
    return [
        "# Fine-tuning with the misalignment regularizer (CPU demo)",
        "",
        f"Command: `lm-eval-longshort finetune {command_line(args)}`  ",
        f"Model: embedded SmolLM2-135M-Instruct, float32. Training length L = {cfg.length}; gap e drawn "
        f"per step in {list(cfg.gaps)}; min_ratio {cfg.min_ratio}; divergence {cfg.divergence}; "
        f"{args.steps} AdamW steps x {args.batch_size} windows of {cfg.window_tokens} tokens, lr {args.lr:g} "
        f"(linear, warm-up {max(1, args.steps // 10)}), seed {args.seed}: every alpha saw the same windows in the "
        f"same order and the same gaps.  ",
        f"Training plays: corpus documents {plan.train_docs[0]}-{plan.train_docs[-1]}. Held-out plays "
        f"(documents {plan.eval_docs[0]}-{plan.eval_docs[-1]}): {', '.join(titles)}.  ",
        f"Evaluation: `{PPL_TASK}` (ladder, W = {args.target_tokens}) and `{MIS_TASK}` (dense, seed {args.seed}) "
        f"at L in {sorted(set(args.eval_lengths))}, every model a run of one sweep (report: "
        f"`{measured.sweep_report}`). Error bars: ± one standard error over the {len(plan.eval_docs)} documents "
        "(delta method on the per-document sums, as the tasks report them).  ",
        f"Wall time: {minutes:.1f} min.",
        "",
    ]


def _training_section(trained: dict) -> list[str]:
    """A row per alpha: mean LM loss and term over the first and the last logged steps."""
    lines = [
        f"## Training (mean over the first / last {HEAD_STEPS} logged steps)",
        "",
        "| alpha | lm_loss first | lm_loss last | misalign first | misalign last | train time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for alpha, (rows, seconds) in trained.items():
        head, tail = rows[:HEAD_STEPS], rows[-HEAD_STEPS:]
        mean = lambda part, k: sum(r[k] for r in part) / len(part)  # noqa: E731
        lines.append(
            f"| {alpha:g} | {mean(head, 'lm_loss'):.4f} | {mean(tail, 'lm_loss'):.4f} | "
            f"{mean(head, 'misalign'):.4f} | {mean(tail, 'misalign'):.4f} | {seconds / 60:.1f} min |"
        )
    return lines + [""]


def _values_section(runs: list, lengths: list[int]) -> list[str]:
    """A row per (model, L): each metric ± its standard error."""
    header = " | ".join(f"{m}@L" for m, _ in METRICS)
    lines = ["## Held-out plays", "", f"| model | L | {header} |", "|---|---:|" + "---:|" * len(METRICS)]
    for run in runs:
        for n in lengths:
            cells = [_with_error(run.value(task, m, n), run.error(task, m, n)) for m, task in METRICS]
            lines.append(f"| {run.label} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _differences_section(differences: list, lengths: list[int]) -> list[str]:
    """A row per (x − y, L): each metric's paired difference ± its paired standard error."""
    header = " | ".join(f"Δ{m}@L" for m, _ in METRICS)
    lines = [
        "## Paired differences (same documents; ± paired standard error)",
        "",
        f"| difference | L | {header} |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    by = {(d.label, d.versus, d.length, d.metric): (d.difference, d.stderr) for d in differences}
    for x, y in dict.fromkeys((d.label, d.versus) for d in differences):
        for n in lengths:
            cells = [_with_error(*by.get((x, y, n, m), (None, None)), signed=True) for m, _ in METRICS]
            lines.append(f"| {x} − {y} | {n} | " + " | ".join(cells) + " |")
    return lines + [""] if differences else []


def markdown(args: argparse.Namespace, plan: Plan, titles: list[str], trained: dict, measured, minutes: float) -> str:
    """The whole report; ``trained`` is {alpha: (log rows, seconds)}, ``measured`` an evaluation.Measured."""
    lengths = sorted(set(args.eval_lengths))
    lines = (
        _header(args, plan, titles, measured, minutes)
        + _training_section(trained)
        + _values_section(measured.runs, lengths)
        + _differences_section(measured.differences, lengths)
    )
    return "\n".join(lines).rstrip("\n") + "\n"


def write_outputs(out: Path, measured, text: str, also: str | None) -> None:
    """paired.csv (full precision) and the report, under ``out`` and at ``also`` when given."""
    if measured.differences:
        write_csv(out / "paired.csv", [dataclasses.asdict(d) for d in measured.differences])
    for target in [out / REPORT_NAME] + ([Path(also)] if also else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
