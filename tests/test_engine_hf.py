"""The hf engine: batching (on by default, across documents) does not change numbers; the
full-model fallback and the split head stay bounded and exact; truncate detects length-dependent positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import plain_nll, plain_token_logprobs

from lm_eval_longshort.backends.hf import HFEngine
from lm_eval_longshort.numerics.divergences import METRIC_NAMES
from lm_eval_longshort.protocols.requests import Prompt, TargetWindow
from lm_eval_longshort.protocols.runner import Document, evaluate_documents
from lm_eval_longshort.protocols.settings import parse_settings


@pytest.fixture(scope="module")
def ids(smol, plays):
    _, tok = smol
    return np.asarray(tok(plays[2]["text"], add_special_tokens=False)["input_ids"][:600])


def test_batched_equals_unbatched(smol, ids):
    model, tok = smol
    # Different lengths in one batch: rows are right-padded.
    windows = [TargetWindow(ids[:n], score_from=1, bos=None, label=f"w{n}") for n in (600, 333, 120, 333)]
    prompts = [Prompt(ids[-n:], None, f"p{n}") for n in (500, 257, 256, 31)]
    one = HFEngine(model, tok, 1024, max_batch_rows=1, progress=False)
    many = HFEngine(model, tok, 1024, max_batch_rows=8, progress=False)
    many.min_fill = 0.0  # let 600, 333 and 120 tokens share a batch: padding must not change numbers
    assert len(list(many._batches([len(w.tokens) for w in windows]))) == 1  # really one batch
    for a, b in zip(one.target_nll(windows), many.target_nll(windows), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        one.last_logprobs(prompts).numpy(), many.last_logprobs(prompts).numpy(), rtol=1e-4, atol=1e-4
    )
    # And both equal the plain forward.
    np.testing.assert_allclose(
        one.target_nll(windows[1:2])[0], plain_nll(model, ids[:333].tolist(), 1).numpy(), rtol=1e-4, atol=1e-5
    )


def test_batched_misalignment_equals_unbatched(smol, plays):
    model, tok = smol
    docs = [Document(i, p["title"], p["text"]) for i, p in enumerate(plays[:2])]
    settings_meta = {"lengths": [48, 128], "pairs": 3}
    settings = parse_settings("misalign", settings_meta)
    one = evaluate_documents(HFEngine(model, tok, 1024, max_batch_rows=1, progress=False), settings, docs, "t")
    engine = HFEngine(model, tok, 1024, max_batch_rows=16, progress=False)
    calls = {}
    for name, meta in (("many", {}), ("small", {"batch_tokens": 130}), ("again", {})):
        counter = CallCounter(model.get_decoder())
        calls[name] = (
            counter,
            evaluate_documents(engine, parse_settings("misalign", {**settings_meta, **meta}), docs, "t"),
        )
        counter.remove()
    many, small = calls["many"][1], calls["small"][1]
    # A task's batch_tokens applies to its own scoring only (130 tokens: one or two prompts per
    # forward, so more forwards); the next task gets the engine's budget back.
    assert calls["small"][0].calls > calls["many"][0].calls == calls["again"][0].calls
    assert engine.batch_tokens == 32768
    assert [p["symkl"] for d in small for p in d["pairs"]] == pytest.approx(
        [p["symkl"] for d in many for p in d["pairs"]], rel=1e-3, abs=1e-6
    )
    for doc_one, doc_many in zip(one, many, strict=True):
        for a, b in zip(doc_one["pairs"], doc_many["pairs"], strict=True):
            assert (a["long_len"], a["short_len"]) == (b["long_len"], b["short_len"])
            assert a["symkl"] == pytest.approx(b["symkl"], rel=1e-3, abs=1e-6)
            assert a["top1"] == b["top1"]


def tiny_llama(tok, rope: dict | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters=rope,
        initializer_range=0.5,
    )  # large weights: position effects show
    return LlamaForCausalLM(config).eval()


def test_truncate_single_pass_is_detected_per_model(smol, plays):
    _, tok = smol
    docs = [Document(0, "p", plays[0]["text"])]
    settings = parse_settings("ppl", {"protocol": "truncate", "lengths": [48, 160]})
    static = HFEngine(tiny_llama(tok, {"rope_type": "default", "rope_theta": 10000.0}), tok, 512, progress=False)
    dynamic_model = tiny_llama(tok, {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0})
    dynamic = HFEngine(dynamic_model, tok, 512, progress=False)
    assert not static.position_dependent and dynamic.position_dependent

    ids = tok(plays[0]["text"], add_special_tokens=False)["input_ids"]
    auto_response = evaluate_documents(dynamic, settings, docs, "t")[0]
    auto = auto_response["records"]
    for record in auto:  # auto mode ran one pass per length: equals a plain pass over ids[0:L]
        expected = float(plain_nll(dynamic_model, ids[: record["L"]], 1).sum())
        assert record["nll_sum"] == pytest.approx(expected, rel=1e-4)
    # Loss against position comes from the pass over ids[0:C] (position t with context t), also
    # here: ppl_pos@160 sums positions 48..159 of that pass, not a difference of two passes.
    longest = plain_nll(dynamic_model, ids[:160], 1).numpy()  # ids[1:160]
    assert sum(auto_response["positions"]["nll_sum"]) == pytest.approx(float(longest.sum()), rel=1e-4)
    assert auto[1]["pos_nll_sum"] == pytest.approx(float(longest[47:].sum()), rel=1e-4)
    assert auto[1]["pos_n_targets"] == 112
    forced = parse_settings("ppl", {"protocol": "truncate", "lengths": [48, 160], "single_pass": True})
    one_pass = evaluate_documents(dynamic, forced, docs, "t")[0]["records"]
    # Past max_position_embeddings dynamic RoPE rescales: the 48-token prefix of a 160-token pass differs.
    print("dynamic single-pass vs per-length at L=48:", one_pass[0]["nll_sum"], auto[0]["nll_sum"])
    assert one_pass[0]["nll_sum"] != pytest.approx(auto[0]["nll_sum"], rel=1e-3)
    # A static-RoPE model gets every length from one pass, equal to per-length passes.
    static_auto = evaluate_documents(static, settings, docs, "t")[0]["records"]
    per_length = parse_settings("ppl", {"protocol": "truncate", "lengths": [48, 160], "single_pass": False})
    static_per_length = evaluate_documents(static, per_length, docs, "t")[0]["records"]
    for a, b in zip(static_auto, static_per_length, strict=True):
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)
    assert one_pass[1]["nll_sum"] == pytest.approx(auto[1]["nll_sum"], rel=1e-5)


class CallCounter:
    """Counts a module's forward calls and the most rows (leading positions) one call saw."""

    def __init__(self, module):
        self.calls, self.most_rows = 0, 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor):
            self.most_rows = max(self.most_rows, int(np.prod(hidden.shape[:-1])))

    def remove(self):
        self._handle.remove()


def test_lm_eval_default_batch_size_batches_by_token_budget(smol, ids):
    from lm_eval.models.huggingface import HFLM

    model, tok = smol
    windows = [TargetWindow(ids[i : i + 90], score_from=1, bos=None, label=f"w{i}") for i in range(0, 60, 10)]
    default = HFEngine.from_hflm(HFLM(pretrained=model, tokenizer=tok, max_length=1024), progress=False)
    capped = HFEngine.from_hflm(HFLM(pretrained=model, tokenizer=tok, max_length=1024, batch_size=4), progress=False)
    results = {}
    for name, engine in (("default", default), ("capped", capped)):
        decoder = CallCounter(model.get_decoder())
        results[name] = engine.target_nll(windows)
        decoder.remove()
        results[name + "_calls"] = decoder.calls
    assert results["default_calls"] == 1  # six equal-length windows, one forward
    assert results["capped_calls"] == 2  # --batch_size 4 still caps rows: 4 + 2
    for w, a, b in zip(windows, results["default"], results["capped"], strict=True):
        reference = plain_nll(model, w.tokens.tolist(), 1).numpy()
        np.testing.assert_allclose(a, reference, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, reference, rtol=1e-4, atol=1e-5)


def test_decoder_pass_keeps_no_kv_cache(smol, ids):
    """Nothing reads a KV cache of the split-head pass; keeping one cost 0.75 GiB on a 16k window."""
    model, tok = smol
    engine = HFEngine(model, tok, 1024, progress=False)
    caches = []
    handle = model.get_decoder().register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    try:
        nll = engine.target_nll([TargetWindow(ids[:200], 1, None, "w")])[0]
    finally:
        handle.remove()
    assert caches == [None]
    np.testing.assert_allclose(nll, plain_nll(model, ids[:200].tolist(), 1).numpy(), rtol=1e-4, atol=1e-5)


def dense_pairs_of(tok, plays, lengths):
    from lm_eval_longshort.protocols import misalignment as mis

    settings = parse_settings("misalign", {"mode": "dense", "lengths": lengths})
    pairs = []
    for index, play in enumerate(plays[:2]):
        doc_ids = np.asarray(tok(play["text"], add_special_tokens=False)["input_ids"][:400])
        pairs += mis.dense_pairs(doc_ids, settings, index, tok.bos_token_id, f"doc{index}")[0]
    return pairs


def test_dense_pairs_batched_across_documents(smol, plays):
    from test_divergences import numpy_divergences

    model, tok = smol
    pairs = dense_pairs_of(tok, plays, [40, 72])  # 2 documents x 2 lengths
    batched = HFEngine(model, tok, 1024, progress=False)
    alone = HFEngine(model, tok, 1024, batch_tokens=1, progress=False)  # one pair per forward
    decoder = CallCounter(model.get_decoder())
    together = batched.aligned_divergences(pairs)
    assert decoder.calls == 2  # one forward per length (40 < 0.8 x 72), both documents in it
    decoder.calls = 0
    separate = alone.aligned_divergences(pairs)
    decoder.remove()
    assert decoder.calls == len(pairs)
    for pair, a, b in zip(pairs, together, separate, strict=True):
        assert len(a["symkl"]) == len(pair.long_positions) > 0
        for name in METRIC_NAMES:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-6, err_msg=name)
    # One pair against plain forwards and the textbook formulas (input i + 1: the BOS).
    pair, values = pairs[1], together[1]
    long_rows = plain_token_logprobs(model, [pair.bos, *pair.long_tokens.tolist()])
    short_rows = plain_token_logprobs(model, [pair.bos, *pair.short_tokens.tolist()])
    for k in (0, len(pair.long_positions) - 1):
        want = numpy_divergences(
            long_rows[pair.long_positions[k] + 1].numpy(), short_rows[pair.short_positions[k] + 1].numpy()
        )
        for name in METRIC_NAMES:
            assert values[name][k] == pytest.approx(want[name], rel=1e-3, abs=1e-5), name


def test_full_model_fallback_is_chunked_and_exact(smol, ids):
    # A model whose logits cannot be split off runs whole-model steps over a KV cache, with
    # logits only at the needed positions: forced here on the embedded model.
    model, tok = smol
    split = HFEngine(model, tok, 1024, chunk_positions=32, progress=False)
    fallback = HFEngine(model, tok, 1024, chunk_positions=32, split_head=False, progress=False)
    assert split._split and not fallback._split
    windows = [
        TargetWindow(ids[:150], score_from=1, bos=None, label="a"),
        TargetWindow(ids[200:300], score_from=60, bos=1, label="b"),
    ]
    prompts = [Prompt(ids[:77], None, "p"), Prompt(ids[10:50], 1, "q")]
    head = CallCounter(model.get_output_embeddings())
    got = fallback.target_nll(windows)
    last = fallback.last_logprobs(prompts)
    assert head.most_rows <= 32  # never more than chunk_positions rows of logits at once
    head.remove()
    np.testing.assert_allclose(got[0], plain_nll(model, ids[:150].tolist(), 1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], plain_nll(model, [1, *ids[200:300].tolist()], 61).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        last[0].numpy(), plain_token_logprobs(model, ids[:77].tolist())[-1].numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        last[1].numpy(), plain_token_logprobs(model, [1, *ids[10:50].tolist()])[-1].numpy(), rtol=1e-4, atol=1e-4
    )
    pairs = dense_pairs_of(tok, plays=[{"text": tok.decode(ids)}] * 2, lengths=[96])[:1]
    for name, a in fallback.aligned_divergences(pairs)[0].items():
        np.testing.assert_allclose(a, split.aligned_divergences(pairs)[0][name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_split_head_bounds_logit_rows_and_applies_softcapping(smol, plays):
    # Gemma 2 soft-caps its logits after the head: the engine applies the cap itself and
    # keeps the split (bounded) path; the numbers equal the model's own forward.
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _, tok = smol
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        final_logit_softcapping=2.0,
        initializer_range=0.5,
    )
    model = Gemma2ForCausalLM(config).eval()
    engine = HFEngine(model, tok, 512, chunk_positions=24, progress=False)
    assert engine._split
    window = np.asarray(tok(plays[0]["text"], add_special_tokens=False)["input_ids"][:130])
    head = CallCounter(model.get_output_embeddings())
    nll = engine.target_nll([TargetWindow(window, score_from=1, bos=None, label="g", feed_last=True)])[0]
    assert head.most_rows <= 24
    head.remove()
    np.testing.assert_allclose(nll, plain_nll(model, window.tolist(), 1).numpy(), rtol=1e-4, atol=1e-5)
