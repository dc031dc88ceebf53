"""What sharing a sweep folder costs: ``--workers 2`` (one thread each) against one worker (two threads).

Runs the shipped study's quick preset (``sweeps/length_generalization.yaml --quick``) twice from an
empty folder: once as one ``sweep`` process with ``OMP_NUM_THREADS=2``, once with ``--workers 2``
(two processes on one folder, each given one thread by the sweep itself). Both do the same forward
passes; the second adds claims, heartbeats, waiting for the last run and the report lock, and runs
two model copies side by side. Prints both wall times and their ratio (target: at most 1.10) and
the largest relative difference between the two reports' values.csv (not zero: one and two torch
threads sum in different orders, ~1e-6). Asserts nothing.

Usage (repo root, after `make prepare`):  PYTHONPATH=. .venv/bin/python benchmarks/bench_sweep_workers.py
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import OFFLINE

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "length_generalization.yaml"


def timed_sweep(out: Path, extra: list[str], threads: int | None) -> float:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
        if threads:
            env[name] = str(threads)
    command = [sys.executable, "-m", "lm_eval_longshort.cli", "sweep", str(SWEEP), "--quick", "--output", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(command + extra, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sweep {' '.join(extra) or '(one worker)'} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def max_relative_difference(a: Path, b: Path) -> float:
    """Largest |x - y| / |x| over the numeric cells of two values.csv files with the same rows."""
    rows_a, rows_b = (list(csv.reader(p.open())) for p in (a, b))
    assert [r[:4] for r in rows_a] == [r[:4] for r in rows_b], "the two reports list different values"
    worst = 0.0
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        for x, y in zip(ra[4:], rb[4:]):
            if x and y and float(x) != float(y):
                worst = max(worst, abs(float(x) - float(y)) / max(abs(float(x)), 1e-300))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default=None, help="keep the two output folders under this folder")
    args = parser.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="bench_workers_"))
    one = timed_sweep(base / "one", [], threads=2)
    two = timed_sweep(base / "two", ["--workers", "2"], threads=None)
    diff = max_relative_difference(base / "one/report/values.csv", base / "two/report/values.csv")
    print(f"quick preset, one worker x 2 threads: {one:.1f} s")
    print(f"quick preset, --workers 2 x 1 thread: {two:.1f} s")
    print(f"ratio (workers 2 / one): {two / one:.3f}  (target <= 1.10)")
    print(f"values.csv, largest relative difference: {diff:.1e}")


if __name__ == "__main__":
    main()
