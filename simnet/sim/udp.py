"""A simulated UDP internet: addressed datagrams between hosts, some behind NATs, on a
VirtualClock, with every random choice drawn from one seeded rng.

Where `SimNetwork` carries protocol frames between node ids, this network carries raw datagrams
between `(ip, port)` addresses, so that real transports (aioquic, see `quic.py`) and NAT
traversal can run on it. A host is bound to one address and sits either on the public internet
or behind one `Nat` (hosts behind the same NAT are on one LAN and share its public IP).

A datagram's life:

1. `send`: refused if larger than `max_datagram_bytes`; otherwise it joins the sending host's
   uplink queue, which serialises at the host's bytes/s and holds at most
   `uplink_queue_bytes` not yet sent (a datagram that would overflow it is dropped and counted);
2. departure (when serialisation ends): the sender's NAT translates the source (`Nat.outbound`,
   also for a datagram to the NAT's own public IP, which it hairpins back onto its LAN if its
   profile allows), then the path's loss and duplication apply and each copy gets its own
   latency, a minimum plus an exponential draw, so datagrams reorder;
3. arrival: a datagram for a NAT's public IP passes that NAT's filter (`Nat.inbound`) at this
   instant, not at departure, which is what makes simultaneous hole punching a race; then the
   bound host's handler gets `(data, source as seen)`.

A path's parameters are looked up by the two public IPs involved (a NATed host's public IP is
its NAT's), so hosts behind one NAT share an access path, as they do in life; traffic that stays
on a LAN uses `UdpParams.lan`.

Everything the network does goes into a trace of (time in whole microseconds, kind, source,
destination, size, digest of the bytes) hashed with sha256: `trace_hash()` covers the bytes,
`shape_hash()` only times, kinds, addresses and sizes, for payloads that are not themselves
reproducible.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from random import Random

import msgpack

from .clock import VirtualClock
from .nat import Addr, Nat, NatError, NatProfile
from .network import TRACE_KEPT, link_delay

Handler = Callable[[bytes, Addr], None]


class UdpError(NatError):
    """A simulated UDP network was misused: an unbound sender, an address taken twice, a bad
    parameter. A `NatError` too, since the network also passes on its NATs' errors."""


def _check_uplink_rate(bytes_per_s: float) -> None:
    # Both the network's default and a host's own rate; math.inf is the unlimited uplink.
    if not bytes_per_s > 0:
        raise UdpError("uplink_bytes_per_s must be positive (math.inf for unlimited)")


@dataclass(frozen=True)
class PathParams:
    """One path's latency, loss and duplication, each direction drawn independently."""

    latency_min_s: float = 0.020
    # Mean of the exponential extra delay on top of the minimum: the spread reorders datagrams.
    latency_extra_s: float = 0.005
    loss: float = 0.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_min_s < 0 or self.latency_extra_s < 0:
            raise UdpError("latencies cannot be negative")
        if not (0.0 <= self.loss <= 1.0 and 0.0 <= self.duplicate <= 1.0):
            raise UdpError("loss and duplicate are probabilities, 0 to 1")


@dataclass(frozen=True)
class UdpParams:
    """The network's defaults: the internet path, the LAN path, and hosts' uplinks."""

    path: PathParams = PathParams()
    lan: PathParams = PathParams(latency_min_s=0.0005, latency_extra_s=0.0001)
    uplink_bytes_per_s: float = math.inf  # a host's default uplink rate
    uplink_queue_bytes: int = 256 * 1024  # bytes waiting to be serialised before drops start
    max_datagram_bytes: int = 65_507  # IPv4 UDP's limit

    def __post_init__(self) -> None:
        _check_uplink_rate(self.uplink_bytes_per_s)
        if self.uplink_queue_bytes < 0 or self.max_datagram_bytes < 1:
            raise UdpError("uplink_queue_bytes and max_datagram_bytes must be positive")


@dataclass(frozen=True)
class UdpTraceEntry:
    """One thing the network did: (time, kind, src, dst, size, short digest of the bytes)."""

    time: float
    kind: str
    src: str
    dst: str
    size: int
    digest: str

    def canonical(self) -> bytes:
        """A stable encoding: time in whole microseconds so float printing never matters."""
        return msgpack.packb([round(self.time * 1e6), self.kind, self.src, self.dst, self.size,
                              self.digest])

    def shape(self) -> bytes:
        """The canonical encoding without the digest: what happened, not what was carried."""
        return msgpack.packb([round(self.time * 1e6), self.kind, self.src, self.dst, self.size])


@dataclass
class _Host:
    addr: Addr
    handler: Handler
    nat: Nat | None
    uplink_bytes_per_s: float
    busy_until: float = 0.0  # when the uplink finishes serialising what it has queued


def _text(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


class UdpNetwork:
    """Carries datagrams between bound addresses through NATs, with latency, reordering, loss,
    duplication and uplink bandwidth limits, all drawn from `rng`."""

    def __init__(self, clock: VirtualClock, rng: Random, params: UdpParams = UdpParams()) -> None:
        self.clock = clock
        self.rng = rng
        self.params = params
        self.counters: Counter[str] = Counter()
        self.trace: deque[UdpTraceEntry] = deque(maxlen=TRACE_KEPT)
        self._hash = hashlib.sha256()
        self._shape_hash = hashlib.sha256()
        self._hosts: dict[Addr, _Host] = {}
        self._nats: dict[str, Nat] = {}
        self._paths: dict[tuple[str, str], PathParams] = {}

    # --- topology ---------------------------------------------------------------------------

    def add_nat(self, public_ip: str, profile: NatProfile, rng: Random | None = None) -> Nat:
        """A new NAT on `public_ip`; its port choices come from `rng`, or by default from a
        generator seeded from the network's rng, so the one seed fixes them too."""
        if public_ip in self._nats or any(h.nat is None and h.addr[0] == public_ip
                                          for h in self._hosts.values()):
            raise UdpError(f"{public_ip} is already in use on the public internet")
        nat = Nat(public_ip, profile, rng if rng is not None else Random(self.rng.getrandbits(64)))
        self._nats[public_ip] = nat
        self.record("nat", ("0.0.0.0", 0), (public_ip, 0), repr(profile).encode())
        return nat

    def nats(self) -> list[Nat]:
        """The NATs, in the order they were added."""
        return list(self._nats.values())

    def bind(self, addr: Addr, handler: Handler, nat: Nat | None = None,
             uplink_bytes_per_s: float | None = None) -> None:
        """Bind a host to `addr`, behind `nat` (None: on the public internet), with its own
        uplink rate or the network's default; `handler(data, src)` gets its datagrams.

        Addresses are unique across the whole network, private ones included, so that `send`
        can name a host by its address alone."""
        if addr in self._hosts:
            raise UdpError(f"{_text(addr)} is already bound")
        if nat is None and addr[0] in self._nats:
            raise UdpError(f"{addr[0]} is a NAT's public IP; bind behind that NAT instead")
        if nat is not None and self._nats.get(nat.public_ip) is not nat:
            raise UdpError("a host's NAT must come from this network's add_nat")
        rate = self.params.uplink_bytes_per_s if uplink_bytes_per_s is None else uplink_bytes_per_s
        _check_uplink_rate(rate)
        self._hosts[addr] = _Host(addr, handler, nat, rate)
        self.record("bind", addr, (self.public_ip_of(addr), 0), b"")

    def unbind(self, addr: Addr) -> None:
        """Remove the host at `addr`; datagrams still on their way to it are dropped."""
        del self._hosts[addr]
        self.record("unbind", addr, addr, b"")

    def set_path(self, ip_a: str, ip_b: str, params: PathParams) -> None:
        """Use `params` between public IPs `ip_a` and `ip_b`, both ways (a NATed host's public
        IP is its NAT's)."""
        self._paths[(ip_a, ip_b)] = params
        self._paths[(ip_b, ip_a)] = params

    def public_ip_of(self, addr: Addr) -> str:
        """The IP the internet sees the host at `addr` send from."""
        host = self._host(addr)
        return host.nat.public_ip if host.nat is not None else addr[0]

    def _host(self, addr: Addr) -> _Host:
        host = self._hosts.get(addr)
        if host is None:
            raise UdpError(f"no host is bound to {_text(addr)}")
        return host

    # --- moving datagrams -------------------------------------------------------------------

    def send(self, src: Addr, dst: Addr, data: bytes) -> None:
        """Send `data` from the host bound at `src` to `dst`; it may be dropped, duplicated,
        delayed or reordered, but never raises for network reasons."""
        host = self._host(src)
        data = bytes(data)
        if len(data) > self.params.max_datagram_bytes:
            self.record("drop-size", src, dst, data)
            return
        now = self.clock.now
        depart = now
        if host.uplink_bytes_per_s != math.inf:
            start = max(now, host.busy_until)
            backlog = (start - now) * host.uplink_bytes_per_s
            # A small tolerance: the backlog is recomputed from floats.
            if backlog + len(data) > self.params.uplink_queue_bytes + 1e-6:
                self.record("drop-queue", src, dst, data)
                return
            depart = start + len(data) / host.uplink_bytes_per_s
            host.busy_until = depart
        self.record("send", src, dst, data)
        if depart <= now:
            self._depart(host, dst, data)
        else:
            self.clock.call_at(depart, lambda: self._depart(host, dst, data))

    def _depart(self, host: _Host, dst: Addr, data: bytes) -> None:
        if self._hosts.get(host.addr) is not host:
            self.record("drop-unbound", host.addr, dst, data)
            return
        nat = host.nat
        now = self.clock.now
        if nat is not None and dst[0] == nat.public_ip:
            # Hairpin: the NAT turns it round onto its LAN, with the sender's external address
            # as the source (RFC 4787 REQ-9); its filter applies on arrival, as for any other.
            if not nat.profile.hairpinning:
                self.record("drop-hairpin", host.addr, dst, data)
                return
            seen = self._translate(nat, host.addr, dst, now)
            self._transmit(seen, dst, data, self.params.lan, None)
            return
        peer = self._hosts.get(dst)
        if peer is not None and nat is not None and peer.nat is nat:
            self._transmit(host.addr, dst, data, self.params.lan, nat)  # same LAN
            return
        wire_src = host.addr if nat is None else self._translate(nat, host.addr, dst, now)
        path = self._paths.get((wire_src[0], dst[0]), self.params.path)
        self._transmit(wire_src, dst, data, path, None)

    def _transmit(self, wire_src: Addr, dst: Addr, data: bytes, path: PathParams,
                  lan: Nat | None) -> None:
        if path.loss and self.rng.random() < path.loss:
            self.record("drop-loss", wire_src, dst, data)
            return
        copies = 2 if path.duplicate and self.rng.random() < path.duplicate else 1
        if copies == 2:
            self.record("duplicate", wire_src, dst, data)
        for _ in range(copies):
            delay = link_delay(self.rng, path.latency_min_s, path.latency_extra_s)
            self.clock.call_later(delay, lambda: self._arrive(wire_src, dst, data, lan))

    def _arrive(self, wire_src: Addr, dst: Addr, data: bytes, lan: Nat | None) -> None:
        target = dst
        nat = self._nats.get(dst[0])
        if nat is not None:
            internal = nat.inbound(dst, wire_src, self.clock.now)
            if internal is None:
                self.record("drop-filtered", wire_src, dst, data)
                return
            target = internal
        host = self._hosts.get(target)
        if host is None:
            self.record("drop-noport", wire_src, target, data)
            return
        # A private address is reachable only from its own LAN or through its NAT's public IP.
        if host.nat is not None and host.nat is not nat and host.nat is not lan:
            self.record("drop-noroute", wire_src, target, data)
            return
        self.record("recv", wire_src, target, data)
        host.handler(data, wire_src)

    def _translate(self, nat: Nat, internal: Addr, dst: Addr, now: float) -> Addr:
        """`nat.outbound`, tracing each binding it creates, so a failed punch can be read there."""
        made = nat.counters["created"]
        external = nat.outbound(internal, dst, now)
        if nat.counters["created"] != made:
            self.record("nat-map", internal, external, b"")
        return external

    # --- trace ------------------------------------------------------------------------------

    def record(self, kind: str, src: Addr, dst: Addr, data: bytes) -> None:
        """Add one entry to the trace (and count it by kind)."""
        entry = UdpTraceEntry(self.clock.now, kind, _text(src), _text(dst), len(data),
                              hashlib.blake2b(data, digest_size=4).hexdigest())
        self.counters[kind] += 1
        self.trace.append(entry)
        self._hash.update(entry.canonical())
        self._shape_hash.update(entry.shape())

    def trace_hash(self) -> str:
        """sha256 over the canonical encoding of every trace entry so far, in order."""
        return self._hash.hexdigest()

    def shape_hash(self) -> str:
        """sha256 over every entry's time, kind, addresses and size (no payload digest)."""
        return self._shape_hash.hexdigest()
