"""A sweep worker's progress lines: per run (or shard) and overall, with time estimates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

HEARTBEAT_S = 60.0


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Progress:
    """Per-run and overall progress lines with time estimates (mean of the runs scored so far)."""

    write: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    durations: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        self.write(f"[sweep] {text}")

    def estimate(self, remaining: int, unit: str = "run(s)") -> str:
        if not self.durations:
            return "estimate after the first run"
        mean = sum(self.durations) / len(self.durations)
        return f"about {duration(mean * remaining)} left for {remaining} {unit}"

    def expected(self) -> float | None:
        return sum(self.durations) / len(self.durations) if self.durations else None

    @contextmanager
    def heartbeat(self, label: str):
        """Print ``label: running for ...`` every HEARTBEAT_S seconds while the block runs."""
        stop = threading.Event()
        began = time.monotonic()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                expected = self.expected()
                hint = f" (runs so far took {duration(expected)} on average)" if expected else ""
                self.say(f"{label}: running for {duration(time.monotonic() - began)}{hint}")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=1)
