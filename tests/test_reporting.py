"""Tests of lm_eval_longshort.reporting and the lm-eval-longshort CLI.

Results JSONs are written by hand in the layout lm-eval 0.4.13 uses
(``DIR/<model_name_sanitized>/results_<timestamp>.json``), including stderr keys,
"N/A" values, group entries and NaN (lm-eval's json.dumps writes bare ``NaN``), and the
``configs[task]["longshort"]`` record our tasks write (settings, what was measured,
per-document sums, engine). ``legacy=True`` writes a file from before that record.
"""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from lm_eval_longshort import cli, reporting
from lm_eval_longshort.reporting import (
    compare_runs,
    format_length_table,
    load_runs,
    pearson,
    plot_runs,
    spearman,
)

PPL = "longshort_ppl_shakespeare"
MIS = "longshort_misalign_shakespeare"
GROUP = "longshort_shakespeare"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fixtures


def ppl_entry(ppl: dict[int, float], bpb: dict[int, float] | None = None, **scalars) -> dict:
    """A results[task] entry as our ppl task reports it (with stderr keys)."""
    entry = {"alias": " - longshort_ppl_shakespeare"}
    for L, v in ppl.items():
        entry[f"ppl@{L},none"] = v
        entry[f"ppl@{L}_stderr,none"] = "N/A"
    for L, v in (bpb or {}).items():
        entry[f"bpb@{L},none"] = v
        entry[f"bpb@{L}_stderr,none"] = 0.01
    for name, v in scalars.items():
        entry[f"{name.replace('_at_', '@')},none"] = v
    return entry


def mis_entry(symkl: dict[int, float], sce: dict[int, float] | None = None) -> dict:
    """A results[task] entry of a misalign task; js/top1/tv derived from symkl."""
    entry = {"alias": " - longshort_misalign_shakespeare"}
    for L, v in symkl.items():
        entry[f"symkl@{L},none"] = v
        entry[f"js@{L},none"] = v / 8
        entry[f"top1@{L},none"] = 0.9
        entry[f"tv@{L},none"] = v / 2
        entry[f"symkl@{L}_stderr,none"] = "N/A"
    for L, v in (sce or {}).items():
        entry[f"sce@{L},none"] = v
    return entry


def record(
    task: str, documents: list[dict] | None = None, backend: str = "hf", dtype: str = "float32", **settings
) -> dict:
    """A ``configs[task]["longshort"]`` record; ``settings`` override the defaults below."""
    kind = "misalign" if "misalign" in task else "ppl"
    resolved = {
        "lengths": [1024, 4096],
        "target_tokens": 256,
        "seed": 1234,
        "add_bos": "auto",
        **({"pairs": 4, "mode": "last", "min_ratio": 0.5} if kind == "misalign" else {"protocol": "ladder"}),
        **settings,
    }
    measured = {**resolved, "task": task, "data": {"corpus": "shakespeare"}, "documents": "d" * 40}
    return {
        "format": 1,
        "kind": kind,
        "settings": {**resolved, "batch_tokens": 8192},
        "measured": measured,
        "documents": documents or [],
        "stderr": "delta",
        "engine": {"backend": backend, "dtype": dtype, "model": "m", "fingerprint": "ab"},
    }


def write_results(
    root: Path,
    model_dir: str,
    results: dict,
    model_args: str | dict | None = None,
    stamp: str = "2025-06-01T12-00-00.000000",
    records: dict | None = None,
    legacy: bool = False,
) -> Path:
    """Write one results file the way lm-eval's EvaluationTracker does.

    ``records`` map a task to its longshort record (default: ``record(task)``, so all runs
    written without one measured the same thing); ``legacy`` writes none at all.
    """
    if model_args is None:
        model_args = f"pretrained=/models/{model_dir},dtype=float32"
    tasks = [t for t in results if t != GROUP]
    configs = {t: {"task": t, "metadata": {"version": 1.0, "lengths": [1024, 4096]}} for t in tasks}
    if not legacy:
        for t in tasks:
            if t.startswith("longshort_"):
                configs[t]["longshort"] = (records or {}).get(t) or record(t)
    data = {
        "results": {GROUP: {"alias": GROUP}, **results},
        "groups": {},
        "group_subtasks": {GROUP: tasks, **{t: [] for t in tasks}},
        "configs": configs,
        "versions": {t: 1.0 for t in tasks},
        "n-samples": {t: {"original": 3, "effective": 3} for t in tasks},
        "config": {"model": "hf", "model_args": model_args, "batch_size": 1},
        "model_name": f"/models/{model_dir}",
        "model_name_sanitized": f"__models__{model_dir}",
    }
    folder = root / f"__models__{model_dir}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"results_{stamp}.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")  # NaN written as bare NaN
    return path


@pytest.fixture
def one_run(tmp_path: Path) -> Path:
    """A full run: ppl + misalign tasks, a NaN cell, a length only ppl has."""
    return write_results(
        tmp_path,
        "smollm2-135m-instruct",
        {
            PPL: ppl_entry(
                {1024: 21.5, 4096: 18.25, 8192: 17.0},
                bpb={1024: 1.25, 4096: 1.125},
                ppl_at_max=17.0,
                keyppl=3.5,
                key_frac=0.125,
                skipped_docs=2,
            ),
            MIS: mis_entry({1024: 0.0625, 4096: math.nan}, sce={1024: 4.5, 4096: 4.75}),
        },
    )


def three_models(root: Path) -> list[Path]:
    """Three models at 1k/4k/8k (8k only in one run) for compare tests."""
    specs = {
        "a": ({1024: 20.0, 4096: 18.0, 8192: 30.0}, {1024: 0.05, 4096: 0.10, 8192: 0.9}),
        "b": ({1024: 14.0, 4096: 13.0}, {1024: 0.03, 4096: 0.04}),
        "c": ({1024: 17.0, 4096: 25.0}, {1024: 0.04, 4096: 0.07}),
    }
    return [write_results(root, name, {PPL: ppl_entry(p), MIS: mis_entry(m)}) for name, (p, m) in specs.items()]


# --------------------------------------------------------------------------- parsing


def test_parse_metric_key():
    assert reporting.parse_metric_key("ppl@4096,none") == ("ppl", 4096, "none")
    assert reporting.parse_metric_key("ppl@max,none") == ("ppl@max", None, "none")
    assert reporting.parse_metric_key("keyppl,none") == ("keyppl", None, "none")
    assert reporting.parse_metric_key("ppl@4096_stderr,none") is None
    assert reporting.parse_metric_key("keyppl_stderr,none") is None
    assert reporting.parse_metric_key("alias") is None


def test_load_single_file(one_run: Path):
    (run,) = load_runs([one_run])
    assert run.label == "smollm2-135m-instruct"
    assert run.path == one_run
    assert set(run.per_length) == {PPL, MIS}  # the group entry is dropped
    assert run.per_length[PPL]["ppl"] == {1024: 21.5, 4096: 18.25, 8192: 17.0}
    assert run.per_length[PPL]["bpb"] == {1024: 1.25, 4096: 1.125}
    assert run.scalars[PPL] == {"ppl@max": 17.0, "keyppl": 3.5, "key_frac": 0.125, "skipped_docs": 2.0}
    assert run.per_length[MIS]["symkl"][1024] == 0.0625
    assert math.isnan(run.per_length[MIS]["symkl"][4096])
    assert not any("stderr" in m for t in run.per_length.values() for m in t)
    assert run.ppl_tasks == [PPL] and run.misalign_tasks == [MIS]
    assert run.lengths == [1024, 4096, 8192]
    assert run.metadata[PPL]["lengths"] == [1024, 4096]


def test_group_with_only_alias_is_ignored_even_without_group_subtasks(tmp_path: Path):
    path = write_results(tmp_path, "m", {PPL: ppl_entry({1024: 10.0})})
    data = json.loads(path.read_text())
    del data["group_subtasks"]
    path.write_text(json.dumps(data))
    (run,) = load_runs([path])
    assert list(run.per_length) == [PPL]


def test_none_filter_wins(tmp_path: Path):
    entry = {"ppl@1024,strip": 99.0, "ppl@1024,none": 10.0, "ppl@2048,strip": 7.0}
    (run,) = load_runs([write_results(tmp_path, "m", {PPL: entry})])
    assert run.per_length[PPL]["ppl"] == {1024: 10.0, 2048: 7.0}


def test_label_variants(tmp_path: Path):
    hub = write_results(
        tmp_path,
        "x",
        {PPL: ppl_entry({1024: 1.0})},
        model_args={"pretrained": "HuggingFaceTB/SmolLM2-135M", "dtype": "float32"},
    )
    gguf = write_results(
        tmp_path, "y", {PPL: ppl_entry({1024: 1.0})}, model_args="pretrained=/m/smol/,gguf_file=/m/smol/model-f16.gguf"
    )
    runs = load_runs([hub, gguf])
    assert [r.label for r in runs] == ["SmolLM2-135M", "smol:model-f16.gguf"]
    assert [r.label for r in load_runs([hub, gguf], labels=["one", "two"])] == ["one", "two"]


def test_duplicate_labels_get_file_name(tmp_path: Path):
    first = write_results(tmp_path / "r1", "m", {PPL: ppl_entry({1024: 1.0})}, stamp="2025-01-01T00-00-00")
    second = write_results(tmp_path / "r2", "m", {PPL: ppl_entry({1024: 2.0})}, stamp="2025-02-01T00-00-00")
    labels = [r.label for r in load_runs([first, second])]
    assert labels == ["m (results_2025-01-01T00-00-00)", "m (results_2025-02-01T00-00-00)"]
    same_name = write_results(tmp_path / "r3", "m", {PPL: ppl_entry({1024: 3.0})}, stamp="2025-01-01T00-00-00")
    labels = [r.label for r in load_runs([first, same_name])]
    assert len(set(labels)) == 2


def test_directory_merges_files_of_one_model(tmp_path: Path):
    """ppl and misalign run in two lm_eval calls; a rerun of ppl overrides the old ppl."""
    write_results(tmp_path, "m", {PPL: ppl_entry({1024: 50.0})}, stamp="2025-01-01T00-00-00")
    write_results(tmp_path, "m", {MIS: mis_entry({1024: 0.5})}, stamp="2025-01-02T00-00-00")
    newest = write_results(tmp_path, "m", {PPL: ppl_entry({1024: 40.0})}, stamp="2025-01-03T00-00-00")
    write_results(tmp_path, "other", {PPL: ppl_entry({1024: 9.0})})
    (tmp_path / "__models__m" / "samples_x.jsonl").write_text("{}\n")  # not a results file
    runs = load_runs([tmp_path])
    assert [r.label for r in runs] == ["m", "other"]
    merged = runs[0]
    assert merged.per_length[PPL]["ppl"] == {1024: 40.0}
    assert merged.per_length[MIS]["symkl"] == {1024: 0.5}
    assert merged.path == newest and len(merged.sources) == 3
    # the same file given again (directly) is not loaded twice
    assert len(load_runs([tmp_path, newest])) == 2


def test_load_errors(tmp_path: Path):
    with pytest.raises(reporting.ReportingError, match="no such file"):
        load_runs([tmp_path / "missing.json"])
    with pytest.raises(reporting.ReportingError, match="no results_"):
        load_runs([tmp_path])
    bad = tmp_path / "results_bad.json"
    bad.write_text("{not json")
    with pytest.raises(reporting.ReportingError, match="not valid JSON"):
        load_runs([bad])
    bad.write_text('{"foo": 1}')
    with pytest.raises(reporting.ReportingError, match="no 'results' object"):
        load_runs([bad])
    good = write_results(tmp_path, "m", {PPL: ppl_entry({1024: 1.0})})
    with pytest.raises(reporting.ReportingError, match="1 run"):
        load_runs([good], labels=["a", "b"])


# --------------------------------------------------------------------------- table


def _table_rows(table: str) -> dict[str, list[str]]:
    """Body rows keyed by their L cell (first cell), cells split on '|' groups and spaces."""
    rows = {}
    for line in table.splitlines():
        first = line.split("|")[0].strip()
        if first.isdigit():
            rows[first] = [cell.split() for cell in line.split("|")]
    return rows


def test_length_table(one_run: Path):
    (run,) = load_runs([one_run])
    table = format_length_table(run)
    lines = table.splitlines()
    assert "ppl_shakespeare" in lines[0] and "misalign_shakespeare" in lines[0]
    assert lines[1].split() == ["L", "|", "ppl", "bpb", "|", "symkl", "sce", "js", "top1", "tv"]
    rows = _table_rows(table)
    assert list(rows) == ["1024", "4096", "8192"]  # ascending
    # bpb has a standard error (0.01); ppl's is "N/A", shown as the value alone
    assert rows["1024"][1:] == [["21.5", "1.25±0.01"], ["0.0625", "4.5", "0.0078125", "0.9", "0.03125"]]
    assert rows["4096"][1:] == [["18.25", "1.125±0.01"], ["nan", "4.75", "nan", "0.9", "nan"]]
    assert rows["8192"][1:] == [["17"], []]  # missing cells are blank
    # the blank bpb cell sits under the bpb column: "17" ends where "ppl" ends
    row_8k = next(line for line in lines if line.startswith(" 8192") or line.startswith("8192"))
    assert row_8k.index("17") + 2 == lines[1].index("ppl") + 3
    assert run.error(PPL, "bpb", 1024) == 0.01 and run.error(PPL, "ppl", 1024) is None
    # equal-width lines up to trailing blanks: a terminal-aligned table
    assert len({len(line) for line in lines[1:4]}) == 1


def test_run_report_has_scalars(one_run: Path):
    (run,) = load_runs([one_run])
    text = reporting.format_run_report(run)
    assert text.startswith("== smollm2-135m-instruct  [hf, float32]")
    assert "± = standard error over documents (delta method)" in text
    assert "ppl@max=17" in text and "keyppl=3.5" in text and "skipped_docs=2" in text


# --------------------------------------------------------------------------- plot


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png(tmp_path: Path, one_run: Path):
    runs = load_runs([one_run, *three_models(tmp_path / "more")])
    out = plot_runs(runs, tmp_path / "plots" / "fig.png", trained_context=8192, title="t")
    assert out.stat().st_size > 1000
    width, height = _png_size(out)
    assert (width, height) == (round(5.6 * 3 * 120), round(4.6 * 120))  # 3 panels at dpi 120


def test_plot_ppl_only_and_nothing_to_plot(tmp_path: Path):
    path = write_results(tmp_path, "m", {PPL: ppl_entry({1024: 10.0, 2048: 9.0})})
    out = plot_runs(load_runs([path]), tmp_path / "ppl.png")
    assert _png_size(out) == (round(5.6 * 120), round(4.6 * 120))
    empty = write_results(tmp_path, "e", {"other_task": {"acc,none": 0.5}})
    with pytest.raises(reporting.ReportingError, match="nothing to plot"):
        plot_runs(load_runs([empty]), tmp_path / "e.png")


def test_plot_axis_ticks_at_lengths():
    from matplotlib.figure import Figure

    from lm_eval_longshort.reporting import plots

    run = reporting.Run("r", Path("x.json"), per_length={PPL: {"ppl": {1024: 30.0, 4096: 2.0, 12288: 1.5}}})
    (series,) = plots._series([(run, PPL)], "ppl")
    ax = Figure().subplots()
    plots._draw_panel(ax, [series], "ppl", {"r": "C0"}, trained_context=8192, subtitle=PPL)
    assert list(ax.get_xticks()) == [1024, 4096, 8192, 12288]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1k", "4k", "8k", "12k"]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"  # 30 / 1.5 > 10x
    assert reporting.length_label(1536) == "1.5k" and reporting.length_label(1000) == "1000"


# --------------------------------------------------------------------------- correlations


def textbook_pearson(x, y):
    """r = Σ(x-x̄)(y-ȳ) / sqrt(Σ(x-x̄)² Σ(y-ȳ)²), written as plain loops."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def textbook_spearman_no_ties(x, y):
    """rho = 1 - 6 Σ d² / (n (n² - 1)), valid only without ties."""
    n = len(x)
    rank = lambda v: {val: i + 1 for i, val in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(x), rank(y)
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y))
    return 1 - 6 * d2 / (n * (n * n - 1))


def textbook_spearman(x, y):
    """Tie-aware: rank(v) = #(values < v) + (#(values == v) + 1) / 2, then Pearson of ranks."""
    rank = lambda vs: [sum(u < v for u in vs) + (sum(u == v for u in vs) + 1) / 2 for v in vs]  # noqa: E731
    return textbook_pearson(rank(x), rank(y))


def test_pearson_matches_textbook():
    x = [0.05, 0.03, 0.04, 0.11, 0.02]
    y = [20.0, 14.0, 17.0, 25.0, 16.0]
    assert pearson(x, y) == pytest.approx(textbook_pearson(x, y), abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # constant side
    assert math.isnan(pearson([1], [2]))


def test_spearman():
    x = [0.05, 0.03, 0.04, 0.11, 0.02]
    y = [20.0, 14.0, 17.0, 25.0, 16.0]
    assert spearman(x, y) == pytest.approx(textbook_spearman_no_ties(x, y), abs=1e-12)
    # perfectly monotone but nonlinear: rho = 1 while r < 1
    xs = [1, 2, 3, 4, 5]
    ys = [math.exp(v) for v in xs]
    assert spearman(xs, ys) == pytest.approx(1.0) and pearson(xs, ys) < 0.99
    # ties: ranks of x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; worked by hand, rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert math.isnan(spearman([5, 5, 5], [1, 2, 3]))  # constant side: undefined, not an error
    tied_x, tied_y = [3, 1, 3, 2, 3, 1], [0.5, 0.1, 0.2, 0.2, 0.9, 0.0]
    assert spearman(tied_x, tied_y) == pytest.approx(textbook_spearman(tied_x, tied_y), abs=1e-12)


def test_compare_runs(tmp_path: Path):
    runs = load_runs(three_models(tmp_path))
    result = compare_runs(runs)
    assert (result.ppl_task, result.misalign_task) == (PPL, MIS)
    # 8192 is reported by one run only: no rows for it
    assert sorted({r["L"] for r in result.rows}) == [1024, 4096]
    assert [(r["label"], r["L"]) for r in result.rows[:3]] == [("a", 1024), ("b", 1024), ("c", 1024)]
    assert result.rows[0]["ppl"] == 20.0 and result.rows[0]["symkl"] == 0.05
    assert result.columns[:4] == ["label", "L", "ppl", "bpb"] and "sce" in result.columns
    by_length = {c.length: c for c in result.per_length}
    mis = {1024: [0.05, 0.03, 0.04], 4096: [0.10, 0.04, 0.07]}
    ppl = {1024: [20.0, 14.0, 17.0], 4096: [18.0, 13.0, 25.0]}
    for L in (1024, 4096):
        assert by_length[L].n == 3
        assert by_length[L].pearson == pytest.approx(textbook_pearson(mis[L], ppl[L]), abs=1e-12)
        assert by_length[L].spearman == pytest.approx(textbook_spearman_no_ties(mis[L], ppl[L]), abs=1e-12)
    assert by_length[1024].spearman == pytest.approx(1.0)
    assert by_length[4096].spearman == pytest.approx(0.5)  # ranks (3,1,2) vs (2,1,3)
    pooled_x, pooled_y = mis[1024] + mis[4096], ppl[1024] + ppl[4096]
    assert result.pooled.length is None and result.pooled.n == 6
    assert result.pooled.pearson == pytest.approx(textbook_pearson(pooled_x, pooled_y), abs=1e-12)
    assert pooled_x.count(0.04) == 2  # a tie across lengths: the no-ties formula would be wrong
    assert result.pooled.spearman == pytest.approx(textbook_spearman(pooled_x, pooled_y), abs=1e-12)


def test_compare_skips_nan_and_uses_bpb(tmp_path: Path):
    paths = [
        write_results(tmp_path, "a", {PPL: ppl_entry({1024: 9.0}, bpb={1024: 1.0}), MIS: mis_entry({1024: 0.1})}),
        write_results(tmp_path, "b", {PPL: ppl_entry({1024: 8.0}, bpb={1024: 0.5}), MIS: mis_entry({1024: math.nan})}),
        write_results(tmp_path, "c", {PPL: ppl_entry({1024: 7.0}, bpb={1024: 0.25}), MIS: mis_entry({1024: 0.0})}),
    ]
    result = compare_runs(load_runs(paths), misalign_metric="tv", ppl_metric="bpb")
    assert len(result.rows) == 3 and result.per_length[0].n == 2  # b's NaN is left out
    assert result.per_length[0].pearson == pytest.approx(1.0)


def test_compare_errors_and_task_choice(tmp_path: Path):
    other = "longshort_ppl_pg19"
    paths = [
        write_results(
            tmp_path,
            name,
            {PPL: ppl_entry({1024: v}), other: ppl_entry({1024: v + 1}), MIS: mis_entry({1024: v / 100})},
        )
        for name, v in (("a", 10.0), ("b", 12.0), ("c", 11.0))
    ]
    runs = load_runs(paths)
    with pytest.raises(reporting.ReportingError, match="--ppl-task"):
        compare_runs(runs)
    assert compare_runs(runs, ppl_task="pg19").ppl_task == other
    assert compare_runs(runs, ppl_task=PPL).ppl_task == PPL
    with pytest.raises(reporting.ReportingError, match="matches 0"):
        compare_runs(runs, ppl_task="wiki")
    with pytest.raises(reporting.ReportingError, match="no run reports per-length 'sce'"):
        compare_runs(runs, misalign_metric="sce", ppl_task="pg19")
    with pytest.raises(reporting.ReportingError, match="2 or more runs"):
        compare_runs(runs[:1], ppl_task="pg19")


def test_compare_outputs(tmp_path: Path):
    result = compare_runs(load_runs(three_models(tmp_path)))
    rows_csv = result.to_csv(tmp_path / "out" / "rows.csv")
    with rows_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["label"] == "a" and rows[0]["L"] == "1024"
    assert float(rows[0]["ppl"]) == 20.0 and rows[0]["bpb"] == ""  # no bpb in these runs
    corr_csv = result.to_csv(tmp_path / "corr.csv", table="correlations")
    with corr_csv.open() as fh:
        corr = list(csv.DictReader(fh))
    assert [c["L"] for c in corr] == ["1024", "4096", "pooled"]
    assert float(corr[1]["spearman_rho"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rows"):
        result.to_csv(tmp_path / "x.csv", table="nope")

    md = result.to_markdown()
    assert "| label | L | ppl | bpb | symkl |" in md
    assert "| a | 1024 | 20 |  | 0.05 |" in md
    assert "| 4096 | 3 |" in md and "| pooled | 6 |" in md

    text = result.to_text()
    assert "pooled" in text and "spearman_rho" in text
    assert any(line.split()[:3] == ["b", "4096", "13"] for line in text.splitlines())


# --------------------------------------------------------------------------- grouping by what was measured


def _mixed_lengths(root: Path) -> list[Path]:
    """Runs a and b measured ppl with lengths [128, 256]; run c with [128, 192] (other tokens)."""
    specs = {"a": ([128, 256], 20.0), "b": ([128, 256], 14.0), "c": ([128, 192], 17.0)}
    paths = []
    for name, (lengths, v) in specs.items():
        results = {
            PPL: ppl_entry({L: v + i for i, L in enumerate(lengths)}),
            MIS: mis_entry({L: v / 100 for L in lengths}),
        }
        records = {PPL: record(PPL, lengths=lengths), MIS: record(MIS, lengths=lengths)}
        paths.append(write_results(root, name, results, records=records))
    return paths


def test_groups_name_the_runs_and_the_differing_keys(tmp_path: Path):
    runs = load_runs(_mixed_lengths(tmp_path))
    groups = reporting.groups_by_kind(runs)
    assert [[r.label for r, _ in g.members] for g in groups["ppl"]] == [["a", "b"], ["c"]]
    text = reporting.describe_all(runs)
    assert "ppl results measured 2 different things" in text
    assert "group 1: runs a, b with lengths [128, 256]" in text
    assert "group 2: run c with lengths [128, 192]" in text
    assert "keys differing: lengths" in text and "misalign results measured 2" in text


def test_groups_name_nested_data_keys_and_document_sets(tmp_path: Path):
    other_files = record(PPL)
    other_files["measured"]["data"] = {"files": "docs/*.txt"}
    other_docs = record(PPL)
    other_docs["measured"]["documents"] = "e" * 40  # e.g. another --limit
    paths = [
        write_results(tmp_path, "a", {PPL: ppl_entry({1024: 3.0})}),
        write_results(tmp_path, "b", {PPL: ppl_entry({1024: 3.0})}, records={PPL: other_files}),
        write_results(tmp_path, "c", {PPL: ppl_entry({1024: 3.0})}, records={PPL: other_docs}),
    ]
    text = reporting.describe_all(load_runs(paths))
    assert "keys differing: data.corpus, data.files, documents" in text
    assert 'group 2: run b with no data.corpus, data.files "docs/*.txt", documents "dddddddddddd..."' in text
    assert 'group 3: run c with data.corpus "shakespeare", no data.files, documents "eeeeeeeeeeee..."' in text


def test_legacy_results_load_as_their_own_group(tmp_path: Path):
    """A file without the longshort record still loads; its settings are unknown, and said so."""
    old = write_results(tmp_path, "old", {PPL: ppl_entry({1024: 3.0}), MIS: mis_entry({1024: 0.1})}, legacy=True)
    new = write_results(tmp_path, "new", {PPL: ppl_entry({1024: 4.0}), MIS: mis_entry({1024: 0.2})})
    runs = load_runs([old, new])
    assert runs[0].longshort[PPL] is None and runs[0].measured(PPL) is None
    assert (runs[0].backend, runs[0].dtype) == ("hf", "float32")  # from lm-eval's config
    assert runs[0].per_length[PPL]["ppl"] == {1024: 3.0}
    assert "run old settings unknown (results file written before the longshort record" in reporting.describe_all(runs)
    with pytest.raises(reporting.ReportingError, match="settings unknown"):
        compare_runs(runs)


def test_compare_refuses_runs_that_measured_different_things(tmp_path: Path, capsys):
    paths = _mixed_lengths(tmp_path)
    with pytest.raises(reporting.ReportingError) as info:
        compare_runs(load_runs(paths))
    message = str(info.value)
    assert "keys differing: lengths" in message and "run c with lengths [128, 192]" in message
    assert cli.main(["compare", *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert "keys differing: lengths" in err and "Traceback" not in err
    # the runs of one group compare fine
    assert cli.main(["compare", *map(str, paths[:2])]) == 0


def test_report_keeps_groups_apart_and_shows_engines(tmp_path: Path, capsys):
    paths = _mixed_lengths(tmp_path)
    vllm = write_results(
        tmp_path,
        "v",
        {PPL: ppl_entry({128: 9.0, 256: 8.0})},
        records={PPL: record(PPL, backend="vllm", dtype="bfloat16", lengths=[128, 256])},
    )
    assert cli.main(["report", *map(str, paths), str(vllm)]) == 0
    out = capsys.readouterr().out
    assert "== a  [hf, float32]" in out and "== v  [vllm, bfloat16]" in out
    assert "group 1: runs a, b, v with lengths [128, 256]" in out
    assert "keys differing: lengths" in out


def test_plot_draws_each_group_in_its_own_row(tmp_path: Path):
    out = plot_runs(load_runs(_mixed_lengths(tmp_path)), tmp_path / "g.png")
    # columns ppl, symkl (no sce in these runs); rows: the two groups
    assert _png_size(out) == (round(5.6 * 2 * 120), round(4.6 * 2 * 120))


def test_plot_error_bars_are_the_reported_stderrs():
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    from lm_eval_longshort.reporting import plots

    run = reporting.Run(
        "r",
        Path("x.json"),
        per_length={PPL: {"ppl": {128: 30.0, 256: 20.0}}},
        stderr={PPL: {"ppl": {128: 1.5, 256: 0.25}}},
    )
    (series,) = plots._series([(run, PPL)], "ppl")
    ax = Figure().subplots()
    plots._draw_panel(ax, [series], "ppl", {"r": "C0"}, trained_context=None, subtitle="")
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = container.lines[2][0].get_segments()  # one vertical bar per point
    assert [(s[0][1], s[1][1]) for s in segments] == [(28.5, 31.5), (19.75, 20.25)]


# --------------------------------------------------------------------------- paired differences


def _documents(rng, n_docs: int, lengths: list[int]) -> list[dict]:
    """Per-document sums for ppl/bpb/symkl at each length; one skipped document at the end."""
    docs = []
    for d in range(n_docs):
        n_targets = int(rng.integers(20, 60))
        sums = {}
        for L in lengths:
            nll = n_targets * rng.uniform(1.5, 3.5)
            sums[f"ppl@{L}"] = [nll, n_targets]
            sums[f"bpb@{L}"] = [nll, n_targets * 4]
            n_pairs = int(rng.integers(1, 5))
            sums[f"symkl@{L}"] = [n_pairs * rng.uniform(0.0, 0.4), n_pairs]
        docs.append(
            {"doc_index": d, "title": f"t{d}", "sha1": f"{d:040x}", "n_tokens": 999, "skipped": False, "sums": sums}
        )
    docs.append({"doc_index": n_docs, "title": "short", "sha1": "f" * 40, "n_tokens": 9, "skipped": True})
    return docs


def _values(docs: list[dict], key: str, metric: str) -> float:
    """The reported value of ``key`` from the sums (what the task's aggregation returns)."""
    a = sum(d["sums"][key][0] for d in docs if not d["skipped"])
    b = sum(d["sums"][key][1] for d in docs if not d["skipped"])
    return {"ppl": math.exp(a / b), "bpb": a / b / math.log(2)}.get(metric, a / b)


def _run_with_documents(root: Path, name: str, docs: list[dict], lengths: list[int]) -> Path:
    ppl = {L: _values(docs, f"ppl@{L}", "ppl") for L in lengths}
    bpb = {L: _values(docs, f"bpb@{L}", "bpb") for L in lengths}
    mis = {L: _values(docs, f"symkl@{L}", "symkl") for L in lengths}
    records = {PPL: record(PPL, documents=docs, lengths=lengths), MIS: record(MIS, documents=docs, lengths=lengths)}
    return write_results(root, name, {PPL: ppl_entry(ppl, bpb), MIS: mis_entry(mis)}, records=records)


def delta_paired(x: np.ndarray, y: np.ndarray, metric: str) -> tuple[float, float]:
    """Paired difference and its delta-method standard error, written independently.

    ``x``, ``y``: [n_docs, 2] (numerator, denominator) of the same documents. The statistic
    is D = f(mean a_x / mean b_x) - f(mean a_y / mean b_y) (f = exp, /ln 2 or identity), a
    function of the four means; se² = ∇Dᵀ Cov ∇D / n with the sample covariance (np.cov) of
    the per-document vectors (a_x, b_x, a_y, b_y).
    """
    f, df = {"ppl": (np.exp, np.exp), "bpb": (lambda r: r / np.log(2), lambda r: 1 / np.log(2))}.get(
        metric, (lambda r: r, lambda r: 1.0)
    )
    means = np.concatenate([x, y], axis=1).mean(axis=0)
    rx, ry = means[0] / means[1], means[2] / means[3]
    grad = np.array([df(rx) / means[1], -df(rx) * rx / means[1], -df(ry) / means[3], df(ry) * ry / means[3]])
    cov = np.cov(np.concatenate([x, y], axis=1), rowvar=False)
    return float(f(rx) - f(ry)), float(np.sqrt(grad @ cov @ grad / len(x)))


def _sums(docs: list[dict], key: str) -> dict[int, list[float]]:
    return {d["doc_index"]: d["sums"][key] for d in docs if not d["skipped"]}


def test_paired_differences_match_a_direct_computation(tmp_path: Path):
    rng = np.random.default_rng(7)
    lengths = [128, 256]
    docs_a, docs_b = _documents(rng, 6, lengths), _documents(rng, 6, lengths)
    for doc_a, doc_b in zip(docs_a, docs_b):  # the same documents, scored by two models
        doc_b.update({k: doc_a[k] for k in ("doc_index", "sha1", "skipped")})
    paths = [
        _run_with_documents(tmp_path, "a", docs_a, lengths),
        _run_with_documents(tmp_path, "b", docs_b[::-1], lengths),
    ]  # other order: matched by key
    result = compare_runs(load_runs(paths), misalign_metric="symkl", ppl_metric="ppl")

    between = {(d.label, d.versus, d.metric, d.length): d for d in result.between_runs}
    assert set(between) == {("b", "a", m, L) for m in ("ppl", "symkl") for L in lengths}
    for (_, _, metric, L), diff in between.items():
        sa, sb = _sums(docs_a, f"{metric}@{L}"), _sums(docs_b, f"{metric}@{L}")
        order = sorted(sa)
        want, want_se = delta_paired(np.array([sb[i] for i in order]), np.array([sa[i] for i in order]), metric)
        assert diff.n_docs == 6 and diff.versus_length == L
        assert diff.difference == pytest.approx(want, rel=1e-12)
        assert diff.difference == pytest.approx(
            _values(docs_b, f"{metric}@{L}", metric) - _values(docs_a, f"{metric}@{L}", metric), rel=1e-12
        )
        assert diff.stderr == pytest.approx(want_se, rel=1e-9) and diff.stderr > 0

    within = {(d.label, d.metric): d for d in result.between_lengths}
    assert set(within) == {(r, m) for r in ("a", "b") for m in ("ppl", "symkl")}
    for (label, metric), diff in within.items():
        docs = docs_a if label == "a" else docs_b
        s_long, s_short = _sums(docs, f"{metric}@256"), _sums(docs, f"{metric}@128")
        order = sorted(s_long)
        want, want_se = delta_paired(
            np.array([s_long[i] for i in order]), np.array([s_short[i] for i in order]), metric
        )
        assert (diff.versus, diff.length, diff.versus_length) == (label, 256, 128)
        assert diff.difference == pytest.approx(want, rel=1e-12)
        assert diff.stderr == pytest.approx(want_se, rel=1e-9)
    # bpb: the "bits" transform
    (bpb,) = compare_runs(load_runs(paths), ppl_metric="bpb").between_runs[:1]
    sa, sb = _sums(docs_a, "bpb@128"), _sums(docs_b, "bpb@128")
    want, want_se = delta_paired(np.array([sb[i] for i in range(6)]), np.array([sa[i] for i in range(6)]), "bpb")
    assert (bpb.metric, bpb.difference, bpb.stderr) == ("bpb", pytest.approx(want), pytest.approx(want_se))


def test_paired_difference_of_identical_runs_is_zero_with_zero_error(tmp_path: Path):
    docs = _documents(np.random.default_rng(3), 4, [128, 256])
    paths = [_run_with_documents(tmp_path, n, docs, [128, 256]) for n in ("a", "b")]
    result = compare_runs(load_runs(paths), baseline="b")
    assert {d.label for d in result.between_runs} == {"a"}
    assert all(d.difference == 0 and d.stderr == 0 for d in result.between_runs)
    with pytest.raises(reporting.ReportingError, match="--baseline 'z' is not a run label"):
        compare_runs(load_runs(paths), baseline="z")


def test_compare_prints_engines_differences_and_writes_them(tmp_path: Path, capsys):
    rng = np.random.default_rng(5)
    docs_a = _documents(rng, 3, [128, 256])
    docs_b = [{**d, "sums": {k: [v[0] * 1.1, v[1]] for k, v in d.get("sums", {}).items()}} for d in docs_a]
    paths = [
        _run_with_documents(tmp_path, "a", docs_a, [128, 256]),
        _run_with_documents(tmp_path, "b", docs_b, [128, 256]),
    ]
    csv_path = tmp_path / "cmp.csv"
    assert cli.main(["compare", *map(str, paths), "--csv", str(csv_path), "--markdown", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    runs_table = out.split("\n\n")[0].splitlines()
    assert runs_table[0] == "Runs" and runs_table[1].split()[:3] == ["label", "backend", "dtype"]
    assert runs_table[3].split()[:3] == ["a", "hf", "float32"]
    assert "Paired differences between runs" in out and "Paired differences between lengths" in out
    with (tmp_path / "cmp_differences.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    ppl_128 = next(r for r in rows if (r["label"], r["versus"], r["metric"], r["L"]) == ("b", "a", "ppl", "128"))
    assert float(ppl_128["difference"]) == pytest.approx(
        _values(docs_b, "ppl@128", "ppl") - _values(docs_a, "ppl@128", "ppl"), rel=1e-12
    )
    assert "### Paired differences between runs" in (tmp_path / "c.md").read_text()


# --------------------------------------------------------------------------- CLI


def test_cli_report(capsys, one_run: Path):
    assert cli.main(["report", str(one_run)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "21.5" in out and "keyppl=3.5" in out
    assert cli.main(["report", str(one_run), "--label", "mine"]) == 0
    assert capsys.readouterr().out.startswith("== mine")


def test_cli_plot(tmp_path: Path, capsys):
    paths = [str(p) for p in three_models(tmp_path)]
    out = tmp_path / "fig.png"
    argv = ["plot", *paths, "-o", str(out), "--trained-context", "4096", "--label", "x", "y", "z"]
    assert cli.main(argv) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_cli_compare(tmp_path: Path, capsys):
    three_models(tmp_path / "res")
    csv_path, md_path = tmp_path / "cmp.csv", tmp_path / "cmp.md"
    argv = ["compare", str(tmp_path / "res"), "--metric", "symkl", "--csv", str(csv_path), "--markdown", str(md_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "pearson_r" in out and "pooled" in out
    assert csv_path.exists() and (tmp_path / "cmp_correlations.csv").exists()
    assert md_path.read_text().startswith("## symkl@L")


def test_cli_errors(tmp_path: Path, capsys):
    assert cli.main(["report", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main([]) == 2
    with pytest.raises(SystemExit):
        cli.main(["compare", "x.json", "--metric", "bogus"])


def test_cli_prepare_and_model_args_on_real_assets(capsys):
    """`prepare` is idempotent on the prepared cache and prints the model args `model-args` prints."""
    from lm_eval_longshort import assets

    prepared = assets.prepare(progress=False)
    assert cli.main(["prepare", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"pretrained={prepared.model_dir}" in out
    assert f"gguf_file={prepared.gguf_file}" in out
    assert "lm_eval --model hf" in out and "--tasks longshort_ppl_shakespeare" in out
    assert cli.main(["model-args"]) == 0
    assert capsys.readouterr().out.strip() == prepared.model_args()
    assert cli.main(["model-args", "--gguf"]) == 0
    assert capsys.readouterr().out.strip() == prepared.gguf_model_args()


def test_subcommand_registry():
    assert {"plot", "report", "compare", "prepare"} <= set(cli.SUBCOMMANDS)
    assert all(callable(c.add_arguments) and callable(c.run) for c in cli.SUBCOMMANDS.values())


# --------------------------------------------------------------------------- small things (issue 7, item 7)


@pytest.mark.parametrize(
    "name, says",
    [
        ("x.pdfx", "matplotlib cannot write '.pdfx' files; use one of"),
        ("noext", "no file extension; add one, e.g. -o {out}.png"),
    ],
)
def test_plot_bad_output_name_is_one_line_and_writes_nothing(tmp_path: Path, capsys, one_run: Path, name, says):
    out = tmp_path / "figs" / name
    assert cli.main(["plot", str(one_run), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and says.format(out=out) in err and ".png" in err, err
    assert "Traceback" not in err and captured.out == ""
    assert not out.parent.exists()  # neither x.pdfx nor noext.png (nor their folder) was written


def test_plot_all_nan_results_is_an_error_not_an_empty_figure(tmp_path: Path, capsys):
    path = write_results(
        tmp_path,
        "m",
        {PPL: ppl_entry({128: math.nan, 256: math.nan}), MIS: mis_entry({128: math.nan}, sce={128: math.nan})},
    )
    out = tmp_path / "nan.png"
    assert cli.main(["plot", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every ppl, symkl and sce value in these results is NaN" in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["-5", "0", "8k"])
def test_trained_context_must_be_a_positive_length(one_run: Path, capsys, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", str(one_run), "--trained-context", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"'{value}' is not a positive number of tokens; give e.g. 8192" in err and "Traceback" not in err


def test_keyppl_without_key_tokens_says_so(tmp_path: Path):
    entry = ppl_entry({128: 5.0}, ppl_at_max=5.0, keyppl=math.nan, key_frac=0.0)
    entry |= {"ppl@max_stderr,none": 0.5, "keyppl_stderr,none": math.nan, "key_frac_stderr,none": "N/A"}
    (run,) = load_runs([write_results(tmp_path, "m", {PPL: entry})])
    line = reporting.tables.format_scalars(run)
    assert "keyppl: no key tokens" in line and "nan" not in line
    assert "key_frac=0 " in line and "ppl@max=5±0.5" in line  # scalars carry ± too, where reported


def test_model_args_after_prepare_without_conversion(tmp_path: Path, monkeypatch, capsys, assets):
    """A cache holding the GGUF file and the corpus but no converted folder: a message, not a crash."""
    from lm_eval_longshort import assets as assets_module

    gguf = tmp_path / assets_module.GGUF_SUBDIR
    corpus = tmp_path / assets_module.CORPUS_SUBDIR
    gguf.mkdir()
    corpus.mkdir()
    (gguf / assets.gguf_file).symlink_to(assets.gguf_dir / assets.gguf_file)
    (corpus / assets_module.CORPUS_NAME).symlink_to(assets.corpus_file)
    monkeypatch.setenv(assets_module.CACHE_ENV, str(tmp_path))
    assert cli.main(["model-args"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prepared without conversion (prepare --no-convert)" in err
    assert "run `lm-eval-longshort prepare`" in err and "model-args --gguf" in err
    assert cli.main(["model-args", "--gguf"]) == 0
    assert capsys.readouterr().out.strip() == f"pretrained={gguf},gguf_file={assets.gguf_file}"


# --------------------------------------------------------------------------- the distribution of misalignment


def dense_entry(symkl: dict[int, float], scale: float) -> dict:
    """A misalign task in dense mode: the ratio metrics (with standard errors), dp, and the
    distribution summaries of symkl (no standard error: lm-eval writes N/A)."""
    entry = mis_entry(symkl)
    for L, v in symkl.items():
        entry[f"dp@{L},none"], entry[f"dp@{L}_stderr,none"] = 0.01 * scale, 0.002
        for name, factor in (("symkl_p50", 0.25), ("symkl_p90", 2.0), ("symkl_p99", 8.0), ("symkl_max", 20.0)):
            entry[f"{name}@{L},none"], entry[f"{name}@{L}_stderr,none"] = v * factor * scale, "N/A"
    return entry


def dense_runs(root: Path) -> list[Path]:
    records = {MIS: record(MIS, mode="dense")}
    return [
        write_results(root, name, {PPL: ppl_entry(p), MIS: dense_entry(m, scale)}, records=records)
        for name, p, m, scale in (
            ("a", {1024: 20.0, 4096: 18.0}, {1024: 0.05, 4096: 0.10}, 1.0),
            ("b", {1024: 14.0, 4096: 13.0}, {1024: 0.03, 4096: 0.04}, 1.5),
            ("c", {1024: 17.0, 4096: 25.0}, {1024: 0.04, 4096: 0.07}, 3.0),
        )
    ]


def test_report_compare_and_values_show_the_distribution_of_misalignment(tmp_path: Path, one_run: Path):
    from lm_eval_longshort.sweep.report import values_csv

    runs = load_runs(dense_runs(tmp_path / "dense"))
    header = format_length_table(runs[0]).splitlines()[1].split()
    assert header[header.index("tv") + 1 :] == ["symkl_p50", "symkl_p90", "symkl_p99", "symkl_max", "dp"]
    rows = _table_rows(format_length_table(runs[0]))
    assert rows["4096"][2][-5:] == ["0.025", "0.2", "0.8", "2", "0.01±0.002"]  # no ± where lm-eval wrote N/A
    # a `last` run reports none of them: no blank columns for them
    last_header = format_length_table(load_runs([one_run])[0]).splitlines()[1].split()
    assert last_header[-5:] == ["symkl", "sce", "js", "top1", "tv"]

    result = compare_runs(runs, misalign_metric="symkl_p90")
    assert result.columns[-5:] == ["symkl_p50", "symkl_p90", "symkl_p99", "symkl_max", "dp"]
    by_length = {c.length: c for c in result.per_length}
    p90 = [0.10 * 2.0 * 1.0, 0.04 * 2.0 * 1.5, 0.07 * 2.0 * 3.0]
    assert by_length[4096].pearson == pytest.approx(textbook_pearson(p90, [18.0, 13.0, 25.0]), abs=1e-12)
    assert result.between_runs == []  # a percentile has no per-document sums: no paired difference
    assert [r["symkl_max"] for r in result.rows if r["L"] == 1024] == pytest.approx([1.0, 0.9, 2.4])

    values = list(csv.DictReader(values_csv(runs).splitlines()))
    got = {(v["run"], v["metric"], v["L"]): (float(v["value"]), v["stderr"]) for v in values}
    assert got["b", "symkl_p99", "4096"] == (pytest.approx(0.04 * 8.0 * 1.5), "")
    assert got["c", "dp", "1024"] == (pytest.approx(0.03), "0.002")


def test_plot_distribution_draws_the_percentiles_against_length(tmp_path: Path, one_run: Path, capsys):
    runs = load_runs(dense_runs(tmp_path / "dense"))
    figure = reporting.draw_distribution(runs, trained_context=2048)
    (ax,) = figure.axes
    assert ax.get_title().startswith("Distribution of per-position symkl: percentiles and maximum\n")
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("trained")}
    assert len(lines) == 3 * 4  # a line per run and summary
    assert list(lines["b symkl_p99"].get_ydata()) == pytest.approx([0.03 * 8 * 1.5, 0.04 * 8 * 1.5])
    assert list(lines["a symkl_max"].get_xdata()) == [1024, 4096]
    assert {lines[f"a {m}"].get_linestyle() for m in ("symkl_p50", "symkl_p90", "symkl_p99", "symkl_max")} == {
        "-",
        "--",
        "-.",
        ":",
    }
    assert lines["a symkl_p50"].get_color() != lines["b symkl_p50"].get_color()
    out = tmp_path / "dist.png"
    assert cli.main(["plot", *map(str, dense_runs(tmp_path / "d2")), "-o", str(out), "--distribution"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert cli.main(["plot", str(one_run), "-o", str(tmp_path / "no.png"), "--distribution"]) == 2
    err = capsys.readouterr().err
    assert "nothing to plot" in err and "mode dense" in err and not (tmp_path / "no.png").exists()


# --------------------------------------------------------------------------- loss against position (issue 18)

POS_EDGES, POS_LENGTHS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256], [128, 256]


def _position_documents(rng, n_docs: int) -> list[dict]:
    """Documents of a truncate run without BOS: position bins (position 0 never a target) and the
    ppl@L / ppl_pos@L sums they imply, as the task records them."""
    docs = []
    for d in range(n_docs):
        counts = [0] + [hi - lo for lo, hi in zip(POS_EDGES[1:], POS_EDGES[2:])]
        nll = [n * rng.uniform(1.0, 6.0) for n in counts]
        sums, previous = {}, 0
        for L in POS_LENGTHS:
            upto = [i for i, hi in enumerate(POS_EDGES[1:]) if hi <= L]
            new = [i for i in upto if POS_EDGES[i] >= previous]
            sums[f"ppl@{L}"] = [sum(nll[i] for i in upto), sum(counts[i] for i in upto)]
            sums[f"ppl_pos@{L}"] = [sum(nll[i] for i in new), sum(counts[i] for i in new)]
            previous = L
        positions = {"edges": POS_EDGES, "nll_sum": nll, "n_targets": counts}
        docs.append(
            {"doc_index": d, "title": f"t{d}", "sha1": f"{d:040x}", "n_tokens": 999, "skipped": False}
            | {"sums": sums, "positions": positions}
        )
    return docs


def _truncate_run(root: Path, name: str, docs: list[dict]) -> Path:
    values = {m: {L: _values(docs, f"{m}@{L}", "ppl") for L in POS_LENGTHS} for m in ("ppl", "ppl_pos")}
    entry = ppl_entry(values["ppl"]) | {f"ppl_pos@{L},none": v for L, v in values["ppl_pos"].items()}
    records = {PPL: record(PPL, documents=docs, lengths=POS_LENGTHS, protocol="truncate", bins_per_doubling=1)}
    return write_results(root, name, {PPL: entry}, records=records)


def test_loss_against_position_pools_bins_plots_and_compares(tmp_path: Path, capsys):
    """The curve is each bin's token-weighted mean NLL over documents ± its delta-method error;
    plot --positions draws exactly it; compare pairs ppl_pos@L; values.csv lists ppl_pos@L."""
    from matplotlib.figure import Figure
    from reference import ratio_se

    from lm_eval_longshort.reporting import positions

    rng = np.random.default_rng(11)
    docs_a = _position_documents(rng, 4)
    docs_b = _position_documents(rng, 4)  # the same documents (doc_index, sha1), other numbers
    paths = [_truncate_run(tmp_path, "a", docs_a), _truncate_run(tmp_path, "b", docs_b)]
    runs = load_runs(paths)

    curve = reporting.position_curve(runs[0], PPL)
    assert curve.bins == list(zip(POS_EDGES[1:], POS_EDGES[2:]))  # bin [0, 1) holds no target: not drawn
    for i, (value, error) in enumerate(zip(curve.values, curve.errors), start=1):
        a = [d["positions"]["nll_sum"][i] for d in docs_a]
        b = [d["positions"]["n_targets"][i] for d in docs_a]
        assert value == pytest.approx(sum(a) / sum(b), rel=1e-12)
        assert error == pytest.approx(ratio_se(a, b), rel=1e-9) and error > 0
    assert curve.positions[0] == pytest.approx(math.sqrt(2)) and curve.positions[-1] == pytest.approx(
        math.sqrt(128 * 256)
    )

    ax = Figure().subplots()
    positions._draw(ax, [curve], {"a": "C0"}, trained_context=64, title="t")
    line, trained = ax.lines
    assert list(line.get_ydata()) == curve.values and list(line.get_xdata()) == curve.positions
    assert list(trained.get_xdata()) == [64, 64] and ax.get_xscale() == "log"

    out = tmp_path / "pos.png"
    assert cli.main(["plot", *map(str, paths), "--positions", "-o", str(out), "--trained-context", "128"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC

    result = compare_runs(runs, ppl_metric="ppl_pos")
    between = {d.length: d for d in result.between_runs if d.metric == "ppl_pos"}
    assert set(between) == set(POS_LENGTHS)
    for L, diff in between.items():
        want, want_se = delta_paired(
            np.array([d["sums"][f"ppl_pos@{L}"] for d in docs_b]),
            np.array([d["sums"][f"ppl_pos@{L}"] for d in docs_a]),
            "ppl",
        )
        assert diff.difference == pytest.approx(want, rel=1e-12) and diff.stderr == pytest.approx(want_se, rel=1e-9)
    rows = list(csv.DictReader(reporting.values_csv(reporting.long_table(runs)).splitlines()))
    assert {(r["run"], r["L"]) for r in rows if r["metric"] == "ppl_pos"} == {
        (run, str(L)) for run in "ab" for L in POS_LENGTHS
    }


def test_plot_positions_of_a_ladder_run_names_truncate(one_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "pos.png"
    assert cli.main(["plot", str(one_run), "--positions", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "no loss against position in these results: it comes from protocol truncate only (these used ladder)" in err
    assert not out.exists()
