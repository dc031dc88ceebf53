"""Every ```bash block of the README runs as written, with limits shrunk for a 2-core test.

Not run here (```sh blocks): the two vLLM commands (on this CPU a vLLM engine with their
max_model_len of 12,5xx did not finish within the test's limits; the same command forms, key=value
and JSON --model_args through the real `lm_eval --model vllm` CLI, run in tests/test_vllm.py and
tests/test_vllm_hidden.py).

Shrinking changes only sizes: ``--limit N`` -> 1 (added to an ``lm_eval`` command without one),
the metadata's ``lengths`` -> [64, 128], and for vLLM commands on this CPU machine
``gpu_memory_utilization`` (the share of RAM on the CPU build) and ``enforce_eager``. ``make demo``
runs with a small DEMO_META and its own output folder; ``make test`` is this suite itself and is not
run again; a ``sweep`` (minutes to hours) is validated with ``--check``, which loads nothing and
prints its plan (tests/test_sweep.py runs real sweeps). ``pip install .`` installs this checkout.
Each block runs in a fresh folder, with the test environment's ``bin`` first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from offline import offline_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL_LENGTHS = [64, 128]
CPU_VLLM_ARGS = "gpu_memory_utilization=0.2,enforce_eager=True"
CPU_VLLM_JSON = '"gpu_memory_utilization": 0.2, "enforce_eager": true'


def bash_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined (also lines inside an open quote), comments dropped."""
    out, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote is still open: the command goes on
            continue
        command = pending.strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append(command)
    assert not pending, f"unclosed quote in README block: {pending!r}"
    return out


def _shrink_metadata(match: re.Match) -> str:
    meta = json.loads(match.group(1))
    if "lengths" in meta:
        meta["lengths"] = SMALL_LENGTHS
    return "--metadata " + shlex.quote(json.dumps(meta))


def shrink(command: str) -> str:
    if command.startswith("make demo"):
        meta = json.dumps({"lengths": SMALL_LENGTHS, "target_tokens": 32, "pairs": 1})
        return f"make -C {ROOT} demo DEMO_DIR=$PWD/demo_output DEMO_META={shlex.quote(meta)}"
    if command.startswith("pip install ."):
        return command.replace("pip install .", f"pip install -q {ROOT}", 1)
    if command.startswith("lm-eval-longshort sweep "):
        spec = command.split()[2]
        # --check right after the file: appended at the end it would land inside a trailing comment.
        return command.replace(f" {spec}", f" {ROOT / spec} --check", 1)
    command = re.sub(r"--limit \d+", "--limit 1", command)
    if "lm_eval " in command and "--limit" not in command:
        command += " --limit 1"
    command = re.sub(r"--metadata '([^']*)'", _shrink_metadata, command)
    if "--model vllm" in command:
        if "--model_args '{" in command:  # JSON: add the keys before its closing brace
            command = re.sub(r"(--model_args '\{.*?)\}'", r"\1, " + CPU_VLLM_JSON + "}'", command, count=1, flags=re.S)
        elif '--model_args "' in command:
            command = re.sub(r"(--model_args \"[^\"]*)\"", rf'\1,{CPU_VLLM_ARGS}"', command)
        else:
            command = re.sub(r"(--model_args \S+)", rf"\1,{CPU_VLLM_ARGS}", command)
    return command


def test_readme_has_command_blocks():
    blocks = bash_blocks()
    assert len(blocks) >= 2
    assert any("make demo" in b for b in blocks) and any("lm_eval --model hf" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(bash_blocks())))
def test_readme_block_runs(index, assets, tmp_path, monkeypatch):
    block = bash_blocks()[index]
    runnable = [shrink(c) for c in commands(block) if not c.startswith("make test")]
    if not runnable:
        pytest.skip("only `make test`, which is this suite")
    if any("--model vllm" in c for c in runnable):
        pytest.importorskip("vllm")
    env = offline_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for command in runnable:
        proc = subprocess.run(
            ["bash", "-c", f"set -euo pipefail; {command}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"README command failed:\n{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
