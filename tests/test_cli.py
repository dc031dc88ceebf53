"""The real `lm_eval` command (and `lm-eval-longshort report/plot`) as subprocesses.

Two lm_eval runs are shared by all tests (each costs ~20 s of start-up):
  * ``group_run``: the installed group ``longshort_shakespeare`` (both tasks, one command,
    one model load), --log_samples;
  * ``ppl_run``: ``longshort_ppl_shakespeare`` alone from ``--include_path task_configs``
    (the repository's YAMLs), --log_samples; its numbers must equal the group run's.
Every logged number is checked against an independent plain-transformers computation
(tests/reference.py) and every reported number against the logged per-document records.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness_run import task_manager
from offline import offline_env
from reference import plain_nll, plain_token_logprobs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LM_EVAL = str(BIN / "lm_eval")
LONGSHORT = str(BIN / "lm-eval-longshort")
TASK_CONFIGS = ROOT / "task_configs"

PPL, MIS, GROUP = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare", "longshort_shakespeare"
LENGTHS, W, PAIRS = [64, 256], 32, 2
C = max(LENGTHS)
PPL_META = {"lengths": LENGTHS, "target_tokens": W}
GROUP_META = {"lengths": LENGTHS, "target_tokens": W, "pairs": PAIRS}
MISALIGN_METRICS = ("sce", "symkl", "js", "top1", "tv")


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=offline_env(), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def model_args(assets) -> str:
    out = _run([LONGSHORT, "model-args"]).stdout.strip()
    assert out.startswith("pretrained=") and "dtype=float32" in out, out
    return out


def _lm_eval(model_args: str, tasks: str, meta: dict, limit: int, out: Path, *extra: str) -> dict:
    proc = _run(
        [
            LM_EVAL,
            "--model",
            "hf",
            "--model_args",
            model_args,
            "--tasks",
            tasks,
            "--limit",
            str(limit),
            "--metadata",
            json.dumps(meta),
            "--output_path",
            str(out),
            *extra,
        ]
    )
    results = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    assert len(results) == 1, results
    samples = {}
    for path in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = re.match(r"samples_(.+)_\d{4}-\d\d-\d\dT", Path(path).name).group(1)
        with open(path, encoding="utf-8") as fh:
            samples[task] = [json.loads(line) for line in fh]
    return {
        "results": json.loads(Path(results[0]).read_text()),
        "samples": samples,
        "stderr": proc.stderr,
        "stdout": proc.stdout,
        "dir": out,
    }


@pytest.fixture(scope="module")
def group_run(model_args, tmp_path_factory) -> dict:
    """The installed group (no --include_path): both tasks in one lm_eval command."""
    return _lm_eval(model_args, GROUP, GROUP_META, 2, tmp_path_factory.mktemp("group"), "--log_samples")


@pytest.fixture(scope="module")
def ppl_run(model_args, tmp_path_factory) -> dict:
    """The perplexity task alone, from the repository's task_configs via --include_path."""
    return _lm_eval(
        model_args,
        PPL,
        PPL_META,
        2,
        tmp_path_factory.mktemp("ppl"),
        "--log_samples",
        "--include_path",
        str(TASK_CONFIGS),
    )


@pytest.fixture(scope="module", params=["group_run", "ppl_run"])
def any_run(request) -> dict:
    return request.getfixturevalue(request.param)


def _response(sample: dict) -> dict:
    """The per-document response lm-eval logged: a JSON string (valid JSON all the way down)."""
    resp = sample["resps"][0][0]
    return resp if isinstance(resp, dict) else json.loads(resp)


def _doc_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- lm_eval ls


def test_installed_tasks_and_groups_are_in_lm_evals_default_index():
    """The index `lm_eval --tasks` and `lm_eval ls tasks` build (TaskManager() with lm-eval's defaults,
    no --include_path) holds our tasks and groups from lm-eval's own task folder. In-process: the
    suite builds that index once (tests/harness_run.py), where a subprocess would spend ~30 s on it."""
    index = task_manager().task_index
    for name in (PPL, MIS, "longshort_ppl", GROUP, "longshort"):
        assert name in index, f"{name} missing from lm-eval's task index"
        # found without --include_path: the installed YAML sits in lm-eval's own task folder
        path = Path(index[name].yaml_path).as_posix()
        assert path.endswith(f"lm_eval/tasks/longshort/{name}.yaml"), path
    assert index[GROUP].kind.name == "GROUP" and index[PPL].kind.name == "PY_TASK"  # `class:` in the YAML


# --------------------------------------------------------------------------- perplexity


def test_ppl_results_keys(any_run):
    res = any_run["results"]["results"][PPL]
    for key in (
        "ppl@64,none",
        "ppl@256,none",
        "bpb@64,none",
        "bpb@256,none",
        "ppl@max,none",
        "keyppl,none",
        "key_frac,none",
        "skipped_docs,none",
    ):
        assert key in res, f"{key} missing; got {sorted(res)}"
    for key in ("ppl@64,none", "ppl@256,none", "bpb@64,none", "bpb@256,none"):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    assert res["ppl@max,none"] == res["ppl@256,none"]
    assert res["skipped_docs,none"] == 0
    # a pooled ppl over all lengths would mix lengths: docs/metrics.md forbids it
    assert "ppl,none" not in res and "bpb,none" not in res
    assert any_run["results"]["n-samples"][PPL]["effective"] == 2


def test_ppl_samples_records_and_pooling(any_run):
    samples = any_run["samples"][PPL]
    assert len(samples) == 2
    res = any_run["results"]["results"][PPL]
    nll, n, n_bytes = dict.fromkeys(LENGTHS, 0.0), dict.fromkeys(LENGTHS, 0), dict.fromkeys(LENGTHS, 0)
    for sample in samples:
        response = _response(sample)
        assert response["skipped"] is False
        records = response["records"]
        assert sorted(r["L"] for r in records) == LENGTHS
        for record in records:
            assert set(record) >= {"doc_index", "L", "nll_sum", "n_targets", "n_bytes"}, record
            assert record["doc_index"] == sample["doc_id"]
            assert record["n_targets"] == W, record
            nll[record["L"]] += record["nll_sum"]
            n[record["L"]] += record["n_targets"]
            n_bytes[record["L"]] += record["n_bytes"]
    for length in LENGTHS:
        assert res[f"ppl@{length},none"] == pytest.approx(math.exp(nll[length] / n[length]), rel=1e-9)
        assert res[f"bpb@{length},none"] == pytest.approx(nll[length] / (math.log(2) * n_bytes[length]), rel=1e-9)


@pytest.fixture(scope="module")
def plain_ladder(smol, plays):
    """Independent per-token NLLs of the ladder targets, per (doc_index, L), from plain forwards."""
    model, tok = smol
    # SmolLM2 adds no BOS to plain text, so add_bos=auto prepends nothing
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]
    out = {}
    for doc_index in (0, 1):
        ids = _doc_ids(tok, plays[doc_index]["text"])
        for length in LENGTHS:
            # the model reads ids[C-L : C+W-1]; the W targets ids[C : C+W] are its last W tokens' successors
            window = ids[C - length : C + W]
            out[doc_index, length] = plain_nll(model, window, first_scored=length)
        out[doc_index, "bytes"] = len(tok.decode(ids[C : C + W]).encode("utf-8"))
    return out


def test_ppl_logged_nll_matches_plain_transformers(any_run, plain_ladder, plays):
    for sample in any_run["samples"][PPL]:
        response = _response(sample)
        doc_index = response["doc_index"]
        assert response["title"] == plays[doc_index]["title"]
        for record in response["records"]:
            ref = plain_ladder[doc_index, record["L"]]
            assert ref.numel() == W == record["n_targets"]
            assert record["nll_sum"] == pytest.approx(float(ref.sum()), rel=1e-4), (doc_index, record["L"])
            assert record["n_bytes"] == plain_ladder[doc_index, "bytes"]


def test_ppl_key_tokens_match_plain_transformers(any_run, plain_ladder):
    """keyppl / key_frac (docs/metrics.md, alpha=2, beta=-2) recomputed from the plain per-token NLLs."""
    res = any_run["results"]["results"][PPL]
    n_key, key_nll, n_targets = 0, 0.0, 0
    for doc_index in (0, 1):
        long, short = plain_ladder[doc_index, C], plain_ladder[doc_index, min(LENGTHS)]
        key = (short - long > 2.0) & (-long > -2.0)
        n_key += int(key.sum())
        key_nll += float(long[key].sum())
        n_targets += W
    assert res["key_frac,none"] == pytest.approx(n_key / n_targets, abs=1e-12)
    if n_key:
        assert res["keyppl,none"] == pytest.approx(math.exp(key_nll / n_key), rel=1e-4)
    else:
        assert math.isnan(res["keyppl,none"])


def test_model_args_merged_into_metadata_are_accepted(any_run):
    """lm-eval merges --model_args into task metadata: pretrained/dtype must not be unknown-key errors."""
    meta = any_run["results"]["configs"][PPL]["metadata"]
    assert meta["pretrained"].endswith("smollm2-135m-instruct") and meta["dtype"] == "float32"
    assert meta["lengths"] == LENGTHS and meta["target_tokens"] == W


# --------------------------------------------------------------------------- group + misalignment


def test_group_runs_both_tasks_with_one_model_load(group_run, ppl_run):
    results = group_run["results"]
    assert sorted(results["group_subtasks"][GROUP]) == sorted([PPL, MIS])
    assert set(results["results"]) >= {PPL, MIS, GROUP}
    assert sorted(group_run["samples"]) == sorted([PPL, MIS])
    assert len(re.findall(r"Initializing hf model", group_run["stderr"])) == 1, "model loaded more than once"
    # the group's metadata carries `pairs` (misalignment only): ppl ignores it, same numbers as alone
    alone, grouped = ppl_run["results"]["results"][PPL], results["results"][PPL]
    for key in ("ppl@64,none", "ppl@256,none", "bpb@256,none", "keyppl,none", "key_frac,none"):
        assert grouped[key] == pytest.approx(alone[key], rel=1e-9, nan_ok=True), key


def test_misalign_results_keys(group_run):
    res = group_run["results"]["results"][MIS]
    for metric in MISALIGN_METRICS:
        for length in LENGTHS:
            key = f"{metric}@{length},none"
            assert key in res and math.isfinite(res[key]), (key, sorted(res))
    assert res["skipped_docs,none"] == 0
    for length in LENGTHS:
        assert res[f"symkl@{length},none"] >= 0 and 0 <= res[f"top1@{length},none"] <= 1
        # sce = KL(p|q) + KL(q|p) + H(p) + H(q) >= symkl
        assert res[f"sce@{length},none"] > res[f"symkl@{length},none"]


def test_misalign_samples_pairs_and_means(group_run):
    samples = group_run["samples"][MIS]
    assert len(samples) == 2
    res = group_run["results"]["results"][MIS]
    values = {(m, n): [] for m in MISALIGN_METRICS for n in LENGTHS}
    for sample in samples:
        response = _response(sample)
        doc_index = response["doc_index"]
        assert doc_index == sample["doc_id"]
        pairs = response["pairs"]
        assert len(pairs) == PAIRS * len(LENGTHS)
        for length in LENGTHS:
            mine = [p for p in pairs if p["long_len"] == length]
            shorts = [p["short_len"] for p in mine]
            assert len(mine) == PAIRS and len(set(shorts)) == PAIRS, mine
            # the documented draw: default_rng([seed, doc_index, L]).choice([ceil(L/2), L), pairs, no replace)
            expected = np.random.default_rng([1234, doc_index, length]).choice(
                np.arange(math.ceil(0.5 * length), length), size=PAIRS, replace=False
            )
            assert shorts == [int(x) for x in expected]
        for pair in pairs:
            assert set(pair) >= {"doc_index", "end", "long_len", "short_len", *MISALIGN_METRICS}, pair
            assert pair["doc_index"] == doc_index and pair["end"] == C
            for metric in MISALIGN_METRICS:
                values[metric, pair["long_len"]].append(pair[metric])
    for (metric, length), logged in values.items():
        assert res[f"{metric}@{length},none"] == pytest.approx(sum(logged) / len(logged), rel=1e-9), (metric, length)


def test_misalign_pairs_match_plain_transformers(group_run, smol, plays):
    """Each logged pair's divergences, recomputed from two plain forwards (float64 here)."""
    model, tok = smol
    for sample in group_run["samples"][MIS]:
        response = _response(sample)
        ids = _doc_ids(tok, plays[response["doc_index"]]["text"])
        long_rows = {}
        for pair in response["pairs"]:
            end = pair["end"]
            if pair["long_len"] not in long_rows:
                long_rows[pair["long_len"]] = plain_token_logprobs(model, ids[end - pair["long_len"] : end])[-1]
            p = long_rows[pair["long_len"]].double()
            q = plain_token_logprobs(model, ids[end - pair["short_len"] : end])[-1].double()
            kl_pq = float((p.exp() * (p - q)).sum())
            kl_qp = float((q.exp() * (q - p)).sum())
            symkl = kl_pq + kl_qp
            sce = float(-(p.exp() * q).sum() - (q.exp() * p).sum())
            tv = float(0.5 * (p.exp() - q.exp()).abs().sum())
            top1 = float(p.argmax() == q.argmax())
            assert pair["symkl"] == pytest.approx(symkl, rel=1e-3, abs=1e-6), pair
            assert pair["sce"] == pytest.approx(sce, rel=1e-4), pair
            assert pair["tv"] == pytest.approx(tv, rel=1e-3, abs=1e-6), pair
            assert pair["top1"] == top1, pair


# --------------------------------------------------------------------------- --include_path


def test_include_path_runs_the_repository_yamls(ppl_run, group_run):
    source = ppl_run["results"]["configs"][PPL]["metadata"]["config_source"]
    assert Path(source).parent == TASK_CONFIGS, source  # the include path's YAML, not the installed one
    installed = group_run["results"]["configs"][PPL]["metadata"]["config_source"]
    assert Path(installed).parent.parts[-3:] == ("lm_eval", "tasks", "longshort"), installed


def test_task_manager_include_path_finds_tasks():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_CONFIGS), include_defaults=False)
    for name in (PPL, MIS, "longshort_ppl_local", "longshort_misalign_pg19"):
        assert name in tm.all_subtasks, name
    for name in (GROUP, "longshort", "longshort_ppl"):
        assert name in tm.all_groups, name
    assert Path(tm.task_index[PPL].yaml_path).parent == TASK_CONFIGS


# --------------------------------------------------------------------------- report / plot


def test_report_prints_the_ppl_values(group_run):
    """Every per-length value with ± its standard error from the results JSON; backend and dtype."""
    out = _run([LONGSHORT, "report", str(group_run["dir"])]).stdout
    res = group_run["results"]["results"]
    for length in LENGTHS:
        row = next(line for line in out.splitlines() if re.match(rf"\s*{length}\s*\|", line))
        for task, metric in ((PPL, "ppl"), (PPL, "bpb"), *((MIS, m) for m in MISALIGN_METRICS)):
            value, error = res[task][f"{metric}@{length},none"], res[task][f"{metric}@{length}_stderr,none"]
            assert isinstance(error, float) and math.isfinite(error), (metric, length, error)
            assert f"{value:.5g}±{error:.2g}" in row.split(), (metric, row, out)
    assert f"ppl@max={res[PPL]['ppl@max,none']:.5g}" in out
    assert out.splitlines()[0].startswith("== smollm2-135m-instruct  [hf, float32]")
    assert "± = standard error over documents (delta method)" in out
    assert "different things" not in out  # one run: nothing to keep apart


def test_two_real_runs_measured_the_same_and_compare(group_run, ppl_run, tmp_path):
    """The ppl task run in the group (installed YAML, group metadata with `pairs`) and alone
    (--include_path) measured the same thing: one group; their paired difference is ~0 and the
    difference between lengths is the reported values' difference."""
    grouped = group_run["results"]["configs"][PPL]["longshort"]["measured"]
    assert grouped == ppl_run["results"]["configs"][PPL]["longshort"]["measured"]
    dirs = [str(group_run["dir"]), str(ppl_run["dir"])]
    assert "different things" not in _run([LONGSHORT, "report", *dirs]).stdout
    csv_path = tmp_path / "cmp.csv"
    _run([LONGSHORT, "compare", *dirs, "--label", "g", "p", "--csv", str(csv_path)])
    with (tmp_path / "cmp_differences.csv").open() as fh:
        diffs = {(r["label"], r["versus"], r["metric"], r["L"], r["versus_L"]): r for r in csv.DictReader(fh)}
    res = group_run["results"]["results"][PPL]
    for length in LENGTHS:
        between = diffs["p", "g", "ppl", str(length), str(length)]
        assert abs(float(between["difference"])) <= 1e-6 * res[f"ppl@{length},none"], between
        assert between["n_docs"] == "2"
    within = diffs["g", "g", "ppl", str(C), str(min(LENGTHS))]
    assert float(within["difference"]) == pytest.approx(
        res[f"ppl@{C},none"] - res[f"ppl@{min(LENGTHS)},none"], rel=1e-9
    )
    assert math.isfinite(float(within["stderr"])) and float(within["stderr"]) > 0


def test_compare_refuses_real_results_with_other_lengths(group_run, tmp_path):
    """The same real results file with its recorded lengths changed to [64, 192] (what a run with
    those lengths records) is refused, naming the key; `plot` draws it in a row of its own."""
    source = next(Path(group_run["dir"]).rglob("results_*.json"))
    data = json.loads(source.read_text())
    for task in (PPL, MIS):
        data["configs"][task]["longshort"]["measured"]["lengths"] = [64, 192]
    other = tmp_path / "other" / "results_2020-01-01T00-00-00.json"
    other.parent.mkdir()
    other.write_text(json.dumps(data))
    proc = subprocess.run(
        [LONGSHORT, "compare", str(group_run["dir"]), str(other)],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and "keys differing: lengths" in proc.stderr, proc.stderr
    assert "with lengths [64, 192]" in proc.stderr and "Traceback" not in proc.stderr
    target = tmp_path / "two_groups.png"
    out = _run([LONGSHORT, "plot", str(group_run["dir"]), str(other), "-o", str(target)]).stdout
    assert "keys differing: lengths" in out
    width, height = _png_size(target)
    assert (width, height) == (round(5.6 * 3 * 120), round(4.6 * 2 * 120))  # ppl, symkl, sce x 2 groups


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png(group_run, tmp_path):
    target = tmp_path / "x.png"
    proc = _run([LONGSHORT, "plot", str(group_run["dir"]), "-o", str(target), "--trained-context", "8192"])
    assert target.is_file() and target.stat().st_size > 1000, proc.stdout
    assert _png_size(target) == (round(5.6 * 3 * 120), round(4.6 * 120))  # one group: one row
