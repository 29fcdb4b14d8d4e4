"""A virtual clock: an event queue that runs callbacks in time order, never sleeping.

Ties are broken by insertion order, so a run is a pure function of what was scheduled.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class VirtualClock:
    """Simulated time and the callbacks due at points in it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = 0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self.events_run = 0

    @property
    def now(self) -> float:
        """The current virtual time in seconds."""
        return self._now

    def __len__(self) -> int:
        return len(self._queue)

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run `fn` at virtual time `when` (at once, after earlier entries, if it has passed)."""
        # Never schedule into the past: time only moves forward.
        heapq.heappush(self._queue, (max(when, self._now), self._seq, fn))
        self._seq += 1

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` after `delay` virtual seconds."""
        self.call_at(self._now + max(0.0, delay), fn)

    def run_until(self, until: float, max_events: int = 50_000_000) -> int:
        """Run every callback due up to `until`, then set the time to `until`; returns how many
        ran. Raises RuntimeError past `max_events`, so a callback storm cannot loop forever."""
        ran = 0
        while self._queue and self._queue[0][0] <= until:
            when, _, fn = heapq.heappop(self._queue)
            self._now = when
            fn()
            ran += 1
            if ran > max_events:
                raise RuntimeError(f"more than {max_events} events before t={until}")
        self._now = max(self._now, until)
        self.events_run += ran
        return ran
