"""The mesh driver: connects the sans-IO membership and broadcast cores to the QUIC endpoint,
the advert store and LMDB.

The cores decide; this module only moves their messages over the transport (dialling a peer
when there is no connection yet), turns transport failures into their inputs, feeds them the
clock, and keeps what they learn (adverts, known peers) on disk. Anti-entropy is a pull: every
few seconds the node sends its advert digest to a random neighbour and takes what it lacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hmnode import schema
from hmnode.adverts import DIGEST_BUCKETS, Advert, AdvertRejected, AdvertStore, make_advert
from hmnode.broadcast import Broadcast, Delivered
from hmnode.broadcast import Misbehaved as BroadcastMisbehaved
from hmnode.config import HostPort, PeerAddress
from hmnode.errors import HmnodeError
from hmnode.identity import NodeId, NodeKey
from hmnode.membership import Membership, NeighborDown, NeighborUp, Peer, PeerDead
from hmnode.membership import Misbehaved as MembershipMisbehaved
from hmnode.schema import KnownPeer
from hmnode.store import Store, Txn
from hmnode.transport.connection import PeerConnection, TransportError
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.redial import Backoff
from hmnode.transport.wire import WireError

log = logging.getLogger(__name__)

MEMBERSHIP_TOPIC = "mem"
BROADCAST_TOPIC = "bc"
SYNC_METHOD = "adverts.sync"
META_ADVERT_SEQ = "advert_seq"
MAX_SYNC_ADVERTS = 256
MAX_QUEUED_PER_PEER = 256
FIRST_ADVERT_WAIT_S = 5.0
BOOTSTRAP_CHECK_S = 10.0
BOOTSTRAP_BACKOFF = Backoff(base_s=1.0, cap_s=60.0)


@dataclass(frozen=True)
class MeshConfig:
    """Cadences of the driver (the cores have their own configs)."""

    tick_max_s: float = 0.25
    anti_entropy_s: float = 5.0
    advert_ttl_s: float = 600.0
    # Re-advertise well before expiry, and whenever what is advertised changes.
    advert_refresh_s: float = 120.0
    persist_peers_s: float = 10.0


def format_addr(addr: tuple) -> str:
    """A socket address as HOST:PORT (IPv6 in brackets)."""
    return str(HostPort(addr[0], addr[1]))


def parse_addr(text: str) -> tuple[str, int]:
    hp = HostPort.parse(text)
    return hp.host, hp.port


class Mesh:
    """Membership, broadcast and adverts of one running node."""

    def __init__(self, key: NodeKey, endpoint: Endpoint, store: Store,
                 describe: Callable[[], tuple[list[str], dict[str, Any]]],
                 rng: random.Random | None = None, config: MeshConfig = MeshConfig()) -> None:
        self.key = key
        self.me = key.node_id
        self.endpoint = endpoint
        self.store = store
        self.describe = describe
        self.rng = rng or random.Random()
        self.config = config
        self.adverts = AdvertStore()
        self.membership = Membership(Peer(self.me, self._my_addr()), self.rng)
        self.broadcast = Broadcast(self.me, self.rng, validate=self._valid_advert)
        self._addr_of: dict[NodeId, str] = {}
        # When each node's current advert arrived here (wall clock), for dissemination figures.
        self._received_at: dict[NodeId, float] = {}
        self._queued: dict[NodeId, list[tuple[str, dict]]] = {}
        self._dialling: dict[NodeId, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self.bootstrap: tuple[PeerAddress, ...] = ()
        self._own: Advert | None = None
        self._own_content: tuple | None = None
        handlers = endpoint.handlers
        handlers.notify = self._on_notify
        handlers.rpc = {**handlers.rpc, SYNC_METHOD: self._serve_sync}
        endpoint.connection_closed_handler = self._on_connection_closed

    @staticmethod
    def _now() -> float:
        return time.time()

    def _my_addr(self) -> str:
        advertised = self.describe()[0]
        if advertised:
            return advertised[0]
        bound = self.endpoint.addresses
        return format_addr(bound[0]) if bound else "127.0.0.1:0"

    # --- start, loop ------------------------------------------------------------------------

    def load(self) -> None:
        """Once the endpoint is bound: take this node's reachable address for membership, and
        known peers and adverts from the store, so a restart rejoins without bootstrap."""
        now = self._now()
        # Membership names this node to others (shuffle replies come back to this address), so
        # it must be a dialable one, known only after binding.
        self.membership = Membership(Peer(self.me, self._my_addr()), self.rng)

        def read(tx: Txn) -> tuple[list, list, int]:
            return (list(tx.items(schema.PEERS)), [a for _, a in tx.items(schema.ADVERTS)],
                    tx.get(schema.META, META_ADVERT_SEQ, 0))

        peers, adverts, _ = self.store.read(read)
        for advert in adverts:
            try:
                self.adverts.offer(advert, now)
            except AdvertRejected:
                pass  # expired while the node was down, or damaged: dropped below
        known = [Peer(NodeId(k), p.addr) for k, p in peers if NodeId(k) != self.me]
        for peer in known:
            self._addr_of[peer.node_id] = peer.addr
        if known:
            self.membership.add_passive(known, now)
            log.info("remembered %d peers; rejoining through them", len(known))

    async def join(self, addr: HostPort, expected: NodeId | None) -> NodeId:
        """Connect to a bootstrap peer and ask to join the mesh through it."""
        conn = await self.endpoint.connect((addr.host, addr.port), expected)
        assert conn.peer_id is not None
        peer = self._peer_of(conn)
        self.membership.join(peer, self._now())
        self._pump()
        return conn.peer_id

    async def _keep_joined(self, peer: PeerAddress) -> None:
        """Join through a bootstrap peer, and again whenever this node finds itself with no
        neighbours (say, its only contact went away), with backoff while that fails."""
        failures = 0
        while True:
            if not self.membership.active:
                try:
                    joined = await self.join(peer.addr, peer.node_id)
                    log.info("joined the mesh through %s (%s)", peer.addr, joined.short())
                    failures = 0
                except HmnodeError as exc:
                    log.warning("cannot join through bootstrap peer %s: %s", peer, exc)
                    failures += 1
            await asyncio.sleep(BOOTSTRAP_BACKOFF.delay(failures, self.rng) if failures
                                else BOOTSTRAP_CHECK_S)

    async def run(self) -> None:
        """The mesh subsystem: joins the bootstrap peers, ticks the cores, refreshes the advert,
        pulls anti-entropy."""
        joins = [asyncio.create_task(self._keep_joined(p)) for p in self.bootstrap]
        try:
            await self._loop()
        finally:
            for task in joins:
                task.cancel()
            await asyncio.gather(*joins, return_exceptions=True)

    async def _loop(self) -> None:
        next_sync = next_advert = next_persist = 0.0
        # The first advert waits (briefly) for the first inventory, rather than announcing an
        # empty node and replacing it a moment later.
        first_advert_by = self._now() + FIRST_ADVERT_WAIT_S
        while True:
            now = self._now()
            self.membership.tick(now)
            self.broadcast.tick(now)
            addresses, inventory = self.describe()  # once a tick: it may probe the interfaces
            ready = self._own is not None or bool(inventory) or now >= first_advert_by
            content = (tuple(addresses), _freeze(inventory))
            changed = self._own_content is not None and self._own_content != content
            if ready and (now >= next_advert or changed):
                self.publish(now)
                next_advert = now + self.config.advert_refresh_s
            if now >= next_sync:
                await self._anti_entropy()
                next_sync = now + self.config.anti_entropy_s * self.rng.uniform(0.75, 1.25)
            if now >= next_persist:
                self._persist_peers(now)
                self._expire(now)
                next_persist = now + self.config.persist_peers_s
            self._pump()
            deadlines = [d for d in (self.membership.next_deadline(), self.broadcast.next_deadline())
                         if d is not None]
            wait = min([self.config.tick_max_s, *[max(0.0, d - self._now()) for d in deadlines]])
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = [*self._dialling.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dialling.clear()
        self._persist_peers(self._now())

    # --- adverts ----------------------------------------------------------------------------

    def publish(self, now: float) -> Advert:
        """Sign and broadcast a new advert of this node (its sequence is kept on disk)."""
        addresses, inventory = self.describe()

        def next_seq(tx: Txn) -> int:
            seq = tx.get(schema.META, META_ADVERT_SEQ, 0) + 1
            tx.put(schema.META, META_ADVERT_SEQ, seq)
            return seq

        seq = self.store.write(next_seq)
        advert = make_advert(self.key, seq, addresses, inventory, None, now, self.config.advert_ttl_s)
        self._own = advert
        self._own_content = (tuple(addresses), _freeze(inventory))
        self.adverts.offer(advert, now)
        self._received_at[self.me] = now
        self.store.write(lambda tx: tx.put(schema.ADVERTS, self.me.key, advert))
        self.broadcast.broadcast(advert.msg_id, advert.to_wire(), now)
        self._pump()
        return advert

    def _valid_advert(self, msg_id: bytes, payload: Any) -> bool:
        try:
            advert = Advert.from_wire(payload)
            if advert.msg_id != msg_id:
                return False
            self.adverts.check(advert, self._now())
        except AdvertRejected as exc:
            log.debug("refused an advert: %s", exc)
            return False
        return True

    def _take_advert(self, payload: Any) -> None:
        try:
            advert = Advert.from_wire(payload)
            self._keep(advert)
        except AdvertRejected:
            return

    def _keep(self, advert: Advert) -> None:
        """Offer an advert to the store (raises AdvertRejected) and keep it on disk."""
        now = self._now()
        self.adverts.offer(advert, now)
        self._received_at[advert.node_id] = now
        self.store.write(lambda tx: tx.put(schema.ADVERTS, advert.node_id.key, advert))

    def _expire(self, now: float) -> None:
        gone = self.adverts.expire(now)
        for advert in gone:
            self._received_at.pop(advert.node_id, None)
        if gone:
            self.store.write(lambda tx: [tx.delete(schema.ADVERTS, a.node_id.key) for a in gone])

    async def _anti_entropy(self, peer: Peer | None = None) -> None:
        """Pull what a neighbour (`peer`, else a random one) has that this node lacks."""
        active = self.membership.active
        if peer is None:
            if not active:
                return
            peer = self.rng.choice(active)
        conn = self.endpoint.peers.get(peer.node_id)
        if conn is None or not conn.is_established:
            return
        try:
            answer = await conn.request(SYNC_METHOD, {"digest": self.adverts.digest()}, timeout=5.0)
        except (TransportError, WireError) as exc:
            log.debug("anti-entropy with %s failed: %s", peer.node_id.short(), exc)
            return
        adverts = answer.get("adverts") if isinstance(answer, dict) else None
        if not isinstance(adverts, list):
            self.endpoint.record_misbehaviour(conn, "malformed anti-entropy answer")
            return
        for wire in adverts[:MAX_SYNC_ADVERTS]:
            try:
                advert = Advert.from_wire(wire)
                if self.adverts.is_news(advert):
                    self._keep(advert)
            except AdvertRejected as exc:
                self.endpoint.record_misbehaviour(conn, f"anti-entropy advert: {exc}")

    async def _serve_sync(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        digest = body.get("digest") if isinstance(body, dict) else None
        if (not isinstance(digest, list) or len(digest) != DIGEST_BUCKETS
                or not all(isinstance(h, bytes) for h in digest)):
            self.endpoint.record_misbehaviour(conn, "malformed anti-entropy digest")
            return {"adverts": []}
        newer = self.adverts.differing(digest)
        self.rng.shuffle(newer)  # a large backlog arrives over several rounds, in no fixed order
        return {"adverts": [a.to_wire() for a in newer[:MAX_SYNC_ADVERTS]]}

    # --- moving messages --------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the cores queued and act on their events, until both are quiet."""
        for _ in range(100):  # each round may queue more; bounded all the same
            membership_out = self.membership.take_outbox()
            member_events = self.membership.take_events()
            broadcast_out = self.broadcast.take_outbox()
            broadcast_events = self.broadcast.take_events()
            if not (membership_out or member_events or broadcast_out or broadcast_events):
                return
            for peer, message in membership_out:
                self._addr_of[peer.node_id] = peer.addr
                self._send(peer.node_id, MEMBERSHIP_TOPIC, message)
            for event in member_events:
                self._on_membership_event(event)
            for node_id, message in broadcast_out:
                self._send(node_id, BROADCAST_TOPIC, message)
            for event in broadcast_events:
                if isinstance(event, Delivered) and event.sender is not None:
                    self._take_advert(event.payload)
                elif isinstance(event, BroadcastMisbehaved):
                    self._misbehaved(event.peer, f"broadcast: {event.reason}")

    def _on_membership_event(self, event: Any) -> None:
        now = self._now()
        if isinstance(event, NeighborUp):
            self._addr_of[event.peer.node_id] = event.peer.addr
            self.broadcast.neighbor_up(event.peer.node_id, now)
            # A new neighbour may hold adverts that were broadcast before this link existed
            # (a joining or restarted node's above all): pull them now, not at the next round.
            self._spawn(self._anti_entropy(event.peer))
            self.store.write(lambda tx: tx.put(schema.PEERS, event.peer.node_id.key,
                                               KnownPeer(event.peer.addr, now)))
            log.info("neighbour up: %s at %s", event.peer.node_id.short(), event.peer.addr)
        elif isinstance(event, NeighborDown):
            self.broadcast.neighbor_down(event.peer.node_id, now)
            log.info("neighbour down: %s (%s)", event.peer.node_id.short(), event.reason)
        elif isinstance(event, PeerDead):
            log.info("peer %s declared dead", event.node_id.short())
            conn = self.endpoint.peers.get(event.node_id)
            if conn is not None:
                conn.close(reason="declared dead by membership")
        elif isinstance(event, MembershipMisbehaved):
            self._misbehaved(event.node_id, f"membership: {event.reason}")

    def _misbehaved(self, node_id: NodeId, reason: str) -> None:
        log.info("misbehaviour by %s: %s", node_id.short(), reason)
        self.endpoint.misbehaviour[str(node_id)] += 1

    def _send(self, node_id: NodeId, topic: str, message: dict) -> None:
        conn = self.endpoint.peers.get(node_id)
        if conn is not None and conn.is_established:
            try:
                conn.notify(topic, message)
                return
            except WireError:
                # The cores bound what they send; a message the wire refuses is a bug, not a
                # reason to stop the node.
                log.exception("dropped a %s message the wire refused", topic)
                return
            except TransportError:
                pass
        queue = self._queued.setdefault(node_id, [])
        if len(queue) < MAX_QUEUED_PER_PEER:
            queue.append((topic, message))
        if node_id not in self._dialling:
            self._dialling[node_id] = asyncio.create_task(self._dial(node_id))

    async def _dial(self, node_id: NodeId) -> None:
        try:
            addr = self._addr_of.get(node_id)
            if addr is None:
                raise TransportError("no known address")
            conn = await self.endpoint.connect(parse_addr(addr), node_id, timeout=5.0)
            for topic, message in self._queued.pop(node_id, []):
                conn.notify(topic, message)
        except (TransportError, ValueError) as exc:
            log.debug("cannot reach %s: %s", node_id.short(), exc)
            self._queued.pop(node_id, None)
            self.membership.connection_failed(node_id, self._now())
        finally:
            self._dialling.pop(node_id, None)
            self._pump()

    def _peer_of(self, conn: PeerConnection) -> Peer:
        # One socket both listens and dials, so the address a peer is seen from is where it
        # listens (until NAT traversal adds observed and relayed addresses).
        assert conn.peer_id is not None
        return Peer(conn.peer_id, format_addr(conn.addr))

    def _on_notify(self, conn: PeerConnection, topic: str, body: Any) -> None:
        now = self._now()
        if topic == MEMBERSHIP_TOPIC:
            self.membership.receive(self._peer_of(conn), body, now)
        elif topic == BROADCAST_TOPIC:
            self.broadcast.receive(conn.peer_id, body, now)  # type: ignore[arg-type]
        else:
            self.endpoint.record_misbehaviour(conn, f"unknown topic {topic!r}")
            return
        self._pump()
        self._wake.set()

    def _on_connection_closed(self, conn: PeerConnection) -> None:
        if conn.peer_id is not None and conn.peer_id not in self.endpoint.peers:
            self.membership.connection_failed(conn.peer_id, self._now())
            self._pump()

    def _persist_peers(self, now: float) -> None:
        peers = [*self.membership.active, *self.membership.passive]

        def write(tx: Txn) -> None:
            for peer in peers:
                tx.put(schema.PEERS, peer.node_id.key, KnownPeer(peer.addr, now))
            excess = tx.count(schema.PEERS) - schema.PEERS_KEPT
            if excess > 0:
                oldest = sorted(tx.items(schema.PEERS), key=lambda kv: kv[1].last_seen)[:excess]
                for key, _ in oldest:
                    tx.delete(schema.PEERS, key)

        if peers:
            self.store.write(write)

    # --- views for the control API ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Views and peer states, for `hmnode peers`."""
        return self.membership.snapshot()

    def advert_list(self) -> list[dict[str, Any]]:
        """Every advert known, for `hmnode assets --mesh`."""
        return [{"node_id": str(a.node_id), "seq": a.seq, "addresses": list(a.addresses),
                 "inventory": a.inventory, "prices": a.prices, "issued_at": a.issued_at,
                 "expires_at": a.expires_at, "received_at": self._received_at.get(a.node_id)}
                for a in self.adverts.all()]

    def stats(self) -> dict[str, Any]:
        """Counters of the broadcast core and sizes of what is held, for benchmarks."""
        return {"broadcast": dataclasses.asdict(self.broadcast.stats), "adverts": len(self.adverts),
                "active": len(self.membership.active), "passive": len(self.membership.passive)}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value
