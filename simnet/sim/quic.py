"""Real QUIC in the simulator: aioquic's sans-IO `QuicConnection` over `UdpNetwork`, timed by
the VirtualClock.

A `SimQuicEndpoint` is what `transport/endpoint.py` is on a real socket, minus asyncio: one bound
address that both dials and accepts, routing each datagram to the connection its destination
connection id names (ids learnt from aioquic's ConnectionIdIssued/Retired events) and starting a
server connection for a new Initial. Its configuration is hmnode's own
(`transport.quic.make_configuration`, mutual TLS 1.3 with self-signed Ed25519 certificates,
ALPN `hmnode/1`) and its connections are `MutualQuicConnection`s, so the server demands the
client's certificate; after the handshake each side reads the peer's node id from its
certificate, and a client that dialled a node id closes with AUTH_FAILED if it got another. Nothing
here needs an asyncio object: aioquic's connection only ever takes `now` as an argument.

Determinism. aioquic draws randomness in two ways: `os.urandom` (connection ids, stateless reset
tokens, TLS client/server randoms, PATH_CHALLENGE data, version negotiation's first byte, retry
nonces, session ticket fields) and `cryptography`'s key generation for TLS key shares (a client
offers X25519, X448, P-256 and P-384 shares; the server answers with one). `SeededEntropy`
replaces, for the duration of each call this driver makes into aioquic and nothing longer:

- the `os` name inside `aioquic.tls`, `aioquic.quic.connection`, `aioquic.quic.packet` and
  `aioquic.quic.retry` by a stand-in whose `urandom` reads a seeded generator (the real `os`
  module, and every other module's use of it, is untouched);
- `X25519PrivateKey.generate`, `X448PrivateKey.generate` and `ec.generate_private_key` as seen
  from `aioquic.tls` by functions that derive the private key from the same generator.

An endpoint's certificates take their serial number from the same generator (drawn as
`x509.random_serial_number()` draws it) and start their validity at the fixed `SIM_CERT_EPOCH`
instead of the wall clock. This is done even with `seed_entropy=False`: a certificate is
configuration, and a random serial is one byte shorter in DER about once in 256 draws, which would
shift the sizes of handshake packets.

Ed25519 signatures are deterministic (RFC 8032) and AEAD/header protection are pure functions of
keys and packet numbers, so with these seeded every datagram's bytes are fixed by the seed:
`UdpNetwork.trace_hash()` (which digests payloads) then reproduces exactly, across processes and
PYTHONHASHSEED values (aioquic's sets are only used for membership, never iterated into output).
What stays non-deterministic, precisely:

- with `seed_entropy=False`: connection ids, stateless reset tokens, TLS randoms and key
  shares, hence every encrypted byte. Sizes, times, drops and ordering do not depend on them
  (ids, randoms and key shares have fixed lengths), so `UdpNetwork.shape_hash()` still
  reproduces while `trace_hash()` does not;
- a draw made by calling a connection's `quic` object directly instead of through
  `SimQuicEndpoint.act`. In aioquic 1.7 draws happen only in the connection's constructor,
  `connect`, `receive_datagram` (TLS randoms and key shares, replenished connection ids) and
  `datagrams_to_send` (PATH_CHALLENGE data), and the driver makes all of those calls itself;
- node keys: they are the caller's (the tests derive them from the seed);
- anything a future aioquic or cryptography draws by another route (for instance OpenSSL's RNG
  called from Rust for a new key type, or `from os import urandom`): the determinism test in
  tests/test_sim_quic.py fails if that happens;
- the patch is process-global while active: another thread using aioquic at that instant would
  draw from the seeded stream. The simulator is single-threaded; nothing here is thread-safe.
"""

from __future__ import annotations

import datetime
import importlib
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from random import Random
from types import ModuleType
from typing import Any, TypeVar

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519

from hmnode.identity import NodeId, NodeKey
from hmnode.transport import certs
from hmnode.transport.quic import (CID_LENGTH, MIN_INITIAL_BYTES, MutualQuicConnection, QuicTuning,
                                   authenticated_peer, make_configuration)
from hmnode.transport.wire import ErrorCode

from .clock import Scheduled
from .nat import Addr, Nat
from .udp import UdpNetwork

T = TypeVar("T")

# The certificate's validity start in the simulation: a constant, so certificate bytes are too.
SIM_CERT_EPOCH = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
TIMER_SLACK_S = 1e-6  # how long after aioquic's deadline its timer fires (see _arm)

# Modules whose global name `os` is shadowed while aioquic runs under a SeededEntropy.
AIOQUIC_OS_USERS = ("aioquic.tls", "aioquic.quic.connection", "aioquic.quic.packet",
                    "aioquic.quic.retry")


class _Shadow:
    """Stands in for a module: the given attributes are replaced, every other one is the
    real module's."""

    def __init__(self, real: Any, **replaced: Any) -> None:
        self._real = real
        vars(self).update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class SeededEntropy:
    """Makes aioquic's randomness a function of one seeded generator while entered; re-entrant,
    and restores exactly what it replaced on exit.

    See the module docstring for what is covered and what is not.
    """

    def __init__(self, rng: Random) -> None:
        self.rng = rng
        self.drawn = 0  # bytes handed out, for tests and curiosity
        tls = importlib.import_module("aioquic.tls")
        self._tls = tls
        self._os_users = [importlib.import_module(name) for name in AIOQUIC_OS_USERS]
        for module in self._os_users:
            if not isinstance(getattr(module, "os", None), ModuleType):
                raise RuntimeError(f"{module.__name__} no longer imports os: SeededEntropy needs "
                                   "updating for this aioquic")
        for name in ("x25519", "x448", "ec"):
            if not isinstance(getattr(tls, name, None), ModuleType):
                raise RuntimeError(f"aioquic.tls no longer imports {name}: SeededEntropy needs "
                                   "updating for this aioquic")
        os_module = self._os_users[0].os
        self._os = _Shadow(os_module, urandom=self.urandom)
        self._x25519 = _Shadow(x25519, X25519PrivateKey=_Shadow(
            x25519.X25519PrivateKey, generate=self._x25519_key))
        self._x448 = _Shadow(x448, X448PrivateKey=_Shadow(
            x448.X448PrivateKey, generate=self._x448_key))
        self._ec = _Shadow(ec, generate_private_key=self._ec_key)
        self._saved: list[list[tuple[Any, str, Any]]] = []

    def urandom(self, n: int) -> bytes:
        """`n` bytes from the seeded generator, in place of `os.urandom`."""
        self.drawn += n
        return self.rng.randbytes(n)

    def _x25519_key(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(self.urandom(32))

    def _x448_key(self) -> x448.X448PrivateKey:
        return x448.X448PrivateKey.from_private_bytes(self.urandom(56))

    def _ec_key(self, curve: ec.EllipticCurve, backend: Any = None) -> ec.EllipticCurvePrivateKey:
        # One bit under the curve size is below the group order of P-256/P-384/P-521; the low
        # bit set keeps it non-zero.
        value = int.from_bytes(self.urandom((curve.key_size + 7) // 8), "big")
        value = (value % (1 << (curve.key_size - 1))) | 1
        return ec.derive_private_key(value, curve)

    def _swap(self, replacements: list[tuple[Any, str, Any]]) -> None:
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in replacements]
        for obj, name, value in replacements:
            setattr(obj, name, value)
        self._saved.append(saved)

    def _restore(self) -> None:
        for obj, name, value in reversed(self._saved.pop()):
            setattr(obj, name, value)

    def __enter__(self) -> "SeededEntropy":
        repl: list[tuple[Any, str, Any]] = [(m, "os", self._os) for m in self._os_users]
        repl += [(self._tls, "x25519", self._x25519), (self._tls, "x448", self._x448),
                 (self._tls, "ec", self._ec)]
        self._swap(repl)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


@dataclass(eq=False)
class SimConnection:
    """One QUIC connection of a `SimQuicEndpoint`, and what it has delivered so far."""

    quic: QuicConnection
    is_client: bool
    last_source: Addr | None = None  # where the latest datagram came from (moves on rebinding)
    expected_peer: NodeId | None = None
    peer_id: NodeId | None = None  # set once the handshake completed and the peer's key checked
    handshake_at: float | None = None
    terminated: events.ConnectionTerminated | None = None
    streams: dict[int, bytearray] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    timer_at: float | None = None  # the aioquic deadline `timer` is armed for
    timer: Scheduled | None = None

    @property
    def established(self) -> bool:
        """Whether the handshake completed, the peer authenticated, and it has not closed."""
        return self.peer_id is not None and self.terminated is None

    def received(self, stream_id: int) -> bytes:
        """Everything received on `stream_id`, in order."""
        return bytes(self.streams.get(stream_id, b""))


EventHandler = Callable[[SimConnection, events.QuicEvent], None]


class SimQuicEndpoint:
    """A node's QUIC endpoint on a simulated address: dials with `connect`, accepts Initials
    when `accept` is true, and drives its connections' timers on the network's clock.

    `rng` seeds the endpoint's certificate serial and, when `seed_entropy`, its TLS and
    connection-id randomness; the network's rng stays the only source of network randomness.
    `on_event(conn, event)` is called for every aioquic event after the endpoint has handled it
    and sent what it caused.
    """

    def __init__(self, net: UdpNetwork, addr: Addr, key: NodeKey, rng: Random, *,
                 nat: Nat | None = None, tuning: QuicTuning = QuicTuning(), accept: bool = True,
                 seed_entropy: bool = True, on_event: EventHandler | None = None) -> None:
        self.net = net
        self.addr = addr
        self.key = key
        self.accept = accept
        self.on_event = on_event
        self.counters: Counter[str] = Counter()
        self.connections: list[SimConnection] = []
        # Drawn either way, so turning seeding off leaves the caller's rng sequence unchanged,
        # and certificates are seeded either way (see the module docstring).
        seeded = SeededEntropy(Random(rng.getrandbits(64)))
        self.entropy = seeded if seed_entropy else None
        self._client_config = self._configuration(True, tuning, seeded)
        self._server_config = self._configuration(False, tuning, seeded)
        self._by_cid: dict[bytes, SimConnection] = {}
        net.bind(addr, self._on_datagram, nat=nat)

    @property
    def node_id(self) -> NodeId:
        """This endpoint's node id (its certificate's key)."""
        return self.key.node_id

    def _configuration(self, is_client: bool, tuning: QuicTuning,
                       entropy: SeededEntropy) -> QuicConfiguration:
        # The certificate's bytes must be reproducible: a fixed epoch instead of the wall clock,
        # and a serial computed as x509.random_serial_number() does, from the seeded generator.
        serial = int.from_bytes(entropy.urandom(20), "big") >> 1
        return make_configuration(self.key, is_client, tuning, certificate_now=SIM_CERT_EPOCH,
                                  certificate_serial=serial)

    def _seeded(self) -> AbstractContextManager[SeededEntropy | None]:
        return self.entropy if self.entropy is not None else nullcontext()

    def _new_quic(self, configuration: QuicConfiguration,
                  original_destination_connection_id: bytes | None = None) -> MutualQuicConnection:
        # The constructor draws connection ids and reset tokens, so it runs seeded too.
        with self._seeded():
            return MutualQuicConnection(
                configuration=configuration,
                original_destination_connection_id=original_destination_connection_id)

    # --- application side -------------------------------------------------------------------

    def connect(self, remote: Addr, expect: NodeId | None = None) -> SimConnection:
        """Dial `remote`; the connection is authenticated once `established` (and closed with
        AUTH_FAILED if `expect` is given and the peer's key is another)."""
        conn = SimConnection(self._new_quic(self._client_config), True, expected_peer=expect)
        self._adopt(conn, conn.quic.host_cid)
        self.act(conn, lambda q: q.connect(remote, now=self.net.clock.now))
        return conn

    def act(self, conn: SimConnection, fn: Callable[[QuicConnection], T]) -> T:
        """Run `fn` on the connection (under the seeded entropy), then send what it queued."""
        with self._seeded():
            result = fn(conn.quic)
        self._service(conn)
        return result

    def send_stream(self, conn: SimConnection, stream_id: int, data: bytes,
                    end_stream: bool = False) -> None:
        """Queue `data` on a stream and send what can go now."""
        self.act(conn, lambda q: q.send_stream_data(stream_id, data, end_stream))

    def close(self, conn: SimConnection, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close a connection with an application error code (sent to the peer)."""
        self.act(conn, lambda q: q.close(error_code=int(code), reason_phrase=reason))

    def punch(self, remote: Addr, size: int = 32) -> None:
        """Send one throwaway datagram to `remote`, only to open this side's NAT binding and
        filter towards it (the receiver drops it as undecodable)."""
        self.net.send(self.addr, remote, b"\x00" * size)
        self.counters["punch"] += 1

    # --- network side -----------------------------------------------------------------------

    def _adopt(self, conn: SimConnection, *cids: bytes) -> None:
        self.connections.append(conn)
        for cid in cids:
            self._by_cid[cid] = conn

    def _on_datagram(self, data: bytes, src: Addr) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.counters["undecodable"] += 1
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            if not (self.accept and header.packet_type == QuicPacketType.INITIAL
                    and header.version in self._server_config.supported_versions
                    and len(data) >= MIN_INITIAL_BYTES):
                self.counters["unknown-cid"] += 1
                return
            quic = self._new_quic(self._server_config, header.destination_cid)
            conn = SimConnection(quic, False)
            self._adopt(conn, header.destination_cid, quic.host_cid)
            self.counters["accepted"] += 1
        if conn.terminated is not None:
            self.counters["after-close"] += 1
            return
        conn.last_source = src
        self.act(conn, lambda q: q.receive_datagram(data, src, now=self.net.clock.now))

    def _service(self, conn: SimConnection) -> None:
        """Handle the connection's events, send its datagrams, re-arm its timer, then tell the
        application."""
        now = self.net.clock.now
        with self._seeded():
            happened = self._drain(conn)
            for data, addr in conn.quic.datagrams_to_send(now=now):
                self.net.send(self.addr, addr, data)
            # Events a close (above) queued, such as our own ConnectionTerminated.
            happened += self._drain(conn)
        self._arm(conn)
        if self.on_event is not None:
            for event in happened:
                self.on_event(conn, event)

    def _drain(self, conn: SimConnection) -> list[events.QuicEvent]:
        """Handle every event the connection has queued; returns them in order."""
        happened: list[events.QuicEvent] = []
        while (event := conn.quic.next_event()) is not None:
            happened.append(event)
            self._handle(conn, event)
        return happened

    def _handle(self, conn: SimConnection, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            conn.streams.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                conn.finished.add(event.stream_id)
        elif isinstance(event, events.HandshakeCompleted):
            conn.handshake_at = self.net.clock.now
            self._authenticate(conn, event)
        elif isinstance(event, events.ConnectionIdIssued):
            self._by_cid[event.connection_id] = conn
        elif isinstance(event, events.ConnectionIdRetired):
            if self._by_cid.get(event.connection_id) is conn:
                del self._by_cid[event.connection_id]
        elif isinstance(event, events.ConnectionTerminated):
            conn.terminated = event
            for cid in [c for c, owner in self._by_cid.items() if owner is conn]:
                del self._by_cid[cid]
            self.counters["terminated"] += 1

    def _authenticate(self, conn: SimConnection, event: events.HandshakeCompleted) -> None:
        # The same checks as transport/connection.py.
        try:
            peer_id = authenticated_peer(conn.quic, event.alpn_protocol, conn.expected_peer)
        except certs.PeerAuthenticationError as exc:
            self.counters["auth-failed"] += 1
            conn.quic.close(error_code=int(ErrorCode.AUTH_FAILED), reason_phrase=str(exc))
            return
        conn.peer_id = peer_id

    def _arm(self, conn: SimConnection) -> None:
        when = conn.quic.get_timer()
        if when == conn.timer_at:
            return  # already armed for this deadline; re-arming would only push it later
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer_at, conn.timer = when, None
        if when is None:
            return
        # Fire a little after the deadline, never at it: aioquic's loss detection tests
        # `sent_time <= now - delay`, which float rounding can make false at exactly
        # now == sent_time + delay, and the timer would then ask for the same instant forever.
        # A real event loop is always that late; here the slack also guarantees progress.
        fire_at = max(when, self.net.clock.now) + TIMER_SLACK_S
        conn.timer = self.net.clock.call_at(fire_at, lambda: self._on_timer(conn))

    def _on_timer(self, conn: SimConnection) -> None:
        conn.timer_at, conn.timer = None, None
        self.act(conn, lambda q: q.handle_timer(now=self.net.clock.now))
