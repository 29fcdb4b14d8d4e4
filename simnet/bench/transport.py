"""Transport throughput, handshakes, RPC and datagram rates between two processes on loopback,
beside stock aioquic (its own serve/connect, same packet size and windows) in the same run.

The server side runs in a child process (`python -m hmnode.simnet.bench.peer ...`), as two nodes
would; both sides use uvloop where it is installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic.asyncio import connect as stock_connect
from aioquic.asyncio import serve as stock_serve
from aioquic.quic.configuration import QuicConfiguration

from hmnode.identity import NodeId, NodeKey
from hmnode.transport import certs
from hmnode.transport.connection import Handlers, PeerConnection
from hmnode.transport.endpoint import ConnectionLimits, Endpoint
from hmnode.transport.quic import MAX_PACKET, QuicTuning
from hmnode.transport.wire import ALPN

BULK_BYTES = 200 << 20
HANDSHAKES = 200
RPCS = 5000
RPC_CONCURRENCY = 32
DATAGRAMS = 20000
CHUNK = 256 << 10
# Loopback carries far larger packets than the internet's 1200-byte floor; aioquic's per-packet
# cost is what bounds its throughput, so the packet size is the knob that matters (see report).
PROFILES = {"internet": QuicTuning(),
            "loopback": QuicTuning(max_datagram_size=MAX_PACKET, flow_window=8 << 20)}


# --- the server process -------------------------------------------------------------------


class _CountingSink:
    def __init__(self) -> None:
        self.received = 0

    def data(self, chunk: bytes) -> None:
        self.received += len(chunk)

    def end(self) -> int:
        return self.received

    def abort(self, reason: str) -> None:
        pass


async def _serve_hmnode(tuning: QuicTuning) -> None:
    datagrams = 0

    def on_datagram(peer: PeerConnection, topic: str, body: Any) -> None:
        nonlocal datagrams
        datagrams += 1

    async def echo(peer: PeerConnection, body: Any) -> Any:
        return body

    async def count(peer: PeerConnection, body: Any) -> int:
        return datagrams

    handlers = Handlers(rpc={"echo": echo, "datagrams": count}, datagram=on_datagram,
                        bulk=lambda peer, header: _CountingSink())
    endpoint = Endpoint(NodeKey.generate(), handlers, tuning,
                        ConnectionLimits(max_connections=4096, max_per_ip=4096))
    [(_, port)] = await endpoint.start("127.0.0.1", 0)
    print(f"READY {port} {endpoint.node_id}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    await endpoint.close()


def _stock_configuration(is_client: bool, tuning: QuicTuning) -> QuicConfiguration:
    key = NodeKey.generate()
    return QuicConfiguration(
        is_client=is_client, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE,
        certificate=None if is_client else certs.make_certificate(key),
        private_key=None if is_client else certs.private_key(key),
        max_datagram_size=tuning.max_datagram_size, max_data=tuning.flow_window * 4,
        max_stream_data=tuning.flow_window, congestion_control_algorithm=tuning.congestion_control)


async def _serve_stock(tuning: QuicTuning) -> None:
    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def drain() -> None:
            received = 0
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
            writer.write(str(received).encode())
            writer.write_eof()
        asyncio.ensure_future(drain())

    server = await stock_serve("127.0.0.1", 0, configuration=_stock_configuration(False, tuning),
                               stream_handler=handle)
    port = server._transport.get_extra_info("sockname")[1]
    print(f"READY {port} -", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


# --- the measuring process ----------------------------------------------------------------


class _Server:
    """A child process serving one side of the benchmark."""

    def __init__(self, kind: str, tuning: QuicTuning) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hmnode.simnet.bench.peer", kind, str(tuning.max_datagram_size),
             str(tuning.flow_window), tuning.congestion_control],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()  # type: ignore[union-attr]
        if not line or line[0] != "READY":
            self.close()
            raise RuntimeError(f"benchmark server ({kind}) did not start")
        self.port = int(line[1])
        self.node_id = None if line[2] == "-" else NodeId.parse(line[2])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _payload() -> bytes:
    return hashlib.shake_256(b"hmnode bench").digest(CHUNK)


@dataclass(frozen=True)
class Counts:
    """How much each part of the benchmark does (tests use a small one)."""

    bulk_bytes: int = BULK_BYTES
    handshakes: int = HANDSHAKES
    rpcs: int = RPCS
    datagrams: int = DATAGRAMS


async def _hmnode_figures(server: _Server, tuning: QuicTuning, counts: Counts,
                          progress: Callable[[int], None]) -> dict[str, float]:
    addr = ("127.0.0.1", server.port)
    client = Endpoint(NodeKey.generate(), Handlers(), tuning)
    await client.start("127.0.0.1", 0)
    try:
        setup = []
        for _ in range(counts.handshakes):
            started = time.perf_counter()
            conn = await client.connect(addr, server.node_id)
            setup.append(time.perf_counter() - started)
            conn.close()
        progress(1)
        conn = await client.connect(addr, server.node_id)
        chunk = _payload()
        started = time.perf_counter()
        received = await conn.send_bulk("bench", (chunk for _ in range(counts.bulk_bytes // CHUNK)),
                                        size=counts.bulk_bytes, timeout=300)
        bulk_s = time.perf_counter() - started
        assert received == counts.bulk_bytes, (received, counts.bulk_bytes)
        progress(1)

        started = time.perf_counter()
        for i in range(counts.rpcs // 5):
            await conn.request("echo", i)
        sequential = (counts.rpcs // 5) / (time.perf_counter() - started)
        semaphore = asyncio.Semaphore(RPC_CONCURRENCY)

        async def one(i: int) -> None:
            async with semaphore:
                assert await conn.request("echo", i) == i

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(counts.rpcs)))
        concurrent = counts.rpcs / (time.perf_counter() - started)
        progress(1)

        body = b"x" * 200
        started = time.perf_counter()
        for i in range(counts.datagrams):
            conn.send_datagram("bench", body)
            if i % 64 == 63:
                await asyncio.sleep(0)
        # Datagrams still queued behind the congestion window keep arriving after the loop; count
        # until the receiver's tally stops growing (bounded), timing up to the last growth.
        delivered, datagram_s = 0, 0.0
        for _ in range(200):
            count = await conn.request("datagrams")
            if count == delivered and count > 0:
                break
            delivered, datagram_s = count, time.perf_counter() - started
            await asyncio.sleep(0.02)
        progress(1)
    finally:
        await client.close()
    return {
        "throughput_mbps": counts.bulk_bytes * 8 / bulk_s / 1e6,
        "handshake_ms_p50": statistics.median(setup) * 1000,
        "handshake_ms_p99": statistics.quantiles(setup, n=100)[98] * 1000,
        "rpc_per_s": concurrent,
        "rpc_sequential_per_s": sequential,
        "datagrams_per_s": delivered / datagram_s,
        "datagrams_delivered": delivered / counts.datagrams,
    }


async def _stock_throughput(server: _Server, tuning: QuicTuning, bulk_bytes: int) -> float:
    chunk = _payload()
    async with stock_connect("127.0.0.1", server.port,
                             configuration=_stock_configuration(True, tuning)) as client:
        reader, writer = await client.create_stream()
        started = time.perf_counter()
        for _ in range(bulk_bytes // CHUNK):
            writer.write(chunk)
        writer.write_eof()
        received = int(await reader.read())
        elapsed = time.perf_counter() - started
    assert received == bulk_bytes, (received, bulk_bytes)
    return bulk_bytes * 8 / elapsed / 1e6


def _measure(profile: str, counts: Counts, progress: Callable[[int], None]) -> dict[str, float]:
    tuning = PROFILES[profile]
    ours = _Server("hmnode", tuning)
    try:
        figures = _run(_hmnode_figures(ours, tuning, counts, progress))
    finally:
        ours.close()
    stock = _Server("aioquic", tuning)
    try:
        figures["baseline_mbps"] = _run(_stock_throughput(stock, tuning, counts.bulk_bytes))
    finally:
        stock.close()
    progress(1)
    figures["ratio"] = figures["throughput_mbps"] / figures["baseline_mbps"]
    return figures


def run(runs: int = 1, progress: Callable[[int], None] = lambda n: None,
        counts: Counts = Counts()) -> dict[str, Any]:
    """Measure both profiles `runs` times; medians of the internet profile are the headline."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PROFILES}
    for _ in range(runs):
        for name in PROFILES:
            results[name].append(_measure(name, counts, progress))
    merged: dict[str, Any] = {"name": "transport", "runs": runs, "bulk_mib": counts.bulk_bytes >> 20}
    for name, rows in results.items():
        prefix = "" if name == "internet" else f"{name}_"
        for key in rows[0]:
            merged[prefix + key] = round(statistics.median(r[key] for r in rows), 3)
    merged["loopback_max_datagram_size"] = PROFILES["loopback"].max_datagram_size
    return merged


STEPS_PER_RUN = 5 * len(PROFILES)


def report(f: dict[str, Any]) -> list[str]:
    """Lines for people: each figure beside stock aioquic's where there is one."""
    lines = []
    for label, p in (("1200-byte packets (internet)", ""),
                     (f"{f['loopback_max_datagram_size']}-byte packets (loopback)", "loopback_")):
        lines += [
            f"{label}:",
            f"  bulk {f['bulk_mib']} MiB     {f[p + 'throughput_mbps']:8.1f} Mbit/s   stock aioquic "
            f"{f[p + 'baseline_mbps']:8.1f} Mbit/s   ratio {f[p + 'ratio']:.2f}",
            f"  handshake+auth  p50 {f[p + 'handshake_ms_p50']:.2f} ms   p99 {f[p + 'handshake_ms_p99']:.2f} ms",
            f"  rpc             {f[p + 'rpc_per_s']:8.0f} /s ({RPC_CONCURRENCY} in flight)   "
            f"{f[p + 'rpc_sequential_per_s']:8.0f} /s (one at a time)",
            f"  datagrams       {f[p + 'datagrams_per_s']:8.0f} /s delivered "
            f"({f[p + 'datagrams_delivered'] * 100:.1f}% of those sent)",
        ]
    return lines


def serve(kind: str, tuning: QuicTuning) -> None:
    """The child process's side: serve `kind` ("hmnode" or "aioquic") until stdin closes."""
    _run(_serve_hmnode(tuning) if kind == "hmnode" else _serve_stock(tuning))


def _run(coro: Any) -> Any:
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
