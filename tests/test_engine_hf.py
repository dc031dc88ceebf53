"""The hf engine: batching does not change numbers; truncate detects length-dependent positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import plain_nll

from lm_eval_longshort.backends.base import Prompt, TargetWindow
from lm_eval_longshort.backends.hf import HFEngine
from lm_eval_longshort.protocols.runner import Document, evaluate_documents
from lm_eval_longshort.protocols.settings import parse_settings


@pytest.fixture(scope="module")
def ids(smol, plays):
    _, tok = smol
    return np.asarray(tok(plays[2]["text"], add_special_tokens=False)["input_ids"][:600])


def test_batched_equals_unbatched(smol, ids):
    model, tok = smol
    # Different lengths in one batch: rows are right-padded.
    windows = [TargetWindow(ids[: n], score_from=1, bos=None, label=f"w{n}") for n in (600, 333, 120, 333)]
    prompts = [Prompt(ids[-n:], None, f"p{n}") for n in (500, 257, 256, 31)]
    one = HFEngine(model, tok, 1024, max_batch_rows=1, progress=False)
    many = HFEngine(model, tok, 1024, max_batch_rows=8, progress=False)
    assert len(list(many._batches([len(w.tokens) for w in windows]))) == 1  # really one batch
    for a, b in zip(one.target_nll(windows), many.target_nll(windows), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one.last_logprobs(prompts).numpy(), many.last_logprobs(prompts).numpy(),
                               rtol=1e-4, atol=1e-4)
    # And both equal the plain forward.
    np.testing.assert_allclose(one.target_nll(windows[1:2])[0], plain_nll(model, ids[:333].tolist(), 1).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_batched_misalignment_equals_unbatched(smol, plays):
    model, tok = smol
    docs = [Document(i, p["title"], p["text"]) for i, p in enumerate(plays[:2])]
    settings = parse_settings("misalign", {"lengths": [48, 128], "pairs": 3})
    one = evaluate_documents(HFEngine(model, tok, 1024, max_batch_rows=1, progress=False), settings, docs, "t")
    engine = HFEngine(model, tok, 1024, max_batch_rows=16, progress=False)
    many = evaluate_documents(engine, settings, docs, "t")
    # A task's batch_tokens applies to its own scoring only; the shared engine keeps its budget.
    small = evaluate_documents(engine, parse_settings("misalign", {"lengths": [48, 128], "pairs": 3,
                                                                   "batch_tokens": 130}), docs, "t")
    assert engine.batch_tokens == 32768
    assert [p["symkl"] for d in small for p in d["pairs"]] == pytest.approx(
        [p["symkl"] for d in many for p in d["pairs"]], rel=1e-3, abs=1e-6)
    for doc_one, doc_many in zip(one, many, strict=True):
        for a, b in zip(doc_one["pairs"], doc_many["pairs"], strict=True):
            assert (a["long_len"], a["short_len"]) == (b["long_len"], b["short_len"])
            assert a["symkl"] == pytest.approx(b["symkl"], rel=1e-3, abs=1e-6)
            assert a["top1"] == b["top1"]


def tiny_llama(tok, rope: dict | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters=rope, initializer_range=0.5)  # large weights: position effects show
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
    auto = evaluate_documents(dynamic, settings, docs, "t")[0]["records"]
    for record in auto:  # auto mode ran one pass per length: equals a plain pass over ids[0:L]
        expected = float(plain_nll(dynamic_model, ids[: record["L"]], 1).sum())
        assert record["nll_sum"] == pytest.approx(expected, rel=1e-4)
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
