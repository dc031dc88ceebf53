"""Shared set-up for the CPU benchmarks: the embedded model through lm-eval's own HFLM."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # harness_run helpers


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
