"""Bad input gives a clear error (naming the problem and the fix) or a counted skip, never a silent number.

Everything runs through lm-eval's own ``simple_evaluate`` with lm-eval's HFLM (``hflm``) or
another real lm-eval model. How task metadata reaches the tasks: ``simple_evaluate``
merges its ``metadata=`` argument (over ``model_args``) into every task config only when it
builds the TaskManager itself (``task_manager=None``, lm_eval/evaluator.py ~292); a
TaskManager passed in is used as is, so ``harness_run.evaluate_tasks`` gives the metadata to
the TaskManager, as ``lm_eval --metadata`` does (lm-eval's bootstrap off, one document unless
``limit`` says otherwise); ``test_unknown_key_via_simple_evaluate_metadata`` takes the
``metadata=`` route once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lm_eval
import pytest
import torch
from harness_run import evaluate_tasks, response

from lm_eval_longshort.protocols.requests import LengthLimitError, NonFiniteLogitsError
from lm_eval_longshort.protocols.runner import TooFewDocumentsError

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
PPL_LOCAL, MIS_LOCAL = "longshort_ppl_local", "longshort_misalign_local"


def _responses(out: dict, task: str) -> list[dict]:
    return [response(s) for s in out["samples"][task]]


# --------------------------------------------------------------------------- too-short documents


@pytest.fixture(scope="module")
def local_files(plays, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("docs")
    tiny = folder / "tiny.txt"
    tiny.write_text("To be, or not to be.\n", encoding="utf-8")
    long = folder / "long.txt"
    long.write_text(plays[0]["text"], encoding="utf-8")
    return {"tiny": tiny, "long": long}


LOCAL_META = {"lengths": [64, 256]}  # default target_tokens=256: a document needs 512 tokens


def test_short_document_is_skipped_counted_and_warned(hflm, local_files, caplog):
    files = [str(local_files["tiny"]), str(local_files["long"])]
    with caplog.at_level(logging.WARNING):
        both = evaluate_tasks(hflm, [PPL_LOCAL], {**LOCAL_META, "files": files}, limit=None, log_samples=True)
    res = both["results"][PPL_LOCAL]
    assert res["skipped_docs,none"] == 1
    assert both["n-samples"][PPL_LOCAL]["effective"] == 2
    tiny, long = _responses(both, PPL_LOCAL)
    assert tiny["skipped"] is True and tiny["title"] == "tiny.txt" and tiny["needed_tokens"] == 512
    assert tiny["n_tokens"] < 512 and "records" not in tiny
    assert long["skipped"] is False and long["title"] == "long.txt"
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("lm_eval_longshort")
    ]
    shortfall = [m for m in warnings if "tiny.txt" in m]
    assert shortfall, warnings
    assert f"{tiny['n_tokens']} tokens" in shortfall[0] and "needs 512" in shortfall[0], shortfall[0]

    alone = evaluate_tasks(hflm, [PPL_LOCAL], {**LOCAL_META, "files": [str(local_files["long"])]}, limit=None)
    ref = alone["results"][PPL_LOCAL]
    assert ref["skipped_docs,none"] == 0
    for key in ("ppl@64,none", "ppl@256,none", "bpb@64,none", "bpb@256,none", "keyppl,none", "key_frac,none"):
        assert math.isfinite(res[key]), key
        assert res[key] == pytest.approx(ref[key], rel=1e-12), key  # the skipped doc changes nothing


@pytest.mark.parametrize(
    ("task", "meta", "needed"),
    [
        (PPL_LOCAL, {"lengths": [64, 256]}, 512),
        (MIS_LOCAL, {"lengths": [64]}, 64),
    ],
)
def test_no_usable_document_is_an_error(hflm, local_files, task, meta, needed):
    with pytest.raises(TooFewDocumentsError) as info:
        evaluate_tasks(hflm, [task], {**meta, "files": [str(local_files["tiny"])]}, limit=None)
    message = str(info.value)
    assert "every document is too short" in message
    assert f"needs {needed} tokens" in message and "'tiny.txt'" in message, message
    assert "Use shorter lengths or longer documents" in message


# --------------------------------------------------------------------------- backend limits


@pytest.mark.parametrize(
    ("task", "meta", "needed"),
    [
        (PPL, {"lengths": [64, 8192], "target_tokens": 256}, 8192 + 256 - 1),  # reads ids[C-L : C+W-1]
        (MIS, {"lengths": [64, 8192]}, 8192),
    ],
)
def test_length_above_backend_max_length_says_pass_max_length(hflm, task, meta, needed):
    assert hflm.max_length == 4096
    with pytest.raises(LengthLimitError, match=r"max_length=4096") as info:
        evaluate_tasks(hflm, [task], meta)
    message = str(info.value)
    assert f"needs {needed} input tokens" in message, message
    assert "pass max_length=N in --model_args" in message and f"at least {needed}" in message, message


def test_backend_without_full_distributions_says_use_hf_or_vllm():
    from lm_eval.models.dummy import DummyLM

    with pytest.raises(TypeError, match=r"'DummyLM' backend.*run them with --model hf or --model vllm"):
        evaluate_tasks(DummyLM(), [PPL], {"lengths": [64], "target_tokens": 8})


@pytest.fixture(scope="module")
def nan_lm(smol):
    """lm-eval's HFLM around a tiny randomly initialised Llama whose output layer is NaN."""
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = smol
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=512, batch_size=1)


@pytest.mark.parametrize(
    ("task", "meta"),
    [
        (PPL, {"lengths": [16, 32], "target_tokens": 8}),
        (MIS, {"lengths": [16, 32], "pairs": 2}),
    ],
)
def test_non_finite_logits_name_document_and_position(nan_lm, task, meta):
    with pytest.raises(NonFiniteLogitsError) as info:
        evaluate_tasks(nan_lm, [task], meta)
    message = str(info.value)
    assert 'document #0 ("A Midsummer Night\'s Dream")' in message, message
    assert "non-finite logits at input position" in message and "dtype=float32" in message, message


# --------------------------------------------------------------------------- metadata


def test_unknown_key_via_simple_evaluate_metadata(hflm):
    """The metadata= route of simple_evaluate (it builds the TaskManager and merges)."""
    with pytest.raises(ValueError, match=r"unknown metadata key\(s\) \['lenghts'\]") as info:
        lm_eval.simple_evaluate(model=hflm, tasks=[PPL], metadata={"lenghts": [64, 256]}, limit=1)
    message = str(info.value)
    assert "perplexity tasks: ['add_bos', 'alpha'," in message and "'lengths'" in message, message
    assert "fix the spelling or drop the key" in message


def test_unknown_key_in_a_group_run_lists_every_known_key(hflm):
    """A group's --metadata reaches both task kinds: the error lists both kinds' keys and the data keys."""
    with pytest.raises(ValueError, match=r"unknown metadata key\(s\) \['pair'\]") as info:
        evaluate_tasks(hflm, [PPL, MIS], {"lengths": [64], "pair": 2})
    message = str(info.value)
    for listed in (
        "perplexity tasks: [",
        "'target_tokens'",
        "misalignment tasks: [",
        "'min_ratio'",
        "data keys: [",
        "'files'",
        "'hf_dataset'",
    ):
        assert listed in message, (listed, message)


def test_unknown_key_misalignment_lists_its_keys(hflm):
    with pytest.raises(ValueError, match=r"unknown metadata key\(s\) \['pair'\]") as info:
        evaluate_tasks(hflm, [MIS], {"lengths": [64], "pair": 2})
    assert "'pairs'" in str(info.value) and "'min_ratio'" in str(info.value)


def test_model_args_and_other_family_keys_are_not_errors(hflm, assets):
    """lm-eval merges --model_args into task metadata; a group's --metadata reaches both families."""
    meta = {
        "lengths": [32],
        "target_tokens": 8,
        # what `--model_args pretrained=...,dtype=float32,max_length=4096,...` adds:
        "pretrained": str(assets.model_dir),
        "dtype": "float32",
        "max_length": 4096,
        "batch_size": 1,
        "trust_remote_code": True,
        "attn_implementation": "sdpa",
        "device": "cpu",
        # misalignment keys in a perplexity task (a group run passes one --metadata to both):
        "pairs": 2,
        "min_ratio": 0.5,
    }
    out = evaluate_tasks(hflm, [PPL], meta)
    res = out["results"][PPL]
    assert math.isfinite(res["ppl@32,none"]) and res["ppl@32,none"] > 1
    assert out["configs"][PPL]["metadata"]["pretrained"] == str(assets.model_dir)


@pytest.mark.parametrize(
    ("meta", "pattern"),
    [
        (
            {"lengths": [8], "min_ratio": 0.5, "pairs": 5},
            r"pairs=5 exceeds the 4 distinct short lengths in \[4, 7\] for L=8; lower pairs or min_ratio, or raise L",
        ),
        ({"lengths": [64], "min_ratio": 0}, r"min_ratio=0\.0 must lie strictly between 0 and 1"),
        ({"lengths": [64], "min_ratio": 1.5}, r"min_ratio=1\.5 must lie strictly between 0 and 1"),
        ({"lengths": [1, 64]}, r"lengths=1 must be an integer >= 2"),
        ({"lengths": [64], "mode": "dens"}, r"mode='dens' must be one of \('last', 'dense'\)"),
    ],
)
def test_misalignment_settings_errors(hflm, meta, pattern):
    with pytest.raises(ValueError, match=pattern):
        evaluate_tasks(hflm, [MIS], meta)


def test_misalignment_pairs_at_the_limit_run(hflm):
    """The boundary of the pairs check: L=8, min_ratio 0.5 has exactly 4 short lengths (4..7)."""
    out = evaluate_tasks(hflm, [MIS], {"lengths": [8], "min_ratio": 0.5, "pairs": 4}, log_samples=True)
    (response,) = _responses(out, MIS)
    assert sorted(p["short_len"] for p in response["pairs"]) == [4, 5, 6, 7]
    assert math.isfinite(out["results"][MIS]["symkl@8,none"])


@pytest.mark.parametrize(
    ("meta", "pattern"),
    [
        (
            {"protocol": "sliding", "lengths": [64, 256], "stride": 100},
            r"stride=100 exceeds window length 64: .*use stride <= min\(lengths\)",
        ),
        ({"lengths": [1, 64]}, r"lengths=1 must be an integer >= 2"),
        (
            {"lengths": [64], "protocol": "slide"},
            r"protocol='slide' must be one of \('ladder', 'truncate', 'sliding'\)",
        ),
        ({"lengths": [64], "target_tokens": 0}, r"target_tokens=0 must be an integer >= 1"),
        # Loss against position needs the one pass over ids[0:C] that only truncate makes.
        *(
            (
                {"protocol": protocol, "lengths": [64], "bins_per_doubling": 4},
                rf"bins_per_doubling=4 asks for loss against position, which only protocol truncate measures.* "
                rf"not {protocol}; use protocol=truncate or drop bins_per_doubling",
            )
            for protocol in ("ladder", "sliding")
        ),
        *(
            (
                {"protocol": "truncate", "lengths": [64], "bins_per_doubling": n},
                rf"bins_per_doubling={n} must be an integer >= 1",
            )
            for n in (0, -2)
        ),
    ],
)
def test_perplexity_settings_errors(hflm, meta, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        evaluate_tasks(hflm, [PPL], meta)
    assert "\n" not in str(error.value)  # one line


def _sliding(hflm, stride: int) -> tuple[dict, dict]:
    out = evaluate_tasks(
        hflm, [PPL], {"protocol": "sliding", "lengths": [32], "stride": stride, "max_doc_tokens": 96}, log_samples=True
    )
    (response,) = _responses(out, PPL)
    (record,) = response["records"]
    return out["results"][PPL], record


def test_sliding_stride_below_window_scores_every_token_once(hflm, smol, plays):
    res, record = _sliding(hflm, 31)
    _, tok = smol
    ids = tok(plays[0]["text"], add_special_tokens=False)["input_ids"][:96]
    assert record["n_targets"] == 95  # ids[1:96]: every token but the first (no BOS), each once
    assert record["n_bytes"] == len(tok.decode(ids[1:]).encode("utf-8"))
    assert res["ppl@32,none"] == pytest.approx(math.exp(record["nll_sum"] / 95), rel=1e-9)


def test_sliding_stride_equal_to_window_without_bos_is_an_error(hflm):
    # Without a BOS, a later window's first token has no context inside that window.
    with pytest.raises(ValueError, match=r"stride=32 with window L=32 and no BOS.*stride <= 31"):
        _sliding(hflm, 32)
