"""``--model vllm`` with ``data_parallel_size=2``: two vLLM CPU engines in Ray actors, equal to one.

Per route (hidden states, prompt log-probabilities), one engine in this process scores a
perplexity and a dense misalignment task (2 documents, lengths 128/256) and is shut down; then
lm-eval's ``VLLM`` with ``data_parallel_size=2`` scores the same tasks on two actor engines that
live for the whole route. Every aggregate and every per-document response must be EQUAL to the
single engine's (``batch_tokens: 1``: every document is its own chunk, so each actor gets one,
and vLLM scores one sequence per call on both sides), each actor must have scored a document
of each task, and the engine fingerprint (resume key) must be the single engine's. Model: a
2-layer Llama with random weights (engines start in seconds); engines: float32,
``max_model_len=512``, a 64 MiB KV cache.
"""

from __future__ import annotations

import pytest
from harness_run import evaluate
from vllm_helpers import ROUTES, in_process_vllm, responses_by_doc, save_tiny_llama, tiny_engine_args

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vllm backend tests need vLLM (make test installs the CPU build)")
pytest.importorskip("ray", reason="data parallelism needs ray (make test installs it)")

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
CASES = [
    (PPL, {"protocol": "ladder", "lengths": [128, 256], "target_tokens": 32, "batch_tokens": 1}),
    (MIS, {"mode": "dense", "lengths": [128, 256], "topk": 32, "batch_tokens": 1}),
]


@pytest.fixture(scope="module", autouse=True)
def ray_once():
    """One Ray instance for the module (the first data-parallel engine starts it)."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(assets, tmp_path_factory):
    return save_tiny_llama(assets.model_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module", params=list(ROUTES))
def route(request, tiny_model):
    """(data-parallel VLLM, {task: (results, samples) of one in-process engine}) of one route.

    The single engine is shut down before the two actors start: at most two engines at a time.
    """
    from lm_eval.models.vllm_causallms import VLLM

    from lm_eval_longshort.harness.lm_method import engine_for
    from lm_eval_longshort.harness.resume import engine_identity

    args = tiny_engine_args(tiny_model, request.param)
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
    got_responses, want_responses = responses_by_doc(got_samples), responses_by_doc(want_samples)
    assert len(got_responses) == 2 and all(not r["skipped"] for r in got_responses)
    assert got_responses == want_responses
    # The same resume key and results fingerprint: a run resumes across data_parallel_size.
    assert engine_identity(engine) == want["identity"]


def test_more_engines_than_documents_is_refused_before_any_engine_starts(tiny_model):
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(**tiny_engine_args(tiny_model, "hidden"), data_parallel_size=3)
    with pytest.raises(ValueError) as info:
        evaluate(lm, PPL, {"lengths": [128]}, limit=2)
    message = str(info.value)
    assert "\n" not in message
    assert "data_parallel_size=3 is more than the 2 documents" in message, message
    assert "use data_parallel_size=2 or fewer" in message, message
    assert not hasattr(lm, "_longshort_engine")  # no engine was started
