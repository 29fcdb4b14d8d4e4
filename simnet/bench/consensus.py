"""BFT chain on a real local mesh: committed transactions per second and commit latency.

Each run starts `validators` real `hmnode run` processes on loopback (a LocalMesh in a temporary
directory), all of them validators of one genesis, waits until every node runs the same chain
and a first block commits, then measures two phases:

- Throughput: `transactions` transactions, signed beforehand by `senders` client keys (each
  sender's nonces in order, each sender always submitted to the same validator), are submitted
  with `submit_txs` from one thread per validator as fast as the nodes take them, with at most
  `window` submitted and not yet committed (the mempools are bounded). Refused transactions
  are sent again. tx_per_s = committed transactions / (the commit time of the last one - the
  time of the first submit), commit times as one validator reports them (`commits`).
- Latency: a steady load well under that throughput (`latency_rate` tx/s, at most a third of
  it) in small batches every 20 ms for `duration_s`, each batch to the next validator in turn
  (one thread per validator, so that a slow answer from one does not hold back the others).
  A transaction's commit latency is its block's `committed_at` on the validator it was
  submitted to minus the wall time just before its `submit_txs` call (one machine, one clock).

Beside them: the CPU time all nodes together spent per committed transaction in the throughput
phase, and how many cores other work on the machine kept busy meanwhile (the nodes share the
machine's cores, so that bounds what they can do).

Baseline from the same run: the same two phases on a chain of one validator (a one-node
mesh), so each figure is shown beside what the chain does without any consensus traffic.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hmnode import control
from hmnode.consensus.messages import sign_tx
from hmnode.errors import HmnodeError
from hmnode.identity import NodeKey
from hmnode.simnet.local import LocalMesh, node_name

DEFAULT_RUNS = 1
VALIDATORS = 4
TRANSACTIONS = 20_000
SENDERS = 32
BATCH = 500  # transactions per submit_txs call in the throughput phase
WINDOW = 8_000  # submitted and not yet committed, at most (a validator's mempool holds 20,000)
LATENCY_S = 5.0
LATENCY_RATE = 300.0  # offered load of the latency phase, tx/s (at most a third of throughput)
LATENCY_TICK_S = 0.02
LATENCY_SENDERS_PER_VALIDATOR = 4
WARMUP_TXS = 8
THROUGHPUT_STEPS = 4
STEPS_PER_RUN = 2 * (3 + THROUGHPUT_STEPS)
CALL_TIMEOUT_S = 10.0
POLL_S = 0.05
READY_TIMEOUT_S = 60.0
WARMUP_TIMEOUT_S = 60.0
THROUGHPUT_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 60.0  # after the last submit, for the rest to commit
MAX_REFUSALS = 200  # times one transaction may be refused before it is given up
# Unix socket paths hold 107 bytes; the mesh's node dirs go where their control sockets fit.
_SOCKET_TAIL = len("/node00/control.sock") + 16
FLOORS = {"tx_per_s": 1000.0, "commit_ms_p50": 100.0}
FLOOR_VALIDATORS = 4


class BenchError(HmnodeError):
    """The chain did not come up or did not commit, so there is nothing to measure."""


# --- the mesh -------------------------------------------------------------------------------


def call(mesh: LocalMesh, name: str, method: str, params: dict[str, Any] | None = None,
          timeout: float = CALL_TIMEOUT_S) -> Any:
    return control.call(mesh.data_dir(name).control_socket, method, params, timeout=timeout)


def temp_root() -> str:
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + _SOCKET_TAIL > control.MAX_SOCKET_PATH and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="hmb-", dir=base)


def wait_chain(mesh: LocalMesh, names: list[str], validators: int, timeout: float) -> str:
    """Wait until every node runs the same chain of `validators` validators, each of them
    one of these nodes; the chain id."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        chains = []
        for name in names:
            try:
                chains.append(call(mesh, name, "status", timeout=2.0)["chain"])
            except HmnodeError as exc:
                last = f"{name}: {exc}"
                break
        else:
            ids = {c.get("chain_id") for c in chains}
            if (all(c.get("ready") for c in chains) and len(ids) == 1
                    and all(len(c["validators"]) == validators and c["is_validator"]
                            for c in chains)):
                return str(ids.pop())
            last = "; ".join(f"{n}: chain {c.get('chain_id')} ready={c.get('ready')} "
                             f"validators={len(c.get('validators') or [])} "
                             f"validating={c.get('is_validator')}" for n, c in zip(names, chains))
        time.sleep(0.2)
    raise BenchError(f"the chain of {validators} validators did not come up within {timeout:g} s "
                     f"({last}); see the nodes' logs in {mesh.dir}")


class _Commits:
    """What each node reports through `commits`: tx id (hex) -> committed_at on that node."""

    def __init__(self, mesh: LocalMesh, names: list[str]) -> None:
        self.mesh = mesh
        self.after = {name: 0 for name in names}
        self.at: dict[str, dict[str, float]] = {name: {} for name in names}
        self.blocks: dict[str, list[tuple[int, int]]] = {name: [] for name in names}

    def start_here(self) -> None:
        """Forget what came before: only blocks above each node's current head count."""
        for name in self.after:
            head = call(self.mesh, name, "status")["chain"]["height"]
            self.after[name] = int(head or 0)
            self.at[name].clear()
            self.blocks[name].clear()

    def poll(self, name: str, wanted: set[str] | None = None) -> list[str]:
        """Read `name`'s new commits; the tx ids among `wanted` (all, if None) now committed."""
        fresh: list[str] = []
        answer = call(self.mesh, name, "commits", {"after": self.after[name]})
        for block in answer["commits"]:
            height = int(block["height"])
            if height <= self.after[name]:
                continue
            self.after[name] = height
            self.blocks[name].append((height, len(block["tx_ids"])))
            at = float(block["committed_at"])
            for tx_id in block["tx_ids"]:
                if wanted is None or tx_id in wanted:
                    self.at[name][tx_id] = at
                    fresh.append(tx_id)
        return fresh


@dataclass
class _Signed:
    """A pre-signed transaction: its encoding, id (hex) and sender index."""

    raw: bytes
    tx_id: str
    sender: int


def _sign(chain_id: str, keys: list[NodeKey], per_sender: list[int],
          tag: str) -> list[list[_Signed]]:
    """For each sender, its transactions with nonces 1.. in order."""
    out = []
    for s, (key, count) in enumerate(zip(keys, per_sender)):
        txs = []
        for nonce in range(1, count + 1):
            tx = sign_tx(key, chain_id, nonce, "kv.put",
                         {"key": f"bench/{tag}/{s}/{nonce}", "value": nonce.to_bytes(8, "big")})
            txs.append(_Signed(tx.encode(), tx.tx_id.hex(), s))
        out.append(txs)
    return out


def _interleave(per_sender: list[list[_Signed]]) -> list[_Signed]:
    """The senders' transactions taken one from each in turn (each sender's stay in order)."""
    out: list[_Signed] = []
    longest = max((len(txs) for txs in per_sender), default=0)
    for i in range(longest):
        out.extend(txs[i] for txs in per_sender if i < len(txs))
    return out


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _warm_up(mesh: LocalMesh, names: list[str], chain_id: str) -> None:
    """A few transactions through every validator, committed everywhere: the nodes' QUIC
    connections are up and the first rounds are behind them."""
    keys = [NodeKey.generate() for _ in names]
    signed = _sign(chain_id, keys, _split(WARMUP_TXS, len(names)), "warmup")
    wanted = {tx.tx_id for txs in signed for tx in txs}
    for name, txs in zip(names, signed):
        if txs:
            call(mesh, name, "submit_txs", {"txs": [tx.raw for tx in txs]})
    commits = _Commits(mesh, names)
    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(wanted <= set(commits.at[name]) for name in names):
            return
        for name in names:
            commits.poll(name, wanted)
        time.sleep(0.1)
    raise BenchError(f"the warm-up transactions did not commit at every node within "
                     f"{WARMUP_TIMEOUT_S:g} s; see the nodes' logs in {mesh.dir}")


# --- throughput -----------------------------------------------------------------------------


@dataclass
class _Flow:
    """Shared state of the throughput phase's submitters and the commit watcher."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    committed: int = 0
    first_submit: float | None = None
    refused: int = 0
    given_up: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    submit_s: list[float] = field(default_factory=list)
    stop: bool = False
    failure: BaseException | None = None


def _submitter(mesh: LocalMesh, name: str, queue: deque[_Signed], flow: _Flow,
               batch: int, window: int, deadline: float) -> None:
    refusals: dict[str, int] = {}
    try:
        while queue and not flow.stop and time.monotonic() < deadline:
            with flow.lock:
                room = window - flow.in_flight
            if room < min(batch, len(queue)):
                time.sleep(0.005)
                continue
            take = [queue.popleft() for _ in range(min(batch, len(queue), room))]
            t0 = time.time()
            with flow.lock:
                if flow.first_submit is None:
                    flow.first_submit = t0
                flow.in_flight += len(take)
            answer = call(mesh, name, "submit_txs", {"txs": [tx.raw for tx in take]})
            flow.submit_s.append(time.time() - t0)
            again: list[_Signed] = []
            for tx, result in zip(take, answer["results"]):
                if result.get("accepted"):
                    continue
                why = str(result.get("error"))
                refusals[tx.tx_id] = refusals.get(tx.tx_id, 0) + 1
                with flow.lock:
                    flow.refused += 1
                    key = why.split(";")[0][:60]
                    flow.errors[key] = flow.errors.get(key, 0) + 1
                if "already used" in why or refusals[tx.tx_id] > MAX_REFUSALS:
                    with flow.lock:
                        flow.given_up += 1
                        flow.in_flight -= 1
                else:
                    again.append(tx)
            if again:
                with flow.lock:
                    flow.in_flight -= len(again)
                # Back to the front, still in nonce order, after a pause for the pool to drain.
                queue.extendleft(reversed(again))
                time.sleep(0.02)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        flow.failure = exc
        flow.stop = True


def _throughput(mesh: LocalMesh, names: list[str], chain_id: str, transactions: int,
                senders: int, batch: int, window: int, timeout: float,
                progress: Callable[[int], None]) -> dict[str, Any]:
    keys = [NodeKey.generate() for _ in range(senders)]
    per_sender = _sign(chain_id, keys, _split(transactions, senders), "load")
    wanted = {tx.tx_id for txs in per_sender for tx in txs}
    # Sender s always goes to validator s mod k, so its nonces reach one mempool in order.
    queues = [deque(_interleave([txs for s, txs in enumerate(per_sender)
                                 if s % len(names) == v])) for v in range(len(names))]
    watch = names[0]
    commits = _Commits(mesh, [watch])
    commits.start_here()
    flow = _Flow()
    deadline = time.monotonic() + timeout
    threads = [threading.Thread(target=_submitter, daemon=True,
                                args=(mesh, name, queue, flow, batch, window, deadline))
               for name, queue in zip(names, queues)]
    for thread in threads:
        thread.start()
    steps_done = 0
    drain_deadline: float | None = None
    try:
        while flow.committed < len(wanted) - flow.given_up:
            now = time.monotonic()
            if flow.failure is not None:
                raise BenchError(f"submitting failed: {flow.failure}") from flow.failure
            if now > deadline or (drain_deadline is not None and now > drain_deadline):
                break
            if drain_deadline is None and not any(t.is_alive() for t in threads):
                drain_deadline = now + DRAIN_TIMEOUT_S
            fresh = commits.poll(watch, wanted)
            if fresh:
                with flow.lock:
                    flow.committed += len(fresh)
                    flow.in_flight -= len(fresh)
                due = flow.committed * THROUGHPUT_STEPS // len(wanted)
                if due > steps_done:
                    progress(due - steps_done)
                    steps_done = due
            else:
                time.sleep(POLL_S)
    finally:
        flow.stop = True
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT_S + 1)
    if steps_done < THROUGHPUT_STEPS:
        progress(THROUGHPUT_STEPS - steps_done)
    at = commits.at[watch]
    if not at or flow.first_submit is None:
        raise BenchError(f"none of the {len(wanted)} transactions committed within {timeout:g} s "
                         f"({flow.refused} refusals: {flow.errors}); see the logs in {mesh.dir}")
    last = max(at.values())
    span = max(last - flow.first_submit, 1e-6)
    blocks = [n for _, n in commits.blocks[watch] if n]
    return {
        "offered": len(wanted), "committed": len(at), "span_s": span,
        "tx_per_s": len(at) / span, "refused": flow.refused, "given_up": flow.given_up,
        "refusals": dict(flow.errors), "blocks": len(blocks),
        "txs_per_block": statistics.mean(blocks) if blocks else 0.0,
        "submit_call_ms": statistics.median(flow.submit_s) * 1000 if flow.submit_s else None,
    }


# --- latency --------------------------------------------------------------------------------


def _latency(mesh: LocalMesh, names: list[str], chain_id: str, rate: float,
             duration_s: float) -> dict[str, Any]:
    k = len(names)
    ticks = max(1, round(duration_s / LATENCY_TICK_S))
    total = max(1, round(rate * ticks * LATENCY_TICK_S))
    keys = [NodeKey.generate() for _ in range(k * LATENCY_SENDERS_PER_VALIDATOR)]
    # How many go out at each tick (spread evenly); tick i goes to validator i mod k.
    sizes = [(total * (i + 1)) // ticks - (total * i) // ticks for i in range(ticks)]
    queues = []
    for v in range(k):
        mine = keys[v * LATENCY_SENDERS_PER_VALIDATOR:(v + 1) * LATENCY_SENDERS_PER_VALIDATOR]
        through = sum(sizes[i] for i in range(v, ticks, k))
        queues.append(deque(_interleave(_sign(chain_id, mine, _split(through, len(mine)),
                                              f"lat{v}"))))
    commits = _Commits(mesh, names)
    commits.start_here()
    submitted: dict[str, tuple[str, float]] = {}  # tx id -> (validator, first submit time)
    lock = threading.Lock()
    refused = [0]
    failures: list[BaseException] = []
    finished: list[float] = []
    started = time.monotonic() + 0.05

    def offer(v: int) -> None:
        """Validator v's share: its ticks, each batch from its own thread, so that one slow
        answer does not hold back the load on the others."""
        retry: list[_Signed] = []
        try:
            for i in range(v, ticks, k):
                wait = started + i * LATENCY_TICK_S - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                take = retry + [queues[v].popleft() for _ in range(min(sizes[i], len(queues[v])))]
                retry = []
                if not take:
                    continue
                t0 = time.time()
                answer = call(mesh, names[v], "submit_txs", {"txs": [tx.raw for tx in take]})
                with lock:
                    for tx, result in zip(take, answer["results"]):
                        # A refused one is sent again with the next batch; the client's wait
                        # started with its first submit.
                        submitted.setdefault(tx.tx_id, (names[v], t0))
                        if not result.get("accepted"):
                            refused[0] += 1
                            retry.append(tx)
            if retry:
                call(mesh, names[v], "submit_txs", {"txs": [tx.raw for tx in retry]})
            finished.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=offer, args=(v,), daemon=True) for v in range(k)]
    for thread in threads:
        thread.start()
    next_poll = time.monotonic() + 1.0
    while any(t.is_alive() for t in threads):
        time.sleep(0.05)
        if time.monotonic() >= next_poll:
            # Keep each node's list of recent commits from running past what it keeps.
            next_poll = time.monotonic() + 1.0
            for name in names:
                commits.poll(name)
    for thread in threads:
        thread.join()
    offered_s = max(finished, default=started) - started
    if failures:
        raise BenchError(f"submitting failed: {failures[0]}") from failures[0]
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        for name in names:
            commits.poll(name)
        if all(tx_id in commits.at[name] for tx_id, (name, _) in submitted.items()):
            break
        time.sleep(0.1)
    latencies = [(commits.at[name][tx_id] - t0) * 1000
                 for tx_id, (name, t0) in submitted.items() if tx_id in commits.at[name]]
    blocks = [n for _, n in commits.blocks[names[0]] if n]
    return {"offered": total, "committed": len(latencies),
            "rate": len(submitted) / max(offered_s, 1e-6), "refused": refused[0],
            "latencies_ms": latencies, "blocks": len(blocks)}


# --- runs -----------------------------------------------------------------------------------


def _wait_drained(mesh: LocalMesh, names: list[str], timeout: float) -> int:
    """Wait until no node holds a pending transaction (what the throughput phase left must not
    queue ahead of the latency phase's); the most any node still holds after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        held = max(int(call(mesh, name, "status")["chain"].get("mempool") or 0)
                   for name in names)
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def _cpu(procs: list[psutil.Process]) -> tuple[float, float, float, float]:
    """CPU seconds so far of the nodes, of this process, of the whole machine; and the time."""
    nodes = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            nodes += times.user + times.system
        except psutil.Error:
            pass
    me = os.times()
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return nodes, me.user + me.system, busy, time.monotonic()


def _one_chain(validators: int, transactions: int, senders: int, batch: int, window: int,
               timeout: float, rate: float | None, duration_s: float,
               progress: Callable[[int], None]) -> dict[str, Any]:
    """Start a chain of `validators` nodes, measure both phases, stop it."""
    root = temp_root()
    mesh = LocalMesh(Path(root))
    try:
        started = time.monotonic()
        # The nodes do not offer their share: registering (seconds of proof of work) would
        # compete with the consensus this measures.
        records = mesh.up(validators, validators=validators, env={"HMNODE_SHARE_ENABLED": "false"})
        names = [node_name(i) for i in range(len(records))]
        progress(1)
        chain_id = wait_chain(mesh, names, validators, READY_TIMEOUT_S + 2.0 * validators)
        _warm_up(mesh, names, chain_id)
        ready_s = time.monotonic() - started
        progress(1)
        procs = [psutil.Process(rec.pid) for rec in records]
        before = _cpu(procs)
        put = _throughput(mesh, names, chain_id, transactions, senders, batch, window, timeout,
                          progress)
        after = _cpu(procs)
        nodes_s = after[0] - before[0]
        put["node_cpu_us_per_tx"] = nodes_s / max(1, put["committed"]) * 1e6
        # Cores kept busy by everything else on the machine meanwhile: what the nodes could
        # not have, on a machine shared with other work.
        other_s = (after[2] - before[2]) - nodes_s - (after[1] - before[1])
        put["other_cores"] = max(0.0, other_s) / max(after[3] - before[3], 1e-6)
        backlog = _wait_drained(mesh, names, DRAIN_TIMEOUT_S)
        offered = rate if rate is not None else min(LATENCY_RATE, put["tx_per_s"] / 3)
        lat = _latency(mesh, names, chain_id, max(1.0, offered), duration_s)
        lat["backlog"] = backlog
        progress(1)
        return {"ready_s": ready_s, "throughput": put, "latency": lat}
    finally:
        try:
            mesh.down(timeout=10.0)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (no interpolation beyond the samples)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    lat = [v for r in results for v in r["latency"]["latencies_ms"]]
    put = [r["throughput"] for r in results]
    return {
        "tx_per_s": med(p["tx_per_s"] for p in put),
        "commit_ms_p50": percentile(lat, 0.5) if lat else None,
        "commit_ms_p99": percentile(lat, 0.99) if lat else None,
        "commit_ms_max": max(lat) if lat else None,
        "offered": sum(p["offered"] for p in put),
        "committed": sum(p["committed"] for p in put),
        "refused": sum(p["refused"] for p in put),
        "txs_per_block": med(p["txs_per_block"] for p in put),
        "submit_call_ms": med(p["submit_call_ms"] for p in put if p["submit_call_ms"] is not None)
        if any(p["submit_call_ms"] is not None for p in put) else None,
        "latency_offered": sum(r["latency"]["offered"] for r in results),
        "latency_committed": sum(r["latency"]["committed"] for r in results),
        "latency_rate": med(r["latency"]["rate"] for r in results),
        "latency_backlog": max(r["latency"]["backlog"] for r in results),
        "ready_s": med(r["ready_s"] for r in results),
        "node_cpu_us_per_tx": med(p["node_cpu_us_per_tx"] for p in put),
        "other_cores": med(p["other_cores"] for p in put),
        "refusals": {k: v for p in put for k, v in p["refusals"].items()},
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def run(runs: int = DEFAULT_RUNS, progress: Callable[[int], None] = lambda n: None,
        validators: int = VALIDATORS, transactions: int = TRANSACTIONS,
        duration_s: float = LATENCY_S, latency_rate: float | None = None,
        senders: int = SENDERS, batch: int = BATCH, window: int = WINDOW,
        timeout: float = THROUGHPUT_TIMEOUT_S) -> dict[str, Any]:
    """Measure a chain of `validators` validators and, as the baseline, one of a single
    validator, `runs` times each; throughputs are medians over runs, latency percentiles are
    over every transaction of every run."""
    if validators < 1:
        raise BenchError(f"a chain needs at least 1 validator, not {validators}")
    if transactions < 1 or senders < 1 or batch < 1 or window < 1:
        raise BenchError("the load needs at least one transaction, sender, batch and window")
    batch = min(batch, window)
    main: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(runs):
        one = _one_chain(validators, transactions, senders, batch, window, timeout,
                         latency_rate, duration_s, progress)
        main.append(one)
        # The baseline offers the latency phase the same load, so the two compare.
        rate = one["latency"]["offered"] / max(duration_s, LATENCY_TICK_S)
        base.append(_one_chain(1, transactions, senders, batch, window, timeout, rate,
                               duration_s, progress))
    m, b = _figures(main), _figures(base)
    floors_apply = validators == FLOOR_VALIDATORS
    return {
        "name": "consensus",
        "runs": runs,
        "validators": validators,
        "transactions": m["offered"],
        "committed": m["committed"],
        "committed_ratio": round(m["committed"] / max(1, m["offered"]), 4),
        "refused": m["refused"],
        "refusals": m["refusals"],
        "tx_per_s": round(m["tx_per_s"], 1),
        "txs_per_block": round(m["txs_per_block"], 1),
        "submit_call_ms": _round(m["submit_call_ms"], 2),
        "commit_ms_p50": _round(m["commit_ms_p50"], 2),
        "commit_ms_p99": _round(m["commit_ms_p99"], 2),
        "commit_ms_max": _round(m["commit_ms_max"], 2),
        "latency_tx_per_s": round(m["latency_rate"], 1),
        "latency_transactions": m["latency_offered"],
        "latency_committed": m["latency_committed"],
        "latency_backlog": m["latency_backlog"],
        "ready_s": round(m["ready_s"], 2),
        "node_cpu_us_per_tx": round(m["node_cpu_us_per_tx"], 1),
        "cpu_count": psutil.cpu_count() or 0,
        "other_cores": round(m["other_cores"], 2),
        "baseline_validators": 1,
        "baseline_tx_per_s": round(b["tx_per_s"], 1),
        "baseline_committed": b["committed"],
        "baseline_txs_per_block": round(b["txs_per_block"], 1),
        "baseline_commit_ms_p50": _round(b["commit_ms_p50"], 2),
        "baseline_commit_ms_p99": _round(b["commit_ms_p99"], 2),
        "baseline_latency_committed": b["latency_committed"],
        "baseline_node_cpu_us_per_tx": round(b["node_cpu_us_per_tx"], 1),
        "tx_per_s_ratio": _ratio(m["tx_per_s"], b["tx_per_s"]),
        "commit_p50_ratio": _ratio(m["commit_ms_p50"], b["commit_ms_p50"]),
        "commit_p99_ratio": _ratio(m["commit_ms_p99"], b["commit_ms_p99"]),
        "node_cpu_ratio": _ratio(m["node_cpu_us_per_tx"], b["node_cpu_us_per_tx"]),
        "floor_tx_per_s": FLOORS["tx_per_s"],
        "floor_commit_ms_p50": FLOORS["commit_ms_p50"],
        "floors_ok": (None if not floors_apply else
                      m["tx_per_s"] >= FLOORS["tx_per_s"] and m["commit_ms_p50"] is not None
                      and m["commit_ms_p50"] <= FLOORS["commit_ms_p50"]),
    }


def report(figures: dict[str, Any]) -> list[str]:
    """Human-readable lines: each figure beside its one-validator baseline."""
    def num(value: float | None, width: int = 9, digits: int = 1) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    floors = figures["floors_ok"]
    verdict = ("not checked (they apply at " f"{FLOOR_VALIDATORS} validators)" if floors is None
               else "met" if floors else "NOT met")
    backlog = figures.get("latency_backlog") or 0
    lines = [
        f"chain                 {figures['validators']} validators, ready in "
        f"{figures['ready_s']:.1f} s; {figures['runs']} run(s)",
        f"throughput            {num(figures['tx_per_s'])} tx/s  ({figures['committed']} of "
        f"{figures['transactions']} committed, {figures['txs_per_block']:.0f} per block, "
        f"{figures['refused']} refusals retried)",
        f"  1 validator         {num(figures['baseline_tx_per_s'])} tx/s  -> ratio "
        f"{ratio(figures['tx_per_s_ratio'])}",
        f"commit latency p50    {num(figures['commit_ms_p50'])} ms    (submit to commit, at "
        f"{figures['latency_tx_per_s']:.0f} tx/s offered)",
        f"  1 validator         {num(figures['baseline_commit_ms_p50'])} ms    -> ratio "
        f"{ratio(figures['commit_p50_ratio'])}",
        f"commit latency p99    {num(figures['commit_ms_p99'])} ms",
        f"  1 validator         {num(figures['baseline_commit_ms_p99'])} ms    -> ratio "
        f"{ratio(figures['commit_p99_ratio'])}",
        f"node CPU per tx       {num(figures['node_cpu_us_per_tx'])} us    (all nodes together, "
        f"throughput phase; {figures['cpu_count']} cores, {figures['other_cores']:.2f} of them "
        "busy with other work)",
        f"  1 validator         {num(figures['baseline_node_cpu_us_per_tx'])} us    -> ratio "
        f"{ratio(figures['node_cpu_ratio'])}",
        f"floors                >= {figures['floor_tx_per_s']:g} tx/s, p50 <= "
        f"{figures['floor_commit_ms_p50']:g} ms: {verdict}",
    ]
    if figures["committed"] < figures["transactions"]:
        lines.append(f"NOT all committed: {figures['transactions'] - figures['committed']} of the "
                     "throughput phase's transactions were still pending when it timed out")
    if figures["latency_committed"] < figures["latency_transactions"] or backlog:
        lines.append(f"latency phase: {figures['latency_committed']} of "
                     f"{figures['latency_transactions']} committed; {backlog} transactions of "
                     "the throughput phase were still pending when it began")
    return lines
