"""Virtual time: an event queue that runs callbacks in time order, never sleeping, and each
node's own view of it (offset, drift, and callbacks that die with the node's life).

Ties are broken by insertion order, so a run is a pure function of what was scheduled.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

# Nodes' wall clocks start here (an instant in 2027), so times look like real Unix times.
EPOCH = 1_800_000_000.0


class Scheduled:
    """A queued callback; `cancel` makes it a no-op when its time comes."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn

    def cancel(self) -> None:
        self.fn = None


class VirtualClock:
    """Simulated time and the callbacks due at points in it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = 0
        self._queue: list[tuple[float, int, Scheduled]] = []
        self.events_run = 0

    @property
    def now(self) -> float:
        """The current virtual time in seconds."""
        return self._now

    def __len__(self) -> int:
        return len(self._queue)

    def call_at(self, when: float, fn: Callable[[], None]) -> Scheduled:
        """Run `fn` at virtual time `when` (at once, after earlier entries, if it has passed)."""
        entry = Scheduled(fn)
        # Never schedule into the past: time only moves forward.
        heapq.heappush(self._queue, (when if when > self._now else self._now, self._seq, entry))
        self._seq += 1
        return entry

    def call_later(self, delay: float, fn: Callable[[], None]) -> Scheduled:
        """Run `fn` after `delay` virtual seconds."""
        return self.call_at(self._now + max(0.0, delay), fn)

    def run_until(self, until: float, max_events: int = 50_000_000) -> int:
        """Run every callback due up to `until`, then set the time to `until`; returns how many
        ran. Raises RuntimeError past `max_events`, so a callback storm cannot loop forever."""
        ran = 0
        queue, pop = self._queue, heapq.heappop
        while queue and queue[0][0] <= until:
            when, _, entry = pop(queue)
            fn = entry.fn
            if fn is None:
                continue  # cancelled
            self._now = when
            fn()
            ran += 1
            if ran > max_events:
                raise RuntimeError(f"more than {max_events} events before t={until}")
        self._now = max(self._now, until)
        self.events_run += ran
        return ran


class NodeClock:
    """One node's wall clock over virtual time: `EPOCH + offset + virtual * (1 + drift)`.

    Every callback goes through `wrap`, which the simulator uses to drop callbacks of a node's
    earlier life, hold them while the node is paused, and catch what a core raises.
    """

    def __init__(self, clock: VirtualClock, offset: float = 0.0, drift: float = 0.0,
                 wrap: Callable[[Callable[[], None]], Callable[[], None]] = lambda fn: fn) -> None:
        self.clock = clock
        self.offset = offset
        self.rate = 1.0 + drift
        self.wrap = wrap

    def now(self) -> float:
        """This node's reading of the time."""
        return EPOCH + self.offset + self.clock.now * self.rate

    def to_virtual(self, local: float) -> float:
        """The virtual instant at which this node's clock reads `local`."""
        return (local - EPOCH - self.offset) / self.rate

    def call_at(self, when: float, fn: Callable[[], None]) -> Scheduled:
        """Run `fn` when this node's clock reads `when`."""
        return self.clock.call_at(self.to_virtual(when), self.wrap(fn))
