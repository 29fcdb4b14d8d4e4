"""Invariants of the jobs, offers and registry state that hold after every block, checked from
the committed state alone: by the simulator's checkers and the state machine's property tests
(the ledger's own audit is `hmnode.ledger.Ledger.audit`)."""

from __future__ import annotations

from typing import Any

from hmnode import schema
from hmnode.registry import NodeRegistry


def allocation_problem(txn: Any) -> str | None:
    """Why the allocated jobs break the rules, or None: no offer gives out more than it
    shares, its books agree with its jobs, and every allocated job fits the runtimes of the
    offer it runs on and its own price."""
    offers = dict(txn.items(schema.OFFERS))
    used: dict[bytes, list] = {n: [0, 0, 0, {}] for n in offers}
    for job_id, record in txn.items(schema.JOBS):
        if record["state"] != "allocated":
            continue
        cores, memory, runtime, _, max_price, gpus, _ = record["spec"]
        held = offers.get(record["node"])
        if held is None:
            return f"job {job_id.hex()[:12]} runs on a node with no offer"
        if runtime not in held["offer"][2] or record["cost"] > max_price:
            return f"job {job_id.hex()[:12]} does not fit its offer or its price"
        u = used[record["node"]]
        u[0], u[1], u[2] = u[0] + cores, u[1] + memory, u[2] + gpus
        u[3][runtime] = u[3].get(runtime, 0) + 1
    for node, held in offers.items():
        o_cores, o_memory = held["offer"][0], held["offer"][1]
        o_gpus = sum(n for _, n in held["offer"][5])
        u = used[node]
        if u[0] > o_cores or u[1] > o_memory or u[2] > o_gpus:
            return f"node {node.hex()[:12]} is given {u[:3]} of {o_cores, o_memory, o_gpus}"
        books = held["used"]
        if [books[0], books[1], sum(books[2].values()), books[3]] != u:
            return f"node {node.hex()[:12]} books {books}, its jobs use {u}"
    return None


def placement_problem(txn: Any, height: int) -> str | None:
    """Why a job allocated at `height` went to a node that may not have it (unregistered,
    suspended or paused in the state that allocated it, or not taking its owner's jobs), or
    None. Read right after block `height`."""
    registry = NodeRegistry(txn)
    for key, job_id in txn.items(schema.JOB_INDEX):
        record = txn.get(schema.JOBS, job_id)
        if key[:1] != b"a" or record["history"][-1] != ["allocated", height]:
            continue
        standing = registry.node(record["node"])
        if standing is None or standing["suspended"]:
            return (f"job {job_id.hex()[:12]} was allocated at height {height} to node "
                    f"{record['node'].hex()[:12]}, which is "
                    f"{'unregistered' if standing is None else 'suspended'}")
        held = txn.get(schema.OFFERS, record["node"])
        if "paused" in held:
            return (f"job {job_id.hex()[:12]} was allocated at height {height} to node "
                    f"{record['node'].hex()[:12]}, whose offer is paused")
        if "allow" in held and record["owner"] not in held["allow"]:
            return (f"job {job_id.hex()[:12]} was allocated at height {height} to node "
                    f"{record['node'].hex()[:12]}, which does not take its owner's jobs")
    return None


def replica_problem(txn: Any) -> str | None:
    """Why the replicas of some job break the rules, or None: a job's replicas never share a
    node, and once settled together only those that reported the agreed result were paid."""
    groups: dict[bytes, list[dict]] = {}
    for _, record in txn.items(schema.JOBS):
        if record.get("replicas", 1) > 1:
            groups.setdefault(record["group"], []).append(record)
    for group, members in groups.items():
        nodes = [m["node"] for m in members if m["node"] is not None]
        if len(nodes) != len(set(nodes)):
            return f"replicas of job {group.hex()[:12]} share a node"
        for m in members:
            outcome = m.get("outcome")
            if m["state"] == "settled" and (outcome is None or m["receipt"]["result_hash"]
                                            != outcome["result_hash"]):
                return f"a replica of job {group.hex()[:12]} was paid for a result not agreed"
            if m["state"] == "rejected" and m["receipt"]["paid"]:
                return f"a rejected replica of job {group.hex()[:12]} was paid"
    return None


def suspended_nodes(txn: Any) -> int:
    """How many registered nodes are suspended now."""
    return sum(1 for _, record in txn.items(schema.NODES) if record["suspended"])
