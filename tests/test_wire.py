"""The QUIC transport's wire schema: codec, limits, stream framing and datagrams."""

from __future__ import annotations

import dataclasses
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hmnode.transport.wire import (
    ALPN,
    MAX_BULK_HEADER_BYTES,
    MAX_DATAGRAM_BYTES,
    MAX_DEPTH,
    MAX_FRAME_BYTES,
    MAX_ITEMS,
    MAX_REQUEST_ID,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    BulkHeader,
    ErrorCode,
    ErrorResponse,
    FrameReader,
    Message,
    Notify,
    Request,
    Response,
    WireError,
    decode_datagram,
    decode_message,
    encode_datagram,
    encode_message,
    frame,
)

# Raw-byte fuzz is cheap, so it gets more examples than the structured properties.
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROPERTY = settings(FUZZ, max_examples=100)

# --- strategies ------------------------------------------------------------------------------

ints64 = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
scalars = (st.none() | st.booleans() | ints64 | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=20))
keys = st.text(max_size=8) | ints64
bodies = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(keys, children, max_size=5)),
    max_leaves=25,
)
request_ids = st.integers(min_value=0, max_value=MAX_REQUEST_ID)

messages = st.one_of(
    st.builds(Request, id=request_ids, method=st.text(max_size=20), body=bodies),
    st.builds(Response, id=request_ids, body=bodies),
    st.builds(ErrorResponse, id=request_ids, code=st.text(max_size=20),
              message=st.text(max_size=40)),
    st.builds(Notify, topic=st.text(max_size=20), body=bodies),
    st.builds(BulkHeader, topic=st.text(max_size=20),
              size=st.none() | st.integers(min_value=0, max_value=(1 << 64) - 1), meta=bodies),
)

# Anything msgpack can carry, including what the schema refuses (ext types, NaN, float keys).
loose = st.recursive(
    scalars | st.floats() | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(keys | st.floats(allow_nan=False) | st.booleans()
                                        | st.none() | st.binary(max_size=4), children,
                                        max_size=4)),
    max_leaves=15,
)
field_values = (loose | request_ids | st.just(-1) | st.just(MAX_REQUEST_ID + 1)
                | st.text(max_size=10))
good_values = {"id": request_ids, "method": st.text(max_size=10), "code": st.text(max_size=10),
               "message": st.text(max_size=10), "topic": st.text(max_size=10),
               "size": st.none() | st.integers(0, (1 << 64) - 1), "body": bodies, "meta": bodies}


@st.composite
def wire_maps(draw: Any) -> dict[str, Any]:
    """Message maps that are mostly right, each part wrong, missing or extra now and then."""
    def often(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(bad if draw(st.integers(0, 4)) == 0 else good)

    tag = often(st.sampled_from(sorted(MESSAGE_TYPES)), loose)
    wire = {"t": tag, "v": often(st.just(PROTOCOL_VERSION), loose)}
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    names = [f.name for f in dataclasses.fields(cls)] if cls else ["id", "body"]
    for name in names:
        if draw(st.integers(0, 9)) != 0:
            wire[name] = often(good_values[name], field_values)
    if draw(st.integers(0, 9)) == 0:
        wire[draw(st.sampled_from(list(good_values)) | st.text(max_size=5))] = draw(loose)
    if draw(st.integers(0, 9)) == 0:
        del wire[draw(st.sampled_from(sorted(wire)))]
    return wire


def depth(value: Any) -> int:
    """Nesting depth of lists and maps in a body (a scalar is 0)."""
    if isinstance(value, (list, tuple)):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def body_of(msg: Message) -> Any:
    return msg.meta if isinstance(msg, BulkHeader) else getattr(msg, "body", None)


def nested_list(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def nested_map(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = {"k": value}
    return value


def raw_notify(body: bytes) -> bytes:
    """A Notify message whose body is the given raw msgpack bytes, built by hand."""
    head = msgpack.packb({"t": "msg", "v": PROTOCOL_VERSION, "topic": "x", "body": None})
    assert head.endswith(b"\xc0")
    return head[:-1] + body


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def refused(data: bytes, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> WireError:
    with pytest.raises(WireError) as info:
        decode_message(data)
    assert info.value.code == code, info.value
    return info.value


def pack(wire: dict[str, Any]) -> bytes:
    return msgpack.packb(wire, use_bin_type=True)


# --- fuzz: anything either decodes or raises WireError ---------------------------------------


def _decodes_or_wire_error(fn: Any, data: bytes) -> Message | None:
    try:
        return fn(data)
    except WireError as exc:
        assert isinstance(exc.code, ErrorCode)
        return None


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    _decodes_or_wire_error(decode_message, data)
    _decodes_or_wire_error(decode_datagram, data)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=6),
       st.booleans())
def test_arbitrary_bytes_into_frame_reader(data: bytes, cuts: list[int],
                                           with_header: bool) -> None:
    # With a matching length header the fuzz reaches the decoder instead of the length check.
    stream = struct.pack(">I", len(data)) + data if with_header else data
    reader = FrameReader()
    try:
        for chunk in split(stream, cuts):
            reader.feed(chunk)
    except WireError:
        with pytest.raises(WireError):
            reader.feed(b"")
        assert not reader.at_boundary()


@PROPERTY
@given(loose)
def test_arbitrary_msgpack_values_decode_or_raise(value: Any) -> None:
    _decodes_or_wire_error(decode_message, pack(value))


@PROPERTY
@given(wire_maps())
def test_random_message_maps_decode_or_raise_and_reencode(wire: dict[str, Any]) -> None:
    data = pack(wire)
    msg = _decodes_or_wire_error(decode_message, data)
    if msg is not None:
        # What decodes must encode again unchanged: encode checks what decode checks.
        assert decode_message(encode_message(msg)) == msg


# --- round trips -----------------------------------------------------------------------------


@PROPERTY
@given(messages)
def test_every_message_round_trips(msg: Message) -> None:
    assume(depth(body_of(msg)) <= MAX_DEPTH - 1)
    data = encode_message(msg)
    decoded = decode_message(data)
    assert decoded == msg
    assert type(decoded) is type(msg)
    # Equality treats True as 1; comparing bytes also checks that types survived.
    assert encode_message(decoded) == data
    assert decode_message(frame(msg)[4:]) == msg


@PROPERTY
@given(st.lists(messages, min_size=1, max_size=6), st.lists(st.integers(min_value=0),
                                                            max_size=20))
def test_framed_stream_in_arbitrary_chunks(msgs: list[Message], cuts: list[int]) -> None:
    assume(all(depth(body_of(m)) <= MAX_DEPTH - 1 for m in msgs))
    stream = b"".join(frame(m) for m in msgs)
    reader = FrameReader()
    out: list[Message] = []
    for chunk in split(stream, cuts):
        out.extend(reader.feed(chunk))
        assert reader.buffered <= MAX_FRAME_BYTES + 4
    assert out == msgs
    assert reader.at_boundary()


def test_framed_stream_one_byte_at_a_time() -> None:
    msgs = [Request(1, "ping", {"a": [1, 2.5, b"x", None, True]}), Response(1, "pong"),
            ErrorResponse(2, "timeout", "took too long"), Notify("gossip", [{"k": -3}]),
            BulkHeader("blob", 10, {"name": "f"}), BulkHeader("blob", None, None)]
    stream = b"".join(frame(m) for m in msgs)
    reader = FrameReader()
    out: list[Message] = []
    for i in range(len(stream)):
        out.extend(reader.feed(stream[i:i + 1]))
    assert out == msgs


def test_many_frames_in_one_chunk_come_out_in_order() -> None:
    msgs = [Notify("n", i) for i in range(100)]
    reader = FrameReader(max_frame=64)
    assert reader.feed(b"".join(frame(m) for m in msgs)) == msgs
    assert reader.buffered == 0


def test_tuples_encode_as_lists() -> None:
    msg = Notify("t", (1, (2, 3), {"k": (b"x",)}))
    assert decode_message(encode_message(msg)) == Notify("t", [1, [2, 3], {"k": [b"x"]}])


def test_wire_format_is_a_tagged_versioned_map() -> None:
    assert ALPN == "hmnode/1" and PROTOCOL_VERSION == 1
    wire = msgpack.unpackb(encode_message(Request(7, "m", b"\x00")), raw=False)
    assert wire == {"t": "req", "v": 1, "id": 7, "method": "m", "body": b"\x00"}
    body = encode_message(Response(1, None))
    assert frame(Response(1, None)) == struct.pack(">I", len(body)) + body


# --- depth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [nested_list, nested_map])
def test_depth_limit_on_encode_and_decode(nested: Any) -> None:
    ok = Notify("t", nested(MAX_DEPTH - 1))  # the top map is depth 1
    assert decode_message(encode_message(ok)) == ok
    deep = nested(MAX_DEPTH)
    with pytest.raises(WireError) as info:
        encode_message(Notify("t", deep))
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "deeper" in str(info.value)
    refused(raw_notify(msgpack.packb(deep)), ErrorCode.TOO_LARGE)
    with pytest.raises(WireError):
        encode_message(BulkHeader("t", None, deep))


def test_very_deep_input_is_refused_quickly() -> None:
    start = time.monotonic()
    for raw in (b"\x91" * 100_000 + b"\xc0", b"\x81\xa1k" * 100_000 + b"\xc0"):
        refused(raw_notify(raw), ErrorCode.TOO_LARGE)
        with pytest.raises(WireError):
            decode_message(raw)
        with pytest.raises(WireError):
            FrameReader().feed(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(WireError):
        encode_message(Notify("t", nested_list(100_000)))
    assert time.monotonic() - start < 2.0


# --- item counts -----------------------------------------------------------------------------


def test_item_limit_on_lists_and_maps() -> None:
    ok_list = Notify("t", list(range(MAX_ITEMS)))
    ok_map = Notify("t", {i: None for i in range(MAX_ITEMS)})
    for msg in (ok_list, ok_map):
        assert decode_message(encode_message(msg)) == msg
    for body in (list(range(MAX_ITEMS + 1)), {str(i): 0 for i in range(MAX_ITEMS + 1)},
                 [[0] * (MAX_ITEMS + 1)]):
        with pytest.raises(WireError) as info:
            encode_message(Notify("t", body))
        assert info.value.code == ErrorCode.TOO_LARGE
        refused(raw_notify(msgpack.packb(body)), ErrorCode.TOO_LARGE)


@pytest.mark.parametrize("header, code", [
    (b"\xdd\x80\x00\x00\x00", ErrorCode.TOO_LARGE),  # array32 of 2**31 elements
    (b"\xdf\x80\x00\x00\x00", ErrorCode.TOO_LARGE),  # map32
    (b"\xdb\x80\x00\x00\x00", ErrorCode.PROTOCOL_ERROR),  # str32: more bytes than sent
    (b"\xc6\x80\x00\x00\x00", ErrorCode.PROTOCOL_ERROR),  # bin32
    (b"\xc9\x80\x00\x00\x00\x01", ErrorCode.PROTOCOL_ERROR),  # ext32
])
def test_huge_claimed_length_is_refused_without_allocating(header: bytes,
                                                           code: ErrorCode) -> None:
    raw = raw_notify(header + b"\x00" * 8)
    tracemalloc.start()
    try:
        start = time.monotonic()
        refused(raw, code)
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1 << 20


# --- sizes -----------------------------------------------------------------------------------


def wire_len(msg: Message) -> int:
    """Length of a message's encoding, computed by hand (also for messages over the limits)."""
    wire = {"t": msg.TAG, "v": PROTOCOL_VERSION}
    wire.update((f.name, getattr(msg, f.name)) for f in dataclasses.fields(msg))
    return len(pack(wire))


def _sized(limit: int, make: Any) -> tuple[Message, Message]:
    """Two messages from `make(n)` that encode to exactly `limit` and `limit` + 1 bytes."""
    n = limit - wire_len(make(0))
    # The bin header grows with the payload; step back until the length is exact.
    while wire_len(make(n)) > limit:
        n -= 1
    assert wire_len(make(n)) == limit
    assert wire_len(make(n + 1)) == limit + 1
    return make(n), make(n + 1)


def test_frame_size_limit_on_encode_and_decode() -> None:
    ok, over = _sized(MAX_FRAME_BYTES, lambda n: Notify("t", b"x" * n))
    assert decode_message(encode_message(ok)) == ok
    refused(pack({"t": "msg", "v": 1, "topic": "t", "body": over.body}), ErrorCode.TOO_LARGE)
    with pytest.raises(WireError) as info:
        frame(Notify("t", b"x" * (MAX_FRAME_BYTES + 1)))
    assert info.value.code == ErrorCode.TOO_LARGE


def test_frame_of_exactly_max_frame_passes_the_reader() -> None:
    ok, _ = _sized(MAX_FRAME_BYTES, lambda n: Notify("t", b"x" * n))
    reader = FrameReader()
    data = frame(ok)
    assert reader.feed(data[:1000]) == []
    assert reader.feed(data[1000:]) == [ok]


def test_bulk_header_size_limit() -> None:
    ok, over = _sized(MAX_BULK_HEADER_BYTES, lambda n: BulkHeader("b", 5, b"m" * n))
    assert decode_message(encode_message(ok)) == ok
    with pytest.raises(WireError) as info:
        encode_message(over)
    assert info.value.code == ErrorCode.TOO_LARGE
    refused(pack({"t": "bulk", "v": 1, "topic": "b", "size": 5, "meta": over.meta}),
            ErrorCode.TOO_LARGE)
    reader = FrameReader(max_frame=MAX_BULK_HEADER_BYTES)
    with pytest.raises(WireError) as info:
        reader.feed(struct.pack(">I", MAX_BULK_HEADER_BYTES + 1))
    assert info.value.code == ErrorCode.TOO_LARGE


def test_reader_refuses_oversized_header_at_once_and_stays_poisoned() -> None:
    reader = FrameReader()
    with pytest.raises(WireError) as first:
        reader.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    assert first.value.code == ErrorCode.TOO_LARGE
    assert reader.buffered == 0
    assert not reader.at_boundary()
    for more in (b"", frame(Notify("t", 1)), b"\x00" * 100):
        with pytest.raises(WireError) as again:
            reader.feed(more)
        assert again.value.code == ErrorCode.TOO_LARGE
        assert str(again.value) == str(first.value)
    with pytest.raises(WireError):
        reader.feed_one(b"")


def test_reader_poisoned_by_malformed_frame() -> None:
    reader = FrameReader()
    with pytest.raises(WireError) as first:
        reader.feed(struct.pack(">I", 1) + b"\xc1" + frame(Notify("t", 1)))
    assert first.value.code == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(WireError) as again:
        reader.feed(frame(Notify("t", 1)))
    assert again.value.code == ErrorCode.PROTOCOL_ERROR


def test_reader_buffers_at_most_one_frame() -> None:
    msg = Notify("t", b"x" * 80)
    reader = FrameReader(max_frame=len(encode_message(msg)))
    stream = frame(msg) * 50
    out: list[Message] = []
    for i in range(0, len(stream), 37):
        out.extend(reader.feed(stream[i:i + 37]))
        assert reader.buffered <= len(encode_message(msg)) + 4
    assert out == [msg] * 50
    with pytest.raises(WireError) as info:
        FrameReader(max_frame=100).feed(frame(Notify("t", b"x" * 200)))
    assert info.value.code == ErrorCode.TOO_LARGE


def test_reader_rejects_bad_max_frame() -> None:
    for bad in (0, -1, MAX_FRAME_BYTES + 1):
        with pytest.raises(ValueError):
            FrameReader(max_frame=bad)


def test_datagram_size_limit() -> None:
    ok, over = _sized(MAX_DATAGRAM_BYTES, lambda n: Notify("d", b"x" * n))
    assert decode_datagram(encode_datagram(ok)) == ok
    assert encode_datagram(ok) == encode_message(ok)
    with pytest.raises(WireError) as info:
        encode_datagram(over)
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(WireError) as info:
        decode_datagram(encode_message(over))
    assert info.value.code == ErrorCode.TOO_LARGE
    assert decode_message(encode_message(over)) == over  # fine on a stream


def test_decode_refuses_oversized_input_before_parsing() -> None:
    refused(b"\x00" * (MAX_FRAME_BYTES + 1), ErrorCode.TOO_LARGE)


# --- schema violations -----------------------------------------------------------------------


def good() -> dict[str, Any]:
    return {"t": "req", "v": 1, "id": 5, "method": "m", "body": None}


@pytest.mark.parametrize("change, words", [
    ({"t": "nope"}, "unknown message type"),
    ({"t": 1}, "unknown message type"),
    ({"v": True}, "speaks version 1"),
    ({"v": "1"}, "speaks version 1"),
    ({"id": True}, "'id' must be an integer"),
    ({"id": 1.0}, "'id' must be an integer"),
    ({"id": -1}, "outside"),
    ({"id": MAX_REQUEST_ID + 1}, "outside"),
    ({"method": b"m"}, "'method' must be a string"),
    ({"method": None}, "'method' must be a string"),
    ({"extra": 1}, "unknown fields"),
])
def test_schema_violations_are_protocol_errors(change: dict[str, Any], words: str) -> None:
    wire = good() | change
    error = refused(pack(wire))
    assert words in str(error)


@pytest.mark.parametrize("missing", ["t", "v", "id", "method", "body"])
def test_missing_field(missing: str) -> None:
    wire = good()
    del wire[missing]
    assert repr(missing) in str(refused(pack(wire)))


def test_wrong_version_says_which_version_we_speak() -> None:
    error = refused(pack(good() | {"v": 2}))
    assert "version 2" in str(error) and f"speaks version {PROTOCOL_VERSION}" in str(error)


@pytest.mark.parametrize("raw, words", [
    (b"", "msgpack"),
    (b"\xc1", "msgpack"),
    (pack(good()) + b"\x00", "trailing"),
    (pack([1, 2]), "map"),
    (pack({1: "req", "v": 1}), "key"),
    (b"\x82\xa1v\x01\xa1v\x01", "repeats"),
    (raw_notify(b"\x81\x91\x00\x00"), "key"),
    (raw_notify(b"\x81\xcb" + struct.pack(">d", 1.5) + b"\x00"), "key"),
    (raw_notify(b"\x81\xc2\x00"), "key"),
    (raw_notify(b"\xd4\x05\x00"), "ExtType"),
    (raw_notify(b"\xd6\xff\x00\x00\x00\x01"), "Timestamp"),
    (raw_notify(b"\xa2\xff\xfe"), "msgpack"),
    (raw_notify(b"\xdd\x00\x00\x00\x03\x01"), "msgpack"),
])
def test_malformed_bytes_are_protocol_errors(raw: bytes, words: str) -> None:
    assert words in str(refused(raw))


@pytest.mark.parametrize("msg", [
    Request(-1, "m", None), Request(MAX_REQUEST_ID + 1, "m", None), Request(True, "m", None),
    Request(1, 5, None), Response("1", None), ErrorResponse(1, None, "x"),
    ErrorResponse(1, "c", b"x"), Notify(b"t", None), BulkHeader("b", -1, None),
    BulkHeader("b", False, None), BulkHeader("b", 1 << 64, None), Notify("t", {1.5: 0}),
    Notify("t", {True: 0}), Notify("t", {(1,): 0}), Notify("t", {1, 2}), Notify("t", 1 << 64),
    Notify("t", {"k": [object()]}), Notify("t", "\ud800"), Notify("t", 10 ** 5000),
])
def test_encode_refuses_what_decode_refuses(msg: Any) -> None:
    with pytest.raises(WireError) as info:
        encode_message(msg)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("value", [1 << 64, -(1 << 63) - 1, 10 ** 5000],
                         ids=["2**64", "-2**63-1", "10**5000"])
def test_encode_refuses_ints_beyond_64_bits(value: int) -> None:
    for msg in (Notify("t", [value]), Notify("t", {value: 0})):
        with pytest.raises(WireError) as info:
            encode_message(msg)
        assert "64 bits" in str(info.value)
        assert len(str(info.value)) < 200


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(WireError):
        encode_message({"t": "req"})  # type: ignore[arg-type]


def test_int_keys_and_extreme_ints_round_trip() -> None:
    msg = Notify("t", {-(1 << 63): (1 << 64) - 1, 0: [-(1 << 63)], "s": {1: True}})
    assert decode_message(encode_message(msg)) == msg
    req = Request(MAX_REQUEST_ID, "m", None)
    assert decode_message(encode_message(req)) == req


# --- bulk streams: feed_one ------------------------------------------------------------------


@PROPERTY
@given(st.builds(BulkHeader, topic=st.text(max_size=10),
                 size=st.none() | st.integers(0, 1 << 40), meta=bodies),
       st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_feed_one_returns_header_and_exactly_the_payload(header: BulkHeader, payload: bytes,
                                                         cuts: list[int]) -> None:
    assume(depth(header.meta) <= MAX_DEPTH - 1)
    reader = FrameReader(max_frame=MAX_BULK_HEADER_BYTES)
    got: Message | None = None
    received = bytearray()
    for chunk in split(frame(header) + payload, cuts):
        if got is None:
            got, rest = reader.feed_one(chunk)
            if got is None:
                assert rest == b""
            received += rest
        else:
            received += chunk
    assert got == header
    assert bytes(received) == payload
    assert reader.at_boundary()


def test_feed_one_leaves_following_frames_alone() -> None:
    reader = FrameReader()
    first, second = Notify("a", 1), Notify("b", 2)
    msg, rest = reader.feed_one(frame(first) + frame(second))
    assert msg == first
    assert rest == frame(second)
    assert reader.feed(rest) == [second]


# --- at_boundary -----------------------------------------------------------------------------


def test_at_boundary_tracks_partial_frames() -> None:
    reader = FrameReader()
    assert reader.at_boundary()
    data = frame(Request(3, "m", [1, 2, 3]))
    assert reader.feed(data[:2]) == []
    assert not reader.at_boundary()  # inside the length header
    assert reader.feed(data[2:4]) == []
    assert not reader.at_boundary()  # the header is read, the message is not
    assert reader.feed(data[4:6]) == []
    assert not reader.at_boundary()  # inside the message
    assert reader.feed(data[6:] + data[:5]) == [Request(3, "m", [1, 2, 3])]
    assert not reader.at_boundary()
    assert reader.feed(data[5:]) == [Request(3, "m", [1, 2, 3])]
    assert reader.at_boundary()


def test_zero_length_frame_is_malformed() -> None:
    with pytest.raises(WireError) as info:
        FrameReader().feed(struct.pack(">I", 0))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
