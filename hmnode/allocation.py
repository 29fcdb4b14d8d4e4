"""Allocation of pending jobs to asset offers: a pure, deterministic function of committed
state, so every honest validator computes the same placements and no node can grab a job.

For each job, oldest first: the offers that can take it (not expired, runtime allowed, enough
free cores, memory and GPUs of the asked model), then the cheapest for this job, then the best
fit (fewest cores left over), then a hash of (job, node) to break ties. A placed job takes its
resources from the offer at once, so no offer is ever given more than it shares. A job that
fits nowhere gets the reason, in the way Bacalhau tells a user why nodes did not bid.

Prices are whole credits per hour (per core, per GiB of memory, per GPU) plus a start fee;
a job's cost rounds up, in integers only.

How `allocate` stays fast (every validator runs it at the end of every block, over up to
thousands of jobs and offers): rather than pricing every offer for every job, it files the
offers of each runtime in groups of one price vector each (nodes often ask the same prices),
orders the groups by price and keeps each group's offers sorted by free cores. A job then
prices a group once, finds the group's tightest fit by bisection, and stops walking the groups
once a lower bound on what every later group costs exceeds the best price found. Offers too
full to take any of the jobs are dropped from the index as they fill. The plain rules, written
out, are `reference_allocate` in `hmnode.simnet.bench.allocation`; tests check that both agree.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

SECONDS_PER_HOUR = 3600
MIB_PER_GIB = 1024
# cost() in integers: a job's resources times prices, over this, rounded up.
_UNIT = SECONDS_PER_HOUR * MIB_PER_GIB


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
    # Replicas of one job run on distinct nodes: a job of a `group` is never placed on a node
    # in `avoid` (where its other replicas already are) or on one that another job of its
    # group takes in the same allocation.
    group: bytes | None = None
    avoid: frozenset[bytes] = frozenset()


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
    return price.start_fee + (total + _UNIT - 1) // _UNIT


def gpus_fit(job: Job, free: Free) -> bool:
    """Whether `free` has the GPUs `job` asks for: `gpu_count` of its model, or of any one
    model when it names none."""
    if job.gpu_count == 0:
        return True
    if job.gpu_model is None:
        return any(n >= job.gpu_count for n in free.gpus.values())
    return free.gpus.get(job.gpu_model, 0) >= job.gpu_count


def take_gpus(job: Job, free: Free) -> None:
    """Take `job`'s GPUs from `free` (which `gpus_fit`): of its model, or else of the first
    model by name that has enough."""
    if job.gpu_count == 0:
        return
    model = job.gpu_model if job.gpu_model is not None else min(
        m for m, n in free.gpus.items() if n >= job.gpu_count)
    free.gpus[model] -= job.gpu_count


def why_not(job: Job, live: Sequence[Offer], cheapest: int | None) -> str:
    """Why `job` was not placed: the first requirement no live offer meets, in the order a
    user would check them. `cheapest` is the lowest cost among the offers that could take it
    now (None when none can)."""
    return _unmet(job, live) or _waits(job, cheapest)


def _unmet(job: Job, live: Sequence[Offer]) -> str | None:
    """The first requirement no live offer meets even when idle, or None."""
    if not live:
        return "no node offers anything right now"
    if not any(job.runtime in o.runtimes for o in live):
        return f"no node allows the {job.runtime} runtime"
    if job.gpu_count and not any(gpus_fit(job, Free(0, 0, dict(o.gpus))) for o in live):
        model = "" if job.gpu_model is None else f" {job.gpu_model}"
        return f"no node with {job.gpu_count}{model} GPU{'s' if job.gpu_count > 1 else ''}"
    if not any(o.cores >= job.cores and o.memory_mib >= job.memory_mib for o in live):
        return "no node shares that many cores and that much memory"
    return None


def _witnesses(live: Sequence[Offer]) -> list[Offer]:
    """A few of the `live` offers for which `_unmet` says what it says for all of them, for
    every job: the first offer of each runtime, the offer with the most GPUs of each model,
    and those that no other offer beats on both cores and memory. Scanning them rather than
    every offer, for every job left waiting, keeps the reasons cheap."""
    chosen: dict[bytes, Offer] = {}
    runtimes: set[str] = set()
    most_gpus: dict[str, tuple[int, Offer]] = {}
    for o in live:
        if not runtimes.issuperset(o.runtimes):
            runtimes.update(o.runtimes)
            chosen[o.node] = o
        for model, n in dict(o.gpus).items():  # a model named twice counts as gpus_fit sees it
            if model not in most_gpus or n > most_gpus[model][0]:
                most_gpus[model] = (n, o)
    chosen.update((o.node, o) for _, o in most_gpus.values())
    most_memory = None
    for o in sorted(live, key=lambda o: (-o.cores, -o.memory_mib)):
        if most_memory is None or o.memory_mib > most_memory:
            most_memory = o.memory_mib
            chosen[o.node] = o
    return list(chosen.values())


def _waits(job: Job, cheapest: int | None) -> str:
    """Why a job that some idle offer could take waits: no such offer has room now, or the
    cheapest that has asks more than the job pays."""
    if cheapest is None:
        return "every node that could run it is busy; it waits for capacity"
    return f"price below every offer: the cheapest node asks {cheapest}, the job pays at most " \
           f"{job.max_price}"


# --- the index allocate() searches ---------------------------------------------------------------

class _Row:
    """One live offer as the search sees it. Its free cores and memory are copied out of its
    `Free` (kept equal to it) because the search reads them for every job."""

    __slots__ = ("node", "cores", "memory", "room", "groups")

    def __init__(self, node: bytes, room: Free) -> None:
        self.node = node
        self.cores = room.cores
        self.memory = room.memory_mib
        self.room = room
        self.groups: list[_Group] = []  # every group this row is filed in


_CORES = attrgetter("cores")


class _Group:
    """The rows of one index that ask the same prices: for any job they all cost the same,
    so a search prices the group once and then only wants its tightest fit, found by
    bisection in `rows`, which is kept sorted by free cores.

    Prices are scaled so that a job's cost is ceil((fee + d*c*core + d*m*gib + d*g*gpu) /
    _UNIT) for d seconds, c cores, m MiB and g GPUs. The `floor_*` fields are the least of
    each scaled price over this group and every group after it in its index: with them a
    search bounds what all the remaining groups can cost without looking at them."""

    __slots__ = ("fee", "core", "gib", "gpu", "floor_fee", "floor_core", "floor_gib",
                 "floor_gpu", "rows", "index", "for_gpus")

    def __init__(self, price: Price, index: list[_Group], for_gpus: bool) -> None:
        self.fee = price.start_fee * _UNIT
        self.core = price.core_hour * MIB_PER_GIB
        self.gib = price.gib_hour
        self.gpu = price.gpu_hour * MIB_PER_GIB
        self.floor_fee, self.floor_core, self.floor_gib, self.floor_gpu = \
            self.fee, self.core, self.gib, self.gpu
        self.rows: list[_Row] = []
        self.index = index  # the ordered list of groups this one is in
        self.for_gpus = for_gpus  # in an index of jobs with GPUs: rows without any free leave


def _build_index(rows: list[tuple[_Row, Offer]], key: str,
                 for_gpus: bool) -> dict[str, list[_Group]]:
    """Per runtime, the groups of `rows` ordered by the scaled price named `key` first (the
    one that dominates the cost of the jobs searched in this index), each with its floors."""
    by_price: dict[tuple[str, Price], _Group] = {}
    index: dict[str, list[_Group]] = {}
    for row, offer in rows:
        for runtime in offer.runtimes:
            group = by_price.get((runtime, offer.price))
            if group is None:
                groups = index.setdefault(runtime, [])
                group = by_price[runtime, offer.price] = _Group(offer.price, groups, for_gpus)
                groups.append(group)
            group.rows.append(row)
            row.groups.append(group)
    for groups in index.values():
        groups.sort(key=lambda g: (getattr(g, key), g.fee, g.core, g.gib, g.gpu))
        # Floors from the back: each the least of its own price and the next group's floor.
        for later, group in zip(groups[::-1], groups[-2::-1]):
            group.floor_fee = min(group.fee, later.floor_fee)
            group.floor_core = min(group.core, later.floor_core)
            group.floor_gib = min(group.gib, later.floor_gib)
            group.floor_gpu = min(group.gpu, later.floor_gpu)
        for group in groups:
            group.rows.sort(key=_CORES)
    return index


def allocate(offers: list[Offer], free: dict[bytes, Free], jobs: list[Job],
             height: int) -> tuple[list[Placement], dict[bytes, str]]:
    """Place `jobs` (in the order given: oldest first) on `offers` (one per node), whose
    capacity not yet allocated is `free` (changed in place as jobs are placed). Returns the
    placements and, for every job not placed, why.

    A job's cores, memory, GPU count and duration are never negative (`hmnode.jobs` refuses
    such jobs; the search's bounds rely on it): ValueError otherwise."""
    if any(j.cores < 0 or j.memory_mib < 0 or j.gpu_count < 0 or j.duration_s < 0
           for j in jobs):
        raise ValueError("a job's cores, memory, GPU count and duration are never negative")
    if not jobs:
        return [], {}
    live = [o for o in offers if o.expires_height > height and o.node in free]
    # A row with fewer free cores or less memory than every job needs can take none of them:
    # it is left out of the index, and dropped from it once it fills up to there.
    least_cores = min(j.cores for j in jobs)
    least_memory = min(j.memory_mib for j in jobs)
    rows = [(_Row(o.node, free[o.node]), o) for o in live]
    rows = [(r, o) for r, o in rows if r.cores >= least_cores and r.memory >= least_memory]
    # Jobs without GPUs search every row, cheapest cores first; jobs with GPUs search only the
    # rows with GPUs, cheapest GPUs first (what they pay is mostly for those).
    cpu_index = _build_index(rows, "core", for_gpus=False)
    gpu_index = _build_index([(r, o) for r, o in rows if any(n > 0 for n in r.room.gpus.values())],
                             "gpu", for_gpus=True)
    placements: list[Placement] = []
    reasons: dict[bytes, str] = {}
    witnesses: list[Offer] | None = None  # of _unmet(), found when a job first waits
    taken: dict[bytes, set[bytes]] = {}  # group -> the nodes its jobs took in this allocation
    for job in jobs:
        groups = (gpu_index if job.gpu_count else cpu_index).get(job.runtime, ())
        avoid = job.avoid | taken[job.group] if job.group in taken else job.avoid
        row, price = _search(groups, job, avoid)
        if row is not None and price <= job.max_price:
            _take(row, job, least_cores, least_memory)
            placements.append(Placement(job.job_id, row.node, price))
            if job.group is not None:
                taken.setdefault(job.group, set()).add(row.node)
            continue
        if witnesses is None:
            witnesses = _witnesses(live)
        reasons[job.job_id] = _unmet(job, witnesses) or _waits(job, None if row is None else price)
    return placements, reasons


def _search(groups: Sequence[_Group], job: Job,
            avoid: frozenset[bytes] | set[bytes] = frozenset()) -> tuple[_Row | None, int]:
    """The row that takes `job` by the rules (cheapest, then fewest cores left, then the
    least hash of job and node) among the rows of `groups` it fits, whatever the job's
    maximum price, and its cost; (None, 0) when it fits none. When the cost is above the
    maximum price it is the cheapest the job could have had, for the job's reason."""
    jc, jm, jg, cap = job.cores, job.memory_mib, job.gpu_count, job.max_price
    wc, wm, wg = job.duration_s * jc, job.duration_s * jm, job.duration_s * jg
    best: _Row | None = None
    best_price = best_scaled = best_left = 0  # best_scaled: best_price * _UNIT
    best_hash = b""
    for group in groups:
        if best is not None:
            # Every group from here on costs at least this bound: none can beat the best.
            if (group.floor_fee + wc * group.floor_core + wm * group.floor_gib
                    + wg * group.floor_gpu) > best_scaled:
                break
            scaled = group.fee + wc * group.core + wm * group.gib + wg * group.gpu
            if scaled > best_scaled:
                continue
        else:
            scaled = group.fee + wc * group.core + wm * group.gib + wg * group.gpu
        price = -(-scaled // _UNIT)
        # At the best price so far, only a row that leaves no more cores than the best can
        # win; the rows are in order of free cores, so the walk stops at the first looser one.
        tied = best is not None and price == best_price
        rows = group.rows
        for i in range(bisect_left(rows, jc, key=_CORES), len(rows)):
            row = rows[i]
            left = row.cores - jc
            if tied and left > best_left:
                break
            if row.memory < jm or (jg and not gpus_fit(job, row.room)) or (
                    avoid and row.node in avoid):
                continue
            if not tied or left < best_left:
                best, best_price, best_scaled, best_left, best_hash = \
                    row, price, price * _UNIT, left, b""
                tied = True
            elif price <= cap and best is not None:
                # A tie on price and fit: the hashes decide, each computed only when needed.
                # Above the job's maximum price the row does not matter (the job waits and
                # its reason names only the price), so they are not computed then.
                if not best_hash:
                    best_hash = hashlib.sha256(job.job_id + best.node).digest()
                mine = hashlib.sha256(job.job_id + row.node).digest()
                if mine < best_hash:
                    best, best_hash = row, mine
    return best, best_price


def _take(row: _Row, job: Job, least_cores: int, least_memory: int) -> None:
    """Give `job` its resources from `row`, keep the row's groups in order of free cores, and
    drop the row from every group where it can no longer take any job."""
    row.cores -= job.cores
    row.memory -= job.memory_mib
    room = row.room
    room.cores, room.memory_mib = row.cores, row.memory
    take_gpus(job, room)
    useful = row.cores >= least_cores and row.memory >= least_memory
    has_gpus = any(n > 0 for n in room.gpus.values())
    kept = []
    for group in row.groups:
        group.rows.remove(row)
        if useful and (has_gpus or not group.for_gpus):
            insort(group.rows, row, key=_CORES)
            kept.append(group)
        elif not group.rows:
            group.index.remove(group)  # the floors of the groups before it stay true bounds
    row.groups = kept
