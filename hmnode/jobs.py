"""Offers and jobs in the replicated state: what nodes share, what users submit, and the
allocation run at the end of every block (`hmnode.allocation` decides; this module keeps the
books: escrow, capacity in use, job states and their history).

A job's life: queued (its maximum price held in escrow) -> allocated (to a node, at a cost) or
expired (its deadline passed while it waited) or cancelled (by its owner while it waited); an
allocated job is settled by its node's receipt (the node is paid for the work it measured, at
the offer's price, at most the cost fixed at allocation) or lapses when its deadline passes
first. Whatever is left of the escrow goes back to the owner.

A job of several replicas is that many jobs on distinct nodes; a replica's receipt makes it
"reported", and once none waits or runs, the result a quorum reported is the job's: the
replicas that reported it are paid ("settled"), the others are not ("rejected"), and every
replica records the outcome.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hmnode import schema
from hmnode.allocation import Free, Job, Offer, Price, allocate, cost
from hmnode.env import Txn
from hmnode.ledger import Ledger, LedgerRefused

MAX_CORES = 4096
MAX_MEMORY_MIB = 1 << 24
MAX_GPUS = 64
MAX_DURATION_S = 30 * 86400
MAX_DEADLINE_BLOCKS = 1_000_000
MAX_RUNTIMES = 4
RUNTIMES = ("wasm", "process")
MAX_QUEUED_PER_BLOCK = 2_000  # jobs considered per block, oldest first
MAX_MODEL = 64
MAX_ARGS = 32
MAX_REPLICAS = 7
MAX_ARG_CHARS = 1024
MAX_FUEL = (1 << 63) - 1  # wasmtime's fuel counter is a signed 64-bit number
MAX_REASON = 200  # characters of a pause's or a release's reason
MAX_ALLOWED = 64  # node ids an offer may name as the only submitters it takes
QUEUED, ALLOCATED = b"q", b"a"
SEQ_KEY = "job_seq"  # in the state table: jobs submitted so far, which orders the queue


def _count(body: dict, name: str, hi: int, lo: int = 0) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LedgerRefused(f"{name} must be a whole number in {lo}..{hi}")
    return value


def _model(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODEL:
        raise LedgerRefused(f"a GPU model is text of 1..{MAX_MODEL} characters")
    return value


def parse_offer(node: bytes, body: dict, height: int) -> Offer:
    """An `offer.commit` body as an Offer; LedgerRefused saying what is wrong."""
    runtimes = body.get("runtimes")
    if not isinstance(runtimes, list) or not 0 < len(runtimes) <= MAX_RUNTIMES or any(
            r not in RUNTIMES for r in runtimes):
        raise LedgerRefused(f"runtimes is a list of {', '.join(RUNTIMES)}")
    price = body.get("price")
    if not isinstance(price, dict):
        raise LedgerRefused("price is a map of core_hour, gib_hour, gpu_hour and start_fee")
    gpus = body.get("gpus", [])
    if not isinstance(gpus, list) or len(gpus) > 8:
        raise LedgerRefused("gpus is a list of [model, count]")
    gpu_pairs = []
    for pair in gpus:
        if not isinstance(pair, list) or len(pair) != 2:
            raise LedgerRefused("gpus is a list of [model, count]")
        gpu_pairs.append((_model(pair[0]), _count({"count": pair[1]}, "count", MAX_GPUS, 1)))
    expires = _count(body, "expires_height", height + MAX_DEADLINE_BLOCKS, height + 1)
    return Offer(node, _count(body, "cores", MAX_CORES), _count(body, "memory_mib", MAX_MEMORY_MIB),
                 tuple(sorted(set(runtimes))),
                 Price(*(_count(price, k, 1 << 40) for k in ("core_hour", "gib_hour", "gpu_hour",
                                                            "start_fee"))),
                 expires, tuple(sorted(gpu_pairs)))


def parse_offer_terms(body: dict) -> dict[str, Any]:
    """An `offer.commit` body's terms besides capacity and price: "paused" (why the node
    shares nothing now; its offer stays, so what runs keeps its place) and "allow" (the only
    submitters whose jobs it takes; absent: everyone). Only the terms given."""
    terms: dict[str, Any] = {}
    if body.get("paused") is not None:
        terms["paused"] = _reason(body["paused"], "paused")
    allow = body.get("allow")
    if allow is not None:
        if not isinstance(allow, list) or not 0 < len(allow) <= MAX_ALLOWED or any(
                not isinstance(n, bytes) or len(n) != 32 for n in allow):
            raise LedgerRefused(f"allow is a list of 1..{MAX_ALLOWED} 32-byte node ids")
        terms["allow"] = sorted(set(allow))
    return terms


def offer_differs(held: dict | None, node: bytes, body: dict, height: int) -> bool:
    """Whether `body` would change the committed offer `held` (the OFFERS record) in more
    than its expiry: what is shared, at what price, paused or not, and for whom."""
    if held is None:
        return True
    wire = _offer_wire(parse_offer(node, body, height))
    terms = parse_offer_terms(body)
    same = wire[:4] + wire[5:] == held["offer"][:4] + held["offer"][5:]
    return not same or terms != {k: held[k] for k in ("paused", "allow") if k in held}


def _reason(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REASON:
        raise LedgerRefused(f"{name} is a reason of 1..{MAX_REASON} characters")
    return value


def parse_job(job_id: bytes, body: dict, height: int) -> tuple[Job, int]:
    """A `job.submit` body as a Job and its deadline height."""
    runtime = body.get("runtime")
    if runtime not in RUNTIMES:
        raise LedgerRefused(f"runtime is one of {', '.join(RUNTIMES)}")
    gpu_model = body.get("gpu_model")
    job = Job(job_id, _count(body, "cores", MAX_CORES, 1),
              _count(body, "memory_mib", MAX_MEMORY_MIB, 1), runtime,
              _count(body, "duration_s", MAX_DURATION_S, 1), _count(body, "max_price", 1 << 50, 1),
              _count(body, "gpu_count", MAX_GPUS), None if gpu_model is None else _model(gpu_model))
    deadline = _count(body, "deadline_height", height + MAX_DEADLINE_BLOCKS, height + 1)
    return job, deadline


def parse_program(body: dict) -> dict | None:
    """A `job.submit` body's "program": {"blob": the program's blob id, "args": [text, ...],
    "stdin": a blob id or absent, "fuel": a wasm run's metered budget, or absent}; None when the job names none (it reserves resources only,
    and its node has nothing to run)."""
    program = body.get("program")
    if program is None:
        return None
    if not isinstance(program, dict):
        raise LedgerRefused("program is a map of blob, args and stdin")
    blob, stdin, args = program.get("blob"), program.get("stdin"), program.get("args", [])
    if not isinstance(blob, bytes) or len(blob) != 32:
        raise LedgerRefused("program.blob is the program's 32-byte blob id")
    if stdin is not None and (not isinstance(stdin, bytes) or len(stdin) != 32):
        raise LedgerRefused("program.stdin is a 32-byte blob id")
    if not isinstance(args, list) or len(args) > MAX_ARGS or any(
            not isinstance(a, str) or len(a) > MAX_ARG_CHARS for a in args):
        raise LedgerRefused(f"program.args is at most {MAX_ARGS} texts of at most "
                            f"{MAX_ARG_CHARS} characters")
    fuel = program.get("fuel")
    if fuel is None:
        return {"blob": blob, "args": args, "stdin": stdin}
    if isinstance(fuel, bool) or not isinstance(fuel, int) or not 0 < fuel <= MAX_FUEL:
        raise LedgerRefused(f"program.fuel is a budget of 1..{MAX_FUEL} units")
    return {"blob": blob, "args": args, "stdin": stdin, "fuel": fuel}


class JobBook:
    """Offers and jobs as seen through one write transaction."""

    def __init__(self, txn: Txn, ledger: Ledger) -> None:
        self.txn = txn
        self.ledger = ledger

    # --- transactions ---------------------------------------------------------------------------

    def commit_offer(self, node: bytes, body: dict, height: int) -> None:
        offer = parse_offer(node, body, height)
        terms = parse_offer_terms(body)
        held = self.txn.get(schema.OFFERS, node)
        used = held["used"] if held is not None else [0, 0, {}, {}]
        gpus = dict(offer.gpus)
        if offer.cores < used[0] or offer.memory_mib < used[1] or any(
                gpus.get(m, 0) < n for m, n in used[2].items()):
            raise LedgerRefused("the offer would be smaller than what its running jobs use")
        dropped = sorted(set(used[3]) - set(offer.runtimes))
        if dropped:
            raise LedgerRefused(f"the offer drops the {', '.join(dropped)} runtime its running "
                                "jobs use")
        self.txn.put(schema.OFFERS, node, {"offer": _offer_wire(offer), "used": used, **terms})

    def submit(self, owner: bytes, job_id: bytes, body: dict, height: int) -> None:
        """Queue a job with its maximum price in escrow; a job of `replicas` > 1 is queued as
        that many jobs (the first under the job's id), each with its own escrow, which the
        allocation puts on distinct nodes and which settle together (`_settle_group`)."""
        job, deadline = parse_job(job_id, body, height)
        program = parse_program(body)
        replicas = _count(body, "replicas", MAX_REPLICAS, 1) if "replicas" in body else 1
        # A quorum is a majority, so that at most one result can reach it.
        quorum = (_count(body, "quorum", replicas, replicas // 2 + 1) if "quorum" in body
                  else replicas // 2 + 1)
        if self.ledger.balance(owner) < job.max_price * replicas:
            raise LedgerRefused(f"the balance is {self.ledger.balance(owner)}, not the "
                                f"{job.max_price * replicas} that {replicas} replicas of "
                                f"{job.max_price} hold in escrow")
        for i in range(replicas):
            rid = job_id if i == 0 else replica_id(job_id, i)
            self.ledger.lock(owner, rid, job.max_price)
            seq = self.txn.get(schema.STATE, SEQ_KEY, 0) + 1
            self.txn.put(schema.STATE, SEQ_KEY, seq)
            record = {"owner": owner, "spec": _job_wire(job), "deadline": deadline,
                      "submitted": height, "seq": seq, "state": "queued", "node": None,
                      "cost": None, "reason": "not yet considered",
                      "history": [["queued", height]], "program": program}
            if replicas > 1:
                record.update(group=job_id, replica=i, replicas=replicas, quorum=quorum)
            self.txn.put(schema.JOBS, rid, record)
            self.txn.put(schema.JOB_INDEX, _queued_key(seq, rid), rid)

    def release(self, node: bytes, body: dict, height: int) -> None:
        """The node a job was allocated to gives it back unfinished (its contributor paused
        sharing past the grace period, say): the job waits in the queue again, in its old
        place, with its escrow; the node is free of it and earns nothing."""
        job_id = body.get("job_id")
        record = self.txn.get(schema.JOBS, job_id) if isinstance(job_id, bytes) else None
        if record is None or record["state"] != "allocated" or record["node"] != node:
            raise LedgerRefused("no job allocated to this node with that id")
        why = _reason(body.get("reason"), "reason")
        self.txn.delete(schema.JOB_INDEX, ALLOCATED + job_id)
        self._use(node, record["spec"], record.get("gpu"), -1)
        record.update(state="queued", node=None, cost=None, price=None, gpu=None,
                      reason="not yet considered", released=f"node {node.hex()[:8]}: {why}")
        record["history"].append(["released", height])
        self.txn.put(schema.JOBS, job_id, record)
        self.txn.put(schema.JOB_INDEX, _queued_key(record["seq"], job_id), job_id)

    def withdraw_offer(self, node: bytes) -> None:
        held = self.txn.get(schema.OFFERS, node)
        if held is None:
            raise LedgerRefused("this node has no offer")
        if held["used"][0] or held["used"][1] or held["used"][2]:
            raise LedgerRefused("jobs are running on this offer; it can only be withdrawn "
                                "once they end")
        self.txn.delete(schema.OFFERS, node)

    def receipt(self, node: bytes, body: dict, height: int) -> None:
        """The node that ran a job reports its result: it is paid the job's cost from the
        escrow, the rest goes back to the owner, and the node's capacity is free again."""
        job_id = body.get("job_id")
        record = self.txn.get(schema.JOBS, job_id) if isinstance(job_id, bytes) else None
        if record is None or record["state"] != "allocated" or record["node"] != node:
            raise LedgerRefused("no job allocated to this node with that id")
        result = body.get("result_hash")
        if not isinstance(result, bytes) or len(result) != 32:
            raise LedgerRefused("result_hash is 32 bytes")
        measured = {name: _count(body, name, 1 << 62) for name in
                    ("wall_ms", "cpu_ms", "fuel", "peak_memory_mib")}
        exit_code = body.get("exit_code")
        if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not \
                -(1 << 31) <= exit_code < (1 << 31):
            raise LedgerRefused("exit_code is a 32-bit integer")
        record["receipt"] = {"result_hash": result, "exit_code": exit_code, **measured,
                             "height": height, "paid": None}
        if record.get("replicas", 1) > 1:
            # A replica waits for the others: the node is free, its pay is decided together.
            self.txn.delete(schema.JOB_INDEX, ALLOCATED + job_id)
            self._use(record["node"], record["spec"], record.get("gpu"), -1)
            record.update(state="reported")
            record["history"].append(["reported", height])
            self.txn.put(schema.JOBS, job_id, record)
            self._settle_group(record["group"], height)
            return
        record["receipt"]["paid"] = paid = self.earned(record, measured["wall_ms"])
        self.ledger.pay(job_id, node, paid)
        self._end(job_id, record, "settled", height)

    @staticmethod
    def earned(record: dict, wall_ms: int) -> int:
        """What the node earns for a job that ran `wall_ms`: the start fee and its resources
        for the time it measured (in whole seconds, at least one), never more than the cost
        the allocation fixed; a job that ran its whole duration earns exactly that cost."""
        job = _job_from(b"", record["spec"])
        seconds = max(1, min(job.duration_s, -(-wall_ms // 1000)))
        measured = Job(job.job_id, job.cores, job.memory_mib, job.runtime, seconds,
                       job.max_price, job.gpu_count, job.gpu_model)
        return min(record["cost"], cost(measured, Price(*record["price"])))

    def cancel(self, owner: bytes, job_id: Any, height: int) -> None:
        """Cancel a queued job (all its replicas, which must all still be queued)."""
        record = self.txn.get(schema.JOBS, job_id) if isinstance(job_id, bytes) else None
        if record is None or record["owner"] != owner:
            raise LedgerRefused("no such job of yours")
        group = self._group(record["group"]) if record.get("replicas", 1) > 1 else \
            [(job_id, record)]
        for _, member in group:
            if member["state"] != "queued":
                raise LedgerRefused(f"the job is {member['state']}, not queued")
        for rid, member in group:
            self._end(rid, member, "cancelled", height)

    # --- once per block -------------------------------------------------------------------------

    def offering_nodes(self) -> list[bytes]:
        """Every node with an offer committed."""
        return [node for node, _ in self.txn.items(schema.OFFERS)]

    def end_block(self, height: int,
                  unavailable: Callable[[bytes], str | None] | None = None) -> None:
        """Lapse and expire what is overdue, then allocate what waits to the offers of nodes
        that are live (`unavailable(node)` says why one is not)."""
        for key, job_id in list(self.txn.items(schema.JOB_INDEX)):
            record = self.txn.get(schema.JOBS, job_id)
            if record["deadline"] <= height:
                self._end(job_id, record, "lapsed" if key[:1] == ALLOCATED else "expired", height)
        queued = [(job_id, self.txn.get(schema.JOBS, job_id)) for key, job_id in
                  self.txn.items(schema.JOB_INDEX) if key[:1] == QUEUED][:MAX_QUEUED_PER_BLOCK]
        if not queued:
            return
        offers, free, held_back, allowed = [], {}, {}, {}
        for node, held in self.txn.items(schema.OFFERS):
            offer = _offer_from(node, held["offer"])
            why = unavailable(node) if unavailable is not None else None
            if why is None and "paused" in held:
                why = f"paused sharing: {held['paused']}"
            if why is not None:
                held_back[node] = why
                continue
            if "allow" in held:
                allowed[node] = set(held["allow"])
            used = held["used"]
            offers.append(offer)
            free[node] = Free(offer.cores - used[0], offer.memory_mib - used[1],
                              {m: n - used[2].get(m, 0) for m, n in offer.gpus})
        jobs = [self._job_for_allocation(job_id, record, allowed) for job_id, record in queued]
        placements, reasons = allocate(offers, free, jobs, height)
        if allowed:
            owners = dict((job_id, record["owner"]) for job_id, record in queued)
            for job_id in reasons:
                closed = sum(1 for allow in allowed.values() if owners[job_id] not in allow)
                if closed:
                    reasons[job_id] += (f" ({closed} offer{'s' if closed > 1 else ''} take only "
                                        "the jobs of submitters they allow)")
        if held_back:
            # The user should learn that nodes exist but are held back, and why.
            node, why = min(held_back.items())
            note = f" ({len(held_back)} offer{'s' if len(held_back) > 1 else ''} held back: " \
                   f"node {node.hex()[:8]}: {why})"
            reasons = {job_id: reason + note for job_id, reason in reasons.items()}
        records = dict(queued)
        prices = {o.node: o.price for o in offers}
        for p in placements:
            record = records[p.job_id]
            record.update(state="allocated", node=p.node, cost=p.cost, reason=None,
                          gpu=self._gpu_model(p.node, record["spec"]),
                          price=_price_wire(prices[p.node]))
            record["history"].append(["allocated", height])
            self.txn.put(schema.JOBS, p.job_id, record)
            self.txn.delete(schema.JOB_INDEX, _queued_key(record["seq"], p.job_id))
            self.txn.put(schema.JOB_INDEX, ALLOCATED + p.job_id, p.job_id)
            self._use(p.node, record["spec"], record["gpu"], +1)
        for job_id, why in reasons.items():
            if records[job_id]["reason"] != why:
                records[job_id]["reason"] = why
                self.txn.put(schema.JOBS, job_id, records[job_id])

    # --- helpers --------------------------------------------------------------------------------

    def _end(self, job_id: bytes, record: dict, state: str, height: int) -> None:
        """End a live job: free its node, refund what is left of its escrow."""
        if record["state"] == "allocated":
            self.txn.delete(schema.JOB_INDEX, ALLOCATED + job_id)
            self._use(record["node"], record["spec"], record.get("gpu"), -1)
        elif record["state"] == "queued":
            self.txn.delete(schema.JOB_INDEX, _queued_key(record["seq"], job_id))
        self.ledger.refund(job_id)
        record.update(state=state, reason=None)
        record["history"].append([state, height])
        self.txn.put(schema.JOBS, job_id, record)
        if record.get("replicas", 1) > 1 and state in ("expired", "lapsed"):
            self._settle_group(record["group"], height)

    def _group(self, group: bytes) -> list[tuple[bytes, dict]]:
        """The replicas of job `group`, in order."""
        first = self.txn.get(schema.JOBS, group)
        ids = [group] + [replica_id(group, i) for i in range(1, first["replicas"])]
        return [(rid, first if rid == group else self.txn.get(schema.JOBS, rid)) for rid in ids]

    def _settle_group(self, group: bytes, height: int) -> None:
        """Once no replica of `group` waits or runs: the result hash reported by at least a
        quorum of them is the job's; the replicas that reported it are paid for their work,
        the others are not (state "rejected"), every escrow's rest goes back, and each
        replica records the outcome (as BOINC validates replicated work)."""
        members = self._group(group)
        if any(m["state"] in ("queued", "allocated") for _, m in members):
            return
        reported = [(rid, m) for rid, m in members if m["state"] == "reported"]
        votes: dict[bytes, int] = {}
        for _, m in reported:
            votes[m["receipt"]["result_hash"]] = votes.get(m["receipt"]["result_hash"], 0) + 1
        quorum = members[0][1]["quorum"]
        agreed = next((h for h, n in sorted(votes.items()) if n >= quorum), None)
        outcome = {"result_hash": agreed, "agreeing": votes.get(agreed, 0) if agreed else 0,
                   "reported": len(reported), "quorum": quorum,
                   "disagreeing": sorted(m["node"] for _, m in reported
                                         if m["receipt"]["result_hash"] != agreed)}
        for rid, m in members:
            if m["state"] == "reported":
                if m["receipt"]["result_hash"] == agreed:
                    m["receipt"]["paid"] = self.earned(m, m["receipt"]["wall_ms"])
                    self.ledger.pay(rid, m["node"], m["receipt"]["paid"])
                    final = "settled"
                else:
                    m["receipt"]["paid"] = 0
                    final = "rejected"
                self.ledger.refund(rid)
                m["state"] = final
                m["history"].append([final, height])
            m["outcome"] = outcome
            self.txn.put(schema.JOBS, rid, m)

    def _job_for_allocation(self, job_id: bytes, record: dict,
                            allowed: dict[bytes, set[bytes]]) -> Job:
        """The job as allocation sees it: it avoids the nodes that do not take its owner's
        jobs, and a replica the nodes its others already took."""
        job = _job_from(job_id, record["spec"])
        closed = frozenset(n for n, allow in allowed.items() if record["owner"] not in allow)
        if record.get("replicas", 1) == 1:
            return replace(job, avoid=closed) if closed else job
        taken = frozenset(m["node"] for rid, m in self._group(record["group"])
                          if rid != job_id and m["node"] is not None)
        return replace(job, group=record["group"], avoid=taken | closed)

    def _gpu_model(self, node: bytes, spec: list) -> str | None:
        """The GPU model a job placed on `node` takes (the rule `allocate` applies)."""
        job = _job_from(b"", spec)
        if not job.gpu_count:
            return None
        if job.gpu_model is not None:
            return job.gpu_model
        held = self.txn.get(schema.OFFERS, node)
        used = held["used"][2]
        return min(m for m, n in _offer_from(node, held["offer"]).gpus
                   if n - used.get(m, 0) >= job.gpu_count)

    def _use(self, node: bytes, spec: list, model: str | None, sign: int) -> None:
        job = _job_from(b"", spec)
        held = self.txn.get(schema.OFFERS, node)
        cores, memory, gpus, runtimes = held["used"]
        gpus, runtimes = dict(gpus), dict(runtimes)
        if model is not None:
            gpus[model] = gpus.get(model, 0) + sign * job.gpu_count
        runtimes[job.runtime] = runtimes.get(job.runtime, 0) + sign
        held["used"] = [cores + sign * job.cores, memory + sign * job.memory_mib,
                        {m: n for m, n in gpus.items() if n},
                        {r: n for r, n in runtimes.items() if n}]
        self.txn.put(schema.OFFERS, node, held)


def replica_id(group: bytes, index: int) -> bytes:
    """The id of replica `index` (from 1; replica 0 has the job's own id) of job `group`."""
    return hashlib.sha256(b"hmnode/replica" + group + index.to_bytes(2, "big")).digest()


def _queued_key(seq: int, job_id: bytes) -> bytes:
    return QUEUED + seq.to_bytes(8, "big") + job_id


def _price_wire(p: Price) -> list:
    return [p.core_hour, p.gib_hour, p.gpu_hour, p.start_fee]


def _offer_wire(o: Offer) -> list:
    return [o.cores, o.memory_mib, list(o.runtimes), _price_wire(o.price), o.expires_height,
            [list(g) for g in o.gpus]]


def _offer_from(node: bytes, wire: list) -> Offer:
    cores, memory, runtimes, price, expires, gpus = wire
    return Offer(node, cores, memory, tuple(runtimes), Price(*price), expires,
                 tuple((m, n) for m, n in gpus))


def _job_wire(j: Job) -> list:
    return [j.cores, j.memory_mib, j.runtime, j.duration_s, j.max_price, j.gpu_count, j.gpu_model]


def _job_from(job_id: bytes, wire: list) -> Job:
    return Job(job_id, *wire)
