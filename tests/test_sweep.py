"""`lm-eval-longshort sweep`: runs, report, restart after a real kill, RoPE variants, bad input.

Real parts only: the embedded SmolLM2 through lm-eval's own simple_evaluate (hf backend),
tiny lengths (32, 64) on two plays, perplexity and (renamed) `last` misalignment. The reference
sweep has three runs: the model as is, a YaRN variant whose "trained window" is overridden to
32 tokens (so L = 64 lies beyond it), and a run whose max_length is too small, which must fail
without stopping the sweep.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from offline import offline_env
from scipy import stats

from lm_eval_longshort import reporting
from lm_eval_longshort.sweep import SweepError, load_sweep, report, variants

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [32, 64]
TASKS = [
    "longshort_ppl_shakespeare",
    {"task": "longshort_misalign_shakespeare", "as": "longshort_misalign_last", "metadata": {"mode": "last"}},
]
PPL_TASK, MIS_TASK = "longshort_ppl_shakespeare", "longshort_misalign_last"
YARN_32 = {"type": "yarn", "factor": 2, "original_max_position_embeddings": 32}


def sweep_yaml(folder: Path, **changes) -> Path:
    """The reference sweep file (three runs), with top-level ``changes``."""
    data = {
        "name": "tiny",
        "base": "embedded",
        "device": "cpu",
        "model_args": {"dtype": "float32", "batch_size": 1, "max_length": 128},
        "tasks": TASKS,
        "metadata": {"lengths": LENGTHS, "target_tokens": 16, "pairs": 1, "seed": 7},
        "samples": [0, 1],
        "bootstrap_iters": 10,
        "runs": [
            {"name": "base"},
            {"name": "yarn", "rope": YARN_32},
            {"name": "too_short", "model_args": {"max_length": 40}},
        ],
        **changes,
    }
    path = folder / "sweep.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


ENV = offline_env()


def _sweep_cli(path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lm_eval_longshort.cli", "sweep", str(path), "--output", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets):
    """An uninterrupted sweep through the CLI (a process like the interrupted one, so float
    reductions run on the same threads): (completed process, output folder)."""
    folder = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(
        _sweep_cli(sweep_yaml(folder), folder / "out"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return proc, folder / "out"


def results_json(out: Path, run: str) -> dict:
    (path,) = sorted((out / "runs" / run).glob("results_*.json"))
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- the two finished runs


def test_failed_run_is_recorded_and_the_others_finish(reference):
    proc, out = reference
    assert proc.returncode == 1, proc.stderr[-3000:]  # one run failed; the others finished
    assert "run 2/3 yarn: finished" in proc.stdout and "run 3/3 too_short: FAILED" in proc.stdout
    assert f"[sweep] report: {out / 'report' / 'report.md'}" in proc.stdout
    failure = json.loads((out / "runs" / "too_short" / "failed.json").read_text())
    assert "max_length" in failure["error"] or "window" in failure["error"]
    assert not list((out / "runs" / "too_short").glob("results_*.json"))
    text = (out / "report" / "report.md").read_text()
    assert "**too_short failed**" in text and "| too_short |" in text


def test_report_tables_equal_the_results_json(reference):
    """Every CSV value and stderr, and every Markdown cell, is the runs' own results JSON number."""
    _, out = reference
    rows = read_csv(out / "report" / "values.csv")
    checked = 0
    text = (out / "report" / "report.md").read_text()
    for row in rows:
        if not row["L"]:
            continue
        results = results_json(out, row["run"])["results"][row["task"]]
        key = f"{row['metric']}@{row['L']}"
        assert float(row["value"]) == results[f"{key},none"]
        assert float(row["stderr"]) == pytest.approx(results[f"{key}_stderr,none"], rel=0, abs=0)
        if row["metric"] in ("ppl", "symkl"):
            cell = f"{results[f'{key},none']:.5g}±{results[f'{key}_stderr,none']:.2g}"
            assert f"| {cell} |" in text or f"| {cell}" in text
        checked += 1
    # 2 runs x (ppl: ppl, bpb; misalign: symkl sce js tv top1) x 2 lengths
    assert checked == 2 * (2 + 5) * len(LENGTHS)
    base, yarn = results_json(out, "base"), results_json(out, "yarn")
    # L = 32 is inside the overridden window... YaRN still rescales low frequencies, but L = 64 lies
    # beyond it: the variant must change the numbers there.
    assert (
        base["results"]["longshort_ppl_shakespeare"]["ppl@64,none"]
        != yarn["results"]["longshort_ppl_shakespeare"]["ppl@64,none"]
    )
    assert Path(yarn["config"]["model_args"]["pretrained"]).parent.name == "models"


def numpy_intervals(x, y) -> dict[str, tuple[float, float]]:
    """The documented bootstrap over runs, written here with numpy: draws
    ``default_rng(seed).integers(0, n, (draws, n))``, a draw with a constant side left out, the
    2.5 and 97.5 percentiles; NaN bounds below 3 runs or with fewer than half the draws usable."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    nan = (math.nan, math.nan)
    if len(x) < 3:
        return {"pearson": nan, "spearman": nan}
    idx = np.random.default_rng(report.BOOTSTRAP_SEED).integers(0, len(x), size=(report.BOOTSTRAP_DRAWS, len(x)))
    pearsons, spearmans = [], []
    for row in idx:
        a, b = x[row], y[row]
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            pearsons.append(np.corrcoef(a, b)[0, 1])
            spearmans.append(np.corrcoef(stats.rankdata(a), stats.rankdata(b))[0, 1])
    if len(pearsons) < report.BOOTSTRAP_DRAWS / 2:
        return {"pearson": nan, "spearman": nan}
    return {
        "pearson": tuple(np.percentile(pearsons, [2.5, 97.5])),
        "spearman": tuple(np.percentile(spearmans, [2.5, 97.5])),
    }


def test_correlations_equal_a_direct_computation(reference):
    _, out = reference
    rows = read_csv(out / "report" / "correlations.csv")
    # symkl and sce at each L, against ppl at the same L and at the longest L
    assert sorted((r["task"], r["metric"], r["L"], r["versus"]) for r in rows) == sorted(
        (MIS_TASK, metric, str(L), versus)
        for metric in ("symkl", "sce")
        for L in LENGTHS
        for versus in ("ppl@L", f"ppl@{max(LENGTHS)}")
    )
    for row in rows:
        L = int(row["L"])
        ppl_at = L if row["versus"] == "ppl@L" else int(row["versus"].split("@")[1])
        x, y = [], []
        for run in ("base", "yarn"):
            res = results_json(out, run)["results"]
            x.append(res[row["task"]][f"{row['metric']}@{L},none"])
            y.append(res["longshort_ppl_shakespeare"][f"ppl@{ppl_at},none"])
        assert int(row["n"]) == 2
        expected_r = stats.pearsonr(x, y).statistic if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
        expected_rho = stats.spearmanr(x, y).statistic if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
        got_r = float(row["pearson"]) if row["pearson"] else math.nan
        got_rho = float(row["spearman"]) if row["spearman"] else math.nan
        assert got_r == pytest.approx(expected_r, nan_ok=True, abs=1e-12)
        assert got_rho == pytest.approx(expected_rho, nan_ok=True, abs=1e-12)
        # Two runs: no interval (resampling 2 points can only give +-1); every bound is written "nan".
        assert [row[k] for k in ("pearson_lo", "pearson_hi", "spearman_lo", "spearman_hi")] == ["nan"] * 4


def test_correlation_csv_intervals_equal_numpy_resampling(reference, tmp_path):
    """With 4 runs the CSV's interval bounds are numbers, equal to numpy's resampling of the values in
    the results files: the sweep's two runs and two copies of the base run whose ppl and misalignment
    values are rescaled by different factors, through load_runs, correlation_rows and correlations_csv."""
    _, out = reference
    files = {run: next((out / "runs" / run).glob("results_*.json")) for run in ("base", "yarn")}
    for name, factors in (("c", {PPL_TASK: 1.1, MIS_TASK: 1.3}), ("d", {PPL_TASK: 0.95, MIS_TASK: 1.2})):
        data = results_json(out, "base")
        for task, factor in factors.items():
            res = data["results"][task]
            for key in [k for k in res if "@" in k and k.endswith(",none") and "_stderr" not in k]:
                res[key] *= factor
        files[name] = tmp_path / name / "results_2026-01-01T00-00-00.json"
        files[name].parent.mkdir()
        files[name].write_text(json.dumps(data), encoding="utf-8")
    results = {name: json.loads(path.read_text(encoding="utf-8"))["results"] for name, path in files.items()}
    runs = reporting.load_runs(list(files.values()), labels=list(files))
    text = report.correlations_csv(report.correlation_rows(runs, MIS_TASK, PPL_TASK))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 * 2 * len(LENGTHS)
    for row in rows:
        L = int(row["L"])
        ppl_at = L if row["versus"] == "ppl@L" else int(row["versus"].split("@")[1])
        x = [results[name][MIS_TASK][f"{row['metric']}@{L},none"] for name in files]
        y = [results[name][PPL_TASK][f"ppl@{ppl_at},none"] for name in files]
        assert row["n"] == "4" and row["runs"] == "base yarn c d"
        want = numpy_intervals(x, y)
        for name in ("pearson", "spearman"):
            lo, hi = float(row[f"{name}_lo"]), float(row[f"{name}_hi"])
            assert all(map(math.isfinite, want[name])) and want[name][0] < want[name][1], (row, want)
            assert (lo, hi) == pytest.approx(want[name], abs=1e-10), (name, row)


def test_bootstrap_interval_equals_numpy_resampling():
    """The interval over runs, recomputed here with numpy (same seed and draw layout)."""
    x = np.array([0.01, 0.05, 0.02, 0.4, 0.9, 0.3])
    y = np.array([20.0, 22.0, 21.5, 35.0, 80.0, 30.0])
    n, r, rho, ci = report.correlate(x, y)
    assert n == 6
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert rho == pytest.approx(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1], abs=1e-12)
    want = numpy_intervals(x, y)
    assert all(math.isfinite(v) for bounds in want.values() for v in bounds)
    assert ci["pearson"] == pytest.approx(want["pearson"], abs=1e-10)
    assert ci["spearman"] == pytest.approx(want["spearman"], abs=1e-10)


def test_plots_and_report_files(reference):
    _, out = reference
    for name in ("ppl_vs_length.png", "misalignment_vs_length.png", "misalignment_vs_ppl.png"):
        assert (out / "report" / name).stat().st_size > 10_000
        assert f"]({name})" in (out / "report" / "report.md").read_text()


# --------------------------------------------------------------------------- interrupted and restarted


def _cache_rows(db: Path) -> int:
    """Documents committed to the run's --use_cache file (0 while it does not exist or is locked)."""
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
            return con.execute("SELECT COUNT(*) FROM longshort_documents").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_sweep_restarts_without_recomputing(tmp_path, reference, assets):
    """SIGKILL once run 1 finished and run 2 committed documents; the restart skips run 1, resumes
    run 2 from its cache, and ends with the same report as the uninterrupted sweep."""
    path, out = sweep_yaml(tmp_path), tmp_path / "out"
    proc = subprocess.Popen(
        _sweep_cli(path, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    try:
        while _cache_rows(out / "cache" / "yarn_rank0.db") < 1:
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "run 2 never committed a document"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    (first,) = list((out / "runs" / "base").glob("results_*.json"))
    before = first.read_bytes()
    assert not list((out / "runs" / "yarn").glob("results_*.json"))
    committed = _cache_rows(out / "cache" / "yarn_rank0.db")

    again = subprocess.run(
        _sweep_cli(path, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False
    )
    log = again.stdout + again.stderr
    assert again.returncode == 1, log  # too_short fails again, as in the reference
    assert "run 1/3 base: already finished, skipped" in log
    assert "run 1/3 base: starting" not in log
    assert [p.name for p in (out / "runs" / "base").glob("results_*.json")] == [first.name]
    assert first.read_bytes() == before
    resumed = [line.split("documents resumed")[0] for line in log.splitlines() if "documents resumed" in line]
    counts = [int(part.split(" of ")[0].rsplit(" ", 1)[-1]) for part in resumed]
    # the yarn run's 2 tasks: the committed documents are not scored again
    assert sum(counts[:2]) == committed >= 1, log
    ref_out = reference[1]
    assert (out / "report" / "report.md").read_text() == (ref_out / "report" / "report.md").read_text()
    assert (out / "report" / "values.csv").read_text() == (ref_out / "report" / "values.csv").read_text()


# --------------------------------------------------------------------------- variants


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


def test_variant_folder_changes_positions_beyond_the_window(tmp_path, assets, smol, plays):
    """Dynamic NTK with the window overridden to 32: equal to the base inside it, different beyond,
    and equal to an independent transformers model built with the same RoPE config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base_model, tokenizer = smol
    ids = torch.tensor([tokenizer(plays[0]["text"][:2000])["input_ids"][:80]])
    variant = variants.make_variant(
        str(assets.model_dir), rope={"type": "dynamic", "factor": 2, "original_max_position_embeddings": 32}
    )
    folder = variant.materialise(tmp_path / "dyn")
    assert (folder / "model.safetensors").is_symlink()
    assert (folder / "model.safetensors").resolve() == (assets.model_dir / "model.safetensors").resolve()
    assert not (folder / "config.json").is_symlink() and (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inside = _logits(model, ids[:, :32])
    assert torch.equal(inside, _logits(base_model, ids[:, :32]))
    beyond = _logits(model, ids)
    assert (beyond[40:] - _logits(base_model, ids)[40:]).abs().max() > 1e-2

    config = AutoConfig.from_pretrained(assets.model_dir)
    config.max_position_embeddings = 32
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": config.rope_parameters["rope_theta"]}
    independent = AutoModelForCausalLM.from_pretrained(assets.model_dir, config=config, dtype=torch.float32).eval()
    torch.testing.assert_close(beyond, _logits(independent, ids), rtol=0, atol=1e-5)


def test_yarn_variant_equals_an_independent_model(tmp_path, assets, smol, plays):
    from transformers import AutoConfig, AutoModelForCausalLM

    base_model, tokenizer = smol
    ids = torch.tensor([tokenizer(plays[1]["text"][:2000])["input_ids"][:80]])
    folder = variants.make_variant(str(assets.model_dir), rope=YARN_32).materialise(tmp_path / "yarn")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got = _logits(model, ids)
    assert (got[40:] - _logits(base_model, ids)[40:]).abs().max() > 1e-2
    config = AutoConfig.from_pretrained(assets.model_dir)
    config.max_position_embeddings = 64
    config.rope_parameters = {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 32,
        "rope_theta": config.rope_parameters["rope_theta"],
    }
    independent = AutoModelForCausalLM.from_pretrained(assets.model_dir, config=config, dtype=torch.float32).eval()
    torch.testing.assert_close(got, _logits(independent, ids), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad input, before any model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lenghts": [32]}, "unknown key 'lenghts'"),
        ({"runs": [{"name": "a", "rop": YARN_32}]}, "unknown key 'rop' (did you mean 'rope'?)"),
        (
            {"runs": [{"name": "a", "model_args": {"pretrained": "/nonexistent/model"}, "base": None}]},
            "/nonexistent/model: no such folder",
        ),
        (
            {"runs": [{"name": "a", "overrides": {"max_position_embedding": 64}}]},
            "overrides ['max_position_embedding']: not keys of",
        ),
        (
            {"runs": [{"name": "a", "overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}}]},
            "reads RoPE scaling from 'rope_parameters'",
        ),
        ({"tasks": ["longshort_ppl_shakespear"]}, "no lm-eval task named 'longshort_ppl_shakespear'"),
        ({"runs": [{"name": "a"}, {"name": "a", "rope": YARN_32}]}, "two runs are named 'a'"),
        ({"metadata": {"lengths": [32], "pairz": 2}}, "unknown metadata key(s) ['pairz']"),
        (
            {"model_args": {"dtype": "float32", "max_lenght": 128}},
            "unknown model argument 'max_lenght' (did you mean 'max_length'?)",
        ),
        ({"samples": [0, 999]}, "document index 999 out of range for longshort_ppl_shakespeare"),
        ({"runs": [{"name": "nl\n"}]}, "run 'nl\\n': the run name names folders"),
        (
            {"runs": [{"name": "a", "rope": {**YARN_32, "factor": math.nan}}]},
            "run 'a': rope.factor must be a finite number >= 1, got nan",
        ),
    ],
)
def test_bad_sweeps_fail_before_any_model_loads(tmp_path, assets, change, message, capsys):
    from lm_eval_longshort import cli

    path = sweep_yaml(tmp_path, **change)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert message in str(info.value)
    code = cli.main(["sweep", str(path), "--output", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was run or written
