"""The control API over a real Unix socket: results, errors, malformed frames, missing agents."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmnode import control
from hmnode.control import API_VERSION, MAX_FRAME, ControlServer, MethodError, decode_body, encode_frame
from hmnode.errors import AgentNotRunning, ControlError, UsageError

TIMEOUT = 10.0


async def echo(params: Mapping[str, Any]) -> Any:
    return {"echo": dict(params)}


async def add(params: Mapping[str, Any]) -> Any:
    await asyncio.sleep(0)
    return params["a"] + params["b"]


async def refuse(params: Mapping[str, Any]) -> Any:
    raise MethodError("not_ready", "the node has not joined a mesh yet")


async def crash(params: Mapping[str, Any]) -> Any:
    raise RuntimeError("secret internal detail")


async def unencodable(params: Mapping[str, Any]) -> Any:
    return {1, 2, 3}  # a set has no msgpack form


HANDLERS = {"echo": echo, "add": add, "refuse": refuse, "crash": crash,
            "unencodable": unencodable}


def serve(sock_path: Path, scenario: Callable[[Path], Awaitable[None]],
          handlers: Mapping[str, Any] = HANDLERS) -> None:
    """Run a real ControlServer on `sock_path` while `scenario` talks to it, then close it."""

    async def main() -> None:
        server = ControlServer(sock_path, handlers)
        await server.start()
        try:
            await asyncio.wait_for(scenario(sock_path), TIMEOUT * 2)
        finally:
            await server.close()
        assert not sock_path.exists()

    asyncio.run(main())


async def call(path: Path, method: str, params: Mapping[str, Any] | None = None) -> Any:
    """`control.call` is blocking (it is the CLI's client), so run it off the event loop."""
    return await asyncio.to_thread(control.call, path, method, params, TIMEOUT)


def raw_exchange(path: Path, data: bytes,
                 check_closed: bool = False) -> tuple[dict[str, Any] | None, bool]:
    """Send raw bytes; return the answer frame if any and (when asked) whether the server then
    closed the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(data)
        header = recv_exactly(sock, 4)
        if header is None:
            return None, True
        (length,) = struct.unpack(">I", header)
        body = recv_exactly(sock, length)
        assert body is not None, "the server cut its answer short"
        answer = decode_body(body)
        if not check_closed:
            return answer, False
        sock.settimeout(0.3)
        try:
            closed = sock.recv(1) == b""
        except (socket.timeout, TimeoutError):
            closed = False
        return answer, closed


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def raw(path: Path, data: bytes,
              check_closed: bool = False) -> tuple[dict[str, Any] | None, bool]:
    return await asyncio.to_thread(raw_exchange, path, data, check_closed)


# --- results and errors ---------------------------------------------------------------------


def test_results_round_trip(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        params = {"text": "h\u00e9llo", "n": 7, "f": 1.5, "none": None, "bin": b"\x00\xff",
                  "list": [1, "two"], "nested": {"a": {"b": True}}}
        assert await call(path, "echo", params) == {"echo": params}
        assert await call(path, "echo") == {"echo": {}}
        assert await call(path, "add", {"a": 2, "b": 40}) == 42

    serve(tmp_path / "c.sock", scenario)


def test_concurrent_clients_are_served(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        results = await asyncio.gather(*(call(path, "add", {"a": i, "b": 1}) for i in range(20)))
        assert results == [i + 1 for i in range(20)]

    serve(tmp_path / "c.sock", scenario)


def test_unknown_method_is_a_control_error(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        with pytest.raises(ControlError, match="unknown method 'nope'"):
            await call(path, "nope")
        answer, _ = await raw(path, encode_frame({"v": API_VERSION, "method": "nope"}))
        assert answer is not None and answer["ok"] is False
        assert answer["error"]["code"] == "no_method"

    serve(tmp_path / "c.sock", scenario)


def test_method_error_gives_its_code_and_message(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        with pytest.raises(ControlError, match="the node has not joined a mesh yet"):
            await call(path, "refuse")
        answer, closed = await raw(path, encode_frame({"v": API_VERSION, "method": "refuse"}),
                                   check_closed=True)
        assert answer == {"v": API_VERSION, "ok": False,
                          "error": {"code": "not_ready",
                                    "message": "the node has not joined a mesh yet"}}
        assert not closed  # an error answer keeps the connection open

    serve(tmp_path / "c.sock", scenario)


def test_unexpected_exception_is_internal_and_serving_goes_on(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        with pytest.raises(ControlError) as info:
            await call(path, "crash")
        assert "secret internal detail" not in str(info.value)
        assert "crash" in str(info.value)
        answer, _ = await raw(path, encode_frame({"v": API_VERSION, "method": "crash"}))
        assert answer is not None and answer["error"]["code"] == "internal"
        assert await call(path, "add", {"a": 1, "b": 1}) == 2

    serve(tmp_path / "c.sock", scenario)


def test_handler_bad_params_is_internal_not_fatal(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        with pytest.raises(ControlError):
            await call(path, "add", {"a": 1})  # KeyError inside the handler
        assert await call(path, "add", {"a": 1, "b": 2}) == 3

    serve(tmp_path / "c.sock", scenario)


def test_unencodable_result_is_an_error_and_serving_goes_on(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        with pytest.raises(ControlError, match="could not be encoded"):
            await call(path, "unencodable")
        assert await call(path, "echo", {"x": 1}) == {"echo": {"x": 1}}

    serve(tmp_path / "c.sock", scenario)


# --- malformed frames -----------------------------------------------------------------------

MALFORMED = {
    "not-msgpack": (frame(b"\xc1"), "bad_request"),
    "trailing-bytes": (frame(msgpack.packb({"v": 1, "method": "echo"}) + b"\x00"), "bad_request"),
    "list-not-map": (frame(msgpack.packb([1, "echo", {}])), "bad_request"),
    "int-keys": (frame(msgpack.packb({1: 2})), "bad_request"),
    "no-version": (frame(msgpack.packb({"method": "echo"})), "bad_version"),
    "wrong-version": (frame(msgpack.packb({"v": API_VERSION + 1, "method": "echo"})),
                      "bad_version"),
    "method-not-str": (frame(msgpack.packb({"v": API_VERSION, "method": 5})), "no_method"),
    "params-not-map": (frame(msgpack.packb({"v": API_VERSION, "method": "echo",
                                            "params": [1]})), "bad_request"),
    "oversized": (struct.pack(">I", MAX_FRAME + 1), "too_large"),
    "huge-length": (struct.pack(">I", 0xFFFFFFFF) + b"junk", "too_large"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_frame_gets_an_error_and_serving_goes_on(tmp_path: Path, name: str) -> None:
    data, code = MALFORMED[name]

    async def scenario(path: Path) -> None:
        answer, closed = await raw(path, data, check_closed=code == "too_large")
        assert answer is not None
        assert answer["v"] == API_VERSION and answer["ok"] is False
        assert answer["error"]["code"] == code
        assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
        if code == "too_large":
            assert closed  # the rest of the stream cannot be framed any more
        assert await call(path, "echo", {"after": name}) == {"echo": {"after": name}}

    serve(tmp_path / "c.sock", scenario)


def test_error_answer_keeps_the_connection_usable(tmp_path: Path) -> None:
    def exchange(path: Path) -> list[dict[str, Any]]:
        answers = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            for body in (b"\xc1", msgpack.packb({"v": 1, "method": "add",
                                                 "params": {"a": 1, "b": 2}})):
                sock.sendall(frame(body))
                (length,) = struct.unpack(">I", recv_exactly(sock, 4) or b"")
                answers.append(decode_body(recv_exactly(sock, length) or b""))
        return answers

    async def scenario(path: Path) -> None:
        bad, good = await asyncio.to_thread(exchange, path)
        assert bad["error"]["code"] == "bad_request"
        assert good == {"v": API_VERSION, "ok": True, "result": 3}

    serve(tmp_path / "c.sock", scenario)


def test_truncated_frames_and_hangups_do_not_stop_the_server(tmp_path: Path) -> None:
    def hang_up(path: Path, data: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(data)

    async def scenario(path: Path) -> None:
        for data in (b"", b"\x00\x00", struct.pack(">I", 100) + b"partial"):
            await asyncio.to_thread(hang_up, path, data)
        assert await call(path, "add", {"a": 3, "b": 4}) == 7

    serve(tmp_path / "c.sock", scenario)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bodies_never_break_the_server(body: bytes) -> None:
    async def scenario(path: Path) -> None:
        answer, _ = await raw(path, frame(body))
        assert answer is not None and answer["v"] == API_VERSION
        assert await call(path, "add", {"a": 1, "b": 1}) == 2

    with tempfile.TemporaryDirectory() as d:
        serve(Path(d) / "c.sock", scenario)


# --- the socket file ------------------------------------------------------------------------


def test_socket_is_mode_0600_under_a_permissive_umask(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        st_ = os.stat(path)
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600

    old = os.umask(0o000)
    try:
        serve(tmp_path / "c.sock", scenario)
    finally:
        restored = os.umask(old)
    assert restored == 0o000  # the server put the process umask back


def test_server_replaces_a_leftover_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()

    async def scenario(p: Path) -> None:
        assert await call(p, "add", {"a": 1, "b": 2}) == 3

    serve(path, scenario)


# --- no agent -------------------------------------------------------------------------------


def test_call_without_a_socket_says_agent_not_running(tmp_path: Path) -> None:
    with pytest.raises(AgentNotRunning) as info:
        control.call(tmp_path / "c.sock", "echo", timeout=TIMEOUT)
    assert "hmnode run" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert info.value.exit_code == 3


def test_call_on_a_stale_socket_says_agent_not_running(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, with nobody listening: what a killed agent leaves
    assert path.exists()
    with pytest.raises(AgentNotRunning, match="hmnode run"):
        control.call(path, "echo", timeout=TIMEOUT)


def test_call_after_the_server_closed_says_agent_not_running(tmp_path: Path) -> None:
    async def scenario(path: Path) -> None:
        assert await call(path, "add", {"a": 0, "b": 0}) == 0

    path = tmp_path / "c.sock"
    serve(path, scenario)
    with pytest.raises(AgentNotRunning):
        control.call(path, "echo", timeout=TIMEOUT)


def test_too_long_socket_path_is_a_usage_error(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 120)
    with pytest.raises(UsageError, match="shorter --data-dir"):
        control.call(long_dir / "control.sock", "echo", timeout=TIMEOUT)

    async def start() -> None:
        await ControlServer(long_dir / "control.sock", HANDLERS).start()

    with pytest.raises(UsageError):
        asyncio.run(start())


def test_silent_server_times_out_with_control_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        with pytest.raises(ControlError, match="did not answer"):
            control.call(path, "echo", timeout=0.3)
    finally:
        listener.close()


# --- framing --------------------------------------------------------------------------------


@given(st.dictionaries(st.text(max_size=10), st.none() | st.integers(-(2**63), 2**63 - 1)
                       | st.text(max_size=20) | st.binary(max_size=20), max_size=5))
def test_frames_round_trip(message: dict[str, Any]) -> None:
    data = encode_frame(message)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert decode_body(data[4:]) == message


def test_oversized_message_is_refused_by_the_encoder() -> None:
    with pytest.raises(ControlError):
        encode_frame({"blob": b"\x00" * (MAX_FRAME + 1)})
