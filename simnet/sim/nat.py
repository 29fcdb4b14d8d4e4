"""A sans-IO model of a NAT's UDP behaviour, in the terms of RFC 4787.

A `Nat` keeps a table of bindings from internal endpoints to ports on its one public IP. How a
binding is chosen (mapping) and which remotes may send into it (filtering) are the two axes
RFC 4787 section 4 and 5 classify NATs by; hole punching works or fails depending on them, so
the simulator models them exactly and nothing else (no ALGs, no port ranges per host, no ICMP).

Like every core in hmnode it never reads a clock or a random source of its own: time is the
`now` passed to each call, and ports are drawn from the `random.Random` it is given, so a
simulation seed fixes every port a NAT ever picks.

Bindings live until `binding_timeout_s` after their last refresh (outbound traffic always
refreshes, RFC 4787 REQ-6; inbound traffic only where the profile says so). A filtering
permission (the remote an internal host sent to) lives as long after that host's last packet to
that remote: an address-dependent filter forgets a remote that has been silent that long, as
Linux conntrack does. The table is bounded; the binding refreshed least recently is evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from random import Random
from typing import Final

from hmnode.errors import HmnodeError

Addr = tuple[str, int]
# What a mapping or a filtering permission is specific to: nothing, a remote IP, or a remote
# IP and port.
RemoteKey = str | Addr | None

# Permissions kept per binding before expired ones are swept: a binding that talks to many
# remotes (a public-facing EIM binding) must not grow without bound.
_PERMIT_SWEEP_AT = 64


class NatError(HmnodeError, ValueError):
    """A NAT was given an impossible profile or address. The simulated UDP network's `UdpError`
    derives from it, so one `except NatError` covers misuse of the whole simulated internet."""


class MappingType(Enum):
    """How a NAT reuses an external port (RFC 4787 section 4.1)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class FilteringType(Enum):
    """Which remotes may send into a binding (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


def _key_for(kind: MappingType | FilteringType, remote: Addr) -> RemoteKey:
    # Mapping and filtering share the same three granularities.
    if kind.value == "endpoint-independent":
        return None
    if kind.value == "address-dependent":
        return remote[0]
    return remote


def _check_addr(addr: Addr, what: str) -> None:
    if (not isinstance(addr, tuple) or len(addr) != 2 or not isinstance(addr[0], str)
            or not isinstance(addr[1], int) or not 0 < addr[1] < 65536):
        raise NatError(f"{what} must be an (ip, port) tuple with port 1-65535, not {addr!r}")


@dataclass(frozen=True)
class NatProfile:
    """How one NAT behaves; a frozen value so a scenario's NATs can be logged whole.

    `port_range` is where new external ports are drawn from when the internal port cannot be
    preserved; `max_bindings` bounds the table (the least recently refreshed binding is evicted
    to make room) and may not exceed the number of ports in that range.
    """

    mapping: MappingType = MappingType.ENDPOINT_INDEPENDENT
    filtering: FilteringType = FilteringType.ADDRESS_AND_PORT_DEPENDENT
    # RFC 4787 REQ-5: at least 120 s by default; cheap home routers use as little as 30 s.
    binding_timeout_s: float = 120.0
    port_preservation: bool = True
    # RFC 4787 REQ-9 requires hairpinning; many consumer NATs still lack it.
    hairpinning: bool = True
    max_bindings: int = 4096
    # RFC 4787 REQ-6 leaves inbound refresh optional; off is the harsher, commoner choice.
    inbound_refresh: bool = False
    port_range: tuple[int, int] = (1024, 65535)

    def __post_init__(self) -> None:
        if not isinstance(self.mapping, MappingType) or not isinstance(self.filtering, FilteringType):
            raise NatError("mapping and filtering must be MappingType and FilteringType values")
        if not self.binding_timeout_s > 0:
            raise NatError(f"binding_timeout_s must be positive, not {self.binding_timeout_s!r}")
        lo, hi = self.port_range
        if not 1 <= lo <= hi <= 65535:
            raise NatError(f"port_range must be within 1-65535 and ordered, not {self.port_range!r}")
        if not 1 <= self.max_bindings <= hi - lo + 1:
            raise NatError(f"max_bindings must be 1 to {hi - lo + 1} (the ports in port_range), "
                           f"not {self.max_bindings}")


# No NAT at all: a host on the public internet is attached with `nat=None`.
OPEN: Final = None
FULL_CONE: Final = NatProfile(MappingType.ENDPOINT_INDEPENDENT, FilteringType.ENDPOINT_INDEPENDENT)
RESTRICTED_CONE: Final = NatProfile(MappingType.ENDPOINT_INDEPENDENT, FilteringType.ADDRESS_DEPENDENT)
PORT_RESTRICTED_CONE: Final = NatProfile(MappingType.ENDPOINT_INDEPENDENT,
                                         FilteringType.ADDRESS_AND_PORT_DEPENDENT)
# Symmetric NATs draw a fresh random port per destination, which defeats port prediction.
SYMMETRIC: Final = NatProfile(MappingType.ADDRESS_AND_PORT_DEPENDENT,
                              FilteringType.ADDRESS_AND_PORT_DEPENDENT, port_preservation=False,
                              hairpinning=False)
# A cheap home router: port-restricted cone, 30 s bindings, a small table.
HARSH_HOME: Final = NatProfile(MappingType.ENDPOINT_INDEPENDENT,
                               FilteringType.ADDRESS_AND_PORT_DEPENDENT, binding_timeout_s=30.0,
                               max_bindings=256)

PRESETS: Final[dict[str, NatProfile | None]] = {
    "open": OPEN,
    "full-cone": FULL_CONE,
    "restricted-cone": RESTRICTED_CONE,
    "port-restricted-cone": PORT_RESTRICTED_CONE,
    "symmetric": SYMMETRIC,
    "harsh-home": HARSH_HOME,
}


@dataclass(frozen=True)
class Binding:
    """A snapshot of one NAT binding, for tests and inspection.

    `remote` is what the mapping is specific to (None for endpoint-independent mapping, the
    remote IP, or the remote address); `permits` are the remotes (IPs or addresses, as the
    filtering type keys them) allowed to send in at the time of the snapshot, empty under
    endpoint-independent filtering, which admits everyone.
    """

    internal: Addr
    external: Addr
    remote: RemoteKey
    created_at: float
    refreshed_at: float
    expires_at: float
    permits: tuple[str | Addr, ...]


@dataclass
class _Entry:
    internal: Addr
    external_port: int
    remote: RemoteKey
    created_at: float
    refreshed_at: float
    # filtering key -> time of the internal host's last packet to it
    permits: dict[str | Addr, float] = field(default_factory=dict)


class Nat:
    """One NAT: a public IP, a profile, and its binding table.

    `outbound` is called for each packet an internal host sends past the NAT and returns the
    source address the outside sees; `inbound` is called for each packet arriving at the public
    IP and returns the internal address to deliver it to, or None where the NAT drops it.
    """

    def __init__(self, public_ip: str, profile: NatProfile, rng: Random) -> None:
        if not isinstance(profile, NatProfile):
            raise NatError(f"a NAT needs a NatProfile, not {profile!r} (a public host has no NAT)")
        self.public_ip = public_ip
        self.profile = profile
        self.rng = rng
        # Why each binding or packet went away or was refused; tests and the simulator read it.
        self.counters: Counter[str] = Counter()
        # Ordered by last refresh (oldest first): the front is both the LRU victim and the first
        # to expire, so expiry and eviction are amortised O(1).
        self._by_key: OrderedDict[tuple[Addr, RemoteKey], _Entry] = OrderedDict()
        self._by_port: dict[int, _Entry] = {}
        self._now = float("-inf")

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"Nat({self.public_ip!r}, {self.profile.mapping.value} mapping, " \
               f"{self.profile.filtering.value} filtering, {len(self)} bindings)"

    # --- traffic ----------------------------------------------------------------------------

    def outbound(self, internal: Addr, remote: Addr, now: float) -> Addr:
        """The external address a packet from `internal` to `remote` leaves with, creating a
        binding or refreshing the one the mapping type selects, and permitting `remote` (as the
        filtering type keys it) to answer."""
        _check_addr(internal, "internal")
        _check_addr(remote, "remote")
        now = self._advance(now)
        key = (internal, _key_for(self.profile.mapping, remote))
        entry = self._by_key.get(key)
        if entry is None:
            entry = self._create(key, now)
        else:
            entry.refreshed_at = now
            self._by_key.move_to_end(key)
        permit = _key_for(self.profile.filtering, remote)
        if permit is not None:
            if len(entry.permits) >= _PERMIT_SWEEP_AT and permit not in entry.permits:
                self._sweep_permits(entry, now)
            entry.permits[permit] = now
        return (self.public_ip, entry.external_port)

    def inbound(self, external: Addr, remote: Addr, now: float) -> Addr | None:
        """The internal address a packet from `remote` to `external` is delivered to, or None
        if no live binding holds that port or the filtering type refuses `remote`."""
        _check_addr(external, "external")
        _check_addr(remote, "remote")
        now = self._advance(now)
        entry = self._by_port.get(external[1]) if external[0] == self.public_ip else None
        if entry is None:
            self.counters["refused-no-binding"] += 1
            return None
        permit = _key_for(self.profile.filtering, remote)
        if permit is not None:
            sent_at = entry.permits.get(permit)
            if sent_at is None or now >= sent_at + self.profile.binding_timeout_s:
                self.counters["refused-filtered"] += 1
                return None
        if self.profile.inbound_refresh:
            entry.refreshed_at = now
            self._by_key.move_to_end((entry.internal, entry.remote))
        return entry.internal

    def hairpin(self, internal: Addr, external_dst: Addr, now: float) -> tuple[Addr, Addr] | None:
        """A packet from `internal` to one of this NAT's own external addresses: returns (the
        source the receiver sees, the internal address it reaches), or None if this NAT does not
        hairpin or the target binding refuses it. The source is the sender's external address,
        as RFC 4787 REQ-9 requires, so the receiver can answer it."""
        if not self.profile.hairpinning:
            self.counters["refused-hairpin"] += 1
            return None
        seen = self.outbound(internal, external_dst, now)
        target = self.inbound(external_dst, seen, now)
        return None if target is None else (seen, target)

    # --- inspection -------------------------------------------------------------------------

    def bindings(self, now: float | None = None) -> list[Binding]:
        """Snapshots of the bindings, oldest refresh first; with `now`, only the live ones, with
        only their live permissions."""
        timeout = self.profile.binding_timeout_s
        out = []
        for entry in self._by_key.values():
            if now is not None and now >= entry.refreshed_at + timeout:
                continue
            permits = tuple(sorted((p for p, t in entry.permits.items()
                                    if now is None or now < t + timeout), key=repr))
            out.append(Binding(entry.internal, (self.public_ip, entry.external_port), entry.remote,
                               entry.created_at, entry.refreshed_at, entry.refreshed_at + timeout,
                               permits))
        return out

    def external_for(self, internal: Addr, remote: Addr, now: float) -> Addr | None:
        """The external address a packet from `internal` to `remote` would use now, without
        sending one (None if it would need a new binding)."""
        entry = self._by_key.get((internal, _key_for(self.profile.mapping, remote)))
        if entry is None or now >= entry.refreshed_at + self.profile.binding_timeout_s:
            return None
        return (self.public_ip, entry.external_port)

    def expire(self, now: float) -> int:
        """Drop every binding whose timeout has passed; returns how many went."""
        before = len(self._by_key)
        self._advance(now)
        return before - len(self._by_key)

    def reset(self) -> None:
        """Forget every binding, as a router reboot or a carrier-grade NAT flush does."""
        self.counters["reset"] += 1
        self._by_key.clear()
        self._by_port.clear()

    # --- internals --------------------------------------------------------------------------

    def _advance(self, now: float) -> float:
        # Time only moves forward here, as on the VirtualClock; an earlier `now` is read as the
        # latest seen, so the table's refresh order stays its expiry order.
        self._now = max(self._now, float(now))
        timeout = self.profile.binding_timeout_s
        while self._by_key:
            key, entry = next(iter(self._by_key.items()))
            # The same expression as every other expiry test, so float rounding cannot make a
            # binding live in one place and dead in another.
            if self._now < entry.refreshed_at + timeout:
                break
            self._remove(key, entry)
            self.counters["expired"] += 1
        return self._now

    def _create(self, key: tuple[Addr, RemoteKey], now: float) -> _Entry:
        if len(self._by_key) >= self.profile.max_bindings:
            victim_key, victim = next(iter(self._by_key.items()))
            self._remove(victim_key, victim)
            self.counters["evicted"] += 1
        entry = _Entry(key[0], self._allocate_port(key[0][1]), key[1], now, now)
        self._by_key[key] = entry
        self._by_port[entry.external_port] = entry
        self.counters["created"] += 1
        return entry

    def _sweep_permits(self, entry: _Entry, now: float) -> None:
        # The expiry test `inbound` and `bindings` apply, so a swept permission is only one
        # they already ignore: sweeping changes memory, never what the filter admits.
        timeout = self.profile.binding_timeout_s
        entry.permits = {p: t for p, t in entry.permits.items() if now < t + timeout}

    def _remove(self, key: tuple[Addr, RemoteKey], entry: _Entry) -> None:
        del self._by_key[key]
        del self._by_port[entry.external_port]

    def _allocate_port(self, internal_port: int) -> int:
        if self.profile.port_preservation and internal_port not in self._by_port:
            return internal_port
        lo, hi = self.profile.port_range
        for _ in range(32):
            port = self.rng.randint(lo, hi)
            if port not in self._by_port:
                return port
        # A crowded table: walk on from a random point. A free port exists because
        # max_bindings is at most the range's size and a slot was freed before allocating.
        span = hi - lo + 1
        start = self.rng.randrange(span)
        for i in range(span):
            port = lo + (start + i) % span
            if port not in self._by_port:
                return port
        raise AssertionError("no free port although the table has room")  # pragma: no cover
