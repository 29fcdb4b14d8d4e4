"""Epidemic broadcast trees (Plumtree): a sans-IO core that a driver feeds and drains.

Theory of operation, after Leitão, Pereira and Rodrigues, "Epidemic Broadcast Trees",
SRDS 2007 (Plumtree):

* Every neighbour is either an *eager* peer or a *lazy* peer. A new neighbour starts eager.
  The first copy of a message is pushed at once, whole, to every eager peer except the one it
  came from (GOSSIP); lazy peers only get its id (IHAVE), batched per peer for
  `ihave_batch_s` so that announcements cost little. Unlike the paper, which assumes reliable
  links, the ids are announced to eager peers as well, so that a lost push is noticed and
  recovered like any other missing message.
* The eager links converge on a spanning tree by themselves: a node that receives a message
  it already has (a duplicate) tells the sender PRUNE, and both ends turn that link lazy. After
  one broadcast each node keeps exactly the link its first copy arrived on, so later broadcasts
  cost about one message per node, and from any origin, since the tree is shared.
* The lazy links repair the tree. A node that hears IHAVE(m) for a message it lacks remembers
  who announced it and starts a timer (`ihave_timeout_s`); if m has not arrived when it fires,
  the node sends GRAFT(m) to the first announcer, which turns that link eager again and
  answers with the message, and it arms a shorter timer (`graft_retry_s`) after which the next
  announcer is tried. The announcers are asked in turn, round and round, up to
  MAX_GRAFT_ATTEMPTS grafts, since a graft or its answer may be lost too. Lost messages,
  failed links and departed nodes are healed this way.
* Optimisation (the paper's section 3.8): when an IHAVE announces a message that this node
  already received, with a hop count at least `optimization_threshold` smaller than that of
  the copy it got, the lazy link is a shortcut; the node grafts it (a GRAFT naming no message)
  and prunes the eager link the message came on, so the tree's paths shorten over time.

Timers are deadlines that the driver honours: `next_deadline()` says when `tick(now)` next has
work (IHAVE batches, graft timers, expiry of remembered ids). Outgoing messages accumulate in an
outbox (`take_outbox()`), deliveries and complaints about peers in an event list
(`take_events()`). The core has no clock, socket, thread or randomness of its own: time comes
in as `now`, randomness from the injected `random.Random`, and nothing depends on hash or
object-id order, so equal seeds and inputs give equal outputs.

Every incoming message is checked strictly; anything malformed yields a `Misbehaved` event and
no other effect. All state is bounded: remembered ids (`seen_ttl_s`, `max_seen`), cached
payloads (`max_payload_cache`), announcers per missing id, missing ids, and the outbox.

Wire messages (maps that the driver sends as a transport message's body):

    {"k": "gossip", "id": bytes, "p": payload, "h": hops}
    {"k": "ihave", "ids": [[bytes, hops], ...]}     (1 .. 256 entries)
    {"k": "graft", "ids": [bytes, ...]}             (0 .. 256 ids; none: only "link me eager")
    {"k": "prune"}

`hops` is the number of links the copy has travelled: the originator delivers with 0 and
pushes 1, and an IHAVE names the hop count the receiver would get by grafting.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hmnode.identity import NodeId

MIN_ID_BYTES = 1
MAX_ID_BYTES = 64
# Ids per IHAVE or GRAFT message: at most 64-byte ids this keeps a message under ~20 KiB,
# far below the transport's frame limit, and bounds what one malformed message can cost.
MAX_IDS_PER_MESSAGE = 256
# Hop counts beyond this are nonsense in any real mesh; capping keeps arithmetic bounded.
MAX_HOPS = 65_535
# A missing message rarely has more than a few announcers worth trying before it arrives.
MAX_ANNOUNCERS_PER_ID = 16
# GRAFTs sent for one missing id before giving up on it until a fresh IHAVE comes: the
# announcers are tried in turn, round and round, since a graft or its answer may be lost.
MAX_GRAFT_ATTEMPTS = 8
# (id, peer) pairs whose payload failed validation, remembered so that the peer's IHAVEs
# for that id do not lead to grafting the same bad payload from it again and again.
MAX_REJECTED = 1024
# Missing ids waiting for a graft, at most; the effective bound is also at most max_seen.
MAX_PENDING_GRAFTS = 10_000

_GOSSIP_KEYS = frozenset({"k", "id", "p", "h"})
_IDS_KEYS = frozenset({"k", "ids"})
_PRUNE_KEYS = frozenset({"k"})


@dataclass(frozen=True)
class BroadcastConfig:
    """Timers and bounds of the broadcast core; the defaults suit a LAN/WAN mesh."""

    # Wait this long after the first IHAVE before GRAFTing (80 ms, as iroh-gossip does); it
    # should exceed a few hops of link latency, or slow tree paths get grafted around.
    ihave_timeout_s: float = 0.08
    graft_retry_s: float = 0.04  # then try the next announcer after this
    ihave_batch_s: float = 0.005  # lazy IHAVEs are batched per peer for this long
    seen_ttl_s: float = 120.0  # remember message ids this long (dedup)
    max_seen: int = 100_000  # and never more than this many
    max_payload_cache: int = 10_000  # payloads kept for answering GRAFTs (within seen_ttl)
    max_outbox: int = 100_000  # bound on queued outgoing messages
    # Hop gain that swaps a lazy link into the tree (the paper's optimisation); 0 disables it.
    optimization_threshold: int = 3

    def __post_init__(self) -> None:
        for name in ("ihave_timeout_s", "graft_retry_s", "ihave_batch_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.seen_ttl_s > 0:
            raise ValueError("seen_ttl_s must be > 0")
        for name in ("max_seen", "max_payload_cache", "max_outbox"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.optimization_threshold < 0:
            raise ValueError("optimization_threshold must be >= 0")


@dataclass(frozen=True)
class Delivered:
    """A message delivered here for the first time; `sender` is None when originated here."""

    msg_id: bytes
    payload: Any
    sender: NodeId | None
    hops: int


@dataclass(frozen=True)
class Misbehaved:
    """A peer sent something malformed or a payload that failed validation."""

    peer: NodeId
    reason: str


@dataclass
class BroadcastStats:
    """Counters since creation. `*_sent` count wire messages (not ids); `delivered` includes
    messages originated here; `invalid` counts messages answered with Misbehaved."""

    delivered: int = 0
    duplicates: int = 0
    grafts_sent: int = 0
    prunes_sent: int = 0
    ihaves_sent: int = 0
    gossip_sent: int = 0
    invalid: int = 0
    outbox_dropped: int = 0


@dataclass(frozen=True)
class _Seen:
    """What is remembered about a received message: when, over how many hops, from whom."""

    at: float
    hops: int
    parent: NodeId | None


@dataclass
class _Missing:
    """A message announced by IHAVE but not yet received, and its graft timer."""

    announcers: deque[NodeId]
    deadline: float
    timer: int  # matches the live heap entry; older entries for this id are stale
    grafted_to: NodeId | None = None  # the announcer last sent a GRAFT, awaiting its answer
    attempts: int = 0


class _Malformed(Exception):
    """Internal: an incoming message breaks the wire schema."""


def _check_id(value: Any) -> bytes:
    if not isinstance(value, bytes) or not MIN_ID_BYTES <= len(value) <= MAX_ID_BYTES:
        raise _Malformed(f"message id must be {MIN_ID_BYTES}..{MAX_ID_BYTES} bytes")
    return value


def _check_hops(value: Any) -> int:
    # bool is an int subclass; a peer sending True for a hop count is malformed.
    if type(value) is not int or not 0 <= value <= MAX_HOPS:
        raise _Malformed(f"hops must be an int in 0..{MAX_HOPS}")
    return value


def _check_list(value: Any, name: str, minimum: int) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Malformed(f"{name} must be a list")
    if not minimum <= len(value) <= MAX_IDS_PER_MESSAGE:
        raise _Malformed(f"{name} must hold {minimum}..{MAX_IDS_PER_MESSAGE} entries")
    return value


def _check_keys(message: dict[Any, Any], keys: frozenset[str], kind: str) -> None:
    if message.keys() != keys:
        raise _Malformed(f"{kind} must have exactly the keys {sorted(keys)}")


class Broadcast:
    """The Plumtree broadcast state of one node; feed it events, drain its outbox and events."""

    def __init__(self, me: NodeId, rng: random.Random,
                 validate: Callable[[bytes, Any], bool | None] = lambda mid, payload: True,
                 config: BroadcastConfig = BroadcastConfig()) -> None:
        """Start with no neighbours; `validate(msg_id, payload)` vets every received payload:
        True accepts it; None means genuine but superseded (an honest peer may pass on an old
        version that a newer one overtook), so it is remembered as seen and neither delivered
        nor passed on, and nobody is blamed; False or an exception rejects it and reports the
        sender."""
        self.me = me
        self.config = config
        self.stats = BroadcastStats()
        self._rng = rng
        self._validate = validate
        # Insertion-ordered dicts as sets: membership is O(1) and any iteration is sorted
        # explicitly, so hash randomisation never reaches the outputs.
        self._neighbors: dict[NodeId, None] = {}
        self._eager: dict[NodeId, None] = {}
        self._lazy: dict[NodeId, None] = {}
        # Insertion order is arrival order, so the oldest entry is always first to expire.
        self._seen: OrderedDict[bytes, _Seen] = OrderedDict()
        self._payloads: OrderedDict[bytes, Any] = OrderedDict()
        self._missing: dict[bytes, _Missing] = {}
        self._max_missing = min(MAX_PENDING_GRAFTS, config.max_seen)
        # Graft timers: (deadline, timer number, id); entries whose number no longer matches
        # the id's _Missing are stale and skipped, which makes cancelling O(1).
        self._timers: list[tuple[float, int, bytes]] = []
        self._timer_seq = 0
        self._rejected: OrderedDict[tuple[bytes, NodeId], None] = OrderedDict()
        self._ihave_pending: dict[NodeId, dict[bytes, int]] = {}
        self._ihave_due: dict[NodeId, float] = {}
        # The outbox keyed by sequence number, so the oldest lazy message can be dropped
        # first without scanning.
        self._outbox: dict[int, tuple[NodeId, dict[str, Any]]] = {}
        self._outbox_lazy: deque[int] = deque()
        self._outbox_seq = 0
        self._events: list[Delivered | Misbehaved] = []

    # -----------------------------------------------------------------------------------------
    # Public steps

    @property
    def eager_peers(self) -> tuple[NodeId, ...]:
        """The neighbours that get whole messages at once (tree links), sorted."""
        return tuple(sorted(self._eager))

    @property
    def lazy_peers(self) -> tuple[NodeId, ...]:
        """The neighbours that get only IHAVE announcements, sorted."""
        return tuple(sorted(self._lazy))

    def has_seen(self, msg_id: bytes) -> bool:
        """Whether `msg_id` was delivered here and is still remembered."""
        return msg_id in self._seen

    def neighbor_up(self, peer: NodeId, now: float) -> None:
        """A new neighbour; it starts eager, as the paper prescribes."""
        if peer == self.me:
            raise ValueError("a node is not its own neighbour")
        self._expire(now)
        if peer not in self._neighbors:
            self._neighbors[peer] = None
            self._eager[peer] = None
        self._check_invariants()

    def neighbor_down(self, peer: NodeId, now: float) -> None:
        """A neighbour is gone: forget its links, and stop waiting on grafts sent to it."""
        self._expire(now)
        if peer in self._neighbors:
            del self._neighbors[peer]
            self._eager.pop(peer, None)
            self._lazy.pop(peer, None)
            self._ihave_pending.pop(peer, None)
            self._ihave_due.pop(peer, None)
            for msg_id, missing in self._missing.items():
                if peer in missing.announcers:
                    missing.announcers = deque(a for a in missing.announcers if a != peer)
                if missing.grafted_to == peer:
                    # The graft went to a peer that can no longer answer: try the next
                    # announcer at the next tick instead of waiting out the retry timer.
                    missing.grafted_to = None
                    self._arm(msg_id, missing, now)
        self._check_invariants()

    def broadcast(self, msg_id: bytes, payload: Any, now: float) -> None:
        """Originate a message: deliver it here (as an event) and push it to the tree."""
        try:
            _check_id(msg_id)
        except _Malformed as exc:
            raise ValueError(str(exc)) from None
        self._expire(now)
        if msg_id in self._seen:
            raise ValueError("message id already seen")
        self._accept(msg_id, payload, None, 0, now)
        self._check_invariants()

    def receive(self, sender: NodeId, message: Any, now: float) -> None:
        """Handle one message from `sender`; malformed input yields Misbehaved, never raises."""
        self._expire(now)
        try:
            self._receive(sender, message, now)
        except _Malformed as exc:
            self.stats.invalid += 1
            self._events.append(Misbehaved(sender, str(exc)))
        self._check_invariants()

    def tick(self, now: float) -> None:
        """Fire every timer due at `now`: IHAVE batches, graft timers, expiry."""
        self._expire(now)
        for peer in sorted(p for p, due in self._ihave_due.items() if due <= now):
            self._flush_ihave(peer)
        grafts: dict[NodeId, list[bytes]] = {}
        while self._timers and self._timers[0][0] <= now:
            _, timer, msg_id = heapq.heappop(self._timers)
            missing = self._missing.get(msg_id)
            if missing is None or missing.timer != timer:
                continue
            if not missing.announcers or missing.attempts >= MAX_GRAFT_ATTEMPTS:
                del self._missing[msg_id]
                continue
            peer = missing.announcers.popleft()
            # Back of the queue rather than gone: if every announcer's answer is lost, the
            # next round asks them again (the paper tries each once, over a reliable link).
            missing.announcers.append(peer)
            missing.attempts += 1
            # The graft makes this link part of the tree again, as in the paper.
            self._make_eager(peer)
            grafts.setdefault(peer, []).append(msg_id)
            missing.grafted_to = peer
            self._arm(msg_id, missing, now + self.config.graft_retry_s)
        for peer, ids in grafts.items():
            for start in range(0, len(ids), MAX_IDS_PER_MESSAGE):
                self._send_graft(peer, ids[start:start + MAX_IDS_PER_MESSAGE])
        self._compact_timers()
        self._check_invariants()

    def next_deadline(self) -> float | None:
        """The earliest time at which `tick` has work to do, or None if none is pending."""
        while self._timers:
            _, timer, msg_id = self._timers[0]
            missing = self._missing.get(msg_id)
            if missing is not None and missing.timer == timer:
                break
            heapq.heappop(self._timers)
        candidates: list[float] = list(self._ihave_due.values())
        if self._timers:
            candidates.append(self._timers[0][0])
        if self._seen:
            candidates.append(next(iter(self._seen.values())).at + self.config.seen_ttl_s)
        return min(candidates) if candidates else None

    def take_outbox(self) -> list[tuple[NodeId, dict[str, Any]]]:
        """The messages to send, oldest first, as (peer, msgpack-able map); clears the outbox."""
        out = list(self._outbox.values())
        self._outbox.clear()
        self._outbox_lazy.clear()
        return out

    def take_events(self) -> list[Delivered | Misbehaved]:
        """Deliveries and complaints since the last call, in order; clears them."""
        # Taking output changes no state an invariant covers, so it is not checked here.
        out = self._events
        self._events = []
        return out

    # -----------------------------------------------------------------------------------------
    # Incoming messages

    def _receive(self, sender: NodeId, message: Any, now: float) -> None:
        if not isinstance(message, dict):
            raise _Malformed("message must be a map")
        kind = message.get("k")
        if kind == "gossip":
            _check_keys(message, _GOSSIP_KEYS, "gossip")
            msg_id = _check_id(message["id"])
            hops = _check_hops(message["h"])
            self._on_gossip(sender, msg_id, message["p"], hops, now)
        elif kind == "ihave":
            _check_keys(message, _IDS_KEYS, "ihave")
            entries = _check_list(message["ids"], "ihave ids", 1)
            announced: list[tuple[bytes, int]] = []
            for entry in entries:
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise _Malformed("ihave entry must be [id, hops]")
                announced.append((_check_id(entry[0]), _check_hops(entry[1])))
            if sender in self._neighbors:
                self._on_ihave(sender, announced, now)
        elif kind == "graft":
            _check_keys(message, _IDS_KEYS, "graft")
            ids = [_check_id(m) for m in _check_list(message["ids"], "graft ids", 0)]
            if sender in self._neighbors:
                self._on_graft(sender, ids)
        elif kind == "prune":
            _check_keys(message, _PRUNE_KEYS, "prune")
            if sender in self._neighbors:
                self._make_lazy(sender)
        else:
            raise _Malformed("unknown message kind")

    def _on_gossip(self, sender: NodeId, msg_id: bytes, payload: Any, hops: int,
                   now: float) -> None:
        if msg_id in self._seen:
            self.stats.duplicates += 1
            # A second copy means the link it came on is redundant: take it out of the tree.
            if sender in self._neighbors:
                self._make_lazy(sender)
                self._send(sender, {"k": "prune"}, lazy=False)
                self.stats.prunes_sent += 1
            return
        try:
            verdict = self._validate(msg_id, payload)
            if verdict is None:
                self._remember(msg_id, hops, sender, now)
                return
            valid = bool(verdict)
            reason = "payload failed validation"
        except Exception as exc:  # noqa: BLE001 - a payload must not crash the node
            # A validator that chokes on a peer's payload is that payload's fault; the
            # exception's type still shows in the reason, so a validator bug stays visible.
            valid = False
            reason = f"payload validation raised {type(exc).__name__}"
        if not valid:
            # Not remembered as seen, since a valid copy under the same id may still come,
            # but not to be fetched from this peer again.
            self._reject(msg_id, sender)
            raise _Malformed(reason)
        self._accept(msg_id, payload, sender, hops, now)

    def _on_ihave(self, sender: NodeId, announced: list[tuple[bytes, int]], now: float) -> None:
        for msg_id, hops in announced:
            seen = self._seen.get(msg_id)
            if seen is not None:
                self._maybe_optimise(sender, msg_id, hops, seen)
                continue
            if (msg_id, sender) in self._rejected:
                continue
            missing = self._missing.get(msg_id)
            if missing is None:
                if len(self._missing) >= self._max_missing:
                    continue  # full: the announcement is dropped; a later one may succeed
                missing = _Missing(deque(), 0.0, 0)
                self._missing[msg_id] = missing
                self._arm(msg_id, missing, now + self.config.ihave_timeout_s)
            if len(missing.announcers) < MAX_ANNOUNCERS_PER_ID and sender not in missing.announcers:
                missing.announcers.append(sender)

    def _maybe_optimise(self, sender: NodeId, msg_id: bytes, hops: int, seen: _Seen) -> None:
        threshold = self.config.optimization_threshold
        parent = seen.parent
        if (threshold <= 0 or parent is None or parent == sender or sender not in self._lazy
                or parent not in self._eager or seen.hops - hops < threshold):
            return
        # Swap the slow eager link for the shortcut. The GRAFT names no message, so the
        # announcer does not resend one we already have.
        self._make_eager(sender)
        self._send_graft(sender, [])
        self._make_lazy(parent)
        self._send(parent, {"k": "prune"}, lazy=False)
        self.stats.prunes_sent += 1
        # Record the shortcut as the parent so that one message swaps at most once per hop gain.
        self._seen[msg_id] = replace(seen, hops=hops, parent=sender)

    def _on_graft(self, sender: NodeId, ids: list[bytes]) -> None:
        self._make_eager(sender)
        for msg_id in ids:
            if msg_id in self._payloads:
                seen = self._seen[msg_id]
                self._send_gossip(sender, msg_id, self._payloads[msg_id], seen.hops + 1)

    # -----------------------------------------------------------------------------------------
    # Helpers

    def _accept(self, msg_id: bytes, payload: Any, sender: NodeId | None, hops: int,
                now: float) -> None:
        """Deliver a first copy, remember it, and pass it on: whole to eager, ids to lazy."""
        self._remember(msg_id, hops, sender, now)
        while len(self._payloads) >= self.config.max_payload_cache:
            self._payloads.popitem(last=False)
        self._payloads[msg_id] = payload
        self._missing.pop(msg_id, None)
        self.stats.delivered += 1
        self._events.append(Delivered(msg_id, payload, sender, hops))
        if sender is not None and sender in self._neighbors:
            self._make_eager(sender)
        forward_hops = min(hops + 1, MAX_HOPS)
        eager = sorted(p for p in self._eager if p != sender)
        # Shuffled (from the seeded rng) so that the order sends leave in, and so which links
        # win the race into the tree, carries no bias towards low node ids.
        self._rng.shuffle(eager)
        for peer in eager:
            self._send_gossip(peer, msg_id, payload, forward_hops)
        # Announced to eager peers too, not only lazy ones as in the paper: if a push is lost
        # (datagrams, or a link that drops), a node whose links are all tree links would
        # otherwise never learn of the message. It costs one batched id per tree link.
        for peer in sorted(p for p in self._neighbors if p != sender):
            self._queue_ihave(peer, msg_id, forward_hops, now)

    def _remember(self, msg_id: bytes, hops: int, sender: NodeId | None, now: float) -> None:
        """Mark an id seen (so no IHAVE fetches it again), within the bound on what is kept."""
        while len(self._seen) >= self.config.max_seen:
            self._forget_oldest()
        self._seen[msg_id] = _Seen(now, hops, sender)
        self._missing.pop(msg_id, None)

    def _queue_ihave(self, peer: NodeId, msg_id: bytes, hops: int, now: float) -> None:
        pending = self._ihave_pending.get(peer)
        if pending is None:
            pending = self._ihave_pending[peer] = {}
            self._ihave_due[peer] = now + self.config.ihave_batch_s
        pending[msg_id] = hops
        if len(pending) >= MAX_IDS_PER_MESSAGE:
            self._flush_ihave(peer)

    def _flush_ihave(self, peer: NodeId) -> None:
        pending = self._ihave_pending.pop(peer, {})
        self._ihave_due.pop(peer, None)
        entries = [[msg_id, hops] for msg_id, hops in pending.items()]
        for start in range(0, len(entries), MAX_IDS_PER_MESSAGE):
            self._send(peer, {"k": "ihave", "ids": entries[start:start + MAX_IDS_PER_MESSAGE]},
                       lazy=True)
            self.stats.ihaves_sent += 1

    def _send_gossip(self, peer: NodeId, msg_id: bytes, payload: Any, hops: int) -> None:
        self._send(peer, {"k": "gossip", "id": msg_id, "p": payload, "h": hops}, lazy=False)
        self.stats.gossip_sent += 1

    def _send_graft(self, peer: NodeId, ids: list[bytes]) -> None:
        self._send(peer, {"k": "graft", "ids": ids}, lazy=False)
        self.stats.grafts_sent += 1

    def _send(self, peer: NodeId, message: dict[str, Any], *, lazy: bool) -> None:
        while len(self._outbox) >= self.config.max_outbox:
            self._drop_one()
        seq = self._outbox_seq
        self._outbox_seq += 1
        self._outbox[seq] = (peer, message)
        if lazy:
            self._outbox_lazy.append(seq)

    def _drop_one(self) -> None:
        """Make room in the outbox: the oldest IHAVE goes first, since GRAFTs can recover it."""
        self.stats.outbox_dropped += 1
        while self._outbox_lazy:
            seq = self._outbox_lazy.popleft()
            if self._outbox.pop(seq, None) is not None:
                return
        del self._outbox[next(iter(self._outbox))]

    def _reject(self, msg_id: bytes, peer: NodeId) -> None:
        # This is the one state change a message that yields Misbehaved makes: it only ever
        # withholds future grafts for this id from this peer.
        self._rejected[(msg_id, peer)] = None
        while len(self._rejected) > MAX_REJECTED:
            self._rejected.popitem(last=False)
        missing = self._missing.get(msg_id)
        if missing is not None and peer in missing.announcers:
            missing.announcers = deque(a for a in missing.announcers if a != peer)

    def _make_eager(self, peer: NodeId) -> None:
        if peer in self._neighbors:
            self._lazy.pop(peer, None)
            self._eager[peer] = None

    def _make_lazy(self, peer: NodeId) -> None:
        if peer in self._neighbors:
            self._eager.pop(peer, None)
            self._lazy[peer] = None

    def _arm(self, msg_id: bytes, missing: _Missing, deadline: float) -> None:
        self._timer_seq += 1
        missing.deadline = deadline
        missing.timer = self._timer_seq
        heapq.heappush(self._timers, (deadline, self._timer_seq, msg_id))

    def _compact_timers(self) -> None:
        # Cancelled timers stay in the heap until popped; rebuild when they dominate it.
        if len(self._timers) > 2 * len(self._missing) + 64:
            self._timers = [(m.deadline, m.timer, msg_id) for msg_id, m in self._missing.items()]
            heapq.heapify(self._timers)

    def _forget_oldest(self) -> None:
        msg_id, _ = self._seen.popitem(last=False)
        self._payloads.pop(msg_id, None)

    def _expire(self, now: float) -> None:
        ttl = self.config.seen_ttl_s
        while self._seen and next(iter(self._seen.values())).at + ttl <= now:
            self._forget_oldest()

    def _check_invariants(self) -> None:
        """Raise AssertionError if the state is inconsistent or over a bound."""
        eager, lazy, neighbors = self._eager.keys(), self._lazy.keys(), self._neighbors.keys()
        if eager & lazy:
            raise AssertionError("a peer is both eager and lazy")
        if (eager | lazy) != neighbors:
            raise AssertionError("eager and lazy peers do not partition the neighbours")
        if self.me in neighbors:
            raise AssertionError("a node is its own neighbour")
        if len(self._seen) > self.config.max_seen:
            raise AssertionError("seen cache over max_seen")
        if len(self._payloads) > self.config.max_payload_cache:
            raise AssertionError("payload cache over max_payload_cache")
        if len(self._payloads) > len(self._seen):
            raise AssertionError("payloads cached for forgotten ids")
        if len(self._rejected) > MAX_REJECTED:
            raise AssertionError("too many rejected ids remembered")
        if len(self._missing) > self._max_missing:
            raise AssertionError("too many missing ids")
        if len(self._outbox) > self.config.max_outbox:
            raise AssertionError("outbox over max_outbox")
        if not self._ihave_pending.keys() <= neighbors:
            raise AssertionError("IHAVEs queued for a non-neighbour")
        if self._ihave_pending.keys() != self._ihave_due.keys():
            raise AssertionError("IHAVE batches and their deadlines disagree")
        if any(len(p) >= MAX_IDS_PER_MESSAGE for p in self._ihave_pending.values()):
            raise AssertionError("an IHAVE batch is over its bound")
