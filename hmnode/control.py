"""The control API: versioned msgpack request/response over the data dir's Unix socket.

A frame is a 4-byte big-endian length and a msgpack map. Requests are
`{"v": 1, "method": str, "params": map}`; answers are `{"v": 1, "ok": true, "result": ...}` or
`{"v": 1, "ok": false, "error": {"code": str, "message": str}}`. The agent serves it; the CLI is
its client. Both halves live here so that the protocol is written down once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack

from hmnode.errors import AgentNotRunning, ControlError, UsageError

log = logging.getLogger(__name__)

API_VERSION = 1
MAX_FRAME = 4 << 20
_HEADER = struct.Struct(">I")
# sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class MethodError(Exception):
    """Raised by a handler to answer with an error code instead of a result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ControlError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame's body; raises ValueError if it is not a msgpack map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError("a control message is a map")
    return message


def _check_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes, "
            "which Unix sockets cannot use; choose a shorter --data-dir"
        )


class ControlServer:
    """Serves registered methods on the control socket (mode 0600) until closed."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        _check_path(self.path)
        # The caller holds the data dir lock, so a socket file here is a dead agent's leftover.
        self.path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is created 0600, with no window of wider access
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.path.unlink(missing_ok=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    header = await reader.readexactly(_HEADER.size)
                except asyncio.IncompleteReadError:
                    return  # the client hung up between requests
                (length,) = _HEADER.unpack(header)
                if length > MAX_FRAME:
                    writer.write(encode_frame(_error("too_large", f"frame over {MAX_FRAME} bytes")))
                    return
                body = await reader.readexactly(length)
                answer = await self._answer(body)
                try:
                    frame = encode_frame(answer)
                except (TypeError, ValueError, ControlError):
                    log.exception("control method's answer cannot be encoded")
                    frame = encode_frame(_error("internal", "the agent's answer could not be "
                                                            "encoded; see its log"))
                writer.write(frame)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except Exception:
            # One broken client must never take the control API, let alone the node, down.
            log.exception("control connection failed")
        finally:
            writer.close()

    async def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            request = decode_body(body)
        except ValueError as exc:
            return _error("bad_request", str(exc))
        if request.get("v") != API_VERSION:
            return _error("bad_version", f"this agent speaks control API v{API_VERSION}, "
                                         f"not {request.get('v')!r}; use the matching hmnode CLI")
        method, params = request.get("method"), request.get("params", {})
        handler = self._handlers.get(method) if isinstance(method, str) else None
        if handler is None:
            return _error("no_method", f"unknown method {method!r}")
        if not isinstance(params, dict):
            return _error("bad_request", "params must be a map")
        try:
            result = await handler(params)
        except MethodError as exc:
            return _error(exc.code, exc.message)
        except Exception:
            log.exception("control method %s failed", method)
            return _error("internal", f"the agent failed to answer {method}; see its log")
        return {"v": API_VERSION, "ok": True, "result": result}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"v": API_VERSION, "ok": False, "error": {"code": code, "message": message}}


def call(path: Path, method: str, params: Mapping[str, Any] | None = None,
         timeout: float = 10.0) -> Any:
    """Call one method on the agent behind `path` (blocking; for the CLI)."""
    _check_path(path)
    data_dir = path.parent
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentNotRunning(
                f"no agent is running for data dir {data_dir}; start one with `hmnode run`"
            ) from exc
        except PermissionError as exc:
            raise ControlError(f"no permission to use the control socket {path}: "
                               "run as the user that runs the agent") from exc
        sock.sendall(encode_frame({"v": API_VERSION, "method": method, "params": dict(params or {})}))
        header = _recv_exactly(sock, _HEADER.size)
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise ControlError(f"the agent sent a frame of {length} bytes (limit {MAX_FRAME})")
        answer = decode_body(_recv_exactly(sock, length))
    except socket.timeout as exc:
        raise ControlError(f"the agent did not answer {method} within {timeout:g} s") from exc
    except ValueError as exc:
        raise ControlError(f"the agent's answer to {method} is malformed: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            raise ControlError(f"the agent closed the connection during {method}") from exc
        raise
    finally:
        sock.close()
    if answer.get("ok") is True:
        return answer.get("result")
    error = answer.get("error") or {}
    raise ControlError(f"agent refused {method}: {error.get('message', 'no reason given')}")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ControlError("the agent closed the connection before answering")
        chunks += chunk
    return bytes(chunks)
