"""The chain of a running node: `ChainNode` over the real clock, the mesh's QUIC connections and
the LMDB store, and what the control API asks of it.

Which chain: the one the store already holds; else the genesis file in the config
(`chain.genesis`); else, when the node has bootstrap peers, the first one's chain (asked over
QUIC with `chain.genesis`; the bootstrap's node id is the trust anchor, as for joining); else
a new chain of which this node is the one validator, so a lone node commits on its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hmnode import schema
from hmnode.chain_node import ChainConfig, ChainNode, TOPICS
from hmnode.config import PeerAddress
from hmnode.consensus.chain import Chain, ChainError, Genesis, GenesisError, Head
from hmnode.consensus.mempool import TxRefused
from hmnode.consensus.messages import Block, CommitCertificate, MessageRejected, Transaction
from hmnode.consensus.validators import ValidatorSet
from hmnode.env import Env, RealClock
from hmnode.errors import HmnodeError
from hmnode.identity import NodeId, NodeKey
from hmnode.consensus.kvapp import KeyValueApp
from hmnode.jobs import offer_differs
from hmnode.ledger import Ledger, LedgerRefused
from hmnode.mesh import Mesh
from hmnode.proof_keeper import OfferNotReady, ProofKeeper, ProofTask
from hmnode.state_machine import MeshStateMachine
from hmnode.store import Store
from hmnode.supervisor import in_daemon_thread
from hmnode.transport.connection import PeerConnection, RemoteError, TransportError
from hmnode.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

GENESIS_ASK_TIMEOUT_S = 5.0
GENESIS_RETRY_S = 2.0
MAX_WAITERS = 10_000
# A lone node's chain, and `hmnode simnet up`'s, is a local mesh: it has a faucet.
LOCAL_APP_STATE = {"faucet_max": 1_000_000}
# What a lone node's own chain gives its account at genesis, so that `hmnode submit` works on
# a fresh node (its jobs pay itself).
LONE_NODE_CREDITS = 10_000
COMMITS_KEPT = 4_096
PROOF_CHECK_S = 2.0  # how often the node looks for a beacon or challenge it must answer
OFFER_RENEW_BLOCKS = 500_000  # an offer with fewer blocks than this left is renewed


def load_genesis(path: Path) -> Genesis:
    """Read a genesis JSON file; GenesisError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GenesisError(f"cannot read the genesis file {path}: {exc}") from None
    return Genesis.from_json(data)


def write_genesis(path: Path, genesis: Genesis) -> None:
    """Write `genesis` as the JSON file `hmnode run --genesis` reads."""
    path.write_text(json.dumps(genesis.to_json(), indent=2, sort_keys=True) + "\n")


class ChainNotReady(HmnodeError):
    """The chain has not started yet (it is still fetching its genesis from a bootstrap peer)."""


class ChainService:
    """The running node's chain: genesis, the consensus node, and its control methods."""

    def __init__(self, key: NodeKey, store: Store, endpoint: Endpoint, mesh: Mesh,
                 genesis_path: Path | None, bootstrap: tuple[PeerAddress, ...],
                 config: ChainConfig = ChainConfig(), data_dir: Path | None = None) -> None:
        self.key = key
        self.store = store
        # Where this node's plot lives; without one it proves nothing (and cannot offer).
        self.data_dir = data_dir
        self.keeper: ProofKeeper | None = None
        # Called after every commit (the executor looks for work).
        self.commit_listeners: list[Callable[[], None]] = []
        # The offer this node keeps on the chain, given the height (None: it offers nothing).
        self.offer_source: Callable[[int], dict[str, Any] | None] | None = None
        self.offer_note = ""  # why this node does not offer yet, as last said
        self.endpoint = endpoint
        self.mesh = mesh
        self.genesis_path = genesis_path
        self.bootstrap = bootstrap
        self.config = config
        self.node: ChainNode | None = None
        self._waiters: dict[bytes, list[asyncio.Future]] = {}
        # The newest commits seen here: (height, wall-clock time, transaction ids).
        self._commits: deque[tuple[int, float, list[bytes]]] = deque(maxlen=COMMITS_KEPT)
        endpoint.handlers.rpc = {**endpoint.handlers.rpc, "chain.genesis": self._serve_genesis}
        mesh.route(TOPICS, self._on_notify)

    # --- start ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Find the genesis, start the chain, and serve until cancelled."""
        chain = Chain(self.store, MeshStateMachine(), stopwatch=time.perf_counter)
        if chain.genesis is None or self.genesis_path is not None:
            # A genesis file for a store that holds another chain is refused by init_genesis.
            chain.init_genesis(await self._genesis())
        env = Env(RealClock(), random.Random(), self.mesh, self.store)
        self.node = ChainNode(self.key, env, chain, self.config, observer=self)
        self.node.start()
        head = chain.head()
        log.info("chain %s at height %d; %s", chain.chain_id, head.height,
                 "validating" if self.node.is_validator() else "following",
                 extra={"event": "chain_started", "chain_id": chain.chain_id,
                        "height": head.height})
        keeping = None
        if self.data_dir is not None:
            self.keeper = ProofKeeper(self.key, chain, self.data_dir)
            keeping = asyncio.create_task(self._keep_proofs(self.keeper))
        try:
            await asyncio.Event().wait()
        finally:
            if keeping is not None:
                keeping.cancel()
            self.node.stop()

    async def _keep_proofs(self, keeper: ProofKeeper) -> None:
        """Make and submit the proofs the chain asks of this node (beacons, space answers);
        the work and the VDF take seconds of CPU, so they run off the event loop."""
        while True:
            await asyncio.sleep(PROOF_CHECK_S)
            now = time.monotonic()
            try:
                tasks = keeper.due(now)
                offer = self._offer_task(keeper, now)
            except HmnodeError as exc:
                log.warning("cannot read this node's standing on the chain: %s", exc)
                continue
            tasks += [offer] if offer is not None else []
            for task in tasks:
                try:
                    body = await in_daemon_thread(task.make, name="hmnode-proof")
                    tx = self.sign_and_submit(task.kind, body)
                except OfferNotReady as exc:
                    if str(exc) != self.offer_note:  # said once, not every retry
                        self.offer_note = str(exc)
                        log.info("this node does not offer yet: %s", exc)
                    continue
                except (HmnodeError, OSError, ValueError) as exc:
                    log.warning("cannot submit %s: %s", task.kind, exc)
                    continue
                log.info("submitted %s for %s %d", task.kind, *task.key,
                         extra={"event": "proof_submitted", "kind": task.kind,
                                "tx_id": tx.tx_id.hex()})

    def _offer_task(self, keeper: ProofKeeper, now: float) -> ProofTask | None:
        """The next step towards keeping this node's offer on the chain: registering, offering,
        renewing an offer that has used half its life, or committing it again when what it
        should say changed (the contributor's share, a pause, its prices)."""
        if self.offer_source is None or self.node is None:
            return None
        height = self.node.head.height
        body = self.offer_source(height)
        if body is None:
            return None
        standing = keeper.standing()
        if standing.offering and standing.offer_expires - height > OFFER_RENEW_BLOCKS:
            me = self.key.node_id.key
            held = self.store.read(lambda txn: txn.get(schema.OFFERS, me))
            try:
                if not offer_differs(held, me, body, height):
                    return None
            except LedgerRefused as exc:
                log.warning("this node's offer is not valid: %s", exc)
                return None
        return keeper.keep_offer(body, now, renew=standing.offering, standing=standing)

    def head_height(self) -> int:
        return self._ready().head.height

    def block_times(self, heights: list[int]) -> dict[int, int]:
        """Each committed height's block time (ms since the epoch)."""
        chain = self._ready().chain
        out = {}
        for height in set(heights):
            found = chain.block(height) if height > 0 else None
            if found is not None:
                out[height] = found[0].header.time_ms
        return out

    async def prepare_offer(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """`body` with the proofs an offer carries; registers this node first (proof of work,
        plotting if it has no plot) and waits up to `timeout` for that to commit."""
        keeper = self.keeper
        if keeper is None:
            raise ChainNotReady("this node keeps no plot, so it cannot prove an offer")
        standing = keeper.standing()
        # Plotting (the first time) is seconds of disk and CPU: not on the event loop.
        await in_daemon_thread(keeper.plot, standing.params.min_plot_labels, name="hmnode-plot")
        task = keeper.registration(standing)
        if task is not None:
            tx = self.sign_and_submit(task.kind, await in_daemon_thread(task.make))
            try:
                await self.wait_committed(tx.tx_id, timeout)
            except TimeoutError:
                raise ChainNotReady(f"this node's registration {tx.tx_id.hex()} was not "
                                    f"committed within {timeout:g} s; try the offer again "
                                    "later") from None
            done = self.tx_result(tx.tx_id) or {}
            # Refused because the node's own keeper registered it meanwhile: that will do.
            if not done.get("ok") and keeper.standing().registered is None:
                raise OfferNotReady(f"the chain refused this node's registration: "
                                    f"{done.get('rejected')}")
        return keeper.offer_body(body)

    async def _genesis(self) -> Genesis:
        if self.genesis_path is not None:
            return load_genesis(self.genesis_path)
        if not self.bootstrap:
            me = self.key.node_id
            return Genesis(f"hmnode-{me.short()}", int(time.time() * 1000),
                           ValidatorSet.of([(me.key, 1)]),
                           app_state=dict(LOCAL_APP_STATE,
                                          balances={str(me): LONE_NODE_CREDITS}))
        failures = 0
        while True:
            for peer in self.bootstrap:
                try:
                    conn = await self.endpoint.connect((peer.addr.host, peer.addr.port),
                                                       peer.node_id, timeout=GENESIS_ASK_TIMEOUT_S)
                    raw = await conn.request("chain.genesis", None, timeout=GENESIS_ASK_TIMEOUT_S)
                    genesis = Genesis.from_wire(raw)
                    log.info("following chain %s of bootstrap peer %s", genesis.chain_id, peer)
                    return genesis
                except (HmnodeError, TransportError, asyncio.TimeoutError) as exc:
                    failures += 1
                    if failures == 1 or failures % 30 == 0:
                        log.warning("cannot get the chain's genesis from %s yet: %s", peer, exc)
            await asyncio.sleep(GENESIS_RETRY_S)

    async def _serve_genesis(self, conn: PeerConnection, body: Any) -> Any:
        if self.node is None:
            raise RemoteError("not_ready", "this node's chain has not started yet")
        return self.node.chain.require_genesis().to_wire()

    def _on_notify(self, src: NodeId, topic: str, body: Any) -> None:
        if self.node is not None:
            self.node.receive(src, topic, body)

    def _ready(self) -> ChainNode:
        if self.node is None:
            raise ChainNotReady("the chain is not started yet (it may be fetching its genesis "
                                "from a bootstrap peer); try again in a moment")
        return self.node

    # --- ChainObserver --------------------------------------------------------------------------

    def block_committed(self, block: Block, cert: CommitCertificate, head: Head,
                        now: float) -> None:
        self._commits.append((head.height, time.time(), [tx.tx_id for tx in block.txs]))
        for tx in block.txs:
            for future in self._waiters.pop(tx.tx_id, []):
                if not future.done():
                    future.set_result(head.height)
        for listener in self.commit_listeners:
            listener()

    # --- control methods ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The chain part of `hmnode status`."""
        if self.node is None:
            return {"height": None, "ready": False, "validators": [], "is_validator": False,
                    "last_commit_ms": None}
        out = {"ready": True, **self.node.describe(),
               "last_commit_age_s": round(time.time() - self._commits[-1][1], 1)
               if self._commits else None}
        if self.keeper is not None:
            out["registry"] = self.keeper.describe()
        return out

    def block(self, height: int | None) -> dict[str, Any]:
        """A committed block, its transactions and certificate, as JSON-able data."""
        node = self._ready()
        head = node.head
        height = head.height if height is None else height
        if height == 0:
            return {"height": 0, "genesis": node.chain.require_genesis().to_json(), **head.to_json()}
        found = node.chain.block(height)
        if found is None:
            raise ChainError(f"no block at height {height}: the head is {head.height}")
        block, cert = found
        return block_json(node.chain, block, cert)

    def submit(self, raw_txs: list[bytes]) -> list[dict[str, Any]]:
        """Signed transactions from a client: each one's id and whether it was taken."""
        node = self._ready()
        out: list[dict[str, Any] | None] = []
        txs: list[Transaction] = []
        for raw in raw_txs:
            try:
                txs.append(Transaction.decode(raw))
                out.append(None)
            except MessageRejected as exc:
                out.append({"tx_id": None, "accepted": False, "error": str(exc)})
        taken = iter(zip(txs, node.submit_many(txs)))
        answers = []
        for slot in out:
            if slot is not None:
                answers.append(slot)
                continue
            tx, verdict = next(taken)
            if isinstance(verdict, TxRefused):
                answers.append({"tx_id": tx.tx_id.hex(), "accepted": False, "error": str(verdict)})
            else:
                answers.append({"tx_id": tx.tx_id.hex(), "accepted": True,
                                "duplicate": not verdict})
        return answers

    def sign_and_submit(self, kind: str, body: Any) -> Transaction:
        """A transaction signed by this node's key with its next free nonce."""
        return self._ready().sign_and_submit(kind, body)

    async def wait_committed(self, tx_id: bytes, timeout: float) -> int:
        """The height that committed `tx_id`; TimeoutError when it takes longer."""
        node = self._ready()
        done = node.chain.tx_result(tx_id)
        if done is not None:
            return int(done[0])
        if len(self._waiters) >= MAX_WAITERS:
            raise ChainNotReady("too many clients are waiting for commits; try again later")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(tx_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._waiters.get(tx_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[tx_id]

    def commits(self, after: int) -> list[dict[str, Any]]:
        """Blocks this node committed since it started, above height `after`: when (its wall
        clock) and which transactions; for measuring commit latency from outside."""
        return [{"height": h, "committed_at": at, "tx_ids": [t.hex() for t in txs]}
                for h, at, txs in self._commits if h > after]

    def tx_result(self, tx_id: bytes) -> dict[str, Any] | None:
        node = self._ready()
        found = node.chain.tx_result(tx_id)
        if found is None:
            return None
        height, index, why = found
        return {"tx_id": tx_id.hex(), "height": height, "index": index, "ok": why is None,
                "rejected": why}

    def ledger(self) -> dict[str, Any]:
        """This node's account, the totals, and the largest accounts, as JSON-able data."""
        node = self._ready()
        me = self.key.node_id.key

        def read(tx: Any) -> dict[str, Any]:
            ledger = Ledger(tx)
            totals = ledger.audit()
            accounts = sorted(((k, v[0], v[1]) for k, v in tx.items(schema.LEDGER_ACCOUNTS)),
                              key=lambda a: (-(a[1] + a[2]), a[0]))
            return {
                "height": node.head.height,
                "account": {"node_id": str(self.key.node_id), "balance": ledger.balance(me),
                            "stake": ledger.stake(me),
                            "unbonding": [{"release_height": h, "amount": a}
                                          for h, a in ledger.unbonding(me)]},
                "totals": {**totals.__dict__, "supply": totals.minted - totals.burned},
                "escrows": tx.count(schema.LEDGER_ESCROW),
                "accounts": [{"node_id": str(NodeId(k)), "balance": b, "stake": s}
                             for k, b, s in accounts[:100]],
                "jailed": [str(NodeId(k)) for k in MeshStateMachine().jailed(tx)],
            }
        return self.store.read(read)

    def jobs(self, limit: int) -> dict[str, Any]:
        """The newest jobs on the chain: state, node, cost, history and why one waits."""
        node = self._ready()

        def read(tx: Any) -> list[dict[str, Any]]:
            records = sorted(((r["seq"], job_id, r) for job_id, r in tx.items(schema.JOBS)),
                             reverse=True)[:limit]
            return [job_json(job_id, r) for _, job_id, r in records]
        return {"height": node.head.height, "jobs": self.store.read(read)}

    def job_counts(self) -> dict[str, int]:
        """Jobs on the chain by state."""
        self._ready()

        def read(tx: Any) -> dict[str, int]:
            counts: dict[str, int] = {}
            for _, record in tx.items(schema.JOBS):
                counts[record["state"]] = counts.get(record["state"], 0) + 1
            return counts
        return self.store.read(read)

    def earnings(self, since_ms: int = 0) -> dict[str, Any]:
        """What this node earned running jobs, from the chain's records: each paid job (when
        it was paid, by whom, how much) and the total, with its balance beside them."""
        node = self._ready()
        paid, balance = self._paid()
        times = self.block_times([height for height, _, _ in paid])
        jobs = []
        for height, job_id, record in paid:
            at = times.get(height)
            if at is None or at < since_ms:
                continue
            receipt = record["receipt"]
            jobs.append({"job_id": job_id.hex(), "owner": str(NodeId(record["owner"])),
                         "paid": receipt["paid"], "height": height, "at_ms": at,
                         "runtime": record["spec"][2], "wall_ms": receipt["wall_ms"],
                         "state": record["state"]})
        return {"height": node.head.height, "node_id": str(self.key.node_id),
                "since_ms": since_ms, "jobs": jobs, "total": sum(j["paid"] for j in jobs),
                "balance": balance}

    def earned(self) -> tuple[int, int]:
        """All this node was paid for jobs, and its balance (no block is read for times)."""
        self._ready()
        paid, balance = self._paid()
        return sum(r["receipt"]["paid"] for _, _, r in paid), balance

    def _paid(self) -> tuple[list[tuple[int, bytes, dict]], int]:
        """The jobs this node was paid for, by the height of their receipt, and its balance."""
        me = self.key.node_id.key

        def read(tx: Any) -> tuple[list[tuple[int, bytes, dict]], int]:
            paid = [(r["receipt"]["height"], job_id, r) for job_id, r in tx.items(schema.JOBS)
                    if r["node"] == me and (r.get("receipt") or {}).get("paid")]
            return sorted(paid), Ledger(tx).balance(me)
        return self.store.read(read)

    def kv_get(self, key: str) -> bytes | None:
        self._ready()
        return self.store.read(lambda tx: KeyValueApp().get(tx, key))


def job_json(job_id: bytes, record: dict[str, Any]) -> dict[str, Any]:
    """A job as `hmnode jobs --json` shows it."""
    cores, memory, runtime, duration, max_price, gpu_count, gpu_model = record["spec"]
    return {"job_id": job_id.hex(), "owner": str(NodeId(record["owner"])),
            "state": record["state"], "why_waiting": record["reason"],
            "node": None if record["node"] is None else str(NodeId(record["node"])),
            "cost": record["cost"], "max_price": max_price, "deadline_height": record["deadline"],
            "resources": {"cores": cores, "memory_mib": memory, "runtime": runtime,
                          "duration_s": duration, "gpu_count": gpu_count, "gpu_model": gpu_model},
            "history": [{"state": s, "height": h} for s, h in record["history"]],
            "program": _program_json(record.get("program")),
            "receipt": _receipt_json(record.get("receipt")),
            **({"released": record["released"]} if "released" in record else {}),
            **_replicas_json(record)}


def _replicas_json(record: dict[str, Any]) -> dict[str, Any]:
    if record.get("replicas", 1) == 1:
        return {}
    outcome = record.get("outcome")
    return {"group": record["group"].hex(), "replica": record["replica"],
            "replicas": record["replicas"], "quorum": record["quorum"],
            "outcome": None if outcome is None else {
                "result_hash": None if outcome["result_hash"] is None
                else outcome["result_hash"].hex(),
                "agreeing": outcome["agreeing"], "reported": outcome["reported"],
                "quorum": outcome["quorum"],
                "disagreeing": [str(NodeId(n)) for n in outcome["disagreeing"]]}}


def _program_json(program: dict[str, Any] | None) -> dict[str, Any] | None:
    if program is None:
        return None
    return {"blob": program["blob"].hex(), "args": program["args"],
            "stdin": None if program["stdin"] is None else program["stdin"].hex()}


def _receipt_json(receipt: dict[str, Any] | None) -> dict[str, Any] | None:
    if receipt is None:
        return None
    return {**receipt, "result_hash": receipt["result_hash"].hex()}


def block_json(chain: Chain, block: Block, cert: CommitCertificate) -> dict[str, Any]:
    """A block as `hmnode chain --json` shows it."""
    h = block.header
    results = {tx_id: None if found is None else found[2]
               for tx_id, found in chain.tx_results([tx.tx_id for tx in block.txs]).items()}
    validators = chain.validators_at(h.height)
    return {
        "height": h.height, "block_id": block.block_id.hex(), "chain_id": h.chain_id,
        "time_ms": h.time_ms, "prev_id": h.prev_id.hex(), "proposer": str(NodeId(h.proposer)),
        "state_root": h.state_root.hex(), "txs_hash": h.txs_hash.hex(),
        "validators_hash": h.validators_hash.hex(),
        # How long this node took to execute the block, if it did since it started.
        "apply_ms": None if h.height not in chain.apply_ms else round(chain.apply_ms[h.height], 3),
        "transactions": [{"tx_id": tx.tx_id.hex(), "sender": str(NodeId(tx.sender)),
                          "nonce": tx.nonce, "kind": tx.kind, "bytes": len(tx.encode()),
                          "ok": results[tx.tx_id] is None, "rejected": results[tx.tx_id]}
                         for tx in block.txs],
        "certificate": {
            "round": cert.round, "block_id": cert.block_id.hex(),
            "kind": "precommit",
            "power": sum(validators.power(v) for v, _ in cert.signatures),
            "total_power": validators.total,
            "signatures": [{"validator": str(NodeId(v)), "signature": s.hex()}
                           for v, s in cert.signatures]},
    }


__all__ = ["ChainNotReady", "ChainService", "GenesisError", "block_json", "load_genesis",
           "write_genesis"]
