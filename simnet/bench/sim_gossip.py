"""Gossip at scale in the deterministic simulator: delivery, hops, dissemination and duplicates at N nodes; failure detection at 100 nodes under 10% loss.

Two simulated runs of the real `GossipNode` (seeded, virtual time):

1. Dissemination: N nodes (default 1000) start from disks as a converged mesh left them (every
   advert, 30 known peers each) within the first 2 s; from t=10 s to t=45 s, 50 random nodes
   change what they share, one after another, and advertise it; the run ends at t=60 s. Figures
   come from those 50 adverts: the share of (advert, other live node) pairs holding it at the
   end, gossip hop counts, the virtual time from advertising to the last node, and full
   copies received beyond the first per delivery.
2. Failure detection: 100 nodes, warm started the same way, every frame lost with probability
   0.10; from t=20 s one node crashes every 2 s (10 in all); the time from a crash to the first
   live node declaring it dead, and declarations of death of nodes that were running.

Baselines from the same run: the mean one-hop latency of the simulated links (dissemination
over it), the depth of an ideal tree of the active view's fan-out (hops over it), and the rate
at which the bare virtual clock runs empty callbacks (the simulator's own ceiling; the
protocol's event rate is a fraction of it).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from hmnode.simnet.sim.clock import VirtualClock
from hmnode.simnet.sim.gossip import CALM, SimSettings, GossipSim

DEFAULT_NODES = 1000
DEFAULT_RUNS = 1
DURATION_S = 60.0
MEASURED_ADVERTS = 50
MEASURE_FROM_S, MEASURE_TO_S = 10.0, 45.0
DETECT_NODES = 100
DETECT_LOSS = 0.10
CRASHES = 10
CRASH_FROM_S, CRASH_EVERY_S = 20.0, 2.0
STEPS_PER_RUN = 2 * int(DURATION_S)
SEED = 1

_SETTINGS = SimSettings(warm_start=True, join_every_s=0.002, faults=False, forgeries=False,
                        watch_convergence=False, record_deliveries=True)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _advance(sim: GossipSim, progress: Callable[[int], None]) -> None:
    for second in range(1, int(DURATION_S) + 1):
        sim.clock.run_until(float(second))
        progress(1)


def _dissemination(nodes: int, seed: int, progress: Callable[[int], None]) -> dict[str, Any]:
    started = time.perf_counter()
    sim = GossipSim(nodes, seed, DURATION_S, _SETTINGS)
    sim.start()
    changers = sim.rng.sample(sim.nodes, min(MEASURED_ADVERTS, nodes))
    step = (MEASURE_TO_S - MEASURE_FROM_S) / max(1, len(changers) - 1)
    for i, node in enumerate(changers):
        sim.clock.call_at(MEASURE_FROM_S + i * step, node.change_inventory)
    _advance(sim, progress)
    wall = time.perf_counter() - started
    result = sim.result()
    live = [n for n in sim.nodes if n.up]
    measured = [(n.id, sim.newest[n.id]) for n in changers if sim.newest.get(n.id, 0) >= 2]
    held = sum(1 for owner, seq in measured for holder in live if holder.id != owner
               and (held_ad := holder.gossip.adverts.get(owner)) is not None and held_ad.seq >= seq)
    pairs = len(measured) * (len(live) - 1)
    wanted = set(measured)
    by_advert: dict[tuple, list[float]] = {}
    hops: list[float] = []
    for d in sim.deliveries:
        if (d.owner, d.seq) in wanted:
            by_advert.setdefault((d.owner, d.seq), []).append(d.delay_s)
            if d.hops is not None:
                hops.append(float(d.hops))
    complete = [max(delays) * 1e3 for key, delays in by_advert.items()
                if len(delays) >= len(live) - 1]
    per_delivery = [x * 1e3 for delays in by_advert.values() for x in delays]
    stats = [n.gossip.broadcast.stats for n in live]
    received = sum(s.delivered for s in stats) - len(measured)
    duplicates = sum(s.duplicates for s in stats)
    events = result.stats["events"]
    return {
        "nodes": nodes, "seed": seed, "ok": result.ok, "verdicts": result.verdicts,
        "measured_adverts": len(measured),
        "delivery_ratio": held / pairs if pairs else None,
        "hops_p50": _pct(hops, 0.50), "hops_p99": _pct(hops, 0.99),
        "dissemination_ms_p50": _pct(complete, 0.50), "dissemination_ms_p99": _pct(complete, 0.99),
        "delivery_ms_p99": _pct(per_delivery, 0.99),
        "duplicates_per_msg": duplicates / received if received else None,
        "messages": result.stats["network"].get("send", 0),
        "false_positive_deaths": result.stats["false_deaths"],
        "events": events, "wall_s": wall, "events_per_s": events / wall,
    }


def _failure_detection(seed: int, progress: Callable[[int], None]) -> dict[str, Any]:
    sim = GossipSim(DETECT_NODES, seed, DURATION_S, _SETTINGS)
    sim.net.params = dataclasses.replace(CALM, loss=DETECT_LOSS)
    sim.start()
    victims = sim.rng.sample(sim.nodes, CRASHES)
    crashed_at: dict[int, float] = {}
    for i, node in enumerate(victims):
        at = CRASH_FROM_S + i * CRASH_EVERY_S

        def crash(node: Any = node, at: float = at) -> None:
            crashed_at[node.index] = at
            node.crash()
        sim.clock.call_at(at, crash)
    _advance(sim, progress)
    first: dict[int, float] = {}
    for death in sim.deaths:
        if death.target in crashed_at and not death.target_alive:
            first.setdefault(death.target, death.time - crashed_at[death.target])
    detect = list(first.values())
    return {
        "detect_nodes": DETECT_NODES, "detect_loss": DETECT_LOSS, "crashes": CRASHES,
        "detected": len(detect),
        "failure_detect_s_p50": _pct(detect, 0.50), "failure_detect_s_p99": _pct(detect, 0.99),
        "detect_false_positive_deaths": sum(1 for d in sim.deaths if d.target_alive),
    }


def _clock_baseline(events: int) -> float:
    """Empty callbacks per second through a bare VirtualClock (the simulator's ceiling)."""
    clock = VirtualClock()
    count = min(events, 500_000)
    for i in range(count):
        clock.call_at(i * 1e-4, _nothing)
    started = time.perf_counter()
    clock.run_until(float(count))
    return count / (time.perf_counter() - started)


def _nothing() -> None:
    pass


def run(runs: int = DEFAULT_RUNS, progress: Callable[[int], None] = lambda n: None,
        nodes: int = DEFAULT_NODES) -> dict[str, Any]:
    """Both runs `runs` times (seeds 1, 2, ...); figures from the last, wall time the median."""
    if nodes < 10:
        raise ValueError("the sim-gossip benchmark needs at least 10 nodes")
    walls: list[float] = []
    for i in range(runs):
        main = _dissemination(nodes, SEED + i, progress)
        detect = _failure_detection(SEED + i, progress)
        walls.append(main["wall_s"])
    hop_ms = (CALM.latency_min_s + CALM.latency_extra_s) * 1e3
    ideal_depth = math.log(nodes) / math.log(_SETTINGS.gossip.membership.active_size - 1)
    baseline_eps = _clock_baseline(main["events"])
    figures = {**main, **detect, "runs": runs, "wall_s": statistics.median(walls),
               "virtual_s": DURATION_S,
               "false_positive_deaths": main["false_positive_deaths"]
               + detect["detect_false_positive_deaths"],
               "baseline_hop_ms": hop_ms, "baseline_tree_depth": ideal_depth,
               "baseline_clock_events_per_s": baseline_eps}
    figures["dissemination_hop_ratio"] = (None if figures["dissemination_ms_p99"] is None
                                          else figures["dissemination_ms_p99"] / hop_ms)
    figures["hops_depth_ratio"] = (None if figures["hops_p99"] is None
                                   else figures["hops_p99"] / ideal_depth)
    figures["events_clock_ratio"] = main["events_per_s"] / baseline_eps
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    """Human-readable lines: each figure beside its baseline."""
    def num(value: float | None, fmt: str = "8.1f") -> str:
        return "       -" if value is None else format(value, fmt)

    return [
        f"mesh                  {figures['nodes']} simulated nodes, {figures['virtual_s']:.0f} "
        f"virtual s, {figures['messages']} messages; checkers "
        f"{'all held' if figures['ok'] else figures['verdicts']}",
        f"wall time             {num(figures['wall_s'])} s   ({figures['events_per_s']:.0f} "
        f"events/s; bare clock {figures['baseline_clock_events_per_s']:.0f}/s -> ratio "
        f"{figures['events_clock_ratio']:.3f})",
        f"delivery              {num(figures['delivery_ratio'] * 100 if figures['delivery_ratio'] is not None else None, '8.2f')} %  "
        f"of ({figures['measured_adverts']} adverts x other nodes)",
        f"hops p50 / p99        {num(figures['hops_p50'], '8.0f')} / {num(figures['hops_p99'], '.0f')}"
        f"   (ideal tree depth {figures['baseline_tree_depth']:.1f} -> p99 ratio "
        f"{num(figures['hops_depth_ratio'], '.2f')})",
        f"dissemination p50     {num(figures['dissemination_ms_p50'])} ms  (virtual; advertising to "
        "the last node)",
        f"dissemination p99     {num(figures['dissemination_ms_p99'])} ms  (one-hop mean "
        f"{figures['baseline_hop_ms']:.0f} ms -> ratio {num(figures['dissemination_hop_ratio'], '.1f')})",
        f"duplicates            {num(figures['duplicates_per_msg'], '8.3f')}     full copies per delivery",
        f"failure detection     p50 {num(figures['failure_detect_s_p50'], '.2f')} s, p99 "
        f"{num(figures['failure_detect_s_p99'], '.2f')} s  ({figures['detected']}/{figures['crashes']} "
        f"crashes seen; {figures['detect_nodes']} nodes, {figures['detect_loss']:.0%} loss)",
        f"false deaths          {figures['false_positive_deaths']:8d}     (running nodes declared dead)",
    ]
