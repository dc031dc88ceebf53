"""hf vs vLLM's two routes on a GPU, bf16, 8k-32k: the CPU comparison of bench_hf_vs_vllm.py at scale.

Builds a ~1.2B-parameter Llama (Llama-3.2-1B shapes, tied embeddings) from a config with random
bf16 weights, saves it to a temporary folder (speed does not depend on weight values; nothing
to download), then per route, each in its own process:
- ``hf``: ``backends.hf.HFEngine`` on the transformers model;
- ``vllm-logprobs``: ``backends.vllm.VLLMEngine`` on a generate-mode ``vllm.LLM``
  (prompt log-probabilities, ``max_logprobs=-1``; dense is a top-K approximation);
- ``vllm-hidden``: ``backends.vllm.VLLMHiddenStateEngine`` on a pooling ``vllm.LLM``
  (``runner=pooling, convert=embed, pooler_config={"task": "token_embed"}``; exact).
Per length L: ladder windows (L context + W scored targets) input tokens/s and peak GPU memory,
``last`` pairs/s (one L-token prompt and ``--pairs`` shorter ones), ``dense`` compared
positions/s (one aligned pair, gap L/2). Engine-level calls (no lm-eval, no tokenizer).
Prints a table; asserts nothing.

Needs torch with CUDA, transformers and vllm (the project's lent GPU machine has no vLLM and
cannot download it: run this where ``pip install vllm`` works). Peak memory is
``torch.cuda.max_memory_allocated`` of the route's process; the vLLM engine core runs in
that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so it includes vLLM's weights and the KV
cache it reserves (``--gpu-memory-utilization``).

Usage (repo root):  PYTHONPATH=. python3 benchmarks/gpu/bench_vllm_routes_gpu.py [--lengths 8192 16384 32768]
                    PYTHONPATH=. python3 benchmarks/gpu/bench_vllm_routes_gpu.py --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import NoTokenizer, llama_1b_config, seconds_and_peak

ROUTES = ("hf", "vllm-logprobs", "vllm-hidden")
POOLING = {"runner": "pooling", "convert": "embed", "pooler_config": {"task": "token_embed"}}


def build_checkpoint(folder: Path, tiny: bool) -> None:
    """Save a random-weight Llama (1B shapes, bf16; or a tiny float32 one) to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )
    else:
        config = llama_1b_config()
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)


def start_engine(route: str, folder: str, args):
    """The plugin's engine for ``route`` over the saved checkpoint."""
    dtype = "float32" if args.tiny else "bfloat16"
    max_len = max(args.lengths) + args.target_tokens + 1
    if route == "hf":
        from transformers import AutoModelForCausalLM

        from lm_eval_longshort.backends.hf import HFEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        return HFEngine(model, NoTokenizer(), max_len, progress=False)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from lm_eval_longshort.backends.vllm import VLLMEngine, VLLMHiddenStateEngine

    extra = POOLING if route == "vllm-hidden" else {"max_logprobs": -1}
    llm = LLM(
        model=folder,
        dtype=dtype,
        max_model_len=max_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_num_batched_tokens=max(8192, max_len),
        **extra,
    )
    cls = VLLMHiddenStateEngine if route == "vllm-hidden" else VLLMEngine
    return cls(llm, NoTokenizer(), progress=False)


def run_route(route: str, folder: str, args) -> list[dict]:
    from lm_eval_longshort.protocols.requests import AlignedWindows, Prompt, TargetWindow

    begin = time.perf_counter()
    engine = start_engine(route, folder, args)
    start_s = time.perf_counter() - begin
    vocab = int(json.loads(Path(folder, "config.json").read_text())["vocab_size"])
    rng = np.random.default_rng(0)
    rows = []
    for n in args.lengths:
        ids = rng.integers(0, vocab, size=n + args.target_tokens)
        windows = [TargetWindow(ids, score_from=n, bos=None, label=f"w{i}") for i in range(args.windows)]
        ladder_s, peak = seconds_and_peak(lambda: engine.target_nll(windows))  # noqa: B023
        shorts = np.linspace(n // 8, n // 2, args.pairs).astype(int)
        prompts = [Prompt(ids[:n], None, "long")] + [Prompt(ids[n - s : n], None, f"short {s}") for s in shorts]
        last_s, _ = seconds_and_peak(lambda: engine.last_logprobs(prompts))  # noqa: B023
        gap = n // 2
        pos = np.arange(gap + n // 4, n)  # the long window's last positions, seen from both windows
        pair = AlignedWindows(ids[:n], ids[gap : gap + n], pos, pos - gap, None, "pair")
        dense_s, _ = seconds_and_peak(lambda: engine.aligned_divergences([pair]))  # noqa: B023
        rows.append(
            {
                "route": route,
                "L": n,
                "ladder tokens/s": args.windows * windows[0].n_inputs / ladder_s,
                "ladder peak GiB": peak,
                "last pairs/s": args.pairs / last_s,
                "dense positions/s": len(pos) / dense_s,
                "start-up s": start_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--target-tokens", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4, help="ladder windows per length (one batch)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model, short lengths (CPU smoke run)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("ROUTE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny and args.lengths == parser.get_default("lengths"):
        args.lengths, args.gpu_memory_utilization = [512, 1024], 0.2
    if args.child:
        rows = run_route(args.child[0], args.child[1], args)
        print("ROUTE-ROWS " + json.dumps(rows), flush=True)
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="longshort-bench-") as folder:
        build_checkpoint(Path(folder), args.tiny)
        for route in args.routes:
            cmd = [
                sys.executable,
                __file__,
                "--lengths",
                *map(str, args.lengths),
                "--target-tokens",
                str(args.target_tokens),
                "--windows",
                str(args.windows),
                "--pairs",
                str(args.pairs),
                "--gpu-memory-utilization",
                str(args.gpu_memory_utilization),
                "--child",
                route,
                folder,
            ]
            cmd += ["--tiny"] if args.tiny else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("ROUTE-ROWS ")]
            if proc.returncode != 0 or not found:
                print(f"{route} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows.extend(json.loads(found[-1].removeprefix("ROUTE-ROWS ")))
    keys = ["ladder tokens/s", "ladder peak GiB", "last pairs/s", "dense positions/s", "start-up s"]
    print(f"\n{'route':<15}{'L':>7}" + "".join(f"{k:>19}" for k in keys))
    for row in rows:
        print(f"{row['route']:<15}{row['L']:>7}" + "".join(f"{row[k]:>19.2f}" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":  # vLLM may start processes: keep module import side-effect free
    main()
