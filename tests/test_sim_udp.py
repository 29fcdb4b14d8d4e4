"""The simulated UDP internet: NAT behaviour end to end (RFC 4787), hole punching, latency,
loss, duplication, uplink serialisation and seed determinism."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

import pytest

from hmnode.simnet.sim.clock import VirtualClock
from hmnode.simnet.sim.nat import (
    FULL_CONE, HARSH_HOME, PORT_RESTRICTED_CONE, RESTRICTED_CONE, SYMMETRIC, Addr, Nat, NatProfile,
)
from hmnode.simnet.sim.udp import PathParams, UdpError, UdpNetwork, UdpParams

SERVER: Addr = ("203.0.113.10", 3478)
SERVER_OTHER_PORT: Addr = ("203.0.113.10", 3479)
OTHER_SERVER: Addr = ("203.0.113.20", 3478)
NAT_A_IP, NAT_B_IP = "198.51.100.1", "198.51.100.2"
A: Addr = ("10.0.0.2", 5000)
# On A's LAN, with A's port: the NAT cannot preserve both, so A2's external port is a new one.
A2: Addr = ("10.0.0.3", 5000)
B: Addr = ("10.1.0.2", 5000)

FAST = UdpParams(path=PathParams(latency_min_s=0.010, latency_extra_s=0.002))


class Inbox:
    """Collects what a host receives: (time, data, source as seen)."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.got: list[tuple[float, bytes, Addr]] = []

    def __call__(self, data: bytes, src: Addr) -> None:
        self.got.append((self.clock.now, data, src))

    def sources(self) -> list[Addr]:
        return [src for _, _, src in self.got]

    def source_of(self, data: bytes) -> Addr:
        [src] = [src for _, d, src in self.got if d == data]
        return src

    def payloads(self) -> list[bytes]:
        return [data for _, data, _ in self.got]


class World:
    """A clock, a network, and an inbox per bound address."""

    def __init__(self, seed: int = 1, params: UdpParams = FAST) -> None:
        self.clock = VirtualClock()
        self.net = UdpNetwork(self.clock, random.Random(seed), params)
        self.inbox: dict[Addr, Inbox] = {}

    def host(self, addr: Addr, nat: Nat | None = None,
             uplink_bytes_per_s: float | None = None) -> Inbox:
        inbox = Inbox(self.clock)
        self.inbox[addr] = inbox
        self.net.bind(addr, inbox, nat=nat, uplink_bytes_per_s=uplink_bytes_per_s)
        return inbox

    def send(self, src: Addr, dst: Addr, data: bytes = b"x") -> None:
        self.net.send(src, dst, data)

    def settle(self, seconds: float = 1.0) -> None:
        self.clock.run_until(self.clock.now + seconds)


def _nat_world(profile: NatProfile | None) -> tuple[World, Addr]:
    """A behind a NAT of `profile` has sent to SERVER; returns the world and A's address as
    SERVER saw it."""
    w = World()
    nat = w.net.add_nat(NAT_A_IP, profile) if profile is not None else None
    w.host(A, nat=nat)
    for addr in (SERVER, SERVER_OTHER_PORT, OTHER_SERVER):
        w.host(addr)
    w.send(A, SERVER, b"hello")
    w.settle()
    [seen] = w.inbox[SERVER].sources()
    return w, seen


# --- NAT behaviour end to end -----------------------------------------------------------------

def test_a_public_host_is_seen_as_itself_and_latency_is_at_least_the_minimum() -> None:
    w, seen = _nat_world(None)
    assert seen == A
    assert w.inbox[SERVER].got[0][0] >= 0.010


@pytest.mark.parametrize("profile, same_ip_other_port, other_ip", [
    (FULL_CONE, True, True),
    (RESTRICTED_CONE, True, False),
    (PORT_RESTRICTED_CONE, False, False),
    (SYMMETRIC, False, False),
])
def test_who_can_answer_a_natted_host(profile: NatProfile, same_ip_other_port: bool,
                                      other_ip: bool) -> None:
    w, seen = _nat_world(profile)
    assert seen[0] == NAT_A_IP  # the receiver sees the NAT's public IP, never the private one
    w.send(SERVER, seen, b"reply")
    w.send(SERVER_OTHER_PORT, seen, b"same-ip")
    w.send(OTHER_SERVER, seen, b"other-ip")
    w.settle()
    got = w.inbox[A].payloads()
    assert b"reply" in got  # the remote A sent to can always answer
    assert (b"same-ip" in got) is same_ip_other_port
    assert (b"other-ip" in got) is other_ip
    assert w.inbox[A].source_of(b"reply") == SERVER


@pytest.mark.parametrize("profile, same_port", [(FULL_CONE, True), (PORT_RESTRICTED_CONE, True),
                                               (SYMMETRIC, False)])
def test_mapping_as_seen_from_outside(profile: NatProfile, same_port: bool) -> None:
    w, seen = _nat_world(profile)
    w.send(A, OTHER_SERVER, b"second")
    w.settle()
    assert (w.inbox[OTHER_SERVER].sources()[0] == seen) is same_port


def test_private_addresses_are_unreachable_from_outside() -> None:
    w, seen = _nat_world(PORT_RESTRICTED_CONE)
    w.send(SERVER, A, b"direct")  # a private address does not route on the internet
    w.send(SERVER, (NAT_A_IP, seen[1] + 1), b"no-binding")
    w.settle()
    assert w.inbox[A].got == []
    assert w.net.counters["drop-noroute"] == 1 and w.net.counters["drop-filtered"] == 1


def test_a_binding_left_idle_past_its_timeout_refuses_the_reply() -> None:
    w, seen = _nat_world(HARSH_HOME)
    w.clock.run_until(25.0)
    w.send(SERVER, seen, b"in-time")
    w.clock.run_until(31.0)
    w.send(SERVER, seen, b"too-late")  # 31 s after A's last packet: a 30 s binding is gone
    w.settle()
    assert w.inbox[A].payloads() == [b"in-time"]


def _one_lan(profile: NatProfile) -> World:
    """A and A2 behind one NAT of `profile`, SERVER on the internet; A has sent b"a" and A2 has
    sent b"a2" to SERVER, and neither has arrived yet."""
    w = World()
    nat = w.net.add_nat(NAT_A_IP, profile)
    w.host(A, nat=nat)
    w.host(A2, nat=nat)
    w.host(SERVER)
    w.send(A, SERVER, b"a")
    w.send(A2, SERVER, b"a2")
    return w


def test_hosts_behind_one_nat_share_its_ip_and_talk_directly_on_the_lan() -> None:
    w = _one_lan(PORT_RESTRICTED_CONE)
    w.send(A, A2, b"lan")
    w.settle()
    first, second = w.inbox[SERVER].source_of(b"a"), w.inbox[SERVER].source_of(b"a2")
    assert first[0] == second[0] == NAT_A_IP and first[1] != second[1]
    assert w.inbox[A2].got[0][1:] == (b"lan", A)
    assert w.inbox[A2].got[0][0] < 0.005  # the LAN path, not the internet's


@pytest.mark.parametrize("hairpinning", [True, False])
def test_hairpinning(hairpinning: bool) -> None:
    w = _one_lan(dataclasses.replace(FULL_CONE, hairpinning=hairpinning))
    w.settle()
    a_ext, a2_ext = w.inbox[SERVER].source_of(b"a"), w.inbox[SERVER].source_of(b"a2")
    w.send(A2, a_ext, b"hairpin")  # to A's public address, from inside the same NAT
    w.settle()
    if hairpinning:
        # The source is A2's external address, so A can answer it through the NAT too.
        assert w.inbox[A].got[-1][1:] == (b"hairpin", a2_ext)
    else:
        assert w.inbox[A].got == [] and w.net.counters["drop-hairpin"] == 1


# --- hole punching ----------------------------------------------------------------------------

def _two_nats(profile_a: NatProfile, profile_b: NatProfile) -> tuple[World, Addr, Addr]:
    """A and B behind their own NATs, each having told SERVER (a rendezvous) where it is; returns
    the world and their addresses as SERVER saw them."""
    w = World(seed=3)
    w.host(A, nat=w.net.add_nat(NAT_A_IP, profile_a))
    w.host(B, nat=w.net.add_nat(NAT_B_IP, profile_b))
    w.host(SERVER)
    w.send(A, SERVER, b"a")
    w.send(B, SERVER, b"b")
    w.settle()
    return w, w.inbox[SERVER].source_of(b"a"), w.inbox[SERVER].source_of(b"b")


def test_port_restricted_cones_connect_only_after_both_sides_punch() -> None:
    w, a_ext, b_ext = _two_nats(PORT_RESTRICTED_CONE, PORT_RESTRICTED_CONE)
    w.send(A, b_ext, b"a1")  # B's NAT has never seen A: dropped, but A's NAT now expects B
    w.settle()
    assert w.inbox[B].got == [] and w.net.counters["drop-filtered"] == 1
    w.send(B, a_ext, b"b1")  # passes A's NAT, and opens B's NAT towards A
    w.settle()
    w.send(A, b_ext, b"a2")
    w.settle()
    assert w.inbox[A].got[0][1:] == (b"b1", b_ext)
    assert w.inbox[B].got[0][1:] == (b"a2", a_ext)


def test_simultaneous_punches_race_through() -> None:
    w, a_ext, b_ext = _two_nats(PORT_RESTRICTED_CONE, PORT_RESTRICTED_CONE)
    for _ in range(3):  # both at once, a few times, as a real puncher does
        w.send(A, b_ext, b"a")
        w.send(B, a_ext, b"b")
        w.clock.run_until(w.clock.now + 0.02)
    w.settle()
    assert w.inbox[A].payloads() and w.inbox[B].payloads()


@pytest.mark.parametrize("profile_b", [PORT_RESTRICTED_CONE, SYMMETRIC])
def test_a_naive_single_port_punch_from_a_symmetric_nat_fails(profile_b: NatProfile) -> None:
    w, a_ext, b_ext = _two_nats(SYMMETRIC, profile_b)
    for _ in range(5):
        w.send(A, b_ext, b"a")
        w.send(B, a_ext, b"b")
        w.settle(0.5)
    # A's NAT gave the path to B a fresh port, which B's NAT never opened for; B punched the
    # port A used towards the rendezvous, which admits only the rendezvous.
    assert w.inbox[A].got == [] and w.inbox[B].got == []
    assert w.net.counters["drop-filtered"] == 10


def test_a_symmetric_nat_does_reach_a_full_cone() -> None:
    w, a_ext, b_ext = _two_nats(SYMMETRIC, FULL_CONE)
    w.send(A, b_ext, b"a")
    w.settle()
    [(_, data, a_seen)] = w.inbox[B].got
    assert data == b"a" and a_seen != a_ext  # a new mapping for a new destination
    w.send(B, a_seen, b"b")  # answering the port it really came from works
    w.settle()
    assert w.inbox[A].payloads() == [b"b"]


# --- the path: latency, loss, duplication, bandwidth ------------------------------------------

def _burst(params: UdpParams, payloads: Iterable[bytes], settle_s: float = 1.0,
           a_uplink_bytes_per_s: float | None = None) -> World:
    """Public hosts A and SERVER; A has sent each of `payloads` to SERVER at once, and
    `settle_s` has passed."""
    w = World(params=params)
    w.host(A, uplink_bytes_per_s=a_uplink_bytes_per_s)
    w.host(SERVER)
    for data in payloads:
        w.send(A, SERVER, data)
    w.settle(settle_s)
    return w


def test_latency_spread_reorders_datagrams() -> None:
    w = _burst(UdpParams(path=PathParams(latency_min_s=0.010, latency_extra_s=0.010)),
               (i.to_bytes(2, "big") for i in range(200)))
    order = [int.from_bytes(d, "big") for d in w.inbox[SERVER].payloads()]
    assert sorted(order) == list(range(200)) and order != list(range(200))
    assert min(t for t, _, _ in w.inbox[SERVER].got) >= 0.010


def test_loss_and_duplication_rates() -> None:
    w = _burst(UdpParams(path=PathParams(loss=0.1, duplicate=0.05)),
               (i.to_bytes(2, "big") for i in range(4000)))
    lost = w.net.counters["drop-loss"]
    assert 300 < lost < 500
    assert 140 < w.net.counters["duplicate"] < 240
    assert len(w.inbox[SERVER].got) == 4000 - lost + w.net.counters["duplicate"]


def test_per_path_parameters_override_the_default() -> None:
    w = World()
    w.host(A)
    w.host(SERVER)
    w.host(OTHER_SERVER)
    w.net.set_path(A[0], OTHER_SERVER[0], PathParams(latency_min_s=0.200, latency_extra_s=0.0))
    w.send(A, SERVER)
    w.send(A, OTHER_SERVER)
    w.send(OTHER_SERVER, A)  # both directions
    w.settle()
    assert w.inbox[SERVER].got[0][0] < 0.1
    assert w.inbox[OTHER_SERVER].got[0][0] == pytest.approx(0.200)
    assert w.inbox[A].got[0][0] == pytest.approx(0.200)


def test_an_uplink_serialises_at_its_rate() -> None:
    # 100 kB at 100 kB/s, all queued at t=0.
    w = _burst(UdpParams(path=PathParams(latency_min_s=0.010, latency_extra_s=0.0),
                         uplink_queue_bytes=1 << 20),
               [b"\0" * 1000] * 100, settle_s=5.0, a_uplink_bytes_per_s=100_000.0)
    times = [t for t, _, _ in w.inbox[SERVER].got]
    assert len(times) == 100
    assert times[0] == pytest.approx(0.010 + 0.010)  # 10 ms to serialise, 10 ms to travel
    assert times[-1] == pytest.approx(1.0 + 0.010)  # N/B, plus the last one's travel
    gaps = {round(b - a, 9) for a, b in zip(times, times[1:])}
    assert gaps == {0.01}


def test_an_overfull_uplink_queue_drops_and_counts() -> None:
    w = _burst(UdpParams(uplink_bytes_per_s=100_000.0, uplink_queue_bytes=10_000),
               [b"\0" * 1000] * 100)
    assert len(w.inbox[SERVER].got) == 10 and w.net.counters["drop-queue"] == 90
    # Once the queue has drained, sending works again.
    w.send(A, SERVER, b"\0" * 1000)
    w.settle()
    assert len(w.inbox[SERVER].got) == 11


def test_oversized_datagrams_are_dropped() -> None:
    w = _burst(UdpParams(max_datagram_bytes=1500), [b"\0" * 1501])
    assert w.inbox[SERVER].got == [] and w.net.counters["drop-size"] == 1


def test_misuse_is_a_typed_error() -> None:
    w = World()
    w.host(A)
    nat = w.net.add_nat(NAT_A_IP, FULL_CONE)
    with pytest.raises(UdpError):
        w.send(B, A)  # B is not bound
    with pytest.raises(UdpError):
        w.host(A)
    with pytest.raises(UdpError):
        w.host((NAT_A_IP, 80))  # a NAT's public IP cannot also be a host's
    with pytest.raises(UdpError):
        w.net.add_nat(NAT_A_IP, FULL_CONE)
    with pytest.raises(UdpError):
        PathParams(loss=1.5)
    other = UdpNetwork(VirtualClock(), random.Random(1))
    with pytest.raises(UdpError):
        other.bind(B, lambda d, s: None, nat=nat)  # a NAT from another network


def test_an_unbound_host_gets_nothing_more() -> None:
    w = World()
    w.host(A)
    w.host(SERVER)
    w.send(A, SERVER)
    w.net.unbind(SERVER)
    w.settle()
    assert w.inbox[SERVER].got == [] and w.net.counters["drop-noport"] == 1


# --- determinism ------------------------------------------------------------------------------

def _busy_run(seed: int) -> tuple[str, str]:
    params = UdpParams(path=PathParams(latency_min_s=0.01, latency_extra_s=0.02, loss=0.1,
                                       duplicate=0.05),
                       uplink_bytes_per_s=200_000.0, uplink_queue_bytes=20_000)
    w = World(seed=seed, params=params)
    rng = random.Random(99)  # the traffic itself is fixed; only the network's seed varies
    hosts = [A, B, SERVER, OTHER_SERVER]
    w.host(A, nat=w.net.add_nat(NAT_A_IP, SYMMETRIC))
    w.host(B, nat=w.net.add_nat(NAT_B_IP, PORT_RESTRICTED_CONE))
    w.host(SERVER)
    w.host(OTHER_SERVER)
    for step in range(600):
        src = hosts[rng.randrange(4)]
        dst = rng.choice([SERVER, OTHER_SERVER] + [s for _, _, s in w.inbox[src].got[-2:]])
        if dst != src:
            w.send(src, dst, rng.randbytes(rng.randrange(20, 1400)))
        w.clock.run_until(step * 0.005)
    w.settle(2.0)
    return w.net.trace_hash(), w.net.shape_hash()


def test_the_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    first = _busy_run(11)
    assert first == _busy_run(11)
    other = _busy_run(12)
    assert other[0] != first[0] and other[1] != first[1]
