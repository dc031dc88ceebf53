"""Per-document resume through lm-eval's ``--use_cache`` database file.

``lm_eval --use_cache PATH`` wraps the model in ``CachingLM``, which caches only lm-eval's
built-in request types, but it also hands its SQLite file to the model as
``lm.cache_hook.dbdict``. We keep each scored document's response in a table of our own in
that file (``longshort_documents``: key, JSON text), never in lm-eval's pickled table, so
reading the cache runs no code. The key names everything a response depends on: the model
(backend, a digest of every weight byte, dtype, config, tokenizer), the task settings that
change numbers, the BOS rule and the document (its index, which seeds the misalignment draws,
and the SHA-1 of its text). A rerun finds finished documents; a different model, weight value,
dtype, setting or text is a different key.

Documents are scored and committed in the runner's chunks (groups of about ``batch_tokens``
input tokens, fixed by the documents alone so that a resumed run batches exactly as an
uninterrupted one): a chunk is taken from the cache only when all its documents are there, so
an interrupted run loses at most the chunk in flight, and a changed document re-scores its chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

from lm_eval_longshort.protocols.requests import ScoringEngine
from lm_eval_longshort.protocols.runner import Document
from lm_eval_longshort.protocols.settings import MisalignSettings, PerplexitySettings, measured_settings

log = logging.getLogger(__name__)

# Bump when a code change alters what a stored response means: old entries then miss.
RESPONSE_FORMAT = 4  # 4: dense groups hold dp_sum, symkl_hist and symkl_max
TABLE = "longshort_documents"


class CacheFileError(RuntimeError):
    """The --use_cache file cannot be read as a database (corrupt, truncated, not SQLite)."""


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def engine_identity(engine: ScoringEngine) -> dict:
    """What a response depends on besides the task and document: backend, model, dtype, weights,
    tokenizer. Returns ``{"backend", "model", "dtype", "fingerprint"}`` (also in the results JSON).
    """
    parts = engine.identity()
    tokenizer = engine.tokenizer
    parts["tokenizer"] = _sha(
        [getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id]
    )
    parts["backend"] = engine.name
    fingerprint = _sha(parts)[:20]
    return {"backend": engine.name, "model": parts["model"], "dtype": parts["dtype"], "fingerprint": fingerprint}


class DocumentStore:
    """Finished documents' responses, as JSON text in a table of the ``--use_cache`` SQLite file."""

    def __init__(self, path: str, identity: dict):
        self.path = str(path)
        self.identity = identity
        self._warned = False
        self._conn = self._guarded(self._open)

    @classmethod
    def for_lm(cls, lm, identity: dict) -> DocumentStore | None:
        """The store of an lm-eval model object, or None when lm-eval was run without --use_cache."""
        dbdict = getattr(getattr(lm, "cache_hook", None), "dbdict", None)
        path = getattr(dbdict, "filename", None)
        return cls(path, identity) if path else None

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
        conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()  # reads the table: corruption shows here
        conn.commit()
        return conn

    def _guarded(self, action, *args):
        return _guarded(self.path, action, *args)

    def key(self, settings: PerplexitySettings | MisalignSettings, bos: int | None, doc: Document) -> str:
        payload = [
            RESPONSE_FORMAT,
            self.identity["fingerprint"],
            measured_settings(settings),
            bos,
            doc.doc_index,
            text_sha1(doc.text),
        ]
        return _sha(payload)

    def get(self, key: str) -> dict | None:
        """The stored response, or None (a malformed or foreign entry is a miss, warned about once)."""
        row = self._guarded(
            lambda: self._conn.execute(f"SELECT response FROM {TABLE} WHERE key = ?", (key,)).fetchone()
        )
        if row is None:
            return None
        try:
            entry = json.loads(row[0])
            if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("response"), dict):
                return entry["response"]
        except (TypeError, ValueError):
            pass
        if not self._warned:
            self._warned = True
            log.warning("%s: ignoring a malformed cache entry (it is scored again)", self.path)
        return None

    def put(self, entries: dict[str, dict]) -> None:
        """Store responses in one transaction (on disk when this returns)."""
        rows = [(key, json.dumps({"key": key, "response": response})) for key, response in entries.items()]

        def write():
            with self._conn:
                self._conn.executemany(f"INSERT OR REPLACE INTO {TABLE} (key, response) VALUES (?, ?)", rows)

        self._guarded(write)


def _guarded(path: str, action, *args):
    """``action(*args)``, with a database error turned into one line naming the file and the fix."""
    try:
        return action(*args)
    except sqlite3.DatabaseError as exc:
        raise CacheFileError(
            f"--use_cache file {path} cannot be read ({exc}): it is corrupt or not an lm-eval cache; "
            "delete it (its finished documents are then scored again) or give --use_cache another path"
        ) from None


def check_cache_file(path: str | Path) -> None:
    """Raise CacheFileError when an existing --use_cache file is not a sound SQLite database.

    lm-eval opens the file (and fails with a bare sqlite3 traceback) before any task code runs,
    so a caller that starts lm-eval itself, such as a sweep, checks the file first.
    """
    if not Path(path).exists():
        return

    def quick_check():
        with sqlite3.connect(path, timeout=60) as conn:
            (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
        if verdict != "ok":
            raise sqlite3.DatabaseError(verdict)

    _guarded(str(path), quick_check)
