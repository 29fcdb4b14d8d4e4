"""NAT traversal over the node's QUIC endpoint: observed addresses, dial-backs, relay, punching.

The asyncio shell around the sans-IO pieces (`reachability`, `relay`, `punch`). In the order a
node uses them:

1. Observed addresses: every new direct connection asks the peer `nat.observe` (the address it
   sees us from). A public peer also answers a raw probe on a second port, so that one public
   peer suffices to tell an endpoint-independent mapping (cone) from a symmetric one.
2. Dial-back (AutoNAT v2): a peer sends a nonce to our observed address from a port we never
   talked to; if it arrives, the address is confirmed and advertised as direct.
3. Relay (`circuits.CircuitRelay`): a node that is not confirmed public reserves a slot on a
   public peer and advertises `RELAY@HOST:PORT/relay`. A dialer opens a circuit there; the
   relay forwards QUIC packets it cannot read (relay.data notifications), and the two ends
   run their own authenticated QUIC connection over it.
4. Upgrade (DCUtR): over the relayed connection the two ends exchange candidates and NAT kinds
   and open a direct path (`holepunch.HolePuncher`); the direct connection replaces the
   relayed one.
5. Keeping paths: a punched path is pinged often; when it goes silent it is closed, the peer is
   reached through the relay again, and direct is retried about every minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hmnode.identity import NodeId, NodeKey
from hmnode.transport.circuits import CircuitRelay
from hmnode.transport.connection import Address, PeerConnection, RemoteError, TransportError
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.holepunch import NONCE_BYTES, PUNCH_PROBE, RPC_TIMEOUT_S, HolePuncher
from hmnode.transport.punch import MAX_PUNCH_ADDRESSES, BirthdayPlan
from hmnode.transport.reachability import (DialBackRefused, ObservedAddresses, Reachability,
                                           check_dial_back, format_address, normalise_ip,
                                           parse_address)
from hmnode.transport.relay import RelayedAddress, RelayLimits, is_relayed
from hmnode.transport.wire import ErrorCode

log = logging.getLogger(__name__)

# Raw datagrams (not QUIC: the first byte has QUIC's fixed bit clear).
DIAL_BACK = b"\x00HMDB"
OBSERVE_ASK = b"\x00HMOA"
OBSERVE_ANSWER = b"\x00HMOR"
OBSERVE_AGAIN_S = 10.0
ADVERT_WAIT_S = 5.0
PATH_CHECK_S = 2.0
MAX_DIAL_BACKS_SERVED = 8


@dataclass(frozen=True)
class TraversalConfig:
    """NAT traversal settings; the defaults hold NAT bindings (30 s at the least) open."""

    relay: RelayLimits = RelayLimits()
    reserve: bool = True  # a node that is not public keeps a relay reservation
    observe_peers: int = 8
    dial_back_every_s: float = 300.0
    dial_back_wait_s: float = 2.0
    punch_attempts: int = 3
    punch_timeout_s: float = 4.0
    direct_retry_s: float = 60.0
    # Punched paths are pinged this often, and given up when silent this long, so that a lost
    # NAT binding is noticed and the peer reached through the relay within seconds.
    path_ping_s: float = 1.0
    path_dead_s: float = 4.0
    birthday: BirthdayPlan = BirthdayPlan()
    tick_s: float = 1.0
    # As libp2p's ForceReachabilityPrivate/Public: skip the measurement (tests, known setups).
    force_reachability: Reachability | None = None


class NatTraversal:
    """Finds, opens and keeps the best path to each peer over one endpoint."""

    def __init__(self, endpoint: Endpoint, key: NodeKey, config: TraversalConfig = TraversalConfig(),
                 rng: random.Random | None = None,
                 addresses_of: Callable[[NodeId], list[str]] | None = None,
                 on_addresses_changed: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        self.me = key.node_id
        self.config = config
        self.rng = rng or random.Random()
        self.addresses_of = addresses_of or (lambda node: [])
        self.on_addresses_changed = on_addresses_changed or (lambda: None)
        self.observed = ObservedAddresses()
        self.relaying = CircuitRelay(endpoint, config.relay,
                                     lambda: self.reachability == Reachability.PUBLIC,
                                     self.on_addresses_changed)
        self._dial_backs: dict[bytes, asyncio.Future] = {}
        self._observe_asks: dict[bytes, NodeId] = {}
        self._dial_backs_served = 0
        self._dial_back_failed_at: float | None = None
        self._dial_back_at = 0.0
        self._observed_from: set[NodeId] = set()
        self._observe_again_at = 0.0
        self._alt_socket: Any = None
        self._punched: dict[NodeId, PeerConnection] = {}
        self._upgrading: dict[NodeId, asyncio.Task] = {}
        self._next_direct_try: dict[NodeId, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self.time_to_direct_ms: dict[NodeId, float] = {}
        self.puncher = HolePuncher(endpoint, self.rng, config.punch_timeout_s, config.birthday,
                                   lambda: self.reachability, self.candidates, self._dial_any,
                                   self._spawn)
        self._install()

    # --- wiring -----------------------------------------------------------------------------

    def _install(self) -> None:
        handlers = self.endpoint.handlers
        handlers.rpc = {**handlers.rpc, "nat.observe": self._serve_observe,
                        "nat.dialback": self._serve_dial_back, "relay.reserve": self.relaying.serve_reserve,
                        "relay.connect": self.relaying.serve_connect,
                        "punch.start": self.puncher.serve_punch, "punch.spray": self.puncher.serve_spray}
        inner = handlers.notify

        def notify(conn: PeerConnection, topic: str, body: Any) -> None:
            if topic.startswith("relay."):
                self.relaying.on_notify(conn, topic, body)
            elif inner is not None:
                inner(conn, topic, body)

        handlers.notify = notify
        self.endpoint.raw_datagram_handler = self._on_raw
        self.endpoint.authenticated_handlers.append(self._on_authenticated)
        self.endpoint.closed_handlers.append(self._on_closed)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, (TransportError, TimeoutError)):
                log.debug("%s: %s", task.get_name(), exc)
            else:
                log.error("%s failed", task.get_name(), exc_info=exc)

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    # --- what this node knows of itself -----------------------------------------------------

    @property
    def reachability(self) -> Reachability:
        """How peers can reach this node, as measured (or as forced by the config)."""
        if self.config.force_reachability is not None:
            return self.config.force_reachability
        return self.observed.reachability(self._now())

    def advertised(self, local: list[str]) -> list[str]:
        """This node's addresses for its advert: confirmed direct ones, the relayed one, then
        the local interfaces' (reachable on the same LAN)."""
        now = self._now()
        out = [format_address(a) for a in self.observed.confirmed(now)]
        relayed = self.relaying.relayed_address()
        if relayed is not None:
            out.append(str(relayed))
        out.extend(a for a in local if a not in out)
        return out[:16]

    def candidates(self) -> list[Address]:
        """Where a peer might reach this node directly: observed, then bound interface addresses."""
        now = self._now()
        out = list(self.observed.confirmed(now)) + self.observed.addresses(now)
        for text in self.addresses_of(self.me):
            if not is_relayed(text):
                with contextlib.suppress(ValueError):
                    out.append(parse_address(text))
        seen: list[Address] = []
        for a in out:
            if a not in seen:
                seen.append(a)
        return seen[:MAX_PUNCH_ADDRESSES]

    def status(self) -> dict[str, Any]:
        """For `hmnode status`: reachability, observed addresses, the reservation, the relay."""
        now = self._now()
        return {**self.observed.snapshot(now), **self.relaying.status(now)}

    def path_of(self, conn: PeerConnection) -> dict[str, Any]:
        """For `hmnode peers`: direct or relayed, and through which relay."""
        if conn.is_relayed:
            circuit = self.relaying.circuit_of(conn)
            return {"path": "relayed", "relay": str(circuit.relay) if circuit else None}
        return {"path": "direct", "relay": None}

    def dial_address(self, conn: PeerConnection) -> str:
        """An address others can dial this peer at, as membership passes it on."""
        if conn.is_relayed:
            circuit = self.relaying.circuit_of(conn)
            relay_conn = self.endpoint.peers.get(circuit.relay) if circuit else None
            if circuit is not None and relay_conn is not None and not relay_conn.is_relayed:
                return str(RelayedAddress(circuit.relay, *relay_conn.addr[:2]))
        known = self.addresses_of(conn.peer_id) if conn.peer_id else []
        if known and (conn.is_relayed or not conn.is_client):
            # Where it says it can be reached, not where its packets came from (a NAT's port).
            return known[0]
        return format_address(conn.addr[:2]) if not conn.is_relayed else f"{conn.addr[0]}:{conn.addr[1]}"

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep reachability known, the reservation held and punched paths alive."""
        # The second port on which peers learn whether their mapping depends on the
        # destination; useful from the start, as peers ask once they connect.
        self._alt_socket = await self.endpoint.open_extra_socket()
        try:
            while True:
                try:
                    await self._tick()
                except Exception:  # one bad tick must not end traversal for the node's life
                    log.exception("NAT traversal step failed")
                await asyncio.sleep(self.config.tick_s)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.puncher.close()
            if self._alt_socket is not None:
                self.endpoint.close_extra_socket(self._alt_socket)

    async def _tick(self) -> None:
        now = self._now()
        self.relaying.service.expire(now)
        if now - self._dial_back_at > self.config.dial_back_every_s or (
                self._dial_back_at == 0 and self.observed.addresses(now)):
            if self.observed.addresses(now) and "dialback" not in _names(self._tasks):
                self._dial_back_at = now
                self._spawn(self._check_reachability(), "dialback")
        if self.reachability == Reachability.PUBLIC:
            self.relaying.give_up_reservation()
        elif self.config.reserve and self._wants_relay(now) and "reserve" not in _names(self._tasks):
            self._spawn(self.relaying.keep_reservation(), "reserve")
        self._observe_again(now)
        self._keep_paths(now)

    def _wants_relay(self, now: float) -> bool:
        if self.relaying.reservation is not None:
            return self.relaying.wants_reservation(now)
        # Not public: a dial-back failed, or the mapping alone says NAT.
        return (self._dial_back_failed_at is not None or self.config.force_reachability is not None
                or self.observed.mapping(now) == Reachability.SYMMETRIC)

    # --- observed addresses and dial-backs --------------------------------------------------

    def _on_authenticated(self, conn: PeerConnection) -> None:
        if conn.is_relayed or conn.peer_id is None:
            return
        if self._behind_nat(conn.peer_id):
            # A direct path through a NAT: watch it, so a lost binding sends us to the relay.
            self._punched[conn.peer_id] = conn
        if conn.peer_id in self._observed_from:
            return
        if len(self._observed_from) >= self.config.observe_peers:
            return
        self._observed_from.add(conn.peer_id)
        self._spawn(self._observe(conn), f"observe-{conn.peer_id.short()}")

    def _on_closed(self, conn: PeerConnection) -> None:
        self.relaying.on_closed(conn)
        if conn.peer_id is not None and self._punched.get(conn.peer_id) is conn:
            del self._punched[conn.peer_id]

    def _local_ips(self) -> set[str]:
        """The IPs this node's sockets are bound to or advertise as its own interfaces'."""
        ips = {normalise_ip(a[0]) for a in self.endpoint.addresses}
        for text in self.addresses_of(self.me):
            if not is_relayed(text):
                with contextlib.suppress(ValueError):
                    ips.add(normalise_ip(parse_address(text)[0]))
        return ips

    def _behind_nat(self, peer: NodeId) -> bool:
        """Whether a direct path to `peer` crosses a NAT (ours, or theirs as their advert tells)."""
        if self.reachability != Reachability.PUBLIC:
            return True
        return any(is_relayed(a) for a in self.addresses_of(peer))

    def _observe_again(self, now: float) -> None:
        """While the mapping is unknown, ask the directly connected peers again (a peer that
        was not yet public when first asked had no second port to offer)."""
        if now < self._observe_again_at or self.observed.mapping(now) != Reachability.UNKNOWN:
            return
        self._observe_again_at = now + OBSERVE_AGAIN_S
        self._observed_from.clear()
        for conn in list(self.endpoint.peers.values()):
            if conn.is_established:
                self._on_authenticated(conn)

    async def _observe(self, conn: PeerConnection) -> None:
        try:
            answer = await conn.request("nat.observe", None, timeout=RPC_TIMEOUT_S)
            seen = (str(answer["addr"][0]), int(answer["addr"][1]))
        except (TransportError, KeyError, TypeError, ValueError, IndexError) as exc:
            log.debug("no observed address from %r: %s", conn, exc)
            self._observed_from.discard(conn.peer_id)  # type: ignore[arg-type]
            return
        assert conn.peer_id is not None
        if seen[0] not in self._local_ips():
            self.puncher.count_nats(conn.addr[:2])  # type: ignore[arg-type]  # we are behind NAT
        if self.observed.observe(str(conn.peer_id), conn.addr[0], seen, self._now()):
            log.info("observed address %s (reported by %s)", format_address(seen), conn.peer_id.short())
            self.on_addresses_changed()
        alt = answer.get("alt") if isinstance(answer, dict) else None
        if isinstance(alt, int) and 0 < alt < 65536:
            # The same peer on another port: a symmetric NAT maps that to another public port.
            nonce = self.rng.randbytes(NONCE_BYTES)
            self._observe_asks[nonce] = conn.peer_id
            for _ in range(3):
                self.endpoint.send_raw(OBSERVE_ASK + nonce, (conn.addr[0], alt))
                await asyncio.sleep(0.2)
                if nonce not in self._observe_asks:
                    break
            self._observe_asks.pop(nonce, None)

    async def _serve_observe(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        answer: dict[str, Any] = {"addr": [conn.addr[0], conn.addr[1]]}
        if self._alt_socket is not None and not conn.is_relayed:
            answer["alt"] = self._alt_socket.get_extra_info("sockname")[1]
        return answer

    async def _check_reachability(self) -> None:
        """Ask a directly connected peer to dial back our most observed address."""
        now = self._now()
        candidates = self.observed.addresses(now)[:2]
        helpers = [c for c in self.endpoint.peers.values() if c.is_established and not c.is_relayed]
        if not candidates or not helpers:
            self._dial_back_at = 0.0
            return
        for target in candidates:
            helper = self.rng.choice(helpers)
            nonce = self.rng.randbytes(NONCE_BYTES)
            waiter = asyncio.get_running_loop().create_future()
            self._dial_backs[nonce] = waiter
            padding = b"" if normalise_ip(target[0]) == normalise_ip(helper.addr[0]) else bytes(30_000)
            try:
                await helper.request("nat.dialback", {"addr": list(target), "nonce": nonce,
                                                      "pad": padding}, timeout=RPC_TIMEOUT_S)
                await asyncio.wait_for(waiter, self.config.dial_back_wait_s)
            except (TransportError, TimeoutError) as exc:
                log.info("dial-back to %s did not arrive (%s): not reachable there unasked",
                         format_address(target), exc or "timed out")
                self.observed.unconfirm(target)
                self._dial_back_failed_at = self._now()
                continue
            finally:
                self._dial_backs.pop(nonce, None)
            was_public = self.reachability == Reachability.PUBLIC
            self.observed.confirm(target, self._now())
            if not was_public:
                log.info("reachable at %s (a dial-back from %s arrived): public",
                         format_address(target), helper.peer_id.short() if helper.peer_id else "?")
                self.on_addresses_changed()

    async def _serve_dial_back(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        try:
            target = (str(body["addr"][0]), int(body["addr"][1]))
            nonce = bytes(body["nonce"])[:NONCE_BYTES]
            padding = len(body.get("pad") or b"")
            check_dial_back(conn.addr[0], target, padding)
        except (KeyError, TypeError, ValueError, IndexError):
            raise RemoteError("bad_request", "nat.dialback takes {addr: [ip, port], nonce, pad}") from None
        except DialBackRefused as exc:
            raise RemoteError("refused", str(exc)) from None
        if conn.is_relayed:
            raise RemoteError("refused", "no dial-backs over a relay")
        if self._dial_backs_served >= MAX_DIAL_BACKS_SERVED:
            raise RemoteError("busy", "too many dial-backs in progress; try later")
        self._dial_backs_served += 1
        try:
            # From a port the requester never talked to: only an open (or forwarded) port sees it.
            sock = await self.endpoint.open_extra_socket()
            try:
                for delay in (0.0, 0.2, 0.5):
                    await asyncio.sleep(delay)
                    sock.sendto(DIAL_BACK + nonce, target)
            finally:
                self.endpoint.close_extra_socket(sock)
        finally:
            self._dial_backs_served -= 1
        return {"sent": 3}

    def _on_raw(self, data: bytes, addr: Address, via: Any) -> None:
        kind, rest = data[:5], data[5:]
        if kind == DIAL_BACK:
            waiter = self._dial_backs.get(rest[:NONCE_BYTES])
            if waiter is not None and not waiter.done():
                waiter.set_result(addr)
        elif kind == OBSERVE_ASK and via is not None and via is self._alt_socket:
            # Answer from the alternate port: where did this come from?
            seen = f"{addr[0]}|{addr[1]}".encode()
            via.sendto(OBSERVE_ANSWER + rest[:NONCE_BYTES] + seen, addr)
        elif kind == OBSERVE_ANSWER:
            reporter = self._observe_asks.pop(rest[:NONCE_BYTES], None)
            if reporter is None:
                return
            try:
                host, port = rest[NONCE_BYTES:].decode().split("|")
                seen = (host, int(port))
            except ValueError:
                return
            if self.observed.observe(f"{reporter}/alt", f"{addr[0]}|{addr[1]}", seen, self._now()):
                self.on_addresses_changed()
        elif kind == PUNCH_PROBE:
            self.puncher.probe_arrived(rest[:NONCE_BYTES], addr, via)

    # --- connecting to a peer ---------------------------------------------------------------

    async def connect(self, peer: NodeId, hint: str | None = None,
                      timeout: float = 10.0) -> PeerConnection:
        """The best connection to `peer` now: an open one, a direct dial where the peer is
        reachable, else through its relay (then upgraded to direct in the background)."""
        existing = self.endpoint.peers.get(peer)
        if existing is not None and existing.is_established:
            return existing
        texts = list(self.addresses_of(peer))
        if not texts and hint:
            # A hint is often only the address a peer's packets came from. Behind a NAT, a
            # packet sent there unasked makes that NAT map the peer's next flow to this node to
            # another port, which spoils hole punching between the two for half a minute. So
            # only the peer's own signed advert is dialled: wait a moment for it to arrive.
            deadline = self._now() + min(timeout, ADVERT_WAIT_S)
            while not texts and self._now() < deadline:
                await asyncio.sleep(0.1)
                texts = list(self.addresses_of(peer))
            if not texts and _is_loopback(hint):
                texts = [hint]  # no NAT on this machine's own addresses
            if not texts:
                raise TransportError(f"no advert of {peer.short()} yet, so no address to dial "
                                     "that it vouches for; try again once it has spread")
        relayed = []
        direct: list[Address] = []
        for text in texts:
            with contextlib.suppress(ValueError):
                if is_relayed(text):
                    relayed.append(RelayedAddress.parse(text))
                else:
                    direct.append(parse_address(text))
        errors: list[str] = []
        if direct and not relayed:
            try:
                return await self._dial_any(peer, direct, timeout)
            except TransportError as exc:
                errors.append(str(exc))
        for address in relayed:
            try:
                conn = await self.relaying.connect(peer, address, timeout)
            except TransportError as exc:
                errors.append(str(exc))
                continue
            self.upgrade_later(peer, delay=0.0)
            return conn
        if direct and relayed:
            try:
                return await self._dial_any(peer, direct, min(timeout, 3.0))
            except TransportError as exc:
                errors.append(str(exc))
        raise TransportError(f"cannot reach {peer.short()}: " + ("; ".join(errors) or (
            "no advert of it is known here: it has not joined this mesh, or its advert has not "
            "reached this node yet")))

    async def connect_checked(self, peer: NodeId, timeout: float = 10.0) -> PeerConnection:
        """As `connect`, and a round trip over the connection proves that its path works now; a
        connection whose path is dead is closed and another one made, until `timeout`."""
        deadline = self._now() + timeout
        errors: list[str] = []
        while (left := deadline - self._now()) > 0:
            try:
                conn = await self.connect(peer, timeout=left)
                await conn.request("nat.observe", None, timeout=min(left, PATH_CHECK_S))
                return conn
            except TransportError as exc:
                errors.append(str(exc))
                conn = self.endpoint.peers.get(peer)  # type: ignore[assignment]
                if conn is not None and not conn.closed.done():
                    conn.close(ErrorCode.TIMEOUT, "no answer over this path")
                await asyncio.sleep(min(0.2, max(0.0, deadline - self._now())))
        raise TransportError((errors[-1] if errors else f"cannot reach {peer.short()}")
                             + f" (kept trying for {timeout:g} s)")

    async def _dial_any(self, peer: NodeId, addresses: list[Address], timeout: float) -> PeerConnection:
        """Dial every address at once; the first authenticated connection wins."""
        tasks = [asyncio.ensure_future(self.endpoint.connect(a, peer, timeout=timeout))
                 for a in addresses[:MAX_PUNCH_ADDRESSES]]
        errors = []
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    return await next_done
                except TransportError as exc:
                    errors.append(str(exc))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        raise TransportError("; ".join(errors) or "no address to dial")

    # --- upgrading a relayed connection to a direct path ------------------------------------

    def upgrade_later(self, peer: NodeId, delay: float) -> None:
        """Try to replace the relayed connection to `peer` by a direct one (once at a time)."""
        if peer in self._upgrading:
            return
        self._upgrading[peer] = self._spawn(self._upgrade(peer, delay), f"upgrade-{peer.short()}")

    async def _upgrade(self, peer: NodeId, delay: float) -> None:
        started = self._now()
        try:
            await asyncio.sleep(delay)
            for attempt in range(1, self.config.punch_attempts + 1):
                conn = self.endpoint.peers.get(peer)
                if conn is None or not conn.is_established:
                    return
                if not conn.is_relayed:
                    return
                try:
                    direct = await self.puncher.punch(conn, peer)
                except (TransportError, TimeoutError) as exc:
                    log.info("hole punch to %s, attempt %d: %s", peer.short(), attempt, exc)
                    await asyncio.sleep(0.5 + self.rng.random())
                    continue
                if direct is not None:
                    self.time_to_direct_ms[peer] = round((self._now() - started) * 1000, 1)
                    log.info("direct path to %s after %d attempt(s)", peer.short(), attempt)
                    return
                return  # the strategy says relay only
            self._next_direct_try[peer] = self._now() + self.config.direct_retry_s
        finally:
            self._upgrading.pop(peer, None)

    # --- keeping paths ----------------------------------------------------------------------

    def _keep_paths(self, now: float) -> None:
        loop_now = asyncio.get_running_loop().time()
        for peer, conn in list(self._punched.items()):
            if conn.closed.done():
                self._punched.pop(peer, None)
                continue
            if loop_now - conn.last_heard > self.config.path_dead_s:
                log.info("direct path to %s went silent; back to the relay", peer.short())
                self._punched.pop(peer, None)
                conn.close(ErrorCode.TIMEOUT, "direct path went silent")
                self._spawn(self._fall_back(peer), f"fallback-{peer.short()}")
            else:
                conn.ping()
        for peer, at in list(self._next_direct_try.items()):
            if now >= at:
                del self._next_direct_try[peer]
                conn = self.endpoint.peers.get(peer)
                if conn is not None and conn.is_relayed:
                    self.upgrade_later(peer, delay=0.0)

    async def _fall_back(self, peer: NodeId) -> None:
        try:
            await self.connect(peer, timeout=RPC_TIMEOUT_S)
        except TransportError as exc:
            log.info("cannot reach %s through a relay either: %s", peer.short(), exc)
        self._next_direct_try[peer] = self._now() + self.config.direct_retry_s


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(parse_address(text)[0]).is_loopback
    except ValueError:
        return False


def _names(tasks: set[asyncio.Task]) -> set[str]:
    return {t.get_name() for t in tasks if not t.done()}
