"""`sweep --check` prints the bill: input tokens per run and task, from the tokenizer alone.

The bill is checked against the tokens the real model reads: a forward pre-hook on the embedded
model's decoder counts the tokens of every forward of a real lm-eval run of the same task and
documents (padding excluded where the engine passes an attention mask). Exact for every protocol
whose batches carry a mask; `last` batches its prompts without one, so padding is counted there
and the bill (real tokens only) lies below the count by at most the engine's padding allowance.
"""

from __future__ import annotations

import lm_eval
import pytest
import yaml
from harness_run import INSTALLED_TASKS
from lm_eval.tasks import TaskManager
from sweep_files import run_sweep_cli, sweep_file

from lm_eval_longshort.sweep import bill, load_sweep

PPL, MIS = "longshort_ppl_shakespeare", "longshort_misalign_shakespeare"
CASES = [
    (PPL, {"protocol": "ladder", "target_tokens": 16}),
    (PPL, {"protocol": "truncate"}),
    (PPL, {"protocol": "sliding"}),
    (MIS, {"mode": "dense"}),
    (MIS, {"mode": "last", "pairs": 2}),
]


@pytest.fixture(scope="module")
def counted_lm(hflm):
    """lm-eval's HFLM whose decoder counts the tokens of every forward (engine built beforehand,
    so its one-off check forward is not counted)."""
    from lm_eval_longshort.harness.lm_method import engine_for

    engine_for(hflm)
    counts: list[int] = []

    def count(module, args, kwargs):
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(ids.numel()))

    handle = hflm.model.model.register_forward_pre_hook(count, with_kwargs=True)
    yield hflm, counts
    handle.remove()


@pytest.mark.parametrize("task, meta", CASES, ids=[m.get("protocol", m.get("mode")) for _, m in CASES])
def test_bill_equals_the_tokens_the_model_reads(counted_lm, task, meta, tmp_path):
    lm, counts = counted_lm
    meta = {"lengths": [32, 64], **meta}
    counts.clear()
    tm = TaskManager(include_path=str(INSTALLED_TASKS), include_defaults=False, metadata=meta)
    lm_eval.simple_evaluate(model=lm, tasks=[task], samples={task: [0, 1]}, task_manager=tm, bootstrap_iters=0)
    data = {
        "base": "embedded",
        "model_args": {"dtype": "float32"},
        "tasks": [task],
        "metadata": meta,
        "samples": [0, 1],
        "runs": [{"name": "base"}],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    sweep = load_sweep(tmp_path / "s.yaml", output=tmp_path / "out")
    billed = bill.run_bill(sweep, sweep.runs[0])
    assert billed.documents == {task: 2}
    if meta.get("mode") == "last":
        assert billed.tokens <= sum(counts) <= 1.25 * billed.tokens, (billed, counts)
    else:
        assert billed.tokens == sum(counts), (billed, counts)


def test_check_prints_each_runs_bill_and_the_total(assets, tmp_path):
    path = sweep_file(tmp_path, runs=("base", "yarn"), samples=(0, 1))
    proc = run_sweep_cli(str(path), "--check", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("bill ")]
    per_run = [int(line.split(": ")[1].split(" input")[0].replace(",", "")) for line in lines[:-1]]
    assert [line.split(":")[0] for line in lines] == ["bill base", "bill yarn", "bill total"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    bos = int(len(tok("a")["input_ids"]) > len(tok("a", add_special_tokens=False)["input_ids"]))
    # the ladder feeds L + target_tokens - 1 tokens (+ a BOS if the tokenizer adds one) per length
    assert per_run == [2 * ((32 + 15 + bos) + (64 + 15 + bos))] * 2
    assert lines[-1].startswith(f"bill total: {sum(per_run):,} input tokens over 2 runs")
