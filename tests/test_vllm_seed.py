"""A model argument that is also a task key must not silently become the task's value.

lm-eval copies --model_args into every task's metadata (``EvaluatorConfig``: ``metadata =
model_args | metadata``), and ``seed`` is both a vLLM engine argument and the misalignment seed.
Here lm-eval's own VLLM gets ``seed=0`` (a real in-process engine) and the task metadata carries
the same ``seed=0``, exactly the state ``lm_eval --model vllm --model_args ...,seed=0`` produces:
the call must be refused before any scoring and say how to set the task's seed. A seed set through
--metadata that differs from the engine's runs.
"""

from __future__ import annotations

import math

import lm_eval
import pytest
from harness_run import INSTALLED_TASKS
from lm_eval.tasks import TaskManager
from vllm_helpers import in_process_vllm

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM (make test installs the CPU build)")

MIS = "longshort_misalign_shakespeare"


def _evaluate(lm, metadata: dict) -> dict:
    tm = TaskManager(include_path=str(INSTALLED_TASKS), include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(model=lm, tasks=[MIS], limit=1, task_manager=tm, bootstrap_iters=0)


def test_engine_seed_reaching_the_task_is_refused(assets):
    args = dict(
        pretrained=str(assets.model_dir),
        dtype="float32",
        max_model_len=256,
        max_logprobs=-1,
        gpu_memory_utilization=0.2,
        enforce_eager=True,
        seed=0,
    )
    with in_process_vllm(**args) as lm:
        assert lm.model_args["seed"] == 0
        with pytest.raises(ValueError, match=r"seed=0 is also the vLLM engine's seed") as info:
            _evaluate(lm, {"lengths": [32], "pairs": 2, "seed": 0})
        assert "--metadata '{\"seed\": N}'" in str(info.value)
        # The task's own seed, different from the engine's, is used as given.
        out = _evaluate(lm, {"lengths": [32], "pairs": 2, "seed": 5})
        assert math.isfinite(out["results"][MIS]["symkl@32,none"])
        assert out["configs"][MIS]["longshort"]["settings"]["seed"] == 5
