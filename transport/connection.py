"""One authenticated QUIC connection to a peer: RPC, one-way messages, datagrams, bulk streams.

Like aioquic's asyncio protocol, this is the thin asyncio shell around a sans-IO
`QuicConnection`: it feeds the connection datagrams and timers, turns its events into calls of
the endpoint's handlers, and turns the application's calls into stream data. Stream use:

- client-initiated bidirectional stream: one `Request` frame, then one `Response` or
  `ErrorResponse` frame back; or a `BulkHeader` frame and raw bytes to the end of the stream,
  answered by one `Response` frame when the receiver has taken it all;
- unidirectional stream: `Notify` frames (one-way messages);
- QUIC datagrams: one `Notify` each (small, loss-tolerant).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from hmnode.errors import HmnodeError
from hmnode.identity import NodeId
from hmnode.transport import certs
from hmnode.transport.quic import authenticated_peer, unacked_stream_bytes
from hmnode.transport.wire import (
    BulkHeader, ErrorCode, ErrorResponse, FrameReader, Notify, Request, Response,
    WireError, decode_datagram, encode_datagram, frame,
)

if TYPE_CHECKING:
    from hmnode.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

Address = tuple[str, int]
# The host part of the pseudo-address of a connection carried by a relay circuit.
RELAYED_PREFIX = "relay/"

# A peer that sends this many malformed messages on one connection is cut off.
MAX_STRIKES = 3
# Requests a peer may have running on this node at once, per connection.
MAX_CONCURRENT_HANDLERS = 256
# A bulk writer waits while more of its bytes than this many stream flow-control windows are
# unacknowledged: enough to keep the window full, few enough that a slow receiver cannot make
# the sender buffer a whole file.
BULK_HIGH_WATER_WINDOWS = 2
BULK_CHUNK = 64 << 10
DEFAULT_TIMEOUT_S = 10.0


class TransportError(HmnodeError):
    """A connection or a call on it failed; the message says what the peer or network did."""


class RemoteError(TransportError):
    """The peer answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer answered {code}: {message}")
        self.code = code


class BulkSink(Protocol):
    """Where an incoming bulk stream's bytes go, as they arrive (write them out; don't hoard)."""

    def data(self, chunk: bytes) -> None: ...

    def end(self) -> Any:
        """The stream ended whole; the return value is sent back to the sender."""

    def abort(self, reason: str) -> None: ...


@dataclass
class Handlers:
    """What a node does with what its peers send it."""

    rpc: Mapping[str, Callable[["PeerConnection", Any], Awaitable[Any]]] = field(default_factory=dict)
    notify: Callable[["PeerConnection", str, Any], None] | None = None
    datagram: Callable[["PeerConnection", str, Any], None] | None = None
    bulk: Callable[["PeerConnection", BulkHeader], BulkSink] | None = None


@dataclass
class _InboundStream:
    reader: FrameReader
    sink: BulkSink | None = None
    task: asyncio.Task | None = None


class PeerConnection:
    """A QUIC connection whose peer proved its node id in the handshake."""

    def __init__(self, endpoint: "Endpoint", quic: QuicConnection, addr: Address,
                 expected: NodeId | None) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.addr = addr
        self.is_client = quic.configuration.is_client
        self.expected = expected
        self.peer_id: NodeId | None = None
        self.established = asyncio.get_running_loop().create_future()
        # A failed handshake is reported through connect(); nobody else need collect it.
        self.established.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.closed = asyncio.get_running_loop().create_future()
        self.close_reason: str | None = None
        self.close_code: int | None = None
        self.created_at = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.rtt_s: float | None = None
        # When the peer was last heard from (loop time): how a dead path is noticed.
        self.last_heard = self._now()
        self.strikes = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._inbound: dict[int, _InboundStream] = {}
        # Peer streams this node refused (stop_stream sent): the rest of their data is dropped.
        self._refused: set[int] = set()
        self._handlers_running = 0
        self.handler_tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._dropped = False
        self._progress = asyncio.Event()
        self._pings: dict[int, float] = {}
        self._ping_ids = itertools.count(1)

    # --- identity and state -----------------------------------------------------------------

    @property
    def is_relayed(self) -> bool:
        """Whether this connection runs over a relay circuit rather than a direct path."""
        return isinstance(self.addr[0], str) and self.addr[0].startswith(RELAYED_PREFIX)

    @property
    def is_established(self) -> bool:
        return self.established.done() and not self.established.exception() and not self.closed.done()

    def __repr__(self) -> str:
        who = self.peer_id.short() if self.peer_id else "?"
        return f"<PeerConnection {who} {'out' if self.is_client else 'in'} {self.addr[0]}:{self.addr[1]}>"

    # --- datagrams and timers (driven by the endpoint) --------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.bytes_in += len(data)
        self.last_heard = self._now()
        self.quic.receive_datagram(data, addr, now=self._now())
        self._process_events()
        # Answer at once: acks that wait for the end of the loop turn slow the sender's clock
        # (measured: bulk throughput fell to two thirds of stock aioquic's).
        self.flush()

    def refuse(self, data: bytes, addr: Address, code: int, reason: str) -> None:
        """Read a client's Initial only to answer it with a close: no handshake reply goes out,
        so the client cannot mistake the connection for an accepted one."""
        self.quic.receive_datagram(data, addr, now=self._now())
        self.close(code, reason)

    def transmit(self) -> None:
        """Send what the connection has queued at the end of this turn of the event loop, so that
        what the application queues in one turn (many requests or answers) shares packets."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what the QUIC connection has queued now, and re-arm its timer."""
        self._flush_scheduled = False
        if self._dropped:
            return
        now = self._now()
        for data, addr in self.quic.datagrams_to_send(now=now):
            self.bytes_out += len(data)
            self.endpoint.send_raw(data, addr)
        at = self.quic.get_timer()
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if at is None else asyncio.get_running_loop().call_at(at, self._on_timer)
            self._timer_at = at
        self._progress.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(now=self._now())
        self._process_events()
        self.transmit()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    # --- events -----------------------------------------------------------------------------

    def _process_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.DatagramFrameReceived):
                self._on_datagram(event.data)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, events.PingAcknowledged):
                sent = self._pings.pop(event.uid, None)
                if sent is not None:
                    # perf_counter: the loop's clock has only millisecond resolution on uvloop.
                    self.rtt_s = time.perf_counter() - sent
            elif isinstance(event, events.StreamReset):
                self._on_stream_reset(event.stream_id, f"reset by peer (code {event.error_code})")
            elif isinstance(event, events.StopSendingReceived):
                self._on_stream_reset(event.stream_id, "peer stopped reading")
            elif isinstance(event, events.ConnectionIdIssued):
                self.endpoint.route_add(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                self.endpoint.route_remove(event.connection_id)
            elif isinstance(event, events.ConnectionTerminated):
                reason = event.reason_phrase or f"code {event.error_code}"
                self._terminated(f"closed by peer or network: {reason}", event.error_code)

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        try:
            peer_id = authenticated_peer(self.quic, event.alpn_protocol, self.expected)
        except certs.PeerAuthenticationError as exc:
            log.warning("refusing connection from %s:%d: %s", *self.addr, exc)
            self.close(ErrorCode.AUTH_FAILED, str(exc))
            return
        self.peer_id = peer_id
        self.endpoint.on_authenticated(self)
        if not self.established.done() and not self.closed.done():
            self.established.set_result(self)

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        if self.peer_id is None:
            # Nothing is served before the peer has proven who it is.
            self.close(ErrorCode.AUTH_FAILED, "stream data before authentication")
            return
        if sid in self._pending:
            self._on_response_data(sid, event.data, event.end_stream)
            return
        locally_initiated = (sid & 1) == (0 if self.is_client else 1)
        if locally_initiated:
            return  # a stream whose request was given up (timeout, cancel): drop the late answer
        if sid in self._refused:
            if event.end_stream:
                self._refused.discard(sid)
            return  # the rest of a refused stream, sent before the peer heard of the refusal
        inbound = self._inbound.get(sid)
        if inbound is None:
            inbound = self._inbound[sid] = _InboundStream(FrameReader())
        try:
            if inbound.sink is not None:
                if event.data:
                    inbound.sink.data(event.data)
            elif sid & 2:
                for message in inbound.reader.feed(event.data):
                    self._on_notify_message(message)
            else:
                self._on_request_stream(sid, inbound, event.data)
            if event.end_stream:
                self._end_inbound(sid, inbound)
        except WireError as exc:
            self._strike(sid, exc)
        if event.end_stream:
            self._refused.discard(sid)  # nothing more can come on it

    def _on_request_stream(self, sid: int, inbound: _InboundStream, data: bytes) -> None:
        if inbound.task is not None:
            if data:
                raise WireError("data after a request on its stream")
            return
        message, rest = inbound.reader.feed_one(data)
        if message is None:
            return
        if isinstance(message, Request):
            if rest:
                raise WireError("data after a request on its stream")
            self._start_handler(sid, inbound, message)
        elif isinstance(message, BulkHeader):
            handler = self.endpoint.handlers.bulk
            if handler is None:
                # Answer without STOP_SENDING, which would overtake the answer and hide its reason;
                # the sender resets its side when the answer arrives, and the rest is dropped.
                self._answer(sid, ErrorResponse(sid, "unsupported", "this node takes no bulk streams"))
                del self._inbound[sid]
                self._refused.add(sid)
                return
            inbound.sink = handler(self, message)
            if rest:
                inbound.sink.data(rest)
        else:
            raise WireError(f"a {type(message).__name__} cannot open a stream")

    def _end_inbound(self, sid: int, inbound: _InboundStream) -> None:
        if inbound.sink is not None:
            del self._inbound[sid]
            try:
                result = inbound.sink.end()
            except Exception as exc:  # the sink refused what it got (e.g. a hash mismatch)
                self._answer(sid, ErrorResponse(sid, "rejected", str(exc)))
                return
            self._answer(sid, Response(sid, result))
        elif not inbound.reader.at_boundary():
            raise WireError("stream ended inside a message")
        elif inbound.task is None:
            if self._inbound.pop(sid, None) is None:
                return  # answered at once (unknown method, busy, no bulk) and forgotten
            if not sid & 2:
                raise WireError("stream ended without a request")

    def _on_notify_message(self, message: Any) -> None:
        if not isinstance(message, Notify):
            raise WireError(f"a {type(message).__name__} on a one-way stream")
        if self.endpoint.handlers.notify is not None:
            self.endpoint.handlers.notify(self, message.topic, message.body)

    def _on_datagram(self, data: bytes) -> None:
        if self.peer_id is None:
            return
        try:
            message = decode_datagram(data)
            if not isinstance(message, Notify):
                raise WireError(f"a {type(message).__name__} in a datagram")
        except WireError as exc:
            self._strike(None, exc)
            return
        if self.endpoint.handlers.datagram is not None:
            self.endpoint.handlers.datagram(self, message.topic, message.body)

    def _on_stream_reset(self, sid: int, reason: str) -> None:
        self._refused.discard(sid)
        future = self._pending.pop(sid, None)
        if future is not None and not future.done():
            future.set_exception(TransportError(f"request stream {reason}"))
        inbound = self._inbound.pop(sid, None)
        if inbound is not None:
            if inbound.task is not None:
                inbound.task.cancel()
            if inbound.sink is not None:
                inbound.sink.abort(reason)

    def _strike(self, sid: int | None, exc: WireError) -> None:
        """A malformed message: close that stream with the error's code, and count it."""
        self.strikes += 1
        self.endpoint.record_misbehaviour(self, str(exc))
        log.info("malformed message from %r: %s", self, exc)
        if sid is not None:
            inbound = self._inbound.pop(sid, None)
            if inbound is not None and inbound.sink is not None:
                inbound.sink.abort(str(exc))
            self.quic.stop_stream(sid, exc.code)
            self._refused.add(sid)
            if not sid & 2:
                self.quic.reset_stream(sid, exc.code)
        if self.strikes >= MAX_STRIKES:
            self.close(ErrorCode.PROTOCOL_ERROR, f"{self.strikes} malformed messages")

    # --- serving requests -------------------------------------------------------------------

    def _start_handler(self, sid: int, inbound: _InboundStream, request: Request) -> None:
        handler = self.endpoint.handlers.rpc.get(request.method)
        if handler is None:
            self._answer(sid, ErrorResponse(request.id, "unknown_method",
                                            f"this node has no method {request.method!r}"))
            del self._inbound[sid]
            return
        if self._handlers_running >= MAX_CONCURRENT_HANDLERS:
            self._answer(sid, ErrorResponse(request.id, "busy", "too many requests in flight"))
            del self._inbound[sid]
            return
        self._handlers_running += 1
        inbound.task = asyncio.create_task(self._serve(sid, request, handler))
        self.handler_tasks.add(inbound.task)
        inbound.task.add_done_callback(self.handler_tasks.discard)

    async def _serve(self, sid: int, request: Request, handler: Callable[..., Awaitable[Any]]) -> None:
        try:
            result = await handler(self, request.body)
            answer: Response | ErrorResponse = Response(request.id, result)
        except asyncio.CancelledError:
            return
        except RemoteError as exc:
            answer = ErrorResponse(request.id, exc.code, str(exc))
        except Exception:
            log.exception("handler for %s failed", request.method)
            answer = ErrorResponse(request.id, "internal", f"{request.method} failed on the peer")
        finally:
            self._handlers_running -= 1
            self._inbound.pop(sid, None)
        if not self.closed.done():
            self._answer(sid, answer)

    def _answer(self, sid: int, message: Response | ErrorResponse) -> None:
        try:
            data = frame(message)
        except WireError as exc:
            data = frame(ErrorResponse(message.id, "internal", f"answer not encodable: {exc}"))
        self.quic.send_stream_data(sid, data, end_stream=True)
        self.transmit()

    # --- calling the peer -------------------------------------------------------------------

    async def request(self, method: str, body: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """Call `method` on the peer and return its answer; raises RemoteError or TransportError."""
        self._check_open()
        sid = self.quic.get_next_available_stream_id()
        data = frame(Request(sid, method, body))
        future = asyncio.get_running_loop().create_future()
        self._pending[sid] = future
        self._inbound[sid] = _InboundStream(FrameReader())
        self.quic.send_stream_data(sid, data, end_stream=True)
        self.transmit()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise TransportError(f"{method} got no answer from {self.peer_id} within {timeout:g} s") from None
        finally:
            if self._pending.pop(sid, None) is not None and not self.closed.done():
                # Given up (timeout or cancellation): tell the peer to stop working on it.
                self.quic.stop_stream(sid, ErrorCode.CANCELLED)
                self.transmit()
            self._inbound.pop(sid, None)

    def _on_response_data(self, sid: int, data: bytes, end_stream: bool) -> None:
        inbound = self._inbound[sid]
        future = self._pending[sid]
        try:
            messages = inbound.reader.feed(data)
            if end_stream and (not inbound.reader.at_boundary() or not messages):
                raise WireError("answer stream ended without a whole answer")
        except WireError as exc:
            self._pending.pop(sid)
            if not future.done():
                future.set_exception(TransportError(f"malformed answer: {exc}"))
            self._strike(sid, exc)
            return
        for message in messages:
            self._pending.pop(sid, None)
            if future.done():
                continue
            if isinstance(message, Response) and message.id == sid:
                future.set_result(message.body)
            elif isinstance(message, ErrorResponse) and message.id == sid:
                future.set_exception(RemoteError(message.code, message.message))
            else:
                future.set_exception(TransportError(f"unexpected {type(message).__name__} answer"))

    def notify(self, topic: str, body: Any = None) -> None:
        """Send a one-way message on a stream of its own (reliable, unordered with others)."""
        self._check_open()
        sid = self.quic.get_next_available_stream_id(is_unidirectional=True)
        self.quic.send_stream_data(sid, frame(Notify(topic, body)), end_stream=True)
        self.transmit()

    def send_datagram(self, topic: str, body: Any = None) -> None:
        """Send a small one-way message as a QUIC datagram (may be lost, never retransmitted)."""
        self._check_open()
        self.quic.send_datagram_frame(encode_datagram(Notify(topic, body)))
        self.transmit()

    async def send_bulk(self, topic: str, chunks: Iterable[bytes] | AsyncIterable[bytes],
                        size: int | None = None, meta: Any = None,
                        timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """Stream bytes to the peer with backpressure; returns the receiver's answer."""
        self._check_open()
        sid = self.quic.get_next_available_stream_id()
        future = asyncio.get_running_loop().create_future()
        self._pending[sid] = future
        self._inbound[sid] = _InboundStream(FrameReader())
        ended = False
        try:
            self.quic.send_stream_data(sid, frame(BulkHeader(topic, size, meta)))
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    await self._write_bulk(sid, chunk, future)
            else:
                for chunk in chunks:
                    await self._write_bulk(sid, chunk, future)
            self.quic.send_stream_data(sid, b"", end_stream=True)
            ended = True
            self.transmit()
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise TransportError(f"bulk {topic} to {self.peer_id} got no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(sid, None)
            self._inbound.pop(sid, None)
            # Cut short (an early answer, a timeout, a cancellation): stop sending the rest.
            if not self.closed.done() and (not ended or not future.done()):
                self.quic.reset_stream(sid, ErrorCode.CANCELLED)
                self.transmit()

    async def _write_bulk(self, sid: int, chunk: bytes, answer: asyncio.Future) -> None:
        high_water = BULK_HIGH_WATER_WINDOWS * self.quic.configuration.max_stream_data
        for start in range(0, len(chunk), BULK_CHUNK):
            while unacked_stream_bytes(self.quic, sid) > high_water:
                if answer.done() or self.closed.done():
                    break
                self._progress.clear()
                await self._progress.wait()
            if answer.done():
                answer.result()  # the receiver gave up early: raise its reason
            self._check_open()
            self.quic.send_stream_data(sid, chunk[start:start + BULK_CHUNK])
            self.transmit()

    def ping(self) -> None:
        """Send a PING (keeps NAT bindings and the idle timer alive; its ACK measures the RTT)."""
        if self.closed.done():
            return
        uid = next(self._ping_ids)
        now = time.perf_counter()
        self._pings = {k: v for k, v in self._pings.items() if now - v < 60}
        self._pings[uid] = now
        self.quic.send_ping(uid)
        self.transmit()

    # --- closing ----------------------------------------------------------------------------

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close the connection with an application error code (sent to the peer)."""
        if self.closed.done():
            return
        self.quic.close(error_code=int(code), reason_phrase=reason)
        self.flush()  # now: the endpoint may close its socket right after
        self._terminated(reason or f"closed locally ({ErrorCode(code).name})", int(code))

    def _terminated(self, reason: str, code: int) -> None:
        if self.closed.done():
            return
        self.close_reason = reason
        self.close_code = code
        error = TransportError(f"connection to {self.peer_id or self.expected or self.addr} {reason}")
        if not self.established.done():
            self.established.set_exception(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for inbound in self._inbound.values():
            if inbound.task is not None:
                inbound.task.cancel()
            if inbound.sink is not None:
                inbound.sink.abort(reason)
        self._inbound.clear()
        self._progress.set()
        self.closed.set_result(reason)
        self.endpoint.on_closed(self)

    def drop(self) -> None:
        """Stop all activity of the connection (the endpoint is going away)."""
        self._dropped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_open(self) -> None:
        if self.closed.done():
            raise TransportError(f"connection to {self.peer_id or self.addr} is closed: {self.close_reason}")
        if self.peer_id is None:
            raise TransportError("connection is not authenticated yet")
