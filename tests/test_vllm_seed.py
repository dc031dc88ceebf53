"""A model argument that is also a task key must not silently become the task's value.

lm-eval copies --model_args into every task's metadata, and ``seed`` is both a vLLM engine
argument and the misalignment seed. The real `lm_eval --model vllm` CLI with ``seed=0`` in
--model_args must refuse before scoring and say how to set the task's seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from offline import offline_env

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM (make test installs the CPU build)")

BIN = Path(sys.executable).parent


def test_engine_seed_in_model_args_is_refused_for_misalignment(assets, tmp_path):
    model_args = (
        f"pretrained={assets.model_dir},dtype=float32,max_model_len=256,max_logprobs=-1,"
        "gpu_memory_utilization=0.2,enforce_eager=True,seed=0"
    )
    env = offline_env()
    proc = subprocess.run(
        [
            str(BIN / "lm_eval"),
            "--model",
            "vllm",
            "--model_args",
            model_args,
            "--tasks",
            "longshort_misalign_shakespeare",
            "--limit",
            "1",
            "--metadata",
            json.dumps({"lengths": [32], "pairs": 2}),
            "--output_path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "seed=0 is also the vLLM engine's seed" in proc.stderr, proc.stderr[-3000:]
    assert "--metadata '{\"seed\": N}'" in proc.stderr
    assert not list(tmp_path.rglob("results_*.json"))
