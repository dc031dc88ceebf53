"""`lm-eval-longshort sweep FILE --check` catches, before any model loads, what used to fail only
inside each run: a misspelled model argument, a document index beyond a task's documents, a run
name that cannot name a folder, a nan or infinity in a numeric setting.

Each test runs the real command (a subprocess, offline) on a sweep file written as YAML text, and
asserts exit code 2, one line of the error list naming the bad value and its fix, and that the
sweep's other settings (valid on purpose) are not flagged.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from sweep_files import run_sweep_cli

HEADER = """\
name: checks
base: embedded
device: cpu
tasks:
  - longshort_ppl_shakespeare
  - {task: longshort_misalign_shakespeare, as: misalign_dense, metadata: {mode: dense}}
metadata: {lengths: [32, 64], target_tokens: 16}
"""


def check(tmp_path: Path, text: str) -> list[str]:
    """Run `sweep FILE --check`; it must refuse the file (exit 2, no traceback): its problem lines."""
    path = tmp_path / "sweep.yaml"
    path.write_text(text, encoding="utf-8")
    proc = run_sweep_cli(str(path), "--check", timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not proc.stdout.strip(), proc.stdout  # no plan printed
    assert f"lm-eval-longshort sweep: error: {path}:" in proc.stderr, proc.stderr
    found = re.search(r"(\d+) problem\(s\)", proc.stderr)
    lines = [line[4:] for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert found and int(found.group(1)) == len(lines), proc.stderr  # one line per problem
    return lines


def test_misspelled_model_arguments(tmp_path):
    """hf: HFLM's own arguments, from_pretrained's and the model's config keys pass; typos do not."""
    lines = check(
        tmp_path,
        HEADER
        + """\
model_args: {dtype: float32, batch_size: 1, max_lenght: 4096}
samples: [0]
runs:
  - name: hf_ok
    model_args: {max_length: 4096, attn_implementation: eager, use_cache: true, low_cpu_mem_usage: true}
  - name: hf_typo
    model_args: {max_length: 4096, trust_remote_cod: false}
  - name: vllm_typo
    backend: vllm
    model_args: {max_lenght: 4096, max_model_len: 4096, enforce_eager: true, gpu_memory_utilisation: 0.5}
  - name: hf_device
    model_args: {device: cpu}
""",
    )
    assert lines == [
        "model_args (sweep-wide): unknown model argument 'max_lenght' (did you mean 'max_length'?); hf takes "
        "arguments of lm-eval's HFLM, transformers' from_pretrained, or a key of the model's config.json",
        "run 'hf_typo': unknown model argument 'trust_remote_cod' (did you mean 'trust_remote_code'?); hf takes "
        "arguments of lm-eval's HFLM, transformers' from_pretrained, or a key of the model's config.json",
        "run 'vllm_typo': unknown model argument 'max_lenght' (did you mean 'max_length'?); vllm takes arguments "
        "of lm-eval's VLLM, vLLM's LLM or EngineArgs",
        "run 'vllm_typo': unknown model argument 'gpu_memory_utilisation' (did you mean 'gpu_memory_utilization'?); "
        "vllm takes arguments of lm-eval's VLLM, vLLM's LLM or EngineArgs",
        "run 'hf_device': model argument 'device' is set by the sweep's 'device:' key; move it there",
    ]


def test_known_hf_arguments_cover_the_hflm_constructor():
    """The arguments read from lm-eval's source are those of the HFLM class itself."""
    from lm_eval.models.huggingface import HFLM

    from lm_eval_longshort.sweep import checks

    expected = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    assert expected <= checks.backend_arguments("hf")
    assert "max_lenght" not in checks.backend_arguments("hf")


def test_sample_index_beyond_the_documents(tmp_path):
    """The embedded corpus has 38 plays: 37 is the last index; 38 and 999 are refused."""
    lines = check(tmp_path, HEADER + "samples: [0, 37, 38, 999]\nruns:\n  - name: base\n")
    assert lines == [
        "samples: document indices [38, 999] out of range for longshort_ppl_shakespeare, misalign_dense: "
        "38 documents, valid indices 0 to 37"
    ]


def test_sample_index_beyond_local_files(tmp_path):
    """A `local` task's documents are its files: two .txt files are documents 0 and 1."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"the text of {name}\n", encoding="utf-8")
    lines = check(
        tmp_path,
        f"""\
base: embedded
device: cpu
tasks:
  - {{task: longshort_ppl_local, metadata: {{files: "{tmp_path}/*.txt"}}}}
metadata: {{lengths: [32]}}
samples: [1, 2]
runs:
  - name: base
""",
    )
    assert lines == [
        "samples: document index 2 out of range for longshort_ppl_local: 2 documents, valid indices 0 to 1"
    ]


RULE = "the run name names folders, so: letters, digits, '.', '_', '-' only, starting with a letter or digit, "


def test_run_names_that_cannot_name_a_folder(tmp_path):
    """A YAML block scalar (`name: |`) keeps the trailing newline: 'nl\\n' would name a folder."""
    runs = ["ok-1.b_2", "|\n      nl", '"a b"', '".hidden"', '"x/../y"', "Base", "base"]
    lines = check(tmp_path, HEADER + "samples: [0]\nruns:\n" + "".join(f"  - name: {n}\n" for n in runs))
    assert lines == [
        f"run 'nl\\n': {RULE}at most 100 characters; e.g. 'nl'",
        f"run 'a b': {RULE}at most 100 characters; e.g. 'a_b'",
        f"run '.hidden': {RULE}at most 100 characters; e.g. 'hidden'",
        f"run 'x/../y': {RULE}at most 100 characters; e.g. 'x_.._y'",
        "runs: run names 'Base', 'base' differ only in case; on a case-insensitive file system they "
        "share one folder: rename one",
    ]


def test_nan_and_infinity_in_numeric_settings(tmp_path):
    """Each non-finite number gets the sweep's message naming the run (or task) and the key."""
    text = HEADER.replace("target_tokens: 16", "target_tokens: .inf") + (
        """\
samples: [0]
runs:
  - name: rope_nan
    rope: {type: yarn, factor: .nan}
  - name: rope_zero_beta
    rope: {type: yarn, factor: 2, beta_fast: 0}
  - name: rope_inf_window
    rope: {type: yarn, factor: 2, original_max_position_embeddings: .inf}
  - name: theta_inf
    overrides: {rope_parameters: {rope_theta: -.inf}}
  - name: length_nan
    model_args: {max_length: .nan}
  - name: fine
    rope: {type: linear, factor: 2.0}
"""
    )
    assert check(tmp_path, text) == [
        "task longshort_ppl_shakespeare: metadata.target_tokens is inf; give a finite number",
        "task misalign_dense: metadata.target_tokens is inf; give a finite number",
        "run 'rope_nan': rope.factor must be a finite number >= 1, got nan",
        "run 'rope_zero_beta': rope.beta_fast must be a finite number > 0, got 0",
        "run 'rope_inf_window': rope.original_max_position_embeddings must be a whole number >= 1, got inf",
        "run 'theta_inf': overrides.rope_parameters.rope_theta is -inf: config values must be finite numbers",
        "run 'length_nan': model_args.max_length is nan; give a finite number",
    ]
