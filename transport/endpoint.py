"""The node's QUIC endpoint: one UDP socket per address family that both accepts and dials.

aioquic's serve() and connect() bind a socket each, which would give every outbound connection
its own port and make hole punching impossible. This endpoint routes every datagram that reaches
its socket to the connection its destination connection id names (ids learnt from aioquic's
ConnectionIdIssued/ConnectionIdRetired events), starts a server connection for a new Initial,
and keeps at most one authenticated connection per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from hmnode.errors import UsageError
from hmnode.identity import NodeId, NodeKey
from hmnode.transport.connection import (RELAYED_PREFIX, Address, Handlers, PeerConnection,
                                         TransportError)
from hmnode.transport.redial import Redialer
from hmnode.transport.quic import (CID_LENGTH, MIN_INITIAL_BYTES, MutualQuicConnection,
                                   QuicTuning, make_configuration)
from hmnode.transport.wire import ErrorCode

log = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES = 4 << 20
HANDLER_UNWIND_S = 1.0


class ListenError(UsageError):
    """The endpoint cannot bind its address (in use, not local, not permitted)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on what peers can make this node hold, and its keepalive cadence."""

    max_connections: int = 256
    max_per_ip: int = 16
    # Below the ~30 s after which NATs commonly drop a UDP binding.
    keepalive_s: float = 10.0
    connect_timeout_s: float = 10.0
    # A direct connection older than this gives way to a peer's new relayed one.
    direct_grace_s: float = 1.5


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, endpoint: "Endpoint") -> None:
        self.endpoint = endpoint
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.endpoint.datagram_received(data, addr, self.transport)

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)


class Endpoint:
    """Accepts and dials authenticated QUIC connections over one socket per address family."""

    def __init__(self, key: NodeKey, handlers: Handlers | None = None,
                 tuning: QuicTuning = QuicTuning(), limits: ConnectionLimits = ConnectionLimits()) -> None:
        self.key = key
        self.node_id = key.node_id
        self.handlers = handlers or Handlers()
        self.tuning = tuning
        self.limits = limits
        self._server_config = make_configuration(key, is_client=False, tuning=tuning)
        self._client_config = make_configuration(key, is_client=True, tuning=tuning)
        self._sockets: dict[int, asyncio.DatagramTransport] = {}
        self._raw: dict[int, socket.socket] = {}
        # Paths that are not this endpoint's main sockets: relay circuits (a pseudo-address whose
        # datagrams a function carries) and sockets opened for birthday probing.
        self._circuits: dict[Address, Callable[[bytes], None]] = {}
        self._pinned: dict[Address, asyncio.DatagramTransport] = {}
        self._extra: dict[asyncio.DatagramTransport, socket.socket] = {}
        self._routes: dict[bytes, PeerConnection] = {}
        self._live: set[PeerConnection] = set()
        self.peers: dict[NodeId, PeerConnection] = {}
        self.misbehaviour: Counter[str] = Counter()
        self._keepalive: asyncio.Task | None = None
        self._redialers: dict[Address, Redialer] = {}
        # Told of every datagram that is not QUIC (dial-backs, punch probes), with the socket
        # that received it.
        self.raw_datagram_handler: Callable[[bytes, Address, Any], None] | None = None
        # Told of every connection that ends (after it has left `peers`).
        self.connection_closed_handler: Callable[[PeerConnection], None] | None = None
        # Further listeners (NAT traversal): each authenticated connection kept, each closed one.
        self.authenticated_handlers: list[Callable[[PeerConnection], None]] = []
        self.closed_handlers: list[Callable[[PeerConnection], None]] = []

    # --- sockets ----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> list[Address]:
        """Bind; "0.0.0.0" also binds "::" (IPv6 only) on the same port where IPv6 exists."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = _bind(family, host, port)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Socket(self), sock=sock)
            self._raw[family] = sock
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                              "choose another address with --listen or node.listen") from exc
        self._sockets[family] = transport
        if host == "0.0.0.0":
            bound_port = transport.get_extra_info("sockname")[1]
            try:
                sock6 = _bind(socket.AF_INET6, "::", bound_port)
                transport6, _ = await loop.create_datagram_endpoint(lambda: _Socket(self), sock=sock6)
                self._sockets[socket.AF_INET6] = transport6
                self._raw[socket.AF_INET6] = sock6
            except OSError as exc:
                log.info("no IPv6 socket on port %d: %s", bound_port, exc)
        self._keepalive = asyncio.create_task(self._keep_alive(), name="transport-keepalive")
        return self.addresses

    @property
    def addresses(self) -> list[Address]:
        """The bound (host, port) of each socket."""
        return [tuple(t.get_extra_info("sockname")[:2]) for t in self._sockets.values()]  # type: ignore[misc]

    def send_raw(self, data: bytes, addr: Address, ttl: int | None = None) -> None:
        """Send one datagram to `addr`: over a relay circuit if it names one, else from the socket
        pinned to it or the main socket. With `ttl`, the datagram dies after that many routers
        (a hole punch's primer: it opens this side's NAT mapping without reaching the far NAT)."""
        circuit = self._circuits.get(addr)
        if circuit is not None:
            circuit(data)
            return
        if addr[0].startswith(RELAYED_PREFIX):
            return  # a circuit that is gone: nowhere to send
        transport = self._pinned.get(addr)
        if transport is None:
            transport = self._sockets.get(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        if transport is not None:
            self.send_from(transport, data, addr, ttl)

    def send_from(self, transport: asyncio.DatagramTransport, data: bytes, addr: Address,
                  ttl: int | None = None) -> None:
        """Send one datagram from a given socket of this endpoint (main or extra)."""
        if transport.is_closing():
            return
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        if ttl is None:
            transport.sendto(data, addr)
            return
        level, option = ((socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT) if family == socket.AF_INET6
                         else (socket.IPPROTO_IP, socket.IP_TTL))
        # The transport's socket wrapper has no sendmsg: use the socket object we bound.
        sock = self._extra.get(transport) or self._raw[family]
        try:
            sock.sendmsg([data], [(level, option, struct.pack("i", ttl))], 0, addr)
        except OSError as exc:
            log.debug("primer to %s failed: %s", addr, exc)  # best effort, as UDP is

    # --- other paths: relay circuits and extra sockets --------------------------------------

    def add_circuit(self, addr: Address, carry: Callable[[bytes], None]) -> None:
        """Route datagrams for the pseudo-address `addr` through `carry` (a relay circuit)."""
        self._circuits[addr] = carry

    def remove_circuit(self, addr: Address) -> None:
        """Forget a circuit, closing the connections that ran over it (their close goes out
        through the circuit while it is still there)."""
        for conn in [c for c in self._live if c.addr == addr]:
            conn.close(ErrorCode.NO_ERROR, "relay circuit closed")
        self._circuits.pop(addr, None)

    async def open_extra_socket(self) -> asyncio.DatagramTransport:
        """Another IPv4 socket on a random port whose datagrams this endpoint serves too (the hard
        side of birthday probing opens many, each a different public port on its NAT)."""
        loop = asyncio.get_running_loop()
        sock = _bind(socket.AF_INET, "0.0.0.0", 0)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Socket(self), sock=sock)
        self._extra[transport] = sock
        return transport

    def close_extra_socket(self, transport: asyncio.DatagramTransport) -> None:
        """Close an extra socket unless a connection's path runs through it."""
        if transport in self._pinned.values():
            return
        self._extra.pop(transport, None)
        transport.close()

    def pin(self, addr: Address, transport: asyncio.DatagramTransport) -> None:
        """Send whatever goes to `addr` from `transport` (the extra socket a punch succeeded on)."""
        self._pinned[addr] = transport

    # --- routing ----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any, via: Any = None) -> None:
        """Route one datagram (from a socket, or `via` a relay circuit) to its connection."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            if self.raw_datagram_handler is not None:
                self.raw_datagram_handler(data, addr, via)
            return
        conn = self._routes.get(header.destination_cid)
        if conn is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL_BYTES:
                return
            if header.version not in self._server_config.supported_versions:
                return
            refusal = self._over_limit(addr)
            conn = self._accept(header.destination_cid, addr)
            if refusal:
                # Read the Initial first, so that the refusal can be sent in reply to it.
                log.info("refusing connection from %s: %s", addr[0], refusal)
                conn.refuse(data, addr, ErrorCode.CONNECTION_LIMIT, refusal)
                return
        conn.datagram_received(data, addr)

    def _accept(self, original_cid: bytes, addr: Any) -> PeerConnection:
        quic = MutualQuicConnection(configuration=self._server_config,
                                    original_destination_connection_id=original_cid)
        conn = PeerConnection(self, quic, addr, expected=None)
        self._register(conn)
        self._routes[original_cid] = conn
        return conn

    def _over_limit(self, addr: Any) -> str | None:
        if len(self._live) >= self.limits.max_connections:
            return f"connection limit ({self.limits.max_connections}) reached"
        same_ip = sum(1 for c in self._live if c.addr[0] == addr[0])
        if same_ip >= self.limits.max_per_ip:
            return f"per-address limit ({self.limits.max_per_ip}) reached"
        return None

    def _register(self, conn: PeerConnection) -> None:
        self._live.add(conn)
        self._routes[conn.quic.host_cid] = conn

    def route_add(self, cid: bytes, conn: PeerConnection) -> None:
        self._routes[cid] = conn

    def route_remove(self, cid: bytes) -> None:
        self._routes.pop(cid, None)

    # --- connections ------------------------------------------------------------------------

    async def connect(self, addr: Address, expected: NodeId | None = None,
                      timeout: float | None = None) -> PeerConnection:
        """An authenticated connection to the node at `addr` (reused if one exists).

        With `expected`, the peer must prove that node id; without, whoever answers is accepted
        (an unpinned dial: the caller learns the id from the connection).
        """
        if expected is not None:
            existing = self.peers.get(expected)
            # A relayed connection is reused only for another relayed dial: a direct dial is
            # how it gets replaced.
            if (existing is not None and existing.is_established
                    and (not existing.is_relayed or addr in self._circuits)):
                return existing
        if addr not in self._circuits:
            addr = await _resolve(addr)
        if (addr not in self._circuits and addr not in self._pinned
                and (socket.AF_INET6 if ":" in addr[0] else socket.AF_INET) not in self._sockets):
            raise TransportError(f"no socket of {addr[0]}'s address family; listen on one first")
        quic = MutualQuicConnection(configuration=self._client_config)
        conn = PeerConnection(self, quic, addr, expected)
        self._register(conn)
        quic.connect(addr, now=asyncio.get_running_loop().time())
        conn.transmit()
        timeout = self.limits.connect_timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(conn.established)
        except TimeoutError:
            conn.close(ErrorCode.TIMEOUT, "handshake timed out")
            raise TransportError(f"no answer from {addr[0]}:{addr[1]} within {timeout:g} s") from None
        except TransportError:
            if conn.close_code == ErrorCode.DUPLICATE_CONNECTION and conn.peer_id in self.peers:
                return await self._settled(conn.peer_id)
            raise
        await self._await_rival(conn)
        return self.peers.get(conn.peer_id, conn)  # type: ignore[arg-type]

    async def _await_rival(self, conn: PeerConnection) -> None:
        """In a simultaneous dial, wait for the peer's own dial to us if it is the one both ends
        will keep, rather than hand back a connection about to be closed as a duplicate."""
        if not self.node_id > conn.peer_id:  # type: ignore[operator]
            return  # our dial is the one kept
        rivals = [c.established for c in self._live
                  if not c.is_client and c.addr[:2] == conn.addr[:2] and not c.established.done()]
        if rivals:
            await asyncio.wait(rivals, timeout=self.limits.connect_timeout_s)

    async def _settled(self, peer: NodeId) -> PeerConnection:
        survivor = self.peers[peer]
        await asyncio.wait_for(asyncio.shield(survivor.established), self.limits.connect_timeout_s)
        return survivor

    def keep_connected(self, addr: Address, expected: NodeId | None = None) -> Redialer:
        """Hold a connection to the node at `addr` open, redialling with backoff when it drops."""
        redialer = self._redialers.get(addr)
        if redialer is None:
            redialer = self._redialers[addr] = Redialer(self, addr, expected)
        return redialer

    def on_authenticated(self, conn: PeerConnection) -> None:
        """Keep one connection per peer; both ends pick the same survivor of a simultaneous dial."""
        assert conn.peer_id is not None
        existing = self.peers.get(conn.peer_id)
        if existing is None or existing is conn or existing.closed.done():
            self.peers[conn.peer_id] = conn
        else:
            keep = self._preferred(existing, conn)
            loser = conn if keep is existing else existing
            self.peers[conn.peer_id] = keep
            loser.close(ErrorCode.DUPLICATE_CONNECTION, "duplicate connection")
            if keep is existing:
                return
        for handler in self.authenticated_handlers:
            handler(conn)

    def _preferred(self, old: PeerConnection, new: PeerConnection) -> PeerConnection:
        if old.is_relayed != new.is_relayed:
            if not new.is_relayed:
                return new  # a direct path replaces a relayed one
            # A peer dials through the relay only when it has no working direct path (an
            # upgrade runs over an existing relayed connection, never the other way round), so
            # believe it: the direct path is dead at its end. A direct connection younger than
            # the grace is kept, in case the two crossed.
            return new if time.monotonic() - old.created_at > self.limits.direct_grace_s else old
        if old.is_client == new.is_client:
            return new  # a redial (say, after the peer restarted): the old one is stale
        # Opposite directions: keep the one dialled by the smaller node id, on both ends.
        dialer_is_us = self.node_id < new.peer_id  # type: ignore[operator]
        return new if new.is_client == dialer_is_us else old

    def on_closed(self, conn: PeerConnection) -> None:
        self._live.discard(conn)
        pinned = self._pinned.get(conn.addr)
        if pinned is not None and not any(c.addr == conn.addr for c in self._live):
            del self._pinned[conn.addr]
            self.close_extra_socket(pinned)
        for cid in [cid for cid, c in self._routes.items() if c is conn]:
            del self._routes[cid]
        if conn.peer_id is not None and self.peers.get(conn.peer_id) is conn:
            del self.peers[conn.peer_id]
        if self.connection_closed_handler is not None:
            self.connection_closed_handler(conn)
        for handler in self.closed_handlers:
            handler(conn)

    def record_misbehaviour(self, conn: PeerConnection, what: str) -> None:
        """Count a malformed message against the peer that sent it (by node id, else address)."""
        self.misbehaviour[str(conn.peer_id) if conn.peer_id else conn.addr[0]] += 1

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.limits.keepalive_s)
            for conn in list(self.peers.values()):
                conn.ping()

    # --- shutdown ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection (telling peers) and the sockets; leaves no task behind."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
            self._keepalive = None
        for redialer in self._redialers.values():
            await redialer.stop()
        self._redialers.clear()
        live = list(self._live)
        for conn in live:
            conn.close(ErrorCode.SHUTDOWN, "node shutting down")
        # Closing cancelled the handlers that were serving peers; let them finish unwinding.
        handlers = [task for conn in live for task in conn.handler_tasks]
        if handlers:
            await asyncio.wait(handlers, timeout=HANDLER_UNWIND_S)
        for conn in live:
            conn.drop()
        for transport in self._extra:
            transport.close()
        self._extra.clear()
        self._pinned.clear()
        self._circuits.clear()
        for transport in self._sockets.values():
            transport.close()
        # The socket itself is closed a loop iteration later; wait, so the port is free on return.
        await asyncio.gather(*(t.get_protocol().closed for t in self._sockets.values()))
        self._sockets.clear()
        self._raw.clear()
        self._routes.clear()
        self._live.clear()
        self.peers.clear()


def _bind(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # A larger receive buffer rides out bursts (many datagrams, many peers) that the event
        # loop cannot drain at once; the kernel caps it at net.core.rmem_max.
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _resolve(addr: Address) -> Address:
    """A literal IP stays as it is; a host name is resolved (once, at dial time)."""
    host, port = addr[0], addr[1]
    try:
        ipaddress.ip_address(host)
        return (host, port)
    except ValueError:
        pass
    try:
        info = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve {host}: {exc.strerror}") from exc
    return info[0][4][:2]  # type: ignore[return-value]
