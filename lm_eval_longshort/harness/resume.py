"""Per-document resume through lm-eval's own ``--use_cache`` database.

``lm_eval --use_cache PATH`` wraps the model in ``CachingLM``, which caches only lm-eval's
built-in request types, but it also hands its SQLite dict to the model as
``lm.cache_hook.dbdict``. We keep each scored document's response there, under a key that
names everything the response depends on: the model (backend, weights, dtype, tokenizer),
the task settings that change numbers, the BOS rule and the document (its index, which seeds
the misalignment draws, and the SHA-1 of its text). A rerun finds finished documents and
scores only the rest; a different model, dtype, setting or text is a different key.

Documents are committed in the runner's chunks, as each chunk finishes (a blocking commit),
so an interrupted run loses at most the chunk in flight, and never stores half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from lm_eval_longshort.protocols.requests import ScoringEngine
from lm_eval_longshort.protocols.runner import Document
from lm_eval_longshort.protocols.settings import MisalignSettings, PerplexitySettings, measured_settings

log = logging.getLogger(__name__)

# Bump when a code change alters what a stored response means: old entries then miss.
RESPONSE_FORMAT = 2
KEY_PREFIX = "longshort:"


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _hf_identity(model) -> dict:
    """Config, dtype and a sample of every weight tensor (its first and last values): cheap, and a
    retrained checkpoint saved over the same folder no longer matches."""
    digest = hashlib.sha256()
    dtype = None
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:4].tolist() + flat[-4:].tolist()
        digest.update(f"{name}{tuple(param.shape)}{sample}".encode())
        dtype = dtype or str(param.dtype).removeprefix("torch.")
    config = model.config.to_dict()
    return {
        "class": type(model).__name__,
        "model": str(getattr(model.config, "_name_or_path", "")),
        "dtype": dtype,
        "config": _sha(config),
        "weights": digest.hexdigest(),
    }


def _vllm_identity(model_config) -> dict:
    """Model path, dtype, config and the weight files' names, sizes and times (vLLM keeps the
    weights in its workers)."""
    path = Path(str(model_config.model))
    files = []
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf")):
            stat = f.stat()
            files.append((f.name, stat.st_size, stat.st_mtime_ns))
    return {
        "model": str(model_config.model),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "config": _sha(model_config.hf_config.to_dict()),
        "revision": str(getattr(model_config, "revision", None)),
        "weights": _sha(files),
    }


def engine_identity(engine: ScoringEngine) -> dict:
    """What a response depends on besides the task and document: backend, model, dtype, tokenizer.

    Returns ``{"backend", "model", "dtype", "fingerprint", ...}`` (recorded in the results JSON too).
    """
    if hasattr(engine, "model_config"):  # vllm
        parts = _vllm_identity(engine.model_config)
    else:
        parts = _hf_identity(engine.model)
    tokenizer = engine.tokenizer
    parts["tokenizer"] = _sha(
        [getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id]
    )
    parts["backend"] = engine.name
    fingerprint = _sha(parts)[:20]
    return {"backend": engine.name, "model": parts["model"], "dtype": parts["dtype"], "fingerprint": fingerprint}


class DocumentStore:
    """Finished documents' responses in lm-eval's ``--use_cache`` SQLite dict."""

    def __init__(self, dbdict, identity: dict):
        self.dbdict = dbdict
        self.identity = identity

    @classmethod
    def for_lm(cls, lm, engine: ScoringEngine, identity: dict) -> DocumentStore | None:
        """The store of an lm-eval model object, or None when lm-eval was run without --use_cache."""
        dbdict = getattr(getattr(lm, "cache_hook", None), "dbdict", None)
        return cls(dbdict, identity) if dbdict is not None else None

    def key(self, settings: PerplexitySettings | MisalignSettings, bos: int | None, doc: Document) -> str:
        payload = [
            RESPONSE_FORMAT,
            self.identity["fingerprint"],
            measured_settings(settings),
            bos,
            doc.doc_index,
            text_sha1(doc.text),
        ]
        return KEY_PREFIX + _sha(payload)

    def get(self, key: str) -> dict | None:
        raw = self.dbdict.get(key)
        return json.loads(raw) if isinstance(raw, str) else None

    def put(self, entries: dict[str, dict]) -> None:
        """Store responses and wait until they are on disk."""
        for key, response in entries.items():
            self.dbdict[key] = json.dumps(response)
        self.dbdict.commit(blocking=True)
