"""One sweep folder, many workers, nothing foreign: claims, recorded plans, local workers, take-over.

* Claims (sweep/claims.py) between real processes: one holder at a time, a dead holder's
  claim taken over, a live one respected, a stale heartbeat on "another host" taken over.
* Two sweeps with different lengths on one folder: the second is refused naming the key; a
  finished run's results copied into a new folder and reported with another plan: refused.
* docs/scaling.md's recipes with local stand-ins: the one-node command (`--workers 2`, which starts
  two identical plain sweep commands at the same moment): each run computed once, one results file
  per run, and the report equals a single worker's; the SLURM batch script as two array tasks, one
  killed with SIGKILL mid-run: the other takes its run over; same numbers.
* A corrupt run cache: the run's failed.json says so in one line naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doc_blocks import scaling_recipe
from sweep_files import ENV, ROOT, results_files, run_sweep_cli, sweep_command, sweep_file

from lm_eval_longshort.sweep import claims


@pytest.fixture(scope="module")
def finished(tmp_path_factory, assets) -> tuple[Path, Path]:
    """(sweep file, output folder) of one finished three-run sweep."""
    folder = tmp_path_factory.mktemp("finished")
    path = sweep_file(folder)
    proc = run_sweep_cli(str(path), "--output", str(folder / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return path, folder / "out"


# --------------------------------------------------------------------------- claims


_HOLD = """
import sys, time
from lm_eval_longshort.sweep import claims
claim = claims.try_claim(sys.argv[1], plan="p", stale_after=float(sys.argv[2]))
print("held" if claim else "refused", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _holder(path: Path, stale_after: float, sleep: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(stale_after), str(sleep)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_claim_is_respected_and_a_dead_one_taken_over(tmp_path):
    path = tmp_path / "claims" / "run.claim"
    holder = _holder(path, stale_after=600, sleep=600)
    try:
        assert claims.try_claim(path, stale_after=600) is None  # the holder runs
        assert claims.holder(path)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    taken = claims.try_claim(path, stale_after=600)  # its process is gone: taken over at once
    assert taken is not None and taken.held()
    assert claims.holder(path)["pid"] == os.getpid()
    assert claims.try_claim(path, stale_after=600) is None  # now this process holds it
    taken.release()
    assert not path.exists()


def test_another_hosts_claim_is_taken_over_only_without_heartbeat(tmp_path):
    path = tmp_path / "run.claim"
    path.write_text(json.dumps({"host": socket.gethostname() + "-elsewhere", "pid": 1, "token": "t"}))
    assert claims.try_claim(path, stale_after=60) is None  # fresh heartbeat: respected
    old = time.time() - 120
    os.utime(path, (old, old))
    taken = claims.try_claim(path, stale_after=60)
    assert taken is not None and claims.holder(path)["token"] == taken.token
    taken.release()


def test_the_holder_keeps_its_claim_fresh(tmp_path):
    path = tmp_path / "run.claim"
    claim = claims.try_claim(path, stale_after=0.4)
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 30  # the heartbeat (every 0.1 s) touches it again; generous under load
    while path.stat().st_mtime < old + 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > old + 50 and claims.is_stale(path, stale_after=60) is False
    claim.release()


def test_only_one_of_many_simultaneous_claimers_wins(tmp_path):
    path = tmp_path / "run.claim"
    script = (
        "import sys, time; from lm_eval_longshort.sweep import claims; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
        "c = claims.try_claim(sys.argv[1]); print(int(c is not None), flush=True); time.sleep(2)"
    )
    start = time.time() + 2.0
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    wins = [int(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert sum(wins) == 1, wins


# --------------------------------------------------------------------------- plans


def test_another_plan_on_the_same_folder_is_refused_naming_the_key(finished, tmp_path):
    _, out = finished
    before = {run: results_files(out, run) for run in ("base", "yarn", "linear")}
    other = sweep_file(tmp_path / "other", lengths=(32, 96))
    proc = run_sweep_cli(str(other), "--output", str(out))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "metadata.lengths" in proc.stderr and "runs/base" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {run: results_files(out, run) for run in ("base", "yarn", "linear")} == before  # nothing recomputed
    report_only = run_sweep_cli(str(other), "--output", str(out), "--report-only")
    assert report_only.returncode == 2 and "metadata.lengths" in report_only.stderr


def test_results_copied_elsewhere_are_not_reported_under_another_plan(finished, tmp_path):
    path, out = finished
    copy = tmp_path / "copy"
    shutil.copytree(out / "runs", copy / "runs")
    other = sweep_file(tmp_path / "other", lengths=(32, 96))
    proc = run_sweep_cli(str(other), "--output", str(copy), "--report-only")
    assert proc.returncode == 2 and "metadata.lengths" in proc.stderr, proc.stderr[-2000:]
    assert not (copy / "report").exists()
    same = run_sweep_cli(str(path), "--output", str(copy), "--report-only")  # the plan that computed them
    assert same.returncode == 0, same.stderr[-2000:]
    assert (copy / "report" / "values.csv").read_text() == (out / "report" / "values.csv").read_text()


def test_a_results_file_without_a_plan_is_foreign(finished, tmp_path):
    path, out = finished
    copy = tmp_path / "copy"
    shutil.copytree(out / "runs", copy / "runs")
    (result,) = results_files(copy, "base")
    data = json.loads(result.read_text())
    del data["longshort_sweep"]
    result.write_text(json.dumps(data))
    proc = run_sweep_cli(str(path), "--output", str(copy), "--report-only")
    assert proc.returncode == 2 and "records no sweep plan" in proc.stderr


def test_corrupt_run_cache_fails_the_run_with_one_line_naming_it(assets, tmp_path):
    path = sweep_file(tmp_path, runs=("base",))
    out = tmp_path / "out"
    cache = out / "cache" / "base_rank0.db"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"SQLite format 3\x00" + b"\x07" * 5000)  # a header, then garbage
    proc = run_sweep_cli(str(path), "--output", str(out))
    assert proc.returncode == 1
    error = json.loads((out / "runs" / "base" / "failed.json").read_text())["error"]
    assert "\n" not in error and str(cache) in error and "delete it" in error
    assert "FAILED after" in proc.stdout and str(cache) in proc.stdout


# --------------------------------------------------------------------------- several workers


def stand_in(command: str, sweep: Path, out: Path) -> str:
    """A recipe's command on the test's tiny sweep and folder, through this checkout's CLI."""
    cli = shlex.join(sweep_command())  # python -m lm_eval_longshort.cli sweep
    command = re.sub(r"lm-eval-longshort sweep leaderboard\.yaml", f"{cli} {shlex.quote(str(sweep))}", command)
    return re.sub(r"--output \S+", f"--output {shlex.quote(str(out))}", command)


def test_the_node_recipe_gives_the_one_worker_report(finished, tmp_path):
    """docs/scaling.md's one-node command, with --workers 2 and no --gpus (no GPU here): each run
    computed once by one of two workers started at the same moment, and the single worker's report."""
    path, reference = finished
    out = tmp_path / "out"
    (command,) = scaling_recipe("One multi-GPU node").strip().splitlines()
    assert "--workers 8 --gpus 0,1,2,3,4,5,6,7" in command
    command = stand_in(command, path, out).replace("--workers 8 --gpus 0,1,2,3,4,5,6,7", "--workers 2")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[worker 0]" in proc.stdout and "[worker 1]" in proc.stdout
    for i, run in enumerate(("base", "yarn", "linear"), 1):
        assert proc.stdout.count(f"run {i}/3 {run}: starting") == 1, proc.stdout
        assert len(results_files(out, run)) == 1
    for name in ("values.csv", "correlations.csv"):
        assert (out / "report" / name).read_text() == (reference / "report" / name).read_text()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_slurm_recipe_survives_a_killed_task_with_the_same_numbers(finished, tmp_path):
    """docs/scaling.md's SLURM batch script as two local array tasks (SLURM_ARRAY_TASK_ID 0 and 1)
    started at the same moment on one folder; the sweep process holding the first claim is killed
    with SIGKILL mid-run (a preempted task): the other task takes the run over and finishes every
    run with the single worker's numbers."""
    path, reference = finished
    out = tmp_path / "out"
    script = scaling_recipe("A SLURM array")
    assert script.startswith("#!/bin/bash") and "#SBATCH --array=0-7" in script
    (tmp_path / "leaderboard.sbatch").write_text(stand_in(script, path, out), encoding="utf-8")
    tasks = {}
    for task_id in range(2):
        proc = subprocess.Popen(
            ["bash", str(tmp_path / "leaderboard.sbatch")],
            cwd=ROOT,
            env={**ENV, "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_JOB_ID": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        tasks[proc.pid] = proc
    deadline = time.monotonic() + 600
    victim = None
    while victim is None:  # the first claim either task's sweep takes: kill that sweep mid-run
        assert time.monotonic() < deadline, "no task claimed a run"
        for claim in (out / "claims").glob("*.claim") if (out / "claims").is_dir() else []:
            pid = (claims.holder(claim) or {}).get("pid")
            task = pid if pid in tasks else _parent(pid) if pid else None  # bash may exec the command
            if task in tasks and claim.stem != "report":
                victim, victim_task, run = pid, tasks[task], claim.stem
                break
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    victim_task.communicate(timeout=60)
    (survivor,) = [p for p in tasks.values() if p is not victim_task]
    log = survivor.communicate(timeout=900)[0]
    assert survivor.returncode == 0, log[-3000:]
    assert f"{run}: starting" in log  # the surviving task computed the killed task's run
    for name in ("base", "yarn", "linear"):
        assert len(results_files(out, name)) == 1
    for name in ("values.csv", "correlations.csv"):
        assert (out / "report" / name).read_text() == (reference / "report" / name).read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers 0: give at least 1 worker"),
        (["--workers", "2", "--gpus", "7"], "--gpus names device(s) 7, but this machine has 0 CUDA device(s)"),
        (["--gpus", "0,x"], "--gpus '0,x': give distinct device numbers"),
    ],
)
def test_bad_worker_options_are_one_line_errors(args, message, assets, tmp_path):
    path = sweep_file(tmp_path)
    proc = run_sweep_cli(str(path), "--output", str(tmp_path / "out"), *args, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
