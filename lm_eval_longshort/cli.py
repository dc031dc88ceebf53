"""`lm-eval-longshort`: report, plot and compare lm-eval results; run sweeps and the finetune
demo; prepare local assets.

Subcommands live in ``SUBCOMMANDS`` (name -> Subcommand(help, add_arguments, run)).
To add one, write an ``add_arguments(parser)`` and a ``run(args) -> int`` and add an
entry; ``main`` builds the parser from the dict.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_longshort import reporting
from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.training import finetune

PROG = "lm-eval-longshort"


@dataclass(frozen=True)
class Subcommand:
    """One CLI subcommand: a help line, its argparse setup and its action (returns exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """RESULTS... and --label, shared by report/plot/compare."""
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS",
        help="results_*.json files or lm_eval --output_path folders (searched recursively)",
    )
    parser.add_argument(
        "--label",
        action="extend",
        nargs="+",
        metavar="NAME",
        default=None,
        help="run labels, one per run in the order found (default: basename of "
        "pretrained= in model_args); put after RESULTS",
    )


def _load(args: argparse.Namespace) -> list[reporting.Run]:
    return reporting.load_runs(args.results, labels=args.label)


# --------------------------------------------------------------------------- report


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    _add_results_arguments(parser)


def _report_run(args: argparse.Namespace) -> int:
    """Print each run's per-length table (± standard errors) and scalars, then which runs
    measured different things."""
    print(reporting.format_report(_load(args)))
    return 0


# --------------------------------------------------------------------------- plot


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    _add_results_arguments(parser)
    parser.add_argument(
        "-o",
        "--output",
        default="longshort.png",
        metavar="OUT.png",
        help="where to save the figure (default: %(default)s)",
    )
    parser.add_argument(
        "--trained-context",
        type=_positive_int,
        metavar="N",
        default=None,
        help="draw a dashed line at the model's training context length, e.g. 8192",
    )
    parser.add_argument("--title", default=None, help="figure title")
    view = parser.add_mutually_exclusive_group()
    view.add_argument(
        "--distribution",
        action="store_true",
        help="draw the distribution of per-position symKL instead (its percentiles and maximum against "
        "length; misalignment mode dense)",
    )
    view.add_argument(
        "--positions",
        action="store_true",
        help="draw loss against token position instead (protocol truncate's bins; a panel per group)",
    )


def _positive_int(text: str) -> int:
    """argparse type: a context length in tokens (> 0)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of tokens; give e.g. 8192")
    return value


def _plot_run(args: argparse.Namespace) -> int:
    """Save the perplexity / misalignment vs length figure (one row per comparable group)."""
    reporting.check_output_path(args.output)  # before loading and drawing anything
    runs = _load(args)
    draw = (
        reporting.plot_distribution
        if args.distribution
        else reporting.plot_positions
        if args.positions
        else reporting.plot_runs
    )
    out = draw(runs, args.output, trained_context=args.trained_context, title=args.title)
    print(f"wrote {out}")
    notes = reporting.describe_all(runs)
    if notes:
        print(f"{notes}\n(each group is drawn in its own row of panels)")
    return 0


# --------------------------------------------------------------------------- compare


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_results_arguments(parser)
    parser.add_argument(
        "--metric",
        default="symkl",
        choices=catalogue.names("misalign"),
        help="misalignment metric to correlate (default: %(default)s)",
    )
    parser.add_argument(
        "--ppl-metric",
        default="ppl",
        choices=catalogue.names("ppl"),
        help="perplexity metric to correlate (default: %(default)s)",
    )
    parser.add_argument("--ppl-task", default=None, help="ppl task, if several report the metric")
    parser.add_argument("--misalign-task", default=None, help="misalign task, if several report it")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="LABEL",
        help="run the paired differences between runs are taken against (default: the first)",
    )
    parser.add_argument(
        "--csv",
        default=None,
        metavar="OUT.csv",
        help="write the rows here, the correlations to OUT_correlations.csv and the "
        "paired differences to OUT_differences.csv",
    )
    parser.add_argument("--markdown", default=None, metavar="OUT.md", help="write a Markdown report")


def _compare_run(args: argparse.Namespace) -> int:
    """Print the runs, values, paired differences and correlations; optionally write CSV / Markdown.

    Runs that measured different things are refused (exit 2, naming the differing keys).
    """
    result = reporting.compare_runs(
        _load(args),
        misalign_metric=args.metric,
        ppl_metric=args.ppl_metric,
        ppl_task=args.ppl_task,
        misalign_task=args.misalign_task,
        baseline=args.baseline,
    )
    print(result.to_text())
    if args.csv:
        rows = result.to_csv(args.csv)
        suffix = rows.suffix or ".csv"
        corr = result.to_csv(rows.with_name(f"{rows.stem}_correlations{suffix}"), table="correlations")
        diff = result.to_csv(rows.with_name(f"{rows.stem}_differences{suffix}"), table="differences")
        print(f"wrote {rows}, {corr} and {diff}")
    if args.markdown:
        out = Path(args.markdown)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.to_markdown(), encoding="utf-8")
        print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- prepare


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-convert", action="store_true", help="fetch only; skip converting the GGUF model to a safetensors folder"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _prepare_run(args: argparse.Namespace) -> int:
    """Fetch the small model and corpus, then print ready-to-paste --model_args."""
    # Imported here: assets pulls in heavy dependencies the reporting commands do not need.
    assets = importlib.import_module("lm_eval_longshort.assets")
    prepared = assets.prepare(progress=not args.quiet, convert=not args.no_convert)
    gguf_args = prepared.gguf_model_args()
    hf_args = prepared.model_args() if prepared.converted else gguf_args
    if prepared.converted:
        print(f"HF model (safetensors):  --model_args {shlex.quote(hf_args)}")
    print(f"HF model (GGUF, slower to load):  --model_args {shlex.quote(gguf_args)}")
    print("Example:")
    print(
        f"  lm_eval --model hf --model_args {shlex.quote(hf_args)} "
        "--tasks longshort_ppl_shakespeare --limit 2 --metadata '{\"lengths\": [1024, 2048, 4096]}' "
        "--output_path results"
    )
    print(f"  {PROG} report results")
    return 0


def _model_args_arguments(parser: argparse.ArgumentParser) -> None:
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--gguf", action="store_true", help="the GGUF file instead of the safetensors folder")
    form.add_argument(
        "--path",
        action="store_true",
        help="only the safetensors folder (for JSON --model_args, e.g. vLLM's pooling engine)",
    )


def _model_args_run(args: argparse.Namespace) -> int:
    """Print the embedded model's --model_args (for scripts: `--model_args "$(lm-eval-longshort model-args)"`)."""
    assets = importlib.import_module("lm_eval_longshort.assets")
    prepared = assets.locate()
    if prepared is None:
        print(f"{PROG}: the embedded model is not prepared; run `{PROG} prepare`", file=sys.stderr)
        return 2
    if not args.gguf and not prepared.converted:
        print(
            f"{PROG}: the embedded model was prepared without conversion (prepare --no-convert); "
            f"run `{PROG} prepare` to convert it, or use `{PROG} model-args --gguf`",
            file=sys.stderr,
        )
        return 2
    if args.path:
        print(prepared.model_dir)
    else:
        print(prepared.gguf_model_args() if args.gguf else prepared.model_args())
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "report": Subcommand("print each run's per-context-length table", _report_arguments, _report_run),
    "plot": Subcommand("plot perplexity / misalignment vs context length", _plot_arguments, _plot_run),
    "compare": Subcommand(
        "paired differences with standard errors, and misalignment@L vs perplexity@L correlations, across runs",
        _compare_arguments,
        _compare_run,
    ),
    "prepare": Subcommand(
        "fetch the embedded model + corpus (and convert the model to safetensors)", _prepare_arguments, _prepare_run
    ),
    "model-args": Subcommand("print the embedded model's --model_args", _model_args_arguments, _model_args_run),
    "sweep": Subcommand(
        "run a sweep file (many models or RoPE variants, one report); see README 'Sweeps'",
        lambda p: importlib.import_module("lm_eval_longshort.sweep").add_arguments(p),
        lambda a: importlib.import_module("lm_eval_longshort.sweep").run(a),
    ),
    "finetune": Subcommand(
        "CPU demo: fine-tune the embedded model with alpha 0 / 0.1 misalignment regularizer, "
        "then evaluate on held-out plays",
        finetune.add_arguments,
        finetune.run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per SUBCOMMANDS entry."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Report, plot and compare lm-eval results of the longshort tasks; run sweeps and the "
        "finetune demo; prepare the embedded model and corpus.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (2 for usage / input errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except reporting.ReportingError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
