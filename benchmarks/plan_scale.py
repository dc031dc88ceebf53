"""Plan a leaderboard sweep on paper from measured per-call GPU times (benchmarks/gpu/h200_hf_engine.json).

The JSON holds ``bench_hf_engine_gpu.py``'s measured seconds per call on one H200 for a 1.24B Llama
(bf16) at 4k-128k: a ladder window (L tokens, 256 scored), a truncate pass (every token scored) and
a ``last`` misalignment unit (1 long prompt of L tokens + 4 short ones of L/2 .. 7L/8). This script
turns them into the bill of a study (N checkpoints x D documents x lengths) on G GPUs:

- seconds at an unmeasured length: log-log interpolation between the two measured neighbours;
- another model size: the same FLOP rate as measured (its ``flops_per_forward`` over the 1B's at the
  same length; bigger models usually reach a higher MFU, so this errs long);
- per run: ppl (one truncate pass over the longest length per document) + ``last`` misalignment
  (one unit per document and length) + the model load (an assumption, printed, not measured);
- the sweep: runs (x ``shards`` pieces each, of D/shards documents) claimed by G workers with one
  GPU each; wall = ceil(pieces / G) rounds of one piece.

Usage:  python3 benchmarks/plan_scale.py [--checkpoints 100] [--documents 32] [--gpus 8 64]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

MEASURED = Path(__file__).resolve().parent / "gpu" / "h200_hf_engine.json"
LENGTHS = [8192, 16384, 32768, 65536, 131072]
# (layers, hidden, decoder params without embedding and head, vocab, load seconds assumed)
MODELS = {
    "1.2B (Llama-3.2-1B shapes)": (16, 2048, 0.973e9, 128256, 10.0),
    "8B (Llama-3.1-8B shapes)": (32, 4096, 6.98e9, 128256, 30.0),
}
BASE = MODELS["1.2B (Llama-3.2-1B shapes)"]


def flops(model, tokens: int, scored: int) -> float:
    """bench_hf_engine_gpu.flops_per_forward: 2*params*T + causal attention + LM head on scored rows."""
    layers, hidden, body, vocab, _ = model
    return 2 * body * tokens + 2 * 2 * layers * hidden * tokens * (tokens / 2) + 2 * vocab * hidden * scored


def unit_flops(model, case: str, n: int) -> float:
    if case == "ladder W=256":
        return flops(model, n, 256)
    if case == "truncate all":
        return flops(model, n, n - 1)
    shorts = [n // 2 + k * (n // 8) for k in range(4)]  # the benchmark's 1 long + 4 short prompts
    return flops(model, n, 1) + sum(flops(model, s, 1) for s in shorts)


def measured_seconds(rows: list[dict], case: str, n: int) -> float:
    points = sorted((r["tokens"], r["seconds"]) for r in rows if r["case"] == case)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= n <= x1:
            t = (math.log(n) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    raise SystemExit(f"length {n} is outside the measured {points[0][0]}..{points[-1][0]}")


def seconds(rows, model, case: str, n: int) -> float:
    return measured_seconds(rows, case, n) * unit_flops(model, case, n) / unit_flops(BASE, case, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=100)
    parser.add_argument("--documents", type=int, default=32, help="documents of at least 128k tokens")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    rows = json.loads(MEASURED.read_text())["rows"]
    d = args.documents
    print(f"{args.checkpoints} checkpoints x {d} documents, lengths {LENGTHS}: ppl by one truncate pass to")
    print("128k per document, `last` misalignment with 4 pairs per document and length; one GPU per worker.\n")
    for name, model in MODELS.items():
        ppl = d * seconds(rows, model, "truncate all", LENGTHS[-1])
        mis = d * sum(seconds(rows, model, "misalign last (1 long + 4 short)", n) for n in LENGTHS)
        load = model[4]
        tokens = d * (LENGTHS[-1] + sum(n + sum(n // 2 + k * (n // 8) for k in range(4)) for n in LENGTHS))
        print(f"## {name}: per checkpoint {tokens / 1e6:.1f} M input tokens, {ppl:.0f} s ppl + {mis:.0f} s")
        print(f"   misalignment + {load:.0f} s model load (assumed) = {(ppl + mis + load) / 60:.1f} GPU-minutes")
        print("| GPUs | shards | tokens (B) | GPU-hours busy | wall (h) | GPU-hours held | ppl / misalign / load |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for gpus in args.gpus:
            for shards in args.shards:
                if shards > d:
                    continue
                pieces = args.checkpoints * shards
                piece = (ppl + mis) / shards + load  # every piece loads its model
                busy = pieces * piece
                wall = math.ceil(pieces / gpus) * piece
                share = [args.checkpoints * x / busy for x in (ppl, mis, shards * load)]
                print(
                    f"| {gpus} | {shards} | {args.checkpoints * tokens / 1e9:.1f} | {busy / 3600:.1f} | "
                    f"{wall / 3600:.2f} | {gpus * wall / 3600:.1f} | " + " / ".join(f"{s:.0%}" for s in share) + " |"
                )
        print()


if __name__ == "__main__":
    main()
