"""Opening a direct path to a peer met over a relay (DCUtR style), through Linux NATs.

Over the relayed connection the two ends exchange their NAT kinds and candidate addresses
(`punch.start`), measuring the RTT, and each plays its half of `choose_strategy`'s plan:

- punch: the answering side sends *primers* to the asker's candidates before it answers, the
  asker primes too and then dials QUIC. A primer's TTL takes it past this side's own NATs and
  no further (`hmnode.transport.hops`), because a packet that reaches a Linux NAT before that
  NAT's own mapping exists makes it map the flow to another port, and the punch fails;
- birthday probing, when one NAT is symmetric: the hard side primes many sockets, the easy
  side probes random ports (`punch.spray`), the hard side dials from the socket a probe hit;
- a public side is simply dialled; two symmetric sides stay relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hmnode.identity import NodeId
from hmnode.transport import hops
from hmnode.transport.connection import Address, PeerConnection, RemoteError, TransportError
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.punch import MAX_PUNCH_ADDRESSES, BirthdayPlan, PunchStrategy, choose_strategy
from hmnode.transport.reachability import Reachability, format_address

log = logging.getLogger(__name__)

# Raw datagrams (not QUIC: the first byte has QUIC's fixed bit clear).
PUNCH_PROBE = b"\x00HMPU"
PRIMER = b"\x00HMPR"
NONCE_BYTES = 16
RPC_TIMEOUT_S = 5.0
# Counting this side's NATs: tries (routers ration ICMP), and how long a punch waits for it.
DEPTH_TRIES = 3
DEPTH_WAIT_S = 5.0
MAX_HOPS_CACHED = 256


@dataclass
class _Birthday:
    """The hard side's sockets of one birthday probe, waiting for the easy side's probe."""

    nonce: bytes
    peer: NodeId
    sockets: list[Any]
    hit: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())



class HolePuncher:
    """One node's side of hole punching; the RPCs `punch.start` and `punch.spray` are its."""

    def __init__(self, endpoint: Endpoint, rng: random.Random, timeout_s: float, plan: BirthdayPlan,
                 reachability: Callable[[], Reachability], candidates: Callable[[], list[Address]],
                 dial_any: Callable[[NodeId, list[Address], float], Awaitable[PeerConnection]],
                 spawn: Callable[[Any, str], asyncio.Task]) -> None:
        self.endpoint = endpoint
        self.rng = rng
        self.timeout_s = timeout_s
        self.plan = plan
        self.reachability = reachability
        self.candidates = candidates
        self.dial_any = dial_any
        self._spawn = spawn
        self._birthdays: dict[bytes, _Birthday] = {}
        self._hops: dict[str, int | None] = {}
        self._depth: int | None = None  # this side's NATs, once traced
        self._depth_task: asyncio.Task | None = None

    def count_nats(self, towards: Address) -> None:
        """Count this side's NATs by a trace towards a peer, once (before punching starts:
        later, other nodes' probes make our NAT routers ration their ICMP answers)."""
        if self._depth_task is None:
            self._depth_task = self._spawn(self._count_nats(towards), "nat-depth")

    def probe_arrived(self, nonce: bytes, addr: Address, via: Any) -> None:
        """A birthday probe reached one of this node's sockets."""
        bday = self._birthdays.get(nonce)
        if bday is not None and via in bday.sockets and not bday.hit.done():
            bday.hit.set_result((addr, via))

    def close(self) -> None:
        """Close the sockets of birthday probes still waiting."""
        for bday in self._birthdays.values():
            for sock in bday.sockets:
                self.endpoint.close_extra_socket(sock)
        self._birthdays.clear()

    async def punch(self, relayed: PeerConnection, peer: NodeId) -> PeerConnection | None:
        """One DCUtR exchange over the relayed connection, then the direct attempt."""
        nonce = self.rng.randbytes(NONCE_BYTES)
        sent_at = time.perf_counter()
        answer = await relayed.request("punch.start", {
            "kind": self.reachability().value, "addrs": [list(a) for a in self.candidates()],
            "nonce": nonce}, timeout=self.timeout_s + 5)
        rtt = time.perf_counter() - sent_at
        theirs = addresses_from(answer.get("addrs"))
        strategy = choose_strategy(self.reachability(), Reachability(answer.get("kind", "unknown")))
        log.debug("punch to %s: %s (rtt %.1f ms, their addresses %s)", peer.short(), strategy.value,
                  rtt * 1000, theirs)
        if strategy == PunchStrategy.RELAY_ONLY:
            return None
        if strategy == PunchStrategy.THEY_DIAL:
            return await self._await_direct(peer, self.timeout_s)
        if strategy == PunchStrategy.BIRTHDAY_EASY:
            return await self._spray(peer, theirs, nonce)
        if strategy == PunchStrategy.BIRTHDAY_HARD:
            return await self._birthday_hard(relayed, peer, theirs)
        # DIRECT (they are public) or PUNCH: they primed before answering; prime, then dial.
        if strategy == PunchStrategy.PUNCH:
            await self._prime(theirs)
        return await self.dial_any(peer, theirs, self.timeout_s)

    async def serve_punch(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        if conn.peer_id is None:
            raise RemoteError("refused", "not authenticated")
        try:
            theirs = addresses_from(body["addrs"])
            their_kind = Reachability(body["kind"])
            nonce = bytes(body["nonce"])[:NONCE_BYTES]
        except (KeyError, TypeError, ValueError):
            raise RemoteError("bad_request", "punch.start takes {kind, addrs, nonce}") from None
        peer = conn.peer_id
        strategy = choose_strategy(self.reachability(), their_kind)
        # The answer's own strategy is the mirror of the asker's.
        if strategy == PunchStrategy.PUNCH:
            await self._prime(theirs)
        elif strategy == PunchStrategy.DIRECT:
            self._spawn(self.dial_any(peer, theirs, self.timeout_s), "dial-back-punch")
        elif strategy == PunchStrategy.BIRTHDAY_HARD:
            await self._open_birthday(peer, theirs, nonce)
        return {"kind": self.reachability().value, "addrs": [list(a) for a in self.candidates()]}

    async def _prime(self, addresses: list[Address]) -> None:
        """Open this side's NAT mappings towards `addresses` with packets that die before the
        far NAT (see hmnode.transport.hops)."""
        # A private address is reachable only on a shared LAN, where no NAT needs priming.
        addresses = [a for a in addresses if not _is_private(a[0])]
        ttls = await asyncio.gather(*(self._primer_ttl(addr) for addr in addresses))
        for addr, ttl in zip(addresses, ttls):
            for _ in range(2):
                self.endpoint.send_raw(PRIMER, addr, ttl=ttl)
        log.info("primed %s", ", ".join(f"{format_address(a)} (TTL {t})" for a, t in zip(addresses, ttls)))

    async def _primer_ttl(self, addr: Address) -> int:
        """Past our own NATs (counted once, towards the relay), else short of the far NAT."""
        if self._depth is None and self._depth_task is not None and not self._depth_task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._depth_task), DEPTH_WAIT_S)
        if self._depth is not None:
            return hops.primer_ttl(None, self._depth)
        if addr[0] not in self._hops:
            if len(self._hops) >= MAX_HOPS_CACHED:
                self._hops.clear()
            self._hops[addr[0]] = await hops.hops_to(addr[0], addr[1])
        return hops.primer_ttl(self._hops[addr[0]])

    async def _count_nats(self, relay: Address) -> None:
        for attempt in range(DEPTH_TRIES):
            # Routers rate-limit their ICMP answers: a trace can come back short; try again.
            depth = await hops.nat_depth(relay[0], relay[1])
            if depth is not None:
                break
            await asyncio.sleep(1.0 + attempt)
        if depth is None:
            log.info("could not count the NATs towards %s (no router answered a trace)",
                     format_address(relay))
        elif depth != self._depth:
            log.info("%d NAT(s) between this node and the internet (traced towards %s)",
                     depth, format_address(relay))
        self._depth = depth if depth is not None else self._depth

    async def _await_direct(self, peer: NodeId, timeout: float) -> PeerConnection:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = self.endpoint.peers.get(peer)
            if conn is not None and conn.is_established and not conn.is_relayed:
                return conn
            await asyncio.sleep(0.05)
        raise TransportError("no direct connection arrived")

    # --- birthday probing (one side's NAT is symmetric) -------------------------------------

    async def _open_birthday(self, peer: NodeId, theirs: list[Address], nonce: bytes) -> None:
        """As the hard side: open many sockets, prime each towards the easy side, and dial it
        from whichever socket its probe reaches (in the background)."""
        plan = self.plan
        target = theirs[0] if theirs else None
        if target is None:
            return
        sockets = []
        try:
            for _ in range(plan.hard_ports):
                sockets.append(await self.endpoint.open_extra_socket())
        except OSError as exc:
            log.info("birthday probe: could open only %d sockets (%s)", len(sockets), exc)
        bday = _Birthday(nonce, peer, sockets)
        self._birthdays[nonce] = bday
        ttl = await self._primer_ttl(target)
        for sock in sockets:
            self.endpoint.send_from(sock, PRIMER, target, ttl)
        log.info("birthday probe with %s: %d sockets primed towards %s (TTL %d)",
                 peer.short(), len(sockets), format_address(target), ttl)
        self._spawn(self._birthday_wait(bday), f"birthday-{peer.short()}")

    async def _birthday_wait(self, bday: _Birthday) -> None:
        try:
            addr, sock = await asyncio.wait_for(asyncio.shield(bday.hit), self.plan.wait_s)
            self.endpoint.pin(addr, sock)
            await self.endpoint.connect(addr, bday.peer, timeout=self.timeout_s)
        except (TimeoutError, TransportError) as exc:
            log.info("birthday probe with %s: %s", bday.peer.short(), exc or "no probe arrived")
        finally:
            self._birthdays.pop(bday.nonce, None)
            for sock in bday.sockets:
                self.endpoint.close_extra_socket(sock)

    async def _birthday_hard(self, relayed: PeerConnection, peer: NodeId,
                             theirs: list[Address]) -> PeerConnection:
        nonce = self.rng.randbytes(NONCE_BYTES)
        await self._open_birthday(peer, theirs, nonce)
        await relayed.request("punch.spray", {"nonce": nonce, "addrs": [list(a) for a in self.candidates()]},
                              timeout=RPC_TIMEOUT_S)
        return await self._await_direct(peer, self.plan.wait_s + self.timeout_s)

    async def serve_spray(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        try:
            theirs = addresses_from(body["addrs"])
            nonce = bytes(body["nonce"])[:NONCE_BYTES]
        except (KeyError, TypeError, ValueError):
            raise RemoteError("bad_request", "punch.spray takes {nonce, addrs}") from None
        assert conn.peer_id is not None
        self._spawn(self._spray(conn.peer_id, theirs, nonce), f"spray-{conn.peer_id.short()}")
        return {}

    async def _spray(self, peer: NodeId, theirs: list[Address], nonce: bytes) -> PeerConnection:
        """As the easy side: probe random ports of the hard side's IP until its dial arrives."""
        if not theirs:
            raise TransportError("the hard side sent no address")
        plan = self.plan
        ip = theirs[0][0]
        log.info("birthday probe with %s: probing random ports of %s", peer.short(), ip)
        for batch in plan.batches(self.rng):
            conn = self.endpoint.peers.get(peer)
            if conn is not None and conn.is_established and not conn.is_relayed:
                return conn
            for port in batch:
                self.endpoint.send_raw(PUNCH_PROBE + nonce, (ip, port))
            await asyncio.sleep(plan.batch_interval_s)
        return await self._await_direct(peer, self.timeout_s)


def addresses_from(value: Any) -> list[Address]:
    """Candidate addresses from a peer's message: [[ip, port], ...], bounded and checked."""
    if not isinstance(value, list):
        raise ValueError("addrs must be a list")
    out: list[Address] = []
    for item in value[:MAX_PUNCH_ADDRESSES]:
        if (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and 0 < item[1] < 65536):
            out.append((item[0], item[1]))
    return out


def _is_private(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_private
    except ValueError:
        return False
