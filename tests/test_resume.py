"""Per-document resume through lm-eval's --use_cache database.

* The real `lm_eval` CLI is killed (SIGKILL) after some documents are committed; the rerun
  scores only the rest (counted from the plugin's log line and the database, not timed), and its
  numbers equal an uninterrupted run's exactly. Its --log_samples output is JSON all the way down.
* Through lm-eval's API: the same model, settings and texts hit the cache; another setting, text
  or dtype misses.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lm_eval
import pytest
import torch
from harness_run import INSTALLED_TASKS as INSTALLED
from lm_eval.tasks import TaskManager
from offline import offline_env

BIN = Path(sys.executable).parent
PPL, PPL_LOCAL = "longshort_ppl_shakespeare", "longshort_ppl_local"
N_DOCS = 5
# batch_tokens below one document's inputs ((128 + 32) + (256 + 32) tokens): every document is its
# own scoring chunk.
META = {"lengths": [128, 256], "target_tokens": 32, "batch_tokens": 256}
RESUMED = re.compile(r"(\d+) of (\d+) documents resumed from the --use_cache database, (\d+) to score")


def _command(model_args: str, cache: Path, out: Path) -> list[str]:
    return [
        str(BIN / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        model_args,
        "--tasks",
        PPL,
        "--limit",
        str(N_DOCS),
        "--metadata",
        json.dumps(META),
        "--use_cache",
        str(cache),
        "--output_path",
        str(out),
        "--log_samples",
    ]


def _stored(cache: Path) -> int:
    """Documents committed to the --use_cache file (the plugin's own table, JSON text)."""
    db = Path(f"{cache}_rank0.db")
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM longshort_documents").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet, or locked for a moment
        return 0


def _run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _results(out: Path) -> tuple[dict, list[dict]]:
    (path,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{PPL}_*.jsonl")
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(path.read_text())["results"][PPL], lines


@pytest.fixture(scope="module")
def model_args(assets) -> str:
    return subprocess.run(
        [str(BIN / "lm-eval-longshort"), "model-args"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_killed_run_resumes_per_document_with_identical_numbers(model_args, tmp_path):
    cache = tmp_path / "cache" / "smol"
    proc = subprocess.Popen(
        _command(model_args, cache, tmp_path / "killed"),
        env=offline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while _stored(cache) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _stored(cache)
    assert 1 <= committed < N_DOCS, f"kill did not land mid-run ({committed} of {N_DOCS} stored)"

    resumed = _run(_command(model_args, cache, tmp_path / "resumed"))
    match = RESUMED.search(resumed.stderr)
    assert match, resumed.stderr[-3000:]
    assert [int(g) for g in match.groups()] == [committed, N_DOCS, N_DOCS - committed]
    assert _stored(cache) == N_DOCS

    fresh = _run(_command(model_args, tmp_path / "cache" / "fresh", tmp_path / "fresh"))
    assert RESUMED.search(fresh.stderr).groups() == ("0", str(N_DOCS), str(N_DOCS))
    got, got_samples = _results(tmp_path / "resumed")
    want, want_samples = _results(tmp_path / "fresh")
    assert got == want  # every metric and standard error, exactly
    assert got["documents,none"] == N_DOCS
    # --log_samples: valid JSON all the way down, and the same per-document records.
    got_docs = sorted((json.loads(s["resps"][0][0]) for s in got_samples), key=lambda r: r["doc_index"])
    want_docs = sorted((json.loads(s["resps"][0][0]) for s in want_samples), key=lambda r: r["doc_index"])
    assert got_docs == want_docs and len(got_docs) == N_DOCS


# --------------------------------------------------------------------------- hits and misses (API)


def _to_score(caplog, lm, tasks: list[str], meta: dict, cache: Path) -> list[tuple[int, int, int]]:
    """(resumed, usable, to score) per task, from one simple_evaluate with --use_cache."""
    tm = TaskManager(include_path=str(INSTALLED), include_defaults=False, metadata=meta)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lm_eval_longshort"):
        lm_eval.simple_evaluate(
            model=lm, tasks=tasks, limit=None, task_manager=tm, use_cache=str(cache), bootstrap_iters=0
        )
    return [
        tuple(int(g) for g in RESUMED.search(r.getMessage()).groups())
        for r in caplog.records
        if RESUMED.search(r.getMessage())
    ]


@pytest.fixture(scope="module")
def two_files(plays, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("resume_docs")
    paths = []
    for i in (4, 5):
        path = folder / f"play{i}.txt"
        path.write_text(plays[i]["text"][:6000], encoding="utf-8")
        paths.append(path)
    return paths


def test_same_inputs_hit_and_any_change_misses(hflm, smol, two_files, tmp_path, caplog):
    from lm_eval.models.huggingface import HFLM

    cache = tmp_path / "db"
    # batch_tokens=100: each document is its own scoring (and commit) chunk.
    meta = {"files": [str(p) for p in two_files], "lengths": [32, 64], "target_tokens": 16, "batch_tokens": 100}
    assert _to_score(caplog, hflm, [PPL_LOCAL], meta, cache) == [(0, 2, 2)]
    assert _to_score(caplog, hflm, [PPL_LOCAL], meta, cache) == [(2, 2, 0)]
    # batch_tokens changes speed, not numbers: still a hit (here both documents form one chunk).
    assert _to_score(caplog, hflm, [PPL_LOCAL], {**meta, "batch_tokens": 4096}, cache) == [(2, 2, 0)]
    # Another setting that changes numbers: a miss.
    assert _to_score(caplog, hflm, [PPL_LOCAL], {**meta, "target_tokens": 17}, cache) == [(0, 2, 2)]
    # One document's text changes: only that document is scored again.
    two_files[1].write_text(two_files[1].read_text() + " And one more line.", encoding="utf-8")
    assert _to_score(caplog, hflm, [PPL_LOCAL], meta, cache) == [(1, 2, 1)]
    # The same weights in another dtype: a different model.
    model, tokenizer = smol
    bf16 = HFLM(pretrained=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tokenizer, max_length=4096, batch_size=1)
    assert _to_score(caplog, bf16, [PPL_LOCAL], meta, cache) == [(0, 2, 2)]
