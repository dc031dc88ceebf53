"""Claims: one worker at a time on a piece of work, across processes and hosts sharing a folder.

A claim is a small JSON file (host, pid, process start, a random token, the work's plan digest)
created with ``os.link`` from a fully written temporary file: the link either appears whole or
fails because the claim exists, atomically on local filesystems and NFS alike. The holder
touches the file every ``stale_after / 4`` seconds. A claim is taken over when its holder is
gone: on the same host, the process no longer runs; on another host (or with an unreadable
claim), no heartbeat for ``stale_after`` seconds. Take-overs are serialised by a second,
short-lived file, so two workers never both replace one stale claim.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "run.claim"
>>> first = try_claim(path, plan="p")
>>> try_claim(path, plan="p") is None  # held by a live process (this one)
True
>>> first.release(); second = try_claim(path, plan="p"); second.held()
True
>>> second.release()
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

STALE_AFTER_S = float(os.environ.get("LONGSHORT_CLAIM_STALE_S", "300"))
TAKEOVER_STALE_S = 30.0  # a take-over lock older than this was left by a worker that died in it


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited already


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    if Path("/proc").is_dir():
        return now is not None and (start is None or now == start)
    return True


def holder(path: Path) -> dict | None:
    """The claim's content, {} when unreadable (being written, or damaged), None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def is_stale(path: Path, stale_after: float = STALE_AFTER_S) -> bool:
    """True when the claim's holder is gone (see the module docstring); False when there is none."""
    info = holder(path)
    if info is None:
        return False
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _process_alive(info["pid"], info.get("start"))
    return age > stale_after


def describe(path: Path) -> str:
    info = holder(path) or {}
    return f"{info.get('host', '?')}:{info.get('pid', '?')}"


@dataclass
class Claim:
    """A held claim; ``release()`` (or leaving its ``with`` block) gives it up."""

    path: Path
    token: str
    interval: float
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.held():
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def held(self) -> bool:
        """True while the claim file is still this worker's (not taken over after a long stall)."""
        return (holder(self.path) or {}).get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _link_new(path: Path, content: dict) -> bool:
    """Create ``path`` with ``content`` unless it exists (atomic); True when created."""
    tmp = path.with_name(f".{path.name}.{content['token']}.tmp")
    tmp.write_text(json.dumps(content), encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(path: Path, stale_after: float) -> None:
    """Remove a stale claim, under the take-over lock (so a fresh claim is never removed)."""
    lock = path.with_name(path.name + ".takeover")
    if not _link_new(lock, {"token": uuid.uuid4().hex, "pid": os.getpid()}):
        try:
            if time.time() - lock.stat().st_mtime > TAKEOVER_STALE_S:
                lock.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return
    try:
        if is_stale(path, stale_after):  # checked again under the lock
            path.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


def try_claim(path: str | Path, plan: str = "", stale_after: float = STALE_AFTER_S) -> Claim | None:
    """Claim ``path`` for this process, taking over a stale claim; None when a live worker holds it.

    ``plan``: a digest of what the work computes, readable by other workers (``holder(path)``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    content = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "token": token,
        "plan": plan,
        "claimed_at": time.time(),
    }
    for _ in range(2):
        if _link_new(path, content):
            return Claim(path, token, max(0.05, stale_after / 4))
        if not is_stale(path, stale_after):
            return None
        _remove_stale(path, stale_after)
    return None
