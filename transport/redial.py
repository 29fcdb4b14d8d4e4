"""Keeping a connection to a peer: redial with jittered exponential backoff whenever it drops."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hmnode.identity import NodeId
from hmnode.transport.connection import Address, PeerConnection, TransportError

if TYPE_CHECKING:
    from hmnode.transport.endpoint import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delays of base * 2^n, capped, each scaled by a random factor in [1 - jitter, 1 + jitter],
    so that peers that lost each other at the same moment do not redial in lockstep."""

    base_s: float = 0.5
    cap_s: float = 30.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        raw = min(self.cap_s, self.base_s * (2 ** min(attempt, 32)))
        return raw * rng.uniform(1 - self.jitter, 1 + self.jitter)


class Redialer:
    """Holds a connection to one peer open: dials, waits for it to close, backs off, dials again."""

    def __init__(self, endpoint: "Endpoint", addr: Address, expected: NodeId | None,
                 backoff: Backoff = Backoff(), rng: random.Random | None = None) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.expected = expected
        self.backoff = backoff
        self.rng = rng or random.Random()
        self.connection: PeerConnection | None = None
        self.last_error: str | None = None
        self.attempts = 0
        self.connected = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"redial-{addr[0]}:{addr[1]}")

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                self.attempts += 1
                conn = await self.endpoint.connect(self.addr, self.expected)
            except TransportError as exc:
                self.last_error = str(exc)
                delay = self.backoff.delay(failures, self.rng)
                failures += 1
                log.debug("dial %s:%d failed (%s); again in %.1f s", *self.addr, exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.last_error = None
            self.connection = conn
            if self.expected is None:
                self.expected = conn.peer_id  # pin after the first unpinned dial
            self.connected.set()
            await asyncio.shield(conn.closed)
            self.connected.clear()
            self.connection = None
            await asyncio.sleep(self.backoff.delay(0, self.rng))

    async def stop(self) -> None:
        """Stop redialling (the current connection, if any, stays open)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
