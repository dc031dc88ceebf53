"""Peak memory of scoring one long window on the embedded model (CPU): prints, asserts nothing.

Scores every token of a 16,384-token truncate window (the worst case: all positions need
vocabulary logits) and reports the process's peak RSS, next to what materialising the
[tokens, vocab] float32 logits alone would take.

Usage: .venv/bin/python benchmarks/bench_memory.py [--tokens 16384]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from _common import corpus, embedded_hflm


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB on Linux


def main() -> None:
    from lm_eval_longshort.backends.hf import HFEngine
    from lm_eval_longshort.protocols.requests import TargetWindow

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    _, model, tokenizer = embedded_hflm(max_length=args.tokens)
    text = "\n".join(doc["text"] for doc in corpus(3))
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens])
    before = rss_gib()
    engine = HFEngine(model, tokenizer, args.tokens, progress=True)
    start = time.perf_counter()
    nll = engine.target_nll([TargetWindow(ids, 1, None, "bench", feed_last=True)])[0]
    seconds = time.perf_counter() - start
    vocab = model.config.vocab_size
    print(f"{args.tokens}-token window, {nll.size} scored tokens, ppl {np.exp(nll.mean()):.2f}, {seconds:.1f} s")
    print(
        f"peak RSS: {rss_gib():.2f} GiB (model loaded: {before:.2f} GiB); "
        f"full [tokens, vocab] float32 logits alone would be {args.tokens * vocab * 4 / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
