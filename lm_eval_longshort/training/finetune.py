"""`lm-eval-longshort finetune`: a small CPU demonstration of the misalignment regularizer.

Fine-tunes the embedded SmolLM2-135M at a short length L on some Shakespeare plays, once per
alpha (default 0 and 0.1: same windows, same order, same gaps, same seed), saves each
checkpoint, then measures the base model and every checkpoint with this package's own tasks
(``longshort_ppl_shakespeare``, ladder; ``longshort_misalign_shakespeare``, dense) through
``lm_eval.simple_evaluate`` on HELD-OUT plays, at L and beyond. Error bars: standard errors
over documents (lm-eval's ``<metric>_stderr,none`` where present, else the delta method on
the logged per-document sums), and paired differences between models on the same documents.

Writes, under ``--output-dir``: ``alpha_<a>/`` checkpoints, ``train_log.csv``,
``metrics.csv`` and the Markdown report (also to ``--report`` when given).

Everything is checked before any model loads, so a bad run fails in seconds, not after hours of
training: every option, the output paths, the training windows (the training plays must give
``--steps`` x ``--batch-size`` windows of L + the largest gap) and the held-out plays (each must
hold every ``--eval-lengths`` by the tasks' own rule, ``protocols.runner.needed_tokens``: the
ladder needs L + ``--target-tokens``, dense L + its drawn gap), the last two with the tokenizer
alone. A problem is one line, ``lm-eval-longshort finetune: error: ...``, naming the value and
the fix, and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lm_eval_longshort.numerics import aggregate

PPL_TASK, MIS_TASK = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
# (metric, transform of aggregate: how the pooled ratio becomes the reported number)
METRICS = (("ppl", "exp"), ("sce", "identity"), ("symkl", "identity"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `finetune` options (defaults: the committed reports/finetune_regularizer.md run)."""
    parser.add_argument("--output-dir", default="finetune_out", help="checkpoints, logs, tables (default: %(default)s)")
    parser.add_argument("--report", default=None, metavar="OUT.md", help="also write the Markdown report here")
    parser.add_argument("--length", type=int, default=64, help="training length L (default: %(default)s)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1], help="default: %(default)s")
    parser.add_argument("--divergence", choices=("sce", "symkl"), default="sce", help="default: %(default)s")
    parser.add_argument("--min-ratio", type=float, default=0.5, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per alpha (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="windows, gaps, init of the run (default: %(default)s)")
    parser.add_argument(
        "--eval-docs",
        type=int,
        default=3,
        help="held-out plays: the last N of the corpus, never trained on (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-lengths",
        type=int,
        nargs="+",
        default=[64, 256],
        help="context lengths to measure (default: %(default)s)",
    )
    parser.add_argument("--target-tokens", type=int, default=32, help="ladder W (default: %(default)s)")
    parser.add_argument("--no-base", action="store_true", help="skip measuring the base model")


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


def _alpha_name(alpha: float) -> str:
    """How an alpha names its checkpoint folder (``alpha_<name>``); -0.0 is 0."""
    return f"{alpha + 0.0:g}"


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
    names = [_alpha_name(a) for a in args.alphas]
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


def _task_metadata(args: argparse.Namespace) -> dict[str, dict]:
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
    return {task: parse_settings(kinds[task], meta) for task, meta in _task_metadata(args).items()}


def _plan(args: argparse.Namespace) -> Plan:
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
    from lm_eval_longshort.training import RegularizerConfig

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


def _check_eval_plays(args: argparse.Namespace, plan: Plan, tokenizer, docs: list[dict]) -> None:
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
    from lm_eval_longshort.training import RegularizerConfig

    try:
        return RegularizerConfig(length=length, min_ratio=min_ratio).window_tokens
    except ValueError:
        return length


def _check_training_windows(args: argparse.Namespace, plan: Plan, sizes: list[int]) -> None:
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


def training_windows(ids: list[np.ndarray], n_tokens: int, count: int, seed: int):
    """[count, n_tokens] int64: non-overlapping token windows of the plays' token ids, drawn without replacement."""
    import torch

    pool = [row[i : i + n_tokens] for row in ids for i in range(0, len(row) - n_tokens + 1, n_tokens)]
    if len(pool) < count:
        raise ValueError(f"the training plays give {len(pool)} windows of {n_tokens} tokens, {count} needed")
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return torch.from_numpy(np.stack([pool[i] for i in order])).long()


def _prepare_windows(args: argparse.Namespace, plan: Plan, tokenizer, docs: list[dict]):
    """Check the held-out plays, then cut the training windows: all with the tokenizer, before any model loads."""
    from lm_eval_longshort.protocols import runner

    _check_eval_plays(args, plan, tokenizer, docs)
    print(f"[finetune] tokenizing {len(plan.train_docs)} training plays", flush=True)
    ids = [runner.tokenize(tokenizer, docs[i]["text"]) for i in plan.train_docs]
    _check_training_windows(args, plan, [len(x) for x in ids])
    return training_windows(ids, plan.configs[0].window_tokens, args.steps * args.batch_size, args.seed)


class _Windows:
    """A map-style dataset of {"input_ids": [T]} rows (what MisalignmentTrainer reads)."""

    def __init__(self, windows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


def _finetune(plan: Plan, config, windows, args, tokenizer) -> tuple[Path, list[dict], float]:
    """Train one alpha from the base weights; save the checkpoint; return (path, log rows, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from lm_eval_longshort.training import MisalignmentTrainer

    out = plan.out / f"alpha_{config.alpha:g}"
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="linear",
        weight_decay=0.0,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = MisalignmentTrainer(model=model, args=targs, train_dataset=_Windows(windows), regularizer=config)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    rows = [
        {
            "alpha": config.alpha,
            "step": h["step"],
            "loss": h["loss"],
            "lm_loss": h["lm_loss"],
            "misalign": h["misalign"],
            "gap": h["gap"],
        }
        for h in trainer.state.log_history
        if "lm_loss" in h
    ]
    return out, rows, seconds


def _task(name: str, metadata: dict):
    """A task object built from the installed YAML with ``metadata`` merged over its own."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(_task_yaml(name))
    config["metadata"] = {**config.get("metadata", {}), **metadata}
    return config["class"](config=config)


def _evaluate(model_dir: Path, plan: Plan, args, task_manager) -> dict:
    """{task: (results, samples sorted by doc)} of both tasks on the held-out plays."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        max_length=max(args.eval_lengths) + args.target_tokens + 8,
        batch_size=1,
    )
    tasks = [_task(name, metadata) for name, metadata in _task_metadata(args).items()]
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        log_samples=True,
        samples={t: list(plan.eval_docs) for t in (PPL_TASK, MIS_TASK)},
        bootstrap_iters=0,
    )
    return {t: (out["results"][t], sorted(out["samples"][t], key=lambda s: s["doc_id"])) for t in (PPL_TASK, MIS_TASK)}


def _pairs(samples: list[dict], key: str) -> list:
    """Per-document (numerator, denominator) of ``key`` from logged samples (None: skipped document)."""
    return [None if s.get(key) is None else tuple(s[key]) for s in samples]


def _metric_rows(name: str, measured: dict, lengths) -> tuple[list[dict], set[str]]:
    """One row per (L, metric): value, standard error and where the error came from."""
    rows, sources = [], set()
    for n in lengths:
        for metric, transform in METRICS:
            results, samples = measured[PPL_TASK if metric == "ppl" else MIS_TASK]
            key = f"{metric}@{n}"
            stderr = results.get(f"{key}_stderr,none")
            if isinstance(stderr, (int, float)) and math.isfinite(stderr):
                sources.add("lm-eval `_stderr,none`")
            else:
                stderr = aggregate.ratio_stderr(_pairs(samples, key), transform)
                sources.add("delta method on logged per-document sums")
            rows.append(
                {
                    "model": name,
                    "L": n,
                    "metric": metric,
                    "value": float(results[f"{key},none"]),
                    "stderr": float(stderr),
                    "docs": len(samples),
                }
            )
    return rows, sources


def _paired_rows(measured: dict, pairs: list[tuple[str, str]], lengths) -> list[dict]:
    """Differences x - y on the same documents, with the paired standard error."""
    rows = []
    for x, y in pairs:
        for n in lengths:
            for metric, transform in METRICS:
                task = PPL_TASK if metric == "ppl" else MIS_TASK
                key = f"{metric}@{n}"
                diff, se = aggregate.paired_difference(
                    _pairs(measured[x][task][1], key), _pairs(measured[y][task][1], key), transform
                )
                rows.append({"x": x, "y": y, "L": n, "metric": metric, "diff": diff, "stderr": se})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _command_line(args: argparse.Namespace) -> str:
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


def _markdown(args, plan: Plan, titles: list[str], train: dict, metric_rows, paired, sources, minutes) -> str:
    """The report: settings, training curves' ends, per-length table with errors, paired differences."""
    cfg = plan.configs[0]
    lines = [
        "# Fine-tuning with the misalignment regularizer (CPU demo)",
        "",
        f"Command: `lm-eval-longshort finetune {_command_line(args)}`  ",
        f"Model: embedded SmolLM2-135M-Instruct, float32. Training length L = {cfg.length}; gap e drawn "
        f"per step in {list(cfg.gaps)}; min_ratio {cfg.min_ratio}; divergence {cfg.divergence}; "
        f"{args.steps} AdamW steps x {args.batch_size} windows of {cfg.window_tokens} tokens, lr {args.lr:g} "
        f"(linear, warm-up {max(1, args.steps // 10)}), seed {args.seed}: every alpha saw the same windows in the "
        f"same order and the same gaps.  ",
        f"Training plays: corpus documents {plan.train_docs[0]}-{plan.train_docs[-1]}. Held-out plays "
        f"(documents {plan.eval_docs[0]}-{plan.eval_docs[-1]}): {', '.join(titles)}.  ",
        f"Evaluation: `{PPL_TASK}` (ladder, W = {args.target_tokens}) and `{MIS_TASK}` (dense, seed {args.seed}) "
        f"through `lm_eval.simple_evaluate` at L in {sorted(set(args.eval_lengths))}. "
        f"Error bars: ± one standard error over the {len(plan.eval_docs)} documents ({'; '.join(sorted(sources))}).  ",
        f"Wall time: {minutes:.1f} min.",
        "",
        "## Training (mean over the first / last 5 logged steps)",
        "",
        "| alpha | lm_loss first | lm_loss last | misalign first | misalign last | train time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for alpha, (rows, seconds) in train.items():
        head, tail = rows[:5], rows[-5:]
        mean = lambda part, k: sum(r[k] for r in part) / len(part)  # noqa: E731
        lines.append(
            f"| {alpha:g} | {mean(head, 'lm_loss'):.4f} | {mean(tail, 'lm_loss'):.4f} | "
            f"{mean(head, 'misalign'):.4f} | {mean(tail, 'misalign'):.4f} | {seconds / 60:.1f} min |"
        )
    lines += ["", "## Held-out plays", "", "| model | L | ppl@L | sce@L | symkl@L |", "|---|---:|---:|---:|---:|"]
    table = {(r["model"], r["L"], r["metric"]): r for r in metric_rows}
    for model in dict.fromkeys(r["model"] for r in metric_rows):
        for n in sorted(set(args.eval_lengths)):
            cells = [f"{table[(model, n, m)]['value']:.4f} ± {table[(model, n, m)]['stderr']:.4f}" for m, _ in METRICS]
            lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired differences (same documents; ± paired standard error)",
        "",
        "| difference | L | Δppl@L | Δsce@L | Δsymkl@L |",
        "|---|---:|---:|---:|---:|",
    ]
    by = {(r["x"], r["y"], r["L"], r["metric"]): r for r in paired}
    for x, y in dict.fromkeys((r["x"], r["y"]) for r in paired):
        for n in sorted(set(args.eval_lengths)):
            cells = [f"{by[(x, y, n, m)]['diff']:+.4f} ± {by[(x, y, n, m)]['stderr']:.4f}" for m, _ in METRICS]
            lines.append(f"| {x} − {y} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Train every alpha, evaluate base + checkpoints, write the tables; 0 on success, 2 on bad input."""
    start = time.time()
    try:
        plan = _plan(args)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
        with open(plan.corpus_file, encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh]
        windows = _prepare_windows(args, plan, tokenizer, docs)
    except ValueError as exc:
        print(f"lm-eval-longshort finetune: error: {exc}", file=sys.stderr)
        return 2
    from lm_eval.tasks import TaskManager

    train, checkpoints, log_rows = {}, {}, []
    for config in plan.configs:
        print(f"[finetune] training alpha={config.alpha:g}: {args.steps} steps", flush=True)
        path, rows, seconds = _finetune(plan, config, windows, args, tokenizer)
        train[config.alpha], checkpoints[f"alpha={config.alpha:g}"] = (rows, seconds), path
        log_rows += rows
    _write_csv(plan.out / "train_log.csv", log_rows)
    models = ({} if args.no_base else {"base": plan.model_dir}) | checkpoints
    task_manager, measured, metric_rows, sources = TaskManager(), {}, [], set()
    lengths = sorted(set(args.eval_lengths))
    for name, path in models.items():
        print(f"[finetune] evaluating {name} on {len(plan.eval_docs)} held-out plays", flush=True)
        measured[name] = _evaluate(path, plan, args, task_manager)
        rows, used = _metric_rows(name, measured[name], lengths)
        metric_rows += rows
        sources |= used
    names = list(models)
    regularized = [n for n in names if n.startswith("alpha=") and n != "alpha=0"]
    pairs = [(n, "alpha=0") for n in regularized if "alpha=0" in models]
    pairs += [(n, "base") for n in names if n != "base" and "base" in models]
    paired = _paired_rows(measured, pairs, lengths) if pairs else []
    _write_csv(plan.out / "metrics.csv", metric_rows)
    if paired:
        _write_csv(plan.out / "paired.csv", paired)
    titles = [docs[i].get("title", str(i)) for i in plan.eval_docs]
    text = _markdown(args, plan, titles, train, metric_rows, paired, sources, (time.time() - start) / 60)
    for target in [plan.out / "finetune_regularizer.md"] + ([Path(args.report)] if args.report else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    print(text)
    return 0
