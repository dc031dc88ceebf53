"""Every ```bash and ```python block of README.md and docs/*.md runs as written, with sizes shrunk
for a 2-core test; every relative link and anchor of those pages resolves.

Not run here (```sh blocks, each with its reason next to it on its page):
- docs/backends.md, the two vLLM commands: on this CPU a vLLM engine with their max_model_len of
  12,5xx did not finish within the test's limits; the same command forms, key=value and JSON
  --model_args through the real `lm_eval --model vllm` CLI, run in tests/test_vllm.py and
  tests/test_vllm_hidden.py.
- docs/training.md, `lm-eval-longshort finetune`: 23 minutes; tests/test_training.py runs its option
  checks, and the page's ```python block runs the pieces it is made of.
- docs/reproducibility.md, an ``lm_eval`` run with ``--use_cache``: the README's quick start runs the
  same command form; tests/test_resume.py checks that a killed run's rerun resumes with equal numbers.
- docs/contributing.md, the ruff commands: `make test` runs them before this suite.
- docs/scaling.md, the recipes: they name GPUs, a SLURM cluster and a Ray cluster that this machine
  lacks; tests/test_sweep_shared_folder.py runs the node and SLURM recipes with local stand-ins,
  tests/test_ray_cluster_recipe.py the Ray one with two local Ray nodes.
- docs/backends.md, the data-parallel commands (GPUs, a Ray cluster): tests/test_vllm_data_parallel.py
  runs two engines in Ray actors on the CPU build.
A command shown on two pages runs on one of them only; the other page shows it as ```sh.

Shrinking changes only sizes. Shell: ``--limit N`` -> 1 (added to an ``lm_eval`` command without
one), the metadata's ``lengths`` -> [64, 128], and for vLLM commands on this CPU machine
``gpu_memory_utilization`` (the share of RAM on the CPU build) and ``enforce_eager``. ``make demo``
runs with a small DEMO_META and its own output folder; ``make test`` is this suite itself and is not
run again; a ``sweep`` (minutes to hours) is validated with ``--check``, which loads nothing and
prints its plan (tests/test_sweep.py runs real sweeps). ``pip install .`` installs this checkout, into a
folder of the test's own (``--target``, no dependencies): the suite's environment is in use by other
tests at the same moment (two pytest-xdist workers).
Python: a ``lengths`` list -> [64, 128], ``length=N`` -> 64, ``limit=N`` -> 1, ``max_steps=N`` -> 1.
Each block runs in a fresh folder, with the test environment's ``bin`` first on PATH (Python blocks
with this interpreter).
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
from doc_blocks import commands, fenced_blocks
from offline import offline_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SMALL_LENGTHS = [64, 128]
CPU_VLLM_ARGS = "gpu_memory_utilization=0.2,enforce_eager=True"
CPU_VLLM_JSON = '"gpu_memory_utilization": 0.2, "enforce_eager": true'


def blocks(lang: str) -> list[tuple[str, str]]:
    """(id, text) of every ```lang block of every page, e.g. ('README.md:2', ...)."""
    out = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        out += [(f"{name}:{i}", block) for i, block in enumerate(fenced_blocks(page, lang))]
    return out


BASH = blocks("bash")
PYTHON = blocks("python")


def _shrink_metadata(match: re.Match) -> str:
    meta = json.loads(match.group(1))
    if "lengths" in meta:
        meta["lengths"] = SMALL_LENGTHS
    return "--metadata " + shlex.quote(json.dumps(meta))


def shrink(command: str) -> str:
    if command.startswith("make demo"):
        meta = json.dumps({"lengths": SMALL_LENGTHS, "target_tokens": 32, "pairs": 1})
        return f"make -C {ROOT} demo DEMO_DIR=$PWD/demo_output DEMO_META={shlex.quote(meta)}"
    if command.startswith("pip install ."):  # into a folder of its own: other tests use the venv meanwhile
        return command.replace("pip install .", f"pip install -q --no-deps --target $PWD/site {ROOT}", 1)
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


def shrink_python(code: str) -> str:
    code = re.sub(r"""(\blengths["']?\s*[:=]\s*)\[[^\]]*\]""", rf"\g<1>{SMALL_LENGTHS}", code)
    code = re.sub(r"\blength=\d+", "length=64", code)
    code = re.sub(r"\bmax_steps=\d+", "max_steps=1", code)
    return re.sub(r"\blimit=\d+", "limit=1", code)


def _run(argv: list[str], cwd: Path, what: str) -> None:
    env = offline_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_pages_have_command_blocks():
    readme = [b for name, b in BASH if name.startswith("README.md")]
    assert any("make demo" in b for b in readme) and any("lm_eval --model hf" in b for b in readme)
    assert any("simple_evaluate" in b for name, b in PYTHON if name.startswith("README.md"))


@pytest.mark.parametrize("index", range(len(BASH)), ids=[name for name, _ in BASH])
def test_bash_block_runs(index, assets, tmp_path):
    runnable = [shrink(c) for c in commands(BASH[index][1]) if not c.startswith("make test")]
    if not runnable:
        pytest.skip("only `make test`, which is this suite")
    if any("--model vllm" in c for c in runnable):
        pytest.importorskip("vllm")
    for command in runnable:
        _run(["bash", "-c", f"set -euo pipefail; {command}"], tmp_path, f"command\n{command}")


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=[name for name, _ in PYTHON])
def test_python_block_runs(index, assets, tmp_path):
    code = shrink_python(PYTHON[index][1])
    (tmp_path / "block.py").write_text(code, encoding="utf-8")
    _run([sys.executable, "block.py"], tmp_path, f"python block\n{code}")


# -- links --------------------------------------------------------------------------------


FENCE = re.compile(r"^(```+).*?^\1", flags=re.S | re.M)
LINKED = [*PAGES, ROOT / "task_configs" / "README.md"]


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces -> '-', repeats get -1, -2, ..."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    ids: set[str] = set()
    for title in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in ids:
            n += 1
            unique = f"{slug}-{n}"
        ids.add(unique)
    return ids


@pytest.mark.parametrize("page", LINKED, ids=[p.relative_to(ROOT).as_posix() for p in LINKED])
def test_links_resolve(page):
    """Every relative link (and image) names an existing file, and every #anchor a heading of its page."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text(encoding="utf-8")))  # no code
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, "\n".join(broken)
