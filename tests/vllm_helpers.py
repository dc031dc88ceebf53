"""Helpers of the vLLM test modules: an in-process engine through lm-eval, logged responses."""

from __future__ import annotations

import contextlib
import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from offline import offline_env

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def in_process_vllm(**args):
    """lm-eval's VLLM around a real in-process vLLM engine.

    vLLM's CPU worker swaps ``torch.set_num_threads`` for a no-op while it runs (its threads
    are bound); it is put back, with the thread count, after the engine shuts down.
    """
    from lm_eval.models.vllm_causallms import VLLM

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        lm = VLLM(**args)
        try:
            yield lm
        finally:
            lm.model.llm_engine.engine_core.shutdown()
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)


# The two vLLM routes' engine arguments (lm-eval's --model_args keys).
ROUTES = {
    "hidden": {"runner": "pooling", "convert": "embed", "pooler_config": {"task": "token_embed"}},
    "logprobs": {"max_logprobs": -1},
}


def tiny_engine_args(model_dir, route: str) -> dict:
    """A fast CPU engine: float32, ``max_model_len=512``, a 64 MiB KV cache, no graph capture."""
    return dict(
        pretrained=str(model_dir),
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=64 * 1024**2,
        enforce_eager=True,
        **ROUTES[route],
    )


def save_tiny_llama(tokenizer_dir, folder: Path) -> Path:
    """A 2-layer Llama with random weights (seed 0) and SmolLM2's tokenizer in ``folder``: engines
    start and score in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logged_response(sample: dict) -> dict:
    """A logged sample's scoring response (logged as the dict or as its JSON text)."""
    response = sample["resps"][0][0]
    return json.loads(response) if isinstance(response, str) else response


def responses_by_doc(samples: list[dict]) -> list[dict]:
    """The logged responses of ``samples`` in document order."""
    return [logged_response(s) for s in sorted(samples, key=lambda s: s["doc_id"])]


def lm_eval_cli_vllm(model_args: str, tasks: str, metadata: dict, out: Path) -> dict:
    """``results`` of ``lm_eval --model vllm`` run as users run it (one document, offline).

    vLLM's engine core runs in its own process (its default), unlike the in-process fixtures.
    """
    env = offline_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "vllm",
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--limit",
        "1",
        "--metadata",
        json.dumps(metadata),
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())["results"]
