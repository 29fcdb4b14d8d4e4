"""How many routers lie between this host and a far NAT, measured as traceroute does.

Hole punching through Linux NATs needs it. A packet that reaches the far NAT before that NAT
has a mapping for the flow makes conntrack record the flow as inbound, and the far side's own
packet then leaves with a different public port, so the punch fails. A "primer" sent with a TTL
one short of the far NAT opens this side's mapping(s) and dies before it can do that harm. The
right TTL is the hop count to the far NAT minus one: found here by sending UDP probes with TTL
1, 2, ... from throwaway sockets and reading the ICMP "time exceeded" answers from the socket's
error queue (IP_RECVERR, Linux). The throwaway sockets' own flows differ from the node's, so a
probe that does reach the far NAT spoils nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import sys

log = logging.getLogger(__name__)

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11
# struct sock_extended_err: errno, origin, type, code, pad, info, data.
_EXTENDED_ERR = struct.Struct("=IBBBBII")
MAX_TTL = 8
PROBE_WAIT_S = 0.4


def supported() -> bool:
    """Whether this platform reports ICMP errors per socket (Linux)."""
    return sys.platform.startswith("linux")


def _read_errors(sock: socket.socket) -> list[tuple[int, str | None]]:
    """The ICMP errors queued on the socket's error queue: (type, the router that sent it)."""
    errors: list[tuple[int, str | None]] = []
    while True:
        try:
            _, ancdata, _, _ = sock.recvmsg(64, 512, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:  # nothing (more) queued
            return errors
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_RECVERR and len(data) >= _EXTENDED_ERR.size:
                _, origin, icmp_type, _, _, _, _ = _EXTENDED_ERR.unpack_from(data)
                if origin == SO_EE_ORIGIN_ICMP:
                    # The offender's sockaddr_in follows: family, port, then the IPv4 address.
                    offender = data[_EXTENDED_ERR.size + 4:_EXTENDED_ERR.size + 8]
                    errors.append((icmp_type, socket.inet_ntoa(offender) if len(offender) == 4 else None))


async def hops_to(ip: str, port: int, max_ttl: int = MAX_TTL, wait_s: float = PROBE_WAIT_S) -> int | None:
    """The far host's (or far NAT's) hop count: one more than the farthest router that answered
    a probe with "time exceeded". Routers rate-limit those answers, so a missing one before a
    farther answer is taken as lost, not as the destination. None where it cannot be measured
    (not Linux, IPv6, no ICMP at all)."""
    routers = await trace(ip, port, max_ttl, wait_s)
    return None if routers is None else far_hop([r is not None for r in routers])


async def nat_depth(ip: str, port: int, max_ttl: int = MAX_TTL, wait_s: float = PROBE_WAIT_S) -> int | None:
    """How many routers with private addresses (this side's NATs) come before the first public
    one on the way to ip:port; None if no router answered."""
    routers = await trace(ip, port, max_ttl, wait_s)
    return None if routers is None else depth_of(routers)


def depth_of(routers: list[str | None]) -> int | None:
    """From a trace: the hop before the first public router; when no public router answered
    (they rate-limit ICMP), the run of private routers that answered from the first hop."""
    for hop, router in enumerate(routers, start=1):
        if router is not None and _is_public(router):
            return hop - 1
    private = 0
    for router in routers:
        if router is None:
            break
        private += 1
    return private or None


def _is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    # 100.64.0.0/10 is a carrier-grade NAT's inside: private for this purpose.
    return not (addr.is_private or addr in ipaddress.ip_network("100.64.0.0/10"))


async def trace(ip: str, port: int, max_ttl: int = MAX_TTL,
                wait_s: float = PROBE_WAIT_S) -> list[str | None] | None:
    """For TTL 1..max_ttl, the router that answered a probe to ip:port with "time exceeded"
    (None where none did). None where it cannot be measured (not Linux, IPv6)."""
    if not supported() or ":" in ip:
        return None
    sockets: list[socket.socket] = []
    try:
        for ttl in range(1, max_ttl + 1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            with contextlib.suppress(OSError):
                sock.sendto(b"\x00hmnode-hop-probe", (ip, port))
        await asyncio.sleep(wait_s)
        routers = [next((who for kind, who in _read_errors(sock) if kind == ICMP_TIME_EXCEEDED), None)
                   for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    return routers


def far_hop(exceeded: list[bool]) -> int | None:
    """From "did the probe with TTL i+1 draw time exceeded" for each i: the destination's hop."""
    answered = [ttl for ttl, was_exceeded in enumerate(exceeded, start=1) if was_exceeded]
    if not answered or answered[-1] == len(exceeded):
        return None  # nobody answers, or the destination lies beyond the probes
    return answered[-1] + 1


def primer_ttl(far_hops: int | None, depth: int | None = None, default: int = 2) -> int:
    """The TTL for primers: past this side's `depth` NATs (short of the far NAT as long as a
    router lies between the two NATs, as on the internet); else one hop short of the far NAT;
    else the default, past one NAT."""
    if depth is not None:
        return depth + 1
    if far_hops is None:
        return default
    return max(1, far_hops - 1)
