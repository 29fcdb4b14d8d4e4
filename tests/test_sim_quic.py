"""Real aioquic connections over the simulated UDP internet: handshakes and bulk transfer
through NATs and loss, NAT rebinding, hole punching, peer authentication, and what of a QUIC
run a seed reproduces."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aioquic.tls
import nacl.signing
from aioquic.quic import events
from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519

from hmnode.identity import NodeKey
from hmnode.simnet.sim.clock import VirtualClock
from hmnode.simnet.sim.nat import PORT_RESTRICTED_CONE, SYMMETRIC, Addr, Nat, NatProfile
from hmnode.simnet.sim.quic import AIOQUIC_OS_USERS, SeededEntropy, SimConnection, SimQuicEndpoint
from hmnode.simnet.sim.udp import PathParams, UdpNetwork, UdpParams
from hmnode.transport.wire import ErrorCode

SERVER: Addr = ("203.0.113.10", 4433)
THIRD: Addr = ("203.0.113.30", 4433)
CLIENT: Addr = ("192.168.1.2", 50000)
PEER: Addr = ("192.168.7.9", 50000)
NAT_IP, PEER_NAT_IP = "198.51.100.1", "198.51.100.2"
# 10% loss each way and a latency spread that reorders: 20 ms plus an exponential of mean 10 ms.
LOSSY = UdpParams(path=PathParams(latency_min_s=0.020, latency_extra_s=0.010, loss=0.10))
CLEAN = UdpParams(path=PathParams(latency_min_s=0.020, latency_extra_s=0.005))


class World:
    """One seed's simulation: its clock, network, and a way to make endpoints."""

    def __init__(self, seed: int, params: UdpParams = LOSSY, seed_entropy: bool = True) -> None:
        self.rng = random.Random(seed)
        self.clock = VirtualClock()
        self.net = UdpNetwork(self.clock, self.rng, params)
        self.seed_entropy = seed_entropy

    def nat(self, ip: str, profile: NatProfile) -> Nat:
        return self.net.add_nat(ip, profile)

    def endpoint(self, addr: Addr, nat: Nat | None = None, accept: bool = True,
                 on_event: Callable[[SimConnection, events.QuicEvent], None] | None = None,
                 ) -> SimQuicEndpoint:
        key = NodeKey(nacl.signing.SigningKey(self.rng.randbytes(32)))
        return SimQuicEndpoint(self.net, addr, key, self.rng, nat=nat, accept=accept,
                               seed_entropy=self.seed_entropy, on_event=on_event)

    def run_until(self, done: Callable[[], bool], limit_s: float, step_s: float = 0.05) -> bool:
        """Advance virtual time until `done()` or `limit_s`; returns whether it got done."""
        while not done():
            if self.clock.now >= limit_s:
                return False
            self.clock.run_until(min(limit_s, self.clock.now + step_s))
        return True


def _echo_back(server: SimQuicEndpoint) -> Callable[[SimConnection, events.QuicEvent], None]:
    """A server application: once a stream's request is complete, send it back reversed."""
    def on_event(conn: SimConnection, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived) and event.end_stream:
            server.send_stream(conn, event.stream_id, conn.received(event.stream_id)[::-1],
                               end_stream=True)
    return on_event


def _connected(w: World, profile: NatProfile, *, echo: bool = False, accept: bool = False,
               limit_s: float = 5.0) -> tuple[SimQuicEndpoint, SimQuicEndpoint, SimConnection, Nat]:
    """A public server (echoing requests back reversed if `echo`) and a client behind a NAT of
    `profile` (accepting connections if `accept`) that has dialled it and authenticated it within
    `limit_s`; returns the server, the client, the client's connection and the NAT."""
    server = w.endpoint(SERVER)
    if echo:
        server.on_event = _echo_back(server)
    nat = w.nat(NAT_IP, profile)
    client = w.endpoint(CLIENT, nat=nat, accept=accept)
    conn = client.connect(SERVER, expect=server.node_id)
    assert w.run_until(lambda: conn.established, limit_s), "handshake did not complete"
    return server, client, conn, nat


def transfer_scenario(seed: int, seed_entropy: bool = True, size: int = 200_000,
                      params: UdpParams = LOSSY) -> tuple[World, SimConnection, SimConnection, bytes]:
    """A client behind a port-restricted NAT uploads `size` bytes to a public server over a lossy,
    reordering path and gets them back reversed; returns the world, both connections and the
    payload."""
    w = World(seed, params, seed_entropy)
    server, client, conn, _ = _connected(w, PORT_RESTRICTED_CONE, echo=True, limit_s=10.0)
    payload = random.Random(seed).randbytes(size)
    client.send_stream(conn, 0, payload, end_stream=True)
    assert w.run_until(lambda: 0 in conn.finished, 120.0), "transfer did not complete"
    [sconn] = server.connections
    return w, conn, sconn, payload


# --- connecting and transferring --------------------------------------------------------------

def test_a_natted_client_transfers_200kb_both_ways_over_a_lossy_reordering_path() -> None:
    w, conn, sconn, payload = transfer_scenario(seed=7)
    # Mutual TLS: each side holds the other's node id, read from its certificate.
    assert conn.peer_id is not None and sconn.peer_id is not None
    assert sconn.peer_id != conn.peer_id
    assert conn.handshake_at is not None and conn.handshake_at < 2.0
    assert hashlib.sha256(sconn.received(0)).digest() == hashlib.sha256(payload).digest()
    assert hashlib.sha256(conn.received(0)).digest() == hashlib.sha256(payload[::-1]).digest()
    assert w.clock.now < 60.0  # bounded virtual time
    assert w.net.counters["drop-loss"] > 50  # the loss really happened, and was repaired
    # The server only ever saw the NAT's public address.
    assert sconn.last_source is not None and sconn.last_source[0] == NAT_IP


def test_a_client_behind_a_symmetric_nat_connects_to_a_public_server() -> None:
    w = World(seed=3, params=CLEAN)
    server, client, conn, _ = _connected(w, SYMMETRIC)
    client.send_stream(conn, 0, b"ping", end_stream=True)
    assert w.run_until(lambda: bool(server.connections) and 0 in server.connections[0].finished, 5.0)
    assert server.connections[0].received(0) == b"ping"


def test_an_unsolicited_handshake_to_a_host_behind_a_port_restricted_nat_is_dropped() -> None:
    w = World(seed=4, params=CLEAN)
    server, client, conn, _ = _connected(w, PORT_RESTRICTED_CONE, accept=True)
    [sconn] = server.connections
    client_public = sconn.last_source
    assert client_public is not None
    # A third node learns the client's public address and dials it: the NAT's filter drops its
    # Initials (and their retransmissions), so the client never even sees them.
    third = w.endpoint(THIRD)
    dial = third.connect(client_public, expect=client.node_id)
    assert not w.run_until(lambda: dial.established, 5.0)
    assert client.counters["accepted"] == 0 and len(client.connections) == 1
    assert w.net.counters["drop-filtered"] >= 3
    assert conn.established  # the solicited connection is unaffected


def test_the_connection_survives_a_nat_rebinding_mid_transfer() -> None:
    w = World(seed=5, params=CLEAN)
    # No port preservation: after the NAT forgets the binding, the next one gets a new port.
    server, client, conn, nat = _connected(
        w, dataclasses.replace(PORT_RESTRICTED_CONE, port_preservation=False), echo=True)
    [sconn] = server.connections
    before = sconn.last_source
    payload = random.Random(1).randbytes(200_000)
    client.send_stream(conn, 0, payload, end_stream=True)
    w.clock.run_until(w.clock.now + 0.3)
    assert 0 < len(sconn.received(0)) < len(payload)
    nat.reset()  # a router reboot: the server's packets to the old port now bounce
    assert w.run_until(lambda: 0 in conn.finished, 60.0)
    assert sconn.received(0) == payload and conn.received(0) == payload[::-1]
    assert sconn.last_source != before and sconn.last_source is not None
    assert sconn.last_source[0] == NAT_IP
    assert [b.external for b in nat.bindings(w.clock.now)] == [sconn.last_source]
    assert w.net.counters["drop-filtered"] > 0


# --- hole punching ----------------------------------------------------------------------------

def _punch_world(profile_a: NatProfile) -> tuple[World, SimQuicEndpoint, SimQuicEndpoint, Addr, Addr]:
    """Two endpoints behind NATs, each connected to a public rendezvous that saw their public
    addresses; returns the world, both endpoints and those addresses."""
    w = World(seed=6, params=CLEAN)
    rendezvous = w.endpoint(SERVER)
    a = w.endpoint(CLIENT, nat=w.nat(NAT_IP, profile_a))
    b = w.endpoint(PEER, nat=w.nat(PEER_NAT_IP, PORT_RESTRICTED_CONE))
    ca, cb = a.connect(SERVER), b.connect(SERVER)
    assert w.run_until(lambda: ca.established and cb.established, 5.0)
    seen = {c.peer_id: c.last_source for c in rendezvous.connections}
    return w, a, b, seen[a.node_id], seen[b.node_id]  # type: ignore[return-value]


def test_quic_through_two_port_restricted_nats_after_a_hole_punch() -> None:
    w, a, b, a_public, b_public = _punch_world(PORT_RESTRICTED_CONE)
    b.punch(a_public)  # opens B's NAT towards A (and is itself dropped by A's NAT)
    w.clock.run_until(w.clock.now + 0.1)
    direct = a.connect(b_public, expect=b.node_id)

    def both_ends_up() -> bool:
        return direct.established and any(c.established for c in b.connections if not c.is_client)

    assert w.run_until(both_ends_up, 5.0)
    [inbound] = [c for c in b.connections if not c.is_client]
    assert inbound.peer_id == a.node_id and inbound.last_source == a_public
    a.send_stream(direct, 0, b"direct", end_stream=True)
    assert w.run_until(lambda: 0 in inbound.finished, 5.0) and inbound.received(0) == b"direct"


def test_a_naive_punch_from_a_symmetric_nat_never_completes_a_handshake() -> None:
    w, a, b, a_public, b_public = _punch_world(SYMMETRIC)
    b.punch(a_public)  # the port A used towards the rendezvous; A's next mapping is another
    w.clock.run_until(w.clock.now + 0.1)
    direct = a.connect(b_public, expect=b.node_id)
    assert not w.run_until(lambda: direct.established, 5.0)
    assert not [c for c in b.connections if not c.is_client]


# --- authentication ---------------------------------------------------------------------------

def test_dialling_the_wrong_node_id_closes_with_auth_failed() -> None:
    w = World(seed=8, params=CLEAN)
    w.endpoint(SERVER)
    impostor_key = NodeKey(nacl.signing.SigningKey(b"\x01" * 32))
    client = w.endpoint(CLIENT)
    conn = client.connect(SERVER, expect=impostor_key.node_id)
    assert w.run_until(lambda: conn.terminated is not None, 5.0)
    assert not conn.established and client.counters["auth-failed"] == 1
    assert conn.terminated.error_code == ErrorCode.AUTH_FAILED  # type: ignore[union-attr]


# --- determinism ------------------------------------------------------------------------------

def _hashes(seed: int, seed_entropy: bool = True) -> tuple[str, str]:
    w, _, _, _ = transfer_scenario(seed, seed_entropy, size=50_000)
    return w.net.trace_hash(), w.net.shape_hash()


def test_a_seed_reproduces_every_byte_of_a_quic_run() -> None:
    first = _hashes(21)
    assert _hashes(21) == first
    other = _hashes(22)
    assert other[0] != first[0] and other[1] != first[1]


def test_without_seeded_entropy_only_the_shape_of_a_run_reproduces() -> None:
    """What the seeded entropy buys: unseeded, aioquic's random ids and TLS keys change every
    encrypted byte, but never a time, a size, a drop or an order."""
    first, second = _hashes(21, seed_entropy=False), _hashes(21, seed_entropy=False)
    assert first[0] != second[0]
    assert first[1] == second[1] == _hashes(21)[1]


def test_a_seed_reproduces_in_a_fresh_process_with_another_hash_seed() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_sim_quic as t; "
            "print(t._hashes(21)[0])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.strip() == _hashes(21)[0]


def test_seeded_entropy_is_reentrant_and_restores_aioquic() -> None:
    real_os = aioquic.tls.os
    a = SeededEntropy(random.Random(1))  # imports AIOQUIC_OS_USERS; patches nothing yet
    modules = [sys.modules[name] for name in AIOQUIC_OS_USERS]
    assert all(m.os is os for m in modules)
    # Besides `os` in those modules, SeededEntropy replaces the key generators aioquic.tls
    # reaches through these names; that is everything it patches.
    real_keys = {name: getattr(aioquic.tls, name) for name in ("x25519", "x448", "ec")}
    assert real_keys == {"x25519": x25519, "x448": x448, "ec": ec}
    real_generate = x25519.X25519PrivateKey.generate

    def patched() -> bool:
        return (all(m.os is not os for m in modules)
                and all(getattr(aioquic.tls, n) is not real for n, real in real_keys.items()))

    with a:
        assert aioquic.tls.os is not real_os and patched()
        drawn = aioquic.tls.os.urandom(16)
        with a:
            aioquic.tls.os.urandom(4)
        assert aioquic.tls.os is not real_os and patched()
        assert aioquic.tls.os.getpid() == os.getpid()  # everything else is the real module
        assert aioquic.tls.x25519.X25519PublicKey is x25519.X25519PublicKey
        # Only aioquic's names are rebound: cryptography's own classes are never modified.
        assert x25519.X25519PrivateKey.generate == real_generate
    assert aioquic.tls.os is real_os
    assert all(getattr(aioquic.tls, n) is real for n, real in real_keys.items())
    assert drawn == random.Random(1).randbytes(16) and a.drawn == 20
    assert all(m.os is os for m in modules)
