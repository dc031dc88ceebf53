"""``--model vllm`` with ``data_parallel_size=2``: two vLLM CPU engines in Ray actors, equal to one.

Per route (hidden states, prompt log-probabilities), one engine in this process scores a
perplexity and a dense misalignment task (2 documents, lengths 128/256) and is shut down; then
lm-eval's ``VLLM`` with ``data_parallel_size=2`` scores the same tasks on two actor engines that
live for the whole route. Every aggregate and every per-document response must be EQUAL to the
single engine's (``batch_tokens: 1``: every document is its own chunk, so each actor gets one,
and vLLM scores one sequence per call on both sides), each actor must have scored a document
of each task, and the engine fingerprint (resume key) must be the single engine's. The actors run
on a local Ray cluster started with docs/scaling.md's recipe (``ray start --head``, then
``RAY_ADDRESS``). Model: a
2-layer Llama with random weights (engines start in seconds); engines: float32,
``max_model_len=512``, a 64 MiB KV cache.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness_run import evaluate
from offline import offline_env
from vllm_helpers import in_process_vllm, logged_response

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vllm backend tests need vLLM (make test installs the CPU build)")
pytest.importorskip("ray", reason="data parallelism needs ray (make test installs it)")

ROOT = Path(__file__).resolve().parents[1]
PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
ROUTES = {
    "hidden": {"runner": "pooling", "convert": "embed", "pooler_config": {"task": "token_embed"}},
    "logprobs": {"max_logprobs": -1},
}
CASES = [
    (PPL, {"protocol": "ladder", "lengths": [128, 256], "target_tokens": 32, "batch_tokens": 1}),
    (MIS, {"mode": "dense", "lengths": [128, 256], "topk": 32, "batch_tokens": 1}),
]


def engine_args(model_dir, route: str) -> dict:
    return dict(
        pretrained=str(model_dir),
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=64 * 1024**2,
        enforce_eager=True,
        **ROUTES[route],
    )


def ray_recipe() -> tuple[str, dict[str, str]]:
    """docs/scaling.md's Ray cluster recipe: its head command (``ray start --head ...``) and the
    variables its ``lm_eval`` command sets (``NAME=value`` before ``lm_eval``)."""
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    section = text.split("## vLLM data parallelism on a Ray cluster\n", 1)[1].split("\n## ", 1)[0]
    lines = re.search(r"^```sh\n(.*?)^```", section, flags=re.S | re.M).group(1).splitlines()
    driver = next(line for line in lines if " lm_eval " in line).split(" lm_eval ")[0]
    return lines[0].split("#")[0].strip(), dict(word.split("=", 1) for word in driver.split())


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """docs/scaling.md's Ray recipe as a local stand-in: its head command (on a free port, with
    two CPUs and a small object store for this machine), and the variables the page's ``lm_eval``
    command sets (``RAY_ADDRESS``: the address the head printed), through which every data-parallel
    engine of the module connects."""
    import ray

    head, variables = ray_recipe()
    assert head == "ray start --head --port=6379" and variables["RAY_ADDRESS"] == "HEAD_NODE:6379", (head, variables)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = (
        head.replace("6379", str(port)) + " --num-cpus=2 --object-store-memory=200000000 --include-dashboard=false"
    )
    # Without token authentication (Ray 2.60's default for `ray start`): Ray reads RAY_AUTH_MODE when
    # it is imported, and this process may have imported it already (vLLM does); the page's
    # RAY_AUTH_MODE=token for a real cluster was checked by hand with a fresh driver.
    env = offline_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    variables.pop("RAY_AUTH_MODE", None)
    started = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    # What `ray start --head` tells the user to pass to the other nodes: the head's address.
    address = re.search(r"--address='([^']+)'", started.stdout + started.stderr).group(1)
    os.environ.update({name: value.replace("HEAD_NODE:6379", address) for name, value in variables.items()})
    # Ray gives each CPU actor one OpenMP thread; the single engine here must sum in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield address
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
        for name in variables:
            os.environ.pop(name, None)
        subprocess.run(["bash", "-c", "ray stop --force"], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(assets, tmp_path_factory):
    """A folder with a 2-layer Llama (random weights, SmolLM2's tokenizer): engines start and score fast."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
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
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(ROUTES))
def route(request, tiny_model):
    """(data-parallel VLLM, {task: (results, samples) of one in-process engine}) of one route.

    The single engine is shut down before the two actors start: at most two engines at a time.
    """
    from lm_eval.models.vllm_causallms import VLLM

    from lm_eval_longshort.harness.lm_method import engine_for
    from lm_eval_longshort.harness.resume import engine_identity

    args = engine_args(tiny_model, request.param)
    with in_process_vllm(**args) as one:
        want = {task: evaluate(one, task, meta) for task, meta in CASES}
        want["identity"] = engine_identity(engine_for(one))
    lm = VLLM(**args, data_parallel_size=2)
    yield lm, want
    engine = getattr(lm, "_longshort_engine", None)
    if engine is not None:
        engine.shutdown()


@pytest.mark.parametrize(("task", "meta"), CASES, ids=["ppl-ladder", "misalign-dense"])
def test_two_engines_equal_one(route, task, meta):
    from lm_eval_longshort.harness.lm_method import engine_for
    from lm_eval_longshort.harness.resume import engine_identity

    lm, want = route
    before = engine_for(lm).chunks_per_replica() if hasattr(lm, "_longshort_engine") else [0, 0]
    got, got_samples = evaluate(lm, task, meta)
    engine = engine_for(lm)
    assert type(engine).__name__ == "VLLMDataParallel" and len(engine.actors) == 2
    # Both actors scored one of the two documents (each its own chunk).
    assert [a - b for a, b in zip(engine.chunks_per_replica(), before)] == [1, 1]
    want_results, want_samples = want[task]
    assert got == want_results
    responses = lambda samples: [logged_response(s) for s in sorted(samples, key=lambda s: s["doc_id"])]  # noqa: E731
    got_responses, want_responses = responses(got_samples), responses(want_samples)
    assert len(got_responses) == 2 and all(not r["skipped"] for r in got_responses)
    assert got_responses == want_responses
    # The same resume key and results fingerprint: a run resumes across data_parallel_size.
    assert engine_identity(engine) == want["identity"]


def test_more_engines_than_documents_is_refused_before_any_engine_starts(tiny_model):
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(**engine_args(tiny_model, "hidden"), data_parallel_size=3)
    with pytest.raises(ValueError) as info:
        evaluate(lm, PPL, {"lengths": [128]}, limit=2)
    message = str(info.value)
    assert "\n" not in message
    assert "data_parallel_size=3 is more than the 2 documents" in message, message
    assert "use data_parallel_size=2 or fewer" in message, message
    assert not hasattr(lm, "_longshort_engine")  # no engine was started
