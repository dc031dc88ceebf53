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


def logged_response(sample: dict) -> dict:
    """A logged sample's scoring response (logged as the dict or as its JSON text)."""
    response = sample["resps"][0][0]
    return json.loads(response) if isinstance(response, str) else response


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
