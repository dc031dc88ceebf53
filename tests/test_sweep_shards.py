"""`shards: K`: a run's documents in K pieces that workers claim like runs, assembled into one run.

Real runs of the embedded model, no mocks. The same sweep (three plays, a perplexity task and a
`last` and a `dense` misalignment task) runs once unsharded (the independent computation) and once with
`shards: 2` split between two local workers; the assembled run must equal the unsharded one.
Both sweeps set `batch_tokens: 1`, so hf forwards one sequence at a time: a float32 forward of a
batch differs in the last bits from the same rows batched with other documents (the pieces batch
differently from the whole run; the misalignment task's prompts of varying lengths showed ~1e-6
relative), so with the default budget only the perplexity numbers would be bit-identical. With it,
every value and standard error is compared with ``==``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sweep_files import ENV, ROOT, results_files, run_sweep_cli, sweep_command

from lm_eval_longshort.sweep import SweepError, folder, load_sweep

PLAYS = [0, 1, 2]
TASKS = {
    "longshort_ppl_shakespeare": "longshort_ppl_shakespeare",
    "longshort_misalign_last": {
        "task": "longshort_misalign_shakespeare",
        "as": "longshort_misalign_last",
        "metadata": {"mode": "last", "pairs": 2},
    },
    "longshort_misalign_dense": {  # the distribution of misalignment: histograms merge across pieces
        "task": "longshort_misalign_shakespeare",
        "as": "longshort_misalign_dense",
        "metadata": {"mode": "dense"},
    },
    # Its loss-against-position bins are per-document records too: assembled, not recomputed.
    "longshort_ppl_truncate": {
        "task": "longshort_ppl_shakespeare",
        "as": "longshort_ppl_truncate",
        "metadata": {"protocol": "truncate", "bins_per_doubling": 2},
    },
}


def shard_sweep(where: Path, shards=None, lengths=(64, 128), top: dict | None = None) -> Path:
    """One run of three plays (``shards`` on the run when given; ``top``: sweep-wide keys), both
    tasks, tiny lengths."""
    run = {"name": "three", **({} if shards is None else {"shards": shards})}
    data = {
        "name": "shards",
        "base": "embedded",
        "device": "cpu",
        "model_args": {"dtype": "float32", "max_length": 160},
        "tasks": list(TASKS.values()),
        "metadata": {"lengths": list(lengths), "target_tokens": 32, "batch_tokens": 1},
        "samples": PLAYS,
        "bootstrap_iters": 10,
        "runs": [run],
        **(top or {}),
    }
    where.mkdir(parents=True, exist_ok=True)
    path = where / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _results(out: Path) -> dict:
    (path,) = results_files(out, "three")
    return json.loads(path.read_text())


def _same(x, y) -> bool:
    """Equal, with NaN equal to NaN (a standard error over too few documents is NaN)."""
    both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
    return both_nan or x == y


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, assets) -> tuple[Path, Path, str]:
    """(unsharded output, sharded output, the sharded sweep's log).

    Both sweeps run at once, each process on one CPU thread (`--workers 2` gives its two workers
    one each): three single-threaded processes share 2 cores far better than threads that wait
    for each other (and the suite runs another test file beside this one)."""
    root = tmp_path_factory.mktemp("shards")
    commands = {
        "whole": sweep_command(str(shard_sweep(root / "whole")), "--output", str(root / "whole" / "out")),
        "sharded": sweep_command(
            str(shard_sweep(root / "sharded", shards=2)), "--output", str(root / "sharded" / "out"), "--workers", "2"
        ),
    }
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    logs = {name: proc.communicate(timeout=900) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, name + logs[name][0][-3000:] + logs[name][1][-3000:]
    return root / "whole" / "out", root / "sharded" / "out", logs["sharded"][0]


def test_two_shards_equal_the_unsharded_run(sweeps):
    whole_out, sharded_out, log = sweeps
    whole, sharded = _results(whole_out), _results(sharded_out)
    for i, docs in ((1, 2), (2, 1)):  # near-equal contiguous pieces: plays [0, 1] and [2]
        assert log.count(f"run 1/1 three shard {i}/2: starting") == 1, log
        (piece,) = sorted((sharded_out / "runs" / "three" / "shards" / f"{i}of2").glob("results_*.json"))
        piece = json.loads(piece.read_text())
        assert piece["longshort_sweep"]["plan"]["shard"] == {
            "index": i,
            "of": 2,
            "documents": {task: PLAYS[2 * (i - 1) : 2 * (i - 1) + docs] for task in TASKS},
        }
        for task in TASKS:
            assert len(piece["configs"][task]["longshort"]["documents"]) == docs
    assert log.count("assembled from its 2 shards") == 1, log
    for task in TASKS:
        assert list(sharded["results"][task]) == list(whole["results"][task])
        different = [k for k, v in whole["results"][task].items() if not _same(sharded["results"][task][k], v)]
        assert not different, {k: (whole["results"][task][k], sharded["results"][task][k]) for k in different}
        assert sum(k.endswith("_stderr,none") and isinstance(v, float) for k, v in whole["results"][task].items()) >= 7
        record, reference = sharded["configs"][task]["longshort"], whole["configs"][task]["longshort"]
        assert [d["doc_index"] for d in record["documents"]] == PLAYS
        assert record["documents"] == reference["documents"] and record["measured"] == reference["measured"]
        assert record == reference  # settings and engine too
        assert sharded["n-samples"][task] == whole["n-samples"][task]
    assert (sharded_out / "report" / "values.csv").read_text() == (whole_out / "report" / "values.csv").read_text()
    _histograms_of_two_shards_merge_into_the_whole_runs(sharded_out, whole)
    truncate = sharded["configs"]["longshort_ppl_truncate"]["longshort"]["documents"]
    assert all(len(d["positions"]["n_targets"]) > 10 for d in truncate)  # compared with == above
    assert "ppl_pos@128,none" in sharded["results"]["longshort_ppl_truncate"]
    assert (sharded_out / "report" / "loss_vs_position.png").read_bytes()[:4] == b"\x89PNG"
    status = json.loads((sharded_out / "sweep_status.json").read_text())["three"]
    assert status["status"] == "finished" and set(status["shards"]) == {"1of2", "2of2"}
    # The plan rule: `shards` is part of a sharded run's plan, and the only difference.
    plans = whole["longshort_sweep"]["plan"], sharded["longshort_sweep"]["plan"]
    assert "shards" not in plans[0]["run"] and plans[1]["run"]["shards"] == 2
    assert folder.plan_differences(plans[1], plans[0]) == ["run.shards"]


def _histograms_of_two_shards_merge_into_the_whole_runs(sharded_out: Path, whole: dict) -> None:
    """The dense task's per-position symkl counts, added over the two pieces' documents, equal the
    unsharded run's; its percentiles are read from those counts (numpy: inverted-CDF rank, the bin's
    geometric centre at 20 bins per decade from 1e-8), its maximum is the largest document's."""
    import numpy as np

    task = "longshort_misalign_dense"
    pieces = [
        json.loads(next((sharded_out / "runs" / "three" / "shards" / f"{i}of2").glob("results_*.json")).read_text())
        for i in (1, 2)
    ]
    edges = np.logspace(-8, 2, 201)
    for length in (64, 128):
        name = f"symkl@{length}"
        totals = []
        for documents in (
            [d for p in pieces for d in p["configs"][task]["longshort"]["documents"]],
            whole["configs"][task]["longshort"]["documents"],
        ):
            total = np.zeros(202, dtype=np.int64)
            for doc in documents:
                for index, count in doc["distributions"][name]["counts"]:
                    total[index] += count
            totals.append(total)
        assert np.array_equal(totals[0], totals[1]) and totals[0].sum() > 0
        results = whole["results"][task]
        for q in (50, 90, 99):
            index = int(np.searchsorted(np.cumsum(totals[1]), int(np.ceil(q / 100 * totals[1].sum()))))
            assert 1 <= index <= 200  # these values lie within the bins
            assert results[f"symkl_p{q}@{length},none"] == pytest.approx(
                np.sqrt(edges[index - 1] * edges[index]), rel=1e-12
            )
        maxima = [d["distributions"][name]["max"] for d in whole["configs"][task]["longshort"]["documents"]]
        assert results[f"symkl_max@{length},none"] == max(maxima)


def test_an_unsharded_sweep_does_not_take_a_sharded_run(sweeps, tmp_path):
    _, sharded_out, _ = sweeps
    sweep = load_sweep(shard_sweep(tmp_path), output=sharded_out)  # the same run without shards
    problems = folder.foreign_work(sweep, folder.Layout(sharded_out))
    assert problems == ["runs/three was computed with other run.shards"]


def test_a_shard_of_another_plan_is_refused_and_finished_shards_are_assembled_again(sweeps, tmp_path):
    _, sharded_out, _ = sweeps
    copy = tmp_path / "copy"
    shutil.copytree(sharded_out / "runs", copy / "runs")
    for path in results_files(copy, "three"):
        path.unlink()  # the shards are finished, the run not yet assembled
    other = shard_sweep(tmp_path / "other", shards=2, lengths=(64, 96))
    proc = run_sweep_cli(str(other), "--output", str(copy), OMP_NUM_THREADS="1")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "runs/three/shards/1of2 was computed with other sweep.metadata.lengths" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "starting" not in proc.stdout
    same = run_sweep_cli(str(shard_sweep(tmp_path / "same", shards=2)), "--output", str(copy), OMP_NUM_THREADS="1")
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert "starting" not in same.stdout and "assembled from its 2 shards" in same.stdout
    again, first = _results(copy), _results(sharded_out)
    for task in TASKS:
        assert all(_same(again["results"][task][k], v) for k, v in first["results"][task].items())
        assert again["configs"][task]["longshort"] == first["configs"][task]["longshort"]


@pytest.mark.parametrize(
    "run_shards, top, message",
    [
        (
            4,
            {},
            "run 'three': shards: 4 is more pieces than the run's 3 document(s) (longshort_ppl_shakespeare, "
            "longshort_misalign_last, longshort_misalign_dense, longshort_ppl_truncate); give shards <= 3, or more "
            "documents (samples or limit)",
        ),
        (None, {"shards": 4}, "run 'three': shards: 4 is more pieces than the run's 3 document(s)"),
        (0, {}, "run 'three': shards: a whole number of pieces >= 1 (1: not split), got 0"),
        ("x", {}, "run 'three': shards: a whole number of pieces >= 1 (1: not split), got 'x'"),
        (None, {"shards": True}, "shards: a whole number of pieces >= 1 (1: not split), got True"),
    ],
)
def test_bad_shards_are_one_line_errors_before_any_model_loads(run_shards, top, message, assets, tmp_path, capsys):
    from lm_eval_longshort import cli

    path = shard_sweep(tmp_path, shards=run_shards, top=top)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    (line,) = [line for line in str(info.value).splitlines() if message in line]  # one line names it
    assert line.startswith("  - ")
    code = cli.main(["sweep", str(path), "--check", "--output", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_runs_own_shards_win_and_check_prints_the_pieces(assets, tmp_path, capsys):
    from lm_eval_longshort import cli

    data = yaml.safe_load(shard_sweep(tmp_path, shards=2).read_text())
    data["shards"] = 3
    data["runs"].append({"name": "sweep_wide"})
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    sweep = load_sweep(path)
    assert [run.shards for run in sweep.runs] == [2, 3]
    assert cli.main(["sweep", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "    2 shards; documents 1/2: [0, 1] (2); 2/2: [2] (1)" in out
    assert "    3 shards; documents 1/3: [0] (1); 2/3: [1] (1); 3/3: [2] (1)" in out
    assert "  bill total:" in out and out.count("  bill three:") == 1  # the bill stays per run
