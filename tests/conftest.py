"""Shared fixtures: the embedded SmolLM2 (real weights) and the first Shakespeare plays.

Nothing here downloads: `make test` runs `lm-eval-longshort prepare` first, and the
suite runs with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.
"""

from __future__ import annotations

import json
import os

from offline import OFFLINE

for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on 2 cores: one thread each (and for every process a
    # test starts). Two workers with two spinning OpenMP threads each ran single tests ~10x slower.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")

import pytest  # noqa: E402  (after the thread variables: torch reads them at import)
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's ``--dist loadgroup``: a module's tests stay on one worker (its
    module fixtures are built once), and every test that starts vLLM engines shares one group, so
    two engines (each reserving a share of RAM) never run at once. That group, the longest (~10 of
    the suite's ~45 worker-minutes), goes first: xdist hands out groups in collection order, and
    last it would leave the other worker idle at the end."""
    for item in items:
        group = "vllm" if item.get_closest_marker("vllm") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("vllm") is None)  # stable: order kept otherwise


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, called in the controller
def pytest_xdist_node_collection_finished(node, ids):
    """Stop if pytest-xdist could not put the groups into the test ids (pytest 9.2 with xdist 3.8
    silently ignores them): module fixtures would be built on both workers, vLLM engines run at once."""
    if node.config.getoption("dist", None) == "loadgroup" and ids and not any("@" in i for i in ids):
        pytest.exit(
            f"pytest-xdist's --dist loadgroup left the test groups out of the test ids with pytest "
            f"{pytest.__version__}: install the versions `make test` pins (TEST_SPEC in the Makefile)",
            returncode=4,
        )


@pytest.fixture(scope="session")
def assets():
    from lm_eval_longshort.assets import prepare

    return prepare(progress=False)


@pytest.fixture(scope="session")
def smol(assets):
    """(model, tokenizer) of the embedded SmolLM2-135M, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(assets.model_dir)


@pytest.fixture(scope="session")
def plays(assets) -> list[dict]:
    """The corpus rows (title, path, text) in task order."""
    with open(assets.corpus_file, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="session")
def hflm(smol):
    """lm-eval's own HFLM around the already-loaded model (what --model hf builds)."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = smol
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=4096, batch_size=1)
