"""docs/scaling.md's Ray cluster recipe, run as written on one machine (issue 17's local stand-in).

Each command of the page's ``sh`` block runs in order: ``ray get-auth-token --generate`` (in a
home folder of its own), the ``export`` of the token variables, the head (``ray start --head``, one
CPU) and a second node joining it (``ray start --address``, one CPU): two Ray nodes, so the two
actors land on different nodes. A client without the token must be refused. Then the page's
``lm_eval`` command, with a 2-layer random Llama, ``data_parallel_size: 2``, lengths 128/256 and two
short plays in place of the 8B model and its lengths; its results and per-document records must
EQUAL those of one vLLM engine in this process (``batch_tokens: 1``: one document per chunk and
per engine call on both sides; one OpenMP thread on both sides, as Ray gives each CPU actor).

The nodes are started with ``--block`` in process groups of their own and stopped by a signal to
that group (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from doc_blocks import commands, scaling_recipe
from harness_run import evaluate_tasks
from offline import offline_env
from vllm_helpers import in_process_vllm, responses_by_doc, save_tiny_llama, tiny_engine_args

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vllm backend tests need vLLM (make test installs the CPU build)")
pytest.importorskip("ray", reason="data parallelism needs ray (make test installs it)")

BIN = Path(sys.executable).parent
TASK = "longshort_ppl_shakespeare"
META = {"protocol": "ladder", "lengths": [128, 256], "target_tokens": 32, "batch_tokens": 1}
# A node of this small machine: one CPU, a small object store, no dashboard.
NODE_STAND_IN = ["--num-cpus=1", "--object-store-memory=100000000", "--block"]


def recipe() -> list[str]:
    """The commands of the page's Ray block, trailing comments dropped and spaces collapsed."""
    block = scaling_recipe("vLLM data parallelism on a Ray cluster")
    return [" ".join(re.sub(r"\s+#.*$", "", command).split()) for command in commands(block)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_nodes():
    """Ray nodes started with ``--block`` (each its own process group), stopped on exit."""
    nodes: list[subprocess.Popen] = []

    def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        # stdin from /dev/null: under pytest-xdist this process's stdin is the channel to the controller.
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        nodes.append(proc)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(nodes):  # the joined node first, the head last
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def one_engine(model_dir) -> tuple[dict, list[dict]]:
    """(results, samples) of one in-process vLLM engine on one OpenMP thread (as a Ray CPU actor),
    with lm_eval's default bootstrap setting (our standard errors are computed when it is not 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with in_process_vllm(**tiny_engine_args(model_dir, "hidden")) as lm:
            out = evaluate_tasks(lm, [TASK], META, limit=2, bootstrap_iters=100000, log_samples=True)
            return out["results"][TASK], out["samples"][TASK]
    finally:
        torch.set_num_threads(threads)


def test_the_ray_cluster_recipe_as_written_equals_one_engine(assets, tmp_path):
    model = save_tiny_llama(assets.model_dir, tmp_path / "tiny-llama")
    want, want_samples = one_engine(model)
    commands = recipe()
    assert commands[:2] == ["ray get-auth-token --generate", "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=SECRET"]
    assert commands[2] == "ray start --head --port=6379" and commands[3] == "ray start --address=HEAD_NODE:6379"
    assert commands[4].startswith("RAY_ADDRESS=HEAD_NODE:6379 lm_eval --model vllm ") and len(commands) == 5
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    ray_free = {k: v for k, v in offline_env(PATH=path).items() if not k.startswith("RAY_")}

    # 1. The secret, made in a home folder of its own (this machine's ~/.ray stays as it is).
    home = tmp_path / "home"
    home.mkdir()
    made = subprocess.run(
        shlex.split(commands[0]), env={**ray_free, "HOME": str(home)}, stdin=subprocess.DEVNULL, capture_output=True
    )
    token = made.stdout.decode().strip()
    assert made.returncode == 0 and re.fullmatch(r"[0-9a-f]{32,}", token), made.stderr.decode()[-2000:]
    # 2. The export line, with that secret.
    exported = dict(word.split("=", 1) for word in shlex.split(commands[1])[1:])
    assert exported == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "SECRET"}
    env = {**ray_free, **exported, "RAY_AUTH_TOKEN": token}
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ray_nodes() as start:
        # 3. The head, 4. a node joining it.
        start([*shlex.split(commands[2].replace("6379", str(port))), *NODE_STAND_IN], env, tmp_path / "head.log")
        joined = commands[3].replace("HEAD_NODE:6379", address)
        start([*shlex.split(joined), *NODE_STAND_IN], env, tmp_path / "node.log")
        # A client without the secret is refused.
        stranger = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={address!r}); print('connected')"],
            env={**ray_free, "HOME": str(tmp_path / "stranger"), "RAY_NUM_REDIS_GET_RETRIES": "2"},  # 2 tries, not 20
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stranger.returncode != 0 and "connected" not in stranger.stdout, (
            stranger.stdout + stranger.stderr[-2000:]
        )
        nodes = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"],
            env={**env, "RAY_ADDRESS": address},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert nodes.stdout.strip().splitlines()[-1:] == ["2"], nodes.stdout + nodes.stderr[-2000:]
        # 5. The lm_eval command: this model and short lengths in place of the 8B model and 128k.
        argv = shlex.split(commands[4])
        variables = dict(word.split("=", 1) for word in argv[: argv.index("lm_eval")])
        assert variables == {"RAY_ADDRESS": "HEAD_NODE:6379"}
        argv = argv[argv.index("lm_eval") :]
        model_args = json.loads(argv[argv.index("--model_args") + 1])
        assert (
            model_args.pop("data_parallel_size") == 16
            and model_args.pop("pretrained")
            and model_args.pop("max_model_len")
        )
        engine = tiny_engine_args(model, "hidden")
        assert {k: engine[k] for k in model_args} == model_args  # the page's route is the hidden-state one
        argv[argv.index("--model_args") + 1] = json.dumps({**engine, "data_parallel_size": 2})
        assert argv[argv.index("--tasks") + 1] == TASK
        argv[argv.index("--metadata") + 1] = json.dumps(META)
        argv[argv.index("--output_path") + 1] = str(tmp_path / "results")
        driver = subprocess.run(
            [str(BIN / "lm_eval"), *argv[1:], "--limit", "2", "--log_samples"],
            env={**env, "RAY_ADDRESS": address},
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-4000:]
    assert "starting 2 vLLM engines in Ray actors" in driver.stderr, driver.stderr[-3000:]
    (results,) = glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)
    got = json.loads(Path(results).read_text())["results"][TASK]
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN (keyppl here) equals NaN
    (samples,) = glob.glob(str(tmp_path / "results" / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    got_samples = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    assert len(got_samples) == 2 and responses_by_doc(got_samples) == responses_by_doc(want_samples)
