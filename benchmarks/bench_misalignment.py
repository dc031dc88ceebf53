"""Misalignment throughput on the embedded model (CPU): pairs/s for `last` and `dense`, and
total scoring time over the bare forward passes the pairs need (target <= 1.10x).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/bench_misalignment.py [--docs 2] [--lengths 512 1024]
       [--modes last dense]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import corpus, embedded_hflm, timed


def bare_last(model, tokenizer, docs, lengths, pairs, seed=1234, ratio=0.5):
    """One plain forward per long and short input (the passes `last` needs), final-position log-softmax."""
    import math

    c = max(lengths)
    with torch.inference_mode():
        for index, doc in enumerate(docs):
            ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
            for n in lengths:
                rng = np.random.default_rng([seed, index, n])
                shorts = rng.choice(np.arange(math.ceil(ratio * n), n), size=pairs, replace=False)
                for size in [n, *shorts]:
                    logits = model(
                        input_ids=torch.tensor([ids[c - int(size) : c]]), logits_to_keep=1, use_cache=False
                    ).logits
                    torch.log_softmax(logits[0, -1].float(), -1)


def bare_dense(model, tokenizer, docs, lengths, seed=1234, ratio=0.5):
    """What `dense` needs from the model: the decoder over A and B, then float32 log-softmaxes at
    the compared positions (same draws as the task); everything but the divergences."""
    import math

    head = model.get_output_embeddings()
    with torch.inference_mode():
        for index, doc in enumerate(docs):
            ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
            for n in lengths:
                gap = int(np.random.default_rng([seed, index, n]).integers(1, n // 2 + 1))
                hidden = model.model(
                    input_ids=torch.tensor([ids[:n], ids[gap : gap + n]]), use_cache=False
                ).last_hidden_state
                t = torch.arange(math.ceil(ratio * n) + gap - 1, n)
                for rows in t.split(1024):
                    torch.log_softmax(head(hidden[0, rows]).float(), -1)
                    torch.log_softmax(head(hidden[1, rows - gap]).float(), -1)


def dense_positions(docs, lengths, seed=1234, ratio=0.5) -> int:
    """Compared positions of the dense task (same draws as ``bare_dense``)."""
    import math

    return sum(
        n - (math.ceil(ratio * n) + int(np.random.default_rng([seed, index, n]).integers(1, n // 2 + 1)) - 1)
        for index in range(len(docs))
        for n in lengths
    )


def main() -> None:
    from harness_run import evaluate

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="dense: runs of each side; the fastest counts")
    parser.add_argument("--modes", nargs="+", choices=["last", "dense", "kernel"], default=["last", "dense", "kernel"])
    args = parser.parse_args()
    lm, model, tokenizer = embedded_hflm()
    docs = corpus(args.docs)
    t: dict[str, float] = {}
    evaluate(lm, "longshort_misalign_shakespeare", {"lengths": [64], "pairs": 1}, limit=1)  # warm-up

    if "last" in args.modes:
        run_last(lm, model, tokenizer, docs, args, t)
    if "dense" in args.modes:
        run_dense(lm, model, tokenizer, docs, args, t)
    if "kernel" in args.modes:
        run_kernel(model)


def run_kernel(model, rows: int = 128) -> None:
    """Divergences of one chunk against what produced their inputs (output layer + float32
    log-softmax, both sides), in single-thread CPU time: less noisy than whole runs."""
    from lm_eval_longshort.numerics import histogram
    from lm_eval_longshort.numerics.divergences import all_divergences, position_values

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    head = model.get_output_embeddings()
    hidden = torch.randn(2, rows, model.config.hidden_size)
    nexts = torch.randint(0, model.config.vocab_size, (rows,))
    t: dict[str, float] = {}
    with torch.inference_mode():
        logp, logq = (torch.log_softmax(head(h).float(), -1) for h in hidden)
        symkl = all_divergences(logp, logq)["symkl"].double().numpy()
        for _ in range(5):
            with timed(t, "head"):
                for h in hidden:
                    torch.log_softmax(head(h).float(), -1)
            with timed(t, "divergences"):
                all_divergences(logp, logq)
            with timed(t, "with_dp"):  # the divergences plus dp, as the engines call it
                position_values(logp, logq, nexts)
            with timed(t, "distribution"):  # what Dense.summarize adds per group: counts and maximum
                for _ in range(100):
                    histogram.sparse(histogram.counts(symkl))
                    float(np.max(symkl))
    torch.set_num_threads(threads)
    print(
        f"kernel ({rows} positions, 1 thread, CPU time, fastest of 5): output layer + log-softmax x2 "
        f"{t['head_cpu'] * 1e3:.0f} ms, all_divergences {t['divergences_cpu'] * 1e3:.0f} ms "
        f"({t['divergences_cpu'] / t['head_cpu']:.2f}x); with dp {t['with_dp_cpu'] * 1e3:.0f} ms; "
        f"symkl histogram + max {t['distribution_cpu'] * 10:.3f} ms "
        f"({t['distribution_cpu'] / 100 / (t['head_cpu'] + t['with_dp_cpu']):.5f}x head + divergences)"
    )


def run_last(lm, model, tokenizer, docs, args, t: dict) -> None:
    from harness_run import evaluate

    meta = {"mode": "last", "lengths": args.lengths, "pairs": args.pairs}
    with timed(t, "last"):
        evaluate(lm, "longshort_misalign_shakespeare", meta, limit=args.docs)
    with timed(t, "bare_last"):
        bare_last(model, tokenizer, docs, args.lengths, args.pairs)
    n_pairs = args.docs * len(args.lengths) * args.pairs
    print(
        f"last: {n_pairs} pairs in {t['last']:.2f} s = {n_pairs / t['last']:.2f} pairs/s; "
        f"bare forwards {t['bare_last']:.2f} s; ratio {t['last'] / t['bare_last']:.3f}x (target <= 1.10x)"
    )


def run_dense(lm, model, tokenizer, docs, args, t: dict) -> None:
    from harness_run import evaluate

    for _ in range(args.repeat):  # alternate the two, keep each one's fastest run
        with timed(t, "dense"):
            evaluate(lm, "longshort_misalign_shakespeare", {"mode": "dense", "lengths": args.lengths}, limit=args.docs)
        with timed(t, "bare_dense"):
            bare_dense(model, tokenizer, docs, args.lengths)
    positions = dense_positions(docs, args.lengths)
    print(
        f"dense: {positions} compared positions in {t['dense']:.2f} s = {positions / t['dense']:.1f} positions/s; "
        f"bare passes (decoder + log-softmax at the compared positions) {t['bare_dense']:.2f} s; "
        f"ratio {t['dense'] / t['bare_dense']:.3f}x wall, {t['dense_cpu'] / t['bare_dense_cpu']:.3f}x CPU "
        "(target <= 1.10x)"
    )


if __name__ == "__main__":
    main()
