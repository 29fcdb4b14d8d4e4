"""This node's part in circuit relaying (libp2p circuit relay v2 style), over its endpoint.

As a relay (when it is public): it grants reservations and opens circuits within the limits
of `relay.RelayService`, and forwards each circuit's packets, which it cannot read, between the
two ends' connections to it. As a user: it keeps a reservation on a public peer (so that it
can advertise `RELAY@HOST:PORT/relay`), and runs connections to peers over circuits; the
endpoint sees such a connection at a pseudo-address and sends its packets through `relay.data`
messages on the connection to the relay, what QUIC sends in one loop turn in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hmnode.identity import NodeId
from hmnode.transport.connection import (RELAYED_PREFIX, Address, PeerConnection, RemoteError,
                                         TransportError)
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.reachability import format_address
from hmnode.transport.relay import RelayedAddress, RelayLimits, RelayRefused, RelayService

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0

# relay.data carries up to this many QUIC packets of up to this size.
MAX_PACKETS_PER_MESSAGE = 64
MAX_RELAYED_PACKET = 16384


@dataclass
class _Reservation:
    """A slot this node holds on a relay, and until when."""

    relay: NodeId
    addr: Address
    expires_at: float


@dataclass
class _Circuit:
    """A circuit this node is an end of: through `relay`, seen by the endpoint at `pseudo`."""

    relay: NodeId
    cid: int
    pseudo: Address


class CircuitRelay:
    """Reservations and circuits: the ones this node serves and the ones it uses."""

    def __init__(self, endpoint: Endpoint, limits: RelayLimits, is_public: Callable[[], bool],
                 on_addresses_changed: Callable[[], None]) -> None:
        self.endpoint = endpoint
        self.service = RelayService(limits)
        self.is_public = is_public
        self.on_addresses_changed = on_addresses_changed
        self.reservation: _Reservation | None = None
        # Where to look for a relay first (the bootstrap peers): (address, pinned node id).
        self.candidates: list[tuple[Address, NodeId | None]] = []
        self.circuits: dict[tuple[NodeId, int], _Circuit] = {}

    def relayed_address(self) -> RelayedAddress | None:
        """Where this node can be reached through its relay, if it holds a reservation."""
        res = self.reservation
        return None if res is None else RelayedAddress(res.relay, *res.addr)

    def circuit_of(self, conn: PeerConnection) -> "_Circuit | None":
        """The circuit a relayed connection runs over."""
        return next((c for c in self.circuits.values() if c.pseudo == conn.addr), None)

    def wants_reservation(self, now: float) -> bool:
        """Whether the reservation is missing, lost with its relay, or due for renewal."""
        res = self.reservation
        if res is None:
            return True
        conn = self.endpoint.peers.get(res.relay)
        lost = conn is None or not conn.is_established or conn.is_relayed
        return lost or res.expires_at - now < self.service.limits.reservation_s / 2

    def give_up_reservation(self) -> None:
        """Drop the reservation (this node turned out public: it needs none)."""
        if self.reservation is not None:
            self.reservation = None
            self.on_addresses_changed()

    def status(self, now: float) -> dict[str, Any]:
        """For `hmnode status`: the reservation held and what this node relays."""
        res = self.reservation
        return {"relay": None if res is None else {
                    "relay": str(res.relay), "address": str(RelayedAddress(res.relay, *res.addr)),
                    "expires_in_s": round(res.expires_at - now, 1)},
                "relay_service": self.service.snapshot(now)}

    def on_closed(self, conn: PeerConnection) -> None:
        """A connection ended: circuits through it, or carried for it, end too."""
        if conn.peer_id is None:
            return
        if conn.peer_id not in self.endpoint.peers:
            for circuit in self.service.close_peer(conn.peer_id):
                other = circuit.dst if circuit.src == conn.peer_id else circuit.src
                out = self.endpoint.peers.get(other)
                if out is not None and out.is_established:
                    with contextlib.suppress(TransportError):
                        out.notify("relay.close", {"c": circuit.cid, "reason": "other end left"})
            for relay, cid in [k for k in self.circuits if k[0] == conn.peer_id]:
                self.drop_circuit(relay, cid)
        if conn.is_relayed:
            for key, circuit in list(self.circuits.items()):
                if circuit.pseudo == conn.addr:
                    self.drop_circuit(*key)
                    relay_conn = self.endpoint.peers.get(circuit.relay)
                    if relay_conn is not None and relay_conn.is_established:
                        with contextlib.suppress(TransportError):
                            relay_conn.notify("relay.close", {"c": circuit.cid})

    # --- as a relay ------------------------------------------------------------------------

    async def serve_reserve(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        """`relay.reserve`: a slot for the asker, if this node is public and has room."""
        if conn.is_relayed or conn.peer_id is None:
            raise RemoteError("refused", "reserve over a direct connection")
        if not self.is_public():
            raise RemoteError("refused", "this node is not publicly reachable, so it relays nothing")
        try:
            until = self.service.reserve(conn.peer_id, time.monotonic())
        except RelayRefused as exc:
            raise RemoteError("refused", str(exc)) from None
        return {"expires_in_s": until - time.monotonic(), "limits": {
            "circuit_bytes": self.service.limits.circuit_bytes, "circuit_s": self.service.limits.circuit_s}}

    async def serve_connect(self, conn: PeerConnection, body: Any) -> dict[str, Any]:
        """`relay.connect`: a circuit from the asker to a node holding a reservation here."""
        try:
            target = NodeId(bytes(body["to"]))
        except (KeyError, TypeError, ValueError):
            raise RemoteError("bad_request", "relay.connect takes {to: node key}") from None
        if conn.peer_id is None or conn.is_relayed:
            raise RemoteError("refused", "connect over a direct connection")
        dst = self.endpoint.peers.get(target)
        if dst is None or not dst.is_established or dst.is_relayed:
            self.service.release(target)
            raise RemoteError("refused", f"{target.short()} is not connected to this relay")
        try:
            circuit = self.service.open(conn.peer_id, target, time.monotonic())
        except RelayRefused as exc:
            raise RemoteError("refused", str(exc)) from None
        log.debug("relay circuit %d: %s -> %s", circuit.cid, conn.peer_id.short(), target.short())
        return {"c": circuit.cid}

    def forward(self, conn: PeerConnection, body: dict[str, Any]) -> bool:
        """As the relay: carry packets to the circuit's other end. False if not ours."""
        cid = body.get("c")
        if not isinstance(cid, int) or cid not in self.service.circuits or conn.peer_id is None:
            return False
        data = _packets(body.get("d"))
        if data is None:
            return True
        circuit = self.service.circuits[cid]
        if conn.peer_id not in (circuit.src, circuit.dst):
            return False
        try:
            other, over = self.service.carry(cid, conn.peer_id, sum(map(len, data)), time.monotonic())
        except RelayRefused:
            return True
        out = self.endpoint.peers.get(other)
        if over is not None or out is None or out.is_relayed:
            self._close_served_circuit(cid, over or "the other end left the relay")
            return True
        message: dict[str, Any] = {"c": cid, "d": data}
        if other == circuit.dst:
            message["f"] = circuit.src.key
        with contextlib.suppress(TransportError):
            out.notify("relay.data", message)
        return True

    def _close_served_circuit(self, cid: int, reason: str) -> None:
        circuit = self.service.close(cid)
        if circuit is None:
            return
        for end in (circuit.src, circuit.dst):
            conn = self.endpoint.peers.get(end)
            if conn is not None and conn.is_established:
                with contextlib.suppress(TransportError):
                    conn.notify("relay.close", {"c": cid, "reason": reason})

    # --- as a user of relays -----------------------------------------------------------------

    def on_notify(self, conn: PeerConnection, topic: str, body: Any) -> None:
        if conn.peer_id is None or not isinstance(body, dict):
            self.endpoint.record_misbehaviour(conn, f"malformed {topic}")
            return
        if topic == "relay.data":
            if self.forward(conn, body):
                return
            self._circuit_data(conn.peer_id, body)
        elif topic == "relay.close":
            cid = body.get("c")
            if isinstance(cid, int):
                if cid in self.service.circuits:
                    circuit = self.service.circuits[cid]
                    if conn.peer_id in (circuit.src, circuit.dst):
                        self._close_served_circuit(cid, "closed by one end")
                        return
                self.drop_circuit(conn.peer_id, cid)
        else:
            self.endpoint.record_misbehaviour(conn, f"unknown topic {topic!r}")

    def _circuit_data(self, relay: NodeId, body: dict[str, Any]) -> None:
        cid, data = body.get("c"), _packets(body.get("d"))
        if not isinstance(cid, int) or data is None:
            return
        circuit = self.circuits.get((relay, cid))
        if circuit is None:
            # A circuit opened to us: only through the relay we reserved on.
            if self.reservation is None or self.reservation.relay != relay:
                return
            try:
                NodeId(bytes(body.get("f") or b""))  # the relay names who opened it
            except (TypeError, ValueError):
                return
            circuit = self.add_circuit(relay, cid)
        for packet in data:
            self.endpoint.datagram_received(packet, circuit.pseudo, via="relay")

    def add_circuit(self, relay: NodeId, cid: int) -> _Circuit:
        pseudo = (f"{RELAYED_PREFIX}{relay}/{cid}", 0)
        circuit = _Circuit(relay, cid, pseudo)
        self.circuits[(relay, cid)] = circuit

        pending: list[bytes] = []

        def flush() -> None:
            batch = pending[:]
            pending.clear()
            conn = self.endpoint.peers.get(relay)
            if conn is None or not conn.is_established or conn.is_relayed:
                return
            for start in range(0, len(batch), MAX_PACKETS_PER_MESSAGE):
                with contextlib.suppress(TransportError):
                    conn.notify("relay.data", {"c": cid, "d": batch[start:start + MAX_PACKETS_PER_MESSAGE]})

        def carry(data: bytes) -> None:
            # What QUIC sends in one turn of the loop travels in one message (one stream).
            if not pending:
                asyncio.get_running_loop().call_soon(flush)
            pending.append(data)

        self.endpoint.add_circuit(pseudo, carry)
        return circuit

    def drop_circuit(self, relay: NodeId, cid: int) -> None:
        """Forget a circuit this node is an end of, closing its connection."""
        circuit = self.circuits.pop((relay, cid), None)
        if circuit is not None:
            self.endpoint.remove_circuit(circuit.pseudo)

    async def keep_reservation(self) -> None:
        """Reserve (or renew) a slot on a public peer: a known relay first, then any peer."""
        order = [peer for _, peer in self.candidates if peer is not None]
        order += [p for p, c in self.endpoint.peers.items() if not c.is_relayed and p not in order]
        if self.reservation is not None:
            order.insert(0, self.reservation.relay)
        for peer in dict.fromkeys(order):
            conn = self.endpoint.peers.get(peer)
            if conn is None:
                addr = next((a for a, p in self.candidates if p == peer), None)
                if addr is None:
                    continue
                try:
                    conn = await self.endpoint.connect(addr, peer, timeout=RPC_TIMEOUT_S)
                except TransportError:
                    continue
            if conn.is_relayed or not conn.is_established:
                continue
            try:
                answer = await conn.request("relay.reserve", {}, timeout=RPC_TIMEOUT_S)
                expires = float(answer["expires_in_s"])
            except (TransportError, KeyError, TypeError, ValueError):
                continue
            changed = self.reservation is None or self.reservation.relay != peer
            self.reservation = _Reservation(peer, conn.addr[:2], time.monotonic() + expires)  # type: ignore[arg-type]
            if changed:
                log.info("relay reservation on %s at %s", peer.short(), format_address(conn.addr[:2]))
                self.on_addresses_changed()
            return
        if self.reservation is not None:
            conn = self.endpoint.peers.get(self.reservation.relay)
            if conn is None or not conn.is_established:
                log.info("lost the relay reservation on %s", self.reservation.relay.short())
                self.reservation = None
                self.on_addresses_changed()

    async def connect(self, peer: NodeId, address: RelayedAddress,
                      timeout: float = 10.0) -> PeerConnection:
        """Open a circuit through `address`'s relay and a QUIC connection to `peer` over it."""
        if address.relay == self.endpoint.node_id:
            raise TransportError(f"{peer.short()} is relayed by this node, and is not connected to it")
        relay = await self.endpoint.connect((address.host, address.port), address.relay, timeout=timeout)
        try:
            answer = await relay.request("relay.connect", {"to": peer.key}, timeout=RPC_TIMEOUT_S)
            cid = int(answer["c"])
        except RemoteError as exc:
            raise TransportError(f"relay {address.relay.short()} refused: {exc}") from None
        except (KeyError, TypeError, ValueError):
            raise TransportError(f"relay {address.relay.short()} answered nonsense") from None
        circuit = self.add_circuit(address.relay, cid)
        try:
            return await self.endpoint.connect(circuit.pseudo, peer, timeout=timeout)
        except TransportError:
            self.drop_circuit(address.relay, cid)
            raise


def _packets(value: Any) -> list[bytes] | None:
    """The packets of a relay.data message, or None if it is not a bounded list of bytes."""
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_PACKETS_PER_MESSAGE
            or not all(isinstance(p, bytes) and len(p) <= MAX_RELAYED_PACKET for p in value)):
        return None
    return value
