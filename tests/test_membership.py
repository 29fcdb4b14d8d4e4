"""Tests of the membership core (HyParView + SWIM + Lifeguard) on a simulated network.

The network is a priority queue of messages with per-message delays drawn from a seeded
random.Random, optional loss, blocked links (partitions), crashed nodes (which neither send nor
receive) and slow nodes (whose incoming messages wait an extra delay before they are
processed). The clock is moved by hand: the loop delivers whichever comes first, the next
message or the next core deadline, so a minute of protocol time takes milliseconds. Every
message goes through the real wire encoding, so what the core sends is what a peer could
receive.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmnode.identity import NodeId, NodeKey
from hmnode.membership import (
    MAX_GOSSIP_PER_MESSAGE,
    MAX_PEERS_PER_MESSAGE,
    Membership,
    MembershipConfig,
    Misbehaved,
    NeighborDown,
    NeighborUp,
    Peer,
    PeerAlive,
    PeerDead,
    PeerSuspected,
)
from hmnode.transport.wire import Notify, decode_message, encode_message

INF = math.inf


def make_id(seed: int, index: int) -> NodeId:
    """Deterministic node ids, so that a seed reproduces a run exactly."""
    return NodeId(hashlib.sha256(f"membership-test/{seed}/{index}".encode()).digest())


class FakeNet:
    """N membership cores on a simulated network with a hand-moved clock."""

    def __init__(self, seed: int, config: MembershipConfig = MembershipConfig(), *,
                 delay: tuple[float, float] = (0.002, 0.030), loss: float = 0.0,
                 crash_signals: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config
        self.delay = delay
        self.loss = loss
        # Whether sending to a crashed node makes the transport report connection_failed.
        self.crash_signals = crash_signals
        self.now = 0.0
        self.cores: dict[NodeId, Membership] = {}
        self.peers: dict[NodeId, Peer] = {}
        self.crashed: set[NodeId] = set()
        self.slow: dict[NodeId, float] = {}
        self.blocked: Callable[[NodeId, NodeId], bool] = lambda a, b: False
        self.events: list[tuple[float, NodeId, Any]] = []
        self.trace: list[tuple[float, str, str, bytes]] = []
        self.record_trace = False
        self._queue: list[tuple[float, int, str, Any]] = []
        self._timers: list[tuple[float, int, NodeId]] = []
        self._deadline: dict[NodeId, float | None] = {}
        self._count = itertools.count()

    # --- nodes ----------------------------------------------------------------------------

    def add(self, config: MembershipConfig | None = None) -> NodeId:
        index = len(self.cores)
        node_id = make_id(self.seed, index)
        peer = Peer(node_id, f"10.0.{index // 250}.{index % 250 + 1}:4433")
        self.peers[node_id] = peer
        self.cores[node_id] = Membership(peer, random.Random(self.rng.getrandbits(64)),
                                         config or self.config)
        return node_id

    def call(self, node_id: NodeId, action: Callable[[Membership], None]) -> None:
        action(self.cores[node_id])
        self._after(node_id)

    def join(self, node_id: NodeId, contact: NodeId) -> None:
        self.call(node_id, lambda c: c.join(self.peers[contact], self.now))

    def crash(self, node_id: NodeId) -> None:
        self.crashed.add(node_id)

    @property
    def live(self) -> list[NodeId]:
        return [n for n in self.cores if n not in self.crashed]

    # --- the loop -------------------------------------------------------------------------

    def _after(self, node_id: NodeId) -> None:
        core = self.cores[node_id]
        src = self.peers[node_id]
        for event in core.take_events():
            self.events.append((self.now, node_id, event))
        for dst, body in core.take_outbox():
            # The real wire encoding: anything the transport would refuse fails here.
            data = encode_message(Notify("mem", body))
            decoded = decode_message(data).body
            if self.record_trace:
                self.trace.append((self.now, str(node_id), str(dst.node_id), data))
            if node_id in self.crashed:
                continue
            target = self.peers.get(dst.node_id)
            if target is None or dst.addr != target.addr:
                # Nobody there: the transport gives up on the dial.
                self._push(self.now + 0.05, "fail", (node_id, dst.node_id))
                continue
            if dst.node_id in self.crashed:
                if self.crash_signals:
                    self._push(self.now + 0.05, "fail", (node_id, dst.node_id))
                continue
            if self.blocked(node_id, dst.node_id) or (self.loss and self.rng.random() < self.loss):
                continue
            at = self.now + self.rng.uniform(*self.delay) + self.slow.get(dst.node_id, 0.0)
            self._push(at, "msg", (src, dst.node_id, decoded))
        deadline = core.next_deadline()
        if deadline != self._deadline.get(node_id):
            self._deadline[node_id] = deadline
            if deadline is not None:
                heapq.heappush(self._timers, (deadline, next(self._count), node_id))

    def _push(self, at: float, kind: str, item: Any) -> None:
        heapq.heappush(self._queue, (at, next(self._count), kind, item))

    def _next_timer(self) -> float:
        while self._timers:
            at, _, node_id = self._timers[0]
            if self._deadline.get(node_id) == at and node_id not in self.crashed:
                return at
            heapq.heappop(self._timers)
        return INF

    def run(self, duration: float) -> None:
        """Advance the clock by `duration`, delivering messages and ticking cores on time."""
        until = self.now + duration
        while True:
            t_msg = self._queue[0][0] if self._queue else INF
            t_timer = self._next_timer()
            at = min(t_msg, t_timer)
            if at > until:
                break
            self.now = max(self.now, at)
            if t_msg <= t_timer:
                _, _, kind, item = heapq.heappop(self._queue)
                if kind == "msg":
                    src, dst, body = item
                    if dst in self.crashed:
                        continue
                    self.call(dst, lambda c: c.receive(src, body, self.now))
                else:
                    src_id, dst_id = item
                    if src_id not in self.crashed:
                        self.call(src_id, lambda c: c.connection_failed(dst_id, self.now))
            else:
                _, _, node_id = heapq.heappop(self._timers)
                self._deadline[node_id] = None
                self.call(node_id, lambda c: c.tick(self.now))
        self.now = until

    def run_until(self, predicate: Callable[[], bool], limit: float,
                  step: float = 0.5) -> float | None:
        """Run in steps until `predicate()` holds; the virtual time it took, or None."""
        start = self.now
        while self.now - start < limit:
            if predicate():
                return self.now - start
            self.run(step)
        return self.now - start if predicate() else None

    # --- observations ---------------------------------------------------------------------

    def active_ids(self, node_id: NodeId) -> set[NodeId]:
        return {p.node_id for p in self.cores[node_id].active}

    def symmetric(self) -> bool:
        live = set(self.live)
        return all(node_id in self.active_ids(other)
                   for node_id in live for other in self.active_ids(node_id) if other in live)

    def connected(self, among: Iterable[NodeId] | None = None) -> bool:
        """Whether the active-view graph links all live nodes (or all of `among`)."""
        nodes = [n for n in (self.live if among is None else among) if n not in self.crashed]
        if not nodes:
            return True
        inside = set(nodes)
        seen = {nodes[0]}
        frontier = [nodes[0]]
        while frontier:
            node_id = frontier.pop()
            for other in self.active_ids(node_id):
                if other not in seen and other in inside:
                    seen.add(other)
                    frontier.append(other)
        return len(seen) == len(nodes)

    def views_ok(self) -> bool:
        size = self.config.active_size
        return all(1 <= len(self.cores[n].active) <= size for n in self.live)

    def settled(self) -> bool:
        return self.views_ok() and self.symmetric() and self.connected()

    def events_of(self, kind: type,
                  node_id: NodeId | None = None) -> list[tuple[float, NodeId, Any]]:
        return [(t, n, e) for t, n, e in self.events
                if isinstance(e, kind) and (node_id is None or n == node_id)]


def build(n: int, seed: int, config: MembershipConfig = MembershipConfig(), *,
          random_contacts: bool = False, spacing: float = 0.2, **net_args: Any) -> FakeNet:
    """n nodes joining one by one, through node 0 or through a random earlier node."""
    net = FakeNet(seed, config, **net_args)
    first = net.add()
    net.run(0.1)
    for index in range(1, n):
        node_id = net.add()
        earlier = list(net.cores)[:index]
        contact = net.rng.choice(earlier) if random_contacts else first
        net.join(node_id, contact)
        net.run(spacing)
    return net


def fingerprint(core: Membership) -> dict[str, Any]:
    """Everything a core holds, for "nothing changed" comparisons (its rng state included)."""
    state = {k: v for k, v in vars(core).items() if k not in ("rng", "config", "me", "_events")}
    return {**copy.deepcopy(state), "rng": core.rng.getstate()}


def peer_of(seed: int, index: int) -> Peer:
    return Peer(make_id(seed, index), f"192.0.2.{index + 1}:4433")


def wire(message: dict[str, Any]) -> Any:
    """A message as a peer would receive it: through the real encoding."""
    return decode_message(encode_message(Notify("mem", message))).body


def kinds(outbox: list[tuple[Peer, dict]]) -> list[tuple[NodeId, str]]:
    return [(peer.node_id, body["k"]) for peer, body in outbox]


# --- convergence ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, random_contacts", [(10, False), (40, False), (40, True)])
def test_nodes_joining_converge(n: int, random_contacts: bool) -> None:
    net = build(n, seed=n, random_contacts=random_contacts)
    took = net.run_until(net.settled, 30.0)
    assert took is not None, "active views did not settle within 30 s of the last join"
    for node_id in net.live:
        core = net.cores[node_id]
        assert 1 <= len(core.active) <= core.config.active_size
    assert net.symmetric() and net.connected()
    # Joins and shuffles (every ~60 s) fill the passive views: after three rounds each node
    # knows at least half of what it could hold, and on average most of it.
    net.run(180.0)
    assert net.settled()
    cfg = net.config
    room = min(n - 1 - cfg.active_size, cfg.passive_size)
    for node_id in net.live:
        core = net.cores[node_id]
        assert 0 < len(core.passive) <= cfg.passive_size
        assert len(core.active) + len(core.passive) >= min(n - 1, cfg.passive_size) // 2
    assert sum(len(net.cores[x].passive) for x in net.live) >= 0.75 * room * n
    # Nobody was suspected in a loss-free, healthy overlay.
    assert not net.events_of(PeerSuspected) and not net.events_of(PeerDead)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 30), random_contacts=st.booleans(),
       spacing=st.sampled_from([0.0, 0.01, 0.2, 1.0]), loss=st.sampled_from([0.0, 0.02, 0.05]))
def test_random_overlays_settle(seed: int, n: int, random_contacts: bool, spacing: float,
                                loss: float) -> None:
    net = build(n, seed=seed, random_contacts=random_contacts, spacing=spacing, loss=loss)
    # View bounds are the cores' own invariants, checked after every call they get.
    net.run(20.0)
    net.loss = 0.0
    assert net.run_until(net.settled, 90.0) is not None, (
        f"did not settle: sizes {sorted(len(c.active) for c in net.cores.values())}, "
        f"symmetric {net.symmetric()}, connected {net.connected()}")


# --- failure detection ------------------------------------------------------------------------


@pytest.mark.parametrize("transport_signals, bound_s", [(False, 15.0), (True, 6.0)])
def test_crashed_node_is_declared_dead_and_views_repair(transport_signals: bool,
                                                        bound_s: float) -> None:
    net = build(20, seed=7, crash_signals=transport_signals)
    assert net.run_until(net.settled, 30.0) is not None
    victim = max(net.live, key=lambda n: len(net.active_ids(n)))
    neighbours = [n for n in net.live if victim in net.active_ids(n)]
    assert neighbours
    net.crash(victim)
    crashed_at = net.now
    # SWIM's bound: a round over the active view, one protocol period, the suspicion timeout
    # (4 * log10(n) periods); the transport's failure signal cuts it to about one period.
    took = net.run_until(lambda: all(net.cores[n].state(victim) == "dead" for n in neighbours),
                         bound_s, step=0.1)
    assert took is not None, f"not declared dead by all neighbours within {bound_s} s"
    assert net.run_until(net.settled, 20.0) is not None
    for node_id in net.live:
        assert victim not in net.active_ids(node_id)
        assert 1 <= len(net.cores[node_id].active)
    # Those that declared it dead dropped it as a spare too (others learn by gossip, or drop it
    # when it does not answer a NEIGHBOR request).
    for node_id in neighbours:
        assert victim not in {p.node_id for p in net.cores[node_id].passive}
    # Only the crashed node was declared dead, by anyone.
    assert {e.node_id for _, _, e in net.events_of(PeerDead)} == {victim}
    assert all(e.reason == "dead" for t, _, e in net.events_of(NeighborDown)
               if e.peer.node_id == victim and t >= crashed_at)


def slow_node_run(max_local_health: int, slow_delay: float,
                  seed: int = 3) -> tuple[FakeNet, NodeId, list[int]]:
    """Ten healthy nodes, one of which then processes its messages `slow_delay` late."""
    net = build(10, seed=seed, config=MembershipConfig(max_local_health=max_local_health),
                random_contacts=True)
    assert net.run_until(net.settled, 30.0) is not None
    slow = net.live[3]
    net.events.clear()
    net.slow[slow] = slow_delay
    health = []
    for _ in range(120):
        net.run(1.0)
        health.append(net.cores[slow].local_health)
    return net, slow, health


def test_lifeguard_slow_node_does_not_accuse_healthy_peers() -> None:
    # Incoming messages 3x the probe timeout late: every ACK the slow node awaits is late.
    net, slow, health = slow_node_run(max_local_health=8, slow_delay=1.5)
    assert max(health) > 0
    assert not net.events_of(PeerDead), "somebody was declared dead"
    accusations = len(net.events_of(PeerSuspected, slow))
    # Without local health, the same node suspects a healthy peer nearly every period.
    plain, plain_slow, plain_health = slow_node_run(max_local_health=0, slow_delay=1.5)
    assert max(plain_health) == 0
    plain_accusations = len(plain.events_of(PeerSuspected, plain_slow))
    assert plain_accusations >= 30
    assert accusations * 10 <= plain_accusations
    # The others keep the slow node: they do suspect it (its ACKs are late), and it refutes.
    assert net.cores[slow].incarnation > 0
    assert all(net.cores[n].state(slow) != "dead" for n in net.live)
    assert net.cores[slow].active and net.connected()


def test_lifeguard_prevents_false_deaths_from_a_very_slow_node() -> None:
    # So slow (5 s) that its neighbours' refutations arrive after its plain suspicion timeout.
    net, slow, _ = slow_node_run(max_local_health=8, slow_delay=5.0)
    assert not net.events_of(PeerDead, slow), "the slow node declared a healthy peer dead"
    # The slow node itself may be declared dead (it is too slow to answer); nobody else is.
    assert {e.node_id for _, _, e in net.events_of(PeerDead)} <= {slow}
    plain, plain_slow, _ = slow_node_run(max_local_health=0, slow_delay=5.0)
    assert len(plain.events_of(PeerDead, plain_slow)) >= 5


def test_partition_heals() -> None:
    net = build(20, seed=5, random_contacts=True)
    assert net.run_until(net.settled, 30.0) is not None
    left = set(net.live[::2])
    right = set(net.live) - left
    net.blocked = lambda src, dst: (src in left) != (dst in left)
    # Each side declares the other dead and repairs its own overlay. (Slowly: helpers on the
    # far side cannot NACK, so Lifeguard suspects this node is the slow one and waits longer.)
    net.run(120.0)
    assert net.events_of(PeerDead)
    assert net.connected(left) and net.connected(right)
    assert all(net.active_ids(n) <= left for n in left)
    net.blocked = lambda src, dst: False
    # Remembered dead peers are pinged now and then; they refute, and the cut links return.
    took = net.run_until(net.settled, 90.0, step=1.0)
    assert took is not None, "the two sides did not merge again"


def test_suspected_node_refutes_over_the_network() -> None:
    net = build(10, seed=11)
    assert net.run_until(net.settled, 30.0) is not None
    target = net.live[4]
    # Its messages are lost (it still hears others) until a probe of it fails; its first
    # refutation is lost too, so the suspecters learn of it later, from its ACKs and gossip.
    net.blocked = lambda src, dst: src == target
    def suspected() -> bool:
        return any(e.node_id == target for _, n, e in net.events_of(PeerSuspected))

    assert net.run_until(suspected, 10.0, step=0.05) is not None
    net.blocked = lambda src, dst: False
    net.run(20.0)
    assert net.cores[target].incarnation >= 1
    assert any(e.node_id == target for _, _, e in net.events_of(PeerAlive))
    assert not [e for _, _, e in net.events_of(PeerDead) if e.node_id == target]
    # Nobody holds it suspect any more ("unknown": nodes that never heard of it).
    assert {net.cores[n].state(target) for n in net.live} <= {"alive", "unknown"}
    assert all(net.cores[n].state(target) == "alive" for n in net.live
               if target in net.active_ids(n))
    assert net.settled()


def test_refutation_raises_incarnation_and_clears_suspicion() -> None:
    me, other = peer_of(1, 0), peer_of(1, 1)
    a = Membership(me, random.Random(1))
    x = Membership(other, random.Random(2))
    # x hears that a suspects it at incarnation 0, and refutes with 1.
    x.receive(me, wire({"k": "suspect", "id": other.node_id.key, "inc": 0, "i": 0}), 0.0)
    assert x.incarnation == 1 and x.local_health == 1
    out = x.take_outbox()
    assert (me.node_id, "alive") in kinds(out)
    alive = next(body for peer, body in out if body["k"] == "alive")
    assert alive["inc"] == 1 and alive["id"] == other.node_id.key
    # A stale verdict (incarnation below the current one) does not raise it again.
    x.receive(me, wire({"k": "suspect", "id": other.node_id.key, "inc": 0, "i": 0}), 0.1)
    assert x.incarnation == 1
    # a has x as neighbour and suspects it after a connection failure ...
    a.receive(other, wire({"k": "neighbor", "prio": "high", "i": 0}), 0.0)
    a.connection_failed(other.node_id, 0.5)
    assert a.state(other.node_id) == "suspect"
    assert PeerSuspected(other.node_id) in a.take_events()
    # ... and x's refutation makes it alive again.
    a.receive(other, wire(alive), 0.6)
    assert a.state(other.node_id) == "alive"
    assert PeerAlive(other.node_id) in a.take_events()
    assert other in a.active


def test_dead_node_that_comes_back_is_told_and_refutes() -> None:
    me, other = peer_of(2, 0), peer_of(2, 1)
    a = Membership(me, random.Random(1))
    a.receive(other, wire({"k": "neighbor", "prio": "high", "i": 0}), 0.0)
    a.receive(peer_of(2, 2), wire({"k": "dead", "id": other.node_id.key, "inc": 0, "i": 0}), 1.0)
    assert a.state(other.node_id) == "dead" and not a.active
    a.take_outbox()
    # It restarts (incarnation 0) and asks to join: refused, and told its verdict.
    a.receive(other, wire({"k": "join", "i": 0}), 2.0)
    out = a.take_outbox()
    assert (other.node_id, "dead") in kinds(out)
    assert any(body == {**body, "k": "neighbor_reply", "accept": False} for _, body in out)
    # Its refutation (incarnation 1) brings it back, and the next JOIN is taken.
    a.receive(other, wire({"k": "alive", "id": other.node_id.key, "inc": 1, "i": 1}), 2.1)
    assert a.state(other.node_id) == "alive"
    a.receive(other, wire({"k": "join", "i": 1}), 2.2)
    assert other in a.active


# --- the probe protocol -----------------------------------------------------------------------


def neighbours_of(core: Membership, peers: Iterable[Peer], now: float = 0.0) -> None:
    for peer in peers:
        core.receive(peer, wire({"k": "neighbor", "prio": "high", "i": 0}), now)
    core.take_outbox()
    core.take_events()


def test_ping_is_answered_with_neighbourship() -> None:
    me, friend, stranger = peer_of(3, 0), peer_of(3, 1), peer_of(3, 2)
    core = Membership(me, random.Random(1))
    neighbours_of(core, [friend])
    core.receive(friend, wire({"k": "ping", "seq": 7, "i": 0}), 1.0)
    core.receive(stranger, wire({"k": "ping", "seq": 8, "i": 0}), 1.0)
    out = core.take_outbox()
    assert [(p.node_id, b["k"], b["seq"], b["nb"]) for p, b in out] == [
        (friend.node_id, "ack", 7, True), (stranger.node_id, "ack", 8, False)]


def test_ack_saying_not_a_neighbour_drops_the_link() -> None:
    me, b, c = peer_of(4, 0), peer_of(4, 1), peer_of(4, 2)
    core = Membership(me, random.Random(1))
    neighbours_of(core, [b, c])
    # Drive the probe until it targets b; c answers its probes normally.
    now = 0.0
    for _ in range(10):
        now += 1.0
        core.tick(now)
        pings = [(p, body) for p, body in core.take_outbox() if body["k"] == "ping"]
        if pings and pings[0][0] == b:
            break
        for p, body in pings:
            core.receive(p, wire({"k": "ack", "seq": body["seq"], "nb": True, "i": 0}), now)
    else:
        pytest.fail("b was never probed")
    core.receive(b, wire({"k": "ack", "seq": pings[0][1]["seq"], "nb": False, "i": 0}), now)
    assert b not in core.active and b in core.passive
    assert NeighborDown(b, "not a neighbour") in core.take_events()


def test_indirect_probe_relays_ack_and_nacks_on_timeout() -> None:
    helper, requester, target = peer_of(5, 0), peer_of(5, 1), peer_of(5, 2)
    core = Membership(helper, random.Random(1))
    core.receive(requester, wire({"k": "ping_req", "seq": 40, "id": target.node_id.key,
                                  "addr": target.addr, "i": 0}), 10.0)
    [(dst, ping)] = core.take_outbox()
    assert dst == target and ping["k"] == "ping"
    core.receive(target, wire({"k": "ack", "seq": ping["seq"], "nb": False, "i": 0}), 10.1)
    assert [(p.node_id, b["k"], b["seq"]) for p, b in core.take_outbox()] == [
        (requester.node_id, "ack", 40)]
    # A second request whose target stays silent gets a NACK before the requester's period ends.
    core.receive(requester, wire({"k": "ping_req", "seq": 41, "id": target.node_id.key,
                                  "addr": target.addr, "i": 0}), 20.0)
    core.take_outbox()
    deadline = core.next_deadline()
    assert deadline is not None and 20.0 < deadline < 20.5
    core.tick(deadline)
    assert [(p.node_id, b["k"], b["seq"]) for p, b in core.take_outbox()] == [
        (requester.node_id, "nack", 41)]


def test_failed_probe_suspects_and_missing_nacks_raise_local_health() -> None:
    me = peer_of(6, 0)
    others = [peer_of(6, i) for i in range(1, 5)]
    core = Membership(me, random.Random(1))
    neighbours_of(core, others)
    now = 0.0
    while True:  # first probe: nobody answers anything
        deadline = core.next_deadline()
        assert deadline is not None
        now = deadline
        core.tick(now)
        out = core.take_outbox()
        if any(b["k"] == "ping" for _, b in out):
            break
    target = next(p for p, b in out if b["k"] == "ping")
    core.tick(now + 0.5)
    helpers = [p for p, b in core.take_outbox() if b["k"] == "ping_req"]
    assert len(helpers) == 3 and target not in helpers
    core.tick(now + 1.0)
    assert core.state(target.node_id) == "suspect"
    assert core.local_health == 3  # three helpers, neither ACK nor NACK from any
    assert PeerSuspected(target.node_id) in core.take_events()
    # Suspicion is sent to the suspect at once (so that it can refute).
    assert (target.node_id, "suspect") in kinds(core.take_outbox())


def test_connection_failure_of_a_neighbour_is_confirmed_by_a_probe() -> None:
    me = peer_of(7, 0)
    others = [peer_of(7, i) for i in range(1, 4)]
    core = Membership(me, random.Random(1))
    neighbours_of(core, others)
    core.tick(0.0)
    core.take_outbox()
    victim = others[1]
    core.connection_failed(victim.node_id, 5.0)
    assert core.state(victim.node_id) == "suspect"
    # It is probed next; helpers NACK; at the end of the period it is dead, not merely suspect.
    now = 5.0
    for _ in range(20):
        deadline = core.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        core.tick(now)
        for peer, body in core.take_outbox():
            if body["k"] == "ping" and peer != victim:
                core.receive(peer, wire({"k": "ack", "seq": body["seq"], "nb": True, "i": 0}), now)
            elif body["k"] == "ping_req":
                core.receive(peer, wire({"k": "nack", "seq": body["seq"], "i": 0}), now)
        if core.state(victim.node_id) == "dead":
            break
    assert core.state(victim.node_id) == "dead"
    assert now - 5.0 <= 2.5, "the transport's signal should make detection about one period"
    assert victim not in core.active and core.local_health == 0


# --- view maintenance ------------------------------------------------------------------------


def test_connection_failed_on_a_neighbor_request_tries_another_passive_peer() -> None:
    me = peer_of(8, 0)
    spares = [peer_of(8, i) for i in range(1, 8)]
    core = Membership(me, random.Random(1))
    core.add_passive(spares, 0.0)
    asked = [p for p, b in core.take_outbox() if b["k"] == "neighbor"]
    # An isolated node asks as many as it has room for, with high priority.
    assert len(asked) == core.config.active_size
    failed = asked[0]
    core.connection_failed(failed.node_id, 0.1)
    again = core.take_outbox()
    assert len(again) == 1 and again[0][1]["k"] == "neighbor" and again[0][1]["prio"] == "high"
    assert again[0][0] in spares and again[0][0] not in asked
    assert failed not in core.passive
    # An accept makes the link; a reject leaves the peer a spare.
    core.receive(again[0][0], wire({"k": "neighbor_reply", "accept": True, "i": 0}), 0.2)
    assert again[0][0] in core.active
    assert NeighborUp(again[0][0]) in core.take_events()


def test_connection_failed_on_join_tries_a_passive_peer() -> None:
    me, contact, spare = peer_of(9, 0), peer_of(9, 1), peer_of(9, 2)
    core = Membership(me, random.Random(1), MembershipConfig(active_size=1))
    core.add_passive([spare], 0.0)
    core.take_outbox()  # it asked the spare already (room for one)
    core.connection_failed(spare.node_id, 0.1)
    core.join(contact, 0.2)
    assert kinds(core.take_outbox()) == [(contact.node_id, "join")]
    core.add_passive([spare], 0.3)
    core.take_outbox()
    core.connection_failed(contact.node_id, 0.4)
    assert kinds(core.take_outbox()) == [(spare.node_id, "neighbor")]


def test_low_priority_request_is_refused_by_a_full_node() -> None:
    me = peer_of(10, 0)
    core = Membership(me, random.Random(1), MembershipConfig(active_size=2))
    neighbours_of(core, [peer_of(10, 1), peer_of(10, 2)])
    asker = peer_of(10, 3)
    core.receive(asker, wire({"k": "neighbor", "prio": "low", "i": 0}), 1.0)
    [(dst, reply)] = core.take_outbox()
    assert dst == asker and reply["k"] == "neighbor_reply" and reply["accept"] is False
    assert asker in core.passive and asker not in core.active
    # High priority is always taken, evicting a random neighbour with DISCONNECT.
    core.receive(asker, wire({"k": "neighbor", "prio": "high", "i": 0}), 2.0)
    out = core.take_outbox()
    assert [b["k"] for _, b in out] == ["disconnect", "neighbor_reply"]
    assert asker in core.active and out[0][0] in core.passive
    events = core.take_events()
    assert NeighborDown(out[0][0], "evicted") in events and NeighborUp(asker) in events


def test_join_forwards_random_walks() -> None:
    me = peer_of(11, 0)
    core = Membership(me, random.Random(1))
    neighbours_of(core, [peer_of(11, i) for i in range(1, 4)])
    newcomer = peer_of(11, 9)
    core.receive(newcomer, wire({"k": "join", "i": 0}), 1.0)
    out = core.take_outbox()
    assert (newcomer.node_id, "neighbor_reply") in kinds(out)
    walks = [b for _, b in out if b["k"] == "forward_join"]
    assert len(walks) == 3 and all(b["ttl"] == core.config.arwl for b in walks)
    assert all(b["id"] == newcomer.node_id.key and b["addr"] == newcomer.addr for b in walks)
    # At ttl 0 the walk ends: the receiver asks the newcomer with high priority.
    other = Membership(peer_of(11, 5), random.Random(2))
    neighbours_of(other, [peer_of(11, 6), peer_of(11, 7)])
    other.receive(peer_of(11, 6), wire({"k": "forward_join", "ttl": 0, "id": newcomer.node_id.key,
                                        "addr": newcomer.addr, "i": 0}), 1.0)
    assert [(p, b["k"], b["prio"]) for p, b in other.take_outbox()] == [
        (newcomer, "neighbor", "high")]
    # At ttl == prwl it keeps the newcomer as a spare and walks on.
    third = Membership(peer_of(11, 8), random.Random(3))
    neighbours_of(third, [peer_of(11, 6), peer_of(11, 7)])
    third.receive(peer_of(11, 6), wire({"k": "forward_join", "ttl": third.config.prwl,
                                        "id": newcomer.node_id.key, "addr": newcomer.addr,
                                        "i": 0}), 1.0)
    assert newcomer in third.passive
    [(dst, body)] = third.take_outbox()
    assert dst == peer_of(11, 7) and body["k"] == "forward_join"
    assert body["ttl"] == third.config.prwl - 1


def test_shuffle_exchanges_passive_samples() -> None:
    cfg = MembershipConfig(shuffle_interval_s=5.0)
    origin = Membership(peer_of(12, 0), random.Random(1), cfg)
    neighbours_of(origin, [peer_of(12, 1)])
    origin.add_passive([peer_of(12, i) for i in range(2, 6)], 0.0)
    origin.take_outbox()
    origin.tick(10.0)
    shuffles = [(p, b) for p, b in origin.take_outbox() if b["k"] == "shuffle"]
    assert len(shuffles) == 1
    dst, body = shuffles[0]
    assert dst == peer_of(12, 1) and body["ttl"] == cfg.shuffle_ttl
    assert body["peers"][0] == [peer_of(12, 0).node_id.key, peer_of(12, 0).addr]
    # The walk ends at a node with a single neighbour, which answers from its passive view.
    end = Membership(peer_of(12, 1), random.Random(2), cfg)
    neighbours_of(end, [peer_of(12, 0)])
    end.add_passive([peer_of(12, i) for i in range(20, 25)], 0.0)
    end.take_outbox()
    end.receive(peer_of(12, 0), wire(body), 10.1)
    [(to, reply)] = [(p, b) for p, b in end.take_outbox() if b["k"] == "shuffle_reply"]
    assert to == peer_of(12, 0) and len(reply["peers"]) == len(body["peers"])
    received = {Peer(NodeId(k), a) for k, a in body["peers"]} - {peer_of(12, 1)}
    assert received - {peer_of(12, 0)} <= set(end.passive)
    origin.receive(peer_of(12, 1), wire(reply), 10.2)
    assert {Peer(NodeId(k), a) for k, a in reply["peers"]} <= set(origin.passive)
    # An unasked-for reply is ignored: it is no way to stuff a passive view.
    before = origin.passive
    origin.receive(peer_of(12, 1), wire({"k": "shuffle_reply", "i": 0,
                                         "peers": [[peer_of(12, 30).node_id.key, "x:1"]]}), 10.3)
    assert origin.passive == before


def test_outbox_is_bounded() -> None:
    core = Membership(peer_of(13, 0), random.Random(1), MembershipConfig(max_outbox=3))
    for i in range(10):
        core.receive(peer_of(13, 1), wire({"k": "ping", "seq": i, "i": 0}), 0.0)
    assert len(core.take_outbox()) == 3 and core.dropped_messages == 7


def test_snapshot_and_initial_state() -> None:
    me = peer_of(14, 0)
    core = Membership(me, random.Random(1))
    assert core.next_deadline() is None
    assert core.snapshot() == {"active": [], "passive": [], "local_health": 0, "incarnation": 0}
    neighbours_of(core, [peer_of(14, 1)])
    core.add_passive([peer_of(14, 2)], 0.0)
    snap = core.snapshot()
    assert snap["active"] == [{"node_id": str(peer_of(14, 1).node_id), "addr": peer_of(14, 1).addr,
                               "state": "alive"}]
    assert [NodeId.parse(row["node_id"]) for row in snap["passive"]] == [peer_of(14, 2).node_id]
    assert core.state(me.node_id) == "alive" and core.state(make_id(14, 99)) == "unknown"
    assert msgpack.unpackb(msgpack.packb(snap)) == snap


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        Membership(peer_of(15, 0), random.Random(1), MembershipConfig(active_size=0))
    with pytest.raises(ValueError):
        Membership(peer_of(15, 0), random.Random(1), MembershipConfig(probe_timeout_s=2.0))
    with pytest.raises(ValueError):
        Membership(Peer(make_id(15, 1), ""), random.Random(1))


# --- malformed input --------------------------------------------------------------------------

ID = make_id(16, 5).key
MALFORMED: list[Any] = [
    None, [], "join", b"\x00", 5,
    {}, {"i": 0}, {"k": "join"}, {"k": "nope", "i": 0}, {"k": 5, "i": 0}, {"k": b"join", "i": 0},
    {"k": "join", "i": True}, {"k": "join", "i": -1}, {"k": "join", "i": 2**64 - 1},
    {"k": "join", "i": 1.0}, {"k": "join", "i": 0, "x": 1},
    {"k": "ping", "i": 0}, {"k": "ping", "i": 0, "seq": "1"}, {"k": "ping", "i": 0, "seq": -5},
    {"k": "ack", "i": 0, "seq": 1, "nb": 1}, {"k": "nack", "i": 0, "seq": None},
    {"k": "neighbor", "i": 0, "prio": "medium"}, {"k": "neighbor", "i": 0, "prio": b"high"},
    {"k": "neighbor_reply", "i": 0, "accept": "yes"},
    {"k": "forward_join", "i": 0, "ttl": 3, "id": ID[:31], "addr": "h:1"},
    {"k": "forward_join", "i": 0, "ttl": 3, "id": ID + b"\x00", "addr": "h:1"},
    {"k": "forward_join", "i": 0, "ttl": 3, "id": ID.hex(), "addr": "h:1"},
    {"k": "forward_join", "i": 0, "ttl": 3, "id": ID, "addr": ""},
    {"k": "forward_join", "i": 0, "ttl": 3, "id": ID, "addr": "h" * 1000},
    {"k": "forward_join", "i": 0, "ttl": 99, "id": ID, "addr": "h:1"},
    {"k": "forward_join", "i": 0, "ttl": -1, "id": ID, "addr": "h:1"},
    {"k": "forward_join", "i": 0, "ttl": 3, "id": ID},
    {"k": "ping_req", "i": 0, "seq": 1, "id": ID[:31], "addr": "h:1"},
    {"k": "shuffle", "i": 0, "ttl": 2, "id": ID, "addr": "h:1", "peers": {}},
    {"k": "shuffle", "i": 0, "ttl": 2, "id": ID, "addr": "h:1",
     "peers": [[make_id(16, i).key, "h:1"] for i in range(MAX_PEERS_PER_MESSAGE + 1)]},
    {"k": "shuffle", "i": 0, "ttl": 2, "id": ID, "addr": "h:1", "peers": [[ID, "h:1", 3]]},
    {"k": "shuffle", "i": 0, "ttl": 2, "id": ID, "addr": "h:1", "peers": [[ID[:31], "h:1"]]},
    {"k": "shuffle_reply", "i": 0, "peers": [[ID, 7]]},
    {"k": "shuffle_reply", "i": 0, "peers": [[ID, "h:1"]] * 10_000},
    {"k": "suspect", "i": 0, "id": ID[:31], "inc": 0},
    {"k": "dead", "i": 0, "id": ID, "inc": -1}, {"k": "alive", "i": 0, "id": ID, "inc": 2**62},
    {"k": "ping", "i": 0, "seq": 1, "g": {}},
    {"k": "ping", "i": 0, "seq": 1, "g": [["dead", ID, 0]] * (MAX_GOSSIP_PER_MESSAGE + 1)},
    {"k": "ping", "i": 0, "seq": 1, "g": [["zombie", ID, 0]]},
    {"k": "ping", "i": 0, "seq": 1, "g": [["dead", ID[:31], 0]]},
    {"k": "ping", "i": 0, "seq": 1, "g": [["dead", ID, 0.5]]},
    {"k": "ping", "i": 0, "seq": 1, "g": [["dead", ID]]},
    {"k": "ping", "i": 0, "seq": 1, "g": [["dead", ID, 0], "junk"]},
]


def busy_core() -> tuple[Membership, list[Peer]]:
    """A core with neighbours, spares, a probe in flight and a suspect."""
    peers = [peer_of(16, i) for i in range(1, 9)]
    core = Membership(peer_of(16, 0), random.Random(5))
    neighbours_of(core, peers[:4])
    core.add_passive(peers[4:], 0.0)
    core.tick(1.0)
    core.connection_failed(peers[0].node_id, 1.5)
    core.take_outbox()
    core.take_events()
    return core, peers


@pytest.mark.parametrize("message", MALFORMED, ids=lambda m: _short_id(m))
def test_malformed_message_is_reported_and_changes_nothing(message: Any) -> None:
    core, peers = busy_core()
    before = fingerprint(core)
    core.receive(peers[1], message, 2.0)
    [event] = core.take_events()
    assert isinstance(event, Misbehaved) and event.node_id == peers[1].node_id and event.reason
    assert core.take_outbox() == []
    assert fingerprint(core) == before


def _short_id(message: Any) -> str:
    text = repr(message)
    return text if len(text) < 50 else text[:47] + "..."


def test_message_from_own_id_is_misbehaviour() -> None:
    core, _ = busy_core()
    before = fingerprint(core)
    core.receive(Peer(core.me.node_id, "198.51.100.1:1"), {"k": "ping", "seq": 1, "i": 0}, 2.0)
    [event] = core.take_events()
    assert isinstance(event, Misbehaved)
    assert fingerprint(core) == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=40) | st.sampled_from([ID, ID[:31], "h:1"]),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=12)
message_keys = st.sampled_from(["k", "i", "g", "seq", "nb", "id", "addr", "ttl", "peers", "prio",
                                "accept", "inc", "x"])
kinds_st = st.sampled_from(["join", "forward_join", "neighbor", "neighbor_reply", "disconnect",
                            "shuffle", "shuffle_reply", "ping", "ack", "ping_req", "nack",
                            "suspect", "alive", "dead", "other"])


@settings(max_examples=300, deadline=None)
@given(kind=kinds_st, fields=st.dictionaries(message_keys, json_values, max_size=6))
def test_fuzzed_messages_never_raise(kind: str, fields: dict[str, Any]) -> None:
    core, peers = busy_core()
    before = fingerprint(core)
    core.receive(peers[2], {"k": kind, **fields}, 2.0)
    events = core.take_events()
    if any(isinstance(e, Misbehaved) for e in events):
        assert len(events) == 1 and core.take_outbox() == []
        assert fingerprint(core) == before
    for peer, body in core.take_outbox():  # whatever it answered is valid on the wire
        wire(body)


# --- determinism ------------------------------------------------------------------------------


def scripted_run(seed: int) -> tuple[list, list]:
    net = build(15, seed=seed, random_contacts=True, loss=0.02)
    net.record_trace = True
    net.run(30.0)
    net.crash(net.live[5])
    net.slow[net.live[2]] = 1.0
    net.run(30.0)
    events = [(t, str(n), repr(e)) for t, n, e in net.events]
    return net.trace, events


def test_same_seed_same_outputs() -> None:
    first = scripted_run(21)
    second = scripted_run(21)
    assert first[0] and first[1]
    assert first == second
    assert scripted_run(22)[0] != first[0]


def test_fresh_keys_work_too() -> None:
    """Real node keys, not the test's derived ids: the core only needs NodeId's ordering."""
    peers = [Peer(NodeKey.generate().node_id, f"203.0.113.{i}:4433") for i in range(1, 4)]
    cores = {p.node_id: Membership(p, random.Random(i)) for i, p in enumerate(peers)}
    cores[peers[1].node_id].join(peers[0], 0.0)
    cores[peers[2].node_id].join(peers[0], 0.0)
    queue = [(peers[1], cores[peers[1].node_id].take_outbox()),
             (peers[2], cores[peers[2].node_id].take_outbox())]
    for _ in range(50):
        if not queue:
            break
        src, out = queue.pop(0)
        for dst, body in out:
            cores[dst.node_id].receive(src, wire(body), 0.1)
            queue.append((dst, cores[dst.node_id].take_outbox()))
    for p in peers:
        others = {q.node_id for q in peers} - {p.node_id}
        assert {q.node_id for q in cores[p.node_id].active} == others
