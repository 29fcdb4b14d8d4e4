"""What a node knows about its own reachability: observed addresses, NAT mapping, dial-backs.

Sans-IO: peers' reports and dial-back outcomes come in as calls with a `now`; the classification
comes out. The rules follow RFC 4787's vocabulary and AutoNAT v2:

- every peer reports the address it sees this node's connection come from (`observe`);
- two peers on different IPs that see one port mean an endpoint-independent mapping (a cone NAT,
  or no NAT at all); different ports mean an endpoint-dependent one (a symmetric NAT);
- only an address that a peer dialled back from a port this node never talked to, and reached,
  is *confirmed* and advertised as direct: that is what "public" (or port-forwarded) means.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from hmnode.config import HostPort

Address = tuple[str, int]

# Reports kept, newest first; old ones age out so that a moved laptop relearns.
MAX_OBSERVATIONS = 16
OBSERVATION_TTL_S = 600.0
CONFIRMATION_TTL_S = 1800.0
# AutoNAT v2: a dial-back to an IP other than the requester's own costs it this many bytes first,
# so that a node cannot aim this node's packets at a victim for free.
DIAL_BACK_PADDING_BYTES = 30_000


class Reachability(str, enum.Enum):
    """How peers can reach this node, as `hmnode status` shows it."""

    PUBLIC = "public"  # a dial-back from a fresh port reached us: dial us directly
    CONE = "cone"  # behind a NAT with one public port for every peer: hole punching works
    SYMMETRIC = "symmetric"  # a new public port per peer: birthday probing or the relay
    UNKNOWN = "unknown"  # not enough reports yet


@dataclass(frozen=True)
class Observation:
    """One peer's report of the address it sees this node from."""

    reporter: str  # the reporting node's id, as text
    reporter_ip: str
    address: Address
    at: float


def normalise_ip(ip: str) -> str:
    """The canonical text of an IP (IPv4-mapped IPv6 as IPv4), so reports compare equal."""
    try:
        parsed = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


class ObservedAddresses:
    """The peers' reports of this node's address, and what they say about its NAT."""

    def __init__(self) -> None:
        self._reports: list[Observation] = []
        self._confirmed: dict[Address, float] = {}

    def observe(self, reporter: str, reporter_ip: str, address: Address, now: float) -> bool:
        """Record a report (one per reporter, the newest); True if the set of addresses changed."""
        address = (normalise_ip(address[0]), int(address[1]))
        before = set(self.addresses(now))
        self._reports = [o for o in self._reports
                         if o.reporter != reporter and now - o.at < OBSERVATION_TTL_S]
        self._reports.insert(0, Observation(reporter, normalise_ip(reporter_ip), address, now))
        del self._reports[MAX_OBSERVATIONS:]
        return set(self.addresses(now)) != before

    def addresses(self, now: float) -> list[Address]:
        """The distinct observed addresses, most reported first."""
        counts: dict[Address, int] = {}
        for o in self._reports:
            if now - o.at < OBSERVATION_TTL_S:
                counts[o.address] = counts.get(o.address, 0) + 1
        return sorted(counts, key=lambda a: -counts[a])

    def confirm(self, address: Address, now: float) -> None:
        """A dial-back to `address` arrived: peers can reach this node there unasked."""
        self._confirmed[(normalise_ip(address[0]), int(address[1]))] = now

    def unconfirm(self, address: Address) -> None:
        """A later dial-back to `address` failed: stop advertising it as direct."""
        self._confirmed.pop((normalise_ip(address[0]), int(address[1])), None)

    def confirmed(self, now: float) -> list[Address]:
        """Addresses a dial-back reached recently."""
        return [a for a, at in self._confirmed.items() if now - at < CONFIRMATION_TTL_S]

    def mapping(self, now: float) -> Reachability:
        """CONE when peers on two IPs see one port, SYMMETRIC when they see two, else UNKNOWN."""
        ports_by_ip: dict[str, set[int]] = {}
        for o in self._reports:
            if now - o.at < OBSERVATION_TTL_S:
                ports_by_ip.setdefault(o.address[0], set()).add(o.address[1])
        for ip, ports in ports_by_ip.items():
            reporters = {o.reporter_ip for o in self._reports
                         if o.address[0] == ip and now - o.at < OBSERVATION_TTL_S}
            if len(ports) > 1:
                return Reachability.SYMMETRIC
            if len(reporters) > 1:
                return Reachability.CONE
        return Reachability.UNKNOWN

    def reachability(self, now: float) -> Reachability:
        """PUBLIC once a dial-back confirmed an address; else what the mapping says."""
        if self.confirmed(now):
            return Reachability.PUBLIC
        return self.mapping(now)

    def snapshot(self, now: float) -> dict[str, object]:
        """For `hmnode status`."""
        return {"reachability": self.reachability(now).value,
                "mapping": self.mapping(now).value,
                "observed": [format_address(a) for a in self.addresses(now)],
                "confirmed": [format_address(a) for a in self.confirmed(now)]}


def format_address(addr: Address) -> str:
    """HOST:PORT, IPv6 in brackets (as `HostPort` writes it)."""
    return str(HostPort(addr[0], addr[1]))


def parse_address(text: str) -> Address:
    """(host, port) from HOST:PORT or [IPv6]:PORT; ValueError naming the expected form."""
    hp = HostPort.parse(text)
    return (hp.host, hp.port)


class DialBackRefused(Exception):
    """A dial-back request this node will not serve (the reason is the message)."""


def check_dial_back(requester_ip: str, target: Address, padding: int) -> None:
    """AutoNAT v2's anti-amplification rule: a dial-back to the requester's own IP is free; one
    to another IP needs DIAL_BACK_PADDING_BYTES sent first. Raises DialBackRefused."""
    try:
        ipaddress.ip_address(target[0])
    except ValueError:
        raise DialBackRefused(f"dial-back target {target[0]!r} is not an IP address") from None
    if not 0 < int(target[1]) < 65536:
        raise DialBackRefused(f"dial-back port {target[1]} is out of range")
    if normalise_ip(target[0]) != normalise_ip(requester_ip) and padding < DIAL_BACK_PADDING_BYTES:
        raise DialBackRefused(f"a dial-back to another IP than yours needs "
                              f"{DIAL_BACK_PADDING_BYTES} bytes of padding first")
