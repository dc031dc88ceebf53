"""Perplexity benchmarks on the embedded model (CPU): prints measured ratios, asserts nothing.

1. ladder overhead: the plugin through ``lm_eval.simple_evaluate`` vs bare forwards over
   exactly the same windows in the same process, warm (target: <= 1.05x);
2. truncate: one pass for all lengths vs YaRN-style per-length passes (expect ~1.8x for
   doubling lengths).

3. ``--positions``: what truncate's loss-against-position bins cost: the scoring of a truncate
   task (fastest of ``--repeat``) against the work the bins add to it (edges, per-bin sums,
   ppl_pos@L sums, the larger JSON response), timed on the same per-token NLLs (target: <= 1.02x).

Usage: .venv/bin/python benchmarks/bench_perplexity.py [--docs 2] [--lengths 1024 2048 4096]
       .venv/bin/python benchmarks/bench_perplexity.py --positions [--repeat 3] [--truncate-lengths ...]
"""

from __future__ import annotations

import argparse

import torch
from _common import corpus, embedded_hflm, timed


def bare_ladder(model, tokenizer, docs, lengths, w):
    """Plain forwards over the ladder windows ids[C-L : C+W-1]; returns the summed target NLL."""
    c, total = max(lengths), 0.0
    with torch.inference_mode():
        for doc in docs:
            ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
            for n in lengths:
                window = torch.tensor([ids[c - n : c + w]])
                # Logits only for the W positions that predict targets (the cheapest bare forward).
                logits = model(input_ids=window[:, :-1], logits_to_keep=w, use_cache=False).logits[0].float()
                total += -torch.log_softmax(logits, -1).gather(1, window[0, -w:, None]).sum().item()
    return total


def position_cost(lm, docs, lengths, repeat: int) -> None:
    """Print the truncate scoring time and the share of it the position bins take."""
    import json
    import time

    import numpy as np

    from lm_eval_longshort.harness.lm_method import engine_for
    from lm_eval_longshort.protocols import perplexity
    from lm_eval_longshort.protocols.runner import Document, evaluate_documents, plan_task
    from lm_eval_longshort.protocols.settings import parse_settings

    settings = parse_settings("ppl", {"protocol": "truncate", "lengths": lengths})
    engine, t = engine_for(lm), {}
    documents = [Document(i, d["title"], d["text"]) for i, d in enumerate(docs)]
    for _ in range(repeat):
        with timed(t, "truncate"):
            responses = evaluate_documents(engine, settings, documents, "bench")
    plan = plan_task(engine, settings, documents, "bench")
    first = 0 if plan.bos is not None else 1
    # The pass's per-token NLLs (their values do not change the cost of summing them).
    nlls = [np.random.default_rng(i).uniform(0, 10, settings.longest - first) for i in range(len(docs))]
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        for nll in nlls:  # what truncate_summarize and the response add for the curve, per document
            bins = perplexity.position_sums(nll, first, perplexity.position_edges(settings))
            for previous, length in zip((0, *settings.lengths), settings.lengths):
                perplexity.span_sums(bins, previous, length)
            json.dumps(bins)
    extra = (time.perf_counter() - start) / rounds
    n_bins = len(responses[0]["positions"]["n_targets"])
    print(f"truncate with loss-against-position bins, {len(docs)} docs, lengths {lengths}, {n_bins} bins")
    print(
        f"  scoring (fastest of {repeat}): {t['truncate']:.2f} s ({t['truncate_cpu']:.2f} s CPU); "
        f"the bins' work: {extra * 1e3:.2f} ms; with / without: {t['truncate'] / (t['truncate'] - extra):.5f}x "
        "(target <= 1.02x)"
    )


def main() -> None:
    from harness_run import evaluate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--target-tokens", type=int, default=256)
    parser.add_argument("--truncate-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--skip-truncate", action="store_true")
    parser.add_argument("--positions", action="store_true", help="only the cost of truncate's position bins")
    parser.add_argument("--repeat", type=int, default=3, help="--positions: scoring runs (the fastest counts)")
    args = parser.parse_args()
    lm, model, tokenizer = embedded_hflm()
    docs = corpus(args.docs)
    if args.positions:
        position_cost(lm, docs, args.truncate_lengths, args.repeat)
        return
    meta = {"protocol": "ladder", "lengths": args.lengths, "target_tokens": args.target_tokens}
    t: dict[str, float] = {}

    evaluate(lm, "longshort_ppl_shakespeare", {**meta, "lengths": [64]}, limit=1)  # warm-up
    bare_ladder(model, tokenizer, docs[:1], [64], 16)
    with timed(t, "plugin"):
        results, _ = evaluate(lm, "longshort_ppl_shakespeare", meta, limit=args.docs)
    with timed(t, "bare"):
        bare_ladder(model, tokenizer, docs, args.lengths, args.target_tokens)
    # The same scoring without lm-eval's per-call set-up (task objects, dataset loading, logging).
    from lm_eval_longshort.harness.lm_method import engine_for
    from lm_eval_longshort.protocols.runner import Document, evaluate_documents
    from lm_eval_longshort.protocols.settings import parse_settings

    documents = [Document(i, d["title"], d["text"]) for i, d in enumerate(docs)]
    with timed(t, "engine"):
        evaluate_documents(engine_for(lm), parse_settings("ppl", meta), documents, "bench")
    print(f"ladder, {args.docs} docs, lengths {args.lengths}, W={args.target_tokens}")
    print(
        f"  plugin via simple_evaluate: {t['plugin']:.2f} s   bare forwards: {t['bare']:.2f} s   "
        f"overhead ratio: {t['plugin'] / t['bare']:.3f}x (target <= 1.05x)"
    )
    print(
        f"  of which scoring (tokenize, plan, forward, reduce): {t['engine']:.2f} s = "
        f"{t['engine'] / t['bare']:.3f}x bare; lm-eval set-up and logging: {t['plugin'] - t['engine']:.2f} s"
    )
    if args.skip_truncate:
        return

    meta = {"protocol": "truncate", "lengths": args.truncate_lengths}
    with timed(t, "single"):
        evaluate(lm, "longshort_ppl_shakespeare", {**meta, "single_pass": True}, limit=args.docs)
    with timed(t, "per_length"):
        evaluate(lm, "longshort_ppl_shakespeare", {**meta, "single_pass": False}, limit=args.docs)
    print(f"truncate, {args.docs} docs, lengths {args.truncate_lengths}")
    print(
        f"  single pass: {t['single']:.2f} s   per-length passes: {t['per_length']:.2f} s   "
        f"speedup: {t['per_length'] / t['single']:.2f}x"
    )


if __name__ == "__main__":
    main()
