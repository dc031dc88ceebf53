"""Batch evaluation you can trust: what each result says it measured, standard errors, checks
before any work, no NaN without a reason, clear errors for bad data keys and files.

Everything runs through lm-eval's own ``simple_evaluate`` with lm-eval's HFLM and the real
embedded SmolLM2; numbers are checked against computations independent of the package (numpy
formulas of tests/reference.py over the logged per-document records, hashlib over the texts).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from harness_run import evaluate_tasks, response
from reference import dense_max_gap, ratio_se

from lm_eval_longshort.harness.lm_method import TaskCheckError
from lm_eval_longshort.protocols.requests import LengthLimitError
from lm_eval_longshort.protocols.runner import TooFewDocumentsError

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
PPL_LOCAL, MIS_LOCAL = "longshort_ppl_local", "longshort_misalign_local"


# --------------------------------------------------------------------------- results JSON, stderr


@pytest.fixture(scope="module")
def group_run(hflm):
    """ppl (ladder) + misalignment (last) on 3 plays, with lm-eval's stderr switched on."""
    meta = {"lengths": [32, 96], "target_tokens": 16, "pairs": 2}
    return evaluate_tasks(hflm, [PPL, MIS], meta, limit=3, log_samples=True, bootstrap_iters=100)


def test_perplexity_stderr_equals_direct_delta_method(group_run):
    res = group_run["results"][PPL]
    records = [response(s)["records"] for s in group_run["samples"][PPL]]
    assert len(records) == 3
    for length in (32, 96):
        a = np.array([next(r["nll_sum"] for r in rs if r["L"] == length) for rs in records])
        n = np.array([next(r["n_targets"] for r in rs if r["L"] == length) for rs in records], dtype=float)
        nbytes = np.array([next(r["n_bytes"] for r in rs if r["L"] == length) for rs in records], dtype=float)
        ppl = math.exp(a.sum() / n.sum())
        assert res[f"ppl@{length},none"] == pytest.approx(ppl, rel=1e-12)
        assert res[f"ppl@{length}_stderr,none"] == pytest.approx(ppl * ratio_se(a, n), rel=1e-9)
        assert res[f"bpb@{length}_stderr,none"] == pytest.approx(ratio_se(a, nbytes) / math.log(2), rel=1e-9)
        assert res[f"ppl@{length}_stderr,none"] > 0


def test_misalignment_stderr_equals_direct_delta_method(group_run):
    res = group_run["results"][MIS]
    docs = [response(s)["pairs"] for s in group_run["samples"][MIS]]
    for metric in ("symkl", "sce", "top1"):
        for length in (32, 96):
            a = np.array([sum(p[metric] for p in pairs if p["long_len"] == length) for pairs in docs])
            b = np.array([sum(1 for p in pairs if p["long_len"] == length) for pairs in docs], dtype=float)
            assert res[f"{metric}@{length},none"] == pytest.approx(a.sum() / b.sum(), rel=1e-9)
            se = res[f"{metric}@{length}_stderr,none"]
            if metric == "top1" and np.all(a == b):
                assert se == 0.0
            else:
                assert se == pytest.approx(ratio_se(a, b), rel=1e-9)


def test_results_say_what_was_measured(group_run, plays):
    """configs[task].longshort: resolved settings, the document set with content hashes, per-doc sums."""
    for task, kind in ((PPL, "ppl"), (MIS, "misalign")):
        info = group_run["configs"][task]["longshort"]
        assert info["kind"] == kind and info["stderr"] == "delta"
        assert info["settings"]["lengths"] == [32, 96]
        assert info["engine"]["backend"] == "hf" and info["engine"]["dtype"] == "float32"
        docs = info["documents"]
        assert [d["doc_index"] for d in docs] == [0, 1, 2]
        for d in docs:
            text = plays[d["doc_index"]]["text"]
            assert d["sha1"] == hashlib.sha1(text.encode("utf-8")).hexdigest()
            assert d["skipped"] is False
        scored = [[d["doc_index"], d["sha1"]] for d in docs]
        assert info["measured"]["documents"] == hashlib.sha1(json.dumps(scored).encode()).hexdigest()
        assert group_run["results"][task]["documents,none"] == 3
    ppl = group_run["configs"][PPL]["longshort"]
    assert ppl["measured"]["target_tokens"] == 16 and "pairs" not in ppl["measured"]
    assert group_run["configs"][MIS]["longshort"]["measured"]["pairs"] == 2
    # The per-document sums are the logged records, so comparisons can pair documents.
    for sample, doc in zip(group_run["samples"][PPL], ppl["documents"], strict=True):
        record = next(r for r in response(sample)["records"] if r["L"] == 96)
        assert doc["sums"]["ppl@96"] == [record["nll_sum"], record["n_targets"]]


def test_no_stderr_when_lm_eval_bootstrap_is_off(hflm):
    out = evaluate_tasks(hflm, [PPL], {"lengths": [32], "target_tokens": 8}, limit=2, bootstrap_iters=0)
    assert out["results"][PPL]["ppl@32_stderr,none"] == "N/A"


# --------------------------------------------------------------------------- dense: no silent NaN


def test_dense_high_min_ratio_leaves_positions_in_every_group(hflm):
    out = evaluate_tasks(
        hflm,
        [MIS],
        {"lengths": [128, 256], "mode": "dense", "min_ratio": 0.9},
        limit=2,
        log_samples=True,
        bootstrap_iters=0,
    )
    res = out["results"][MIS]
    for metric in ("sce", "symkl", "js", "top1", "tv"):
        for length in (128, 256):
            assert math.isfinite(res[f"{metric}@{length},none"]), (metric, length)
    for sample in out["samples"][MIS]:
        for group in response(sample)["groups"]:
            length, gap = group["L"], group["b_start"]
            short_min = math.ceil(0.9 * length)
            assert 1 <= gap <= dense_max_gap(length, 0.9)
            assert group["n_positions"] == length - max(gap, short_min + gap - 1) >= 1


# --------------------------------------------------------------------------- checks before any work


@pytest.fixture()
def forward_count(hflm):
    """Counts decoder forwards longer than the 16-token head check the engine makes once."""
    calls = []
    hook = hflm.model.model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[-1]), with_kwargs=True
    )
    yield lambda: sum(1 for n in calls if n > 16)
    hook.remove()


@pytest.fixture(scope="module")
def doc_770(smol, plays, tmp_path_factory) -> Path:
    """A local file of exactly 770 SmolLM2 tokens (the start of a play)."""
    _, tok = smol
    ids = tok(plays[3]["text"], add_special_tokens=False)["input_ids"]
    for n in range(770, 800):  # decoding can merge tokens; find a prefix that re-tokenizes to 770
        text = tok.decode(ids[:n])
        if len(tok(text, add_special_tokens=False)["input_ids"]) == 770:
            break
    else:
        pytest.fail("no 770-token prefix")
    path = tmp_path_factory.mktemp("docs") / "play770.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_failing_task_stops_the_call_before_any_scoring(hflm, doc_770, forward_count):
    """ppl ladder [128, 768] with W=32 needs 800 tokens; misalignment `last` needs 768 and could run."""
    meta = {"files": str(doc_770), "lengths": [128, 768], "target_tokens": 32}
    with pytest.raises(TooFewDocumentsError, match=r"task longshort_ppl_local: every document is too short"):
        evaluate_tasks(hflm, [MIS_LOCAL, PPL_LOCAL], meta, limit=None, bootstrap_iters=0)
    assert forward_count() == 0


def test_every_failing_task_is_named_at_once(hflm, doc_770, forward_count):
    meta = {"files": str(doc_770), "lengths": [128, 4000], "target_tokens": 32}
    with pytest.raises(TaskCheckError) as info:
        evaluate_tasks(hflm, [MIS_LOCAL, PPL_LOCAL], meta, limit=None, bootstrap_iters=0)
    message = str(info.value)
    assert "2 of 2 longshort tasks cannot run (nothing was scored)" in message, message
    assert f"- {MIS_LOCAL}: " in message and f"- {PPL_LOCAL}: " in message, message
    assert "every document is too short" in message
    assert forward_count() == 0


def test_oversized_target_tokens_is_named(hflm):
    assert hflm.max_length == 4096
    with pytest.raises(LengthLimitError) as info:
        evaluate_tasks(hflm, [PPL], {"lengths": [64, 4000], "target_tokens": 200}, bootstrap_iters=0)
    message = str(info.value)
    assert "max(lengths) + target_tokens - 1 = 4000 + 200 - 1 = 4199" in message, message
    assert "lower target_tokens (at most 97)" in message, message


# --------------------------------------------------------------------------- data keys and files


def test_data_key_on_a_task_that_does_not_read_it_is_an_error(hflm, doc_770):
    with pytest.raises(ValueError, match=r"reads no data key\(s\) \['files'\].*`shakespeare` loader") as info:
        evaluate_tasks(hflm, [PPL], {"files": str(doc_770), "lengths": [32]})
    assert "longshort_*_local" in str(info.value)


@pytest.mark.parametrize(
    ("name", "payload", "pattern"),
    [
        ("latin1.txt", "Ça va, naïve café\n".encode("latin-1"), r"is not UTF-8 text .*iconv"),
        ("blob.txt", b"text\x00\x01\x02binary", r"looks binary \(NUL byte at offset 4\)"),
        ("rows.jsonl", b'{"text": "caf\xe9"}\n', r"is not UTF-8 text"),
        ("fake.parquet", b"not parquet at all", r"is not a parquet file"),
    ],
)
def test_unreadable_file_names_the_file(hflm, tmp_path, name, payload, pattern):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=pattern) as info:
        evaluate_tasks(hflm, [PPL_LOCAL], {"files": str(path), "lengths": [32]})
    assert name in str(info.value)


# --------------------------------------------------------------------------- comparing runs


def test_compare_refuses_real_runs_that_measured_different_targets(hflm, group_run, tmp_path, capsys):
    """The issue's case: lengths [32, 96] and [32, 64] both report ppl@32, but the ladder's targets
    sit at C = max(lengths), so those are different tokens: compare must refuse and name `lengths`."""
    from lm_eval_longshort import cli

    other = evaluate_tasks(
        hflm, [PPL, MIS], {"lengths": [32, 64], "target_tokens": 16, "pairs": 2}, limit=3, bootstrap_iters=100
    )
    files = []
    for name, out in (("a", group_run), ("b", other)):
        path = tmp_path / name / "results_2026-01-01T00-00-00.json"
        path.parent.mkdir()
        keep = {k: out[k] for k in ("results", "configs", "config", "versions", "group_subtasks") if k in out}
        path.write_text(json.dumps(keep, default=str), encoding="utf-8")
        files.append(str(path))
    assert cli.main(["compare", *files, "--label", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert "keys differing: lengths" in err, err
    assert "Traceback" not in err
