"""The --use_cache store holds data, not code, and hits only for the same weights.

* A checkpoint folder whose weights are edited in place (same path, same file size) is a miss:
  the rerun scores again and equals an uncached run on the edited weights.
* A cache whose values were replaced by a pickle that would create a file runs nothing (the
  file is not there); the entries are misses, scored again, with one warning.
* A truncated cache file is a one-line error naming the file and the fix.
* The stored file digests (vLLM's route, large hf models) follow a file rewritten in place even
  when its size and mtime are put back.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import sqlite3
from pathlib import Path

import lm_eval
import pytest
import torch
from harness_run import INSTALLED_TASKS
from lm_eval.tasks import TaskManager
from reference import weight_files_sha256
from safetensors.torch import load_file, save_file

from lm_eval_longshort.backends import fingerprint
from lm_eval_longshort.harness.resume import CacheFileError, DocumentStore

PPL = "longshort_ppl_shakespeare"
META = {"lengths": [32, 64], "target_tokens": 16}
RESUMED = re.compile(r"(\d+) of (\d+) documents resumed from the --use_cache database, (\d+) to score")


@pytest.fixture
def model_copy(assets, tmp_path) -> Path:
    """A private copy of the embedded model folder (real files, not links), safe to edit."""
    folder = tmp_path / "model"
    shutil.copytree(assets.model_dir, folder, symlinks=False)
    return folder


def _evaluate(folder: Path, caplog, cache: Path | None = None) -> tuple[dict, tuple[int, ...] | None]:
    """(results of PPL on one play, the resume counts logged) through lm-eval's own model loading."""
    tm = TaskManager(include_path=str(INSTALLED_TASKS), include_defaults=False, metadata=META)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lm_eval_longshort"):
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(folder), "dtype": "float32", "max_length": 256},
            tasks=[PPL],
            limit=1,
            task_manager=tm,
            use_cache=str(cache) if cache else None,
            bootstrap_iters=0,
            device="cpu",
        )
    counts = [RESUMED.search(r.getMessage()) for r in caplog.records]
    found = [tuple(int(g) for g in m.groups()) for m in counts if m]
    return out["results"][PPL], (found[-1] if found else None)


def _scale_norm_in_place(folder: Path) -> None:
    """Scale model.norm.weight[4:-4] by 0.5 and save over the same safetensors file."""
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("norm.weight") and "layers" not in k)
    size = path.stat().st_size
    tensors[name][4:-4] *= 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    assert path.stat().st_size == size  # the edit keeps the file's size: only content can tell


def test_weights_edited_in_place_miss_and_give_the_uncached_numbers(model_copy, tmp_path, caplog):
    cache = tmp_path / "cache" / "run"
    before, counts = _evaluate(model_copy, caplog, cache)
    assert counts == (0, 1, 1)
    _, counts = _evaluate(model_copy, caplog, cache)
    assert counts == (1, 1, 0)  # same weights: a hit

    _scale_norm_in_place(model_copy)
    after, counts = _evaluate(model_copy, caplog, cache)
    assert counts == (0, 1, 1), "edited weights must not be served from the cache"
    uncached, counts = _evaluate(model_copy, caplog, None)
    assert counts is None
    assert after["ppl@64,none"] == uncached["ppl@64,none"]
    assert after["ppl@64,none"] != pytest.approx(before["ppl@64,none"], rel=1e-3)


class _CreatesFile:
    """Unpickling this creates the file ``path`` (what a crafted cache value could do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_tampered_cache_runs_no_code_and_is_a_miss(model_copy, tmp_path, caplog):
    cache = tmp_path / "cache" / "run"
    first, _ = _evaluate(model_copy, caplog, cache)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    db = Path(f"{cache}_rank0.db")
    with sqlite3.connect(db) as con:
        keys = [k for (k,) in con.execute("SELECT key FROM longshort_documents")]
        assert keys, "the first run stored nothing"
        con.executemany("UPDATE longshort_documents SET response = ? WHERE key = ?", [(payload, k) for k in keys])
        # lm-eval's own pickled table too: the plugin never reads it.
        con.execute("CREATE TABLE IF NOT EXISTS unnamed (key TEXT PRIMARY KEY, value BLOB)")
        con.executemany("INSERT OR REPLACE INTO unnamed VALUES (?, ?)", [(k, payload) for k in keys])
    again, counts = _evaluate(model_copy, caplog, cache)
    assert not marker.exists(), "reading the cache ran code"
    assert counts == (0, 1, 1)  # the tampered entry is a miss
    assert sum("malformed cache entry" in r.getMessage() for r in caplog.records) == 1
    assert again["ppl@64,none"] == first["ppl@64,none"]


def test_truncated_cache_file_is_a_one_line_error_naming_it(tmp_path):
    db = tmp_path / "run_rank0.db"
    store = DocumentStore(str(db), {"fingerprint": "x"})
    store.put({f"k{i}": {"doc_index": i, "pad": "x" * 2000} for i in range(200)})
    assert store.get("k3") == {"doc_index": 3, "pad": "x" * 2000}
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    with pytest.raises(CacheFileError) as err:
        DocumentStore(str(db), {"fingerprint": "x"})
    message = str(err.value)
    assert "\n" not in message and str(db) in message and "delete it" in message
    db.write_bytes(b"not a database at all " * 300)
    with pytest.raises(CacheFileError, match=re.escape(str(db))):
        DocumentStore(str(db), {"fingerprint": "x"})


def test_store_reads_json_only_and_checks_the_key(tmp_path, caplog):
    store = DocumentStore(str(tmp_path / "c.db"), {"fingerprint": "x"})
    store.put({"a": {"v": 1}, "b": {"v": 2}})
    with sqlite3.connect(tmp_path / "c.db") as con:  # b's row now holds a's entry: a foreign entry
        con.execute(
            "UPDATE longshort_documents SET response = (SELECT response FROM longshort_documents "
            "WHERE key = 'a') WHERE key = 'b'"
        )
    with caplog.at_level(logging.WARNING, logger="lm_eval_longshort"):
        assert store.get("a") == {"v": 1} and store.get("b") is None and store.get("missing") is None


def test_file_digest_follows_a_rewrite_that_restores_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_LONGSHORT_CACHE", str(tmp_path / "digests"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, path)
    first = fingerprint.files_digest(folder)
    assert len(list((tmp_path / "digests" / "weight_digests").glob("*.json"))) == 1  # stored once
    assert fingerprint.files_digest(folder) == first
    stat = path.stat()
    save_file({"w": torch.arange(64, dtype=torch.float32).flip(0)}, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = fingerprint.files_digest(folder)
    assert second != first
    assert second == weight_files_sha256(folder)  # the files' content, computed independently


def test_in_memory_digest_covers_every_value(smol):
    model, _ = smol
    params = list(model.named_parameters())
    base = fingerprint.tensors_digest(params)
    name, tensor = params[len(params) // 2]
    middle = tensor.numel() // 2
    flat = tensor.detach().view(-1)
    old = flat[middle].item()
    with torch.no_grad():
        flat[middle] = old + 1e-3  # one value in the middle of one tensor
    try:
        assert fingerprint.tensors_digest(params) != base
    finally:
        with torch.no_grad():
            flat[middle] = old
    assert fingerprint.tensors_digest(params) == base
