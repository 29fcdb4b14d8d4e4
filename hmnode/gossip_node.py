"""One node's gossip: the membership and broadcast cores, its advert store and anti-entropy,
driven through an `Env` (clock, randomness, network, storage) and nothing else.

This is the whole of a node's gossip logic, shared by the asyncio driver (`hmnode.mesh`, over
QUIC and LMDB) and the deterministic simulator (virtual clock, simulated network and store), so
what the simulator checks is what a node runs. Inputs are `receive`, `connection_failed`,
`join` and `publish`; the node arms its own timers on the env's clock.

Anti-entropy is a pull in two round trips, so that what crosses the wire is in proportion to
what differs, not to the size of the mesh: every few seconds the node sends its 256-bucket
advert digest to a random neighbour (`sync`); the neighbour lists (node, sequence) of the
buckets that differ (`sync-have`); the node asks for those it lacks (`sync-want`) and gets them
(`sync-ans`). Durability: the
advert sequence number is written and synced before an advert carrying it is sent (a restarted
node never reuses one); adverts received from others are written in batches, since a crash that
loses some of them costs only a few anti-entropy rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hmnode import schema
from hmnode.adverts import DIGEST_BUCKETS, Advert, AdvertRejected, AdvertStore, make_advert
from hmnode.broadcast import Broadcast, BroadcastConfig, Delivered
from hmnode.broadcast import Misbehaved as BroadcastMisbehaved
from hmnode.env import Env, Timer, Txn
from hmnode.identity import NodeId, NodeKey
from hmnode.membership import (Event, Membership, MembershipConfig, NeighborDown, NeighborUp,
                               Peer, PeerDead)
from hmnode.membership import Misbehaved as MembershipMisbehaved
from hmnode.schema import KnownPeer

MEMBERSHIP_TOPIC = "mem"
BROADCAST_TOPIC = "bc"
SYNC_TOPIC = "sync"
SYNC_HAVE_TOPIC = "sync-have"
SYNC_WANT_TOPIC = "sync-want"
SYNC_ANSWER_TOPIC = "sync-ans"
TOPICS = (MEMBERSHIP_TOPIC, BROADCAST_TOPIC, SYNC_TOPIC, SYNC_HAVE_TOPIC, SYNC_WANT_TOPIC,
          SYNC_ANSWER_TOPIC)
META_ADVERT_SEQ = "advert_seq"
# Per round: (node, sequence) entries offered, and adverts asked for and sent. A backlog larger
# than this (a node back from a long absence) arrives over several rounds.
MAX_SYNC_SUMMARY = 2048
MAX_SYNC_ADVERTS = 256
MAX_PUMP_ROUNDS = 100
# A core asking to be ticked "now" again still lets time advance between ticks.
MIN_TIMER_STEP_S = 0.001

Describe = Callable[[], tuple[list[str], dict[str, Any]]]


@dataclass(frozen=True)
class GossipConfig:
    """Cadences of a node's gossip (the cores have their own configs, carried here)."""

    anti_entropy_s: float = 5.0
    advert_ttl_s: float = 600.0
    # Re-advertise well before expiry, and whenever what is advertised changes.
    advert_refresh_s: float = 120.0
    # How often what is advertised is looked at for changes (it may probe the interfaces).
    describe_every_s: float = 1.0
    # The first advert waits (briefly) for the first inventory, rather than announcing an
    # empty node and replacing it a moment later.
    first_advert_wait_s: float = 5.0
    persist_s: float = 10.0
    # How often a driver looks whether the node has lost every neighbour and must join again
    # through a contact (a bootstrap peer).
    rejoin_check_s: float = 10.0
    membership: MembershipConfig = MembershipConfig()
    broadcast: BroadcastConfig = BroadcastConfig()


class GossipObserver:
    """What a node tells whoever watches it (logs, the control API, the simulator's checkers);
    every method does nothing unless overridden."""

    def advert_taken(self, advert: Advert, via: str, hops: int | None, now: float) -> None:
        """The store took `advert` (via 'own', 'disk', 'gossip' with its hop count, or 'sync')."""

    def membership_event(self, event: Event, now: float) -> None:
        """The membership core emitted `event`."""


class CoreStalled(Exception):
    """The cores kept producing output for more pump rounds than any input can cause: a bug."""


@dataclass
class _Timers:
    core: Timer | None = None
    core_at: float | None = None
    periodic: list[Timer] = field(default_factory=list)


class GossipNode:
    """Membership, broadcast, adverts and anti-entropy of one node, driven through an `Env`."""

    def __init__(self, key: NodeKey, address: str, env: Env, describe: Describe,
                 config: GossipConfig = GossipConfig(), observer: GossipObserver | None = None,
                 adverts: AdvertStore | None = None) -> None:
        self.key = key
        self.me = key.node_id
        self.env = env
        self.describe = describe
        self.config = config
        self.observer = observer or GossipObserver()
        self.adverts = adverts if adverts is not None else AdvertStore()
        self.membership = Membership(Peer(self.me, address), env.rng, config.membership)
        self.broadcast = Broadcast(self.me, env.rng, validate=self._valid_advert,
                                   config=config.broadcast)
        self.own: Advert | None = None
        # Whether the newest own advert waits for a first neighbour to be broadcast to.
        self._own_unsent = False
        self._first_advert_by = 0.0
        self._addr_of: dict[NodeId, str] = {}
        self._unsaved: set[NodeId] = set()
        self._timers = _Timers()
        self.stopped = False

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """Take known peers and adverts from storage (a restart rejoins without bootstrap) and
        arm the timers."""
        now = self.env.clock.now()

        def read(tx: Txn) -> tuple[list, list]:
            return list(tx.items(schema.PEERS)), [a for _, a in tx.items(schema.ADVERTS)]

        peers, adverts = self.env.storage.read(read)
        for advert in adverts:
            try:
                self.adverts.offer(advert, now)
            except AdvertRejected:
                continue  # expired while the node was down: dropped at the next persist
            if advert.node_id == self.me:
                # A restart does not re-advertise what peers already hold: only a change, or
                # the refresh when it falls due.
                self.own = advert
            self.observer.advert_taken(advert, "disk", None, now)
        known = [Peer(NodeId(k), p.addr) for k, p in peers if NodeId(k) != self.me]
        for peer in known:
            self._addr_of[peer.node_id] = peer.addr
        if known:
            self.membership.add_passive(known, now)
        self._first_advert_by = now + self.config.first_advert_wait_s
        cfg = self.config
        self._every(cfg.describe_every_s, self.refresh_advert, first=0.0)
        self._every(cfg.anti_entropy_s, self._anti_entropy)
        self._every(cfg.persist_s, self.persist)
        self._pump()

    def stop(self) -> None:
        """Cancel the timers and write what is unsaved; inputs after this are ignored."""
        if self.stopped:
            return
        self.stopped = True
        for timer in [*self._timers.periodic, self._timers.core]:
            if timer is not None:
                timer.cancel()
        self._timers = _Timers()
        self.persist()

    @property
    def known_peers(self) -> int:
        """How many peers the views hold (0: this node needs a contact to join through)."""
        return len(self.membership.active) + len(self.membership.passive)

    # --- inputs -----------------------------------------------------------------------------

    def join(self, contact: Peer) -> None:
        """Ask `contact` to take this node into the overlay."""
        self._addr_of[contact.node_id] = contact.addr
        self.membership.join(contact, self.env.clock.now())
        self._pump()

    def receive(self, src: Peer, topic: str, body: Any) -> None:
        """A message from `src` (authenticated by the transport) on one of `TOPICS`."""
        if self.stopped:
            return
        now = self.env.clock.now()
        if topic == MEMBERSHIP_TOPIC:
            self.membership.receive(src, body, now)
        elif topic == BROADCAST_TOPIC:
            self.broadcast.receive(src.node_id, body, now)
        elif topic == SYNC_TOPIC:
            self._serve_sync(src, body)
        elif topic == SYNC_HAVE_TOPIC:
            self._take_have(src, body)
        elif topic == SYNC_WANT_TOPIC:
            self._serve_want(src, body)
        elif topic == SYNC_ANSWER_TOPIC:
            self._take_sync(src, body)
        else:
            self._misbehaved(src.node_id, f"unknown topic {topic!r}")
        self._pump()

    def connection_failed(self, peer: NodeId) -> None:
        """The network could not reach `peer`, or lost the connection to it."""
        if self.stopped:
            return
        self.membership.connection_failed(peer, self.env.clock.now())
        self._pump()

    def publish(self) -> Advert:
        """Sign and broadcast a new advert of this node; its sequence number is durable first."""
        now = self.env.clock.now()
        addresses, inventory = self.describe()

        def write(tx: Txn) -> Advert:
            seq = tx.get(schema.META, META_ADVERT_SEQ, 0) + 1
            advert = make_advert(self.key, seq, addresses, inventory, None, now,
                                 self.config.advert_ttl_s)
            tx.put(schema.META, META_ADVERT_SEQ, seq)
            tx.put(schema.ADVERTS, self.me.key, advert)
            return advert

        advert = self.env.storage.write(write)
        # Persist before send: a node that crashed after sending seq N and came back with N-1
        # would sign a different advert N, which every peer refuses as not newer.
        self.env.storage.sync()
        self.own = advert
        self.adverts.offer(advert, now)
        self.observer.advert_taken(advert, "own", None, now)
        if self.membership.active:
            self._own_unsent = False
            self.broadcast.broadcast(advert.msg_id, advert.to_wire(), now)
            self._pump()
        else:
            # Broadcast now, it would reach nobody (this node is starting, or cut off), and
            # anti-entropy alone spreads it a hop per few rounds: it goes out at the first
            # neighbour instead.
            self._own_unsent = True
        return advert

    def persist(self) -> None:
        """Write known peers and the adverts taken since the last call, and drop expired ones,
        in one transaction."""
        now = self.env.clock.now()
        gone = self.adverts.expire(now)
        unsaved = [a for a in (self.adverts.get(n) for n in sorted(self._unsaved)) if a is not None]
        self._unsaved.clear()
        peers = [*self.membership.active, *self.membership.passive]
        if not (gone or unsaved or peers):
            return

        def write(tx: Txn) -> None:
            for advert in gone:
                tx.delete(schema.ADVERTS, advert.node_id.key)
            for advert in unsaved:
                tx.put(schema.ADVERTS, advert.node_id.key, advert)
            for peer in peers:
                tx.put(schema.PEERS, peer.node_id.key, KnownPeer(peer.addr, now))
            excess = tx.count(schema.PEERS) - schema.PEERS_KEPT
            if excess > 0:
                oldest = sorted(tx.items(schema.PEERS), key=lambda kv: kv[1].last_seen)[:excess]
                for key, _ in oldest:
                    tx.delete(schema.PEERS, key)

        self.env.storage.write(write)

    # --- timers -----------------------------------------------------------------------------

    def _every(self, period: float, fn: Callable[[], None], first: float | None = None) -> None:
        """Run `fn` about every `period` seconds (jittered by a quarter, so nodes started
        together do not fire together), the first time after `first` or a random fraction."""
        clock, rng = self.env.clock, self.env.rng
        slot = len(self._timers.periodic)
        self._timers.periodic.append(None)  # type: ignore[arg-type]

        def again() -> None:
            if self.stopped:
                return
            # The next run is armed first, so one that raises does not end the series.
            self._timers.periodic[slot] = clock.call_at(
                clock.now() + period * rng.uniform(0.75, 1.25), again)
            fn()

        delay = period * rng.random() if first is None else first
        self._timers.periodic[slot] = clock.call_at(clock.now() + delay, again)

    def _arm(self) -> None:
        """Keep one timer armed for the cores' earliest deadline."""
        deadlines = [d for d in (self.membership.next_deadline(), self.broadcast.next_deadline())
                     if d is not None]
        if not deadlines or self.stopped:
            return
        clock = self.env.clock
        when = max(min(deadlines), clock.now() + MIN_TIMER_STEP_S)
        timers = self._timers
        if timers.core_at is not None and timers.core_at <= when:
            return
        if timers.core is not None:
            timers.core.cancel()
        timers.core_at = when
        timers.core = clock.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timers.core = self._timers.core_at = None
        if self.stopped:
            return
        now = self.env.clock.now()
        self.membership.tick(now)
        self.broadcast.tick(now)
        self._pump()

    def refresh_advert(self) -> None:
        """Publish a new advert if what `describe` says changed, or the current one is due."""
        now = self.env.clock.now()
        addresses, inventory = self.describe()
        own = self.own
        if own is None:
            if inventory or now >= self._first_advert_by:
                self.publish()
        elif (now >= own.issued_at + self.config.advert_refresh_s
              or _content(own.addresses, own.inventory) != _content(addresses, inventory)):
            self.publish()

    # --- adverts ----------------------------------------------------------------------------

    def _valid_advert(self, msg_id: bytes, payload: Any) -> bool | None:
        try:
            advert = Advert.from_wire(payload)
            if advert.msg_id != msg_id:
                return False
            self.adverts.check_genuine(advert, self.env.clock.now())
            held = self.adverts.get(advert.node_id)
            if held is not None and held.msg_id == msg_id:
                # This very advert, already taken from anti-entropy (a new neighbour's sync
                # often wins the race with its broadcast): the broadcast must still pass it on,
                # or it dies at the first hop and spreads only by the slow digest exchange.
                return True
            if not self.adverts.is_news(advert):
                return None  # genuine, but a newer one overtook it: nobody's fault
            self.adverts.check_fits(advert)  # the signature is checked once, above
        except AdvertRejected:
            return False
        return True

    def _take(self, advert: Advert, via: str, hops: int | None) -> None:
        """Offer `advert` to the store (raises AdvertRejected); it is written at the next persist."""
        now = self.env.clock.now()
        self.adverts.offer(advert, now)
        self._unsaved.add(advert.node_id)
        self.observer.advert_taken(advert, via, hops, now)

    def _anti_entropy(self) -> None:
        active = self.membership.active
        if active:
            self._ask_sync(self.env.rng.choice(active))

    def _ask_sync(self, peer: Peer) -> None:
        self.env.net.send(peer.node_id, peer.addr, SYNC_TOPIC, {"digest": self.adverts.digest()})

    def _serve_sync(self, src: Peer, body: Any) -> None:
        digest = body.get("digest") if isinstance(body, dict) else None
        if (not isinstance(digest, list) or len(digest) != DIGEST_BUCKETS
                or not all(isinstance(h, bytes) for h in digest)):
            self._misbehaved(src.node_id, "malformed anti-entropy digest")
            return
        have = self.sync_summary(digest)
        if have:
            self.env.net.send(src.node_id, src.addr, SYNC_HAVE_TOPIC,
                              {"have": [[key, seq] for key, seq in have]})

    def sync_summary(self, digest: list[bytes]) -> list[tuple[bytes, int]]:
        """What to offer a peer whose store has `digest`: (node key, sequence) of the buckets
        that differ, in random order when over the bound, so a large backlog arrives over
        several rounds and not always the same part of it."""
        have = self.adverts.differing_summary(digest)
        if len(have) > MAX_SYNC_SUMMARY:
            have = self.env.rng.sample(have, MAX_SYNC_SUMMARY)
        return have

    def _take_have(self, src: Peer, body: Any) -> None:
        have = body.get("have") if isinstance(body, dict) else None
        if (not isinstance(have, list) or len(have) > MAX_SYNC_SUMMARY or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], bytes) and len(e[0]) == 32
                and type(e[1]) is int for e in have)):
            self._misbehaved(src.node_id, "malformed anti-entropy summary")
            return
        want = [key for key, seq in have if self.adverts.seq_of(key) < seq]
        if want:
            self.env.net.send(src.node_id, src.addr, SYNC_WANT_TOPIC,
                              {"want": want[:MAX_SYNC_ADVERTS]})

    def _serve_want(self, src: Peer, body: Any) -> None:
        want = body.get("want") if isinstance(body, dict) else None
        if (not isinstance(want, list) or len(want) > MAX_SYNC_ADVERTS
                or not all(isinstance(k, bytes) and len(k) == 32 for k in want)):
            self._misbehaved(src.node_id, "malformed anti-entropy request")
            return
        answer = [a.to_wire() for a in self.sync_answer(want)]
        if answer:
            self.env.net.send(src.node_id, src.addr, SYNC_ANSWER_TOPIC, {"adverts": answer})

    def sync_answer(self, want: list[bytes]) -> list[Advert]:
        """The adverts held of the nodes a peer asked for (by key)."""
        return [a for a in (self.adverts.get(NodeId(key)) for key in want) if a is not None]

    def _take_sync(self, src: Peer, body: Any) -> None:
        adverts = body.get("adverts") if isinstance(body, dict) else None
        if not isinstance(adverts, list):
            self._misbehaved(src.node_id, "malformed anti-entropy answer")
            return
        for wire in adverts[:MAX_SYNC_ADVERTS]:
            try:
                advert = Advert.from_wire(wire)
                if self.adverts.is_news(advert):
                    self._take(advert, "sync", None)
            except AdvertRejected as exc:
                self._misbehaved(src.node_id, f"anti-entropy advert: {exc}")

    # --- moving messages --------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the cores queued and act on their events, until both are quiet; then arm
        the timer for their next deadline."""
        net = self.env.net
        for _ in range(MAX_PUMP_ROUNDS):
            membership_out = self.membership.take_outbox()
            member_events = self.membership.take_events()
            broadcast_out = self.broadcast.take_outbox()
            broadcast_events = self.broadcast.take_events()
            if not (membership_out or member_events or broadcast_out or broadcast_events):
                break
            for peer, message in membership_out:
                self._addr_of[peer.node_id] = peer.addr
                net.send(peer.node_id, peer.addr, MEMBERSHIP_TOPIC, message)
            for event in member_events:
                self._on_membership_event(event)
            for node_id, message in broadcast_out:
                net.send(node_id, self._addr_of.get(node_id), BROADCAST_TOPIC, message)
            for event in broadcast_events:
                if isinstance(event, Delivered) and event.sender is not None:
                    try:
                        self._take(Advert.from_wire(event.payload), "gossip", event.hops)
                    except AdvertRejected:
                        pass  # validated on receipt; only a newer one since can refuse it
                elif isinstance(event, BroadcastMisbehaved):
                    self._misbehaved(event.peer, f"broadcast: {event.reason}")
        else:
            raise CoreStalled(f"the cores still had output after {MAX_PUMP_ROUNDS} pump rounds")
        self._arm()

    def _on_membership_event(self, event: Event) -> None:
        now = self.env.clock.now()
        if isinstance(event, NeighborUp):
            self._addr_of[event.peer.node_id] = event.peer.addr
            self.broadcast.neighbor_up(event.peer.node_id, now)
            # A new neighbour may hold adverts that were broadcast before this link existed
            # (a joining or restarted node's above all): pull them now, not at the next round.
            self._ask_sync(event.peer)
            if self._own_unsent and self.own is not None:
                self._own_unsent = False
                self.broadcast.broadcast(self.own.msg_id, self.own.to_wire(), now)
        elif isinstance(event, NeighborDown):
            self.broadcast.neighbor_down(event.peer.node_id, now)
        elif isinstance(event, PeerDead):
            self.env.net.disconnect(event.node_id, "declared dead by membership")
        elif isinstance(event, MembershipMisbehaved):
            self._misbehaved(event.node_id, f"membership: {event.reason}")
        self.observer.membership_event(event, now)

    def _misbehaved(self, peer: NodeId, reason: str) -> None:
        self.env.net.misbehaved(peer, reason)

    # --- views ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of the broadcast core and sizes of what is held."""
        return {"broadcast": dataclasses.asdict(self.broadcast.stats), "adverts": len(self.adverts),
                "active": len(self.membership.active), "passive": len(self.membership.passive)}


def _content(addresses: Any, inventory: Any) -> tuple:
    """What an advert says, comparable whether it came from `describe` or back from disk."""
    return (tuple(addresses), _freeze(inventory))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value
