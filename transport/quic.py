"""hmnode's use of aioquic: configurations, and the one place that reaches into aioquic's internals.

aioquic has no public API to ask for a client certificate (its issues #541 and #586), to read
the peer's certificate, or to see how much of a stream is still buffered. This module adapts
those three things and nothing else; tests/test_quic_adapter.py pins each one, so that an aioquic
upgrade that moves them fails there, loudly, rather than weakening authentication silently.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509

from hmnode.identity import NodeId, NodeKey
from hmnode.transport import certs
from hmnode.transport.wire import ALPN, MAX_DATAGRAM_BYTES


MAX_PACKET = 16384
# The length of the connection ids this node issues; set in every configuration, so that
# endpoints can parse a short header's destination id (whose length is not on the wire).
CID_LENGTH = 8
# RFC 9000 section 14.1: a client's first datagram is at least this long (anti-amplification).
MIN_INITIAL_BYTES = 1200


@dataclass(frozen=True)
class QuicTuning:
    """The knobs that set throughput and liveness; defaults suit the internet's 1200-byte floor."""

    max_datagram_size: int = 1200
    flow_window: int = 1 << 20
    congestion_control: str = "reno"
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        # Above 16 KiB aioquic 1.7 writes STREAM frame lengths that the peer misparses
        # ("Unknown frame type"): measured, so refused here rather than met at run time.
        if not 1200 <= self.max_datagram_size <= MAX_PACKET:
            raise ValueError(f"max_datagram_size must be 1200 to {MAX_PACKET}, not {self.max_datagram_size}")
        if self.congestion_control not in ("reno", "cubic"):
            raise ValueError(f"congestion_control must be reno or cubic, not {self.congestion_control!r}")


def make_configuration(key: NodeKey, is_client: bool, tuning: QuicTuning = QuicTuning(), *,
                       certificate_now: datetime.datetime | None = None,
                       certificate_serial: int | None = None) -> QuicConfiguration:
    """A configuration that presents the node's certificate on both sides and checks nothing
    against CAs: the peer's key is checked against its node id after the handshake instead.

    `certificate_now` and `certificate_serial` go to `certs.make_certificate` (defaults: the
    wall clock and a random serial); the simulator fixes both to make certificates reproducible.
    """
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        certificate=certs.make_certificate(key, now=certificate_now, serial=certificate_serial),
        private_key=certs.private_key(key),
        verify_mode=ssl.CERT_NONE,
        connection_id_length=CID_LENGTH,
        max_datagram_frame_size=MAX_DATAGRAM_BYTES + 64,
        max_datagram_size=tuning.max_datagram_size,
        max_data=tuning.flow_window * 4,
        max_stream_data=tuning.flow_window,
        congestion_control_algorithm=tuning.congestion_control,
        idle_timeout=tuning.idle_timeout_s,
    )
    return config


class MutualQuicConnection(QuicConnection):
    """A QuicConnection whose server side requires the client's certificate (mutual TLS)."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True


def peer_certificate(connection: QuicConnection) -> x509.Certificate | None:
    """The certificate the peer presented in the handshake, or None."""
    tls = getattr(connection, "tls", None)
    return None if tls is None else tls._peer_certificate


def authenticated_peer(connection: QuicConnection, alpn_protocol: str | None,
                       expected: NodeId | None) -> NodeId:
    """The node a completed handshake authenticated: our ALPN, a self-signed Ed25519
    certificate, and the node dialled if one was; raises PeerAuthenticationError otherwise."""
    if alpn_protocol != ALPN:
        raise certs.PeerAuthenticationError(f"peer speaks {alpn_protocol!r}, not {ALPN}")
    peer_id = certs.node_id_of(peer_certificate(connection))
    if expected is not None and peer_id != expected:
        raise certs.PeerAuthenticationError(f"dialled {expected} but the peer is {peer_id}")
    return peer_id


def unacked_stream_bytes(connection: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream that the peer has not acknowledged yet (sent or still queued)."""
    stream = connection._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start
