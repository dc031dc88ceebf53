"""Tiny sweeps on the embedded model for the sweep tests: the file, the CLI, the finished runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from offline import offline_env

ROOT = Path(__file__).resolve().parents[1]
ENV = offline_env(LONGSHORT_SWEEP_POLL_S="1")  # a waiting worker looks again every second
RUNS = {
    "base": {"name": "base"},
    "yarn": {"name": "yarn", "rope": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 32}},
    "linear": {"name": "linear", "rope": {"type": "linear", "factor": 2}},
}


def sweep_file(folder: Path, lengths=(32, 64), runs=("base", "yarn", "linear"), samples=(0,)) -> Path:
    """Tiny runs (the embedded model and RoPE variants), one play, perplexity only."""
    data = {
        "name": "plans",
        "base": "embedded",
        "device": "cpu",
        "model_args": {"dtype": "float32", "max_length": 128},
        "tasks": ["longshort_ppl_shakespeare"],
        "metadata": {"lengths": list(lengths), "target_tokens": 16},
        "samples": list(samples),
        "bootstrap_iters": 10,
        "runs": [RUNS[r] for r in runs],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lm_eval_longshort.cli", "sweep", *args]


def run_sweep_cli(*args: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sweep_command(*args), cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout
    )


def results_files(out: Path, run: str) -> list[Path]:
    return sorted((out / "runs" / run).glob("results_*.json"))
