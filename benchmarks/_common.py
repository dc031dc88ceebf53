"""Shared set-up for the benchmarks: the embedded model through lm-eval's own HFLM (CPU), and the
random-weight Llama-3.2-1B shapes, tokenizer stand-in and timer of the GPU scripts in gpu/ (which
import this as ``benchmarks._common`` with PYTHONPATH=.; nothing here imports lm-eval at import).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # harness_run helpers
from offline import OFFLINE  # noqa: E402  (the test suite's offline variables)

for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)


def embedded_hflm(max_length: int = 16384):
    """(HFLM, model, tokenizer) for the prepared SmolLM2, float32."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_longshort.assets import prepare

    assets = prepare(progress=False)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1), model, tokenizer


def corpus(n: int) -> list[dict]:
    import json

    from lm_eval_longshort.assets import prepare

    with open(prepare(progress=False).corpus_file, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][:n]


@contextmanager
def timed(store: dict, key: str):
    """Wall seconds in ``store[key]`` and process CPU seconds in ``store[key + "_cpu"]`` (less
    sensitive than wall time to other jobs on a shared machine); repeated keys keep the minimum."""
    start, cpu = time.perf_counter(), time.process_time()
    yield
    for name, value in ((key, time.perf_counter() - start), (key + "_cpu", time.process_time() - cpu)):
        store[name] = min(value, store.get(name, value))


# --------------------------------------------------------------------------- GPU scripts (benchmarks/gpu)


class NoTokenizer:
    """The engine-level calls of the GPU scripts never tokenize."""

    bos_token_id = None


def llama_1b_config():
    """A LlamaConfig of Llama-3.2-1B's shapes (tied embeddings), for random-weight models."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
    )


def seconds_and_peak(fn, repeats: int = 1, cuda: bool | None = None) -> tuple[float, float]:
    """(seconds per call over ``repeats`` calls after one warm-up call, peak GiB allocated on the GPU
    during them; NaN without CUDA). ``cuda`` defaults to whether CUDA is available."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    fn()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
