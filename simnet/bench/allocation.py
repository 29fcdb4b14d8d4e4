"""Job allocations per second at the end of a block, beside the plain rules' own rate.

Each run fills a fresh store (LMDB, as a node's) with the same seeded market: `offers` offers,
committed with `JobBook.commit_offer`, and `jobs` pending jobs, submitted with
`JobBook.submit` by owners credited beforehand (`Ledger.mint`). The mix is meant to look like
a real one: both runtimes, 2 to 32 cores per node (64 for some GPU nodes) and 1 to 16 per
job, memory per core, prices from a few tiers (so many nodes ask the same), a GPU node in seven
and a GPU job in eight, durations from a minute to four hours, a few offers expired by the
block, the cheapest offers filling up, and some jobs that cannot be placed (too big, a GPU
model nobody has, or a maximum price below every offer).

Figures, medians over the runs:
- allocations_per_s: jobs placed / seconds of one real `JobBook.end_block` over that store,
  which reads the queue and the offers, allocates, and writes every job's new state.
- core_allocations_per_s: jobs placed / seconds of `hmnode.allocation.allocate` alone, on the
  same offers and jobs.
- reference_allocations_per_s: the same for `reference_allocate` below, the rules written out
  plainly (every offer priced for every job), and `ratio`, core over reference. Each run also
  checks that both give the same placements and reasons, and that end_block placed as many.
- block_apply_ms_p50: on a real mesh of `validators` validators (4 by default) (`hmnode run` processes
  on loopback, a LocalMesh), each node offers its share (registering with its proof of work
  and proving space and stake, as a node does), then clients submit `MESH_JOBS` jobs; the
  figure is the median, over every validator and every block that carried jobs, of the time
  the node took to execute the block (its transactions and the end of block, allocation
  included; `apply_ms` in `hmnode chain --json`). Baseline from the same mesh:
  `kv_block_apply_ms_p50`, the same for as many key-value writes, which allocate nothing.

end_block is timed inside its write transaction, so the figure leaves out the commit to disk.
Floor: allocations_per_s >= 5,000.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

from hmnode import schema
from hmnode.consensus.messages import sign_tx
from hmnode.identity import NodeKey
from hmnode.simnet.bench.consensus import call, temp_root, wait_chain
from hmnode.simnet.local import LocalMesh, node_name
from hmnode.allocation import (Free, Job, Offer, Placement, Price, allocate, cost, gpus_fit,
                               take_gpus, why_not)
from hmnode.env import Txn
from hmnode.errors import HmnodeError
from hmnode.jobs import JobBook, parse_job, parse_offer
from hmnode.ledger import Ledger
from hmnode.store import Store

STEPS_PER_RUN = 3
DEFAULT_RUNS = 5
OFFERS = 1_000
JOBS = 1_000
SEED = 1
OWNERS = 20
SUBMIT_HEIGHT = 1  # offers are committed and jobs submitted in this block,
ALLOCATE_HEIGHT = 10  # and allocated at the end of this one
STORE_MAP_SIZE = 256 << 20  # room for the whole market, so the fill runs once
FLOOR_ALLOCATIONS_PER_S = 5_000.0  # end_block, 1,000 jobs over 1,000 offers
MESH_VALIDATORS = 4
MESH_JOBS = 1_000
MESH_BATCH = 250  # transactions per submit_txs call
MESH_READY_S = 90.0
MESH_OFFER_S = 60.0  # an offer's registration (proof of work, plotting) and commit
MESH_COMMIT_S = 120.0


class BenchError(HmnodeError):
    """The allocators disagree, so their rates mean nothing."""


def reference_allocate(offers: list[Offer], free: dict[bytes, Free], jobs: list[Job],
                       height: int) -> tuple[list[Placement], dict[bytes, str]]:
    """The rules written plainly: what `allocate` must compute, however it is sped up."""
    live = sorted((o for o in offers if o.expires_height > height and o.node in free),
                  key=lambda o: o.node)
    placements: list[Placement] = []
    reasons: dict[bytes, str] = {}
    taken: dict[bytes, set[bytes]] = {}  # replicas of one group take distinct nodes
    for job in jobs:
        avoid = job.avoid | taken.get(job.group, set()) if job.group is not None else job.avoid
        fits = [o for o in live if job.runtime in o.runtimes and gpus_fit(job, free[o.node])
                and free[o.node].cores >= job.cores and free[o.node].memory_mib >= job.memory_mib
                and o.node not in avoid]
        affordable = [(cost(job, o.price), o) for o in fits if cost(job, o.price) <= job.max_price]
        if not affordable:
            cheapest = min((cost(job, o.price) for o in fits), default=None)
            reasons[job.job_id] = why_not(job, live, cheapest)
            continue
        price, offer = min(affordable, key=lambda co: (
            co[0], free[co[1].node].cores - job.cores,
            hashlib.sha256(job.job_id + co[1].node).digest()))
        room = free[offer.node]
        room.cores -= job.cores
        room.memory_mib -= job.memory_mib
        take_gpus(job, room)
        placements.append(Placement(job.job_id, offer.node, price))
        if job.group is not None:
            taken.setdefault(job.group, set()).add(offer.node)
    return placements, reasons


# --- the market -------------------------------------------------------------------------------

GPU_MODELS = ("A100", "H100", "L4")
MARKET_PRICE = Price(core_hour=6, gib_hour=1, gpu_hour=200, start_fee=2)


@dataclass(frozen=True)
class Market:
    """Offer bodies by node and job bodies by (owner, job id), in submission order, as the
    chain's transactions carry them."""

    offers: list[tuple[bytes, dict[str, Any]]]
    jobs: list[tuple[bytes, bytes, dict[str, Any]]]
    owners: list[bytes]


def _offer_body(rng: Random) -> dict[str, Any]:
    if rng.random() < 1 / 7:
        cores = rng.choice([16, 32, 64])
        models = sorted(rng.sample(GPU_MODELS, rng.choice([1, 1, 1, 2])))
        gpus = [[m, rng.choice([1, 2, 2, 4])] for m in models]
        gpu_hour = rng.choice([80, 120, 150, 200, 250, 300, 400])
    else:
        cores = rng.choice([2, 4, 4, 8, 8, 16, 32])
        gpus, gpu_hour = [], 0
    expired = rng.random() < 0.03
    return {
        "cores": cores, "memory_mib": cores * rng.choice([1024, 2048, 4096]),
        "runtimes": rng.choice([["wasm"], ["wasm"], ["process"], ["process", "wasm"]]),
        "price": {"core_hour": rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12]),
                  "gib_hour": rng.choice([0, 1, 1, 2]), "gpu_hour": gpu_hour,
                  "start_fee": rng.choice([0, 1, 2, 5])},
        "expires_height": rng.randint(SUBMIT_HEIGHT + 1, ALLOCATE_HEIGHT) if expired
        else ALLOCATE_HEIGHT + 10_000,
        "gpus": gpus}


def _job_body(rng: Random) -> dict[str, Any]:
    kind = rng.random()
    cores = rng.choice([1, 2, 2, 4, 4, 8, 8, 16])
    gpu_count, gpu_model = 0, None
    if kind < 0.12:
        gpu_count = rng.choice([1, 1, 2, 4])
        gpu_model = rng.choice([None, None, "A100", "H100", "L4", "B200"])  # nobody has a B200
    elif kind < 0.14:
        cores = 128  # more than any node shares
    body = {"cores": cores, "memory_mib": cores * rng.choice([256, 512, 1024, 2048, 4096]),
            "runtime": rng.choice(["wasm", "wasm", "process"]),
            "duration_s": rng.randint(60, 4 * 3600), "gpu_count": gpu_count,
            "deadline_height": ALLOCATE_HEIGHT + 1_000}
    if gpu_model is not None:
        body["gpu_model"] = gpu_model
    # What the submitter is ready to pay: around the market's price, sometimes well below.
    at_market = cost(parse_job(b"", {**body, "max_price": 1}, SUBMIT_HEIGHT)[0], MARKET_PRICE)
    body["max_price"] = max(1, round(at_market * rng.uniform(0.3, 2.5)))
    return body


def market(offers: int = OFFERS, jobs: int = JOBS, seed: int = SEED) -> Market:
    """The seeded market every run allocates."""
    rng = Random(seed)
    owners = [rng.randbytes(32) for _ in range(OWNERS)]
    return Market([(rng.randbytes(32), _offer_body(rng)) for _ in range(offers)],
                  [(rng.choice(owners), rng.randbytes(32), _job_body(rng)) for _ in range(jobs)],
                  owners)


def _parsed(m: Market) -> tuple[list[Offer], list[Job]]:
    """The market's offers and jobs as `allocate` takes them."""
    return ([parse_offer(node, body, SUBMIT_HEIGHT) for node, body in m.offers],
            [parse_job(job_id, body, SUBMIT_HEIGHT)[0] for _, job_id, body in m.jobs])


def _free(offers: list[Offer]) -> dict[bytes, Free]:
    """Every offer's capacity, none of it in use (as end_block sees a fresh market)."""
    return {o.node: Free(o.cores, o.memory_mib, dict(o.gpus)) for o in offers}


# --- one run ------------------------------------------------------------------------------------

def _fill(m: Market, txn: Txn) -> None:
    """Credit the owners, commit the offers, submit the jobs: one block's transactions."""
    ledger = Ledger(txn)
    book = JobBook(txn, ledger)
    for owner in m.owners:
        ledger.mint(owner, sum(body["max_price"] for o, _, body in m.jobs if o == owner) + 1)
    for node, body in m.offers:
        book.commit_offer(node, body, SUBMIT_HEIGHT)
    for owner, job_id, body in m.jobs:
        book.submit(owner, job_id, body, SUBMIT_HEIGHT)


def _end_block(txn: Txn) -> tuple[float, int]:
    """Seconds of one `JobBook.end_block` and how many jobs it placed."""
    book = JobBook(txn, Ledger(txn))
    started = time.perf_counter()
    book.end_block(ALLOCATE_HEIGHT)
    took = time.perf_counter() - started
    return took, sum(1 for _, record in txn.items(schema.JOBS) if record["state"] == "allocated")


def _core(fn: Callable[..., tuple[list[Placement], dict[bytes, str]]], offers: list[Offer],
          jobs: list[Job]) -> tuple[float, tuple[list[Placement], dict[bytes, str]]]:
    """Seconds of one allocation by `fn` on a fresh copy of the capacity, and its result."""
    free = _free(offers)
    started = time.perf_counter()
    result = fn(offers, free, jobs, ALLOCATE_HEIGHT)
    return time.perf_counter() - started, result


def _one_run(m: Market, workdir: Path, progress: Callable[[int], None]) -> dict[str, float]:
    """One run's figures: end_block on a store in `workdir`, then both allocators alone."""
    with Store.open(workdir / "state.lmdb", map_size=STORE_MAP_SIZE) as store:
        store.write(lambda txn: _fill(m, txn))
        progress(1)
        block_s, block_placed = store.write(_end_block)
    progress(1)
    offers, jobs = _parsed(m)
    core_s, (placements, reasons) = _core(allocate, offers, jobs)
    reference_s, reference = _core(reference_allocate, offers, jobs)
    progress(1)
    if (placements, reasons) != reference:
        raise BenchError("allocate() and reference_allocate() disagree on this market")
    if block_placed != len(placements) or not placements:
        raise BenchError(f"end_block placed {block_placed} jobs, allocate() {len(placements)}")
    return {"placed": len(placements), "unplaced": len(reasons),
            "allocations_per_s": block_placed / block_s,
            "core_allocations_per_s": len(placements) / core_s,
            "reference_allocations_per_s": len(reference[0]) / reference_s,
            "end_block_ms": block_s * 1000, "core_ms": core_s * 1000,
            "reference_ms": reference_s * 1000}


def run(runs: int = DEFAULT_RUNS, progress: Callable[[int], None] = lambda n: None,
        offers: int = OFFERS, jobs: int = JOBS, mesh_jobs: int = MESH_JOBS,
        validators: int = MESH_VALIDATORS) -> dict[str, Any]:
    """Allocate the seeded market `runs` times (medians of the runs, and core over reference),
    then apply blocks of `mesh_jobs` jobs on a real mesh of `validators` (0 jobs: no mesh)."""
    m = market(offers, jobs)
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="hmnode-bench-allocation-") as tmp:
            results.append(_one_run(m, Path(tmp), progress))
    figures: dict[str, Any] = {k: round(statistics.median(r[k] for r in results), 1)
                               for k in results[0]}
    figures.update(offers=offers, jobs=jobs, runs=runs,
                   placed=results[0]["placed"], unplaced=results[0]["unplaced"])
    figures["ratio"] = round(statistics.median(r["core_allocations_per_s"] for r in results)
                             / statistics.median(r["reference_allocations_per_s"]
                                                 for r in results), 2)
    figures["floor_allocations_per_s"] = FLOOR_ALLOCATIONS_PER_S
    figures["floor_ok"] = figures["allocations_per_s"] >= FLOOR_ALLOCATIONS_PER_S
    if mesh_jobs:
        figures.update(mesh_blocks(validators, mesh_jobs))
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    """Lines for people: end_block, allocate() alone, and the plain rules beside it."""
    f = figures
    return [
        f"{f['jobs']} jobs over {f['offers']} offers: {f['placed']} placed, {f['unplaced']} "
        f"waiting (medians of {f['runs']} runs)",
        f"end_block      {f['allocations_per_s']:10.0f} allocations/s  ({f['end_block_ms']:.1f} ms;"
        f" floor {f['floor_allocations_per_s']:.0f}/s: {'yes' if f['floor_ok'] else 'NO'})",
        f"allocate()     {f['core_allocations_per_s']:10.0f} allocations/s  ({f['core_ms']:.1f} ms)",
        f"plain rules    {f['reference_allocations_per_s']:10.0f} allocations/s  "
        f"({f['reference_ms']:.1f} ms; allocate() is x{f['ratio']} of it)",
    ] + ([] if "block_apply_ms_p50" not in f else [
        f"real mesh of {f['mesh_validators']} validators, {f['mesh_jobs']} jobs over "
        f"{f['mesh_offers']} offers ({f['mesh_allocated']} allocated):",
        f"block apply    {f['block_apply_ms_p50']:10.1f} ms p50 over {f['mesh_job_blocks']} blocks "
        f"of jobs (key-value blocks: {f['kv_block_apply_ms_p50']:.1f} ms, x{f['apply_ratio']})",
    ])


# --- blocks of jobs on a real mesh --------------------------------------------------------------

def mesh_blocks(validators: int, jobs: int) -> dict[str, Any]:
    """Start a real mesh, submit `jobs` key-value writes, have every node offer, submit `jobs`
    jobs, and read how long each validator took to apply the blocks that carried them."""
    root = temp_root()
    mesh = LocalMesh(Path(root))
    try:
        # The nodes offer what the benchmark says, not their own share.
        mesh.up(validators, validators=validators, env={"HMNODE_SHARE_ENABLED": "false"})
        names = [node_name(i) for i in range(validators)]
        chain_id = wait_chain(mesh, names, validators, MESH_READY_S)
        # The baseline first, while no job waits (each block allocates the waiting ones).
        writer = NodeKey.generate()
        kv = [sign_tx(writer, chain_id, i, "kv.put", {"key": f"bench/{i}", "value": b"v" * 8})
              for i in range(1, jobs + 1)]
        kv_heights = _commit(mesh, names, kv)
        offers = _offer_everywhere(mesh, names)
        client = NodeKey.generate()
        rng = Random(SEED)
        txs = [sign_tx(client, chain_id, 1, "ledger.faucet", {"amount": 1_000_000})]
        txs += [sign_tx(client, chain_id, 1 + i, "job.submit", _mesh_job(rng))
                for i in range(1, jobs + 1)]
        job_heights = _commit(mesh, names, txs)
        job_ms = _apply_ms(mesh, names, job_heights)
        kv_ms = _apply_ms(mesh, names, kv_heights)
        allocated = call(mesh, names[0], "jobs", {"limit": 10_000})["jobs"]
        return {"mesh_validators": validators, "mesh_jobs": jobs, "mesh_offers": offers,
                "mesh_job_blocks": len(job_heights),
                "mesh_allocated": sum(1 for j in allocated if j["state"] != "queued"),
                "block_apply_ms_p50": round(statistics.median(job_ms), 2),
                "kv_block_apply_ms_p50": round(statistics.median(kv_ms), 2),
                "apply_ratio": round(statistics.median(job_ms) / statistics.median(kv_ms), 2)}
    finally:
        try:
            mesh.down(timeout=10.0)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _offer_everywhere(mesh: LocalMesh, names: list[str]) -> int:
    """Each node offers 16 cores and 64 GiB at its own price; it registers first (proof of
    work, plotting), in parallel, as many nodes starting at once would."""
    errors: list[BaseException] = []

    def offer(i: int) -> None:
        try:
            _offer(i)
        except BaseException as exc:  # noqa: BLE001 - reported from the main thread below
            errors.append(exc)

    def _offer(i: int) -> None:
        body = {"cores": 16, "memory_mib": 65_536, "runtimes": ["wasm", "process"],
                "expires_height": 1_000_000,
                "price": {"core_hour": 2 + i, "gib_hour": 1, "gpu_hour": 0, "start_fee": 1}}
        done = call(mesh, names[i], "transaction", {"kind": "offer.commit", "body": body,
                                                    "wait": MESH_OFFER_S}, timeout=MESH_OFFER_S + 5)
        if not done.get("ok"):
            raise BenchError(f"{names[i]}'s offer was refused: {done.get('rejected')}")
    threads = [threading.Thread(target=offer, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(names)


def _mesh_job(rng: Random) -> dict[str, Any]:
    return {"cores": rng.randint(1, 4), "memory_mib": rng.choice([512, 1024, 4096]),
            "runtime": rng.choice(["wasm", "wasm", "process"]),
            "duration_s": rng.randint(60, 3600), "max_price": 1_000,
            "deadline_height": 1_000_000}


def _commit(mesh: LocalMesh, names: list[str], txs: list[Any]) -> set[int]:
    """Submit `txs` (one sender's, in nonce order) to the first node and wait until all are
    committed; the heights of the blocks that carried them."""
    for first in range(0, len(txs), MESH_BATCH):
        answer = call(mesh, names[0], "submit_txs",
                      {"txs": [t.encode() for t in txs[first:first + MESH_BATCH]]})
        refused = [r for r in answer["results"] if not r.get("accepted")]
        if refused:
            raise BenchError(f"the mesh refused a transaction: {refused[0].get('error')}")
    deadline = time.monotonic() + MESH_COMMIT_S
    heights: set[int] = set()
    pending = {t.tx_id.hex() for t in txs}
    while pending:
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} transactions were not committed within "
                             f"{MESH_COMMIT_S:g} s; see the nodes' logs in {mesh.dir}")
        for block in call(mesh, names[0], "commits", {"after": 0})["commits"]:
            done = pending.intersection(block["tx_ids"])
            if done:
                heights.add(block["height"])
                pending -= done
        if pending:
            time.sleep(0.2)
    return heights


def _apply_ms(mesh: LocalMesh, names: list[str], heights: set[int]) -> list[float]:
    """How long each validator took to apply each of these blocks."""
    times = [call(mesh, name, "chain", {"height": h}).get("apply_ms")
             for name in names for h in sorted(heights)]
    found = [t for t in times if t is not None]
    if not found:
        raise BenchError("no validator reported how long it took to apply the blocks")
    return found
