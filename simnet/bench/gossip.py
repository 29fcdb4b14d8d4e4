"""Advert dissemination on a real local mesh (time, delivery, duplicates); idle RSS and CPU.

Each run starts `nodes` real `hmnode run` processes on loopback (a LocalMesh in a temporary
directory), waits until every node knows every advert, measures each node's idle RSS and CPU,
then has random nodes publish fresh adverts one after another (100-200 ms apart, and never from
a node whose previous one has not been seen at every node, since a node keeps the arrival time
of each origin's newest advert only). An advert's
dissemination time is the latest arrival over all other nodes (each node's `received_at`) minus
its `issued_at` at the origin; both are read from the same machine's clock.

Baselines from the same run: one QUIC round trip between two of the nodes (the nodes' own
keepalive PING round trips), the `advertise` control call's round trip, and the RSS of a bare
Python process idling.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hmnode.errors import HmnodeError
from hmnode.simnet.bench.startup import bare_python_rss
from hmnode.simnet.local import LocalMesh, NodeRecord

ADVERTS = 50
STEPS_PER_RUN = 3 + ADVERTS
DEFAULT_RUNS = 1
IDLE_S = 5.0
SETTLE_S = 1.0
SPACING_S = (0.1, 0.2)
# Past this, an advert that has not reached a node counts as not delivered there. Anti-entropy
# runs every ~5 s, so a lost eager push is still repaired within it.
DELIVERY_WAIT_S = 15.0
CALL_TIMEOUT_S = 5.0
MIB = 1 << 20


class BenchError(HmnodeError):
    """The mesh did not come up or converge, so there is nothing to measure."""


@dataclass
class _Advert:
    """One published advert and where it has arrived (node name -> seconds after issue)."""

    origin: str
    origin_id: str
    seq: int
    issued_at: float
    arrived: dict[str, float] = field(default_factory=dict)


def _convergence_timeout(nodes: int) -> float:
    # Starting many Python processes at once on a small machine is slow; allow for it.
    return 60.0 + 2.0 * nodes


def _call_all(mesh: LocalMesh, records: list[NodeRecord], method: str) -> dict[str, Any]:
    """Call `method` on every node at once; name -> answer (nodes that fail are left out)."""
    def one(rec: NodeRecord) -> tuple[str, Any]:
        try:
            return rec.name, mesh.call(rec.name, method, timeout=CALL_TIMEOUT_S)
        except HmnodeError:
            return rec.name, None

    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        return {name: answer for name, answer in pool.map(one, records) if answer is not None}


def _collect(mesh: LocalMesh, records: list[NodeRecord], pending: list[_Advert]) -> list[_Advert]:
    """Record, for every pending advert, the nodes it has reached since the last look; the
    adverts that have not yet reached every other node."""
    if not pending:
        return pending
    for name, adverts in _call_all(mesh, records, "adverts").items():
        held = {ad["node_id"]: ad for ad in adverts}
        for advert in pending:
            if name == advert.origin or name in advert.arrived:
                continue
            ad = held.get(advert.origin_id)
            # A later advert of the same origin would carry a later received_at, so a
            # supersession (the node's own periodic refresh) can only make the figure worse.
            if ad is not None and ad["seq"] >= advert.seq and ad.get("received_at") is not None:
                advert.arrived[name] = ad["received_at"] - advert.issued_at
    return [a for a in pending if len(a.arrived) < len(records) - 1]


def _one_run(nodes: int, adverts: int, idle_s: float, rng: random.Random,
             progress: Callable[[int], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hmg") as tmp:
        mesh = LocalMesh(Path(tmp))
        try:
            started = time.monotonic()
            records = mesh.up(nodes)
            progress(1)
            if not mesh.wait_converged(_convergence_timeout(nodes)):
                lagging = [s.name for s in mesh.status() if s.adverts_known != nodes]
                raise BenchError(f"the {nodes}-node mesh did not converge in "
                                 f"{_convergence_timeout(nodes):g} s (behind: "
                                 f"{', '.join(lagging)}); run `hmnode simnet up -n {nodes}` "
                                 "to watch it and read its nodes' logs")
            converge_s = time.monotonic() - started
            progress(1)

            # Idle: let the start-up work (first inventories, joins) finish, then measure.
            time.sleep(SETTLE_S)
            procs = [psutil.Process(rec.pid) for rec in records]
            for proc in procs:
                proc.cpu_percent(None)
            time.sleep(idle_s)
            cpu = [proc.cpu_percent(None) for proc in procs]
            rss = [proc.memory_info().rss for proc in procs]
            progress(1)

            before = _call_all(mesh, records, "mesh_stats")
            ids = {rec.name: rec.node_id for rec in records}
            sent: list[_Advert] = []
            pending: list[_Advert] = []
            call_s: list[float] = []
            for _ in range(adverts):
                busy = {a.origin for a in pending}
                waited_until = time.monotonic() + DELIVERY_WAIT_S
                while len(busy) == len(records) and time.monotonic() < waited_until:
                    time.sleep(0.05)
                    pending = _collect(mesh, records, pending)
                    busy = {a.origin for a in pending}
                if len(busy) == len(records):
                    # Every node still has one on its way; give up on the oldest.
                    busy.discard(pending.pop(0).origin)
                origin = rng.choice([rec.name for rec in records if rec.name not in busy])
                t0 = time.monotonic()
                answer = mesh.call(origin, "advertise", timeout=CALL_TIMEOUT_S)
                call_s.append(time.monotonic() - t0)
                advert = _Advert(origin, ids[origin], int(answer["seq"]), float(answer["issued_at"]))
                sent.append(advert)
                pending.append(advert)
                # Arrivals are read only when no origin is free (above) and at the end: what a
                # node recorded stays until that origin publishes again, and asking every node
                # for its adverts while others are still arriving would slow them down.
                time.sleep(rng.uniform(*SPACING_S))
                progress(1)
            deadline = time.monotonic() + DELIVERY_WAIT_S
            while pending and time.monotonic() < deadline:
                time.sleep(0.2)
                pending = _collect(mesh, records, pending)
            after = _call_all(mesh, records, "mesh_stats")
            peers = _call_all(mesh, records, "peers")
        finally:
            mesh.down(timeout=10.0)

    duplicates = sum(after[name]["broadcast"]["duplicates"] - before[name]["broadcast"]["duplicates"]
                     for name in after if name in before)
    rtts = [conn["rtt_ms"] for answer in peers.values() for conn in answer["connections"]
            if conn.get("rtt_ms") is not None]
    return {
        "converge_s": converge_s,
        "cpu": cpu,
        "rss": rss,
        "pairs": len(sent) * (nodes - 1),
        "delivered": sum(len(a.arrived) for a in sent),
        "dissemination_s": [max(a.arrived.values()) for a in sent if len(a.arrived) == nodes - 1],
        "duplicates": duplicates,
        "adverts": len(sent),
        "call_s": call_s,
        "rtt_ms": rtts,
    }


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (no interpolation beyond the samples)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(runs: int = DEFAULT_RUNS, progress: Callable[[int], None] = lambda n: None,
        nodes: int = 10, adverts: int = ADVERTS, idle_s: float = IDLE_S,
        seed: int | None = None) -> dict[str, Any]:
    """Start a `nodes`-node mesh `runs` times and measure it; dissemination percentiles are over
    every advert of every run, per-node figures are medians."""
    if nodes < 2:
        raise BenchError(f"dissemination needs at least 2 nodes, not {nodes}")
    rng = random.Random(seed)
    results = [_one_run(nodes, adverts, idle_s, rng, progress) for _ in range(runs)]
    base_rss = bare_python_rss()
    times_ms = [t * 1000 for r in results for t in r["dissemination_s"]]
    rtts = [v for r in results for v in r["rtt_ms"]]
    calls_ms = [t * 1000 for r in results for t in r["call_s"]]
    med = statistics.median
    p50 = _percentile(times_ms, 0.5) if times_ms else None
    hop = med(rtts) if rtts else None
    rss_mb = med([v for r in results for v in r["rss"]]) / MIB
    sent = sum(r["adverts"] for r in results)
    return {
        "name": "gossip",
        "runs": runs,
        "nodes": nodes,
        "adverts": sent,
        "converge_s": round(med([r["converge_s"] for r in results]), 2),
        "delivery_ratio": round(sum(r["delivered"] for r in results)
                                / max(1, sum(r["pairs"] for r in results)), 4),
        "dissemination_ms_p50": None if p50 is None else round(p50, 2),
        "dissemination_ms_p99": round(_percentile(times_ms, 0.99), 2) if times_ms else None,
        "dissemination_ms_max": round(max(times_ms), 2) if times_ms else None,
        "duplicates_per_msg": round(sum(r["duplicates"] for r in results)
                                    / max(1, sent * (nodes - 1)), 3),
        "rss_mb_per_node": round(rss_mb, 1),
        "rss_mb_per_node_max": round(max(v for r in results for v in r["rss"]) / MIB, 1),
        "cpu_pct_per_node": round(med([v for r in results for v in r["cpu"]]), 2),
        "cpu_pct_per_node_max": round(max(v for r in results for v in r["cpu"]), 2),
        "baseline_hop_rtt_ms": None if hop is None else round(hop, 3),
        "dissemination_hop_ratio": None if p50 is None or not hop else round(p50 / hop, 1),
        "baseline_advertise_call_ms": round(med(calls_ms), 3) if calls_ms else None,
        "dissemination_call_ratio": (round(p50 / med(calls_ms), 1)
                                     if p50 is not None and calls_ms else None),
        "baseline_python_rss_mb": round(base_rss / MIB, 1),
        "rss_ratio": round(rss_mb / (base_rss / MIB), 2),
    }


def report(figures: dict[str, Any]) -> list[str]:
    """Human-readable lines: each figure beside its baseline."""
    def ms(value: float | None) -> str:
        return "       -" if value is None else f"{value:8.1f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return [
        f"mesh                  {figures['nodes']} nodes, converged in {figures['converge_s']:.1f} s; "
        f"{figures['adverts']} adverts over {figures['runs']} run(s)",
        f"delivery              {figures['delivery_ratio'] * 100:8.2f} %  of (advert, node) pairs",
        f"dissemination p50     {ms(figures['dissemination_ms_p50'])} ms  (issue at the origin to "
        "arrival at the last node)",
        f"dissemination p99     {ms(figures['dissemination_ms_p99'])} ms",
        f"one hop round trip    {ms(figures['baseline_hop_rtt_ms'])} ms  (QUIC PING between two "
        f"nodes) -> p50 ratio {ratio(figures['dissemination_hop_ratio'])}",
        f"advertise call        {ms(figures['baseline_advertise_call_ms'])} ms  (control round "
        f"trip) -> p50 ratio {ratio(figures['dissemination_call_ratio'])}",
        f"duplicates            {figures['duplicates_per_msg']:8.3f}     per advert per receiving node",
        f"idle RSS per node     {figures['rss_mb_per_node']:8.1f} MiB (max "
        f"{figures['rss_mb_per_node_max']:.1f})",
        f"bare python RSS       {figures['baseline_python_rss_mb']:8.1f} MiB -> ratio "
        f"{figures['rss_ratio']:.2f}",
        f"idle CPU per node     {figures['cpu_pct_per_node']:8.2f} %   (max "
        f"{figures['cpu_pct_per_node_max']:.2f} %, of one core)",
    ]
