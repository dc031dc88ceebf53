"""hf vs vLLM's two routes on this machine: the same tasks, documents and lengths (prints, asserts nothing).

Routes:
- ``hf``: lm-eval's HFLM (float32);
- ``vllm-logprobs``: lm-eval's VLLM, a generate-mode engine scored through prompt
  log-probabilities (``max_logprobs=-1``; dense misalignment is a top-K approximation);
- ``vllm-hidden``: lm-eval's VLLM started as a pooling engine (``runner=pooling,
  convert=embed, pooler_config={"task": "token_embed"}``): final hidden states, the plugin
  applies the LM head (exact).

Per route: ladder perplexity input tokens/s and peak memory, misalignment ``last`` pairs/s,
``dense`` compared positions/s, and the numbers themselves (ppl@L, symkl@L) to show the routes
agree. Each route runs in its own process (a fresh process gives a fair peak RSS; vLLM's CPU
worker pins torch threading for the rest of a process), the vLLM engine core in that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), every process with ``OMP_NUM_THREADS`` = the CPU count
(vLLM otherwise drops to one thread). Peak memory: the process's peak RSS while the ladder is
scored (``VmHWM`` after resetting it), and its RSS before (model, and vLLM's KV cache).

Usage: .venv/bin/python benchmarks/bench_hf_vs_vllm.py [--docs 2] [--lengths 512 1024 2048]
       [--pairs 2] [--routes hf vllm-logprobs vllm-hidden] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import timed

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
ROUTES = ("hf", "vllm-logprobs", "vllm-hidden")
POOLING = {"runner": "pooling", "convert": "embed", "pooler_config": {"task": "token_embed"}}


def rss_gib(field: str) -> float:
    """This process's VmRSS or VmHWM (peak) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def start_lm(route: str, args):
    """lm-eval's model object for ``route`` (what ``--model hf`` / ``--model vllm`` build)."""
    need = max(args.lengths) + args.target_tokens  # ladder's C + W - 1 inputs (+ vLLM's generated slot)
    if route == "hf":
        from _common import embedded_hflm

        return embedded_hflm(max_length=need)[0]
    from lm_eval.models.vllm_causallms import VLLM

    from lm_eval_longshort.assets import prepare

    extra = POOLING if route == "vllm-hidden" else {"max_logprobs": -1}
    return VLLM(
        pretrained=str(prepare(progress=False).model_dir),
        dtype="float32",
        max_model_len=max(need, 2048),
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        **extra,
    )


def _response(sample: dict) -> dict:
    response = sample["resps"][0][0]
    return json.loads(response) if isinstance(response, str) else response


def run_route(route: str, args) -> dict:
    """Start, warm up, then time ladder / last / dense on ``args.docs`` documents."""
    import torch
    from harness_run import evaluate

    begin = time.perf_counter()
    lm = start_lm(route, args)
    start_s = time.perf_counter() - begin
    evaluate(lm, PPL, {"lengths": [64], "target_tokens": 16}, limit=1)  # warm-up (task index, kernels)
    t: dict[str, float] = {}
    rss_before = rss_gib("VmRSS")
    reset_peak_rss()
    with timed(t, "ppl"):
        ppl, _ = evaluate(
            lm,
            PPL,
            {"protocol": "ladder", "lengths": args.lengths, "target_tokens": args.target_tokens},
            limit=args.docs,
        )
    peak = rss_gib("VmHWM")
    with timed(t, "last"):
        last, _ = evaluate(lm, MIS, {"mode": "last", "lengths": args.lengths, "pairs": args.pairs}, limit=args.docs)
    with timed(t, "dense"):
        dense, samples = evaluate(lm, MIS, {"mode": "dense", "lengths": args.lengths}, limit=args.docs)
    positions = sum(g["n_positions"] for s in samples for g in _response(s)["groups"])
    fed = args.docs * sum(n + args.target_tokens - 1 for n in args.lengths)  # ladder reads ids[C-L : C+W-1]
    pairs = args.docs * len(args.lengths) * args.pairs
    return {
        "ladder tokens/s": fed / t["ppl"],
        "ladder peak RSS GiB": peak,
        "RSS before GiB": rss_before,
        "last pairs/s": pairs / t["last"],
        "dense positions/s": positions / t["dense"],
        "dense approximate": dense["approximate,none"],
        "start-up s": start_s,
        "torch threads": torch.get_num_threads(),
        **{f"ppl@{n}": ppl[f"ppl@{n},none"] for n in args.lengths},
        **{f"symkl@{n} last": last[f"symkl@{n},none"] for n in args.lengths},
        **{f"symkl@{n} dense": dense[f"symkl@{n},none"] for n in args.lengths},
    }


def child(route: str, args) -> None:
    if route != "hf":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    row = run_route(route, args)
    print("ROUTE-RESULT " + json.dumps(row), flush=True)


def print_table(rows: dict[str, dict]) -> None:
    routes = list(rows)
    print(
        f"\n{'':<24}"
        + "".join(f"{r:>15}" for r in routes)
        + ("   hidden/logprobs   hidden/hf" if len(routes) == 3 else "")
    )
    for key in rows[routes[0]]:
        values = [rows[r][key] for r in routes]
        line = f"{key:<24}" + "".join(f"{v:>15.4f}" for v in values)
        if len(routes) == 3 and values[0] and values[1]:
            line += f"{values[2] / values[1]:>18.3f}{values[2] / values[0]:>12.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--target-tokens", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    rows = {}
    for route in args.routes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            route,
            "--docs",
            str(args.docs),
            "--lengths",
            *map(str, args.lengths),
            "--target-tokens",
            str(args.target_tokens),
            "--pairs",
            str(args.pairs),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROUTE-RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{route} failed:\n{proc.stderr[-3000:]}")
        rows[route] = json.loads(lines[-1].removeprefix("ROUTE-RESULT "))
        print(f"{route}: {json.dumps(rows[route])}", flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":  # vLLM may start processes: keep module import side-effect free
    main()
