"""The vllm backend's hidden-state route on the REAL vLLM CPU engine: exact, equal to hf.

A pooling engine (``runner=pooling, convert=embed, pooler_config={"task": "token_embed"}``)
returns final hidden states; the plugin applies the checkpoint's LM head. Checked on two
models: the embedded SmolLM2 (output layer tied to the input embeddings) and a small random
Llama with its own output layer. Every number must equal the hf backend's in float32: ppl
within 1e-4 relative, divergences within 1e-3 absolute + 1e-3 relative, ``approximate = 0``.
Engines run in this process, one at a time (module-scoped, one per model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from harness_run import evaluate, metric
from reference import weight_files_sha256
from vllm_helpers import ROUTES, in_process_vllm, lm_eval_cli_vllm, logged_response

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vllm backend tests need vLLM (make test installs the CPU build)")

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
MAX_MODEL_LEN = 1024

REL_EXACT_PPL = 1e-4
DIV_ABS = DIV_REL = 1e-3
ONE_BIN = 10 ** (1 / 20) - 1 + DIV_REL  # docs/metrics.md: a histogram bin spans a factor 10^(1/20)


def pooling_args(model_dir, **extra) -> dict:
    return dict(
        pretrained=str(model_dir),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        gpu_memory_utilization=0.25,
        enforce_eager=True,
        **ROUTES["hidden"],
        **extra,
    )


@pytest.fixture(scope="module")
def untied(smol, tmp_path_factory):
    """(folder, HFLM) of a small Llama with its own output layer (tie_word_embeddings=False), random weights."""
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = smol
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked next-token distributions: divergences far above the tolerances
        model.lm_head.weight.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("untied-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, HFLM(pretrained=model, tokenizer=tokenizer, max_length=MAX_MODEL_LEN, batch_size=1)


@pytest.fixture(scope="module", params=["tied", "untied"])
def hidden_route(request, assets):
    """(pooling VLLM, HFLM, documents to evaluate) of one model; one engine alive at a time.

    The embedded model costs ~100x the small one per token: its cases score one document.
    """
    if request.param == "tied":
        model_dir, hf, docs = assets.model_dir, request.getfixturevalue("hflm"), 1
    else:
        (model_dir, hf), docs = request.getfixturevalue("untied"), 2
    with in_process_vllm(**pooling_args(model_dir)) as lm:
        yield lm, hf, docs


@pytest.fixture(scope="module")
def play_ids(smol, plays) -> list[np.ndarray]:
    _, tokenizer = smol
    return [np.asarray(tokenizer(p["text"], add_special_tokens=False)["input_ids"]) for p in plays[:2]]


def test_hidden_route_engine_facts(hidden_route):
    """Pooling engine -> the hidden-state engine: exact, prompts up to max_model_len, the model's own head."""
    from lm_eval_longshort.backends.vllm import VLLMHiddenStateEngine
    from lm_eval_longshort.harness.lm_method import engine_for

    lm, hf, _ = hidden_route
    engine = engine_for(lm)
    assert type(engine) is VLLMHiddenStateEngine and engine.name == "vllm-hidden"
    assert engine.approximate_dense is False and engine.max_length == MAX_MODEL_LEN
    assert engine.llm.llm_engine.model_config.runner_type == "pooling"
    head, embed = hf.model.get_output_embeddings().weight, hf.model.get_input_embeddings().weight
    assert engine.head.weight.dtype == torch.float32 and torch.equal(engine.head.weight, head.float())
    assert torch.equal(head, embed) == bool(hf.model.config.tie_word_embeddings)
    assert engine.identity()["weights"] == "files:" + weight_files_sha256(engine.model_config.model)


def test_hidden_route_engine_matches_hf(hidden_route, play_ids):
    """Engine level: BOS shift, feed_last both ways, a prompt filling max_model_len, last rows, dense pairs."""
    from lm_eval_longshort.harness.lm_method import engine_for
    from lm_eval_longshort.protocols.requests import AlignedWindows, Prompt, TargetWindow

    lm, hf_lm, _ = hidden_route
    engine, hf = engine_for(lm), engine_for(hf_lm)
    engine.progress = hf.progress = False
    ids = play_ids[0]
    windows = [
        TargetWindow(ids[:200], score_from=1, bos=None, label="plain"),
        TargetWindow(ids[100:300], score_from=0, bos=0, label="bos, last token only a target"),
        TargetWindow(ids[50:250], score_from=20, bos=0, label="bos, fed whole", feed_last=True),
        TargetWindow(ids[: MAX_MODEL_LEN + 1], score_from=MAX_MODEL_LEN - 100, bos=None, label="max_model_len inputs"),
    ]
    assert windows[-1].n_inputs == engine.max_length == MAX_MODEL_LEN
    for w, a, b in zip(windows, engine.target_nll(windows), hf.target_nll(windows), strict=True):
        assert a.dtype == np.float64 and a.shape == b.shape == (len(w.tokens) - w.score_from,), w.label
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4, err_msg=w.label)
    prompts = [Prompt(ids[:n], None, f"n={n}") for n in (17, MAX_MODEL_LEN)] + [Prompt(ids[5:80], 0, "bos")]
    got, want = engine.last_logprobs(prompts), hf.last_logprobs(prompts)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, engine.vocab_size)
    assert (got - want).abs().max().item() < 2e-4
    t = np.arange(150, 256)
    pairs = [
        AlignedWindows(ids[:256], ids[70:326], t, t - 70, None, "pair", next_tokens=ids[t + 1]),
        AlignedWindows(ids[300:500], ids[350:550], np.arange(100, 200), np.arange(50, 150), 0, "bos pair"),
    ]
    for a, b in zip(engine.aligned_divergences(pairs), hf.aligned_divergences(pairs), strict=True):
        assert a.keys() == b.keys()  # no error bounds: nothing is approximated; dp where next tokens are given
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=DIV_REL, atol=DIV_ABS, err_msg=name)


HIDDEN_CASES = [
    (PPL, {"protocol": "ladder", "lengths": [32, 128], "target_tokens": 32}),
    (PPL, {"protocol": "truncate", "lengths": [32, 128]}),
    (PPL, {"protocol": "sliding", "lengths": [32, 64], "max_doc_tokens": 128}),
    (MIS, {"mode": "last", "lengths": [32, 128], "pairs": 2}),
    (MIS, {"mode": "dense", "lengths": [32, 96]}),
]


@pytest.mark.parametrize(
    ("task", "meta"), HIDDEN_CASES, ids=lambda x: x.get("protocol", x.get("mode")) if isinstance(x, dict) else ""
)
def test_hidden_route_every_metric_equals_hf(hidden_route, task, meta):
    """Through lm_eval.simple_evaluate: every aggregate and every per-document record equals hf's."""
    lm, hf, docs = hidden_route
    got, got_samples = evaluate(lm, task, meta, limit=docs)
    want, want_samples = evaluate(hf, task, meta, limit=docs)
    keys = [k.split(",")[0] for k in want if "@" in k and "_stderr" not in k and math.isfinite(want[k])]
    assert keys and {k.split(",")[0] for k in got if "@" in k} >= set(keys)
    for key in keys:
        if key.startswith(("ppl@", "bpb@", "keyppl")):
            assert metric(got, key) == pytest.approx(metric(want, key), rel=REL_EXACT_PPL), key
        elif key.startswith("symkl_p"):  # a percentile's value near a bin edge may land one bin over
            assert metric(got, key) == pytest.approx(metric(want, key), rel=ONE_BIN), key
        else:
            assert metric(got, key) == pytest.approx(metric(want, key), rel=DIV_REL, abs=DIV_ABS), key
    if task == MIS:
        assert metric(got, "approximate") == 0.0 == metric(want, "approximate")
        assert max(metric(want, f"symkl@{n}") for n in meta["lengths"]) > 20 * DIV_ABS  # the check can fail
    for a, b in zip(
        sorted(got_samples, key=lambda s: s["doc_id"]), sorted(want_samples, key=lambda s: s["doc_id"]), strict=True
    ):
        _records_match(logged_response(a), logged_response(b))


def _records_match(got: dict, want: dict) -> None:
    """Per-document records: the same layout, sums within the exactness tolerances."""
    assert got.keys() == want.keys()
    for part in ("records", "pairs", "groups", "key_tokens"):
        rows_got, rows_want = got.get(part, []), want.get(part, [])
        rows_got, rows_want = ([rows_got], [rows_want]) if isinstance(rows_want, dict) else (rows_got, rows_want)
        for ra, rb in zip(rows_got, rows_want, strict=True):
            assert ra.keys() == rb.keys(), part
            for key, value in rb.items():
                if key.endswith("_hist"):
                    _histograms_match(ra[key], value)
                elif not isinstance(value, float):
                    assert ra[key] == value, (part, key)
                elif key.startswith("top1"):  # argmax agreement: a near-tie may flip one position
                    assert abs(ra[key] - value) <= (1 if part == "groups" else 0), (part, key)
                else:
                    scale = rb.get("n_positions", 1) if part == "groups" else 1
                    assert ra[key] == pytest.approx(value, rel=DIV_REL, abs=DIV_ABS * scale), (part, key)


def test_hidden_route_missing_output_layer_is_refused(hidden_route, tmp_path):
    """A checkpoint without the tensor the head needs: a clear error when the engine is wrapped."""
    from safetensors.torch import load_file, save_file

    from lm_eval_longshort.backends.logits import OutputLayerNotFoundError
    from lm_eval_longshort.backends.vllm import VLLMEngine

    lm, hf, _ = hidden_route
    config = lm.model.llm_engine.model_config
    source = Path(config.model)
    tensors = load_file(source / "model.safetensors")
    missing = "model.embed_tokens.weight" if hf.model.config.tie_word_embeddings else "lm_head.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    original, config.model = config.model, str(tmp_path)  # what an engine on that checkpoint reports
    try:
        with pytest.raises(OutputLayerNotFoundError, match=rf"cannot find the model's .*{missing}"):
            VLLMEngine.from_lm_eval(lm)
    finally:
        config.model = original


def test_hidden_route_refuses_unapplied_logit_postprocessing(hidden_route):
    """A config that post-processes logits in a way the route does not apply is refused by name."""
    from lm_eval_longshort.backends.logits import UnsupportedLogitsError
    from lm_eval_longshort.backends.vllm import VLLMEngine

    lm, _, _ = hidden_route
    hf_config = lm.model.llm_engine.model_config.hf_config
    hf_config.lm_head_multiplier = 0.25  # FalconH1's multiplier, set on this Llama's config
    try:
        with pytest.raises(UnsupportedLogitsError, match=r"LlamaForCausalLM: its config sets lm_head_multiplier=0.25"):
            VLLMEngine.from_lm_eval(lm)
    finally:
        del hf_config.lm_head_multiplier


def test_pooling_engine_without_token_embed_says_what_to_add(hidden_route):
    """runner=pooling without pooler_config task token_embed: vLLM would refuse the first request;
    we say what to add before any scoring.

    vLLM fixes the engine's pooling task at start-up (``LLM.pooling_task``; without the
    pooler_config task it is ``embed``); set here to what such an engine holds.
    """
    from vllm import TokensPrompt
    from vllm.pooling_params import PoolingParams

    from lm_eval_longshort.backends.vllm import VLLMEngine

    lm, _, _ = hidden_route
    pooler = lm.model.llm_engine.model_config.pooler_config
    lm.model.pooling_task, pooler.task = "embed", None
    try:
        with pytest.raises(ValueError, match=r'PoolerConfig\(task="token_embed"\)'):  # vLLM's own check
            lm.model.encode(
                [TokensPrompt(prompt_token_ids=[5, 6, 7])],
                pooling_task="token_embed",
                pooling_params=PoolingParams(use_activation=False),
                use_tqdm=False,
            )
        expected = (
            r"pooling task 'embed'.*add \"runner\": \"pooling\", \"convert\": \"embed\", "
            r"\"pooler_config\": \{\"task\": \"token_embed\"\}"
        )
        with pytest.raises(ValueError, match=expected):
            VLLMEngine.from_lm_eval(lm)
    finally:
        lm.model.pooling_task, pooler.task = "token_embed", "token_embed"


def test_lm_eval_cli_hidden_route(assets, hflm, tmp_path):
    """`lm_eval --model vllm` with JSON model_args starting a pooling engine (vLLM's default separate
    engine-core process): perplexity and exact dense misalignment equal hf's."""
    meta = {"lengths": [64, 128], "target_tokens": 32, "mode": "dense"}
    model_args = json.dumps({**pooling_args(assets.model_dir), "max_model_len": 512})
    got = lm_eval_cli_vllm(model_args, f"{PPL},{MIS}", meta, tmp_path)
    want_ppl, _ = evaluate(hflm, PPL, meta, limit=1)
    want_mis, _ = evaluate(hflm, MIS, meta, limit=1)
    for n in meta["lengths"]:
        assert got[PPL][f"ppl@{n},none"] == pytest.approx(metric(want_ppl, f"ppl@{n}"), rel=REL_EXACT_PPL)
        for name in ("sce", "symkl", "js", "tv"):
            want = metric(want_mis, f"{name}@{n}")
            assert got[MIS][f"{name}@{n},none"] == pytest.approx(want, rel=DIV_REL, abs=DIV_ABS), (name, n)
    assert got[MIS]["approximate,none"] == 0.0


def _histograms_match(got: list, want: list) -> None:
    """Sparse [[bin, count], ...] histograms of nearly equal values: the same number of values, each
    in the same bin or a neighbour (a value within rounding of a bin edge may cross it)."""
    size = 1 + max(i for i, _ in got + want)
    a, b = np.zeros(size + 1, dtype=int), np.zeros(size + 1, dtype=int)
    for dense, sparse in ((a, got), (b, want)):
        for index, count in sparse:
            dense[index] += count
    cum_a, cum_b = np.cumsum(a), np.cumsum(b)
    assert cum_a[-1] == cum_b[-1]
    assert np.all(cum_a[:-1] <= cum_b[1:]) and np.all(cum_b[:-1] <= cum_a[1:]), (got, want)
