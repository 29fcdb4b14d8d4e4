"""The `gossip` scenario: a mesh of simulated nodes, each running the real membership and
broadcast cores and an advert store wired as the asyncio driver (`hmnode.mesh`) wires them,
under faults that the seed picks; then checkers that say whether the mesh kept its promises.

Phases: nodes join one by one through random earlier nodes and publish an advert; a faulty
phase (loss, duplication, corruption, reordering, a partition, a crash and restart, a pause:
which of them and how hard comes from the seed); heal; a quiet phase. Checkers:

- convergence: after the quiet phase every live node holds every live node's newest advert;
- no_forgery: no honest store ever holds an advert its owner did not sign, nor goes back to
  an older sequence number (a malicious node keeps injecting both);
- view_bounds: active and passive views stay within their configured sizes;
- bounded_queues: the cores' outboxes and the network's inbound queues stay bounded and every
  pump settles;
- no_crash: no core raised on any input, corrupted frames included.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Hashable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import nacl.signing

from hmnode.adverts import DIGEST_BUCKETS, Advert, AdvertRejected, AdvertStore, make_advert
from hmnode.broadcast import Broadcast, BroadcastConfig, Delivered
from hmnode.broadcast import Misbehaved as BroadcastMisbehaved
from hmnode.identity import NodeId, NodeKey
from hmnode.membership import Membership, MembershipConfig, NeighborDown, NeighborUp, Peer
from hmnode.membership import Misbehaved as MembershipMisbehaved

from .clock import VirtualClock
from .network import NetParams, SimNetwork

MEMBERSHIP_TOPIC = "mem"
BROADCAST_TOPIC = "bc"
SYNC_TOPIC = "sync"
SYNC_ANSWER_TOPIC = "sync-ans"
MAX_SYNC_ADVERTS = 256
MAX_PUMP_ROUNDS = 100
MIN_TIMER_STEP_S = 0.001  # a core asking to be ticked "now" again still lets time advance
REJOIN_CHECK_S = 10.0
CHECKERS = ("convergence", "no_forgery", "view_bounds", "bounded_queues", "no_crash")
PARTITIONS = ("none", "isolate", "split", "bridge", "asym")
CALM = NetParams()


@dataclass(frozen=True)
class SimSettings:
    """Cadences of the simulated driver and the knobs tests use to break it on purpose."""

    anti_entropy_s: float = 2.0
    check_every_s: float = 1.0
    join_every_s: float = 0.2
    publish_delay_s: float = 1.0
    # The bound on healing: membership retries peers it declared dead, and a node knowing
    # nobody beyond its neighbours asks a contact again, every 30 probe intervals (30 s by
    # default), so two halves that forgot each other during a partition may take that long
    # to find each other again; the quiet phase must outlast it, plus a few sync rounds.
    min_quiet_s: float = 40.0
    quiet_fraction: float = 0.35
    forgeries: bool = True
    forge_every_s: float = 3.0
    # Accept every payload and every advert unchecked: a broken node for testing the checkers.
    gullible: bool = False
    # Off: a driver that forgets to store delivered adverts and never syncs (also for tests).
    store_deliveries: bool = True
    anti_entropy: bool = True
    advert_ttl_s: float = 600.0
    membership: MembershipConfig = MembershipConfig()
    broadcast: BroadcastConfig = BroadcastConfig()


@dataclass(frozen=True)
class FaultPlan:
    """Which faults strike in the faulty phase, when, and how hard (all picked by the seed)."""

    loss: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    latency_extra_s: float = CALM.latency_extra_s
    partition: str = "none"
    partition_nodes: tuple[int, ...] = ()
    partition_at: float = 0.0
    partition_s: float = 0.0
    crash_node: int | None = None
    crash_at: float = 0.0
    down_s: float = 0.0
    pause_node: int | None = None
    pause_at: float = 0.0
    pause_s: float = 0.0

    @classmethod
    def pick(cls, rng: Random, honest: int, start: float, end: float) -> "FaultPlan":
        """Draw a plan for nodes 0..honest-1 within the window [start, end)."""
        span = end - start
        if span < 2.0 or honest < 3:
            return cls()

        def when(length: float) -> float:
            return start + rng.uniform(0.0, max(0.0, span - length))

        plan: dict[str, Any] = {}
        if rng.random() < 0.6:
            plan["loss"] = rng.uniform(0.0, 0.10)
        if rng.random() < 0.4:
            plan["duplicate"] = rng.uniform(0.0, 0.10)
        if rng.random() < 0.4:
            plan["corrupt"] = rng.uniform(0.0, 0.05)
        if rng.random() < 0.5:
            plan["latency_extra_s"] = rng.uniform(0.01, 0.25)
        kind = rng.choice(PARTITIONS)
        if kind != "none":
            length = rng.uniform(1.0, min(15.0, span))
            count = 1 if kind == "isolate" else rng.randint(1, max(1, honest // 2))
            nodes = tuple(sorted(rng.sample(range(honest), count)))
            plan.update(partition=kind, partition_nodes=nodes, partition_at=when(length),
                        partition_s=length)
        if rng.random() < 0.6:
            down = rng.uniform(0.5, min(10.0, span / 2))
            plan.update(crash_node=rng.randrange(honest), crash_at=when(down), down_s=down)
        if rng.random() < 0.5:
            pause = rng.uniform(0.2, min(5.0, span / 2))
            plan.update(pause_node=rng.randrange(honest), pause_at=when(pause), pause_s=pause)
        return cls(**plan)

    def describe(self) -> dict[str, Any]:
        """The plan as a JSON-able map, rounded for reading."""
        return {k: (round(v, 3) if isinstance(v, float) else (list(v) if isinstance(v, tuple) else v))
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Result:
    """The outcome of one run: `verdicts` maps each checker to True or what went wrong."""

    scenario: str
    nodes: int
    seed: int
    duration: float
    trace_hash: str
    ok: bool
    verdicts: dict[str, bool | str]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def reproduce(self) -> str:
        """The command that replays this run exactly."""
        return reproduce_command(self.nodes, self.seed, self.duration)

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-able map."""
        out: dict[str, Any] = {"scenario": self.scenario, "nodes": self.nodes, "seed": self.seed,
                               "duration": self.duration, "trace_hash": self.trace_hash,
                               "ok": self.ok, "verdicts": self.verdicts, "stats": self.stats}
        if not self.ok:
            out["reproduce"] = self.reproduce
        return out


def reproduce_command(nodes: int, seed: int, duration: float) -> str:
    """The CLI command that replays a gossip run."""
    return f"hmnode simnet sim --scenario gossip --nodes {nodes} --seed {seed} --duration {duration:g}"


class _GullibleStore(AdvertStore):
    """A store that checks nothing: only for showing that the checkers catch a broken node."""

    def check(self, advert: Advert, now: float) -> None:
        return None


class _Node:
    """One simulated node: the cores, its advert store, and what it keeps on 'disk'."""

    def __init__(self, sim: "_GossipSim", index: int, key: NodeKey, malicious: bool) -> None:
        self.sim = sim
        self.index = index
        self.name = f"n{index:03d}"
        self.key = key
        self.id = key.node_id
        self.peer = Peer(self.id, f"10.{index // 250}.{index % 250}.1:7000")
        self.malicious = malicious
        # Durable state, kept across a crash: the advert sequence and the peers it knew.
        self.seq = 0
        self.known: list[Peer] = []
        self.kept_adverts: list[Advert] = []
        self.contact: Peer | None = None
        self.life = 0
        self.up = False
        self._timer_at: float | None = None
        self.membership: Membership
        self.broadcast: Broadcast
        self.store: AdvertStore
        # What a malicious node saw, to replay later.
        self.seen_adverts: list[Advert] = []

    # --- life -------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start with fresh cores (the first time, or after a crash)."""
        s = self.sim.settings
        self.life += 1
        self.up = True
        self._timer_at = None
        self.store = _GullibleStore() if s.gullible else AdvertStore()
        self.membership = Membership(self.peer, self.sim.rng, s.membership)
        self.broadcast = Broadcast(self.id, self.sim.rng, validate=self._valid, config=s.broadcast)
        if self.life == 1:
            self.sim.net.attach(self.id, self.name, self._on_frame, self._on_unreachable)
        else:
            self.sim.net.restart(self.id, self._on_frame, self._on_unreachable)
        self._every(s.anti_entropy_s, self._anti_entropy)
        self._every(REJOIN_CHECK_S, self._keep_joined)

    def crash(self) -> None:
        """Lose everything but the durable state; the network drops what is in flight."""
        self.known = [*self.membership.active, *self.membership.passive]
        self.kept_adverts = self.store.all()
        self.up = False
        self.sim.net.crash(self.id)

    def restart(self) -> None:
        """Come back with fresh cores, the adverts kept on disk, and rejoining through the
        peers remembered (as `Mesh.load`)."""
        self.boot()
        for advert in self.kept_adverts:
            try:
                self.store.offer(advert, self.sim.now)
            except AdvertRejected:
                pass  # expired while down
        if self.known:
            self._guard(lambda: self.membership.add_passive(self.known, self.sim.now))
        self.sim.clock.call_later(self.sim.settings.publish_delay_s, self._alive(self.publish))

    def join(self, contact: Peer) -> None:
        """Ask `contact` to take this node into the overlay."""
        self.contact = contact
        self._guard(lambda: self.membership.join(contact, self.sim.now))

    def _alive(self, fn: Any) -> Any:
        """`fn` wrapped to do nothing if this life of the node has ended; a paused node runs it
        when the pause ends."""
        life = self.life

        def call() -> None:
            if not self.up or self.life != life:
                return
            if self.sim.net.is_paused(self.id):
                self.sim.clock.call_at(self.sim.net.paused_until(self.id), call)
                return
            fn()
        return call

    def _every(self, period: float, fn: Any) -> None:
        life = self.life

        def again() -> None:
            if self.life != life or not self.up:
                return
            self._alive(fn)()
            self.sim.clock.call_later(period * self.sim.rng.uniform(0.75, 1.25), again)
        self.sim.clock.call_later(period * self.sim.rng.uniform(0.0, 1.0), again)

    # --- the driver, as hmnode.mesh does it -------------------------------------------------

    def publish(self) -> None:
        """Sign and broadcast a new advert (its sequence number is durable)."""
        now = self.sim.now
        self.seq += 1
        advert = make_advert(self.key, self.seq, [self.peer.addr], {"cpu": {"cores": 4}}, None,
                             now, self.sim.settings.advert_ttl_s)
        self.sim.genuine.add((advert.node_id.key, advert.seq, advert.signature))
        self.sim.newest[self.id] = advert.seq
        self.store.offer(advert, now)
        self._guard(lambda: self.broadcast.broadcast(advert.msg_id, advert.to_wire(), now))

    def _valid(self, msg_id: bytes, payload: Any) -> bool:
        if self.sim.settings.gullible:
            return True
        try:
            advert = Advert.from_wire(payload)
            if advert.msg_id != msg_id:
                return False
            self.store.check(advert, self.sim.now)
        except AdvertRejected:
            return False
        return True

    def _take_advert(self, payload: Any) -> None:
        try:
            advert = Advert.from_wire(payload)
            self.store.offer(advert, self.sim.now)
        except AdvertRejected:
            return
        if self.malicious:
            self.seen_adverts.append(advert)

    def _on_frame(self, src: Hashable, topic: str, body: Any) -> None:
        assert isinstance(src, NodeId)
        now = self.sim.now
        if topic == MEMBERSHIP_TOPIC:
            self._guard(lambda: self.membership.receive(self.sim.peer_of(src), body, now))
        elif topic == BROADCAST_TOPIC:
            self._guard(lambda: self.broadcast.receive(src, body, now))
        elif topic == SYNC_TOPIC:
            self._serve_sync(src, body)
        elif topic == SYNC_ANSWER_TOPIC:
            self._take_sync(body)
        else:
            self.sim.count("unknown_topic")

    def _on_unreachable(self, dst: Hashable) -> None:
        assert isinstance(dst, NodeId)
        self._alive(lambda: self._guard(lambda: self.membership.connection_failed(dst, self.sim.now)))()

    def _guard(self, step: Any) -> None:
        """Run one input to the cores, then pump; a core that raises is a finding, not a stop."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - any exception from a core is the finding
            self.sim.core_error(self, exc)
        self._pump()

    def _pump(self) -> None:
        if not self.up:
            return
        for _ in range(MAX_PUMP_ROUNDS):
            try:
                m_out = self.membership.take_outbox()
                m_events = self.membership.take_events()
                b_out = self.broadcast.take_outbox()
                b_events = self.broadcast.take_events()
            except Exception as exc:  # noqa: BLE001
                self.sim.core_error(self, exc)
                return
            self.sim.note_outbox(self, len(m_out), len(b_out))
            if not (m_out or m_events or b_out or b_events):
                break
            for peer, message in m_out:
                self.sim.net.send(self.id, peer.node_id, MEMBERSHIP_TOPIC, message)
            for event in m_events:
                self._on_membership_event(event)
            for node_id, message in b_out:
                self.sim.net.send(self.id, node_id, BROADCAST_TOPIC, message)
            for event in b_events:
                if isinstance(event, Delivered) and event.sender is not None:
                    if self.sim.settings.store_deliveries:
                        self._take_advert(event.payload)
                elif isinstance(event, BroadcastMisbehaved):
                    self.sim.count("broadcast_misbehaved")
        else:
            self.sim.unbounded(f"{self.name}: the cores still had output after "
                               f"{MAX_PUMP_ROUNDS} pump rounds at t={self.sim.now:.3f}")
        self._schedule()

    def _on_membership_event(self, event: Any) -> None:
        now = self.sim.now
        try:
            if isinstance(event, NeighborUp):
                self.broadcast.neighbor_up(event.peer.node_id, now)
                # As the driver does: pull what a new neighbour has at once.
                self._ask_sync(event.peer.node_id)
            elif isinstance(event, NeighborDown):
                self.broadcast.neighbor_down(event.peer.node_id, now)
            elif isinstance(event, MembershipMisbehaved):
                self.sim.count("membership_misbehaved")
        except Exception as exc:  # noqa: BLE001
            self.sim.core_error(self, exc)

    def _schedule(self) -> None:
        """Arm one clock entry for the cores' earliest deadline (the heap does the polling)."""
        deadlines = [d for d in (self.membership.next_deadline(), self.broadcast.next_deadline())
                     if d is not None]
        if not deadlines:
            return
        when = max(min(deadlines), self.sim.now + MIN_TIMER_STEP_S)
        if self._timer_at is not None and self._timer_at <= when:
            return
        self._timer_at = when
        self.sim.clock.call_at(when, self._alive(lambda: self._fire(when)))

    def _fire(self, when: float) -> None:
        if self._timer_at != when:
            return  # superseded by an earlier one, which has run
        self._timer_at = None
        now = self.sim.now
        self._guard(lambda: (self.membership.tick(now), self.broadcast.tick(now)))

    def _keep_joined(self) -> None:
        # As the driver's bootstrap loop: a node with no neighbours asks its contact again.
        if not self.membership.active and self.contact is not None:
            self.join(self.contact)

    # --- anti-entropy -----------------------------------------------------------------------

    def _anti_entropy(self) -> None:
        active = self.membership.active
        if active:
            self._ask_sync(self.sim.rng.choice(active).node_id)

    def _ask_sync(self, peer: NodeId) -> None:
        if not self.sim.settings.anti_entropy:
            return
        self.sim.net.send(self.id, peer, SYNC_TOPIC, {"digest": self.store.digest()})

    def _serve_sync(self, src: NodeId, body: Any) -> None:
        digest = body.get("digest") if isinstance(body, dict) else None
        if (not isinstance(digest, list) or len(digest) != DIGEST_BUCKETS
                or not all(isinstance(h, bytes) for h in digest)):
            self.sim.count("bad_sync")
            return
        newer = [a.to_wire() for a in self.store.differing(digest)]
        if self.malicious:
            newer.extend(a.to_wire() for a in self.sim.forgeries(self))
        self.sim.rng.shuffle(newer)
        self.sim.net.send(self.id, src, SYNC_ANSWER_TOPIC, {"adverts": newer[:MAX_SYNC_ADVERTS]})

    def _take_sync(self, body: Any) -> None:
        adverts = body.get("adverts") if isinstance(body, dict) else None
        if not isinstance(adverts, list):
            self.sim.count("bad_sync")
            return
        for wire in adverts[:MAX_SYNC_ADVERTS]:
            try:
                advert = Advert.from_wire(wire)
                if self.store.is_news(advert):
                    self.store.offer(advert, self.sim.now)
                    if self.malicious:
                        self.seen_adverts.append(advert)
            except AdvertRejected:
                self.sim.count("sync_rejected")


class _GossipSim:
    """One run of the gossip scenario."""

    def __init__(self, nodes: int, seed: int, duration: float, settings: SimSettings) -> None:
        if nodes < 2:
            raise ValueError("the gossip scenario needs at least 2 nodes")
        self.n = nodes
        self.seed = seed
        self.duration = duration
        self.settings = settings
        self.rng = Random(seed)
        self.clock = VirtualClock()
        self.net = SimNetwork(self.clock, self.rng, CALM)
        # The last node is malicious when there are enough others to make that interesting.
        self.malicious = nodes - 1 if settings.forgeries and nodes >= 4 else None
        self.nodes = [_Node(self, i, NodeKey(nacl.signing.SigningKey(self.rng.randbytes(32))),
                            malicious=(i == self.malicious)) for i in range(nodes)]
        self.by_id = {node.id: node for node in self.nodes}
        self.genuine: set[tuple[bytes, int, bytes]] = set()
        self.newest: dict[NodeId, int] = {}
        self.counters: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        self._store_seqs: dict[tuple[int, NodeId], int] = {}
        self._max_outbox = 0
        self.join_end = settings.join_every_s * nodes + settings.publish_delay_s + 2.0
        quiet = max(settings.min_quiet_s, settings.quiet_fraction * duration)
        self.heal_at = max(self.join_end, duration - quiet)
        honest = nodes - 1 if self.malicious is not None else nodes
        self.plan = FaultPlan.pick(self.rng, honest, self.join_end, self.heal_at)
        self.converged_at: float | None = None

    @property
    def now(self) -> float:
        return self.clock.now

    def peer_of(self, node_id: NodeId) -> Peer:
        return self.by_id[node_id].peer

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def core_error(self, node: _Node, exc: BaseException) -> None:
        self.count("core_exceptions")
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.problems.setdefault("no_crash", f"{node.name} at t={self.now:.3f}: {type(exc).__name__}: "
                                 f"{exc} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})")

    def unbounded(self, text: str) -> None:
        self.problems.setdefault("bounded_queues", text)

    def note_outbox(self, node: _Node, m: int, b: int) -> None:
        self._max_outbox = max(self._max_outbox, m, b)
        s = self.settings
        if m > s.membership.max_outbox or b > s.broadcast.max_outbox:
            self.unbounded(f"{node.name}: outbox of {m} membership / {b} broadcast messages at "
                           f"t={self.now:.3f}")

    # --- the malicious node -----------------------------------------------------------------

    def forgeries(self, liar: _Node) -> list[Advert]:
        """Adverts no honest store may take: claimed for a victim but signed by `liar`, a
        victim's genuine advert with altered content, and replays of older sequences."""
        victims = [n for n in self.nodes if n is not liar and n.seq > 0]
        if not victims:
            return []
        victim = self.rng.choice(victims)
        now = self.now
        claimed = Advert(victim.id, victim.seq + 1000, ("6.6.6.6:666",), {"cpu": {"cores": 999}},
                         {"core_hour": 0.0, "gb_hour": 0.0, "gpu_hour": 0.0, "start_fee": 0.0},
                         now, now + 600.0)
        out = [dataclasses.replace(claimed, signature=liar.key.sign(claimed.signed_bytes()))]
        own = victim.store.get(victim.id) if victim.up else None
        if own is not None:
            tampered = dataclasses.replace(own, seq=own.seq + 1000, addresses=("6.6.6.6:666",))
            out.append(tampered)  # the genuine signature no longer covers it
        old = [a for a in liar.seen_adverts if a.seq < self.newest.get(a.node_id, 0)]
        if old:
            out.append(self.rng.choice(old))
        return out

    def _forge(self) -> None:
        if self.malicious is None:
            return
        liar = self.nodes[self.malicious]
        if not liar.up:
            return
        neighbours = [p.node_id for p in liar.membership.active]
        for advert in self.forgeries(liar):
            # Raw gossip frames to every neighbour, bypassing the liar's own dedup, so the
            # receivers' validation is all that stops them.
            for peer in neighbours:
                self.net.send(liar.id, peer, BROADCAST_TOPIC,
                              {"k": "gossip", "id": advert.msg_id, "p": advert.to_wire(), "h": 0})
            self.count("forgeries_sent")

    # --- faults -----------------------------------------------------------------------------

    def _schedule_faults(self) -> None:
        p, clock, net = self.plan, self.clock, self.net
        faulty = dataclasses.replace(CALM, loss=p.loss, duplicate=p.duplicate, corrupt=p.corrupt,
                                     latency_extra_s=p.latency_extra_s)

        def set_params(params: NetParams) -> Any:
            return lambda: setattr(net, "params", params)

        clock.call_at(self.join_end, set_params(faulty))
        clock.call_at(self.heal_at, set_params(CALM))
        ids = [self.nodes[i].id for i in p.partition_nodes]
        if p.partition != "none" and ids:
            # The malicious node sits with the majority: left out of both sides it would be a
            # bridge nobody chose.
            rest = [n.id for n in self.nodes if n.id not in ids]

            def cut() -> None:
                if p.partition == "isolate":
                    net.isolate(ids[0])
                elif p.partition == "split":
                    net.split([ids, rest])
                elif p.partition == "bridge":
                    # The first chosen node sees both halves.
                    net.split([ids[1:] or ids, [i for i in rest if i != ids[0]]])
                    net.bridge(ids[0])
                else:  # asym: the chosen nodes can send to the rest but hear nothing back
                    for a in rest:
                        for b in ids:
                            net.block(a, b)
            clock.call_at(p.partition_at, cut)
            clock.call_at(p.partition_at + p.partition_s, net.heal)
        if p.crash_node is not None:
            node = self.nodes[p.crash_node]
            clock.call_at(p.crash_at, lambda: node.up and node.crash())
            clock.call_at(p.crash_at + p.down_s, lambda: node.up or node.restart())
        if p.pause_node is not None:
            clock.call_at(p.pause_at, lambda: self.net.pause(self.nodes[p.pause_node].id, p.pause_s))
        clock.call_at(self.heal_at, net.heal)

    # --- checks -----------------------------------------------------------------------------

    def _check(self) -> None:
        cfg = self.settings.membership
        for node in self.nodes:
            if not node.up:
                continue
            active, passive = node.membership.active, node.membership.passive
            if len(active) > cfg.active_size or len(passive) > cfg.passive_size or any(
                    p.node_id == node.id for p in (*active, *passive)):
                self.problems.setdefault(
                    "view_bounds", f"{node.name} at t={self.now:.3f}: active {len(active)}/"
                    f"{cfg.active_size}, passive {len(passive)}/{cfg.passive_size}")
            if node.malicious:
                continue
            for advert in node.store.all():
                if (advert.node_id.key, advert.seq, advert.signature) not in self.genuine:
                    self.problems.setdefault(
                        "no_forgery", f"{node.name} at t={self.now:.3f} holds a forged advert of "
                        f"{self.by_id[advert.node_id].name if advert.node_id in self.by_id else '?'} "
                        f"seq {advert.seq}")
                key = (node.index, advert.node_id)
                if advert.seq < self._store_seqs.get(key, 0):
                    self.problems.setdefault(
                        "no_forgery", f"{node.name} at t={self.now:.3f} went back to seq {advert.seq}")
                self._store_seqs[key] = advert.seq
        if self.now >= self.heal_at and self.converged_at is None and not self._missing():
            self.converged_at = self.now

    def _live(self) -> list[_Node]:
        return [n for n in self.nodes if n.up and not n.malicious]

    def _missing(self) -> list[tuple[_Node, _Node, int]]:
        live = self._live()
        missing = []
        for holder in live:
            for owner in live:
                held = holder.store.get(owner.id)
                have = held.seq if held is not None else 0
                if have != owner.seq:
                    missing.append((holder, owner, have))
        return missing

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> Result:
        s, clock = self.settings, self.clock
        for node in self.nodes:
            def start(node: _Node = node) -> None:
                node.boot()
                if node.index > 0:
                    contact = self.nodes[self.rng.randrange(node.index)]
                    node.join(contact.peer)
                clock.call_later(s.publish_delay_s, node._alive(node.publish))
            clock.call_at(node.index * s.join_every_s, start)
        self._schedule_faults()
        # Inventories change during the faults: every honest node publishes again at a random
        # moment, so the newest adverts must cross whatever partition was up when they began.
        for node in self.nodes:
            if node.index != self.malicious and self.heal_at > self.join_end:
                clock.call_at(self.rng.uniform(self.join_end, self.heal_at),
                              lambda node=node: node.up and node._alive(node.publish)())
        if self.malicious is not None:
            def forge() -> None:
                self._forge()
                clock.call_later(s.forge_every_s, forge)
            clock.call_at(self.join_end, forge)

        def check() -> None:
            self._check()
            clock.call_later(s.check_every_s, check)
        clock.call_at(s.check_every_s, check)
        clock.run_until(self.duration)
        self._check()
        verdicts: dict[str, bool | str] = {}
        missing = self._missing()
        if missing:
            holder, owner, have = missing[0]
            verdicts["convergence"] = (
                f"{len(missing)} (holder, owner) pairs lack the newest advert "
                f"{self.duration - self.heal_at:.1f}s after heal; e.g. {holder.name} has "
                f"{owner.name} seq {have}, newest {owner.seq}")
        else:
            verdicts["convergence"] = True
        if self.net.max_inflight > self.net.params.queue_limit:
            self.unbounded(f"an inbound queue reached {self.net.max_inflight}")
        for name in CHECKERS[1:]:
            verdicts[name] = self.problems.get(name, True)
        ok = all(v is True for v in verdicts.values())
        stats = {
            "plan": self.plan.describe(),
            "join_end": round(self.join_end, 3),
            "heal_at": round(self.heal_at, 3),
            "converged_after_heal_s": (None if self.converged_at is None
                                       else round(self.converged_at - self.heal_at, 3)),
            "events": clock.events_run,
            "network": dict(sorted(self.net.counters.items())),
            "max_inflight": self.net.max_inflight,
            "max_outbox": self._max_outbox,
            "driver": dict(sorted(self.counters.items())),
            "live_nodes": len(self._live()),
        }
        return Result("gossip", self.n, self.seed, self.duration, self.net.trace_hash(), ok,
                      verdicts, stats)


def run(nodes: int, seed: int, duration: float = 90.0,
        settings: SimSettings = SimSettings()) -> Result:
    """Run the gossip scenario with `nodes` nodes for `duration` virtual seconds; the seed
    fixes every key, fault and random choice, so the same arguments give the same trace."""
    return _GossipSim(nodes, seed, duration, settings).run()
