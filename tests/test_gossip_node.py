"""GossipNode through its environment: persist before send, restarts from a disk that lost what
was not synced, two-round anti-entropy, malformed input refused, and the simulator's pieces
(virtual and per-node clocks, the store that keeps durable and unsynced writes apart, uplinks)."""

from __future__ import annotations

from collections.abc import Hashable
from random import Random
from typing import Any

import nacl.signing
import pytest

from hmnode import schema
from hmnode.adverts import Advert, make_advert
from hmnode.env import Env
from hmnode.gossip_node import (META_ADVERT_SEQ, SYNC_ANSWER_TOPIC, SYNC_HAVE_TOPIC, SYNC_TOPIC,
                                SYNC_WANT_TOPIC, GossipConfig, GossipNode, GossipObserver)
from hmnode.identity import NodeId, NodeKey
from hmnode.membership import Peer
from hmnode.simnet.sim import NetParams, SimNetwork, VirtualClock
from hmnode.simnet.sim.clock import EPOCH, NodeClock
from hmnode.simnet.sim.store import SimStore
from hmnode.transport.wire import Notify, encode_message


def _key(rng: Random) -> NodeKey:
    return NodeKey(nacl.signing.SigningKey(rng.randbytes(32)))


class _Host(GossipObserver):
    """One node on the simulated network, as the simulator wires it, with what it saw."""

    def __init__(self, world: "_World", index: int, disk: SimStore | None = None,
                 anti_entropy_s: float = 1.0) -> None:
        self.world = world
        self.anti_entropy_s = anti_entropy_s
        self.key = _key(world.rng)
        self.id = self.key.node_id
        self.peer = Peer(self.id, f"10.0.0.{index + 1}:7000")
        self.disk = disk or SimStore()
        self.inventory: dict[str, Any] = {"cpu": {"cores": 2}}
        self.taken: list[tuple[Advert, str, int | None]] = []
        self.complaints: list[str] = []
        self.sent: list[tuple[NodeId, str]] = []
        self.node = self.boot()
        world.net.attach(self.id, f"n{index}", self._on_frame, lambda dst: None)

    def boot(self) -> GossipNode:
        env = Env(NodeClock(self.world.clock), self.world.rng, self, self.disk)
        node = GossipNode(self.key, self.peer.addr, env, lambda: ([self.peer.addr], self.inventory),
                          GossipConfig(anti_entropy_s=self.anti_entropy_s), self)
        node.start()
        self.node = node
        return node

    def _on_frame(self, src: Hashable, topic: str, body: Any) -> None:
        assert isinstance(src, NodeId)
        self.node.receive(self.world.hosts[src].peer, topic, body)

    # hmnode.env.Network
    def send(self, dst: NodeId, addr: str | None, topic: str, body: dict[str, Any]) -> None:
        self.sent.append((dst, topic))
        self.world.net.send(self.id, dst, topic, body)

    def disconnect(self, dst: NodeId, reason: str) -> None:
        pass

    def misbehaved(self, peer: NodeId, reason: str) -> None:
        self.complaints.append(reason)

    # GossipObserver
    def advert_taken(self, advert: Advert, via: str, hops: int | None, now: float) -> None:
        self.taken.append((advert, via, hops))


class _World:
    def __init__(self, seed: int = 1) -> None:
        self.rng = Random(seed)
        self.clock = VirtualClock()
        self.net = SimNetwork(self.clock, self.rng, NetParams())
        self.hosts: dict[NodeId, _Host] = {}

    def host(self, disk: SimStore | None = None, anti_entropy_s: float = 1.0) -> _Host:
        host = _Host(self, len(self.hosts), disk, anti_entropy_s)
        self.hosts[host.id] = host
        return host


def _seq_on_disk(disk: SimStore) -> int:
    return disk.read(lambda tx: tx.get(schema.META, META_ADVERT_SEQ, 0))


# --- durability -----------------------------------------------------------------------------

def test_advert_sequence_is_synced_before_the_advert_is_sent() -> None:
    world = _World()
    host = world.host(SimStore(sync_on_commit=False))
    world.clock.run_until(2.0)  # the first look at the inventory advertises it
    first = host.node.own
    assert first is not None and first.seq == 1
    host.disk.crash()  # power loss right after sending
    assert _seq_on_disk(host.disk) == 1
    host.inventory = {"cpu": {"cores": 3}}
    again = host.boot()
    world.clock.run_until(4.0)
    assert again.own is not None and again.own.seq == 2


class _DiskThatNeverSyncs(SimStore):
    def sync(self) -> None:
        pass


def test_without_the_sync_a_power_loss_would_reuse_a_sequence() -> None:
    # The crash model is what makes the test above mean something: drop the sync and the
    # sequence number goes back, so the next advert would be refused everywhere as not newer.
    world = _World()
    host = world.host(_DiskThatNeverSyncs(sync_on_commit=False))
    world.clock.run_until(2.0)
    assert host.node.own is not None and host.node.own.seq == 1
    host.disk.crash()
    assert _seq_on_disk(host.disk) == 0


def test_restart_keeps_its_advert_and_readvertises_only_a_change() -> None:
    world = _World()
    host = world.host()
    world.clock.run_until(2.0)
    assert host.node.own is not None and host.node.own.seq == 1
    host.node.stop()
    restarted = host.boot()
    world.clock.run_until(5.0)
    assert restarted.own is not None and restarted.own.seq == 1
    host.inventory = {"cpu": {"cores": 8}}
    world.clock.run_until(8.0)
    assert restarted.own.seq == 2 and restarted.own.inventory == {"cpu": {"cores": 8}}


def test_sim_store_commits_are_atomic_and_a_crash_drops_only_the_unsynced() -> None:
    disk = SimStore(sync_on_commit=False)
    disk.write(lambda tx: tx.put(schema.META, "a", 1))
    disk.sync()
    disk.write(lambda tx: tx.put(schema.META, "b", 2))

    def fails(tx: Any) -> None:
        tx.put(schema.META, "c", 3)
        raise RuntimeError("midway")
    with pytest.raises(RuntimeError):
        disk.write(fails)
    assert disk.read(lambda tx: [tx.get(schema.META, k) for k in "abc"]) == [1, 2, None]
    assert disk.crash() == 1
    assert disk.read(lambda tx: dict(tx.items(schema.META))) == {"a": 1}
    disk.write(lambda tx: tx.delete(schema.META, "a"))
    disk.sync()
    disk.crash()
    assert disk.read(lambda tx: tx.count(schema.META)) == 0


# --- gossip ---------------------------------------------------------------------------------

def _joined(world: "_World", n: int) -> list[_Host]:
    """`n` nodes joined through the first, settled at t=10 s, anti-entropy slowed to a crawl
    (so that only the broadcast can spread an advert in time)."""
    hosts = [world.host(anti_entropy_s=600.0) for _ in range(n)]
    for host in hosts[1:]:
        host.node.join(hosts[0].peer)
        world.clock.run_until(world.clock.now + 0.5)
    world.clock.run_until(10.0)
    return hosts


def test_an_advert_made_before_any_neighbour_goes_down_the_tree_at_the_first() -> None:
    # Anti-entropy is slowed to a crawl here, so only the broadcast can spread the adverts in
    # time. A node advertises before its join completes; broadcast then, its advert would reach
    # nobody and spread a hop per few anti-entropy rounds (found at 1000 simulated nodes).
    world = _World()
    hosts = _joined(world, 6)
    late = world.host(anti_entropy_s=600.0)
    world.clock.run_until(11.0)
    assert late.node.own is not None  # advertised alone
    late.node.join(hosts[-1].peer)
    world.clock.run_until(13.0)
    for host in hosts:
        assert {a.node_id for a in host.node.adverts.all()} == {h.id for h in [*hosts, late]}
    assert any(via == "gossip" for host in hosts for adv, via, _ in host.taken
               if adv.node_id == late.id)


def test_an_advert_first_taken_by_sync_is_still_passed_on_by_the_broadcast() -> None:
    # A new neighbour's digest exchange often delivers an advert before its broadcast copy
    # arrives. That copy must still go on down the tree: treated as stale, the broadcast died
    # at the first hop and the advert crawled by anti-entropy (300 nodes failed to converge).
    world = _World()
    hosts = _joined(world, 6)
    origin, relay = hosts[0], hosts[1]
    origin.inventory = {"cpu": {"cores": 4}}
    advert = origin.node.publish()  # its broadcast is now on the wire
    relay.node.receive(hosts[2].peer, "sync-ans", {"adverts": [advert.to_wire()]})
    assert relay.node.adverts.get(origin.id) == advert
    sent_before = sum(1 for _, topic in relay.sent if topic == "bc")
    world.clock.run_until(11.0)
    assert relay.node.broadcast.has_seen(advert.msg_id)
    assert sum(1 for _, topic in relay.sent if topic == "bc") > sent_before  # passed on
    assert relay.complaints == []
    for host in hosts:
        assert host.node.adverts.get(origin.id) == advert


def test_anti_entropy_sends_only_what_the_peer_lacks() -> None:
    world = _World()
    a, b = world.host(), world.host()
    rng = Random(5)
    now = NodeClock(world.clock).now()
    extra = [make_advert(_key(rng), 1, ["10.9.9.9:1"], {}, None, now, 600.0) for _ in range(300)]
    for advert in extra:
        a.node.adverts.offer(advert, now)
    for advert in extra[:250]:
        b.node.adverts.offer(advert, now)
    b.node.join(a.peer)
    world.clock.run_until(5.0)
    held = {x.node_id for x in b.node.adverts.all()}
    assert {x.node_id for x in extra} <= held
    # What crossed: the 50 b lacked (and a's own), not the 300 a holds.
    synced = [adv for adv, via, _ in b.taken if via == "sync"]
    assert 50 <= len(synced) <= 52


@pytest.mark.parametrize("topic,body", [
    (SYNC_TOPIC, {"digest": [b"x"] * 3}),
    (SYNC_TOPIC, "nonsense"),
    (SYNC_HAVE_TOPIC, {"have": [[b"k" * 31, 1]]}),
    (SYNC_HAVE_TOPIC, {"have": [[b"k" * 32, "1"]]}),
    (SYNC_WANT_TOPIC, {"want": [1, 2]}),
    (SYNC_ANSWER_TOPIC, {"adverts": {"not": "a list"}}),
    (SYNC_ANSWER_TOPIC, {"adverts": [{"v": 1}]}),
    ("no-such-topic", {}),
])
def test_malformed_anti_entropy_is_refused_and_changes_nothing(topic: str, body: Any) -> None:
    world = _World()
    a, b = world.host(), world.host()
    world.clock.run_until(1.0)
    held = a.node.adverts.all()
    before = len(a.sent)
    a.node.receive(b.peer, topic, body)
    assert a.complaints and a.node.adverts.all() == held
    assert len(a.sent) == before


def test_a_forged_advert_in_a_sync_answer_is_not_taken() -> None:
    world = _World()
    a, b = world.host(), world.host()
    world.clock.run_until(1.0)
    genuine = b.node.own
    assert genuine is not None
    forged = Advert(genuine.node_id, 7, ("6.6.6.6:1",), {}, genuine.prices, genuine.issued_at,
                    genuine.expires_at, genuine.signature)
    a.node.receive(b.peer, SYNC_ANSWER_TOPIC, {"adverts": [forged.to_wire()]})
    assert a.node.adverts.get(b.id) is None
    assert any("bad signature" in c for c in a.complaints)


# --- the simulator's clocks and uplinks -----------------------------------------------------

def test_node_clock_runs_with_its_offset_and_drift() -> None:
    clock = VirtualClock()
    fast = NodeClock(clock, offset=5.0, drift=1e-3)
    fired: list[float] = []
    fast.call_at(fast.now() + 10.01, lambda: fired.append(clock.now))
    handle = fast.call_at(fast.now() + 1.0, lambda: fired.append(-1.0))
    handle.cancel()
    clock.run_until(100.0)
    assert fast.now() == pytest.approx(EPOCH + 5.0 + 100.1)
    assert fired == [pytest.approx(10.0)]


def test_uplink_limit_serialises_frames_and_drops_past_its_queue() -> None:
    clock = VirtualClock()
    net = SimNetwork(clock, Random(1), NetParams(latency_extra_s=0.0, uplink_queue_s=1.0))
    arrivals: list[float] = []
    net.attach("a", "a", lambda *_: None, lambda dst: None)
    net.attach("b", "b", lambda src, topic, body: arrivals.append(clock.now), lambda dst: None)
    net.limit_uplink("a", 1000.0)
    for _ in range(30):
        net.send("a", "b", "t", {"pad": b"x" * 90})
    clock.run_until(5.0)
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert 5 <= len(arrivals) < 30 and net.counters["drop-uplink"] == 30 - len(arrivals)
    frame = len(encode_message(Notify("t", {"pad": b"x" * 90})))
    assert all(g == pytest.approx(frame / 1000.0) for g in gaps)
