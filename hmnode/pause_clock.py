"""A clock that stands still while a runtime's jobs are suspended (sharing paused), so that a
suspended job's time limit does not run out while it cannot run."""

from __future__ import annotations

import threading
import time


class PauseClock:
    """Monotonic seconds, less the time spent paused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paused_since: float | None = None
        self._paused_total = 0.0

    def now(self) -> float:
        """Seconds that ran while not paused (only differences mean anything)."""
        with self._lock:
            now = time.monotonic()
            paused = self._paused_total + (now - self._paused_since
                                           if self._paused_since is not None else 0.0)
            return now - paused

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def pause(self) -> None:
        with self._lock:
            if self._paused_since is None:
                self._paused_since = time.monotonic()

    def resume(self) -> None:
        with self._lock:
            if self._paused_since is not None:
                self._paused_total += time.monotonic() - self._paused_since
                self._paused_since = None
