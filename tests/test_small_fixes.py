"""Issue 15's small items, each through real runs of the embedded SmolLM2 (lm-eval's own
simple_evaluate and EvaluationTracker, the `lm-eval-longshort` CLI, a real sweep):

1. `compare` on runs that have perplexity only: values and paired differences, no correlation;
2. `report` says a single document is why there are no standard errors, and shows no ± for
   keyppl when every key token came from one document (the delta method gives 0 there);
3. `compare` on a sweep's runs/ folder labels each run by its sweep run name (`--baseline none`);
4. the tasks honour lm-eval's Task contract: construct_requests(doc=..., ctx=...) without metadata.

Numbers are checked against numpy over the logged per-document records (or the results JSONs).
"""

from __future__ import annotations

import csv
import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from harness_run import INSTALLED_TASKS, evaluate_tasks, response
from sweep_files import run_sweep_cli

from lm_eval_longshort import cli

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
# At these settings document 0 has one key token and document 1 none (checked in the test).
META = {"lengths": [16, 64], "target_tokens": 16}


def save_like_lm_eval(out: dict, folder: Path) -> Path:
    """Write simple_evaluate's output as `lm_eval --output_path folder` does (EvaluationTracker)."""
    from lm_eval.loggers import EvaluationTracker

    results = {k: v for k, v in out.items() if k != "samples"}
    EvaluationTracker(output_path=str(folder)).save_results_aggregated(results=results, samples=out.get("samples"))
    (path,) = folder.rglob("results_*.json")
    return path


def ppl_sums(out: dict, length: int) -> dict[int, tuple[float, float]]:
    """{doc_index: (nll_sum, n_targets)} at ``length``, from the logged per-document records."""
    sums = {}
    for sample in out["samples"][PPL]:
        resp = response(sample)
        (rec,) = [r for r in resp["records"] if r["L"] == length]
        sums[resp["doc_index"]] = (rec["nll_sum"], rec["n_targets"])
    return sums


def paired_ppl(x: dict, y: dict) -> tuple[float, float]:
    """exp(Σa_x/Σb_x) - exp(Σa_y/Σb_y) and its delta-method error over the shared documents,
    written independently: the gradient of D over the four means, with np.cov of the per-document
    vectors (a_x, b_x, a_y, b_y)."""
    docs = sorted(set(x) & set(y))
    m = np.array([[*x[d], *y[d]] for d in docs], dtype=float)
    mean = m.mean(axis=0)
    rx, ry = mean[0] / mean[1], mean[2] / mean[3]
    grad = np.array(
        [math.exp(rx) / mean[1], -math.exp(rx) * rx / mean[1], -math.exp(ry) / mean[3], math.exp(ry) * ry / mean[3]]
    )
    return math.exp(rx) - math.exp(ry), float(np.sqrt(grad @ np.cov(m, rowvar=False) @ grad / len(docs)))


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def run_a(hflm, tmp_path_factory):
    """Perplexity only, 2 plays, float32, lm-eval's standard errors on: (output, results file)."""
    out = evaluate_tasks(hflm, [PPL], META, limit=2, log_samples=True, bootstrap_iters=100)
    return out, save_like_lm_eval(out, tmp_path_factory.mktemp("a"))


@pytest.fixture(scope="module")
def run_b(assets, tmp_path_factory):
    """The same checkpoint in bfloat16 (other numbers, same documents), --bootstrap_iters 0."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.bfloat16).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(assets.model_dir), batch_size=1)
    out = evaluate_tasks(lm, [PPL], META, limit=2, log_samples=True, bootstrap_iters=0)
    return out, save_like_lm_eval(out, tmp_path_factory.mktemp("b"))


# --------------------------------------------------------------------------- 1. compare, perplexity only


def test_compare_two_ppl_only_runs(run_a, run_b, tmp_path, capsys):
    (out_a, file_a), (out_b, file_b) = run_a, run_b
    csv_path = tmp_path / "cmp.csv"
    code = cli.main(["compare", str(file_a), str(file_b), "--label", "f32", "bf16", "--csv", str(csv_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out
    assert "Values (± standard error over documents)" in text
    assert "Paired differences between runs on the same documents" in text
    assert "Paired differences between lengths of one run" in text
    assert "Correlation across runs" not in text and "no run reports misalignment" in text

    # Values: the results JSONs' own numbers, with ± where lm-eval wrote a standard error (run a).
    lines = [line.split() for line in text.splitlines()]
    for label, out in (("f32", out_a), ("bf16", out_b)):
        res = out["results"][PPL]
        for length in META["lengths"]:
            value, se = res[f"ppl@{length},none"], res[f"ppl@{length}_stderr,none"]
            cell = f"{value:.5g}±{se:.2g}" if label == "f32" else f"{value:.5g}"
            assert [label, str(length), cell] in [row[:3] for row in lines], (label, length, cell)
            sums = ppl_sums(out, length)
            a, b = (np.array([s[i] for s in sums.values()]) for i in (0, 1))
            assert value == pytest.approx(math.exp(a.sum() / b.sum()), rel=1e-12)
    assert out_b["results"][PPL]["ppl@64_stderr,none"] == "N/A"  # lm-eval's: bootstrap off

    # Paired differences: numpy over the logged per-document sums of both runs.
    diffs = read_csv(tmp_path / "cmp_differences.csv")
    between = [d for d in diffs if d["label"] != d["versus"]]
    within = [d for d in diffs if d["label"] == d["versus"]]
    assert {(d["label"], d["versus"], d["metric"], d["L"]) for d in between} == {
        ("bf16", "f32", "ppl", str(length)) for length in META["lengths"]
    }
    for d in between:
        length = int(d["L"])
        want, want_se = paired_ppl(ppl_sums(out_b, length), ppl_sums(out_a, length))
        assert int(d["n_docs"]) == 2 and want != 0
        assert float(d["difference"]) == pytest.approx(want, rel=1e-9)
        assert float(d["stderr"]) == pytest.approx(want_se, rel=1e-6) and float(d["stderr"]) > 0
    assert {(d["label"], d["L"], d["versus_L"]) for d in within} == {("f32", "64", "16"), ("bf16", "64", "16")}
    for d in within:
        out = out_a if d["label"] == "f32" else out_b
        want, want_se = paired_ppl(ppl_sums(out, 64), ppl_sums(out, 16))
        assert float(d["difference"]) == pytest.approx(want, rel=1e-9)
        assert float(d["stderr"]) == pytest.approx(want_se, rel=1e-6)
        printed = [row for row in lines if row[:5] == [d["label"], d["label"], "ppl", "64", "16"]]
        assert printed and printed[0][5] == f"{want:.5g}"
    assert read_csv(tmp_path / "cmp_correlations.csv") == []  # header only: nothing to correlate


# --------------------------------------------------------------------------- 2. report: n = 1, keyppl


def test_report_names_one_document_as_why_there_is_no_stderr(hflm, tmp_path, capsys):
    meta = {**META, "pairs": 1}
    out = evaluate_tasks(hflm, [PPL, MIS], meta, limit=1, bootstrap_iters=100)  # errors asked for
    assert out["results"][PPL]["ppl@64_stderr,none"] == "N/A"  # ... but one document has none
    assert out["results"][MIS]["symkl@64_stderr,none"] == "N/A"
    assert out["results"][PPL]["documents,none"] == 1
    save_like_lm_eval(out, tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "(no standard errors: only 1 document scored; a standard error over documents needs at least 2)" in text
    assert "bootstrap_iters" not in text and "±" not in text


def test_report_names_bootstrap_off_when_documents_suffice(run_b, capsys):
    assert cli.main(["report", str(run_b[1])]) == 0
    text = capsys.readouterr().out
    assert "lm_eval ran with --bootstrap_iters 0" in text and "needs at least 2" not in text


def test_keyppl_from_one_document_has_no_stderr(run_a, capsys):
    out, path = run_a
    keys = {response(s)["doc_index"]: response(s)["key_tokens"] for s in out["samples"][PPL]}
    with_keys = [d for d, k in keys.items() if k["n_key"] > 0]
    assert len(keys) == 2 and len(with_keys) == 1, keys  # the case of the issue
    (key,) = [keys[d] for d in with_keys]
    res = out["results"][PPL]
    assert res["keyppl,none"] == pytest.approx(math.exp(key["key_nll_sum"] / key["n_key"]), rel=1e-12)
    # The delta method gives exactly 0 here (every residual is 0); that is no error bar.
    assert math.isnan(res["keyppl_stderr,none"])
    assert res["key_frac_stderr,none"] > 0  # key_frac has one: both documents have targets
    assert cli.main(["report", str(path)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ppl_shakespeare:")]
    assert f"keyppl={res['keyppl,none']:.5g} (no standard error: key tokens in 1 document only)" in line
    assert "keyppl=" in line and "±0 " not in line and "key_frac=" in line and "±" in line.split("key_frac=")[1]


def test_keyppl_zero_stderr_in_an_older_file_is_not_shown(run_a, tmp_path, capsys):
    """A results file written before the fix holds keyppl_stderr = 0.0: report must not print ±0."""
    data = json.loads(run_a[1].read_text(encoding="utf-8"))
    data["results"][PPL]["keyppl_stderr,none"] = 0.0
    older = tmp_path / "results_2025-01-01T00-00-00.json"
    older.write_text(json.dumps(data), encoding="utf-8")
    assert cli.main(["report", str(older)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ppl_shakespeare:")]
    assert "(no standard error: key tokens in 1 document only)" in line and "±0 " not in line


# --------------------------------------------------------------------------- 3. a sweep's runs/ folder


def test_compare_labels_sweep_runs_by_run_name(assets, tmp_path, capsys):
    sweep = {
        "name": "labels",
        "base": "embedded",
        "device": "cpu",
        "model_args": {"dtype": "float32", "batch_size": 1, "max_length": 128},
        "tasks": [PPL],
        "metadata": {"lengths": [32, 64], "target_tokens": 16},
        "samples": [0, 1],
        "bootstrap_iters": 10,
        "runs": [
            {"name": "none"},  # the base model as is: its folder is the embedded model's
            {"name": "yarn", "rope": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 32}},
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False), encoding="utf-8")
    proc = run_sweep_cli(str(path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs_dir = tmp_path / "out" / "runs"
    files = {p.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in runs_dir.rglob("results_*.json")}
    assert {name: data["longshort_sweep"]["run"] for name, data in files.items()} == {"none": "none", "yarn": "yarn"}
    base_model = Path(files["none"]["config"]["model_args"]["pretrained"]).name
    assert base_model != "none"  # what the label used to be

    csv_path = tmp_path / "cmp.csv"
    code = cli.main(["compare", str(runs_dir), "--baseline", "none", "--csv", str(csv_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    runs_table = captured.out.split("\n\n")[0]
    assert {line.split()[0] for line in runs_table.splitlines()[3:]} == {"none", "yarn"}
    assert base_model not in runs_table.replace(str(runs_dir), "")
    between = [d for d in read_csv(tmp_path / "cmp_differences.csv") if d["label"] != d["versus"]]
    assert {(d["label"], d["versus"], d["L"]) for d in between} == {("yarn", "none", "32"), ("yarn", "none", "64")}
    for d in between:  # the paired difference's value is the difference of the reported values
        key = f"ppl@{d['L']},none"
        want = files["yarn"]["results"][PPL][key] - files["none"]["results"][PPL][key]
        assert float(d["difference"]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert float(next(d for d in between if d["L"] == "64")["difference"]) != 0  # 64 lies past YaRN's window


# --------------------------------------------------------------------------- 4. lm-eval's Task contract


@pytest.fixture(scope="module")
def task_objects():
    """The installed tasks as lm-eval's tests build them (a TaskManager loads them by name)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(INSTALLED_TASKS), include_defaults=False)
    return list(tm.load([PPL, MIS])["tasks"].values())


def test_construct_requests_without_metadata_as_lm_eval_tests_call_it(task_objects):
    """lm-eval's tests/test_tasks.py: construct_requests(doc=doc, ctx=task.doc_to_text(doc)) for the
    first `limit` docs of test_docs() (else validation_docs()), no metadata."""
    from lm_eval.api.instance import Instance

    limit = 10
    assert {t.config.task for t in task_objects} == {PPL, MIS}
    for task in task_objects:
        docs = (
            list(islice(task.test_docs(), limit))
            if task.has_test_docs()
            else list(islice(task.validation_docs(), limit))
        )
        texts = [task.doc_to_text(doc) for doc in docs]
        assert all(isinstance(x, str) for x in texts)
        requests = [task.construct_requests(doc=doc, ctx=task.doc_to_text(doc)) for doc in docs]
        assert len(requests) == limit
        for i, (doc, req) in enumerate(zip(docs, requests)):
            assert isinstance(req, Instance)
            assert (
                (req.task_name, req.doc_id, req.repeats)
                == (task.config.task, doc["doc_index"], 1)
                == (
                    task.config.task,
                    i,
                    1,
                )
            )
        # The same request as lm-eval's evaluator builds (it passes metadata=(task, doc_id, repeats)).
        task.build_all_requests(rank=0, limit=limit, world_size=1)
        built = sorted(task.instances, key=lambda r: r.doc_id)
        assert [r.arguments for r in built] == [r.arguments for r in requests]
        assert [r.request_type for r in built] == [r.request_type for r in requests]
