"""A node's part in the chain: its consensus engine, mempool, block sync and committed chain,
driven through an `Env` (so the simulator runs exactly this code).

Validators run `Tendermint` for the height above their head and send its proposals and votes
to every validator; every node keeps the committed chain (`Chain`). A node behind (a follower,
or a validator that was away) asks a validator for blocks with their commit certificates and
checks each certificate before it applies the block. Transactions submitted to any node go to
every validator's mempool.

Messages (topic: body):
- `chain.consensus`: {"msgs": [["p", proposal] | ["v", vote], ...]} (encoded, signed)
- `chain.txs`: {"txs": [transaction, ...]}
- `chain.sync`: {"from": height}, answered by `chain.blocks`: {"blocks": [[block, cert], ...]}
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from hmnode import schema
from hmnode.consensus.chain import Chain, ChainError, Head
from hmnode.consensus.mempool import Mempool, MempoolLimits, TxRefused
from hmnode.consensus.messages import (MAX_BLOCK_BYTES, PRECOMMIT, Block, CommitCertificate,
                                       Equivocation, MessageRejected, Proposal, Transaction,
                                       Vote, sign_tx)
from hmnode.consensus.tendermint import Message, SignerState, Tendermint, Timeouts
from hmnode.consensus.validators import ValidatorSet
from hmnode.env import Env, Timer, Txn
from hmnode.identity import NodeId, NodeKey
from hmnode.transport.wire import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

TOPICS = ("chain.consensus", "chain.txs", "chain.sync", "chain.blocks")
MAX_TXS_PER_MESSAGE = 1024
MAX_MSGS_PER_MESSAGE = 256
EVIDENCE_KEPT = 10_000


@dataclass(frozen=True)
class ChainConfig:
    """How a node runs the chain."""

    timeouts: Timeouts = Timeouts(propose_s=2.0)
    # An empty block this long after the last block when no transaction comes (None: never).
    empty_block_s: float | None = 60.0
    # Smaller blocks than the format allows: a proposal must reach every validator and be
    # checked well within the propose timeout, also on a busy machine.
    max_block_txs: int = 500
    tx_flush_s: float = 0.005  # outgoing transactions are batched this long
    sync_poll_s: float = 2.0  # how often a node asks a validator whether it is behind
    sync_max_blocks: int = 64
    # One answer must fit in one transport frame (the first block always goes, and a block
    # is at most MAX_BLOCK_BYTES).
    sync_max_bytes: int = MAX_FRAME_BYTES - (128 << 10)
    # A message for the next height starts a block sync only if we are still behind this long
    # later (we are usually about to commit that block ourselves).
    behind_grace_s: float = 0.5
    buffered_future: int = 1_024  # messages for the next height held until we get there
    mempool: MempoolLimits = MempoolLimits()


class ChainObserver(Protocol):
    """What the driver hears from the chain."""

    def block_committed(self, block: Block, cert: CommitCertificate, head: Head,
                        now: float) -> None: ...


class ChainNode:
    """The chain as run by one node (validator or follower)."""

    def __init__(self, key: NodeKey, env: Env, chain: Chain, config: ChainConfig = ChainConfig(),
                 observer: ChainObserver | None = None) -> None:
        self.key = key
        self.me = key.node_id
        self.env = env
        self.chain = chain
        self.config = config
        self.observer = observer
        self.mempool = Mempool(chain.chain_id, chain.next_nonce, config.mempool)
        self.engine: Tendermint | None = None
        self.halted: str | None = None
        self.last_commit_ms: float | None = None
        self.last_commit_at: float | None = None
        self.counters: dict[str, int] = {}
        self._future: deque[tuple[NodeId, Message]] = deque(maxlen=config.buffered_future)
        self._outgoing_txs: list[bytes] = []
        self._timers: dict[str, Timer] = {}
        self._height_since = 0.0
        self._ahead_since: float | None = None  # when a message for the next height came
        self._woken_at: float | None = None
        self._last_sync_ask = float("-inf")
        self._last_served: dict[NodeId, float] = {}
        self._evidence_seen: set[bytes] = set()
        self._reported: set[bytes] = set()  # offenders this node asked the chain to punish
        self._running = False

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume from the store: the engine for the height above the head, with whatever this
        validator signed there before it stopped."""
        self._running = True
        self._new_height(self.env.clock.now())
        self._every_poll()

    def stop(self) -> None:
        self._running = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    @property
    def head(self) -> Head:
        return self.chain.head()

    def is_validator(self) -> bool:
        return self.me.key in self.chain.validators_at(self.head.height + 1)

    # --- inputs ---------------------------------------------------------------------------------

    def submit(self, tx: Transaction) -> bool:
        """A transaction from a local client; False if already pending, TxRefused if refused."""
        taken = self.submit_many([tx])[0]
        if isinstance(taken, TxRefused):
            raise taken
        return taken

    def sign_and_submit(self, kind: str, body: Any) -> Transaction:
        """A transaction of this node's own, with its next free nonce; TxRefused if refused."""
        nonce = self.chain.next_nonce(self.me.key)
        while self.mempool.pending_nonce(self.me.key, nonce):
            nonce += 1
        tx = sign_tx(self.key, self.chain.chain_id, nonce, kind, body)
        self.submit(tx)
        return tx

    def submit_many(self, txs: list[Transaction]) -> list[bool | TxRefused]:
        """Transactions from local clients, each taken (True), already pending (False) or
        refused (its TxRefused); the proposer hears of them once, after all are in."""
        now = self.env.clock.now()
        out: list[bool | TxRefused] = []
        for tx in txs:
            try:
                fresh = self.mempool.add(tx, now)
            except TxRefused as exc:
                out.append(exc)
                continue
            if fresh:
                self._queue_tx(tx)
            out.append(fresh)
        self._maybe_wake()
        return out

    def receive(self, src: NodeId, topic: str, body: Any) -> None:
        """A message from a peer (already authenticated as `src` by the transport)."""
        if not self._running or self.halted:
            return
        try:
            if topic == "chain.consensus":
                self._take_consensus(src, body)
            elif topic == "chain.txs":
                self._take_txs(src, body)
            elif topic == "chain.sync":
                self._serve_sync(src, body)
            elif topic == "chain.blocks":
                self._take_blocks(src, body)
        except MessageRejected as exc:
            self._misbehaved(src, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            self._misbehaved(src, f"malformed {topic} ({exc})")

    def _take_consensus(self, src: NodeId, body: Any) -> None:
        msgs = body["msgs"]
        if not isinstance(msgs, list) or len(msgs) > MAX_MSGS_PER_MESSAGE:
            raise MessageRejected("chain.consensus: msgs is not a bounded list")
        now = self.env.clock.now()
        for item in msgs:
            try:
                kind, raw = item
                msg: Message = Proposal.decode(raw) if kind == "p" else Vote.decode(raw)
                if msg.chain_id != self.chain.chain_id:
                    raise MessageRejected("a consensus message for another chain")
            except (MessageRejected, ValueError, TypeError) as exc:
                self._misbehaved(src, f"chain.consensus: {exc}")
                continue  # the others in the batch stand on their own signatures
            height = self.head.height + 1
            if msg.height < height:
                # A peer still voting at a height we committed. Not for a late precommit: that
                # is usually the last vote of a peer that committed too.
                if not (isinstance(msg, Vote) and msg.kind == PRECOMMIT):
                    self._help_behind(src, msg.height)
            elif msg.height > height:
                if msg.height == height + 1:
                    self._future.append((src, msg))
                    if self._ahead_since is None:
                        self._ahead_since = now
                if msg.height > height + 1 or now - self._ahead_since > self.config.behind_grace_s:
                    self._ask_sync(src, now)
            elif self.engine is not None:
                why = self.engine.receive(msg, now)
                if why is not None:
                    self._count("consensus_rejected")
                    if "signature" in why:
                        self._misbehaved(src, why)
        self._drain(now)

    def _take_txs(self, src: NodeId, body: Any) -> None:
        txs = body["txs"]
        if not isinstance(txs, list) or len(txs) > MAX_TXS_PER_MESSAGE:
            raise MessageRejected("chain.txs: txs is not a bounded list")
        now = self.env.clock.now()
        forward = not self.is_validator()
        for raw in txs:
            tx = Transaction.decode(raw)
            try:
                if self.mempool.add(tx, now) and forward:
                    self._queue_tx(tx)
            except TxRefused as exc:
                self._count("tx_refused")
                if "signature" in str(exc) or "another chain" in str(exc):
                    raise MessageRejected(str(exc)) from None
        self._maybe_wake()

    # --- consensus ------------------------------------------------------------------------------

    def _new_height(self, now: float) -> None:
        """Start the engine for the height above the head (none for a follower)."""
        self._timers.pop("engine", _NoTimer()).cancel()
        if self.halted:
            return
        head = self.head
        height = head.height + 1
        self._height_since = now
        self._woken_at = None
        self._ahead_since = None
        validators = self.chain.validators_at(height)
        if self.me.key not in validators:
            self.engine = None
            return
        raw = self.env.storage.read(lambda tx: tx.get(schema.SIGNER, schema.SIGNER_STATE))
        restored = None
        if raw is not None:
            try:
                restored = SignerState.from_wire(raw)
            except MessageRejected as exc:
                raise ChainError(f"the stored signer state is damaged ({exc}); this validator "
                                 "cannot vote safely") from None
        self.engine = Tendermint(self.chain.chain_id, height, validators, self.key,
                                 self.config.timeouts, self._make_block, self._check_block,
                                 now, restored)
        if not self.engine.waiting:
            self._woken_at = now
        pending = [(s, m) for s, m in self._future if m.height == height]
        self._future = deque((p for p in self._future if p[1].height > height),
                             maxlen=self.config.buffered_future)
        for _, msg in pending:
            self.engine.receive(msg, now)
        self._drain(now)
        self._maybe_wake()

    def _make_block(self, height: int, round_: int) -> Block:
        txs = self.mempool.reap(self.config.max_block_txs, MAX_BLOCK_BYTES - 8192)
        return self.chain.build_block(height, self.me.key, int(self.env.clock.now() * 1000), txs)

    def _check_block(self, block: Block) -> str | None:
        return self.chain.check_block(block, int(self.env.clock.now() * 1000),
                                      verified=self.mempool.__contains__)

    def _maybe_wake(self) -> None:
        engine = self.engine
        if engine is None or not engine.waiting or self.halted:
            return
        now = self.env.clock.now()
        empty_due = self.config.empty_block_s is not None and \
            now - self._height_since >= self.config.empty_block_s
        if self.mempool.ready() or empty_due:
            self._woken_at = now
            engine.wake(now)
            self._drain(now)

    def _drain(self, now: float) -> None:
        """Act on what the engine produced: persist, commit, send; then re-arm its timer."""
        engine = self.engine
        if engine is None:
            return
        if self._woken_at is None and not engine.waiting:
            self._woken_at = now
        ready = engine.ready()
        self._keep_evidence(ready.evidence)
        if ready.decided is not None:
            # Commit (durably) before sending what this step signed: once the block is ours
            # this validator never votes at its height again, so its lock there is moot.
            block, cert = ready.decided
            validators = engine.validators
            self._commit(block, cert, now)
            self._broadcast(ready.messages, validators)
            return
        if ready.persist is not None:
            wire = ready.persist.to_wire()
            self.env.storage.write(lambda tx: tx.put(schema.SIGNER, schema.SIGNER_STATE, wire))
            self.env.storage.sync()
        self._broadcast(ready.messages)
        self._arm("engine", engine.next_deadline(), self._engine_tick)

    def _engine_tick(self) -> None:
        if self.engine is not None and self._running and not self.halted:
            now = self.env.clock.now()
            self.engine.tick(now)
            self._drain(now)

    def _commit(self, block: Block, cert: CommitCertificate, now: float) -> None:
        try:
            head = self.chain.commit(block, cert)
        except ChainError as exc:
            self._halt(str(exc))
            return
        self.env.storage.sync()
        if self._woken_at is not None:
            self.last_commit_ms = (now - self._woken_at) * 1000
        self.last_commit_at = now
        self.mempool.committed(block.txs)
        self._count("blocks_committed")
        if self.observer is not None:
            self.observer.block_committed(block, cert, head, now)
        self._new_height(now)

    def _broadcast(self, msgs: list[Message], validators: ValidatorSet | None = None) -> None:
        if not msgs:
            return
        wire = [["p" if isinstance(m, Proposal) else "v", m.encode()] for m in msgs]
        validators = validators or self.chain.validators_at(self.head.height + 1)
        for start in range(0, len(wire), MAX_MSGS_PER_MESSAGE):
            body = {"msgs": wire[start:start + MAX_MSGS_PER_MESSAGE]}
            for key, _ in validators.members:
                if key != self.me.key:
                    self.env.net.send(NodeId(key), None, "chain.consensus", body)

    def _report(self, evidence: Equivocation) -> None:
        """Ask the chain to punish an equivocation (once per offender: the first proof is
        enough to jail it, and more would only flood the mempool)."""
        offender = evidence.first.validator
        if offender in self._reported or not self.is_validator():
            return
        self._reported.add(offender)
        try:
            self.sign_and_submit("stake.slash", {"evidence": evidence.encode()})
            self._count("equivocations_reported")
        except TxRefused as exc:
            log.warning("cannot report an equivocation: %s", exc)

    def _keep_evidence(self, evidence: list[Equivocation]) -> None:
        fresh = [e for e in evidence if e.evidence_id not in self._evidence_seen]
        if not fresh:
            return

        def write(tx: Txn) -> None:
            for ev in fresh:
                if tx.count(schema.EVIDENCE) < EVIDENCE_KEPT:
                    tx.put(schema.EVIDENCE, ev.evidence_id, ev.encode())
        self.env.storage.write(write)
        if len(self._evidence_seen) > EVIDENCE_KEPT:
            self._evidence_seen.clear()  # only saves re-writing evidence already stored
        for ev in fresh:
            self._evidence_seen.add(ev.evidence_id)
            self._count("equivocations")
            self._report(ev)
            log.warning("validator %s equivocated at height %d round %d",
                        NodeId(ev.first.validator).short(), ev.first.height, ev.first.round,
                        extra={"event": "equivocation", "validator": str(NodeId(ev.first.validator)),
                               "height": ev.first.height})

    # --- transactions out -----------------------------------------------------------------------

    def _queue_tx(self, tx: Transaction) -> None:
        self._outgoing_txs.append(tx.encode())
        if "txs" not in self._timers:
            self._arm("txs", self.env.clock.now() + self.config.tx_flush_s, self._flush_txs)

    def _flush_txs(self) -> None:
        self._timers.pop("txs", None)
        batch, self._outgoing_txs = self._outgoing_txs, []
        validators = self.chain.validators_at(self.head.height + 1)
        for start in range(0, len(batch), MAX_TXS_PER_MESSAGE):
            body = {"txs": batch[start:start + MAX_TXS_PER_MESSAGE]}
            for key, _ in validators.members:
                if key != self.me.key:
                    self.env.net.send(NodeId(key), None, "chain.txs", body)

    # --- block sync -----------------------------------------------------------------------------

    def _every_poll(self) -> None:
        if not self._running:
            return
        now = self.env.clock.now()
        validators = [NodeId(k) for k, _ in self.chain.validators_at(self.head.height + 1).members
                      if k != self.me.key]
        idle = self.engine is None or self.engine.waiting or \
            now - self._height_since > 4 * self.config.timeouts.propose_s
        if validators and idle:
            self._ask_sync(self.env.rng.choice(validators), now, force=True)
        self._maybe_wake()
        self._arm("poll", now + self.config.sync_poll_s, self._every_poll)

    def _ask_sync(self, peer: NodeId, now: float, force: bool = False) -> None:
        if not force and now - self._last_sync_ask < 0.5:
            return
        self._last_sync_ask = now
        self.env.net.send(peer, None, "chain.sync", {"from": self.head.height + 1})

    def _serve_sync(self, src: NodeId, body: Any) -> None:
        first = body["from"]
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise MessageRejected("chain.sync: from is not a height")
        blocks = self.chain.raw_blocks(first, self.config.sync_max_bytes,
                                       self.config.sync_max_blocks)
        self.env.net.send(src, None, "chain.blocks", {"blocks": blocks})

    def _help_behind(self, peer: NodeId, height: int) -> None:
        """A validator still voting at a height we committed: send it the blocks it lacks."""
        now = self.env.clock.now()
        if now - self._last_served.get(peer, float("-inf")) < 1.0:
            return
        self._last_served[peer] = now
        if len(self._last_served) > 1024:
            self._last_served.clear()
        self._serve_sync(peer, {"from": height})

    def _take_blocks(self, src: NodeId, body: Any) -> None:
        pairs = body["blocks"]
        if not isinstance(pairs, list) or len(pairs) > self.config.sync_max_blocks:
            raise MessageRejected("chain.blocks: blocks is not a bounded list")
        now = self.env.clock.now()
        applied: list[tuple[Block, CommitCertificate, Head]] = []
        for raw_block, raw_cert in pairs:
            block, cert = Block.decode(raw_block), CommitCertificate.decode(raw_cert)
            head = self.head
            if block.height <= head.height:
                continue
            if block.height != head.height + 1:
                break
            self.chain.validators_at(block.height).check_certificate(
                cert, self.chain.chain_id, block.height, block.block_id)
            if block.header.prev_id != head.block_id:
                raise MessageRejected(f"block {block.height} does not follow our head")
            try:
                new_head = self.chain.commit(block, cert)
            except ChainError as exc:
                self._halt(str(exc))
                break
            applied.append((block, cert, new_head))
            self.mempool.committed(block.txs)
            self._count("blocks_synced")
        if applied:
            self.env.storage.sync()  # durable before anyone hears of it
            if self.observer is not None:
                for block, cert, new_head in applied:
                    self.observer.block_committed(block, cert, new_head, now)
            self.mempool.forget_nonces()
            self.last_commit_at = now
            self._new_height(now)
            if len(pairs) == self.config.sync_max_blocks:
                self._ask_sync(src, now, force=True)

    # --- helpers --------------------------------------------------------------------------------

    def _arm(self, name: str, when: float, fn: Callable[[], None]) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        if self._running:
            self._timers[name] = self.env.clock.call_at(when, fn)

    def _halt(self, why: str) -> None:
        self.halted = why
        self.engine = None
        log.error("the chain halted: %s", why, extra={"event": "chain_halted"})

    def _misbehaved(self, peer: NodeId, why: str) -> None:
        self._count("misbehaved")
        self.env.net.misbehaved(peer, why)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def describe(self) -> dict[str, Any]:
        """The chain as `hmnode status` shows it."""
        head = self.head
        validators = self.chain.validators_at(head.height + 1)
        out: dict[str, Any] = {
            "chain_id": self.chain.chain_id, "height": head.height,
            "block_id": head.block_id.hex(), "state_root": head.state_root.hex(),
            "validators": validators.to_json(), "is_validator": self.me.key in validators,
            "last_commit_ms": None if self.last_commit_ms is None else round(self.last_commit_ms, 1),
            "last_commit_at": self.last_commit_at, "mempool": len(self.mempool),
            "halted": self.halted, "evidence": self.chain.evidence_count(),
            "apply_ms_p50": _median(self.chain.apply_ms.values()),
            "counters": dict(self.counters),
        }
        if self.engine is not None:
            out["consensus"] = self.engine.describe()
        return out


def _median(values: Iterable[float]) -> float | None:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 3) if ordered else None


class _NoTimer:
    def cancel(self) -> None:
        pass
