"""`finetune`'s checks: every option, the outputs, the held-out plays and the training windows,
all before any model loads, so that a bad run fails in seconds, not after hours of training.

The held-out plays must each hold every ``--eval-lengths`` by the tasks' own rule
(``protocols.runner.needed_tokens``: the ladder needs L + ``--target-tokens``, dense L + its drawn
gap); the training plays must give ``--steps`` x ``--batch-size`` windows of L + the largest gap.
Those two need the tokenizer, nothing heavier. Every refusal is a ValueError naming the value and
the fix; the command prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

PPL_TASK, MIS_TASK = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"


@dataclass(frozen=True)
class Plan:
    """Everything the run needs, checked before any model is loaded."""

    model_dir: Path
    corpus_file: Path
    out: Path
    configs: tuple  # one RegularizerConfig per alpha
    eval_docs: tuple[int, ...]  # held-out corpus indices
    train_docs: tuple[int, ...]


# The smallest value of each integer option, and why (for the refusal).
_AT_LEAST = {
    "length": (2, "tokens per training input"),
    "steps": (1, "optimizer steps per alpha"),
    "batch_size": (1, "windows per step"),
    "target_tokens": (1, "the ladder's fixed target tokens"),
    "eval_docs": (2, "a standard error needs two documents"),
}
# transformers' set_seed calls numpy.random.seed, which takes seeds in [0, 2**32).
_SEED_LIMIT = 2**32


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def alpha_name(alpha: float) -> str:
    """How an alpha is written in names; -0.0 is 0."""
    return f"{alpha + 0.0:g}"


def run_name(alpha: float) -> str:
    """``alpha_<a>``: names the alpha's checkpoint folder and its run in the evaluation sweep."""
    return f"alpha_{alpha_name(alpha)}"


def _check_counts(args: argparse.Namespace) -> None:
    """Integer options: each at least its minimum."""
    for name, (low, why) in _AT_LEAST.items():
        value = getattr(args, name)
        if value < low:
            raise ValueError(f"{_flag(name)} {value}: must be >= {low} ({why})")
    short = [n for n in args.eval_lengths if n < 2]
    if short:
        raise ValueError(f"--eval-lengths {' '.join(map(str, short))}: every length must be >= 2 tokens")


def _check_numbers(args: argparse.Namespace) -> None:
    """Float options and the seed: finite and in range; alphas distinct (each writes its own folder)."""
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr:g}: the learning rate must be a finite number > 0, e.g. --lr 1e-4")
    if not 0.0 < args.min_ratio < 1.0:  # NaN fails this too
        raise ValueError(f"--min-ratio {args.min_ratio:g}: must lie strictly between 0 and 1, e.g. --min-ratio 0.5")
    if not 0 <= args.seed < _SEED_LIMIT:
        raise ValueError(f"--seed {args.seed}: must be an integer in [0, {_SEED_LIMIT - 1}] (numpy's seed range)")
    for alpha in args.alphas:
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(
                f"--alphas {alpha:g}: alpha={alpha!r} must be a finite number >= 0 (0 = plain fine-tuning), e.g. 0.1"
            )
    names = [alpha_name(a) for a in args.alphas]
    twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if twice:
        raise ValueError(
            f"--alphas {' '.join(names)}: alpha {twice[0]} is given twice (both would write alpha_{twice[0]}/); "
            "give each alpha once"
        )


def _check_gaps(args: argparse.Namespace) -> None:
    """Every length must leave the dense rule a gap; the protocol's own settings check decides."""
    from lm_eval_longshort.protocols.settings import MisalignSettings

    for flag, lengths in (("--length", [args.length]), ("--eval-lengths", args.eval_lengths)):
        for n in lengths:
            try:
                MisalignSettings(lengths=(n,), mode="dense", min_ratio=args.min_ratio)
            except ValueError:
                raise ValueError(
                    f"{flag} {n} with --min-ratio {args.min_ratio:g}: the short context must keep "
                    f"ceil({args.min_ratio:g}·{n}) = {math.ceil(args.min_ratio * n)} of the {n} tokens, which "
                    f"leaves no gap; lower --min-ratio or raise {flag}"
                ) from None


def _check_writable(flag: str, path: Path, folder: bool) -> None:
    """``path`` can be written as a folder / file, so nothing fails after hours of training."""
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{flag} {path}: is {'a folder' if path.is_dir() else 'a file'}; give another path")
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so nothing can be written under it; give another path")
    locked = path if path.is_file() and not os.access(path, os.W_OK) else None
    if locked is None and not os.access(existing, os.W_OK | os.X_OK):
        locked = existing
    if locked is not None:
        raise ValueError(f"{flag} {path}: {locked} is not writable; give another path")


def _task_yaml(name: str) -> Path:
    """The installed YAML of one task (lm-eval reads task definitions from its own folder).

    Found without importing lm_eval (seconds), so that a bad option is refused at once.
    """
    spec = importlib.util.find_spec("lm_eval")
    path = Path(spec.origin if spec and spec.origin else "lm_eval").parent / "tasks" / "longshort" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{path} is missing: install the package (pip install .) so lm-eval has its task YAMLs")
    return path


def task_metadata(args: argparse.Namespace) -> dict[str, dict]:
    """The metadata each task runs with, merged over its YAML's: one source for the checks and the run."""
    lengths = sorted(set(args.eval_lengths))
    return {
        PPL_TASK: {"lengths": lengths, "target_tokens": args.target_tokens},
        MIS_TASK: {"mode": "dense", "lengths": lengths, "min_ratio": args.min_ratio, "seed": args.seed},
    }


def _task_settings(args: argparse.Namespace) -> dict:
    """{task: its settings}, parsed as the task parses its metadata (the YAMLs add only ``version``)."""
    from lm_eval_longshort.protocols.settings import parse_settings

    kinds = {PPL_TASK: "ppl", MIS_TASK: "misalign"}
    return {task: parse_settings(kinds[task], meta) for task, meta in task_metadata(args).items()}


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the options and the prepared assets; raise ValueError naming the fix."""
    from lm_eval_longshort import assets

    located = assets.locate()
    if located is None or not located.converted:
        raise ValueError("the embedded model is not prepared: run `lm-eval-longshort prepare` first")
    _check_counts(args)
    _check_numbers(args)
    _check_gaps(args)
    _check_writable("--output-dir", Path(args.output_dir), folder=True)
    if args.report:
        _check_writable("--report", Path(args.report), folder=False)
    for name in (PPL_TASK, MIS_TASK):
        _task_yaml(name)
    with open(located.corpus_file, encoding="utf-8") as fh:
        n_docs = sum(1 for _ in fh)
    if args.eval_docs >= n_docs:
        raise ValueError(
            f"--eval-docs {args.eval_docs}: leaves no training play out of {n_docs}; use at most {n_docs - 1}"
        )
    # Only now torch and transformers (tens of seconds on a busy machine): the checks above need neither.
    # --length is not checked against the model's max_position_embeddings (8192): the embedded model
    # is a Llama (RoPE) and runs past it, and training beyond the context is what context extension does.
    from lm_eval_longshort.training.regularizer import RegularizerConfig

    configs = tuple(
        RegularizerConfig(length=args.length, alpha=a + 0.0, min_ratio=args.min_ratio, divergence=args.divergence)
        for a in args.alphas
    )
    return Plan(
        model_dir=located.model_dir,
        corpus_file=located.corpus_file,
        out=Path(args.output_dir),
        configs=configs,
        eval_docs=tuple(range(n_docs - args.eval_docs, n_docs)),
        train_docs=tuple(range(n_docs - args.eval_docs)),
    )


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), for fits true up to some n and false above (low - 1: none)."""
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            low = mid + 1
        else:
            high = mid - 1
    return high


def _eval_need(settings: dict, length: int, doc_index: int) -> int:
    """Tokens a held-out play needs at one length: the larger of the two tasks' own needs."""
    from lm_eval_longshort.protocols import runner

    return max(runner.needed_tokens(replace(s, lengths=(length,)), doc_index) for s in settings.values())


def _longest_eval_length(settings: dict, n_tokens: int) -> int:
    """The largest L both tasks can measure on n_tokens, whatever dense gap is drawn."""
    from lm_eval_longshort.protocols import misalignment, perplexity

    ladder, dense = settings[PPL_TASK], settings[MIS_TASK]

    def fits(n: int) -> bool:
        return (
            max(perplexity.needed_tokens(replace(ladder, lengths=(n,))), n + misalignment.max_gap(dense, n)) <= n_tokens
        )

    return _largest(fits, 2, n_tokens)


def check_eval_plays(args: argparse.Namespace, plan: Plan, tokenizer, docs: list[dict]) -> None:
    """Each held-out play must hold every evaluation length by the tasks' rule, else the tasks
    would skip it (or refuse) only after training."""
    from lm_eval_longshort.protocols import runner

    settings = _task_settings(args)
    sizes = {i: len(runner.tokenize(tokenizer, docs[i]["text"])) for i in plan.eval_docs}
    short = [
        (n, i, need)
        for n in sorted(set(args.eval_lengths))
        for i in plan.eval_docs
        if (need := _eval_need(settings, n, i)) > sizes[i]
    ]
    if not short:
        return
    n, i, need = min(short, key=lambda s: (sizes[s[1]], s[0]))  # the play that limits the lengths most
    fit = _longest_eval_length(settings, min(sizes.values()))
    raise ValueError(
        f"--eval-lengths {' '.join(str(x) for x in dict.fromkeys(s[0] for s in short))}: too long for the held-out "
        f"plays; #{i} {docs[i].get('title', '')!r} has {sizes[i]} tokens, L={n} needs {need} (ladder: L + "
        f"--target-tokens {args.target_tokens}; dense: L + its gap); "
        + (f"use lengths up to {fit}" if fit >= 2 else "lower --target-tokens")
    )


def _window_tokens(length: int, min_ratio: float) -> int:
    """L + the largest gap (RegularizerConfig.window_tokens); L itself where the dense rule has no gap yet."""
    from lm_eval_longshort.training.regularizer import RegularizerConfig

    try:
        return RegularizerConfig(length=length, min_ratio=min_ratio).window_tokens
    except ValueError:
        return length


def check_training_windows(args: argparse.Namespace, plan: Plan, sizes: list[int]) -> None:
    """The training plays must give steps x batch-size distinct windows of L + the largest gap tokens."""
    need, count = plan.configs[0].window_tokens, args.steps * args.batch_size
    have = sum(n // need for n in sizes)
    if have >= count:
        return
    fit = _largest(lambda n: sum(s // _window_tokens(n, args.min_ratio) for s in sizes) >= count, 2, args.length)
    raise ValueError(
        f"--steps {args.steps} x --batch-size {args.batch_size} = {count} training windows of --length "
        f"{args.length} + the largest gap {need - args.length} = {need} tokens are needed, the {len(sizes)} "
        f"training plays give {have}; "
        + (f"use --length {fit} or less, or " if fit >= 2 else "")
        + "lower --steps / --batch-size (or --eval-docs, for more training plays)"
    )
