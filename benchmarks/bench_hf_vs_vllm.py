"""hf vs vllm backends on this machine: the same tasks and documents, side by side (prints, asserts nothing).

- perplexity (ladder): input tokens read per second, and the ppl@L values of both backends;
- misalignment `last`: long/short pairs per second, and symkl@L of both.

The vLLM engine is lm-eval's own ``VLLM`` (float32, enforce_eager, max_logprobs=-1), its core
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the tests run it; pass
``--multiprocessing`` for vLLM's default separate core process). hf runs first, then is freed:
vLLM's CPU worker pins torch threading for the rest of the process.

Usage: .venv/bin/python benchmarks/bench_hf_vs_vllm.py [--docs 2] [--lengths 512 1024 2048] [--pairs 4]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from _common import embedded_hflm, timed

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"


def run_backend(lm, args) -> dict:
    """Warm up, then time one ladder perplexity run and one `last` misalignment run."""
    from harness_run import evaluate

    evaluate(lm, PPL, {"lengths": [64], "target_tokens": 16}, limit=1)  # warm-up (task index, kernels)
    t: dict[str, float] = {}
    ppl_meta = {"protocol": "ladder", "lengths": args.lengths, "target_tokens": args.target_tokens}
    with timed(t, "ppl"):
        ppl, _ = evaluate(lm, PPL, ppl_meta, limit=args.docs)
    mis_meta = {"mode": "last", "lengths": args.lengths, "pairs": args.pairs}
    with timed(t, "last"):
        mis, _ = evaluate(lm, MIS, mis_meta, limit=args.docs)
    fed = args.docs * sum(n + args.target_tokens - 1 for n in args.lengths)  # ladder reads ids[C-L : C+W-1]
    pairs = args.docs * len(args.lengths) * args.pairs
    return {
        "ppl tokens/s": fed / t["ppl"], "ppl seconds": t["ppl"],
        "last pairs/s": pairs / t["last"], "last seconds": t["last"],
        **{f"ppl@{n}": ppl[f"ppl@{n},none"] for n in args.lengths},
        **{f"symkl@{n}": mis[f"symkl@{n},none"] for n in args.lengths},
    }


def start_vllm(args):
    from lm_eval.models.vllm_causallms import VLLM

    from lm_eval_longshort.assets import prepare

    if not args.multiprocessing:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    need = max(args.lengths) + args.target_tokens  # ladder's C + W - 1 inputs + vLLM's generated slot
    return VLLM(pretrained=str(prepare(progress=False).model_dir), dtype="float32", max_model_len=max(need, 2048),
                max_logprobs=-1, gpu_memory_utilization=0.3, enforce_eager=True)


def print_table(rows: dict[str, dict], start_s: float) -> None:
    hf, vl = rows["hf"], rows["vllm"]
    print(f"\n{'':<16}{'hf':>12}{'vllm':>12}{'vllm/hf':>10}")
    for key in hf:
        print(f"{key:<16}{hf[key]:>12.4f}{vl[key]:>12.4f}{vl[key] / hf[key]:>10.3f}")
    print(f"(vLLM engine start-up, not in the rates: {start_s:.1f} s)")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--target-tokens", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--multiprocessing", action="store_true", help="vLLM engine core in its own process")
    args = parser.parse_args()

    lm, _, _ = embedded_hflm(max_length=max(args.lengths) + args.target_tokens)
    print(f"hf: torch threads {torch.get_num_threads()}", flush=True)
    rows = {"hf": run_backend(lm, args)}
    del lm
    gc.collect()

    begin = time.perf_counter()
    lm = start_vllm(args)
    start_s = time.perf_counter() - begin
    print(f"vllm: engine started in {start_s:.1f} s; torch threads {torch.get_num_threads()}", flush=True)
    rows["vllm"] = run_backend(lm, args)
    print_table(rows, start_s)
    lm.model.llm_engine.engine_core.shutdown()


if __name__ == "__main__":  # vLLM may start processes: keep module import side-effect free
    main()
