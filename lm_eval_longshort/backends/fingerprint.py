"""Content digests of a model's weights, for the resume cache's key.

Two routes, both over every byte of every weight (a sample of values would let a checkpoint
saved over the same folder, with other values, hit the cache):

- ``tensors_digest``: the parameters as loaded (hf engines up to ``IN_MEMORY_LIMIT`` bytes):
  it sees adapters, deltas and any in-memory edit. SHA-256 at ~1-2 GB/s, so about 0.3 s for the
  embedded 135M model, a small share of any run.
- ``files_digest``: the checkpoint's weight files (vLLM keeps its weights in worker processes;
  hf models above the limit, where hashing GBs in every process would be slow). Each file's
  SHA-256 is computed once and stored under ``digest_cache_dir()``, keyed by the file's path,
  size, inode and change times: a file written again (even with the same size and a restored
  mtime: ``st_ctime_ns`` cannot be set back) gets a new entry, an unchanged one is not re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from lm_eval_longshort.assets import cache_dir

IN_MEMORY_LIMIT = 2 * 1024**3  # bytes of parameters hashed in memory; above, the files are hashed
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_BLOCK = 1 << 24  # bytes read (or copied off a device) at a time


def digest_cache_dir() -> Path:
    """Where the stored file digests live: beside the prepared assets (``$LM_EVAL_LONGSHORT_CACHE``,
    else ``~/.cache/lm-eval-longshort``)."""
    return cache_dir() / "weight_digests"


def tensor_bytes(named: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and raw bytes, in the given order.

    >>> a = [("w", torch.ones(3))]
    >>> tensors_digest(a) == tensors_digest([("w", torch.ones(3))]) != tensors_digest([("w", torch.zeros(3))])
    True
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        step = max(1, _BLOCK // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):  # blocks: a GPU tensor is copied piece by piece
            block = flat[start : start + step].cpu().contiguous().view(torch.uint8)
            digest.update(block.numpy().data)
    return digest.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files (sorted), following links (hub caches link to blobs)."""
    folder = Path(folder)
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def file_sha256(path: Path) -> str:
    """A file's SHA-256, from the stored digests when the file has not changed since it was hashed."""
    real = path.resolve()
    stat = real.stat()
    identity = [str(real), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
    entry = digest_cache_dir() / (hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32] + ".json")
    try:
        stored = json.loads(entry.read_text(encoding="utf-8"))
        if stored.get("identity") == identity and isinstance(stored.get("sha256"), str):
            return stored["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # not stored yet, or unreadable: hash the file
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    value = digest.hexdigest()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"identity": identity, "sha256": value}), encoding="utf-8")
        os.replace(tmp, entry)  # atomic: a concurrent reader sees the old entry or the whole new one
    except OSError:
        pass  # a read-only cache folder only costs hashing again next time
    return value


def files_digest(folder: str | Path) -> str:
    """SHA-256 over the names and contents of a checkpoint folder's weight files.

    Raises ValueError when the folder has no weight files (nothing the key could cover).
    """
    files = weight_files(folder)
    if not files:
        raise ValueError(
            f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {folder}: the resume cache cannot tell "
            "which weights it scored; run without --use_cache"
        )
    return hashlib.sha256(json.dumps([[f.name, file_sha256(f)] for f in files]).encode()).hexdigest()


def _config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def hf_identity(model) -> dict:
    """A transformers model's identity: class, source, dtype, config and a digest of its weights
    (in memory up to ``IN_MEMORY_LIMIT`` bytes, else its folder's files plus the loaded names,
    shapes and dtypes, so an added adapter still changes it)."""
    params = list(model.named_parameters())
    source = str(getattr(model.config, "_name_or_path", ""))
    if tensor_bytes(params) <= IN_MEMORY_LIMIT or not weight_files(source or "."):
        weights = "tensors:" + tensors_digest(params)
    else:
        layout = json.dumps([[n, str(p.dtype), list(p.shape)] for n, p in params])
        weights = "files:" + files_digest(source) + ":" + hashlib.sha256(layout.encode()).hexdigest()
    return {
        "class": type(model).__name__,
        "model": source,
        "dtype": str(params[0][1].dtype).removeprefix("torch.") if params else None,
        "config": _config_digest(model.config.to_dict()),
        "weights": weights,
    }


def vllm_identity(model_config, folder: str | Path) -> dict:
    """A vLLM engine's identity: its weights live in worker processes, so their files are hashed
    (``folder``: the checkpoint's local folder)."""
    return {
        "model": str(model_config.model),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "config": _config_digest(model_config.hf_config.to_dict()),
        "revision": str(getattr(model_config, "revision", None)),
        "weights": "files:" + files_digest(folder),
    }
