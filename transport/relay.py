"""The relay: reservations and circuits with limits, in the manner of libp2p circuit relay v2.

Sans-IO accounting only (the traversal driver moves the bytes). A private node reserves a slot
on a public node; another node then opens a circuit to it through the relay. The relay carries
the two ends' QUIC packets, which are encrypted and authenticated end to end, so it sees only
ciphertext. Every resource is bounded: reservations, circuits per peer and in all, and each
circuit's bytes and lifetime.

A relayed address reads `RELAY_ID@HOST:PORT/relay`: dial the relay at HOST:PORT (pinned to
RELAY_ID) and ask it for a circuit to the advert's node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hmnode.identity import NodeId

RELAY_SUFFIX = "/relay"


class RelayRefused(Exception):
    """The relay will not reserve or connect; the message says why (sent to the asker)."""


@dataclass(frozen=True)
class RelayLimits:
    """What a relay gives; libp2p's defaults are tighter because its relays only help punching,
    while hmnode's relay must also carry the pairs that punching cannot connect."""

    enabled: bool = True
    max_reservations: int = 128
    reservation_s: float = 3600.0
    max_circuits: int = 512
    max_circuits_per_peer: int = 16
    circuit_bytes: int = 64 << 20
    circuit_s: float = 3600.0


@dataclass(frozen=True)
class RelayedAddress:
    """Where a private node can be reached: through `relay` at `host`:`port`."""

    relay: NodeId
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.relay}@{host}:{self.port}{RELAY_SUFFIX}"

    @classmethod
    def parse(cls, text: str) -> "RelayedAddress":
        """Parse `RELAY_ID@HOST:PORT/relay`; raises ValueError naming what is wrong."""
        from hmnode.config import PeerAddress  # the one parser of ID@HOST:PORT

        if not text.endswith(RELAY_SUFFIX):
            raise ValueError(f"a relayed address ends in {RELAY_SUFFIX}: {text!r}")
        peer = PeerAddress.parse(text[:-len(RELAY_SUFFIX)])
        if peer.node_id is None:
            raise ValueError(f"a relayed address names its relay's node id: {text!r}")
        return cls(peer.node_id, peer.addr.host, peer.addr.port)


def is_relayed(text: str) -> bool:
    """Whether an advertised address is a relayed one."""
    return text.endswith(RELAY_SUFFIX)


@dataclass
class Circuit:
    """One relayed path between `src` (who asked) and `dst` (who reserved)."""

    cid: int
    src: NodeId
    dst: NodeId
    opened_at: float
    bytes: int = 0


@dataclass
class RelayService:
    """A relay's book of reservations and circuits; every method enforces `limits`."""

    limits: RelayLimits = RelayLimits()
    reservations: dict[NodeId, float] = field(default_factory=dict)  # node -> expires at
    circuits: dict[int, Circuit] = field(default_factory=dict)
    _next_cid: int = 1

    def reserve(self, peer: NodeId, now: float) -> float:
        """Grant or renew `peer`'s reservation; returns when it expires."""
        self.expire(now)
        if not self.limits.enabled:
            raise RelayRefused("this node does not relay")
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            raise RelayRefused(f"relay full ({self.limits.max_reservations} reservations)")
        self.reservations[peer] = now + self.limits.reservation_s
        return self.reservations[peer]

    def release(self, peer: NodeId) -> list[Circuit]:
        """Forget `peer`'s reservation (it left); returns the circuits that end with it."""
        self.reservations.pop(peer, None)
        return self.close_peer(peer)

    def open(self, src: NodeId, dst: NodeId, now: float) -> Circuit:
        """A circuit from `src` to `dst`, who must hold a reservation."""
        self.expire(now)
        if not self.limits.enabled:
            raise RelayRefused("this node does not relay")
        if src == dst:
            raise RelayRefused("a circuit to yourself")
        if dst not in self.reservations:
            raise RelayRefused(f"{dst.short()} holds no reservation on this relay")
        if len(self.circuits) >= self.limits.max_circuits:
            raise RelayRefused(f"relay busy ({self.limits.max_circuits} circuits)")
        for peer in (src, dst):
            held = sum(1 for c in self.circuits.values() if peer in (c.src, c.dst))
            if held >= self.limits.max_circuits_per_peer:
                raise RelayRefused(f"{peer.short()} already has {held} circuits on this relay")
        circuit = Circuit(self._next_cid, src, dst, now)
        self._next_cid += 1
        self.circuits[circuit.cid] = circuit
        return circuit

    def carry(self, cid: int, sender: NodeId, size: int, now: float) -> tuple[NodeId, str | None]:
        """Account `size` bytes from `sender` on circuit `cid`; returns the other end, and the
        reason to close the circuit instead when a limit is hit (or it is not the sender's)."""
        circuit = self.circuits.get(cid)
        if circuit is None or sender not in (circuit.src, circuit.dst):
            raise RelayRefused(f"no circuit {cid} of yours on this relay")
        other = circuit.dst if sender == circuit.src else circuit.src
        circuit.bytes += size
        if circuit.bytes > self.limits.circuit_bytes:
            return other, f"circuit carried its limit of {self.limits.circuit_bytes} bytes"
        if now - circuit.opened_at > self.limits.circuit_s:
            return other, f"circuit reached its limit of {self.limits.circuit_s:g} s"
        return other, None

    def close(self, cid: int) -> Circuit | None:
        """End a circuit; returns it (None if it was not open)."""
        return self.circuits.pop(cid, None)

    def close_peer(self, peer: NodeId) -> list[Circuit]:
        """End every circuit with `peer` at one end (its connection to the relay closed)."""
        ended = [c for c in self.circuits.values() if peer in (c.src, c.dst)]
        for c in ended:
            del self.circuits[c.cid]
        return ended

    def expire(self, now: float) -> None:
        """Drop lapsed reservations."""
        for peer, until in list(self.reservations.items()):
            if until <= now:
                del self.reservations[peer]

    def snapshot(self, now: float) -> dict[str, object]:
        """For `hmnode status`: what this relay carries."""
        return {"enabled": self.limits.enabled, "reservations": len(self.reservations),
                "circuits": len(self.circuits),
                "bytes": sum(c.bytes for c in self.circuits.values())}
