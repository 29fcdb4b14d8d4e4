"""The QUIC transport end to end: real endpoints on loopback exchanging real QUIC.

Every test runs its own event loop with a hard time bound, starts its endpoints on 127.0.0.1
port 0, and fails if the loop reported an exception nobody handled (a callback that blew up).
Hostile peers are stock aioquic clients or our own connections driven off the protocol's rails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aioquic.asyncio.client import connect as stock_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hmnode.identity import NodeId, NodeKey
from hmnode.transport import certs
from hmnode.transport.connection import (
    MAX_STRIKES,
    Address,
    Handlers,
    PeerConnection,
    RemoteError,
    TransportError,
)
from hmnode.transport.endpoint import ConnectionLimits, Endpoint
from hmnode.transport.quic import make_configuration
from hmnode.transport.wire import (
    ALPN,
    MAX_FRAME_BYTES,
    BulkHeader,
    ErrorCode,
    FrameReader,
    Request,
    Response,
    frame,
)

TEST_TIMEOUT_S = 30.0

# --- harness ---------------------------------------------------------------------------------


def run(test: Callable[[], Awaitable[Any]], timeout: float = TEST_TIMEOUT_S) -> Any:
    """Run one async test in a fresh loop, bounded, failing on exceptions nobody handled."""
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        unhandled: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
        async with asyncio.timeout(timeout):
            result = await test()
        assert not unhandled, f"the event loop reported unhandled errors: {unhandled}"
        return result
    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll until `predicate()` holds; fails after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what or predicate}") from None


async def bounded(aw: Awaitable[Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        return await aw


class HashSink:
    """A bulk sink that hashes what arrives; end() answers with the digest and the size."""

    def __init__(self, node: "Node", header: BulkHeader) -> None:
        self.node = node
        self.header = header
        self.hash = hashlib.sha256()
        self.size = 0

    def data(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)

    def end(self) -> Any:
        if isinstance(self.header.meta, dict) and self.header.meta.get("refuse"):
            raise ValueError("digest does not match the manifest")
        self.node.bulks.append((self.header.topic, self.size))
        return {"sha256": self.hash.digest(), "size": self.size}

    def abort(self, reason: str) -> None:
        self.node.aborted.append(reason)


@dataclass
class Node:
    """One real endpoint plus a record of everything its handlers saw."""

    key: NodeKey
    endpoint: Endpoint = field(init=False)
    addr: Address = ("127.0.0.1", 0)
    calls: list[tuple[NodeId | None, str]] = field(default_factory=list)
    notes: list[tuple[NodeId | None, str, Any]] = field(default_factory=list)
    datagrams: list[tuple[NodeId | None, str, Any]] = field(default_factory=list)
    bulks: list[tuple[str, int]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    hanging: int = 0
    cancelled: int = 0
    takes_bulk: bool = True

    @property
    def id(self) -> NodeId:
        return self.key.node_id

    def handlers(self) -> Handlers:
        def served(name: str, fn: Callable[[PeerConnection, Any], Awaitable[Any]]):
            async def handler(peer: PeerConnection, body: Any) -> Any:
                self.calls.append((peer.peer_id, name))
                return await fn(peer, body)
            return handler

        async def echo(peer: PeerConnection, body: Any) -> Any:
            return body

        async def whoami(peer: PeerConnection, body: Any) -> Any:
            # Who the server believes is calling, and whether it is the connection it keeps.
            return {"caller": str(peer.peer_id), "me": str(self.id),
                    "kept": self.endpoint.peers.get(peer.peer_id) is peer,
                    "is_client": peer.is_client}

        async def fail(peer: PeerConnection, body: Any) -> Any:
            raise ValueError("the handler blew up")

        async def nap(peer: PeerConnection, body: Any) -> Any:
            await asyncio.sleep(body["s"])
            return body["v"] * 2

        async def hang(peer: PeerConnection, body: Any) -> Any:
            self.hanging += 1
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                self.cancelled += 1

        def note(peer: PeerConnection, topic: str, body: Any) -> None:
            self.notes.append((peer.peer_id, topic, body))

        def datagram(peer: PeerConnection, topic: str, body: Any) -> None:
            self.datagrams.append((peer.peer_id, topic, body))

        rpc = {name: served(name, fn) for name, fn in
               {"echo": echo, "whoami": whoami, "fail": fail, "nap": nap, "hang": hang}.items()}
        return Handlers(rpc=rpc, notify=note, datagram=datagram,
                        bulk=(lambda peer, header: HashSink(self, header)) if self.takes_bulk else None)

    async def start(self, port: int = 0, limits: ConnectionLimits = ConnectionLimits()) -> "Node":
        self.endpoint = Endpoint(self.key, self.handlers(), limits=limits)
        addresses = await self.endpoint.start("127.0.0.1", port)
        self.addr = addresses[0]
        return self


@contextlib.asynccontextmanager
async def nodes(count: int, limits: ConnectionLimits = ConnectionLimits()) -> AsyncIterator[list[Node]]:
    """Start `count` endpoints on loopback; close them all at the end, whatever happened."""
    started: list[Node] = []
    try:
        for _ in range(count):
            started.append(await Node(NodeKey.generate()).start(limits=limits))
        yield started
    finally:
        for node in started:
            await node.endpoint.close()


class RecordingProtocol(QuicConnectionProtocol):
    """A stock aioquic client protocol that keeps every event it gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[events.QuicEvent] = []
        self.terminated: asyncio.Future[events.ConnectionTerminated] = \
            asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        self.events.append(event)
        if isinstance(event, events.ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        super().quic_event_received(event)

    def stream_events(self, sid: int) -> list[events.QuicEvent]:
        return [e for e in self.events if getattr(e, "stream_id", None) == sid]


@contextlib.asynccontextmanager
async def stock_client(addr: Address, configuration: QuicConfiguration) -> AsyncIterator[RecordingProtocol]:
    """A plain aioquic client (no hmnode code on its side); closed and awaited at the end."""
    async with asyncio.timeout(10):
        async with stock_connect(addr[0], addr[1], configuration=configuration,
                                 create_protocol=RecordingProtocol) as client:
            yield client  # type: ignore[misc]


def stock_configuration(**kw: Any) -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE,
                             **kw)


def ecdsa_identity() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert, key


async def call_raw(client: RecordingProtocol, method: str, body: Any) -> Any:
    """Make one RPC by hand over a stock aioquic connection."""
    reader, writer = await client.create_stream()
    sid = writer.get_extra_info("stream_id")
    writer.write(frame(Request(sid, method, body)))
    writer.write_eof()
    data = await bounded(reader.read())
    (answer,) = FrameReader().feed(data)
    assert isinstance(answer, Response)
    return answer.body


# --- 1. exchanges between real endpoints ------------------------------------------------------


def test_two_endpoints_exchange_rpcs_notifies_and_datagrams():
    async def body() -> None:
        async with nodes(2) as (a, b):
            conn = await a.endpoint.connect(b.addr, b.id)
            assert conn.peer_id == b.id and conn.is_established

            payload = {"bytes": os.urandom(300), "nested": [1, {"deep": [None, True, -7, 2.5]}],
                       "text": "héllo", 7: [b"", [], {}], "big": (1 << 64) - 1}
            assert await conn.request("echo", payload) == payload
            assert await conn.request("echo", (1, (2, 3))) == [1, [2, 3]]  # tuples arrive as lists
            assert await conn.request("echo") is None
            who = await conn.request("whoami")
            assert who["caller"] == str(a.id) and who["me"] == str(b.id)

            with pytest.raises(RemoteError) as unknown:
                await conn.request("no-such-method", 1)
            assert unknown.value.code == "unknown_method"
            assert "no-such-method" in str(unknown.value)

            with pytest.raises(RemoteError) as failed:
                await conn.request("fail")
            assert failed.value.code == "internal"
            assert "blew up" not in str(failed.value)  # the handler's internals stay private

            # The connection outlives both errors.
            assert conn.is_established and a.endpoint.peers[b.id] is conn
            assert await conn.request("echo", "still here") == "still here"

            for i in range(5):
                conn.notify("news", {"n": i, "blob": bytes([i]) * 10})
            await until(lambda: len(b.notes) == 5, what="notify messages")
            assert sorted(n[2]["n"] for n in b.notes) == list(range(5))
            assert all(n[0] == a.id and n[1] == "news" for n in b.notes)

            for i in range(5):
                conn.send_datagram("beat", [i, b"\x00\xff"])
            await until(lambda: len(b.datagrams) == 5, what="datagrams")
            assert sorted(d[2][0] for d in b.datagrams) == list(range(5))
            assert all(d[0] == a.id and d[1] == "beat" and d[2][1] == b"\x00\xff"
                       for d in b.datagrams)

            # The accepting side can call back on the same connection.
            back = b.endpoint.peers[a.id]
            assert await back.request("echo", b"back") == b"back"
            back.notify("reply", 1)
            await until(lambda: a.notes == [(b.id, "reply", 1)], what="notify back")

    run(body)


def test_bulk_stream_arrives_whole_from_iterables_and_async_iterables():
    data = os.urandom(8 << 20)
    digest = hashlib.sha256(data).digest()
    chunk = 256 << 10

    async def async_chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), chunk):
            await asyncio.sleep(0)
            yield data[start:start + chunk]

    async def body() -> None:
        async with nodes(2) as (a, b):
            conn = await a.endpoint.connect(b.addr, b.id)

            sync = (data[start:start + chunk] for start in range(0, len(data), chunk))
            answer = await conn.send_bulk("blob", sync, size=len(data), meta={"name": "one"})
            assert answer == {"sha256": digest, "size": len(data)}

            answer = await conn.send_bulk("blob", async_chunks(), meta=None)
            assert answer == {"sha256": digest, "size": len(data)}

            assert b.bulks == [("blob", len(data)), ("blob", len(data))]
            assert b.aborted == []
            assert await conn.request("echo", 1) == 1

    run(body)


def test_bulk_sink_that_refuses_the_data_answers_rejected():
    async def body() -> None:
        async with nodes(2) as (a, b):
            conn = await a.endpoint.connect(b.addr, b.id)
            with pytest.raises(RemoteError) as refused:
                await conn.send_bulk("blob", [os.urandom(100_000)], meta={"refuse": True})
            assert refused.value.code == "rejected"
            assert "does not match" in str(refused.value)
            assert b.bulks == []
            assert conn.is_established
            assert await conn.send_bulk("blob", [b"ok"]) == {
                "sha256": hashlib.sha256(b"ok").digest(), "size": 2}

    run(body)


def test_bulk_to_a_node_that_takes_none_is_refused_without_strikes():
    async def body() -> None:
        async with nodes(2) as (a, b):
            b.takes_bulk = False
            b.endpoint.handlers = b.handlers()
            conn = await a.endpoint.connect(b.addr, b.id)
            blob = os.urandom(4 << 20)
            with pytest.raises(RemoteError) as refused:
                await conn.send_bulk("blob", [blob])
            assert refused.value.code == "unsupported"
            # The bytes already in flight when the refusal went out are not held against A.
            await asyncio.sleep(0.2)
            assert b.endpoint.misbehaviour == {}
            assert conn.is_established and await conn.request("echo", 1) == 1

    run(body)


def test_three_endpoints_talk_pairwise_at_once():
    async def body() -> None:
        async with nodes(3) as (a, b, c):
            ab, bc, ac = await asyncio.gather(a.endpoint.connect(b.addr, b.id),
                                              b.endpoint.connect(c.addr, c.id),
                                              a.endpoint.connect(c.addr, c.id))
            await until(lambda: all(len(n.endpoint.peers) == 2 for n in (a, b, c)),
                        what="every node sees both others")
            pairs = [(a, b), (b, c), (a, c)]
            answers = await asyncio.gather(*(
                x.endpoint.peers[y.id].request("whoami", None)
                for p, q in pairs for x, y in ((p, q), (q, p))))
            expected = [(x, y) for p, q in pairs for x, y in ((p, q), (q, p))]
            for (x, y), who in zip(expected, answers):
                assert who == {"caller": str(x.id), "me": str(y.id), "kept": True,
                               "is_client": who["is_client"]}
            for conn, (x, y) in zip((ab, bc, ac), pairs):
                assert conn.peer_id == y.id
                assert await conn.request("echo", [str(x.id), str(y.id)]) == [str(x.id), str(y.id)]

    run(body)


# --- 2. authentication -----------------------------------------------------------------------


def test_dialler_checks_the_server_id_and_the_server_learns_the_dialler():
    async def body() -> None:
        async with nodes(3) as (a, b, c):
            with pytest.raises(TransportError) as wrong:
                await a.endpoint.connect(b.addr, expected=c.id, timeout=5)
            assert str(c.id) in str(wrong.value) and str(b.id) in str(wrong.value)
            assert a.endpoint.peers == {}
            # B may have authenticated A for a moment, but the refused connection is not kept.
            await until(lambda: a.id not in b.endpoint.peers, what="B forgets the refused dial")
            assert b.calls == []

            conn = await a.endpoint.connect(b.addr)  # unpinned: learns who answers
            assert conn.peer_id == b.id
            await until(lambda: a.id in b.endpoint.peers, what="B learns A's id")
            assert b.endpoint.peers[a.id].peer_id == a.id
            assert (await conn.request("whoami"))["caller"] == str(a.id)

    run(body)


async def _assert_refused(server: Node, client: RecordingProtocol,
                          code_ok: Callable[[int], bool]) -> None:
    """The server closed the stock client, never ran a handler for it, and keeps no peer."""
    # Try to use it; whatever happens, nothing may be served.
    with contextlib.suppress(Exception):
        reader, writer = await client.create_stream()
        writer.write(frame(Request(writer.get_extra_info("stream_id"), "echo", "let me in")))
        writer.write_eof()
        await bounded(reader.read(), 3)
    terminated = await bounded(client.terminated, 5)
    assert code_ok(terminated.error_code), terminated
    assert not any(isinstance(e, events.StreamDataReceived) for e in client.events)
    assert server.calls == []
    assert server.endpoint.peers == {}
    await until(lambda: not server.endpoint._live, what="the server drops the connection")


def test_client_without_certificate_is_refused():
    async def body() -> None:
        async with nodes(1) as (server,):
            async with stock_client(server.addr, stock_configuration()) as client:
                await _assert_refused(server, client, lambda code: code == ErrorCode.AUTH_FAILED)

    run(body)


def test_client_with_someone_elses_certificate_is_refused():
    async def body() -> None:
        async with nodes(2) as (server, victim):
            thief = NodeKey.generate()
            config = stock_configuration(certificate=certs.make_certificate(victim.key),
                                         private_key=certs.private_key(thief))
            with contextlib.suppress(ConnectionError):
                async with stock_client(server.addr, config) as client:
                    # TLS itself fails: the CertificateVerify does not match the certificate.
                    await _assert_refused(server, client, lambda code: 0x100 <= code <= 0x1ff)  # TLS alert
            assert server.calls == [] and server.endpoint.peers == {}
            # The real holder of that key is still welcome.
            conn = await victim.endpoint.connect(server.addr, server.id)
            assert (await conn.request("whoami"))["caller"] == str(victim.id)

    run(body)


def test_client_with_a_non_ed25519_certificate_is_refused():
    async def body() -> None:
        async with nodes(1) as (server,):
            cert, key = ecdsa_identity()
            config = stock_configuration(certificate=cert, private_key=key)
            async with stock_client(server.addr, config) as client:
                await _assert_refused(server, client, lambda code: code == ErrorCode.AUTH_FAILED)

    run(body)


def test_stock_client_with_a_node_certificate_is_served():
    # The other side of the refusals above: the protocol is plain QUIC + mutual TLS, and a stock
    # aioquic client holding a real node key is authenticated as that node.
    async def body() -> None:
        async with nodes(1) as (server,):
            key = NodeKey.generate()
            async with stock_client(server.addr, make_configuration(key, is_client=True)) as client:
                assert await call_raw(client, "whoami", None) == {
                    "caller": str(key.node_id), "me": str(server.id), "kept": True,
                    "is_client": False}
                assert key.node_id in server.endpoint.peers

    run(body)


# --- 3. garbage ------------------------------------------------------------------------------


def test_peer_sending_malformed_frames_is_cut_off_while_others_are_served():
    garbage = [
        b"\x00\x00\x00\x01\xc1",  # 0xc1 is never valid msgpack
        frame(Response(0, "an answer nobody asked for")),  # valid, but cannot open a stream
        b"\x00\x00\x00\x03\x93\x01\x02",  # a truncated frame, then the stream ends
    ]
    assert len(garbage) == MAX_STRIKES

    async def body() -> None:
        async with nodes(3) as (server, bad, good):
            bad_conn = await bad.endpoint.connect(server.addr, server.id)
            good_conn = await good.endpoint.connect(server.addr, server.id)
            stop = asyncio.Event()

            async def well_behaved() -> int:
                done = 0
                while not stop.is_set():
                    assert await good_conn.request("echo", done) == done
                    done += 1
                return done

            traffic = asyncio.create_task(well_behaved())
            for strike, junk in enumerate(garbage, start=1):
                sid = bad_conn.quic.get_next_available_stream_id()
                bad_conn.quic.send_stream_data(sid, junk, end_stream=True)
                bad_conn.transmit()
                await until(lambda: server.endpoint.misbehaviour[str(bad.id)] >= strike,
                            what=f"strike {strike}")
            await bounded(bad_conn.closed)
            assert bad_conn.close_code == ErrorCode.PROTOCOL_ERROR
            assert server.endpoint.misbehaviour[str(bad.id)] == MAX_STRIKES
            await until(lambda: bad.id not in server.endpoint.peers, what="bad peer dropped")
            assert server.calls.count((bad.id, "echo")) == 0

            await asyncio.sleep(0.1)
            stop.set()
            assert await bounded(traffic) > 0
            assert good_conn.is_established
            assert await good_conn.request("echo", "fine") == "fine"
            assert str(good.id) not in server.endpoint.misbehaviour

    run(body)


def test_malformed_frame_beside_a_request_in_one_packet():
    # One packet: a request for a method the server lacks (answered at once), and a malformed
    # one-way stream. The first is no offence, the second is exactly one.
    async def body() -> None:
        async with nodes(2) as (server, bad):
            conn = await bad.endpoint.connect(server.addr, server.id)
            ask = conn.quic.get_next_available_stream_id()
            conn.quic.send_stream_data(ask, frame(Request(ask, "no-such-method", None)), end_stream=True)
            junk = conn.quic.get_next_available_stream_id(is_unidirectional=True)
            conn.quic.send_stream_data(junk, b"\x00\x00\x00\x01\xc1", end_stream=True)
            conn.transmit()
            await until(lambda: server.endpoint.misbehaviour[str(bad.id)] == 1, what="one strike")
            assert conn.is_established
            assert await conn.request("echo", "ok") == "ok"

    run(body)


def test_oversized_frame_is_refused_from_its_header_alone():
    async def body() -> None:
        async with nodes(1) as (server,):
            key = NodeKey.generate()
            async with stock_client(server.addr, make_configuration(key, is_client=True)) as client:
                _, writer = await client.create_stream()
                sid = writer.get_extra_info("stream_id")
                # Announce a frame one byte over the limit and send a little of it: the server
                # must refuse at once rather than wait for (and buffer) a megabyte.
                writer.write(struct.pack(">I", MAX_FRAME_BYTES + 1) + os.urandom(64 << 10))
                await until(lambda: any(isinstance(e, events.StreamReset)
                                        for e in client.stream_events(sid)),
                            what="the server resets the stream")
                codes = {e.error_code for e in client.stream_events(sid)
                         if isinstance(e, (events.StreamReset, events.StopSendingReceived))}
                assert codes == {ErrorCode.TOO_LARGE}  # the request failed, with the reason
                assert not any(isinstance(e, events.StreamDataReceived)
                               for e in client.stream_events(sid))  # and got no answer
                with contextlib.suppress(RuntimeError, ValueError):
                    writer.write_eof()  # the stream is reset: this only marks the writer closed

                # One oversized message is one strike, not a strike per packet it spans.
                await asyncio.sleep(0.2)
                assert server.endpoint.misbehaviour[str(key.node_id)] == 1
                assert not client.terminated.done()
                assert await call_raw(client, "echo", "after") == "after"

    run(body)


# --- 4. reconnecting a restarted peer --------------------------------------------------------


def test_restarted_peer_is_redialled():
    async def body() -> None:
        async with nodes(2, ConnectionLimits(connect_timeout_s=1.0)) as (a, b):
            port = a.addr[1]
            redialer = b.endpoint.keep_connected(a.addr, a.id)
            await bounded(redialer.connected.wait())
            first = redialer.connection
            assert first is not None and await first.request("echo", 1) == 1

            await a.endpoint.close()
            await bounded(first.closed, 2)
            a.calls.clear()
            await a.start(port=port)  # the same key on the same port: a restart
            assert a.addr[1] == port

            await until(lambda: redialer.connection is not None and redialer.connection is not first
                        and redialer.connection.is_established, timeout=10, what="redialled")
            again = redialer.connection
            assert again.peer_id == a.id
            assert (await again.request("whoami"))["caller"] == str(b.id)
            assert b.endpoint.peers[a.id] is again

    run(body)


# --- 5. concurrency --------------------------------------------------------------------------


def test_a_hundred_concurrent_rpcs_on_one_connection():
    async def body() -> None:
        async with nodes(2) as (a, b):
            conn = await a.endpoint.connect(b.addr, b.id)
            calls = [conn.request("nap", {"s": (i % 7) * 0.01, "v": i}) if i % 2 else
                     conn.request("echo", {"i": i, "pad": os.urandom(i * 10)}) for i in range(100)]
            results = await asyncio.gather(*calls)
            for i, result in enumerate(results):
                if i % 2:
                    assert result == 2 * i
                else:
                    assert result["i"] == i and len(result["pad"]) == i * 10
            assert len(b.calls) == 100

    run(body)


# --- 6. timeouts and cancellation ------------------------------------------------------------


def test_request_timeout_cancels_the_handler_on_the_peer():
    async def body() -> None:
        async with nodes(2) as (a, b):
            conn = await a.endpoint.connect(b.addr, b.id)
            with pytest.raises(TransportError, match="within 0.3 s"):
                await conn.request("hang", None, timeout=0.3)
            assert b.hanging == 1
            await until(lambda: b.cancelled == 1, 3, "the handler is cancelled")

            # A caller that is itself cancelled also stops the peer's work.
            task = asyncio.create_task(conn.request("hang"))
            await until(lambda: b.hanging == 2, what="second handler started")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: b.cancelled == 2, 3, "the second handler is cancelled")
            assert conn.is_established and await conn.request("echo", 3) == 3

    run(body)


# --- 7. simultaneous dial --------------------------------------------------------------------


def test_simultaneous_dial_settles_on_one_shared_connection():
    async def body() -> None:
        for _ in range(5):  # the race goes either way; try it a few times
            async with nodes(2) as (a, b):
                ab, ba = await asyncio.gather(a.endpoint.connect(b.addr, b.id),
                                              b.endpoint.connect(a.addr, a.id))
                # What each connect() returned is the connection both ends keep, and works.
                assert ab.peer_id == b.id and ba.peer_id == a.id
                assert (await ab.request("whoami"))["kept"] is True
                assert (await ba.request("whoami"))["kept"] is True
                await asyncio.sleep(0.2)  # let any duplicate be closed
                assert ab.is_established and ba.is_established
                assert a.endpoint.peers == {b.id: ab} and b.endpoint.peers == {a.id: ba}
                # One connection seen from both ends: dialled by one, accepted by the other.
                assert ab.is_client != ba.is_client
                # The duplicate is closed on both ends: each keeps exactly one live connection.
                await until(lambda: len(a.endpoint._live) == 1 and len(b.endpoint._live) == 1,
                            what="duplicates closed")

    run(body)


# --- 8. limits -------------------------------------------------------------------------------


def test_per_address_limit_refuses_the_third_client():
    async def body() -> None:
        async with nodes(1, ConnectionLimits(max_per_ip=2)) as (server,):
            async with nodes(3) as (c1, c2, c3):
                first = await c1.endpoint.connect(server.addr, server.id)
                second = await c2.endpoint.connect(server.addr, server.id)
                with pytest.raises(TransportError):
                    await c3.endpoint.connect(server.addr, server.id, timeout=5)
                assert c3.id not in server.endpoint.peers
                assert await first.request("echo", 1) == 1
                assert await second.request("echo", 2) == 2
                assert set(server.endpoint.peers) == {c1.id, c2.id}

    run(body)


# --- 9. shutdown -----------------------------------------------------------------------------


def test_close_tells_peers_and_leaves_nothing_behind():
    async def body() -> None:
        a, b, c = (Node(NodeKey.generate()) for _ in range(3))
        for node in (a, b, c):
            await node.start()
        ab = await a.endpoint.connect(b.addr, b.id)
        await until(lambda: a.id in b.endpoint.peers)
        ba = b.endpoint.peers[a.id]

        # Closing A: B hears SHUTDOWN from A at once (not an idle timeout), and B's call that
        # A was serving fails.
        pending = asyncio.create_task(ba.request("hang", timeout=20))
        await until(lambda: a.hanging == 1, what="A serving B")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await a.endpoint.close()
        reason = await bounded(ba.closed, 2)
        assert loop.time() - started < 1.0, "closed by idle timeout, not by the peer"
        assert ba.close_code == ErrorCode.SHUTDOWN and "by peer" in reason, reason
        with pytest.raises(TransportError):
            await bounded(pending)
        assert ab.closed.done() and a.cancelled == 1
        assert a.endpoint.peers == {} and a.id not in b.endpoint.peers

        # B and C, closed while busy: B serves a call from C, redials the departed A, and keeps
        # C; C's call to B is in flight.
        b.endpoint.keep_connected(a.addr, a.id)
        cb = await c.endpoint.connect(b.addr, b.id)
        c.endpoint.keep_connected(b.addr, b.id)
        call = asyncio.create_task(cb.request("hang", timeout=20))
        await until(lambda: b.hanging == 1, what="B serving C")
        await b.endpoint.close()
        await c.endpoint.close()
        assert asyncio.all_tasks() - {asyncio.current_task(), call} == set()
        with pytest.raises(TransportError):
            await bounded(call)
        assert b.cancelled == 1
        assert asyncio.all_tasks() == {asyncio.current_task()}

        # The sockets are gone: every port can be bound again straight away.
        for node in (a, b, c):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind(node.addr)
            finally:
                sock.close()

    run(body)


# --- 10. keepalive ---------------------------------------------------------------------------


def test_keepalive_measures_rtt():
    async def body() -> None:
        async with nodes(2, ConnectionLimits(keepalive_s=0.2)) as (a, b):
            conn = await a.endpoint.connect(b.addr, b.id)
            await until(lambda: a.id in b.endpoint.peers)
            await asyncio.sleep(1.0)
            assert conn.rtt_s is not None and 0 < conn.rtt_s < 1.0
            back = b.endpoint.peers[a.id]
            assert back.rtt_s is not None and 0 < back.rtt_s < 1.0

    run(body)
