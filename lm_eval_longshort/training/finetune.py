"""`lm-eval-longshort finetune`: a small CPU demonstration of the misalignment regularizer.

Fine-tunes the embedded SmolLM2-135M at a short length L on some Shakespeare plays, once per
alpha (default 0 and 0.1: same windows, same order, same gaps, same seed), saves each
checkpoint, then measures the base model and every checkpoint on HELD-OUT plays, at L and
beyond, as a sweep measures its runs (evaluation.py: this package's ``longshort_ppl_shakespeare``,
ladder, and ``longshort_misalign_shakespeare``, dense, through the sweep executor), with paired
differences between models on the same documents.

Writes, under ``--output-dir``: ``alpha_<a>/`` checkpoints, ``train_log.csv``, ``eval/`` (the
sweep: its file, runs and ``report/`` with report.md and values.csv), ``paired.csv`` and the
Markdown report (also to ``--report`` when given).

Everything is checked before any model loads (checks.py), so a bad run fails in seconds, not
after hours of training: one line, ``lm-eval-longshort finetune: error: ...``, naming the value
and the fix, and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.training import checks, evaluation, report
from lm_eval_longshort.training.checks import Plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `finetune` options (defaults: the committed reports/finetune_regularizer.md run)."""
    parser.add_argument("--output-dir", default="finetune_out", help="checkpoints, logs, tables (default: %(default)s)")
    parser.add_argument("--report", default=None, metavar="OUT.md", help="also write the Markdown report here")
    parser.add_argument("--length", type=int, default=64, help="training length L (default: %(default)s)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1], help="default: %(default)s")
    choices = catalogue.names("misalign", regularizer=True)
    parser.add_argument("--divergence", choices=choices, default="sce", help="default: %(default)s")
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

    checks.check_eval_plays(args, plan, tokenizer, docs)
    print(f"[finetune] tokenizing {len(plan.train_docs)} training plays", flush=True)
    ids = [runner.tokenize(tokenizer, docs[i]["text"]) for i in plan.train_docs]
    checks.check_training_windows(args, plan, [len(x) for x in ids])
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

    from lm_eval_longshort.training.regularizer import MisalignmentTrainer

    out = plan.out / checks.run_name(config.alpha)
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


def run(args: argparse.Namespace) -> int:
    """Train every alpha, measure base + checkpoints, write the report.

    0 on success, 1 when a model's evaluation failed (the sweep recorded why), 2 on bad input.
    """
    start = time.time()
    try:
        plan = checks.make_plan(args)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
        with open(plan.corpus_file, encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh]
        windows = _prepare_windows(args, plan, tokenizer, docs)
    except ValueError as exc:
        print(f"lm-eval-longshort finetune: error: {exc}", file=sys.stderr)
        return 2
    trained, checkpoints = {}, {}
    for config in plan.configs:
        print(f"[finetune] training alpha={config.alpha:g}: {args.steps} steps", flush=True)
        path, rows, seconds = _finetune(plan, config, windows, args, tokenizer)
        trained[config.alpha], checkpoints[checks.run_name(config.alpha)] = (rows, seconds), path
    report.write_csv(plan.out / "train_log.csv", [row for rows, _ in trained.values() for row in rows])
    models = ({} if args.no_base else {evaluation.BASE: plan.model_dir}) | checkpoints
    try:
        measured = evaluation.measure(args, plan, models)
    except evaluation.EvaluationFailed as exc:
        print(f"lm-eval-longshort finetune: error: {exc}", file=sys.stderr)
        return 1
    titles = [docs[i].get("title", str(i)) for i in plan.eval_docs]
    text = report.markdown(args, plan, titles, trained, measured, (time.time() - start) / 60)
    report.write_outputs(plan.out, measured, text, args.report)
    print(text)
    return 0
