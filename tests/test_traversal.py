"""NAT traversal: the sans-IO cores (also under the simulator's NAT model) and the real driver
on loopback QUIC (observed addresses, dial-backs, relay circuits, the upgrade to direct)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from hmnode.identity import NodeKey
from hmnode.simnet.sim import nat as simnat
from hmnode.transport.connection import Handlers, RemoteError, TransportError
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.punch import BirthdayPlan, PunchStrategy, choose_strategy
from hmnode.transport.reachability import (DIAL_BACK_PADDING_BYTES, DialBackRefused,
                                           ObservedAddresses, Reachability, check_dial_back)
from hmnode.transport.relay import RelayedAddress, RelayLimits, RelayRefused, RelayService
from hmnode.transport.traversal import NatTraversal, TraversalConfig

KEYS = [NodeKey.generate() for _ in range(6)]
IDS = [k.node_id for k in KEYS]


# --- observed addresses and reachability ---------------------------------------------------


def test_one_port_seen_from_two_peers_is_a_cone_and_two_ports_are_symmetric() -> None:
    obs = ObservedAddresses()
    assert obs.reachability(0) == Reachability.UNKNOWN
    obs.observe("a", "198.51.100.1", ("203.0.113.5", 4000), 0)
    assert obs.mapping(0) == Reachability.UNKNOWN  # one reporter tells nothing
    obs.observe("b", "198.51.100.2", ("203.0.113.5", 4000), 1)
    assert obs.mapping(1) == Reachability.CONE
    obs.observe("c", "198.51.100.3", ("203.0.113.5", 4711), 2)
    assert obs.mapping(2) == Reachability.SYMMETRIC
    obs.confirm(("203.0.113.5", 4000), 3)
    assert obs.reachability(3) == Reachability.PUBLIC
    obs.unconfirm(("203.0.113.5", 4000))
    assert obs.reachability(3) == Reachability.SYMMETRIC


def test_reports_age_out_and_one_reporter_counts_once() -> None:
    obs = ObservedAddresses()
    for i in range(40):  # one chatty peer cannot fill the table or vote twice
        obs.observe("a", "198.51.100.1", ("203.0.113.5", 4000 + i), float(i))
    assert obs.addresses(40.0) == [("203.0.113.5", 4039)]
    assert obs.mapping(40.0) == Reachability.UNKNOWN
    assert obs.addresses(40.0 + 10_000) == []


def test_mapping_classified_from_the_simulators_nats() -> None:
    """What peers on three IPs would report through each RFC 4787 NAT profile."""
    expected = {"full-cone": Reachability.CONE, "port-restricted-cone": Reachability.CONE,
                "harsh-home": Reachability.CONE, "symmetric": Reachability.SYMMETRIC}
    for name, kind in expected.items():
        nat = simnat.Nat("203.0.113.9", simnat.PRESETS[name], random.Random(7))
        obs = ObservedAddresses()
        for i, peer in enumerate(["198.51.100.1", "198.51.100.2", "198.51.100.3"]):
            seen = nat.outbound(("10.0.0.2", 4819), (peer, 4819), float(i))
            obs.observe(peer, peer, seen, float(i))
        assert obs.mapping(3.0) == kind, name


def test_dial_back_to_another_ip_costs_padding() -> None:
    check_dial_back("198.51.100.1", ("198.51.100.1", 4819), 0)
    with pytest.raises(DialBackRefused, match="padding"):
        check_dial_back("198.51.100.1", ("192.0.2.7", 4819), 0)
    check_dial_back("198.51.100.1", ("192.0.2.7", 4819), DIAL_BACK_PADDING_BYTES)
    with pytest.raises(DialBackRefused):
        check_dial_back("198.51.100.1", ("example.org", 4819), DIAL_BACK_PADDING_BYTES)
    with pytest.raises(DialBackRefused):
        check_dial_back("198.51.100.1", ("198.51.100.1", 0), 0)


# --- strategies and birthday probing ----------------------------------------------------------

MIRROR = {PunchStrategy.DIRECT: PunchStrategy.THEY_DIAL, PunchStrategy.THEY_DIAL: PunchStrategy.DIRECT,
          PunchStrategy.PUNCH: PunchStrategy.PUNCH, PunchStrategy.RELAY_ONLY: PunchStrategy.RELAY_ONLY,
          PunchStrategy.BIRTHDAY_HARD: PunchStrategy.BIRTHDAY_EASY,
          PunchStrategy.BIRTHDAY_EASY: PunchStrategy.BIRTHDAY_HARD}


@given(st.sampled_from(list(Reachability)), st.sampled_from(list(Reachability)))
def test_both_ends_choose_the_two_halves_of_one_plan(a: Reachability, b: Reachability) -> None:
    mine, theirs = choose_strategy(a, b), choose_strategy(b, a)
    if a == b == Reachability.PUBLIC:
        assert mine == theirs == PunchStrategy.DIRECT  # both may dial; the endpoint keeps one
    else:
        assert MIRROR[mine] == theirs


def test_only_two_symmetric_nats_are_left_to_the_relay() -> None:
    assert choose_strategy(Reachability.SYMMETRIC, Reachability.SYMMETRIC) == PunchStrategy.RELAY_ONLY
    assert choose_strategy(Reachability.SYMMETRIC, Reachability.CONE) == PunchStrategy.BIRTHDAY_HARD
    assert choose_strategy(Reachability.UNKNOWN, Reachability.CONE) == PunchStrategy.PUNCH


def test_birthday_plan_is_bounded_and_its_odds_are_as_documented() -> None:
    plan = BirthdayPlan()
    ports = [p for batch in plan.batches(random.Random(1)) for p in batch]
    assert len(ports) == len(set(ports)) == plan.probes
    assert all(1024 <= p <= 65535 for p in ports)
    assert 0.97 < plan.hit_probability() < 0.99


def test_birthday_probing_through_the_simulators_nats() -> None:
    """The hard side (symmetric NAT) primes 256 sockets towards the easy side (port-restricted
    cone); the easy side's probes to random ports get through where they meet one: over 90% of
    seeds, as the plan promises."""
    plan = BirthdayPlan()
    hits = 0
    seeds = range(60)
    for seed in seeds:
        rng = random.Random(seed)
        hard = simnat.Nat("203.0.113.1", simnat.SYMMETRIC, rng)
        easy = simnat.Nat("198.51.100.1", simnat.PORT_RESTRICTED_CONE, rng)
        easy_public = easy.outbound(("10.1.0.2", 4819), ("192.0.2.1", 4819), 0.0)  # via a peer
        for i in range(plan.hard_ports):
            hard.outbound(("10.0.0.2", 20_000 + i), easy_public, 0.1)  # the primers
        connected = False
        for batch in plan.batches(rng):
            for port in batch:
                src = easy.outbound(("10.1.0.2", 4819), ("203.0.113.1", port), 0.2)
                if hard.inbound(("203.0.113.1", port), src, 0.3) is not None:
                    connected = True
            if connected:
                break
        hits += connected
    assert hits / len(seeds) >= 0.9


# --- the relay's book ------------------------------------------------------------------------


def test_relay_enforces_its_limits() -> None:
    relay = RelayService(RelayLimits(max_reservations=2, max_circuits_per_peer=1, circuit_bytes=1000,
                                     circuit_s=10, reservation_s=100))
    relay.reserve(IDS[1], 0)
    relay.reserve(IDS[2], 0)
    with pytest.raises(RelayRefused, match="full"):
        relay.reserve(IDS[3], 0)
    relay.reserve(IDS[1], 1)  # a renewal is not a new slot
    with pytest.raises(RelayRefused, match="no reservation"):
        relay.open(IDS[1], IDS[3], 0)
    circuit = relay.open(IDS[3], IDS[1], 0)
    with pytest.raises(RelayRefused, match="already has"):
        relay.open(IDS[4], IDS[1], 0)
    assert relay.carry(circuit.cid, IDS[3], 600, 1) == (IDS[1], None)
    other, over = relay.carry(circuit.cid, IDS[1], 600, 1)
    assert other == IDS[3] and "bytes" in over
    with pytest.raises(RelayRefused):
        relay.carry(circuit.cid, IDS[5], 1, 1)  # not an end of this circuit
    relay.expire(200)
    assert relay.reservations == {}
    with pytest.raises(RelayRefused, match="does not relay"):
        RelayService(RelayLimits(enabled=False)).reserve(IDS[1], 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "open", "close_peer", "expire"]),
                          st.integers(0, 5), st.integers(0, 5)), max_size=60))
def test_relay_never_holds_more_than_its_limits(ops: list[tuple[str, int, int]]) -> None:
    limits = RelayLimits(max_reservations=3, max_circuits=4, max_circuits_per_peer=2, reservation_s=5)
    relay = RelayService(limits)
    now = 0.0
    for op, a, b in ops:
        now += 1
        try:
            if op == "reserve":
                relay.reserve(IDS[a], now)
            elif op == "open":
                relay.open(IDS[a], IDS[b], now)
            elif op == "close_peer":
                relay.close_peer(IDS[a])
            else:
                relay.expire(now)
        except RelayRefused:
            pass
        assert len(relay.reservations) <= limits.max_reservations
        assert len(relay.circuits) <= limits.max_circuits
        for peer in IDS:
            assert sum(peer in (c.src, c.dst) for c in relay.circuits.values()) <= limits.max_circuits_per_peer


def test_relayed_address_round_trips_and_refuses_garbage() -> None:
    addr = RelayedAddress(IDS[0], "198.51.100.7", 4819)
    assert RelayedAddress.parse(str(addr)) == addr
    v6 = RelayedAddress(IDS[0], "2001:db8::1", 4819)
    assert RelayedAddress.parse(str(v6)) == v6
    for bad in ["198.51.100.7:4819/relay", f"{IDS[0]}@198.51.100.7:4819", "x@y:1/relay"]:
        with pytest.raises(ValueError):
            RelayedAddress.parse(bad)


# --- the driver on loopback QUIC --------------------------------------------------------------


def looped(case):
    """Run an async test case on a fresh event loop, bounded in time."""
    def test() -> None:
        asyncio.run(asyncio.wait_for(case(), 60))
    test.__name__ = case.__name__
    return test


async def echo(conn, body):
    return body


class Node:
    """A real endpoint with NAT traversal on loopback."""

    def __init__(self, config: TraversalConfig) -> None:
        self.key = NodeKey.generate()
        self.endpoint = Endpoint(self.key, Handlers(rpc={"echo": echo}))
        self.traversal = NatTraversal(self.endpoint, self.key, config, rng=random.Random(3))
        self.task: asyncio.Task | None = None

    async def start(self) -> "Node":
        await self.endpoint.start("127.0.0.1", 0)
        self.task = asyncio.create_task(self.traversal.run())
        return self

    @property
    def addr(self):
        return self.endpoint.addresses[0]

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.endpoint.close()


async def nodes(n: int, config: TraversalConfig = TraversalConfig(tick_s=0.1)) -> list[Node]:
    return [await Node(config).start() for _ in range(n)]


PRIVATE = TraversalConfig(tick_s=0.1, force_reachability=Reachability.CONE)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def reserve_through(node: Node, relay: Node) -> None:
    """`node` connects to `relay`, which finds itself public, and takes a reservation there
    the way a private node does."""
    await node.endpoint.connect(relay.addr, relay.key.node_id)
    await until(lambda: relay.traversal.reachability == Reachability.PUBLIC)
    node.traversal.relaying.candidates = [(relay.addr, relay.key.node_id)]
    await node.traversal.relaying.keep_reservation()
    assert node.traversal.relaying.reservation is not None


@looped
async def test_peers_report_observed_addresses_and_a_dial_back_confirms_them() -> None:
    a, b = await nodes(2)
    try:
        await a.endpoint.connect(b.addr, b.key.node_id)
        await until(lambda: a.traversal.reachability == Reachability.PUBLIC
                    and b.traversal.reachability == Reachability.PUBLIC)
        assert a.traversal.observed.confirmed(time.monotonic()) == [a.addr]
        status = a.traversal.status()
        assert status["reachability"] == "public" and status["observed"] == [f"127.0.0.1:{a.addr[1]}"]
    finally:
        for n in (a, b):
            await n.stop()


@looped
async def test_relay_circuit_carries_an_end_to_end_authenticated_connection() -> None:
    relay, a = await nodes(2)
    b = await Node(PRIVATE).start()
    forwarded: list[bytes] = []
    original = relay.traversal.relaying.forward

    def spy(conn, body):
        if isinstance(body.get("d"), list):
            forwarded.extend(body["d"])
        return original(conn, body)

    relay.traversal.relaying.forward = spy  # observe only: the relay's own code still forwards
    try:
        await reserve_through(b, relay)
        relayed = RelayedAddress(relay.key.node_id, *relay.addr)
        assert str(relayed) in b.traversal.advertised([])
        conn = await a.traversal.relaying.connect(b.key.node_id, relayed)
        assert conn.is_relayed and conn.peer_id == b.key.node_id
        secret = b"the relay must not read this " * 8
        assert await conn.request("echo", secret) == secret
        assert forwarded and not any(b"the relay must not read" in d for d in forwarded)
        assert a.traversal.path_of(conn) == {"path": "relayed", "relay": str(relay.key.node_id)}
        # Dialling with the wrong expected id through the circuit fails authentication.
        with pytest.raises(TransportError):
            await a.traversal.relaying.connect(KEYS[0].node_id, relayed, timeout=2)
    finally:
        for n in (a, b, relay):
            await n.stop()


@looped
async def test_relay_refuses_without_a_reservation_and_when_switched_off() -> None:
    relay, a = await nodes(2)
    b = await Node(PRIVATE).start()
    off = await Node(TraversalConfig(tick_s=0.1, relay=RelayLimits(enabled=False))).start()
    try:
        await b.endpoint.connect(relay.addr, relay.key.node_id)
        with pytest.raises(TransportError, match="refused"):
            await a.traversal.relaying.connect(b.key.node_id, RelayedAddress(relay.key.node_id, *relay.addr))
        conn = await b.endpoint.connect(off.addr, off.key.node_id)
        await until(lambda: off.traversal.reachability == Reachability.PUBLIC)
        with pytest.raises(RemoteError, match="does not relay"):
            await conn.request("relay.reserve", {})
    finally:
        for n in (a, b, relay, off):
            await n.stop()


@looped
async def test_circuit_over_its_byte_limit_is_closed_by_the_relay() -> None:
    relay = await Node(TraversalConfig(tick_s=0.1, relay=RelayLimits(circuit_bytes=60_000))).start()
    a = await Node(TraversalConfig(tick_s=0.1)).start()
    b = await Node(PRIVATE).start()
    try:
        await reserve_through(b, relay)
        conn = await a.traversal.relaying.connect(b.key.node_id, RelayedAddress(relay.key.node_id, *relay.addr))
        with pytest.raises(TransportError):
            for _ in range(20):
                await conn.request("echo", bytes(10_000), timeout=2)
        await until(lambda: conn.closed.done())
        assert relay.traversal.relaying.service.circuits == {}
    finally:
        for n in (a, b, relay):
            await n.stop()


@looped
async def test_forged_relay_data_is_ignored() -> None:
    relay, a = await nodes(2)
    b = await Node(PRIVATE).start()
    try:
        await reserve_through(b, relay)
        mallory = await a.endpoint.connect(b.addr, b.key.node_id)
        # Circuit data from a node that is not b's relay opens nothing on b.
        mallory.notify("relay.data", {"c": 1, "d": [b"\x00junk"], "f": KEYS[0].node_id.key})
        mallory.notify("relay.data", "not a map")
        await asyncio.sleep(0.2)
        assert b.traversal.relaying.circuits == {}
        assert b.endpoint.misbehaviour[str(a.key.node_id)] >= 1
    finally:
        for n in (a, b, relay):
            await n.stop()


@looped
async def test_a_direct_connection_replaces_the_relayed_one() -> None:
    relay, a = await nodes(2)
    b = await Node(PRIVATE).start()
    try:
        await reserve_through(b, relay)
        a.traversal.addresses_of = lambda peer: (
            [str(RelayedAddress(relay.key.node_id, *relay.addr))] if peer == b.key.node_id else [])
        conn = await a.traversal.connect(b.key.node_id)
        assert conn.is_relayed
        await until(lambda: not a.endpoint.peers[b.key.node_id].is_relayed)
        direct = a.endpoint.peers[b.key.node_id]
        assert await direct.request("echo", b"hi") == b"hi"
        await until(lambda: conn.closed.done())
        assert b.key.node_id in a.traversal.time_to_direct_ms
    finally:
        for n in (a, b, relay):
            await n.stop()


def test_an_advert_carries_the_longest_relayed_address() -> None:
    from hmnode.adverts import Advert, make_advert

    longest = str(RelayedAddress(IDS[0], "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535))
    advert = make_advert(KEYS[1], 1, [longest, "198.51.100.7:4819"], {}, None, 0.0, 600.0)
    assert Advert.from_wire(advert.to_wire()).addresses == (longest, "198.51.100.7:4819")


def test_far_hop_survives_rate_limited_routers() -> None:
    from hmnode.transport.hops import far_hop, primer_ttl

    T, F = True, False
    assert far_hop([T, T, F, F, F]) == 3  # own NAT, the core, then the far NAT
    assert far_hop([F, T, F, F, F]) == 3  # the NAT's answer was rate-limited away
    assert far_hop([T, T, T, F, F]) == 4  # a double NAT
    assert far_hop([F, F, F, F, F]) is None  # no ICMP at all: unknown
    assert far_hop([T, T, T, T, T]) is None  # farther than the probes reach
    assert primer_ttl(3) == 2 and primer_ttl(None) == 2 and primer_ttl(1) == 1
    assert primer_ttl(2, depth=2) == 3  # the traced depth wins over a short far measure


def test_nat_depth_from_a_trace() -> None:
    from hmnode.transport.hops import depth_of

    assert depth_of(["10.2.0.1", "11.0.2.1", None]) == 1
    assert depth_of(["192.168.4.1", "10.4.0.1", "11.0.4.1", None]) == 2
    assert depth_of(["11.0.1.1", None]) == 0  # public: no NAT
    assert depth_of([None, "11.0.2.1", None]) == 1  # the NAT's own answer was rationed away
    assert depth_of(["192.168.4.1", "10.4.0.1", None, None]) == 2  # the public router kept quiet
    assert depth_of(["100.64.0.1", "11.0.2.1"]) == 1  # carrier-grade NAT space is private
    assert depth_of([None, None]) is None
