"""The mesh driver: runs a node's gossip (`hmnode.gossip_node`) over the QUIC endpoint and LMDB.

All gossip logic lives in `GossipNode`, which also runs in the simulator; this module is its
environment in production: the real clock, a system-seeded Random, the LMDB store, and a
network that sends each message over the peer's QUIC connection (dialling the peer when there
is none yet) and turns transport failures into the node's inputs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from hmnode.adverts import Advert
from hmnode.config import HostPort, PeerAddress
from hmnode.env import Env, RealClock
from hmnode.errors import HmnodeError
from hmnode.gossip_node import Describe, GossipConfig, GossipNode, GossipObserver, TOPICS
from hmnode.identity import NodeId, NodeKey
from hmnode.membership import Event, NeighborDown, NeighborUp, Peer, PeerDead
from hmnode.store import Store
from hmnode.transport.connection import PeerConnection, TransportError
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.redial import Backoff
from hmnode.transport.reachability import format_address, parse_address
from hmnode.transport.traversal import NatTraversal
from hmnode.transport.wire import WireError

log = logging.getLogger(__name__)

MAX_QUEUED_PER_PEER = 256
DIAL_TIMEOUT_S = 5.0
BOOTSTRAP_BACKOFF = Backoff(base_s=1.0, cap_s=60.0)


# The one writer and reader of HOST:PORT socket addresses, under the names the agent uses.
format_addr = format_address
parse_addr = parse_address


class NodeNotStarted(HmnodeError):
    """The mesh was asked for something before the node's endpoint was bound."""


class Mesh(GossipObserver):
    """The gossip of one running node, over its QUIC endpoint and LMDB store."""

    def __init__(self, key: NodeKey, endpoint: Endpoint, store: Store, describe: Describe,
                 rng: random.Random | None = None, config: GossipConfig = GossipConfig()) -> None:
        self.key = key
        self.me = key.node_id
        self.endpoint = endpoint
        self.store = store
        self.describe = describe
        self.rng = rng or random.Random()
        self.config = config
        self.bootstrap: tuple[PeerAddress, ...] = ()
        self._node: GossipNode | None = None
        # When each node's current advert arrived here (wall clock), for dissemination figures.
        self._received_at: dict[NodeId, float] = {}
        self._queued: dict[NodeId, list[tuple[str, dict]]] = {}
        self._dialling: dict[NodeId, asyncio.Task] = {}
        # Set by the agent: how peers are reached (direct, relayed, punched).
        self.traversal: NatTraversal | None = None
        # Topics other subsystems receive over the same connections (the chain's).
        self._routes: dict[str, Callable[[NodeId, str, Any], None]] = {}
        handlers = endpoint.handlers
        handlers.notify = self._on_notify
        endpoint.connection_closed_handler = self._on_connection_closed

    @property
    def node(self) -> GossipNode:
        """The gossip node (there is one once `load` has run)."""
        if self._node is None:
            raise NodeNotStarted("the mesh is not started yet; try again in a moment")
        return self._node

    def _my_addr(self) -> str:
        advertised = self.describe()[0]
        if advertised:
            return advertised[0]
        bound = self.endpoint.addresses
        return format_addr(bound[0]) if bound else "127.0.0.1:0"

    # --- start, stop ------------------------------------------------------------------------

    def load(self) -> None:
        """Once the endpoint is bound: start the gossip node under this node's reachable address
        (membership names it to others, so shuffle replies come back to it), with the peers and
        adverts the store remembers."""
        env = Env(RealClock(), self.rng, self, self.store)
        self._node = GossipNode(self.key, self._my_addr(), env, self.describe, self.config, self)
        self._node.start()
        if self._node.known_peers:
            log.info("remembered %d peers; rejoining through them", self._node.known_peers)

    async def join(self, addr: HostPort, expected: NodeId | None) -> NodeId:
        """Connect to a bootstrap peer and ask to join the mesh through it."""
        conn = await self.endpoint.connect((addr.host, addr.port), expected)
        assert conn.peer_id is not None
        self.node.join(self._peer_of(conn))
        return conn.peer_id

    async def _keep_joined(self, peer: PeerAddress) -> None:
        """Join through a bootstrap peer, and again whenever this node finds itself with no
        neighbours (say, its only contact went away), with backoff while that fails."""
        failures = 0
        while True:
            if not self.node.membership.active:
                try:
                    joined = await self.join(peer.addr, peer.node_id)
                    log.info("joined the mesh through %s (%s)", peer.addr, joined.short())
                    failures = 0
                except HmnodeError as exc:
                    log.warning("cannot join through bootstrap peer %s: %s", peer, exc)
                    failures += 1
            await asyncio.sleep(BOOTSTRAP_BACKOFF.delay(failures, self.rng) if failures
                                else self.config.rejoin_check_s)

    async def run(self) -> None:
        """The mesh subsystem: the node runs on its own timers; this joins the bootstrap peers
        and keeps joined."""
        joins = [asyncio.create_task(self._keep_joined(p)) for p in self.bootstrap]
        try:
            await asyncio.Event().wait()
        finally:
            for task in joins:
                task.cancel()
            await asyncio.gather(*joins, return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._dialling.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dialling.clear()
        if self._node is not None:
            self._node.stop()

    def publish(self) -> Advert:
        """Sign and broadcast a new advert of this node."""
        return self.node.publish()

    # --- the node's network -----------------------------------------------------------------

    def send(self, dst: NodeId, addr: str | None, topic: str, body: dict[str, Any]) -> None:
        """Send over the connection to `dst`, or queue (bounded) and dial it."""
        conn = self.endpoint.peers.get(dst)
        if conn is not None and conn.is_established:
            try:
                conn.notify(topic, body)
                return
            except WireError:
                # The node bounds what it sends; a message the wire refuses is a bug, not a
                # reason to stop the node.
                log.exception("dropped a %s message the wire refused", topic)
                return
            except TransportError:
                pass
        queue = self._queued.setdefault(dst, [])
        if len(queue) < MAX_QUEUED_PER_PEER:
            queue.append((topic, body))
        if dst not in self._dialling:
            self._dialling[dst] = asyncio.get_running_loop().create_task(self._dial(dst, addr))

    def disconnect(self, dst: NodeId, reason: str) -> None:
        conn = self.endpoint.peers.get(dst)
        if conn is not None:
            conn.close(reason=reason)

    def misbehaved(self, peer: NodeId, reason: str) -> None:
        log.info("misbehaviour by %s: %s", peer.short(), reason)
        self.endpoint.misbehaviour[str(peer)] += 1

    async def connect(self, node_id: NodeId, addr: str | None = None,
                      timeout: float = DIAL_TIMEOUT_S) -> PeerConnection:
        """A connection to `node_id`: through NAT traversal (its advert's direct and relayed
        addresses) where the agent runs it, else a direct dial of `addr`."""
        if self.traversal is not None:
            return await self.traversal.connect(node_id, addr, timeout=timeout)
        if addr is None:
            raise TransportError("no known address")
        return await self.endpoint.connect(parse_addr(addr), node_id, timeout=timeout)

    def addresses_of(self, node_id: NodeId) -> list[str]:
        """Where `node_id` says it can be reached (its advert), or nothing if unknown."""
        if node_id == self.me:
            return list(self.describe()[0])
        if self._node is None:
            return []
        advert = self._node.adverts.get(node_id)
        return list(advert.addresses) if advert is not None else []

    def addresses_changed(self) -> None:
        """This node's reachable addresses changed: re-advertise them."""
        if self._node is not None and not self._node.stopped:
            self._node.refresh_advert()

    async def _dial(self, node_id: NodeId, addr: str | None) -> None:
        try:
            conn = await self.connect(node_id, addr)
            for topic, message in self._queued.pop(node_id, []):
                conn.notify(topic, message)
        except (TransportError, ValueError) as exc:
            log.debug("cannot reach %s: %s", node_id.short(), exc)
            self._queued.pop(node_id, None)
            self.node.connection_failed(node_id)
        finally:
            self._dialling.pop(node_id, None)

    def _peer_of(self, conn: PeerConnection) -> Peer:
        # One socket both listens and dials, so the address a peer is seen from is where it
        # listens; a relayed peer is named by its relayed address.
        assert conn.peer_id is not None
        if self.traversal is not None:
            return Peer(conn.peer_id, self.traversal.dial_address(conn))
        return Peer(conn.peer_id, format_addr(conn.addr))

    def route(self, topics: tuple[str, ...], handler: Callable[[NodeId, str, Any], None]) -> None:
        """Hand notifications of `topics` from authenticated peers to `handler`."""
        for topic in topics:
            self._routes[topic] = handler

    def _on_notify(self, conn: PeerConnection, topic: str, body: Any) -> None:
        route = self._routes.get(topic)
        if route is not None and conn.peer_id is not None:
            route(conn.peer_id, topic, body)
            return
        if topic not in TOPICS:
            self.endpoint.record_misbehaviour(conn, f"unknown topic {topic!r}")
            return
        if self._node is not None:
            self._node.receive(self._peer_of(conn), topic, body)

    def _on_connection_closed(self, conn: PeerConnection) -> None:
        if (self._node is not None and conn.peer_id is not None
                and conn.peer_id not in self.endpoint.peers):
            self._node.connection_failed(conn.peer_id)

    # --- what the node reports --------------------------------------------------------------

    def advert_taken(self, advert: Advert, via: str, hops: int | None, now: float) -> None:
        self._received_at[advert.node_id] = now

    def membership_event(self, event: Event, now: float) -> None:
        if isinstance(event, NeighborUp):
            log.info("neighbour up: %s at %s", event.peer.node_id.short(), event.peer.addr)
        elif isinstance(event, NeighborDown):
            log.info("neighbour down: %s (%s)", event.peer.node_id.short(), event.reason)
        elif isinstance(event, PeerDead):
            log.info("peer %s declared dead", event.node_id.short())

    # --- views for the control API ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Views and peer states, for `hmnode peers`."""
        return self.node.membership.snapshot()

    def advert_list(self) -> list[dict[str, Any]]:
        """Every advert known, for `hmnode assets --mesh`."""
        return [{"node_id": str(a.node_id), "seq": a.seq, "addresses": list(a.addresses),
                 "inventory": a.inventory, "prices": a.prices, "issued_at": a.issued_at,
                 "expires_at": a.expires_at, "received_at": self._received_at.get(a.node_id)}
                for a in self.node.adverts.all()]

    def stats(self) -> dict[str, Any]:
        """Counters of the broadcast core and sizes of what is held, for benchmarks."""
        return self.node.stats()
