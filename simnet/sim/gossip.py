"""The `gossip` scenario: a mesh of simulated nodes, each running the real `GossipNode`
(membership, broadcast, adverts, anti-entropy: the code `hmnode run` runs) in a simulated
environment, under faults that the seed picks; then checkers that say whether the mesh kept its
promises.

Phases: nodes join one by one through random earlier nodes and advertise; a faulty phase (loss,
duplication, corruption, reordering, a partition, a crash and restart from the node's synced
disk, a pause, a thin uplink, skewed and drifting clocks: which of them and how hard comes from
the seed) in which every node's inventory changes once; heal; a quiet phase. Checkers:

- convergence: after the quiet phase every live node holds every live node's newest advert;
- no_forgery: no honest store ever takes an advert its owner did not sign, nor goes back to
  an older sequence number while it runs (a malicious node keeps injecting both);
- view_bounds: active and passive views stay within their configured sizes;
- bounded_queues: no input makes a node send more than its cores' outboxes hold, the network's
  inbound queues stay bounded, and every pump settles;
- no_crash: no core raised on any input, corrupted frames included.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import nacl.signing

from hmnode import schema
from hmnode.adverts import Advert, AdvertStore, make_advert
from hmnode.env import Env
from hmnode.gossip_node import (BROADCAST_TOPIC, MAX_SYNC_ADVERTS, MAX_SYNC_SUMMARY, META_ADVERT_SEQ, CoreStalled, GossipConfig,
                                GossipNode, GossipObserver)
from hmnode.identity import NodeId, NodeKey
from hmnode.membership import Peer, PeerDead
from hmnode.schema import KnownPeer

from .clock import EPOCH, NodeClock, VirtualClock
from .network import NetParams, SimNetwork, SimProcess
from .store import SimStore

CHECKERS = ("convergence", "no_forgery", "view_bounds", "bounded_queues", "no_crash")
PARTITIONS = ("none", "isolate", "split", "bridge", "asym")
CALM = NetParams()
# Clock faults stay within what adverts tolerate (hmnode.adverts.MAX_CLOCK_SKEW_S is 300 s):
# beyond it a node's adverts are refused by design, which is not a fault of the protocol.
MAX_CLOCK_OFFSET_S = 60.0
MAX_CLOCK_DRIFT = 500e-6


@dataclass(frozen=True)
class SimSettings:
    """How the scenario runs, and the knobs tests use to break it on purpose."""

    check_every_s: float = 1.0
    join_every_s: float = 0.2
    # The bound on healing: membership retries peers it declared dead, and a node knowing
    # nobody beyond its neighbours asks a contact again, every 30 probe intervals (30 s by
    # default), so two halves that forgot each other during a partition may take that long
    # to find each other again; the quiet phase must outlast it, plus a few sync rounds.
    min_quiet_s: float = 40.0
    quiet_fraction: float = 0.35
    faults: bool = True
    forgeries: bool = True
    forge_every_s: float = 3.0
    # What every node runs: production's defaults.
    gossip: GossipConfig = GossipConfig()
    # Accept every payload and every advert unchecked: a broken node for testing the checkers.
    gullible: bool = False
    # Off: a driver that drops every advert it hears of (also for testing the checkers).
    store_deliveries: bool = True
    # Keep each delivery of a published advert (for benchmarks; costs memory on big runs).
    record_deliveries: bool = False
    # Look for convergence every check after heal (an O(nodes^2) scan until it is reached).
    watch_convergence: bool = True
    # Start from disks as a converged mesh left them (every advert, some known peers), all
    # nodes booting within the first seconds, rather than joining one by one.
    warm_start: bool = False
    warm_start_peers: int = 30


class SignatureCache:
    """`Advert.verify`, remembered: the same advert reaches every node, and the answer is a pure
    function of its signed bytes and signature."""

    def __init__(self) -> None:
        self._known: dict[tuple[bytes, bytes], bool] = {}
        self.checks = 0

    def __call__(self, advert: Advert) -> bool:
        key = (advert.signed_bytes, advert.signature)
        known = self._known.get(key)
        if known is None:
            self.checks += 1
            known = self._known[key] = advert.verify()
        return known


@dataclass(frozen=True)
class Delivery:
    """A node took a published advert: how (gossip, sync, disk), after how many hops and how
    long after it was published (virtual seconds)."""

    owner: NodeId
    seq: int
    holder: int
    via: str
    hops: int | None
    delay_s: float


@dataclass(frozen=True)
class Death:
    """A node declared another dead; `target_alive` says whether it was in fact running."""

    time: float
    observer: int
    target: int
    target_alive: bool


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
    slow_node: int | None = None
    slow_bytes_per_s: float = 0.0
    # (offset seconds, drift) of each node's clock, for nodes 0..len-1; the rest keep true time.
    clocks: tuple[tuple[float, float], ...] = ()

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
        if rng.random() < 0.3:
            # A node on a thin uplink (a phone tether, a saturated DSL line): 8 to 64 kB/s.
            plan.update(slow_node=rng.randrange(honest), slow_bytes_per_s=rng.uniform(8e3, 64e3))
        if rng.random() < 0.5:
            spread = rng.uniform(0.0, MAX_CLOCK_OFFSET_S)
            plan["clocks"] = tuple((rng.uniform(-spread, spread),
                                    rng.uniform(-MAX_CLOCK_DRIFT, MAX_CLOCK_DRIFT))
                                   for _ in range(honest))
        return cls(**plan)

    def describe(self) -> dict[str, Any]:
        """The plan as a JSON-able map, rounded for reading (clocks as their largest offset
        and drift)."""
        out: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            if k == "clocks":
                out["clock_offset_max_s"] = round(max((abs(o) for o, _ in v), default=0.0), 3)
                out["clock_drift_max_ppm"] = round(max((abs(d) for _, d in v), default=0.0) * 1e6, 1)
            elif isinstance(v, float):
                out[k] = round(v, 3)
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


def schedule_faults(plan: FaultPlan, clock: VirtualClock, net: SimNetwork, targets: list[Any],
                    everyone: list[Hashable], start: float, heal_at: float,
                    restart: Callable[[Any], None]) -> None:
    """Put `plan` on the clock: node i of the plan is `targets[i]` (with `id`, `up` and
    `crash()`), `restart(node)` brings a crashed one back, and the faulty phase runs from
    `start` to `heal_at`, when the network is calm and whole again."""
    p = plan
    faulty = dataclasses.replace(CALM, loss=p.loss, duplicate=p.duplicate, corrupt=p.corrupt,
                                 latency_extra_s=p.latency_extra_s)

    def set_params(params: NetParams) -> Callable[[], None]:
        return lambda: setattr(net, "params", params)

    clock.call_at(start, set_params(faulty))
    clock.call_at(heal_at, set_params(CALM))
    ids = [targets[i].id for i in p.partition_nodes]
    if p.partition != "none" and ids:
        rest = [n for n in everyone if n not in ids]

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
        node = targets[p.crash_node]
        clock.call_at(p.crash_at, lambda: node.up and node.crash())
        clock.call_at(p.crash_at + p.down_s, lambda: node.up or restart(node))
    if p.pause_node is not None:
        paused = targets[p.pause_node].id
        clock.call_at(p.pause_at, lambda: net.pause(paused, p.pause_s))
    if p.slow_node is not None:
        slow = targets[p.slow_node].id
        clock.call_at(start, lambda: net.limit_uplink(slow, p.slow_bytes_per_s))
        clock.call_at(heal_at, lambda: net.limit_uplink(slow, None))
    clock.call_at(heal_at, net.heal)


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
        return reproduce_command(self.nodes, self.seed, self.duration, self.scenario)

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-able map."""
        out: dict[str, Any] = {"scenario": self.scenario, "nodes": self.nodes, "seed": self.seed,
                               "duration": self.duration, "trace_hash": self.trace_hash,
                               "ok": self.ok, "verdicts": self.verdicts, "stats": self.stats}
        if not self.ok:
            out["reproduce"] = self.reproduce
        return out


def reproduce_command(nodes: int, seed: int, duration: float, scenario: str = "gossip") -> str:
    """The CLI command that replays a run."""
    return (f"hmnode simnet sim --scenario {scenario} --nodes {nodes} --seed {seed} "
            f"--duration {duration:g}")


class _GullibleStore(AdvertStore):
    """A store that checks nothing: only for showing that the checkers catch a broken node."""

    def check(self, advert: Advert, now: float) -> None:
        return None


class _LiarNode(GossipNode):
    """The malicious node: runs the real protocol, but offers forged sequences in anti-entropy
    and answers with forgeries too."""

    forge: Callable[[], list[Advert]] = staticmethod(lambda: [])

    def sync_summary(self, digest: list[bytes]) -> list[tuple[bytes, int]]:
        claims = [(a.node_id.key, a.seq) for a in self.forge()]
        return [*super().sync_summary(digest), *claims][:MAX_SYNC_SUMMARY]

    def sync_answer(self, want: list[bytes]) -> list[Advert]:
        return [*super().sync_answer(want), *self.forge()][:MAX_SYNC_ADVERTS]


class _ForgetfulNode(GossipNode):
    """A broken driver that drops every advert it hears of (for testing the checkers)."""

    def _take(self, advert: Advert, via: str, hops: int | None) -> None:
        return None


class _Node(SimProcess, GossipObserver):
    """One simulated node: a real `GossipNode` in an environment of virtual clock (with this
    node's offset and drift), the shared seeded rng, the simulated network and a SimStore that
    survives crashes as far as it was synced."""

    def __init__(self, sim: "GossipSim", index: int, key: NodeKey, malicious: bool) -> None:
        self.sim = sim
        self.index = index
        self.name = f"n{index:03d}"
        self.key = key
        self.id = key.node_id
        self.peer = Peer(self.id, f"10.{index // 250}.{index % 250}.1:7000")
        self.malicious = malicious
        self.disk = SimStore()
        self.clock_offset = 0.0
        self.clock_drift = 0.0
        self.revision = 0  # what the node shares; bumped to make it advertise again
        self.contact: Peer | None = None
        self.life = 0
        self.up = False
        self.gossip: GossipNode
        self.seen_adverts: list[Advert] = []  # what the malicious node saw, to replay later
        self._sent = 0

    # --- life -------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start a fresh process: new cores over what the disk kept."""
        sim, s = self.sim, self.sim.settings
        self.life += 1
        self.up = True
        clock = NodeClock(sim.clock, self.clock_offset, self.clock_drift, self._wrap)
        env = Env(clock, sim.rng, self, self.disk)
        store = _GullibleStore(verifier=sim.verify) if s.gullible else AdvertStore(verifier=sim.verify)
        if self.malicious:
            node: GossipNode = _LiarNode(self.key, self.peer.addr, env, self.describe, s.gossip,
                                         self, store)
            node.forge = lambda: sim.forgeries(self)  # type: ignore[attr-defined]
        else:
            cls = GossipNode if s.store_deliveries else _ForgetfulNode
            node = cls(self.key, self.peer.addr, env, self.describe, s.gossip, self, store)
        self.gossip = node
        if self.life == 1:
            sim.net.attach(self.id, self.name, self._on_frame, self._on_unreachable)
        else:
            sim.net.restart(self.id, self._on_frame, self._on_unreachable)
        self._guard(node.start)
        self._every(s.gossip.rejoin_check_s, self._keep_joined)

    def crash(self) -> None:
        """Power loss: the process and its unsynced writes are gone; so is what is in flight."""
        self.up = False
        if self.disk.crash():
            self.sim.count("lost_commits")
        self.sim.net.crash(self.id)

    def restart(self) -> None:
        """Come back as a fresh process over the same disk (it rejoins through the peers it
        remembers, as `hmnode run` does)."""
        self.boot()

    def join(self, contact: Peer) -> None:
        """Ask `contact` to take this node into the overlay."""
        self.contact = contact
        self._guard(lambda: self.gossip.join(contact))

    def change_inventory(self) -> None:
        """What the node shares changes: it advertises again at its next look."""
        self.revision += 1

    def describe(self) -> tuple[list[str], dict[str, Any]]:
        return [self.peer.addr], {"cpu": {"cores": 4}, "revision": self.revision}

    def _keep_joined(self) -> None:
        # As the driver's bootstrap loop: a node with no neighbours asks its contact again.
        if not self.gossip.membership.active and self.contact is not None:
            self.join(self.contact)

    # --- the environment's callbacks --------------------------------------------------------

    def _every(self, period: float, fn: Callable[[], None]) -> None:
        clock, rng = self.sim.clock, self.sim.rng

        def again() -> None:
            fn()
            clock.call_later(period * rng.uniform(0.75, 1.25), self._wrap(again))
        clock.call_later(period * rng.random(), self._wrap(again))

    def _guard(self, step: Callable[[], None]) -> None:
        """Run one input to the node; a core that raises is a finding, not a stop."""
        self._sent = 0
        try:
            step()
        except CoreStalled as exc:
            self.sim.unbounded(f"{self.name} at t={self.sim.now:.3f}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any exception from a core is the finding
            self.sim.core_error(self, exc)
        self.sim.note_burst(self, self._sent)

    def _on_frame(self, src: Hashable, topic: str, body: Any) -> None:
        assert isinstance(src, NodeId)
        self._guard(lambda: self.gossip.receive(self.sim.peer_of(src), topic, body))

    def _on_unreachable(self, dst: Hashable) -> None:
        assert isinstance(dst, NodeId)
        self._wrap(lambda: self.gossip.connection_failed(dst))()

    # --- hmnode.env.Network -----------------------------------------------------------------

    def send(self, dst: NodeId, addr: str | None, topic: str, body: dict[str, Any]) -> None:
        self._sent += 1
        self.sim.net.send(self.id, dst, topic, body)

    def disconnect(self, dst: NodeId, reason: str) -> None:
        return None  # the simulated network has no connections to drop

    def misbehaved(self, peer: NodeId, reason: str) -> None:
        self.sim.count("misbehaviour_noted")

    # --- GossipObserver ---------------------------------------------------------------------

    def advert_taken(self, advert: Advert, via: str, hops: int | None, now: float) -> None:
        self.sim.advert_taken(self, advert, via, hops)

    def membership_event(self, event: Any, now: float) -> None:
        if isinstance(event, PeerDead):
            self.sim.peer_dead(self, event.node_id)


class GossipSim:
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
        # Signature checks are pure, so every node may share one cache of them: the same
        # advert is checked at every node, and Ed25519 costs more than the rest of a delivery.
        self.verify = SignatureCache()
        # The last node is malicious when there are enough others to make that interesting.
        self.malicious = nodes - 1 if settings.forgeries and nodes >= 4 else None
        self.nodes = [_Node(self, i, NodeKey(nacl.signing.SigningKey(self.rng.randbytes(32))),
                            malicious=(i == self.malicious)) for i in range(nodes)]
        self.by_id = {node.id: node for node in self.nodes}
        self.genuine: set[tuple[bytes, int, bytes]] = set()
        self.newest: dict[NodeId, int] = {}
        self.published_at: dict[tuple[NodeId, int], float] = {}
        self.deliveries: list[Delivery] = []
        self.deaths: list[Death] = []
        self.counters: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        self._store_seqs: dict[tuple[int, NodeId], int] = {}
        self._max_burst = 0
        self.join_end = settings.join_every_s * nodes + 2.0
        quiet = max(settings.min_quiet_s, settings.quiet_fraction * duration)
        self.heal_at = max(self.join_end, duration - quiet)
        honest = nodes - 1 if self.malicious is not None else nodes
        self.plan = (FaultPlan.pick(self.rng, honest, self.join_end, self.heal_at)
                     if settings.faults else FaultPlan())
        for i, (offset, drift) in enumerate(self.plan.clocks):
            self.nodes[i].clock_offset, self.nodes[i].clock_drift = offset, drift
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

    def note_burst(self, node: _Node, sent: int) -> None:
        """One input made `node` send `sent` messages: more than a core's outbox holds means a
        queue grew past its bound somewhere."""
        self._max_burst = max(self._max_burst, sent)
        s = self.settings.gossip
        if sent > s.membership.max_outbox + s.broadcast.max_outbox:
            self.unbounded(f"{node.name}: one input sent {sent} messages at t={self.now:.3f}")

    # --- what nodes report ------------------------------------------------------------------

    def advert_taken(self, holder: _Node, advert: Advert, via: str, hops: int | None) -> None:
        """no_forgery, checked as it happens: an honest store takes only genuine adverts, and
        never goes back to an older one while it runs."""
        owner = advert.node_id
        if via == "own":
            self.genuine.add((owner.key, advert.seq, advert.signature))
            self.newest[owner] = advert.seq
            self.published_at[(owner, advert.seq)] = self.now
            return
        if holder.malicious:
            holder.seen_adverts.append(advert)
            return
        if (owner.key, advert.seq, advert.signature) not in self.genuine:
            self.problems.setdefault(
                "no_forgery", f"{holder.name} at t={self.now:.3f} took a forged advert of "
                f"{self.by_id[owner].name if owner in self.by_id else '?'} seq {advert.seq} via {via}")
        key = (holder.index, owner)
        # A restart reads what the disk kept, which may be older than what the node held.
        if via != "disk" and advert.seq < self._store_seqs.get(key, 0):
            self.problems.setdefault(
                "no_forgery", f"{holder.name} at t={self.now:.3f} went back to seq {advert.seq} "
                f"of {self.by_id[owner].name} via {via}")
        self._store_seqs[key] = advert.seq
        published = self.published_at.get((owner, advert.seq))
        if self.settings.record_deliveries and published is not None:
            self.deliveries.append(Delivery(owner, advert.seq, holder.index, via, hops,
                                            self.now - published))

    def peer_dead(self, observer: _Node, dead: NodeId) -> None:
        """Note that `observer` declared `dead` dead, and whether it was in fact running."""
        target = self.by_id.get(dead)
        alive = target is not None and target.up
        self.deaths.append(Death(self.now, observer.index, target.index if target else -1, alive))

    # --- the malicious node -----------------------------------------------------------------

    def forgeries(self, liar: _Node) -> list[Advert]:
        """Adverts no honest store may take: claimed for a victim but signed by `liar`, a
        victim's genuine advert with altered content, and replays of older sequences."""
        victims = [n for n in self.nodes if n is not liar and self.newest.get(n.id)]
        if not victims:
            return []
        victim = self.rng.choice(victims)
        now = liar.gossip.env.clock.now()
        newest = self.newest[victim.id]
        claimed = Advert(victim.id, newest + 1000, ("6.6.6.6:666",), {"cpu": {"cores": 999}},
                         {"core_hour": 0.0, "gb_hour": 0.0, "gpu_hour": 0.0, "start_fee": 0.0},
                         now, now + 600.0)
        out = [dataclasses.replace(claimed, signature=liar.key.sign(claimed.signed_bytes))]
        own = victim.gossip.own if victim.up else None
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
        neighbours = [p.node_id for p in liar.gossip.membership.active]
        for advert in self.forgeries(liar):
            # Raw gossip frames to every neighbour, bypassing the liar's own dedup, so the
            # receivers' validation is all that stops them.
            for peer in neighbours:
                self.net.send(liar.id, peer, BROADCAST_TOPIC,
                              {"k": "gossip", "id": advert.msg_id, "p": advert.to_wire(), "h": 0})
            self.count("forgeries_sent")

    # --- faults -----------------------------------------------------------------------------

    def _schedule_faults(self) -> None:
        # The malicious node sits with the majority of a partition: left out of both sides it
        # would be a bridge nobody chose.
        schedule_faults(self.plan, self.clock, self.net, self.nodes,
                        [n.id for n in self.nodes], self.join_end, self.heal_at,
                        restart=lambda node: node.restart())

    # --- checks -----------------------------------------------------------------------------

    def _check(self) -> None:
        cfg = self.settings.gossip.membership
        for node in self.nodes:
            if not node.up:
                continue
            active, passive = node.gossip.membership.active, node.gossip.membership.passive
            if len(active) > cfg.active_size or len(passive) > cfg.passive_size or any(
                    p.node_id == node.id for p in (*active, *passive)):
                self.problems.setdefault(
                    "view_bounds", f"{node.name} at t={self.now:.3f}: active {len(active)}/"
                    f"{cfg.active_size}, passive {len(passive)}/{cfg.passive_size}")
        if (self.settings.watch_convergence and self.now >= self.heal_at
                and self.converged_at is None and not self._missing(first_only=True)):
            self.converged_at = self.now

    def _live(self) -> list[_Node]:
        return [n for n in self.nodes if n.up and not n.malicious]

    def _missing(self, first_only: bool = False) -> list[tuple[_Node, _Node, int]]:
        live = self._live()
        missing = []
        for holder in live:
            store = holder.gossip.adverts
            for owner in live:
                held = store.get(owner.id)
                have = held.seq if held is not None else 0
                if have != self.newest.get(owner.id, 0):
                    missing.append((holder, owner, have))
                    if first_only:
                        return missing
        return missing

    # --- the run ----------------------------------------------------------------------------

    def preload(self) -> None:
        """Write every node's disk as a converged mesh leaves it: its advert sequence, every
        node's advert (sequence 1), and a random sample of peers to rejoin through."""
        s = self.settings
        adverts = []
        for node in self.nodes:
            issued = EPOCH + node.clock_offset
            advert = make_advert(node.key, 1, *node.describe(), None, issued, s.gossip.advert_ttl_s)
            self.genuine.add((node.id.key, 1, advert.signature))
            self.newest[node.id] = 1
            adverts.append(advert)
        for node in self.nodes:
            peers = self.rng.sample([n for n in self.nodes if n is not node],
                                    min(s.warm_start_peers, self.n - 1))

            def write(tx: Any, peers: list[_Node] = peers) -> None:
                tx.put(schema.META, META_ADVERT_SEQ, 1)
                for advert in adverts:
                    tx.put(schema.ADVERTS, advert.node_id.key, advert)
                for peer in peers:
                    tx.put(schema.PEERS, peer.id.key, KnownPeer(peer.peer.addr, EPOCH))
            node.disk.write(write)

    def start(self) -> None:
        """Schedule the joins, faults, inventory changes, forgeries and checks."""
        s, clock = self.settings, self.clock
        if s.warm_start:
            self.preload()
        for node in self.nodes:
            def start(node: _Node = node) -> None:
                node.boot()
                if node.index > 0 and not s.warm_start:
                    node.join(self.nodes[self.rng.randrange(node.index)].peer)
            clock.call_at(node.index * s.join_every_s, start)
        if s.faults:
            self._schedule_faults()
            # Inventories change during the faults: every honest node advertises again at a
            # random moment, so the newest adverts must cross whatever partition was up.
            for node in self.nodes:
                if node.index != self.malicious and self.heal_at > self.join_end:
                    clock.call_at(self.rng.uniform(self.join_end, self.heal_at), node.change_inventory)
        if self.malicious is not None:
            def forge() -> None:
                self._forge()
                clock.call_later(s.forge_every_s, forge)
            clock.call_at(self.join_end, forge)

        def check() -> None:
            self._check()
            clock.call_later(s.check_every_s, check)
        clock.call_at(s.check_every_s, check)

    def run(self) -> Result:
        self.start()
        self.clock.run_until(self.duration)
        return self.result()

    def result(self) -> Result:
        """The checkers' verdicts on the run so far."""
        self._check()
        verdicts: dict[str, bool | str] = {}
        missing = self._missing()
        if missing:
            holder, owner, have = missing[0]
            verdicts["convergence"] = (
                f"{len(missing)} (holder, owner) pairs lack the newest advert "
                f"{self.duration - self.heal_at:.1f}s after heal; e.g. {holder.name} has "
                f"{owner.name} seq {have}, newest {self.newest.get(owner.id, 0)}")
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
            "events": self.clock.events_run,
            "network": dict(sorted(self.net.counters.items())),
            "max_inflight": self.net.max_inflight,
            "max_burst": self._max_burst,
            "driver": dict(sorted(self.counters.items())),
            "false_deaths": sum(1 for d in self.deaths if d.target_alive),
            "live_nodes": len(self._live()),
        }
        return Result("gossip", self.n, self.seed, self.duration, self.net.trace_hash(), ok,
                      verdicts, stats)


def run(nodes: int, seed: int, duration: float = 90.0,
        settings: SimSettings = SimSettings()) -> Result:
    """Run the gossip scenario with `nodes` nodes for `duration` virtual seconds; the seed
    fixes every key, fault and random choice, so the same arguments give the same trace."""
    return GossipSim(nodes, seed, duration, settings).run()
