"""Local workers: ``sweep FILE --workers N [--gpus 0,1,...]`` runs N sweep processes on one folder.

Each worker is the plain ``lm-eval-longshort sweep FILE --output DIR`` command in a process of
its own; they share the runs through the folder's claims (sweep/claims.py), exactly as workers
started by a job scheduler on several hosts do. This module only starts them: it gives each its
devices (``CUDA_VISIBLE_DEVICES``) and CPU threads, labels their output lines, and returns the
worst exit code. It schedules nothing itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from lm_eval_longshort.sweep.spec import SweepError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1,2,3"`` -> ``["0", "1", "2", "3"]`` (None -> [])."""
    if text is None:
        return []
    gpus = [g.strip() for g in text.split(",")]
    if not gpus or any(not g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise SweepError(f"--gpus {text!r}: give distinct device numbers separated by commas, e.g. --gpus 0,1,2,3")
    return gpus


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_groups(workers: int, gpus: Sequence[str], available: int) -> list[list[str]]:
    """Each worker's devices: ``gpus`` split into ``workers`` equal groups, in order.

    >>> device_groups(4, ["0", "1", "2", "3", "4", "5", "6", "7"], 8)
    [['0', '1'], ['2', '3'], ['4', '5'], ['6', '7']]
    >>> device_groups(2, [], 0)
    [[], []]
    """
    if workers < 1:
        raise SweepError(f"--workers {workers}: give at least 1 worker")
    missing = [g for g in gpus if int(g) >= available]
    if missing:
        raise SweepError(
            f"--gpus names device(s) {', '.join(missing)}, but this machine has {available} CUDA device(s)"
            + (f" (0 to {available - 1})" if available else "")
            + "; name only devices that exist"
        )
    if gpus and len(gpus) % workers:
        raise SweepError(
            f"--gpus lists {len(gpus)} device(s) for {workers} workers: give each worker the same number "
            f"(a multiple of {workers} devices), or set --workers to divide {len(gpus)}"
        )
    per = len(gpus) // workers
    return [list(gpus[i * per : (i + 1) * per]) for i in range(workers)]


def _relay(k: int, stream, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[worker {k}] {line}")
            sys.stdout.flush()


def start_workers(command: Sequence[str], groups: list[list[str]]) -> int:
    """Run ``command`` once per device group, concurrently; the highest exit code."""
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    procs, relays, lock = [], [], threading.Lock()
    for k, devices in enumerate(groups):
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        for name in THREAD_VARIABLES:
            env.setdefault(name, str(threads))  # N workers on one machine share its cores
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        relays.append(threading.Thread(target=_relay, args=(k, proc.stdout, lock), daemon=True))
        relays[-1].start()
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        codes = [proc.wait() for proc in procs]
    for relay in relays:
        relay.join(timeout=5)
    return max(codes)
