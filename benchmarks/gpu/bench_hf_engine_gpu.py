"""The hf engine on a GPU: tokens/s, MFU and peak memory at 4k, 16k and 32k context.

Builds a ~1.2B-parameter Llama (Llama-3.2-1B shapes) from a config with random bf16 weights
(speed does not depend on weight values; nothing to download) and scores windows with
``lm_eval_longshort.backends.hf.HFEngine`` (no lm-eval needed: the lent GPU machine has
torch + transformers only). Prints a table; asserts nothing. Also runs a plain
``model(input_ids)`` forward with full logits at each length for a memory comparison.

Usage (repo root):  PYTHONPATH=. python3 benchmarks/gpu/bench_hf_engine_gpu.py [--lengths 4096 16384 32768]
                    PYTHONPATH=. python3 benchmarks/gpu/bench_hf_engine_gpu.py --tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks._common import NoTokenizer, llama_1b_config, seconds_and_peak
from lm_eval_longshort.backends.hf import HFEngine
from lm_eval_longshort.protocols.requests import Prompt, TargetWindow

H200_BF16_PEAK = 989e12  # dense bf16 tensor-core peak (spec sheet); a measured 8k matmul reaches ~790e12


def build_model(tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=65536,
        )
    else:
        config = llama_1b_config()
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, config


def flops_per_forward(config, n_params_body: int, tokens: int, scored: int) -> float:
    """2·params per token (matmuls) + causal attention (QK^T and AV over T/2 keys on average)
    + LM head at scored rows."""
    matmuls = 2 * n_params_body * tokens
    attention = 2 * 2 * config.num_hidden_layers * config.hidden_size * tokens * (tokens / 2)
    head = 2 * config.vocab_size * config.hidden_size * scored
    return matmuls + attention + head


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cuda = device == "cuda"  # synchronize and read peak memory around timed calls
    lengths = [min(n, 512) for n in args.lengths] if args.tiny else args.lengths
    model, config = build_model(args.tiny, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_body = n_params - config.vocab_size * config.hidden_size  # tied embedding/head counted once, as the head
    print(
        f"model: {n_params / 1e9:.3f}B params, device {device}, "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}"
    )
    engine = HFEngine(model, NoTokenizer(), max(lengths) + 1, batch_tokens=max(lengths), progress=False)
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        ids = rng.integers(0, config.vocab_size, size=n, dtype=np.int64)
        cases = {
            # ladder-like: one window, the last 256 tokens scored
            "ladder W=256": ([TargetWindow(ids, n - 256, None, "ladder")], 256),
            # truncate-like: every token scored (the worst case for the LM head)
            "truncate all": ([TargetWindow(ids, 1, None, "truncate", feed_last=True)], n - 1),
        }
        for name, (windows, scored) in cases.items():
            seconds, peak = seconds_and_peak(lambda w=windows: engine.target_nll(w), args.repeats, cuda=cuda)
            flops = flops_per_forward(config, n_body, n, scored)
            rows.append(
                {
                    "case": name,
                    "tokens": n,
                    "seconds": seconds,
                    "tokens_per_s": n / seconds,
                    "tflops": flops / seconds / 1e12,
                    "mfu": flops / seconds / H200_BF16_PEAK,
                    "peak_gib": peak,
                }
            )
        prompts = [Prompt(ids, None, "long")] + [
            Prompt(ids[-(n // 2 + k * (n // 8)) :], None, "short") for k in range(4)
        ]
        seconds, peak = seconds_and_peak(lambda p=prompts: engine.last_logprobs(p), args.repeats, cuda=cuda)
        tokens = sum(len(p.tokens) for p in prompts)
        flops = sum(flops_per_forward(config, n_body, len(p.tokens), 1) for p in prompts)
        rows.append(
            {
                "case": "misalign last (1 long + 4 short)",
                "tokens": n,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "tflops": flops / seconds / 1e12,
                "mfu": flops / seconds / H200_BF16_PEAK,
                "peak_gib": peak,
                "pairs_per_s": 4 / seconds,
            }
        )
        # Naive reference: one plain forward returning [T, V] logits (what a bare script would do).
        x = torch.as_tensor(ids[None], device=device)
        try:
            with torch.inference_mode():
                seconds, peak = seconds_and_peak(
                    lambda x=x: model(input_ids=x).logits.float().log_softmax(-1), 1, cuda=cuda
                )
            rows.append(
                {
                    "case": "plain forward, full fp32 log-softmax",
                    "tokens": n,
                    "seconds": seconds,
                    "tokens_per_s": n / seconds,
                    "tflops": float("nan"),
                    "mfu": float("nan"),
                    "peak_gib": peak,
                }
            )
        except torch.OutOfMemoryError:
            rows.append(
                {
                    "case": "plain forward, full fp32 log-softmax",
                    "tokens": n,
                    "seconds": float("nan"),
                    "tokens_per_s": float("nan"),
                    "tflops": float("nan"),
                    "mfu": float("nan"),
                    "peak_gib": float("inf"),
                }
            )
            torch.cuda.empty_cache()
    print(f"{'case':38} {'ctx':>6} {'s/call':>8} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['case']:38} {r['tokens']:>6} {r['seconds']:>8.3f} {r['tokens_per_s']:>10.0f} "
            f"{r['tflops']:>8.1f} {r['mfu']:>6.1%} {r['peak_gib']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "params": n_params, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
