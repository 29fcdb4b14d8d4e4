"""Allocation of pending jobs to asset offers: a pure, deterministic function of committed
state, so every honest validator computes the same placements and no node can grab a job.

For each job, oldest first: the offers that can take it (not expired, runtime allowed, enough
free cores, memory and GPUs of the asked model), then the cheapest for this job, then the best
fit (fewest cores left over), then a hash of (job, node) to break ties. A placed job takes its
resources from the offer at once, so no offer is ever given more than it shares. A job that
fits nowhere gets the reason, in the way Bacalhau tells a user why nodes did not bid.

Prices are whole credits per hour (per core, per GiB of memory, per GPU) plus a start fee;
a job's cost rounds up, in integers only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SECONDS_PER_HOUR = 3600
MIB_PER_GIB = 1024


@dataclass(frozen=True)
class Price:
    """An offer's prices, in credits."""

    core_hour: int = 0
    gib_hour: int = 0
    gpu_hour: int = 0
    start_fee: int = 0


@dataclass(frozen=True)
class Offer:
    """What a node shares: capacity, runtimes, GPUs by model, price, and until when."""

    node: bytes
    cores: int
    memory_mib: int
    runtimes: tuple[str, ...]
    price: Price
    expires_height: int
    gpus: tuple[tuple[str, int], ...] = ()  # (model, count)


@dataclass(frozen=True)
class Job:
    """What a job needs and what its submitter pays at most."""

    job_id: bytes
    cores: int
    memory_mib: int
    runtime: str
    duration_s: int
    max_price: int
    gpu_count: int = 0
    gpu_model: str | None = None  # None: any model


@dataclass
class Free:
    """An offer's capacity not yet allocated."""

    cores: int
    memory_mib: int
    gpus: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """A job placed on a node, at a cost."""

    job_id: bytes
    node: bytes
    cost: int


def cost(job: Job, price: Price) -> int:
    """What `job` costs at `price`: the start fee and its resources for its duration, rounded
    up to a whole credit."""
    per_hour = (job.cores * price.core_hour * MIB_PER_GIB + job.memory_mib * price.gib_hour
                + job.gpu_count * price.gpu_hour * MIB_PER_GIB)
    total = per_hour * job.duration_s
    unit = SECONDS_PER_HOUR * MIB_PER_GIB
    return price.start_fee + (total + unit - 1) // unit


def _gpus_fit(job: Job, free: Free) -> bool:
    if job.gpu_count == 0:
        return True
    if job.gpu_model is None:
        return any(n >= job.gpu_count for n in free.gpus.values())
    return free.gpus.get(job.gpu_model, 0) >= job.gpu_count


def _take_gpus(job: Job, free: Free) -> None:
    if job.gpu_count == 0:
        return
    model = job.gpu_model if job.gpu_model is not None else min(
        m for m, n in free.gpus.items() if n >= job.gpu_count)
    free.gpus[model] -= job.gpu_count


def allocate(offers: list[Offer], free: dict[bytes, Free], jobs: list[Job],
             height: int) -> tuple[list[Placement], dict[bytes, str]]:
    """Place `jobs` (in the order given: oldest first) on `offers`, whose capacity not yet
    allocated is `free` (changed in place as jobs are placed). Returns the placements and, for
    every job not placed, why."""
    live = sorted((o for o in offers if o.expires_height > height and o.node in free),
                  key=lambda o: o.node)
    # One flat row per offer, shared by the runtimes it allows: this loop runs jobs x offers
    # times per block, so it reads list slots, not attributes.
    rows: dict[str, list[list]] = {}
    for o in live:
        p, room = o.price, free[o.node]
        row = [o.node, room.cores, room.memory_mib, room, p.core_hour * MIB_PER_GIB,
               p.gib_hour, p.gpu_hour * MIB_PER_GIB, p.start_fee]
        for runtime in o.runtimes:
            rows.setdefault(runtime, []).append(row)
    unit = SECONDS_PER_HOUR * MIB_PER_GIB
    placements: list[Placement] = []
    reasons: dict[bytes, str] = {}
    for job in jobs:
        jc, jm, jg, dur, cap = job.cores, job.memory_mib, job.gpu_count, job.duration_s, \
            job.max_price
        best: list | None = None
        best_key: tuple[int, int] = (0, 0)
        best_hash = b""
        for row in rows.get(job.runtime, ()):
            if row[1] < jc or row[2] < jm or (jg and not _gpus_fit(job, row[3])):
                continue
            price = row[7] + ((jc * row[4] + jm * row[5] + jg * row[6]) * dur + unit - 1) // unit
            if price > cap:
                continue
            key = (price, row[1] - jc)
            if best is None or key < best_key:
                best, best_key, best_hash = row, key, b""
            elif key == best_key:
                # Ties are rare: hash only then.
                if not best_hash:
                    best_hash = hashlib.sha256(job.job_id + best[0]).digest()
                mine = hashlib.sha256(job.job_id + row[0]).digest()
                if mine < best_hash:
                    best, best_hash = row, mine
        if best is None:
            fits = [o for o in live if job.runtime in o.runtimes
                    and _gpus_fit(job, free[o.node]) and free[o.node].cores >= jc
                    and free[o.node].memory_mib >= jm]
            reasons[job.job_id] = _why_not(job, live, free, fits)
            continue
        best[1] -= jc
        best[2] -= jm
        room = best[3]
        room.cores, room.memory_mib = best[1], best[2]
        _take_gpus(job, room)
        placements.append(Placement(job.job_id, best[0], best_key[0]))
    return placements, reasons


def _why_not(job: Job, live: list[Offer], free: dict[bytes, Free], fits: list[Offer]) -> str:
    """The first requirement no live offer meets, in the order a user would check them."""
    if not live:
        return "no node offers anything right now"
    if not any(job.runtime in o.runtimes for o in live):
        return f"no node allows the {job.runtime} runtime"
    if job.gpu_count and not any(_gpus_fit(job, Free(0, 0, dict(o.gpus))) for o in live):
        model = "" if job.gpu_model is None else f" {job.gpu_model}"
        return f"no node with {job.gpu_count}{model} GPU{'s' if job.gpu_count > 1 else ''}"
    if not any(o.cores >= job.cores and o.memory_mib >= job.memory_mib for o in live):
        return "no node shares that many cores and that much memory"
    if not fits:
        return "every node that could run it is busy; it waits for capacity"
    cheapest = min(cost(job, o.price) for o in fits)
    return f"price below every offer: the cheapest node asks {cheapest}, the job pays at most " \
           f"{job.max_price}"
