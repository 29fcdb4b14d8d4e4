"""The aioquic internals that transport/quic.py relies on, pinned by driving real connections.

Two QuicConnection objects are wired together by hand (sans-IO: datagrams are handed from one to
the other, time is a number we advance), so an aioquic upgrade that moves any of these internals
fails here, loudly, instead of weakening authentication or backpressure quietly.
"""

from __future__ import annotations

import datetime

import pytest
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hmnode.identity import NodeKey
from hmnode.transport import certs
from hmnode.transport.quic import (
    MutualQuicConnection,
    make_configuration,
    peer_certificate,
    unacked_stream_bytes,
)

CLIENT_ADDR = ("10.0.0.1", 4433)
SERVER_ADDR = ("10.0.0.2", 4433)
MAX_ROUNDS = 200


class Pair:
    """A client and a server connection joined by a perfect, instant network and a fake clock."""

    def __init__(self, client_key: NodeKey, server_key: NodeKey,
                 server_cls: type[QuicConnection] = MutualQuicConnection) -> None:
        self.now = 1000.0
        self.client = MutualQuicConnection(configuration=make_configuration(client_key, is_client=True))
        self.server_cls = server_cls
        self.server_key = server_key
        self.server: QuicConnection | None = None

    def start(self) -> None:
        self.client.connect(SERVER_ADDR, now=self.now)
        first = self.client.datagrams_to_send(now=self.now)
        assert first, "the client sent no Initial"
        # The server learns the original destination connection id from the client's Initial,
        # as the endpoint does.
        header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
        self.server = self.server_cls(
            configuration=make_configuration(self.server_key, is_client=False),
            original_destination_connection_id=header.destination_cid)
        for data, _ in first:
            self.server.receive_datagram(data, CLIENT_ADDR, now=self.now)

    def exchange(self) -> bool:
        """Deliver everything both sides want to send; True if anything moved."""
        assert self.server is not None
        moved = False
        for src, dst, src_addr in ((self.client, self.server, CLIENT_ADDR),
                                   (self.server, self.client, SERVER_ADDR)):
            for data, _ in src.datagrams_to_send(now=self.now):
                dst.receive_datagram(data, src_addr, now=self.now)
                moved = True
        return moved

    def settle(self) -> None:
        """Exchange until quiet (no timers fired: retransmissions are not needed on this network)."""
        for _ in range(MAX_ROUNDS):
            if not self.exchange():
                return
        raise AssertionError("connections did not go quiet")

    def fire_next_timer(self) -> None:
        """Advance the clock to the earliest timer and fire it (delayed ACKs ride on these)."""
        assert self.server is not None
        timers = [(t, c) for c in (self.client, self.server) if (t := c.get_timer()) is not None]
        at, conn = min(timers, key=lambda item: item[0])
        self.now = max(self.now, at)
        conn.handle_timer(now=self.now)

    def events(self, conn: QuicConnection) -> list[events.QuicEvent]:
        out = []
        while (event := conn.next_event()) is not None:
            out.append(event)
        return out


def handshake(client_key: NodeKey, server_key: NodeKey, **kw) -> Pair:
    pair = Pair(client_key, server_key, **kw)
    pair.start()
    pair.settle()
    assert pair.server is not None
    for conn in (pair.client, pair.server):
        assert any(isinstance(e, events.HandshakeCompleted) for e in pair.events(conn))
    return pair


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


# --- MutualQuicConnection and peer_certificate ----------------------------------------------


def test_mutual_handshake_gives_each_side_the_others_certificate():
    client_key, server_key = NodeKey.generate(), NodeKey.generate()
    pair = handshake(client_key, server_key)
    assert pair.server is not None

    server_saw = peer_certificate(pair.server)
    client_saw = peer_certificate(pair.client)
    assert server_saw is not None, "the server did not request the client's certificate"
    assert client_saw is not None
    # Each side holds the certificate the other presented, and it speaks for the other's key.
    assert der(server_saw) == der(pair.client.configuration.certificate)
    assert der(client_saw) == der(pair.server.configuration.certificate)
    assert certs.node_id_of(server_saw) == client_key.node_id
    assert certs.node_id_of(client_saw) == server_key.node_id


def test_a_stock_server_does_not_ask_for_the_client_certificate():
    # What MutualQuicConnection changes: without it the server never sees the client's key,
    # and authentication of the dialler would silently stop working.
    pair = handshake(NodeKey.generate(), NodeKey.generate(), server_cls=QuicConnection)
    assert pair.server is not None
    assert peer_certificate(pair.server) is None
    assert peer_certificate(pair.client) is not None


def test_peer_certificate_is_none_before_the_handshake():
    pair = Pair(NodeKey.generate(), NodeKey.generate())
    assert peer_certificate(pair.client) is None  # not even a TLS context yet
    pair.client.connect(SERVER_ADDR, now=pair.now)
    assert peer_certificate(pair.client) is None  # ClientHello sent, nothing heard back
    assert pair.client.datagrams_to_send(now=pair.now)
    assert peer_certificate(pair.client) is None


# --- unacked_stream_bytes -------------------------------------------------------------------


def test_unacked_stream_bytes_counts_until_the_peer_acknowledges():
    pair = handshake(NodeKey.generate(), NodeKey.generate())
    assert pair.server is not None
    client = pair.client
    sid = client.get_next_available_stream_id()
    assert unacked_stream_bytes(client, sid) == 0  # no such stream yet

    payload = bytes(range(256)) * 40  # 10 KiB: several packets
    client.send_stream_data(sid, payload)
    assert unacked_stream_bytes(client, sid) == len(payload)  # queued, nothing sent
    client.send_stream_data(sid, payload[:100])
    assert unacked_stream_bytes(client, sid) == len(payload) + 100

    # Drive both sides by hand; whatever the client has sent stays counted until the server's
    # acknowledgement reaches it.
    received = b""
    sent_unacked = False
    for _ in range(MAX_ROUNDS):
        out = client.datagrams_to_send(now=pair.now)
        if out:
            sent_unacked = sent_unacked or unacked_stream_bytes(client, sid) == len(payload) + 100
            for data, _ in out:
                pair.server.receive_datagram(data, CLIENT_ADDR, now=pair.now)
        for data, _ in pair.server.datagrams_to_send(now=pair.now):
            client.receive_datagram(data, SERVER_ADDR, now=pair.now)
        received += b"".join(e.data for e in pair.events(pair.server)
                             if isinstance(e, events.StreamDataReceived) and e.stream_id == sid)
        if unacked_stream_bytes(client, sid) == 0:
            break
        if not out:
            pair.fire_next_timer()  # pacing, delayed ACKs
    assert sent_unacked, "bytes on the wire were not counted as unacknowledged"
    assert unacked_stream_bytes(client, sid) == 0
    assert received == payload + payload[:100]


def test_unacked_stream_bytes_is_zero_once_a_finished_stream_is_gone():
    pair = handshake(NodeKey.generate(), NodeKey.generate())
    client = pair.client
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"x" * 3000, end_stream=True)
    assert unacked_stream_bytes(client, sid) == 3000
    for _ in range(MAX_ROUNDS):
        pair.settle()
        if unacked_stream_bytes(client, sid) == 0:
            break
        pair.fire_next_timer()
    assert unacked_stream_bytes(client, sid) == 0


# --- certs.node_id_of -----------------------------------------------------------------------


def _ecdsa_certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def test_node_id_of_a_node_certificate_is_the_node_id():
    key = NodeKey.generate()
    assert certs.node_id_of(certs.make_certificate(key)) == key.node_id
    # The subject is for people; the key is the identity.
    assert certs.make_certificate(key).subject.rfc4514_string() == f"CN={key.node_id}"


def test_node_id_of_no_certificate_is_an_error():
    with pytest.raises(certs.PeerAuthenticationError, match="no certificate"):
        certs.node_id_of(None)


def test_node_id_of_an_ecdsa_certificate_is_an_error():
    with pytest.raises(certs.PeerAuthenticationError, match="not Ed25519"):
        certs.node_id_of(_ecdsa_certificate())


def test_node_id_of_a_certificate_signed_by_another_key_is_an_error():
    claimed, signer = NodeKey.generate(), NodeKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(claimed.node_id))])
    now = datetime.datetime.now(datetime.timezone.utc)
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(certs.private_key(claimed).public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1))
              .not_valid_after(now + datetime.timedelta(days=1))
              .sign(certs.private_key(signer), algorithm=None))
    with pytest.raises(certs.PeerAuthenticationError, match="not self-signed"):
        certs.node_id_of(forged)
