"""Several ranks: `accelerate launch` with 2 CPU processes gives the aggregates of one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from offline import offline_env

BIN = Path(sys.executable).parent
META = {"lengths": [32, 128], "target_tokens": 32, "pairs": 2}


def _run(args: list[str], out: Path, threads: str) -> dict:
    env = offline_env(OMP_NUM_THREADS=threads)  # 2 processes on 2 cores: one thread each
    model_args = subprocess.run(
        [BIN / "lm-eval-longshort", "model-args"], capture_output=True, text=True, check=True
    ).stdout.strip()
    cmd = [
        *args,
        "--model",
        "hf",
        "--model_args",
        model_args,
        "--tasks",
        "longshort_shakespeare",
        "--limit",
        "3",
        "--metadata",
        json.dumps(META),
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    return json.loads(result_file.read_text())


@pytest.mark.slow
def test_two_cpu_processes_give_the_same_aggregates(tmp_path):
    one = _run([str(BIN / "lm_eval")], tmp_path / "one", "2")
    two = _run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--cpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "lm_eval",
        ],
        tmp_path / "two",
        "1",
    )
    assert two["n-samples"] == one["n-samples"]
    compared = set()
    for task in ("longshort_ppl_shakespeare", "longshort_misalign_shakespeare"):
        for key, value in one["results"][task].items():
            if "_stderr" not in key and ("@" in key or key.startswith(("keyppl", "key_frac", "skipped_docs"))):
                if isinstance(value, float) and value != value:  # NaN (e.g. keyppl with no key tokens)
                    assert two["results"][task][key] != two["results"][task][key]
                    continue
                assert two["results"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
                compared.add(key.split(",")[0])
            if key.endswith("_stderr,none") and isinstance(value, float):  # gathered over ranks too
                # NaN where a standard error is undefined (keyppl with key tokens in one document)
                assert two["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-7, nan_ok=True), key
        # Rank 0 records every rank's documents in the results JSON.
        info_one, info_two = one["configs"][task]["longshort"], two["configs"][task]["longshort"]
        assert info_two["measured"] == info_one["measured"]
        assert [(d["doc_index"], d["sha1"]) for d in info_two["documents"]] == [
            (d["doc_index"], d["sha1"]) for d in info_one["documents"]
        ]
        assert len(info_one["documents"]) == 3
    lengths = META["lengths"]
    expected = {f"{m}@{n}" for m in ("ppl", "bpb", "sce", "symkl", "js", "top1", "tv") for n in lengths}
    assert expected <= compared, expected - compared
