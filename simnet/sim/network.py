"""A simulated network between node ids, driven by a VirtualClock and one seeded rng.

Messages travel as the real wire encodes them (a `Notify` frame), so corruption flips bytes
of real frames and the receiver decodes them with the real wire rules: what survives decoding
reaches the protocol cores, whose own validation must cope with it. Every random choice comes
from the one rng, and every send, drop and delivery goes into a hashed trace, so two runs with
the same seed can be compared by one hash.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from random import Random
from typing import Any

from hmnode.transport.wire import Notify, WireError, decode_message, encode_message

from .clock import VirtualClock

Handler = Callable[[Hashable, str, Any], None]
TRACE_KEPT = 20_000  # the newest trace entries kept for inspection; all of them are hashed


@dataclass(frozen=True)
class NetParams:
    """How hostile the network is; a frozen value so a run's settings can be logged whole."""

    latency_min_s: float = 0.005
    # Mean of the exponential extra delay on top of the minimum: the spread reorders messages.
    latency_extra_s: float = 0.010
    loss: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    queue_limit: int = 2_000  # messages in flight to, or waiting at, one node
    # A node's send queue on a limited uplink holds this much time's worth; past it, drops.
    uplink_queue_s: float = 2.0
    connect_timeout_s: float = 0.5  # how long a send to a crashed node takes to fail


def link_delay(rng: Random, minimum_s: float, extra_mean_s: float) -> float:
    """One frame's latency on a link: the minimum plus an exponential draw of mean
    `extra_mean_s`, so frames sent in order may arrive out of it."""
    return minimum_s + (rng.expovariate(1.0 / extra_mean_s) if extra_mean_s > 0 else 0.0)


@dataclass(frozen=True)
class TraceEntry:
    """One thing the network did: (time, kind, src, dst, CRC-32 of the bytes)."""

    time: float
    kind: str
    src: str
    dst: str
    digest: str

    def canonical(self) -> bytes:
        """A stable encoding: time in whole microseconds so float printing never matters."""
        return _canonical(self.time, self.kind, self.src, self.dst, self.digest)


def _canonical(time: float, kind: str, src: str, dst: str, digest: str) -> bytes:
    return f"{round(time * 1e6)} {kind} {src} {dst} {digest}\n".encode()


class SimProcess:
    """What every simulated node process shares: its callbacks belong to one life. A subclass
    has `sim` (with `clock` and `net`), `id`, `up`, `life` and `_guard(step)`."""

    sim: Any
    id: Hashable
    up: bool
    life: int

    def _guard(self, step: Callable[[], None]) -> None:
        raise NotImplementedError

    def _wrap(self, fn: Callable[[], None]) -> Callable[[], None]:
        """`fn` as a callback of this life of the node: dropped once the life ends, held while
        the node is paused, guarded."""
        life, net = self.life, self.sim.net

        def call() -> None:
            if not self.up or self.life != life:
                return
            if net.is_paused(self.id):
                self.sim.clock.call_at(net.paused_until(self.id), call)
                return
            self._guard(fn)
        return call


@dataclass
class _Host:
    name: str
    handler: Handler
    unreachable: Callable[[Hashable], None]
    up: bool = True
    epoch: int = 0  # bumped by each crash, so frames sent to an earlier life are lost
    paused_until: float = 0.0
    inflight: int = 0
    uplink_bytes_per_s: float | None = None  # None: unlimited
    uplink_free_at: float = 0.0  # when the uplink has sent everything queued on it


class SimNetwork:
    """Carries frames between attached nodes with latency, loss, duplication, corruption,
    bounded inbound queues, partitions, crashes and pauses."""

    def __init__(self, clock: VirtualClock, rng: Random, params: NetParams = NetParams()) -> None:
        self.clock = clock
        self.rng = rng
        self.params = params
        self.counters: Counter[str] = Counter()
        self.max_inflight = 0
        # Kept as plain tuples (a TraceEntry each is made only when asked for): this runs for
        # every frame of a thousand-node run.
        self._trace: deque[tuple[float, str, str, str, str]] = deque(maxlen=TRACE_KEPT)
        self._hash = hashlib.sha256()
        self._hosts: dict[Hashable, _Host] = {}
        self._blocked: set[tuple[Hashable, Hashable]] = set()  # (from, to), one way
        self._held: dict[Hashable, list[tuple[Hashable, bytes]]] = {}  # frames a paused node has yet to read
        self._failing: set[tuple[Hashable, Hashable]] = set()

    # --- nodes ------------------------------------------------------------------------------

    def attach(self, node: Hashable, name: str, handler: Handler,
               unreachable: Callable[[Hashable], None]) -> None:
        """Add `node` (or give a restarted one its new handlers): `handler(src, topic, body)`
        gets each frame that decodes; `unreachable(dst)` tells it a send could not connect."""
        old = self._hosts.get(node)
        self._hosts[node] = _Host(name, handler, unreachable, epoch=old.epoch if old else 0)
        self.record("up", node, node, b"")

    def restart(self, node: Hashable, handler: Handler,
                unreachable: Callable[[Hashable], None]) -> None:
        """Bring a crashed `node` back as a fresh process with the same id and new handlers;
        frames sent to its earlier life stay lost."""
        self.attach(node, self._hosts[node].name, handler, unreachable)

    def nodes(self) -> list[Hashable]:
        """Attached nodes, in the order they were attached."""
        return list(self._hosts)

    def is_up(self, node: Hashable) -> bool:
        """Whether `node` is running (attached and not crashed)."""
        host = self._hosts.get(node)
        return host is not None and host.up

    def is_paused(self, node: Hashable) -> bool:
        """Whether `node` is frozen (a long GC pause or a stopped VM) right now."""
        host = self._hosts.get(node)
        return host is not None and host.paused_until > self.clock.now

    def paused_until(self, node: Hashable) -> float:
        return self._hosts[node].paused_until

    def limit_uplink(self, node: Hashable, bytes_per_s: float | None) -> None:
        """Give `node` an uplink of `bytes_per_s` (None: unlimited): its frames leave one after
        another, each taking its size over the rate; a queue over `uplink_queue_s` drops."""
        host = self._hosts[node]
        host.uplink_bytes_per_s = bytes_per_s
        self.record("uplink", node, node, repr(bytes_per_s).encode())

    def crash(self, node: Hashable) -> None:
        """Stop `node`: what is in flight to it is lost and its handlers are never called again."""
        host = self._hosts[node]
        host.up = False
        host.epoch += 1
        host.inflight = 0
        self._held.pop(node, None)
        self.record("crash", node, node, b"")

    def pause(self, node: Hashable, duration: float) -> None:
        """Freeze `node` for `duration`: frames to it wait (within its queue bound), then are
        read in arrival order."""
        host = self._hosts[node]
        host.paused_until = max(host.paused_until, self.clock.now + duration)
        self.record("pause", node, node, repr(duration).encode())
        self.clock.call_at(host.paused_until, lambda: self._resume(node))

    def _resume(self, node: Hashable) -> None:
        host = self._hosts[node]
        if host.paused_until > self.clock.now or not host.up:
            return  # paused again since, or crashed: a later resume (or none) applies
        held = self._held.pop(node, [])
        self.record("resume", node, node, b"")
        for src, data in held:
            host.inflight -= 1
            self._hand_over(src, node, data)

    # --- partitions -------------------------------------------------------------------------

    def block(self, a: Hashable, b: Hashable) -> None:
        """Lose everything `a` sends to `b` (one way: `b` still reaches `a`)."""
        self._blocked.add((a, b))
        self.record("block", a, b, b"")

    def isolate(self, node: Hashable) -> None:
        """Cut `node` off from every other node, both ways."""
        for other in self._hosts:
            if other != node:
                self._blocked.update({(node, other), (other, node)})
        self.record("isolate", node, node, b"")

    def split(self, groups: Iterable[Iterable[Hashable]]) -> None:
        """Partition into `groups`: nodes in different groups cannot reach each other; nodes
        in no group keep reaching everyone (see `bridge`)."""
        members = [list(g) for g in groups]
        for i, group in enumerate(members):
            for other in members[i + 1:]:
                for a in group:
                    for b in other:
                        self._blocked.update({(a, b), (b, a)})
        self.record("split", "", "", repr(sorted(len(g) for g in members)).encode())

    def bridge(self, node: Hashable) -> None:
        """Let `node` reach, and be reached by, every side of the current partition."""
        self._blocked = {(a, b) for a, b in self._blocked if node not in (a, b)}
        self.record("bridge", node, node, b"")

    def heal(self) -> None:
        """Remove every partition and one-way block."""
        self._blocked.clear()
        self.record("heal", "", "", b"")

    def reachable(self, a: Hashable, b: Hashable) -> bool:
        """Whether a frame from `a` to `b` would pass the partitions now."""
        return (a, b) not in self._blocked

    # --- moving frames ----------------------------------------------------------------------

    def send(self, src: Hashable, dst: Hashable, topic: str, body: Any) -> None:
        """Send one notification from `src` to `dst`; it may be lost, duplicated, corrupted,
        delayed or reordered, but never raises for network reasons."""
        try:
            data = encode_message(Notify(topic, body))
        except WireError:
            # A core queued something the wire would refuse: counted, as a real node logs it.
            self.record("refused", src, dst, repr(topic).encode())
            return
        host = self._hosts.get(dst)
        if host is None or not host.up:
            self.record("drop-down", src, dst, data)
            self._fail_later(src, dst)
            return
        if not self.reachable(src, dst):
            self.record("drop-part", src, dst, data)
            return
        p = self.params
        departs = self._depart(src, len(data))
        if departs is None:
            self.record("drop-uplink", src, dst, data)
            return
        if p.loss and self.rng.random() < p.loss:
            self.record("drop-loss", src, dst, data)
            return
        copies = 2 if p.duplicate and self.rng.random() < p.duplicate else 1
        for _ in range(copies):
            frame = data
            if p.corrupt and self.rng.random() < p.corrupt:
                frame = self._corrupt(frame)
            if host.inflight >= p.queue_limit:
                self.record("drop-full", src, dst, frame)
                continue
            host.inflight += 1
            self.max_inflight = max(self.max_inflight, host.inflight)
            delay = departs + link_delay(self.rng, p.latency_min_s, p.latency_extra_s)
            epoch = host.epoch
            self.record("send", src, dst, frame)
            self.clock.call_later(delay, lambda f=frame, e=epoch: self._arrive(src, dst, f, e))

    def _depart(self, src: Hashable, size: int) -> float | None:
        """How long until `src`'s uplink has sent `size` more bytes (0 if unlimited), or None
        when its send queue is full."""
        host = self._hosts.get(src)
        if host is None or host.uplink_bytes_per_s is None:
            return 0.0
        now = self.clock.now
        done = max(now, host.uplink_free_at) + size / host.uplink_bytes_per_s
        if done - now > self.params.uplink_queue_s:
            return None
        host.uplink_free_at = done
        return done - now

    def _corrupt(self, data: bytes) -> bytes:
        frame = bytearray(data)
        for _ in range(self.rng.randint(1, 3)):
            i = self.rng.randrange(len(frame))
            frame[i] ^= 1 << self.rng.randrange(8)
        self.counters["corrupted"] += 1
        return bytes(frame)

    def _fail_later(self, src: Hashable, dst: Hashable) -> None:
        # One pending failure per pair: a burst of sends to a dead node is one failed dial.
        if (src, dst) in self._failing:
            return
        self._failing.add((src, dst))
        epoch = self._hosts[src].epoch

        def fail() -> None:
            self._failing.discard((src, dst))
            host = self._hosts[src]
            if host.up and host.epoch == epoch and not self.is_up(dst):
                self.record("unreachable", src, dst, b"")
                host.unreachable(dst)

        self.clock.call_later(self.params.connect_timeout_s, fail)

    def _arrive(self, src: Hashable, dst: Hashable, data: bytes, epoch: int) -> None:
        host = self._hosts[dst]
        if not host.up or host.epoch != epoch:
            self.record("drop-crashed", src, dst, data)
            return
        if host.paused_until > self.clock.now:
            self._held.setdefault(dst, []).append((src, data))  # still counted in inflight
            return
        host.inflight -= 1
        self._hand_over(src, dst, data)

    def _hand_over(self, src: Hashable, dst: Hashable, data: bytes) -> None:
        try:
            msg = decode_message(data)
        except WireError:
            self.record("drop-garbled", src, dst, data)
            return
        if not isinstance(msg, Notify):
            self.record("drop-garbled", src, dst, data)
            return
        self.record("recv", src, dst, data)
        self._hosts[dst].handler(src, msg.topic, msg.body)

    # --- trace ------------------------------------------------------------------------------

    def record(self, kind: str, src: Hashable, dst: Hashable, data: bytes) -> None:
        """Add one entry to the trace (and count it by kind)."""
        entry = (self.clock.now, kind, self._name(src), self._name(dst),
                 format(zlib.crc32(data), "08x"))
        self.counters[kind] += 1
        self._trace.append(entry)
        self._hash.update(_canonical(*entry))

    @property
    def trace(self) -> list[TraceEntry]:
        """The newest entries (up to TRACE_KEPT); all of them went into the hash."""
        return [TraceEntry(*entry) for entry in self._trace]

    def _name(self, node: Hashable) -> str:
        host = self._hosts.get(node)
        return host.name if host is not None else str(node)

    def trace_hash(self) -> str:
        """sha256 over the canonical encoding of every trace entry so far, in order."""
        return self._hash.hexdigest()
