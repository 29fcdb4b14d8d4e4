"""The environment a node runs in: clock, randomness, network and storage, handed over as one.

Protocol logic (the membership and broadcast cores, and the gossip node that drives them) never
reads the time, draws global randomness, opens a socket or touches the disk by itself: it is
given an `Env`. In production the env is the real world (`RealClock`, a system-seeded Random,
the QUIC endpoint, the LMDB store); in the simulator it is a virtual clock, `Random(seed)`, a
simulated network and a simulated store, so one seed replays a run exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from random import Random
from typing import Any, Protocol, TypeVar

from hmnode.identity import NodeId
from hmnode.schema import Table

T = TypeVar("T")


class Timer(Protocol):
    """A scheduled callback that can be called off."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Wall-clock time in seconds since the Unix epoch (adverts carry it), and timers on it."""

    def now(self) -> float: ...

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer: ...


class Network(Protocol):
    """Fire-and-forget messages to peers by node id; the address is a hint for dialling."""

    def send(self, dst: NodeId, addr: str | None, topic: str, body: dict[str, Any]) -> None:
        """Queue `body` for `dst`; a peer that cannot be reached is reported back to the node
        as a connection failure, never raised here."""

    def disconnect(self, dst: NodeId, reason: str) -> None:
        """Drop the connection to `dst` (a peer the node holds dead)."""

    def misbehaved(self, peer: NodeId, reason: str) -> None:
        """Note that `peer` sent something the protocol forbids."""


class Txn(Protocol):
    """A transaction over the schema's tables (what `hmnode.store.Txn` offers)."""

    def get(self, table: Table, key: Any, default: Any = None) -> Any: ...

    def put(self, table: Table, key: Any, record: Any) -> None: ...

    def delete(self, table: Table, key: Any) -> bool: ...

    def items(self, table: Table, reverse: bool = False) -> Iterator[tuple[Any, Any]]: ...

    def count(self, table: Table) -> int: ...


class Storage(Protocol):
    """Transactions on the node's state; `sync` makes every committed write durable."""

    def read(self, fn: Callable[[Txn], T]) -> T: ...

    def write(self, fn: Callable[[Txn], T]) -> T: ...

    def sync(self) -> None: ...


@dataclass(frozen=True)
class Env:
    """Everything a node's protocol logic may use of the world outside it."""

    clock: Clock
    rng: Random
    net: Network
    storage: Storage


class RealClock:
    """The system's wall clock, with timers on the running asyncio loop."""

    def now(self) -> float:
        return time.time()

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        # The loop's timers run on its monotonic clock: convert the delay, not the instant,
        # so a wall-clock step does not fire or starve them all at once.
        return asyncio.get_running_loop().call_later(max(0.0, when - time.time()), fn)
