"""The peer-to-peer wire schema of hmnode's QUIC transport (ALPN "hmnode/1").

Every message is one msgpack map (bin type for bytes, UTF-8 str for text):

    {"t": tag, "v": PROTOCOL_VERSION, <the message's fields by name>}

with tag "req" (Request), "res" (Response), "err" (ErrorResponse), "msg" (Notify) or
"bulk" (BulkHeader). A map holds exactly these keys: a missing or unknown field is an error,
so that both sides agree on what was said.

Messages travel in three ways:

* On a stream, as frames: a 4-byte big-endian length, then that many bytes of one encoded
  message (`frame`, `FrameReader`). A frame is at most MAX_FRAME_BYTES long.
* As one QUIC datagram whose payload is one encoded message, at most MAX_DATAGRAM_BYTES long
  (`encode_datagram`, `decode_datagram`). Only Notify is meant to go this way.
* On a bulk-transfer stream: one frame holding a BulkHeader (at most MAX_BULK_HEADER_BYTES),
  then raw bytes to the end of the stream (`FrameReader.feed_one`).

Bodies (`body`, `meta`) may hold None, bool, int (-2**63 .. 2**64-1), float, str, bytes, lists
and maps whose keys are str or int, none repeated. Tuples are sent as lists, so a decoded
message equals the sent one only after tuples are replaced by lists. Lists and maps nest at most
MAX_DEPTH deep (the message's own map is depth 1) and none holds more than MAX_ITEMS elements.

Encoding checks everything that decoding checks, so this node never sends what a peer refuses.
Every violation, either way, raises WireError, whose `code` is the QUIC application error code
to close the stream or connection with: TOO_LARGE for a size, depth or item-count limit,
PROTOCOL_ERROR for anything else.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeAlias

import msgpack

from hmnode.errors import HmnodeError

PROTOCOL_VERSION = 1
ALPN = "hmnode/1"

MAX_FRAME_BYTES = 1 << 20
MAX_DATAGRAM_BYTES = 1100
MAX_DEPTH = 16
MAX_ITEMS = 4096
MAX_BULK_HEADER_BYTES = 64 << 10
# Request ids share QUIC's variable-length integer range, so they fit wherever QUIC puts one.
MAX_REQUEST_ID = (1 << 62) - 1

_MIN_INT = -(1 << 63)
_MAX_INT = (1 << 64) - 1
_LENGTH = struct.Struct(">I")


class ErrorCode(enum.IntEnum):
    """QUIC application error codes with which hmnode closes streams and connections."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1  # a malformed message
    AUTH_FAILED = 2
    TOO_LARGE = 3  # a message over a size, depth or item-count limit
    CANCELLED = 4
    INTERNAL = 5
    CONNECTION_LIMIT = 6
    DUPLICATE_CONNECTION = 7
    SHUTDOWN = 8
    UNKNOWN_METHOD = 9
    TIMEOUT = 10


class WireError(HmnodeError):
    """A message that breaks the wire schema or its limits; `code` is what to close with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __repr__(self) -> str:
        return f"WireError({self.message!r}, {self.code.name})"


@dataclass(frozen=True, slots=True)
class Request:
    """An RPC request; `id` is unique among the connection's open requests (0 .. 2**62-1)."""

    TAG: ClassVar[str] = "req"
    id: int
    method: str
    body: Any


@dataclass(frozen=True, slots=True)
class Response:
    """The successful answer to the Request with the same `id`."""

    TAG: ClassVar[str] = "res"
    id: int
    body: Any


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The failed answer to the Request with the same `id`.

    `code` is a short machine string such as "unknown_method", "internal" or "timeout".
    """

    TAG: ClassVar[str] = "err"
    id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Notify:
    """A one-way message on `topic`, sent on a unidirectional stream or as a datagram."""

    TAG: ClassVar[str] = "msg"
    topic: str
    body: Any


@dataclass(frozen=True, slots=True)
class BulkHeader:
    """The first frame of a bulk-transfer stream; raw bytes follow it to the stream's end.

    `size` is the number of raw bytes that follow, or None when the sender does not know it.
    """

    TAG: ClassVar[str] = "bulk"
    topic: str
    size: int | None
    meta: Any


Message: TypeAlias = Request | Response | ErrorResponse | Notify | BulkHeader

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TAG: cls for cls in (Request, Response, ErrorResponse, Notify, BulkHeader)
}

# ---------------------------------------------------------------------------------------------
# Validation, shared by encoding and decoding so that the two can never disagree.


def _describe(value: Any) -> str:
    return type(value).__name__


def _short(value: Any) -> str:
    # Error messages quote peer data, which may be up to a frame long.
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<{value.bit_length()}-bit integer>"  # repr of a huge int is slow or refused
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_id(tag: str, name: str, value: Any) -> None:
    # bool is an int subclass, and True must not pass for request 1.
    if type(value) is bool or not isinstance(value, int):
        raise WireError(f"{tag!r} message: field {name!r} must be an integer, "
                        f"not {_describe(value)}")
    if not 0 <= value <= MAX_REQUEST_ID:
        raise WireError(f"{tag!r} message: field {name!r} = {_short(value)} is outside "
                        f"0..{MAX_REQUEST_ID}")


def _check_size(tag: str, name: str, value: Any) -> None:
    if value is None:
        return
    if type(value) is bool or not isinstance(value, int):
        raise WireError(f"{tag!r} message: field {name!r} must be an integer or nil, "
                        f"not {_describe(value)}")
    if not 0 <= value <= _MAX_INT:
        raise WireError(f"{tag!r} message: field {name!r} = {_short(value)} is outside "
                        f"0..{_MAX_INT}")


def _check_str(tag: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise WireError(f"{tag!r} message: field {name!r} must be a string, "
                        f"not {_describe(value)}")


def _check_key(value: Any) -> None:
    if isinstance(value, str):
        return
    if type(value) is bool or not isinstance(value, int):
        raise WireError(f"map key of type {_describe(value)} is not allowed "
                        "(keys are strings or integers)")
    if not _MIN_INT <= value <= _MAX_INT:
        raise WireError(f"integer map key {_short(value)} does not fit in 64 bits")


_LEAF_TYPES = frozenset({type(None), bool, float, str, bytes})


def _check_body(tag: str, name: str, value: Any, *, encoding: bool = False) -> None:
    """Walk a body without recursion: types, integer range, depth and item counts.

    Values of the exact common types take a fast path (this walk runs on every message);
    anything else, subclasses included, goes through `_check_other`."""
    # The body sits directly under the message's map, which is depth 1.
    if type(value) in _LEAF_TYPES:
        return
    stack: list[tuple[Any, int]] = [(value, 2)]
    push = stack.append
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict:
            children: Any = item.values()
            if encoding:  # decoded maps had their keys checked as they were built
                for key in item:
                    if type(key) is not str:
                        _check_key(key)
        elif kind is list or (encoding and kind is tuple):
            children = item
        else:
            pushed = _check_other(tag, name, item, depth, encoding)
            if pushed is not None:
                push(pushed)
            continue
        if depth > MAX_DEPTH:
            raise WireError(f"{tag!r} message: field {name!r} nests deeper than "
                            f"{MAX_DEPTH} levels", ErrorCode.TOO_LARGE)
        if len(item) > MAX_ITEMS:
            raise WireError(f"{tag!r} message: a {'map' if kind is dict else 'list'} in field "
                            f"{name!r} has {len(item)} elements, over the limit of {MAX_ITEMS}",
                            ErrorCode.TOO_LARGE)
        for child in children:
            child_kind = type(child)
            if child_kind in _LEAF_TYPES:
                continue
            if child_kind is int and _MIN_INT <= child <= _MAX_INT:
                continue
            push((child, depth + 1))


def _check_other(tag: str, name: str, item: Any, depth: int,
                 encoding: bool) -> tuple[Any, int] | None:
    """The slow path of `_check_body` for one value: raises if the wire cannot carry it, or
    returns it (a container subclass) to be walked."""
    if item is None or isinstance(item, (bool, float, str, bytes)):
        return None
    if isinstance(item, int):
        if not _MIN_INT <= item <= _MAX_INT:
            raise WireError(f"{tag!r} message: integer {_short(item)} in field {name!r} "
                            "does not fit in 64 bits")
        return None
    if isinstance(item, list) or (encoding and isinstance(item, tuple)):
        return (list(item), depth)
    if isinstance(item, dict):
        return (dict(item), depth)
    raise WireError(f"{tag!r} message: field {name!r} holds a value of type "
                    f"{_describe(item)}, which the wire cannot carry")


_Check = Callable[[str, str, Any], None]
_FIELD_CHECKS: dict[str, _Check] = {
    "id": _check_id,
    "method": _check_str,
    "code": _check_str,
    "message": _check_str,
    "topic": _check_str,
    "size": _check_size,
    "body": _check_body,
    "meta": _check_body,
}
# Each message type's fields in wire order, with the check each one must pass.
_SCHEMA: dict[type[Message], tuple[tuple[str, _Check], ...]] = {
    cls: tuple((f.name, _FIELD_CHECKS[f.name]) for f in fields(cls))
    for cls in MESSAGE_TYPES.values()
}


def _frame_limit(msg: Message, limit: int) -> int:
    # A bulk header is read before its stream's payload, with a smaller buffer.
    return min(limit, MAX_BULK_HEADER_BYTES) if isinstance(msg, BulkHeader) else limit


# ---------------------------------------------------------------------------------------------
# Messages


def encode_message(msg: Message) -> bytes:
    """Encode one message; raises WireError if a peer would refuse it (fields, limits, size)."""
    schema = _SCHEMA.get(type(msg))
    if schema is None:
        raise WireError(f"{_describe(msg)} is not a wire message")
    wire: dict[str, Any] = {"t": msg.TAG, "v": PROTOCOL_VERSION}
    for name, check in schema:
        value = getattr(msg, name)
        if check is _check_body:
            _check_body(msg.TAG, name, value, encoding=True)
        else:
            check(msg.TAG, name, value)
        wire[name] = value
    try:
        data = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # The walk above admits only packable values; this catches what slips past it,
        # such as str with lone surrogates.
        raise WireError(f"{msg.TAG!r} message cannot be encoded: {exc}") from None
    limit = _frame_limit(msg, MAX_FRAME_BYTES)
    if len(data) > limit:
        raise WireError(f"{msg.TAG!r} message encodes to {len(data)} bytes, over the limit "
                        f"of {limit}", ErrorCode.TOO_LARGE)
    return data


def _build_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # Called by msgpack for each map as it completes: keys are vetted (an unhashable one before
    # it is reported as a bare TypeError), and a repeated key, which would let two decoders
    # read one map differently, is refused.
    try:
        result = dict(pairs)
    except TypeError:  # an unhashable key (a list, a map): say which rule it breaks
        for key, _ in pairs:
            _check_key(key)
        raise
    for key in result:
        if type(key) is not str:
            _check_key(key)
    if len(result) != len(pairs):
        raise WireError("a map repeats a key")
    return result


def _unpack(data: bytes | bytearray | memoryview, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            object_pairs_hook=_build_map,
            # Length headers are checked against these before anything is allocated.
            max_str_len=limit,
            max_bin_len=limit,
            max_ext_len=limit,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
        )
    except WireError:
        raise
    except msgpack.ExtraData:
        raise WireError("trailing bytes after the message") from None
    except msgpack.exceptions.StackError:
        # msgpack's own nesting bound (far above ours) stops deep input before Python recursion.
        raise WireError(f"message nests deeper than {MAX_DEPTH} levels",
                        ErrorCode.TOO_LARGE) from None
    except RecursionError:
        raise WireError(f"message nests deeper than {MAX_DEPTH} levels",
                        ErrorCode.TOO_LARGE) from None
    except (ValueError, TypeError, OverflowError, MemoryError, msgpack.UnpackException) as exc:
        # msgpack reports its length limits only in the exception's text.
        if "exceeds max_" in str(exc):
            raise WireError(f"message has a string, list or map over the limits: {exc}",
                            ErrorCode.TOO_LARGE) from None
        raise WireError(f"not a valid msgpack message: {exc or type(exc).__name__}") from None


def _decode(data: bytes | bytearray | memoryview, limit: int) -> Message:
    if len(data) > limit:
        raise WireError(f"message of {len(data)} bytes is over the limit of {limit}",
                        ErrorCode.TOO_LARGE)
    wire = _unpack(data, limit)
    if not isinstance(wire, dict):
        raise WireError(f"a message is a map, not {_describe(wire)}")
    for key in wire:
        if not isinstance(key, str):
            raise WireError(f"message map has a key of type {_describe(key)}; keys are strings")
    # The version comes first: a newer peer's messages may differ in every other respect.
    if "v" not in wire:
        raise WireError("message has no 'v' (protocol version) field")
    version = wire["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"peer speaks hmnode wire protocol version {_short(version)}; this node "
                        f"speaks version {PROTOCOL_VERSION}")
    if "t" not in wire:
        raise WireError("message has no 't' (type) field")
    tag = wire["t"]
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WireError(f"unknown message type {_short(tag)}; known types are "
                        f"{', '.join(sorted(MESSAGE_TYPES))}")
    schema = _SCHEMA[cls]
    extra = wire.keys() - {"t", "v"} - {name for name, _ in schema}
    if extra:
        raise WireError(f"{tag!r} message has unknown fields {_short(sorted(extra))}")
    values = {}
    for name, check in schema:
        if name not in wire:
            raise WireError(f"{tag!r} message has no {name!r} field")
        check(tag, name, wire[name])
        values[name] = wire[name]
    msg = cls(**values)
    header_limit = _frame_limit(msg, limit)
    if len(data) > header_limit:
        raise WireError(f"{tag!r} message of {len(data)} bytes is over the limit of "
                        f"{header_limit}", ErrorCode.TOO_LARGE)
    return msg


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode one encoded message; raises WireError for anything outside the schema or limits."""
    return _decode(data, MAX_FRAME_BYTES)


# ---------------------------------------------------------------------------------------------
# Datagrams


def encode_datagram(msg: Message) -> bytes:
    """Encode one message as a datagram payload; WireError (TOO_LARGE) above MAX_DATAGRAM_BYTES."""
    data = encode_message(msg)
    if len(data) > MAX_DATAGRAM_BYTES:
        raise WireError(f"{msg.TAG!r} message encodes to {len(data)} bytes, over the datagram "
                        f"limit of {MAX_DATAGRAM_BYTES}", ErrorCode.TOO_LARGE)
    return data


def decode_datagram(data: bytes | bytearray | memoryview) -> Message:
    """Decode one datagram payload; as decode_message, with the datagram size limit."""
    return _decode(data, MAX_DATAGRAM_BYTES)


# ---------------------------------------------------------------------------------------------
# Stream framing


def frame(msg: Message) -> bytes:
    """Encode one message as a stream frame: 4-byte big-endian length, then the message."""
    data = encode_message(msg)
    return _LENGTH.pack(len(data)) + data


class FrameReader:
    """Incremental decoder of one stream's frames.

    It holds at most one partial frame (max_frame + 4 bytes), refuses an oversized frame from
    its length header alone, and after any WireError refuses everything with that same error.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame must be in 1..{MAX_FRAME_BYTES}, not {max_frame}")
        self._max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # the current frame's length once its header is read
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buf)

    def at_boundary(self) -> bool:
        """True when no partial frame is pending, so the stream may end here without truncation."""
        return self._error is None and self._need is None and not self._buf

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Consume stream bytes; return every message they complete, in order.

        On a WireError the messages completed earlier in the same call are dropped: the stream
        is to be aborted with the error's code anyway.
        """
        view = memoryview(data).cast("B")
        messages: list[Message] = []
        while True:
            msg, view = self._next(view)
            if msg is None:
                return messages
            messages.append(msg)

    def feed_one(self, data: bytes | bytearray | memoryview) -> tuple[Message | None, bytes]:
        """Consume bytes up to the end of the first message; return it and the bytes after it.

        For bulk streams: the header message, then the start of the raw payload. While the
        first frame is incomplete it returns (None, b"").
        """
        msg, rest = self._next(memoryview(data).cast("B"))
        if msg is None:
            return None, b""
        return msg, bytes(rest)

    def _next(self, view: memoryview) -> tuple[Message | None, memoryview]:
        if self._error is not None:
            raise WireError(self._error.message, self._error.code)
        try:
            return self._take(view)
        except WireError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _take(self, view: memoryview) -> tuple[Message | None, memoryview]:
        if self._need is None:
            take = _LENGTH.size - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < _LENGTH.size:
                return None, view
            (length,) = _LENGTH.unpack(self._buf)
            self._buf.clear()
            if length > self._max_frame:
                raise WireError(f"frame of {length} bytes announced, over the limit of "
                                f"{self._max_frame}", ErrorCode.TOO_LARGE)
            self._need = length
        need = self._need
        if not self._buf and len(view) >= need:
            # The whole frame is in this chunk: decode it in place, without copying.
            body: bytes | bytearray | memoryview = view[:need]
            view = view[need:]
        else:
            take = need - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < need:
                return None, view
            body, self._buf = self._buf, bytearray()
        self._need = None
        return _decode(body, self._max_frame), view
