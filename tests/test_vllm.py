"""The vllm backend's prompt log-probability route on the REAL vLLM CPU engine, against hf.

One engine for the module, built through lm-eval's own ``VLLM`` class (what ``--model vllm``
builds), float32 (the CPU build accepts it), ``max_model_len=2048``, ``max_logprobs=-1``.
The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it starts in
~15 s instead of ~35 s and needs no spawned processes. In-process, vLLM's CPU worker replaces
``torch.set_num_threads`` with a no-op; the fixture puts it back afterwards.

Tolerances: perplexity within 1% of hf float32 (measured: ~1e-6 relative), ``last`` symkl
within 5% + 1e-3, dense top-K values are lower bounds of the exact hf values and the exact
tv/js lie within approximation + error bound. The hidden-state route (a pooling engine):
test_vllm_hidden.py, a separate module so that this module's engine is shut down first
(an in-process vLLM engine reserves its KV cache from the process's memory).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness_run import evaluate, evaluate_tasks, metric
from reference import weight_files_sha256
from vllm_helpers import in_process_vllm, lm_eval_cli_vllm, logged_response

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vllm backend tests need vLLM (make test installs the CPU build)")

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
MAX_MODEL_LEN = 2048
REL_PPL = 0.01
ROOT = Path(__file__).resolve().parents[1]


def engine_args(model_dir) -> dict:
    return dict(
        pretrained=str(model_dir),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_logprobs=-1,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    )


@pytest.fixture(scope="module")
def vllm_lm(assets):
    # seed=0: an engine seed unlike the misalignment default (it does not affect scoring), for the
    # test that the task refuses it when lm-eval copies it into the task metadata.
    with in_process_vllm(**engine_args(assets.model_dir), seed=0) as lm:
        yield lm


@pytest.fixture(scope="module")
def engines(vllm_lm, hflm):
    """(vllm engine, hf engine), both without progress bars."""
    from lm_eval_longshort.harness.lm_method import engine_for

    vllm_engine, hf_engine = engine_for(vllm_lm), engine_for(hflm)
    vllm_engine.progress = hf_engine.progress = False
    return vllm_engine, hf_engine


@pytest.fixture(scope="module")
def doc_ids(vllm_lm, plays) -> list[np.ndarray]:
    return [np.asarray(vllm_lm.tokenizer(p["text"], add_special_tokens=False)["input_ids"]) for p in plays[:2]]


def test_engine_facts(vllm_lm, engines):
    """What the engine reports: float32, max_length = max_model_len - 1, static RoPE, dense approximated."""
    engine, _ = engines
    assert type(engine).__name__ == "VLLMEngine" and engine.name == "vllm"
    assert engine.model_config.dtype == torch.float32
    assert engine.max_model_len == MAX_MODEL_LEN and engine.max_length == MAX_MODEL_LEN - 1
    assert engine.vocab_size == 49152 and engine.model_config.logprobs_mode == "raw_logprobs"
    assert engine.position_dependent is False and engine.approximate_dense is True
    assert engine.tokenizer is vllm_lm.tokenizer
    # The resume key covers every byte of the weight files the engine loaded.
    assert engine.identity()["weights"] == "files:" + weight_files_sha256(engine.model_config.model)


# --------------------------------------------------------------------------- engine level


def test_target_nll_matches_hf_with_bos_and_at_max_length(engines, doc_ids):
    """Index shift by BOS, feed_last both ways, and a window of exactly max_length inputs."""
    from lm_eval_longshort.protocols.requests import TargetWindow

    engine, hf = engines
    ids = doc_ids[0]
    windows = [
        TargetWindow(ids[:300], score_from=1, bos=None, label="plain"),
        TargetWindow(ids[100:400], score_from=0, bos=0, label="bos, last token only a target"),
        TargetWindow(ids[50:250], score_from=20, bos=0, label="bos, fed whole", feed_last=True),
        TargetWindow(ids[:MAX_MODEL_LEN], score_from=1900, bos=None, label="max_length inputs"),
    ]
    assert windows[-1].n_inputs == engine.max_length
    got, want = engine.target_nll(windows), hf.target_nll(windows)
    for w, a, b in zip(windows, got, want, strict=True):
        assert a.dtype == np.float64 and a.shape == b.shape == (len(w.tokens) - w.score_from,), w.label
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=w.label)


def test_last_logprobs_are_the_raw_full_distribution(engines, doc_ids):
    """Dense [n, V] float32 rows equal hf's log_softmax: raw log-probabilities, every id, sum 1."""
    from lm_eval_longshort.protocols.requests import Prompt

    engine, hf = engines
    ids = doc_ids[1]
    prompts = [Prompt(ids[:n], None, f"n={n}") for n in (17, 300, 999)] + [Prompt(ids[5:80], 0, "bos")]
    got, want = engine.last_logprobs(prompts), hf.last_logprobs(prompts)
    assert got.dtype == torch.float32 and got.shape == (4, engine.vocab_size)
    assert torch.allclose(got.double().exp().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-4)
    assert (got - want).abs().max().item() < 1e-3


def test_dense_topk_bounds_per_position(engines, doc_ids):
    """Per position: approximation <= exact (sce, symkl, js, tv), exact tv/js <= approximation + bound."""
    from lm_eval_longshort.protocols.requests import AlignedWindows

    engine, hf = engines
    ids, length, gap = doc_ids[0], 384, 70
    t = np.arange(gap + length // 2, length)
    pair = AlignedWindows(ids[:length], ids[gap : gap + length], t, t - gap, None, "pair", next_tokens=ids[t + 1])
    exact = hf.aligned_divergences([pair])[0]
    for k in (8, 64):
        approx = engine.aligned_divergences([pair], topk=k)[0]
        for name in ("sce", "symkl", "js", "tv"):
            assert np.all(approx[name] <= exact[name] + 1e-3 + 1e-3 * exact[name]), (k, name)
        for name in ("tv", "js"):
            assert np.all(exact[name] <= approx[name] + approx[f"{name}_err_bound"] + 1e-4), (k, name)
        assert np.mean(approx["top1"] == exact["top1"]) >= 0.98, k  # exact up to near-ties
        # dp: exact inside the prompts; at the long window's last position p_long(ids[L]) comes from
        # the top-K list (0 outside it), so it can only be lower there.
        np.testing.assert_allclose(approx["dp"][:-1], exact["dp"][:-1], rtol=1e-3, atol=2e-4)
        assert approx["dp"][-1] <= exact["dp"][-1] + 2e-4
    # A larger K is a finer partition: closer, with smaller bounds.
    assert approx["tv_err_bound"].mean() < engine.aligned_divergences([pair], topk=8)[0]["tv_err_bound"].mean()


# --------------------------------------------------------------------------- through lm-eval


@pytest.mark.parametrize(
    "meta",
    [
        {"protocol": "ladder", "lengths": [64, 256], "target_tokens": 64},
        {"protocol": "truncate", "lengths": [64, 256]},
        {"protocol": "sliding", "lengths": [64, 128], "max_doc_tokens": 300},
    ],
    ids=lambda m: m["protocol"],
)
def test_perplexity_matches_hf(vllm_lm, hflm, meta):
    got, got_samples = evaluate(vllm_lm, PPL, meta)
    want, want_samples = evaluate(hflm, PPL, meta)
    keys = [k.split(",")[0] for k in want if k.startswith(("ppl@", "bpb@", "keyppl")) and "_stderr" not in k]
    assert {f"ppl@{n}" for n in meta["lengths"]} <= set(keys)
    rel = {k: abs(metric(got, k) / metric(want, k) - 1) for k in keys if math.isfinite(metric(want, k))}
    print(f"\n{meta['protocol']}: max relative ppl/bpb difference vllm vs hf {max(rel.values()):.2e}")
    assert max(rel.values()) < REL_PPL, rel
    for a, b in zip(sorted(got_samples, key=lambda s: s["doc_id"]), sorted(want_samples, key=lambda s: s["doc_id"])):
        for ra, rb in zip(logged_response(a)["records"], logged_response(b)["records"], strict=True):
            assert (ra["L"], ra["n_targets"], ra["n_bytes"]) == (rb["L"], rb["n_targets"], rb["n_bytes"])
            assert ra["nll_sum"] == pytest.approx(rb["nll_sum"], rel=REL_PPL)


def test_misalignment_last_matches_hf(vllm_lm, hflm):
    meta = {"mode": "last", "lengths": [64, 256], "pairs": 3}
    got, got_samples = evaluate(vllm_lm, MIS, meta)
    want, want_samples = evaluate(hflm, MIS, meta)
    pairs = lambda samples: [p for s in sorted(samples, key=lambda s: s["doc_id"]) for p in logged_response(s)["pairs"]]  # noqa: E731
    got_pairs, want_pairs = pairs(got_samples), pairs(want_samples)
    assert len(got_pairs) == len(want_pairs) == 2 * 2 * 3
    worst = 0.0
    for a, b in zip(got_pairs, want_pairs, strict=True):
        assert (a["doc_index"], a["long_len"], a["short_len"]) == (b["doc_index"], b["long_len"], b["short_len"])
        assert a["symkl"] == pytest.approx(b["symkl"], rel=0.05, abs=1e-3)
        worst = max(worst, abs(a["symkl"] - b["symkl"]) / max(b["symkl"], 1e-12))
    agree = np.mean([a["top1"] == b["top1"] for a, b in zip(got_pairs, want_pairs)])
    print(f"\nlast: max relative symkl difference {worst:.2e}, top1 agreement {agree:.2f}")
    assert agree >= 0.9
    assert metric(got, "approximate") == 0.0 == metric(want, "approximate")


def test_misalignment_dense_is_a_labelled_lower_bound(vllm_lm, hflm):
    meta = {"mode": "dense", "lengths": [64, 160], "topk": 32}
    got, got_samples = evaluate(vllm_lm, MIS, meta)
    want, want_samples = evaluate(hflm, MIS, meta)
    assert metric(got, "approximate") == 1.0 and metric(want, "approximate") == 0.0
    groups = lambda samples: {(g["doc_index"], g["L"]): g for s in samples for g in logged_response(s)["groups"]}  # noqa: E731
    got_groups, want_groups = groups(got_samples), groups(want_samples)
    assert got_groups.keys() == want_groups.keys() and len(got_groups) == 4
    assert all(logged_response(s)["approximate"] is True for s in got_samples)
    for key, a in got_groups.items():
        b, tol = want_groups[key], 1e-3 * a["n_positions"]
        assert a["n_positions"] == b["n_positions"]
        for name in ("sce", "symkl", "js", "tv"):
            assert a[f"{name}_sum"] <= b[f"{name}_sum"] * (1 + 1e-3) + tol, (key, name)
        for name in ("tv", "js"):
            assert b[f"{name}_sum"] <= a[f"{name}_sum"] + a[f"{name}_err_bound_sum"] + tol, (key, name)
        assert abs(a["top1_sum"] - b["top1_sum"]) <= 1, key
        assert "tv_err_bound_sum" not in b  # hf is exact


# --------------------------------------------------------------------------- errors


def test_engine_without_max_logprobs_minus_one_says_add_it(engines, doc_ids):
    """With vLLM's default max_logprobs=20 vLLM itself rejects logprobs=-1; we say what to add first."""
    from vllm import SamplingParams, TokensPrompt

    from lm_eval_longshort.protocols.requests import AlignedWindows, Prompt

    engine, _ = engines
    config = engine.model_config
    ids = doc_ids[0][:64]
    pair = AlignedWindows(ids, ids, np.arange(40, 64), np.arange(40, 64), None, "pair")
    config.max_logprobs = 20  # what an engine started without max_logprobs=-1 has
    try:
        with pytest.raises(Exception, match=r"greater than max allowed: 20"):  # vLLM's own check
            engine.llm.generate(
                [TokensPrompt(prompt_token_ids=ids.tolist())], SamplingParams(max_tokens=1, logprobs=-1), use_tqdm=False
            )
        with pytest.raises(ValueError, match=r"max_logprobs=20; add max_logprobs=-1 to --model_args"):
            engine.last_logprobs([Prompt(ids, None, "p")])
        with pytest.raises(ValueError, match=r"topk=32 .*max_logprobs=20; add max_logprobs=-1"):
            engine.aligned_divergences([pair], topk=32)
        assert engine.target_nll([_window(ids)])[0].shape == (63,)  # perplexity needs no top lists
    finally:
        config.max_logprobs = -1


def _window(ids):
    from lm_eval_longshort.protocols.requests import TargetWindow

    return TargetWindow(ids, score_from=1, bos=None, label="w")


@pytest.mark.parametrize(
    ("task", "meta", "needed"),
    [
        (PPL, {"lengths": [64, 4096], "target_tokens": 256}, 4096 + 256 - 1),
        (MIS, {"lengths": [64, 2048]}, 2048),  # = max_model_len: one token too many for vLLM
    ],
)
def test_length_beyond_max_model_len_names_the_fix(vllm_lm, task, meta, needed):
    from lm_eval_longshort.protocols.requests import LengthLimitError

    with pytest.raises(LengthLimitError) as info:
        evaluate(vllm_lm, task, meta)
    message = str(info.value)
    assert f"needs {needed} input tokens" in message and f"max_model_len={MAX_MODEL_LEN}" in message, message
    assert f"use max_model_len={needed + 1} or more" in message, message
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in message and "hf_overrides" in message, message


def test_engine_seed_copied_into_task_metadata_is_refused(vllm_lm):
    """``lm_eval --model vllm --model_args ...,seed=0``: lm-eval's CLI sets the task metadata to
    ``model_args | metadata`` (lm_eval/config/evaluate_config.py), so ``seed`` is both the engine's
    and the misalignment draws'. The task refuses before scoring and says how to set its seed."""
    assert vllm_lm.model_args["seed"] == 0
    metadata = {**engine_args("unused"), "seed": 0} | {"lengths": [32], "pairs": 2}
    with pytest.raises(ValueError) as info:
        evaluate_tasks(vllm_lm, [MIS], metadata)
    message = str(info.value)
    assert "seed=0 is also the vLLM engine's seed" in message and "--metadata '{\"seed\": N}'" in message, message
    # The task's default seed (not the engine's) is not refused: only the copied value is.
    got = evaluate_tasks(vllm_lm, [MIS], {"lengths": [32], "pairs": 2})["results"][MIS]
    assert math.isfinite(got["symkl@32,none"])


def test_package_imports_no_vllm():
    """Only backends/vllm.py imports vllm: the package works where vllm is not installed."""
    code = (
        "import sys, lm_eval_longshort.harness.task, lm_eval_longshort.protocols.runner, "
        "lm_eval_longshort.backends.hf, lm_eval_longshort.cli; "
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- the real CLI


def test_lm_eval_cli_model_vllm(assets, hflm, tmp_path):
    """`lm_eval --model vllm` as users run it (vLLM's default separate engine-core process), both
    installed task families in one command, one document; equals hf within the tolerances."""
    meta = {"lengths": [64, 128], "target_tokens": 32, "pairs": 2}
    args = dict(engine_args(assets.model_dir), max_model_len=512)
    got = lm_eval_cli_vllm(",".join(f"{k}={v}" for k, v in args.items()), f"{PPL},{MIS}", meta, tmp_path)
    want_ppl, _ = evaluate(hflm, PPL, meta, limit=1)
    want_mis, _ = evaluate(hflm, MIS, meta, limit=1)
    for n in meta["lengths"]:
        assert got[PPL][f"ppl@{n},none"] == pytest.approx(metric(want_ppl, f"ppl@{n}"), rel=REL_PPL)
        assert got[MIS][f"symkl@{n},none"] == pytest.approx(metric(want_mis, f"symkl@{n}"), rel=0.05, abs=1e-3)
    assert got[MIS]["approximate,none"] == 0.0


def test_generate_route_points_to_the_hidden_route_once(vllm_lm, caplog):
    import lm_eval_longshort.backends.vllm as backend

    backend._route_hint_logged = False
    with caplog.at_level("WARNING", logger=backend.__name__):
        for _ in range(2):
            assert backend.VLLMEngine.from_lm_eval(vllm_lm).name == "vllm"
    hints = [r.getMessage() for r in caplog.records if "hidden-state route" in r.getMessage()]
    assert len(hints) == 1 and '"pooler_config": {"task": "token_embed"}' in hints[0], hints
