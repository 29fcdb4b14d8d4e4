"""Membership: HyParView partial views, SWIM failure detection and Lifeguard local health.

A sans-IO core that a driver feeds and drains. It has no clock, socket, thread, disk or
randomness of its own: time comes in as `now` (seconds), randomness from the injected
`random.Random`, and nothing depends on hash or object-id order (views are insertion-ordered
dicts, and every random choice is made over a sorted list), so equal seeds and inputs give
equal outputs.

Theory of operation
-------------------

*Views* (Leitão, Pereira and Rodrigues, "HyParView: a membership protocol for reliable
gossip-based broadcast", DSN 2007). Each node keeps a small *active view* (`active_size`,
about log n + 1) of neighbours over which the broadcast layer builds its tree, and a larger
*passive view* (`passive_size`) of spares to repair it from. Active links are symmetric: a link
is made by one side asking (JOIN or NEIGHBOR) and the other accepting (it adds the asker at
once and answers NEIGHBOR_REPLY accept); the asker adds the acceptor when the accept arrives.

* JOIN: a new node asks a contact, which takes it into its active view (moving a random member
  to its passive view with DISCONNECT if the view is full) and sends FORWARD_JOIN(ttl=`arwl`)
  to each of its other neighbours. Each such random walk ends at a node that receives it with
  ttl 0 or with at most one neighbour; that node asks the new node with a high-priority
  NEIGHBOR. A walk that passes with ttl == `prwl` leaves the new node in a passive view.
* Repair: when a neighbour is lost (declared dead, disconnected, or found one-sided) the node
  asks a random passive peer with NEIGHBOR: high priority when it has no neighbour left
  (always accepted, evicting if need be), low otherwise (accepted only by a node with room).
  A reject, timeout or failed connection moves on to the next passive peer, at most
  2 * `active_size` attempts per `repair_interval_s`; every `repair_interval_s` the node also
  tops a short view up this way, backing off (up to 32 intervals) while it is refused.
* SHUFFLE: every `shuffle_interval_s` (jittered) a node sends itself, `shuffle_active` random
  neighbours and `shuffle_passive` random passive peers on a random walk of `shuffle_ttl`
  hops; the node where it ends answers with as many of its own passive peers (topped up with
  neighbours when it has too few), and both merge what they got into their passive views,
  evicting first what they sent. Passive views thus stay fresh and mixed without any node
  knowing the whole membership.

Beyond the paper, three rules keep the overlay in one piece when messages are lost or the
network splits (each is explained where it is implemented):

* A node refused ESCALATE_AFTER times in a row sends one high-priority NEIGHBOR, and the
  number needed doubles each time: a small cluster cut off during joins (its members evicted
  elsewhere and linked to each other, all short of neighbours) gets back in, while a node
  merely one short in a full overlay causes an eviction only rarely.
* A JOIN is retried (JOIN_ATTEMPTS), and a node that knows nobody beyond its neighbours asks
  its bootstrap contacts again every REJOIN_PERIODS.
* Dead peers are remembered with their address (MAX_GRAVEYARD, for GRAVEYARD_PERIODS) and one
  of them is pinged every RECONNECT_PERIODS. After a partition, in which each side declared
  the other dead and purged it from its views, the two sides thus hear of each other again,
  refute, and the cut links are restored with high priority; without this, two overlays with
  full active views would never merge.

*Failure detection* (Das, Gupta and Motivala, "SWIM: Scalable Weakly-consistent
Infection-style process group Membership protocol", DSN 2002), run over the active view: the
neighbours are the nodes whose failure matters here, and each node has few. Every protocol
period the node probes the next neighbour of a shuffled round robin with PING. Without an ACK
within the probe timeout it sends PING_REQ to up to `indirect_probes` other neighbours, who
PING the target and relay its ACK. Without any ACK by the end of the period the target is
*suspected* at its current incarnation number; a suspicion that is not refuted within the
suspicion timeout (`suspicion_mult` * max(1, log10 n) protocol periods, where n is the number
of nodes this one has records of) makes it *dead*: it leaves both views (NeighborDown, then
repair), and a suspect neighbour is probed again first, so a lost refutation is heard in its
ACK. Suspect, alive and dead updates spread by
piggybacking on every message (each about RETRANSMIT_MULT * log10 n times), and a suspect or
dead verdict is also sent to its subject at once (Lifeguard's "buddy system"). A node that
hears itself suspected or declared dead *refutes*: it takes an incarnation above the
verdict's and sends ALIVE to the accuser and to each of its neighbours (the nodes that may
have adopted the suspicion: only neighbours of a node adopt gossip suspecting it). The
precedence is SWIM's: alive(i) overrides suspect/dead(j) iff i > j, suspect(i) overrides
alive(j) iff i >= j, dead(i) overrides anything of incarnation <= i.

Every message carries its sender's incarnation ("i"). The transport authenticates the sender,
so that number is the sender's own word about itself: a higher one clears a suspicion or a
death at once, and a node that talks to us while we hold it suspect or dead at its current
incarnation is told so (at most once per probe interval), so it refutes even when the gossip
passed it by, and a crashed and restarted node (incarnation back to 0) is readmitted.

*Local health* (Dadgar, Phillips and Currey, "Lifeguard: Local Health Awareness for More
Accurate Failure Detection", 2018). A node that is itself slow (overloaded, paused, on a bad
link) sees its probes time out and would suspect healthy peers. Each node therefore keeps a
local health multiplier (`local_health`, 0..`max_local_health`): it grows by one for a failed
probe that had no indirect probers, by one for each indirect prober that sent neither ACK nor
NACK (an indirect prober that cannot reach the target answers NACK in time, so a missing NACK
points at this node), and by one whenever this node must refute a suspicion of itself; it
shrinks by one for each successful probe. The probe timeout, the protocol period and the
suspicion timeout are all multiplied by (local_health + 1), so a slow node waits longer and
accuses less, while healthy nodes keep detecting real failures fast.

The transport's own failure signal (`connection_failed`) is fast: a neighbour whose connection
failed is suspected at once and probed next; if that probe (direct and indirect) also fails it
is dead without waiting out the suspicion. A failed JOIN or NEIGHBOR attempt moves on to
another passive peer.

Interface
---------

Inputs are `join`, `add_passive`, `receive`, `connection_failed` and `tick`; `next_deadline()`
says when `tick` next has work. Outgoing messages accumulate in an outbox (`take_outbox()`:
destination Peer, so the driver can dial, and a msgpack-able map), events in a list
(`take_events()`). Every incoming message is checked strictly (types, 32-byte ids, bounded
lengths and numbers); anything malformed yields a `Misbehaved` event and no other effect. All
state is bounded: views, pending requests, member records (MAX_RECORDS), relayed probes
(MAX_RELAYS), queued gossip (MAX_GOSSIP_QUEUE) and the outbox (`max_outbox`; beyond it
messages are dropped and counted in `dropped_messages`, as a lossy network would). The
invariants are checked after every public call and an AssertionError names the broken one.

Wire messages (peer ids are 32 raw bytes; "i" is the sender's incarnation, "g" optional
piggybacked gossip, a list of [state, id, incarnation] with state "alive"/"suspect"/"dead"):

    {"k": "join"}
    {"k": "forward_join", "ttl": int, "id": bytes, "addr": str}    (the new node)
    {"k": "neighbor", "prio": "high" | "low"}
    {"k": "neighbor_reply", "accept": bool}
    {"k": "disconnect"}
    {"k": "shuffle", "ttl": int, "id": bytes, "addr": str, "peers": [[bytes, str], ...]}
    {"k": "shuffle_reply", "peers": [[bytes, str], ...]}
    {"k": "ping", "seq": int}
    {"k": "ack", "seq": int, "nb": bool}        (nb: the sender has the receiver as neighbour)
    {"k": "ping_req", "seq": int, "id": bytes, "addr": str}        (the target)
    {"k": "nack", "seq": int}
    {"k": "suspect" | "alive" | "dead", "id": bytes, "inc": int}

An ACK's "nb" keeps the active views symmetric after races and losses: a node whose probe of
a neighbour is answered "not your neighbour" drops the link and repairs.

Limitations: gossip about third parties is believed as sent by a neighbour (the transport
authenticates the neighbour, not the statement). A false suspect or dead verdict is refuted by
its subject as soon as it hears it, but a forged incarnation at MAX_INCARNATION cannot be
outbid; signed verdicts would close that.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from hmnode.identity import NodeId

K = TypeVar("K")
V = TypeVar("V")

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
UNKNOWN = "unknown"
_STATES = (ALIVE, SUSPECT, DEAD)

ID_BYTES = 32
MAX_ADDR_LEN = 512
# Incoming lists: a shuffle carries 1 + shuffle_active + shuffle_passive peers (8 by default).
MAX_PEERS_PER_MESSAGE = 64
MAX_GOSSIP_PER_MESSAGE = 32
MAX_TTL = 32
MAX_SEQ = (1 << 63) - 1
# Incarnations stay well inside msgpack's integers even after a refutation adds one.
MAX_INCARNATION = (1 << 62) - 1

PIGGYBACK_ITEMS = 8           # gossip items per outgoing message
RETRANSMIT_MULT = 4           # each item is sent RETRANSMIT_MULT * ceil(log10(n + 1)) times
MAX_GOSSIP_QUEUE = 512
MAX_RECORDS = 4096            # member records kept (views are always kept; others LRU)
MAX_RELAYS = 256              # indirect probes this node runs for others at once
JOIN_ATTEMPTS = 3
MAX_CONTACTS = 8              # bootstrap contacts remembered for rejoining
REJOIN_PERIODS = 30.0         # a node knowing nobody beyond its neighbours asks a contact again
# Dead peers are remembered (address included) and one of them is pinged now and then, so
# that the two sides of a healed network partition, which declared each other dead, find each
# other again (as Serf reconnects to failed members).
MAX_GRAVEYARD = 64
GRAVEYARD_PERIODS = 3600.0    # how long a dead peer is retried (probe intervals)
RECONNECT_PERIODS = 30.0      # how often one of them is pinged (probe intervals)
ESCALATE_AFTER = 4            # refused low-priority requests before one high-priority request
MAX_ESCALATE_AFTER = 1024
# An indirect prober NACKs after this share of the window between the requester's probe
# timeout and the end of its protocol period, so the NACK arrives while the requester counts.
NACK_FRACTION = 0.8
REQUEST_TIMEOUT_PERIODS = 5.0  # a JOIN or NEIGHBOR unanswered this many probe intervals failed


# --- public records and events ----------------------------------------------------------------


@dataclass(frozen=True)
class MembershipConfig:
    """Sizes and cadences of the membership protocol (defaults after the papers and memberlist)."""

    active_size: int = 5
    passive_size: int = 30
    arwl: int = 6                 # active random walk length
    prwl: int = 3                 # passive random walk length
    shuffle_interval_s: float = 60.0
    shuffle_active: int = 3       # ka
    shuffle_passive: int = 4      # kp
    shuffle_ttl: int = 4
    probe_interval_s: float = 1.0  # SWIM protocol period (memberlist LAN)
    probe_timeout_s: float = 0.5
    indirect_probes: int = 3
    # suspicion timeout = mult * max(1, log10(n)) * probe_interval, scaled by local health
    suspicion_mult: float = 4.0
    max_local_health: int = 8     # Lifeguard LHM cap
    repair_interval_s: float = 1.0  # how often to try to fill the active view from the passive view
    max_outbox: int = 10_000

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        checks = [
            (self.active_size >= 1, "active_size must be at least 1"),
            (self.passive_size >= 0, "passive_size must not be negative"),
            (0 <= self.prwl <= self.arwl <= MAX_TTL, f"need 0 <= prwl <= arwl <= {MAX_TTL}"),
            (1 <= self.shuffle_ttl <= MAX_TTL, f"shuffle_ttl must be 1..{MAX_TTL}"),
            (self.shuffle_active >= 0 and self.shuffle_passive >= 0,
             "shuffle sample sizes must not be negative"),
            (1 + self.shuffle_active + self.shuffle_passive <= MAX_PEERS_PER_MESSAGE,
             f"a shuffle carries at most {MAX_PEERS_PER_MESSAGE} peers"),
            (self.shuffle_interval_s > 0, "shuffle_interval_s must be positive"),
            (0 < self.probe_timeout_s < self.probe_interval_s,
             "need 0 < probe_timeout_s < probe_interval_s"),
            (self.indirect_probes >= 0, "indirect_probes must not be negative"),
            (self.suspicion_mult > 0, "suspicion_mult must be positive"),
            (self.max_local_health >= 0, "max_local_health must not be negative"),
            (self.repair_interval_s > 0, "repair_interval_s must be positive"),
            (self.max_outbox >= 1, "max_outbox must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"membership config: {message}")


@dataclass(frozen=True)
class Peer:
    """A node and where to reach it; `addr` ("host:port" or "[v6]:port") is opaque here."""

    node_id: NodeId
    addr: str


@dataclass(frozen=True)
class NeighborUp:
    """`peer` joined the active view (the broadcast layer gains a link)."""

    peer: Peer


@dataclass(frozen=True)
class NeighborDown:
    """`peer` left the active view: "dead", "evicted", "disconnected" or "not a neighbour"."""

    peer: Peer
    reason: str


@dataclass(frozen=True)
class PeerSuspected:
    """This node now suspects `node_id` (SWIM suspicion)."""

    node_id: NodeId


@dataclass(frozen=True)
class PeerDead:
    """This node now holds `node_id` dead."""

    node_id: NodeId


@dataclass(frozen=True)
class PeerAlive:
    """A node held suspect or dead here refuted it: it is alive again."""

    node_id: NodeId


@dataclass(frozen=True)
class Misbehaved:
    """`node_id` sent a malformed membership message; it had no other effect."""

    node_id: NodeId
    reason: str


Event = Union[NeighborUp, NeighborDown, PeerSuspected, PeerDead, PeerAlive, Misbehaved]


# --- internal state -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """What this node believes of another node's liveness."""

    state: str
    incarnation: int


@dataclass(frozen=True)
class _Grave:
    """A peer this node holds dead, kept to retry it (see RECONNECT_PERIODS)."""

    peer: Peer
    since: float
    neighbour: bool  # it was in the active view when it died: the link is restored if it returns


@dataclass
class _Pending:
    """An outstanding JOIN or NEIGHBOR request of ours, answered by NEIGHBOR_REPLY."""

    peer: Peer
    kind: str  # "join" | "neighbor"
    deadline: float
    priority: str = "high"
    attempts: int = 1


@dataclass
class _Probe:
    """The SWIM probe in flight (at most one)."""

    target: Peer
    seq: int
    started: float
    timeout_at: float  # direct ping unanswered by then: ask helpers
    end_at: float      # end of the protocol period: unanswered means failed
    helpers: tuple[NodeId, ...] = ()
    indirect_sent: bool = False
    # Ids of helpers that sent NACK; a dict used as an ordered set.
    nacks: dict[NodeId, None] = field(default_factory=dict)


@dataclass
class _Relay:
    """An indirect probe this node runs for `requester` (PING_REQ)."""

    requester: Peer
    seq: int           # the requester's sequence number
    target: NodeId
    nack_at: float     # NACK the requester if the target has not answered by then
    expires_at: float  # a later ACK is still relayed until then (the requester may be slow)
    nacked: bool = False


@dataclass
class _Gossip:
    """A liveness update waiting to be piggybacked `sent` times so far."""

    state: str
    incarnation: int
    sent: int = 0


class _Malformed(Exception):
    """An incoming message breaks the wire schema."""


# --- the core -------------------------------------------------------------------------------


class Membership:
    """HyParView views with SWIM/Lifeguard failure detection for one node (see the module doc)."""

    def __init__(self, me: Peer, rng: random.Random,
                 config: MembershipConfig = MembershipConfig()) -> None:
        if not (isinstance(me, Peer) and isinstance(me.node_id, NodeId) and _valid_addr(me.addr)):
            raise ValueError("membership: `me` must be a Peer with a node id and an address")
        config.validate()
        self.me = me
        self.rng = rng
        self.config = config
        self.local_health = 0
        self.incarnation = 0
        self.dropped_messages = 0
        self._active: dict[NodeId, Peer] = {}
        self._passive: dict[NodeId, Peer] = {}
        self._pending: dict[NodeId, _Pending] = {}
        self._members: dict[NodeId, _Member] = {}
        self._suspicions: dict[NodeId, float] = {}  # suspect -> when it becomes dead
        self._gossip: dict[NodeId, _Gossip] = {}
        self._notified: dict[NodeId, float] = {}    # when we last told a node its verdict
        # When, and at which incarnation, we last told a node that we are alive.
        self._told_alive: dict[NodeId, tuple[float, int]] = {}
        self._conn_failed: dict[NodeId, None] = {}  # neighbours whose connection failed
        self._probe: _Probe | None = None
        self._probe_order: list[NodeId] = []
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._started = False
        self._next_probe = 0.0
        self._next_shuffle = 0.0
        self._next_repair = 0.0
        self._repair_budget = self._repair_allowance()
        self._rejects = 0  # low-priority NEIGHBOR requests refused in a row
        self._escalate_after = ESCALATE_AFTER
        self._contacts: dict[NodeId, Peer] = {}
        self._next_rejoin = 0.0
        self._graveyard: dict[NodeId, _Grave] = {}
        self._next_reconnect = 0.0
        self._shuffle_sent: tuple[NodeId, ...] = ()
        self._shuffle_open = False
        self._outbox: list[tuple[Peer, dict]] = []
        self._events: list[Event] = []

    # --- public interface -------------------------------------------------------------------

    @property
    def active(self) -> tuple[Peer, ...]:
        """The active view (neighbours), sorted by node id."""
        return tuple(self._active[k] for k in sorted(self._active))

    @property
    def passive(self) -> tuple[Peer, ...]:
        """The passive view (spares), sorted by node id."""
        return tuple(self._passive[k] for k in sorted(self._passive))

    def join(self, contact: Peer, now: float) -> None:
        """Ask `contact` (a bootstrap peer) to take this node into the overlay."""
        _check_peer(contact)
        self._start(now)
        if contact.node_id != self.me.node_id:
            _put_newest(self._contacts, contact.node_id, contact, MAX_CONTACTS)
            if contact.node_id not in self._active:  # a neighbour already: nothing to ask
                self._send_join(contact, now)
        self._check_invariants()

    def add_passive(self, peers: Iterable[Peer], now: float) -> None:
        """Add known peers (e.g. remembered on disk) as spares; with no neighbour yet, the node
        starts asking them at once."""
        self._start(now)
        for peer in peers:
            _check_peer(peer)
            self._add_passive(peer)
        self._repair(now)
        self._check_invariants()

    def receive(self, sender: Peer, message: Any, now: float) -> None:
        """Handle one message from `sender` (authenticated by the transport). Never raises on
        bad input: a malformed message yields a Misbehaved event and changes nothing else."""
        _check_peer(sender)
        self._start(now)
        try:
            if sender.node_id == self.me.node_id:
                raise _Malformed("a message from this node's own id")
            kind, fields, gossip = _parse(message)
        except _Malformed as exc:
            self._events.append(Misbehaved(sender.node_id, str(exc)))
            self._check_invariants()
            return
        self._heard_from(sender, fields["i"], now)
        for state, node_id, incarnation in gossip:
            self._apply_update(sender, state, node_id, incarnation, now)
        self._handlers[kind](self, sender, fields, now)
        self._check_invariants()

    def connection_failed(self, peer: NodeId, now: float) -> None:
        """The transport could not reach `peer`, or lost its connection: a fast failure signal."""
        self._start(now)
        pending = self._pending.pop(peer, None)
        if pending is not None:
            # It cannot be reached: not worth keeping as a spare either. Try the next one.
            self._passive.pop(peer, None)
            self._repair(now)
        if peer in self._active and peer not in self._conn_failed:
            self._conn_failed[peer] = None
            # Suspect now, probe it next; if that probe fails too it is dead (see _end_probe).
            self._suspect(peer, self._member(peer).incarnation, now, local=True)
            self._probe_soon(peer)
            if self._probe is None:
                self._next_probe = min(self._next_probe, now)
        for relay in self._relays.values():
            if relay.target == peer and not relay.nacked:  # no need to wait to say NACK
                relay.nacked = True
                self._send(relay.requester, {"k": "nack", "seq": relay.seq})
        self._check_invariants()

    def tick(self, now: float) -> None:
        """Run what is due at `now`: suspicions, probes, request timeouts, repair, shuffle."""
        self._start(now)
        for node_id, deadline in sorted(self._suspicions.items(), key=lambda kv: (kv[1], kv[0])):
            if deadline <= now and node_id in self._suspicions:
                self._declare_dead(node_id, self._members[node_id].incarnation, now, local=True)
        for seq, relay in list(self._relays.items()):
            if not relay.nacked and relay.nack_at <= now:
                relay.nacked = True
                self._send(relay.requester, {"k": "nack", "seq": relay.seq})
            if relay.expires_at <= now:
                del self._relays[seq]
        self._drive_probe(now)
        self._expire_pending(now)
        if now >= self._next_repair:
            self._repair_budget = self._repair_allowance()
            self._repair(now)
            # Refused requests back off, to 32 intervals at most: a full overlay needs no hammering.
            self._next_repair = now + self.config.repair_interval_s * (1 << min(self._rejects, 5))
        if self._isolated() and now >= self._next_rejoin:
            self._rejoin(now)
        if now >= self._next_reconnect:
            self._next_reconnect = now + RECONNECT_PERIODS * self.config.probe_interval_s
            self._reconnect(now)
        if now >= self._next_shuffle:
            self._next_shuffle = now + self.config.shuffle_interval_s * self.rng.uniform(0.75, 1.25)
            self._shuffle(now)
        # Forget old notices, so the tables stay as small as the set of nodes being told.
        for node_id, at in list(self._notified.items()):
            if now - at >= self.config.probe_interval_s:
                del self._notified[node_id]
        for node_id, (at, _) in list(self._told_alive.items()):
            if now - at >= self.config.probe_interval_s:
                del self._told_alive[node_id]
        self._check_invariants()

    def next_deadline(self) -> float | None:
        """When `tick` next has work, or None if nothing is scheduled."""
        if not self._started:
            return None
        times: list[float] = []
        if self._active:
            times.append(self._next_shuffle)
            if self._probe is None:
                times.append(self._next_probe)
        if self._probe is not None:
            times.append(self._probe.end_at)
            if not self._probe.indirect_sent:
                times.append(self._probe.timeout_at)
        times.extend(self._suspicions.values())
        times.extend(r.expires_at if r.nacked else r.nack_at for r in self._relays.values())
        times.extend(p.deadline for p in self._pending.values())
        if self._wants_repair():
            times.append(self._next_repair)
        if self._isolated():
            times.append(self._next_rejoin)
        if self._graveyard:
            times.append(self._next_reconnect)
        return min(times) if times else None

    def take_outbox(self) -> list[tuple[Peer, dict]]:
        """The messages to send, each with its destination; clears the outbox."""
        out, self._outbox = self._outbox, []
        return out

    def take_events(self) -> list[Event]:
        """What happened since the last call; clears the list."""
        out, self._events = self._events, []
        return out

    def state(self, peer: NodeId) -> str:
        """What this node believes of `peer`: "alive", "suspect", "dead" or "unknown"."""
        if peer == self.me.node_id:
            return ALIVE
        member = self._members.get(peer)
        if member is not None:
            return member.state
        if peer in self._active or peer in self._passive:
            return ALIVE
        return UNKNOWN

    def snapshot(self) -> dict[str, Any]:
        """Views with states and this node's health, for `hmnode peers --json`."""
        def row(peer: Peer) -> dict[str, str]:
            return {"node_id": str(peer.node_id), "addr": peer.addr,
                    "state": self.state(peer.node_id)}

        return {"active": [row(p) for p in self.active], "passive": [row(p) for p in self.passive],
                "local_health": self.local_health, "incarnation": self.incarnation}

    # --- invariants -------------------------------------------------------------------------

    def _check_invariants(self) -> None:
        """Raise AssertionError if the state is inconsistent (checked after every public call)."""
        me = self.me.node_id
        cfg = self.config
        if me in self._active or me in self._passive or me in self._pending:
            raise AssertionError("this node is in its own views")
        if not self._active.keys().isdisjoint(self._passive.keys()):
            raise AssertionError("active and passive views overlap")
        if not self._active.keys().isdisjoint(self._pending.keys()):
            raise AssertionError("a neighbour is also a pending request")
        if len(self._active) > cfg.active_size:
            raise AssertionError(f"active view has {len(self._active)} > {cfg.active_size} peers")
        if len(self._passive) > cfg.passive_size:
            raise AssertionError(
                f"passive view has {len(self._passive)} > {cfg.passive_size} peers")
        if len(self._outbox) > cfg.max_outbox:
            raise AssertionError("outbox over its bound")
        if not 0 <= self.local_health <= cfg.max_local_health:
            raise AssertionError(f"local health {self.local_health} out of range")
        # Cheap enough to run after every call at a thousand simulated nodes: the passive view
        # is checked for addresses only; dead nodes leave it where they are declared dead, and
        # _add_passive refuses them.
        for node_id, peer in self._passive.items():
            if peer.node_id is not node_id and peer.node_id != node_id:
                raise AssertionError(f"passive entry {node_id} filed under another id")
            if type(peer.addr) is not str or not peer.addr:
                raise AssertionError(f"passive entry {node_id} without an address")
        for node_id, peer in self._active.items():
            if peer.node_id != node_id or not _valid_addr(peer.addr):
                raise AssertionError(f"neighbour {node_id} without a valid address")
            member = self._members.get(node_id)
            if member is None:
                raise AssertionError(f"neighbour {node_id} has no member record")
            if member.state == DEAD:
                raise AssertionError(f"dead node {node_id} still in the active view")
        for node_id in self._suspicions:
            if self._members.get(node_id, _Member(ALIVE, 0)).state != SUSPECT:
                raise AssertionError(f"suspicion timer for {node_id}, which is not suspect")
        # Records of neighbours, spares, pending peers and suspects are never evicted.
        kept = len(self._active) + len(self._passive) + len(self._pending) + len(self._suspicions)
        if len(self._members) > MAX_RECORDS + kept:
            raise AssertionError("member records over their bound")
        if len(self._graveyard) > MAX_GRAVEYARD:
            raise AssertionError("graveyard over its bound")
        if len(self._relays) > MAX_RELAYS or len(self._gossip) > MAX_GOSSIP_QUEUE:
            raise AssertionError("relays or gossip queue over their bound")

    # --- sending ----------------------------------------------------------------------------

    def _send(self, peer: Peer, body: dict[str, Any]) -> None:
        body["i"] = self.incarnation
        gossip = self._piggyback()
        if gossip:
            body["g"] = gossip
        if len(self._outbox) >= self.config.max_outbox:
            # A driver that does not drain loses messages, as a lossy link would.
            self.dropped_messages += 1
            return
        self._outbox.append((peer, body))

    def _piggyback(self) -> list[list[Any]]:
        if not self._gossip:
            return []
        limit = RETRANSMIT_MULT * max(1, math.ceil(math.log10(self._cluster_size() + 1)))
        # Least-sent first; the sort is stable, so ties keep queue (insertion) order.
        chosen = sorted(self._gossip.items(), key=lambda kv: kv[1].sent)[:PIGGYBACK_ITEMS]
        out = []
        for node_id, item in chosen:
            out.append([item.state, node_id.key, item.incarnation])
            item.sent += 1
            if item.sent >= limit:
                del self._gossip[node_id]
        return out

    def _queue_gossip(self, node_id: NodeId, state: str, incarnation: int) -> None:
        # A newer update replaces the old one, at the back.
        _put_newest(self._gossip, node_id, _Gossip(state, incarnation), MAX_GOSSIP_QUEUE)

    # --- members, suspicion, refutation -----------------------------------------------------

    def _start(self, now: float) -> None:
        if not self._started:
            self._started = True
            # Jitter, so that nodes started together do not probe and shuffle in lock step.
            self._next_probe = now + self.rng.uniform(0.0, self.config.probe_interval_s)
            self._next_shuffle = now + self.config.shuffle_interval_s * self.rng.uniform(0.5, 1.0)
            self._next_repair = now
            self._next_reconnect = now + RECONNECT_PERIODS * self.config.probe_interval_s

    def _cluster_size(self) -> int:
        # Each node knows only its neighbourhood; the records are its best estimate of n.
        return max(len(self._members), len(self._active) + len(self._passive)) + 1

    def _scale(self) -> int:
        return self.local_health + 1

    def _suspicion_timeout(self) -> float:
        cfg = self.config
        return (cfg.suspicion_mult * max(1.0, math.log10(self._cluster_size()))
                * cfg.probe_interval_s * self._scale())

    def _request_timeout(self) -> float:
        return REQUEST_TIMEOUT_PERIODS * self.config.probe_interval_s * self._scale()

    def _health(self, delta: int) -> None:
        self.local_health = max(0, min(self.config.max_local_health, self.local_health + delta))

    def _member(self, node_id: NodeId) -> _Member:
        member = self._members.get(node_id)
        if member is None:
            member = _Member(ALIVE, 0)
            self._set_member(node_id, member)
        return member

    def _set_member(self, node_id: NodeId, member: _Member) -> None:
        self._members.pop(node_id, None)  # re-inserted at the back: least recently changed first
        self._members[node_id] = member
        if len(self._members) > MAX_RECORDS:
            for old in list(self._members):
                if len(self._members) <= MAX_RECORDS:
                    break
                if (old not in self._active and old not in self._passive
                        and old not in self._pending and old not in self._suspicions
                        and old != node_id):
                    del self._members[old]

    def _is_dead(self, node_id: NodeId) -> bool:
        member = self._members.get(node_id)
        return member is not None and member.state == DEAD

    def _heard_from(self, sender: Peer, incarnation: int, now: float) -> None:
        """A message from `sender` arrived: it is alive at `incarnation`, at `sender.addr`."""
        node_id = sender.node_id
        self._conn_failed.pop(node_id, None)
        # The transport saw it there, which beats what any third party said.
        if node_id in self._active and self._active[node_id].addr != sender.addr:
            self._active[node_id] = sender
        if node_id in self._passive and self._passive[node_id].addr != sender.addr:
            self._passive[node_id] = sender
        if node_id in self._pending:
            self._pending[node_id].peer = sender
        member = self._members.get(node_id)
        if member is None:
            self._set_member(node_id, _Member(ALIVE, incarnation))
            self._resurrect(node_id, now)  # its record was forgotten, its grave may not be
        elif incarnation > member.incarnation:
            self._make_alive(node_id, incarnation, now)
        elif member.state != ALIVE:
            self._notify(sender, node_id, member, now)

    def _notify(self, peer: Peer, node_id: NodeId, member: _Member, now: float) -> None:
        """Tell `peer` our verdict on itself, so that it refutes it (at most once a period)."""
        last = self._notified.get(node_id)
        if last is not None and now - last < self.config.probe_interval_s:
            return
        self._notified[node_id] = now
        self._send(peer, {"k": member.state, "id": node_id.key, "inc": member.incarnation})

    def _make_alive(self, node_id: NodeId, incarnation: int, now: float) -> None:
        was = self._members[node_id].state
        self._set_member(node_id, _Member(ALIVE, incarnation))
        self._suspicions.pop(node_id, None)
        if was != ALIVE:
            self._events.append(PeerAlive(node_id))
            self._queue_gossip(node_id, ALIVE, incarnation)
            self._resurrect(node_id, now)

    def _resurrect(self, node_id: NodeId, now: float) -> None:
        """A node held dead is back: a spare again, and a neighbour again if it was one."""
        grave = self._graveyard.pop(node_id, None)
        if grave is None:
            return
        self._add_passive(grave.peer)
        if grave.neighbour and node_id in self._passive:
            # Most likely a healed partition: relinking the cut links joins the two overlays,
            # which with full views would otherwise stay apart.
            self._request_neighbor(grave.peer, "high", now)

    def _reconnect(self, now: float) -> None:
        """Ping one remembered dead peer: if it is alive it answers, both sides learn that the
        other is alive (each tells the other its verdict, which it refutes), and it returns."""
        horizon = now - GRAVEYARD_PERIODS * self.config.probe_interval_s
        for node_id, grave in list(self._graveyard.items()):
            if grave.since < horizon:
                del self._graveyard[node_id]
        if not self._graveyard:
            return
        grave = self._graveyard[self.rng.choice(sorted(self._graveyard))]
        self._next_seq()
        self._send(grave.peer, {"k": "ping", "seq": self._seq})

    def _apply_update(self, sender: Peer, state: str, node_id: NodeId, incarnation: int,
                      now: float) -> None:
        """A suspect/alive/dead statement about `node_id`, gossiped or sent by `sender`."""
        if node_id == self.me.node_id:
            if state != ALIVE:
                self._refute(sender, incarnation, now)
            return
        if node_id == sender.node_id:
            return  # a node speaks for itself through its "i"
        if state == ALIVE:
            member = self._members.get(node_id)
            # Only news about a node we know; unknown nodes need no resurrection here.
            if member is not None and incarnation > member.incarnation:
                self._make_alive(node_id, incarnation, now)
        elif state == SUSPECT:
            # Only a neighbour's suspicion concerns us: we probe it ourselves and can confirm.
            if node_id in self._active:
                self._suspect(node_id, incarnation, now, local=False)
        else:
            self._declare_dead(node_id, incarnation, now, local=False)

    def _refute(self, sender: Peer, incarnation: int, now: float) -> None:
        """Someone holds this node suspect or dead at `incarnation`: outbid it and say so."""
        told = [sender]
        if incarnation >= self.incarnation:
            self.incarnation = min(incarnation + 1, MAX_INCARNATION)
            # Lifeguard: being suspected hints that this node is the slow one.
            self._health(+1)
            self._queue_gossip(self.me.node_id, ALIVE, self.incarnation)
            # The neighbours are the nodes that adopt a suspicion of this one and would
            # confirm it on their own timers: each hears the refutation at once, not when
            # gossip happens to pass.
            told += [self._active[n] for n in sorted(self._active) if n != sender.node_id]
        for peer in told:
            if self._told_alive.get(peer.node_id, (0.0, -1))[1] == self.incarnation:
                continue  # an echo of a verdict already answered (gossip repeats itself)
            self._told_alive[peer.node_id] = (now, self.incarnation)
            self._send(peer, {"k": ALIVE, "id": self.me.node_id.key, "inc": self.incarnation})

    def _suspect(self, node_id: NodeId, incarnation: int, now: float, *, local: bool) -> None:
        member = self._member(node_id)
        if member.state == DEAD:
            return
        if member.state == SUSPECT and incarnation <= member.incarnation:
            return
        if member.state == ALIVE and incarnation < member.incarnation:
            return
        was = member.state
        self._set_member(node_id, _Member(SUSPECT, incarnation))
        self._suspicions[node_id] = now + self._suspicion_timeout()
        if was == ALIVE:
            self._events.append(PeerSuspected(node_id))
        self._queue_gossip(node_id, SUSPECT, incarnation)
        # A suspect neighbour is probed again next: the ACK carries its incarnation, so a
        # refutation lost on the way is heard anyway, well before the suspicion expires.
        self._probe_soon(node_id)
        if local:
            peer = self._known_peer(node_id)
            if peer is not None:  # Lifeguard's buddy system: tell the suspect at once
                self._notified[node_id] = now
                self._send(peer, {"k": SUSPECT, "id": node_id.key, "inc": incarnation})

    def _declare_dead(self, node_id: NodeId, incarnation: int, now: float, *, local: bool) -> None:
        member = self._members.get(node_id)
        if member is not None:
            if incarnation < member.incarnation:
                return
            if member.state == DEAD and incarnation == member.incarnation:
                return
        was = member.state if member is not None else UNKNOWN
        peer = self._known_peer(node_id)
        if peer is not None:
            _put_newest(self._graveyard, node_id, _Grave(peer, now, node_id in self._active),
                        MAX_GRAVEYARD)
        self._set_member(node_id, _Member(DEAD, incarnation))
        self._suspicions.pop(node_id, None)
        self._conn_failed.pop(node_id, None)
        if was != DEAD:
            self._events.append(PeerDead(node_id))
        self._queue_gossip(node_id, DEAD, incarnation)
        if local and peer is not None:
            # If it is alive after all (a partition, a pause) it refutes and comes back.
            self._notified[node_id] = now
            self._send(peer, {"k": DEAD, "id": node_id.key, "inc": incarnation})
        self._passive.pop(node_id, None)
        repair = self._pending.pop(node_id, None) is not None
        lost = node_id in self._active
        if lost:
            self._remove_active(node_id, "dead", to_passive=False)
        if repair or lost:
            self._repair(now, lost=lost)

    def _known_peer(self, node_id: NodeId) -> Peer | None:
        peer = self._active.get(node_id) or self._passive.get(node_id)
        if peer is None and node_id in self._pending:
            peer = self._pending[node_id].peer
        return peer

    # --- views ------------------------------------------------------------------------------

    def _add_active(self, peer: Peer) -> None:
        node_id = peer.node_id
        self._pending.pop(node_id, None)
        if node_id in self._active:
            self._active[node_id] = peer
            return
        self._passive.pop(node_id, None)
        if len(self._active) >= self.config.active_size:
            self._evict_active()
        self._active[node_id] = peer
        self._member(node_id)
        self._events.append(NeighborUp(peer))
        # A new neighbour joins the current probe round at a random place (as memberlist does).
        self._probe_order.insert(self.rng.randint(0, len(self._probe_order)), node_id)
        self._trim_probe_order()

    def _evict_active(self) -> None:
        victim = self.rng.choice(sorted(self._active))
        peer = self._remove_active(victim, "evicted", to_passive=True)
        self._send(peer, {"k": "disconnect"})

    def _remove_active(self, node_id: NodeId, reason: str, *, to_passive: bool) -> Peer:
        peer = self._active.pop(node_id)
        self._conn_failed.pop(node_id, None)
        if self._probe is not None and self._probe.target.node_id == node_id:
            self._probe = None  # nothing learnt about anybody's health: no LHM change
        if to_passive:
            self._add_passive(peer)
        self._events.append(NeighborDown(peer, reason))
        return peer

    def _add_passive(self, peer: Peer, prefer_evict: tuple[NodeId, ...] = ()) -> None:
        node_id = peer.node_id
        if (node_id == self.me.node_id or node_id in self._active or node_id in self._passive
                or self._is_dead(node_id) or self.config.passive_size == 0):
            return
        if len(self._passive) >= self.config.passive_size:
            victims = [v for v in prefer_evict if v in self._passive]
            if not victims:
                idle = [v for v in sorted(self._passive) if v not in self._pending]
                victims = [self.rng.choice(idle or sorted(self._passive))]
            del self._passive[victims[0]]
        self._passive[node_id] = peer

    def _request_neighbor(self, peer: Peer, priority: str, now: float) -> None:
        node_id = peer.node_id
        if node_id in self._active or node_id in self._pending or node_id == self.me.node_id:
            return
        if len(self._pending) >= self._max_pending():
            return  # a burst of joins ending here: let the surplus walks end without a link
        self._pending[node_id] = _Pending(peer, "neighbor", now + self._request_timeout(), priority)
        self._send(peer, {"k": "neighbor", "prio": priority})

    def _repair_allowance(self) -> int:
        # Enough to fill an empty view and replace every request of it that fails.
        return 2 * self.config.active_size

    def _max_pending(self) -> int:
        return 2 * self.config.active_size

    def _wants_repair(self) -> bool:
        if len(self._active) + len(self._pending) >= self.config.active_size:
            return False
        return any(node_id not in self._pending for node_id in self._passive)

    def _repair(self, now: float, *, lost: bool = False) -> None:
        """Ask random passive peers to become neighbours, within this interval's budget.

        `lost`: a neighbour was just lost, so this is urgent whatever was refused before.
        """
        if lost:
            self._rejects = 0
            self._repair_budget = max(self._repair_budget, 1)
            self._next_repair = min(self._next_repair, now + self.config.repair_interval_s)
        while self._repair_budget > 0 and self._wants_repair():
            candidates = [n for n in sorted(self._passive) if n not in self._pending]
            node_id = self.rng.choice(candidates)
            self._repair_budget -= 1
            # High priority is for a node without neighbours: it must be taken, whoever that
            # evicts. Beyond the paper, a node refused again and again also asks once with high
            # priority: all nodes of a small cluster that got cut off (its members evicted
            # elsewhere and linked to each other) are short of neighbours, and only a full node
            # outside it, which would refuse low priority for ever, can let it back in. The
            # escalations back off exponentially, so a node that is merely one short in a full
            # overlay causes rare evictions, not churn.
            priority = "low"
            if not self._active:
                priority = "high"
            elif self._rejects >= self._escalate_after:
                priority = "high"
                self._rejects = 0
                self._escalate_after = min(2 * self._escalate_after, MAX_ESCALATE_AFTER)
            self._request_neighbor(self._passive[node_id], priority, now)

    def _isolated(self) -> bool:
        """Whether this node knows nobody beyond its neighbours but has a contact outside them.

        That is a node whose JOIN was lost, or a small cluster that formed while messages were
        lost and learnt of nobody else; only a new JOIN through a contact can link it back.
        """
        if self._passive or any(p.kind == "join" for p in self._pending.values()):
            return False
        return any(node_id not in self._active for node_id in self._contacts)

    def _rejoin(self, now: float) -> None:
        """Ask the next bootstrap contact that is not a neighbour again (it may be back)."""
        contact = next(p for n, p in self._contacts.items() if n not in self._active)
        del self._contacts[contact.node_id]
        self._contacts[contact.node_id] = contact  # round robin over the contacts
        self._next_rejoin = now + REJOIN_PERIODS * self.config.probe_interval_s
        self._send_join(contact, now)

    def _send_join(self, contact: Peer, now: float) -> None:
        self._passive.pop(contact.node_id, None)
        self._pending[contact.node_id] = _Pending(contact, "join", now + self._request_timeout())
        self._send(contact, {"k": "join"})

    def _expire_pending(self, now: float) -> None:
        expired = False
        for node_id, pending in list(self._pending.items()):
            if pending.deadline > now:
                continue
            # A JOIN is retried even when neighbours have arrived meanwhile: they may be nodes
            # that joined through this one, an island that only this JOIN links to the rest.
            if pending.kind == "join" and pending.attempts < JOIN_ATTEMPTS:
                pending.attempts += 1
                pending.deadline = now + self._request_timeout()
                self._send(pending.peer, {"k": "join"})
                continue
            del self._pending[node_id]
            if pending.kind == "join":
                # A contact is too precious to forget after a few lost messages: one more try
                # later, with NEIGHBOR, and dropped if that is unanswered too.
                self._add_passive(pending.peer)
            else:
                self._passive.pop(node_id, None)  # it did not answer: not a useful spare
            expired = True
        if expired:
            self._repair(now)

    # --- SWIM probing -----------------------------------------------------------------------

    def _probe_soon(self, node_id: NodeId) -> None:
        """Make neighbour `node_id` the next probe target (unless it is being probed now)."""
        if node_id not in self._active or self._probe_order[:1] == [node_id]:
            return
        if self._probe is not None and self._probe.target.node_id == node_id:
            return
        self._probe_order.insert(0, node_id)
        self._trim_probe_order()

    def _trim_probe_order(self) -> None:
        # Departed neighbours are skipped lazily; with churn they are dropped here, so the
        # round stays about as long as the active view.
        if len(self._probe_order) > 2 * self.config.active_size:
            self._probe_order = list(dict.fromkeys(
                n for n in self._probe_order if n in self._active))

    def _next_seq(self) -> None:
        """Take the next ping sequence number (wrapping within what the wire allows)."""
        self._seq = self._seq + 1 if self._seq < MAX_SEQ else 1

    def _drive_probe(self, now: float) -> None:
        probe = self._probe
        if probe is not None:
            if not probe.indirect_sent and now >= probe.timeout_at:
                self._ask_helpers(probe)
            if now >= probe.end_at:
                self._end_probe(now, acked=False)
        if self._probe is None and self._active and now >= self._next_probe:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        while True:
            if not self._probe_order:
                order = sorted(self._active)
                self.rng.shuffle(order)  # a fresh random round over every neighbour
                self._probe_order = order
            node_id = self._probe_order.pop(0)
            if node_id in self._active:
                break
        self._next_seq()
        scale = self._scale()
        target = self._active[node_id]
        self._probe = _Probe(target, self._seq, now, now + self.config.probe_timeout_s * scale,
                             now + self.config.probe_interval_s * scale)
        self._send(target, {"k": "ping", "seq": self._seq})

    def _ask_helpers(self, probe: _Probe) -> None:
        probe.indirect_sent = True
        others = [n for n in sorted(self._active) if n != probe.target.node_id]
        helpers = self.rng.sample(others, min(self.config.indirect_probes, len(others)))
        probe.helpers = tuple(helpers)
        for node_id in helpers:
            self._send(self._active[node_id], {"k": "ping_req", "seq": probe.seq,
                                               "id": probe.target.node_id.key,
                                               "addr": probe.target.addr})

    def _end_probe(self, now: float, *, acked: bool) -> None:
        probe = self._probe
        assert probe is not None
        self._probe = None
        if acked:
            self._next_probe = max(now, probe.end_at)  # keep the protocol period
            self._health(-1)
            return
        self._next_probe = now
        # Lifeguard: helpers that sent neither ACK nor NACK suggest that this node is the slow
        # one; with no helpers, the failed probe itself counts.
        missed = len(probe.helpers) - len(probe.nacks) if probe.helpers else 1
        self._health(missed)
        node_id = probe.target.node_id
        if node_id not in self._active:
            return
        if node_id in self._conn_failed:
            # The transport failed and SWIM's direct and indirect probes confirm it.
            self._declare_dead(node_id, self._member(node_id).incarnation, now, local=True)
        else:
            self._suspect(node_id, self._member(node_id).incarnation, now, local=True)

    # --- shuffle ----------------------------------------------------------------------------

    def _shuffle(self, now: float) -> None:
        if not self._active:
            return
        cfg = self.config
        active = sorted(self._active)
        target = self.rng.choice(active)
        others = [n for n in active if n != target]
        sample = self.rng.sample(others, min(cfg.shuffle_active, len(others)))
        spares = sorted(self._passive)
        sample_passive = self.rng.sample(spares, min(cfg.shuffle_passive, len(spares)))
        peers = [self._active[n] for n in sample] + [self._passive[n] for n in sample_passive]
        self._shuffle_sent = tuple(p.node_id for p in peers)
        self._shuffle_open = True
        self._send(self._active[target], {
            "k": "shuffle", "ttl": cfg.shuffle_ttl, "id": self.me.node_id.key, "addr": self.me.addr,
            "peers": [_peer_wire(self.me)] + [_peer_wire(p) for p in peers]})

    def _merge(self, peers: list[Peer], prefer_evict: tuple[NodeId, ...]) -> None:
        for peer in peers:
            self._add_passive(peer, prefer_evict)

    # --- message handlers -------------------------------------------------------------------

    def _on_join(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        node_id = sender.node_id
        if self._is_dead(node_id):
            # It was told its verdict (_heard_from); it refutes and asks again.
            self._send(sender, {"k": "neighbor_reply", "accept": False})
            return
        known = node_id in self._active
        self._add_active(sender)
        self._send(sender, {"k": "neighbor_reply", "accept": True})
        if known:
            return  # a repeated JOIN (our accept was lost): the walks went out the first time
        for other in sorted(self._active):
            if other != node_id:
                self._send(self._active[other], {"k": "forward_join", "ttl": self.config.arwl,
                                                 "id": node_id.key, "addr": sender.addr})

    def _on_forward_join(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        new = Peer(f["id"], sender.addr if f["id"] == sender.node_id else f["addr"])
        node_id = new.node_id
        if (node_id == self.me.node_id or node_id in self._active or node_id in self._pending
                or self._is_dead(node_id)):
            return
        ttl = f["ttl"]
        if ttl == 0 or len(self._active) <= 1:
            self._request_neighbor(new, "high", now)
            return
        if ttl == self.config.prwl:
            self._add_passive(new)
        onward = [n for n in sorted(self._active) if n != sender.node_id and n != node_id]
        if not onward:
            self._request_neighbor(new, "high", now)
            return
        self._send(self._active[self.rng.choice(onward)],
                   {"k": "forward_join", "ttl": ttl - 1, "id": node_id.key, "addr": new.addr})

    def _on_neighbor(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        node_id = sender.node_id
        if self._is_dead(node_id):
            self._send(sender, {"k": "neighbor_reply", "accept": False})
            return
        room = len(self._active) + len(self._pending) < self.config.active_size
        # A request crossing ours is taken: both sides want the link.
        if node_id in self._active or f["prio"] == "high" or node_id in self._pending or room:
            self._add_active(sender)
            self._send(sender, {"k": "neighbor_reply", "accept": True})
        else:
            self._send(sender, {"k": "neighbor_reply", "accept": False})
            self._add_passive(sender)  # alive and looking: a good spare

    def _on_neighbor_reply(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        node_id = sender.node_id
        pending = self._pending.pop(node_id, None)
        if f["accept"]:
            if node_id in self._active:
                return
            if not self._is_dead(node_id) and (
                    pending is not None or len(self._active) < self.config.active_size):
                self._add_active(sender)
                self._rejects = 0
            else:
                # A late accept we have no room for: undo its side of the link.
                self._send(sender, {"k": "disconnect"})
                self._add_passive(sender)
            return
        if pending is None:
            return
        if pending.kind == "join" and pending.attempts < JOIN_ATTEMPTS:
            # Refused because it held us dead; our refutation is on its way, so ask again.
            pending.attempts += 1
            pending.deadline = now + self._request_timeout()
            self._pending[node_id] = pending
            self._send(sender, {"k": "join"})
            return
        self._add_passive(sender)  # alive, only full: a good spare
        if pending.priority == "low":
            self._rejects += 1
        self._repair(now)

    def _on_disconnect(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        if sender.node_id in self._active:
            self._remove_active(sender.node_id, "disconnected", to_passive=True)
            self._repair(now, lost=True)

    def _on_shuffle(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        origin = Peer(f["id"], sender.addr if f["id"] == sender.node_id else f["addr"])
        if origin.node_id == self.me.node_id:
            return
        peers = [sender if p.node_id == sender.node_id else p for p in f["peers"]]
        ttl = f["ttl"] - 1
        if ttl > 0 and len(self._active) > 1:
            onward = [n for n in sorted(self._active)
                      if n != sender.node_id and n != origin.node_id]
            if onward:
                self._send(self._active[self.rng.choice(onward)], {
                    "k": "shuffle", "ttl": ttl, "id": origin.node_id.key, "addr": origin.addr,
                    "peers": [_peer_wire(p) for p in peers]})
                return
        spares = [n for n in sorted(self._passive) if n != origin.node_id]
        reply = self.rng.sample(spares, min(len(peers), len(spares)))
        answer = [self._passive[n] for n in reply]
        if len(answer) < len(peers):
            # A small overlay has small passive views; topped up with neighbours, the answer
            # still teaches the origin as many nodes as it taught us.
            near = [n for n in sorted(self._active) if n != origin.node_id]
            answer += [self._active[n] for n in
                       self.rng.sample(near, min(len(peers) - len(answer), len(near)))]
        self._send(origin, {"k": "shuffle_reply", "peers": [_peer_wire(p) for p in answer]})
        self._merge(peers, tuple(reply))

    def _on_shuffle_reply(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        if not self._shuffle_open:
            return  # unasked for: not a way to stuff our passive view
        self._shuffle_open = False
        peers = [sender if p.node_id == sender.node_id else p for p in f["peers"]]
        self._merge(peers, self._shuffle_sent)
        self._shuffle_sent = ()

    def _on_ping(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        neighbour = sender.node_id in self._active or sender.node_id in self._pending
        self._send(sender, {"k": "ack", "seq": f["seq"], "nb": neighbour})

    def _on_ack(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        seq = f["seq"]
        relay = self._relays.get(seq)
        if relay is not None and relay.target == sender.node_id:
            del self._relays[seq]
            self._send(relay.requester, {"k": "ack", "seq": relay.seq, "nb": False})
            return
        probe = self._probe
        if probe is None or probe.seq != seq:
            return  # late or unknown: the probe it answered is over
        target = probe.target.node_id
        if sender.node_id == target:
            self._end_probe(now, acked=True)
            if not f["nb"] and target in self._active:
                # It does not hold us as neighbour (a lost accept or disconnect): drop our half.
                self._remove_active(target, "not a neighbour", to_passive=True)
                self._repair(now, lost=True)
        elif sender.node_id in probe.helpers:
            self._end_probe(now, acked=True)

    def _on_ping_req(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        target_id: NodeId = f["id"]
        if target_id == self.me.node_id:
            self._send(sender, {"k": "ack", "seq": f["seq"], "nb": False})
            return
        if len(self._relays) >= MAX_RELAYS:
            return  # overloaded: the requester sees a missing NACK, as it should
        self._next_seq()
        cfg = self.config
        window = cfg.probe_interval_s - cfg.probe_timeout_s
        self._relays[self._seq] = _Relay(sender, f["seq"], target_id, now + NACK_FRACTION * window,
                                         now + cfg.probe_interval_s * (cfg.max_local_health + 1))
        target = self._known_peer(target_id) or Peer(target_id, f["addr"])
        self._send(target, {"k": "ping", "seq": self._seq})

    def _on_nack(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == f["seq"] and sender.node_id in probe.helpers:
            probe.nacks[sender.node_id] = None

    def _on_update(self, sender: Peer, f: dict[str, Any], now: float) -> None:
        self._apply_update(sender, f["k"], f["id"], f["inc"], now)

    _handlers: dict[str, Callable[["Membership", Peer, dict[str, Any], float], None]] = {
        "join": _on_join,
        "forward_join": _on_forward_join,
        "neighbor": _on_neighbor,
        "neighbor_reply": _on_neighbor_reply,
        "disconnect": _on_disconnect,
        "shuffle": _on_shuffle,
        "shuffle_reply": _on_shuffle_reply,
        "ping": _on_ping,
        "ack": _on_ack,
        "ping_req": _on_ping_req,
        "nack": _on_nack,
        ALIVE: _on_update,
        SUSPECT: _on_update,
        DEAD: _on_update,
    }


# --- wire validation ------------------------------------------------------------------------


def _short(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<{value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _valid_addr(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ADDR_LEN


def _check_peer(peer: Any) -> None:
    # Local callers (the driver) pass these; a wrong type there is a programming error.
    if not (isinstance(peer, Peer) and isinstance(peer.node_id, NodeId) and _valid_addr(peer.addr)):
        raise TypeError(f"expected a Peer with a node id and an address, got {peer!r}")


def _peer_wire(peer: Peer) -> list[Any]:
    return [peer.node_id.key, peer.addr]


def _int(limit: int) -> Callable[[str, str, Any], int]:
    def check(kind: str, name: str, value: Any) -> int:
        # bool is an int subclass, and True must not pass for 1.
        if type(value) is not int or not 0 <= value <= limit:
            raise _Malformed(f"{kind}: {name} must be an integer 0..{limit}, not {_short(value)}")
        return value
    return check


_seq = _int(MAX_SEQ)
_inc = _int(MAX_INCARNATION)
_ttl = _int(MAX_TTL)


def _node_id(kind: str, name: str, value: Any) -> NodeId:
    if type(value) is not bytes or len(value) != ID_BYTES:
        raise _Malformed(f"{kind}: {name} must be {ID_BYTES} bytes, not {_short(value)}")
    return NodeId(value)


def _addr(kind: str, name: str, value: Any) -> str:
    if not _valid_addr(value):
        raise _Malformed(f"{kind}: {name} must be a string of 1..{MAX_ADDR_LEN} characters, "
                         f"not {_short(value)}")
    return value


def _bool(kind: str, name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _Malformed(f"{kind}: {name} must be a boolean, not {_short(value)}")
    return value


def _priority(kind: str, name: str, value: Any) -> str:
    if value not in ("high", "low") or type(value) is not str:
        raise _Malformed(f"{kind}: {name} must be 'high' or 'low', not {_short(value)}")
    return value


def _peers(kind: str, name: str, value: Any) -> list[Peer]:
    if type(value) is not list:
        raise _Malformed(f"{kind}: {name} must be a list, not {type(value).__name__}")
    if len(value) > MAX_PEERS_PER_MESSAGE:
        raise _Malformed(f"{kind}: {name} has {len(value)} > {MAX_PEERS_PER_MESSAGE} entries")
    out: dict[NodeId, Peer] = {}  # duplicates collapse, first one wins, order kept
    for entry in value:
        if type(entry) is not list or len(entry) != 2:
            raise _Malformed(f"{kind}: each of {name} must be [id, addr], not {_short(entry)}")
        node_id = _node_id(kind, name, entry[0])
        out.setdefault(node_id, Peer(node_id, _addr(kind, name, entry[1])))
    return list(out.values())


def _gossip(kind: str, value: Any) -> list[tuple[str, NodeId, int]]:
    if type(value) is not list:
        raise _Malformed(f"{kind}: g must be a list, not {type(value).__name__}")
    if len(value) > MAX_GOSSIP_PER_MESSAGE:
        raise _Malformed(f"{kind}: g has {len(value)} > {MAX_GOSSIP_PER_MESSAGE} entries")
    out = []
    for entry in value:
        if type(entry) is not list or len(entry) != 3:
            raise _Malformed(f"{kind}: each of g must be [state, id, inc], not {_short(entry)}")
        state = entry[0]
        if type(state) is not str or state not in _STATES:
            raise _Malformed(f"{kind}: unknown state {_short(state)} in g")
        out.append((state, _node_id(kind, "g", entry[1]), _inc(kind, "g", entry[2])))
    return out


_UPDATE = {"id": _node_id, "inc": _inc}
_SCHEMA: dict[str, dict[str, Callable[[str, str, Any], Any]]] = {
    "join": {},
    "forward_join": {"ttl": _ttl, "id": _node_id, "addr": _addr},
    "neighbor": {"prio": _priority},
    "neighbor_reply": {"accept": _bool},
    "disconnect": {},
    "shuffle": {"ttl": _ttl, "id": _node_id, "addr": _addr, "peers": _peers},
    "shuffle_reply": {"peers": _peers},
    "ping": {"seq": _seq},
    "ack": {"seq": _seq, "nb": _bool},
    "ping_req": {"seq": _seq, "id": _node_id, "addr": _addr},
    "nack": {"seq": _seq},
    ALIVE: _UPDATE,
    SUSPECT: _UPDATE,
    DEAD: _UPDATE,
}


def _parse(message: Any) -> tuple[str, dict[str, Any], list[tuple[str, NodeId, int]]]:
    """Check one incoming message against the schema; raise _Malformed saying what is wrong."""
    if type(message) is not dict:
        raise _Malformed(f"a membership message is a map, not {type(message).__name__}")
    kind = message.get("k")
    if type(kind) is not str or kind not in _SCHEMA:
        raise _Malformed(f"unknown message kind {_short(kind)}")
    spec = _SCHEMA[kind]
    for key in message:
        if key not in spec and key not in ("k", "i", "g"):
            raise _Malformed(f"{kind}: unexpected field {_short(key)}")
    if "i" not in message:
        raise _Malformed(f"{kind}: missing field 'i'")
    fields: dict[str, Any] = {"k": kind, "i": _inc(kind, "i", message["i"])}
    for name, check in spec.items():
        if name not in message:
            raise _Malformed(f"{kind}: missing field {name!r}")
        fields[name] = check(kind, name, message[name])
    gossip = _gossip(kind, message["g"]) if "g" in message else []
    return kind, fields, gossip


def _put_newest(table: dict[K, V], key: K, value: V, bound: int) -> None:
    """Put `key` at the back of an insertion-ordered `table` (moving it if present), dropping the
    oldest entries past `bound`."""
    table.pop(key, None)
    table[key] = value
    while len(table) > bound:
        del table[next(iter(table))]
