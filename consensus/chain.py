"""The committed chain in the node's store: genesis, blocks with their commit certificates,
the application state they produce, and the validator set of every epoch.

Each block is executed and committed in ONE write transaction: its transactions' effects, their
results, the senders' nonces, the block, its certificate, the new head and (at an epoch's last
block) the next validator set. A process killed at any instant therefore restarts either before
the block or after all of it.

The state root in each header is a hash chain over the state's changes:
root(h) = sha256(root(h-1), h, sha256(every write of block h, in order)). Two nodes with the
same root applied the same writes in the same order, so a follower that re-executes a
certified block and gets another root knows its state diverged. (It is not a Merkle tree: it
cannot prove one key to a light client; that is left for later.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from hmnode import schema
from hmnode.env import Storage, Txn
from hmnode.errors import HmnodeError, UsageError
from hmnode.identity import NodeId
from hmnode.schema import Table

from .messages import (MAX_BLOCK_BYTES, MAX_BLOCK_TXS, MAX_CHAIN_ID, MAX_VALIDATORS, Block,
                       CommitCertificate, Header, MessageRejected, Transaction, pack, sha256,
                       txs_hash, verify_tx)
from .validators import ValidatorSet

DEFAULT_EPOCH_BLOCKS = 100
APPLY_TIMES_KEPT = 256
MAX_FUTURE_MS = 10_000  # how far ahead of a validator's clock a proposed block's time may be


class ChainError(HmnodeError):
    """The chain cannot go on: a genesis mismatch or a certified block that this node's
    state cannot reproduce (its state diverged, or its store is damaged)."""


class GenesisError(UsageError):
    """A genesis file that cannot be read or does not describe a valid chain."""


@dataclass(frozen=True)
class Genesis:
    """What every node of one chain starts from; its hash is the id of height 0."""

    chain_id: str
    time_ms: int
    validators: ValidatorSet
    epoch_blocks: int = DEFAULT_EPOCH_BLOCKS
    app_state: Any = None

    def to_wire(self) -> list:
        return [self.chain_id, self.time_ms, [[k, p] for k, p in self.validators.members],
                self.epoch_blocks, self.app_state]

    @property
    def genesis_id(self) -> bytes:
        return sha256(pack(self.to_wire()))

    @classmethod
    def from_wire(cls, wire: Any) -> "Genesis":
        try:
            chain_id, time_ms, members, epoch, app_state = wire
            if not isinstance(chain_id, str) or not 0 < len(chain_id) <= MAX_CHAIN_ID:
                raise ValueError("chain_id is 1..64 characters")
            if not isinstance(epoch, int) or not 1 <= epoch <= 1_000_000:
                raise ValueError("epoch_blocks is 1..1000000")
            return cls(chain_id, int(time_ms), ValidatorSet.of((bytes(k), int(p)) for k, p in members),
                       epoch, app_state)
        except (ValueError, TypeError) as exc:
            raise GenesisError(f"not a valid genesis: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {"chain_id": self.chain_id, "time_ms": self.time_ms,
                "epoch_blocks": self.epoch_blocks, "app_state": self.app_state,
                "validators": self.validators.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> "Genesis":
        try:
            members = [(NodeId.parse(v["node_id"]).key, int(v["power"]))
                       for v in data["validators"]]
            return cls.from_wire([data["chain_id"], int(data["time_ms"]), members,
                                  int(data.get("epoch_blocks", DEFAULT_EPOCH_BLOCKS)),
                                  data.get("app_state")])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GenesisError(f"not a valid genesis: {exc}") from None


@dataclass(frozen=True)
class Head:
    """The last committed block: its height, id, state root and time (height 0: genesis)."""

    height: int
    block_id: bytes
    state_root: bytes
    time_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "block_id": self.block_id.hex(),
                "state_root": self.state_root.hex(), "time_ms": self.time_ms}


class Application(Protocol):
    """The deterministic state machine the chain orders transactions for."""

    def init(self, txn: Txn, genesis: "Genesis") -> None:
        """Write the genesis state (from `genesis.app_state`, and its validators)."""

    def check(self, txn: Txn, tx: Transaction) -> str | None:
        """Why `tx` can never apply (a malformed body, an unknown kind), or None; cheap, for
        the mempool. A transaction that passes may still be rejected when delivered."""

    def deliver(self, txn: Txn, tx: Transaction, height: int, time_ms: int) -> str | None:
        """Apply `tx` (signature and nonce already checked); None, or why it was rejected (a
        rejected transaction changes nothing but its sender's nonce)."""

    def end_block(self, txn: Txn, height: int) -> None:
        """After the block's transactions: what the application does once per block."""

    def validators(self, txn: Txn) -> list[tuple[bytes, int]] | None:
        """The validator set the application wants from the next epoch, or None to keep it."""


class _Rollback(Exception):
    """Aborts a speculative execution's write transaction, carrying its outcome."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome


_DELETED = object()  # a write log entry that deletes its key
SPECULATIONS_KEPT = 8


class RecordingTxn:
    """A write transaction that records every write, in order: hashed for the state root, and
    logged so that a block executed speculatively is committed without executing it again."""

    def __init__(self, txn: Txn) -> None:
        self._txn = txn
        self.writes = hashlib.sha256()
        self.log: list[tuple[Table, Any, Any]] = []

    def get(self, table: Table, key: Any, default: Any = None) -> Any:
        return self._txn.get(table, key, default)

    def put(self, table: Table, key: Any, record: Any) -> None:
        encoded = table.codec.encode(record)
        self.writes.update(pack([table.name, table.key.encode(key), encoded]))
        # The bytes, not the object: the caller may change the object after writing it.
        self.log.append((table, key, encoded))
        self._txn.put(table, key, record)

    def delete(self, table: Table, key: Any) -> bool:
        self.writes.update(pack([table.name, table.key.encode(key), None]))
        self.log.append((table, key, _DELETED))
        return self._txn.delete(table, key)

    def items(self, table: Table, reverse: bool = False) -> Iterator[tuple[Any, Any]]:
        return self._txn.items(table, reverse)

    def count(self, table: Table) -> int:
        return self._txn.count(table)


def read_head(tx: Txn) -> Head:
    """The last committed block as `tx` sees it (an application reads it while a block
    executes: the head is then the previous block)."""
    raw = tx.get(schema.CHAIN, schema.CHAIN_HEAD)
    if raw is None:
        raise ChainError("the chain has no genesis yet")
    return Head(*raw)


class Chain:
    """The chain as kept in one node's store, and the one place that executes blocks."""

    def __init__(self, storage: Storage, app: Application,
                 stopwatch: Callable[[], float] | None = None) -> None:
        self.storage = storage
        self.app = app
        # A clock in seconds to time block executions with (the driver's; none: untimed).
        self.stopwatch = stopwatch
        self.genesis: Genesis | None = None
        self._head: Head | None = None
        self._sets: dict[int, ValidatorSet] = {}
        # Blocks executed speculatively (proposed or checked): block id -> (the head they were
        # executed on, their write log, their state root).
        self._speculated: dict[bytes, tuple[bytes, list[tuple[Table, Any, Any]], bytes]] = {}
        # Wall milliseconds the newest block executions took, by height (its transactions and
        # end of block, as built, checked or synced): what the application costs per block.
        self.apply_ms: dict[int, float] = {}
        raw = storage.read(lambda tx: tx.get(schema.CHAIN, schema.CHAIN_GENESIS))
        if raw is not None:
            self.genesis = Genesis.from_wire(raw)

    # --- genesis and head -----------------------------------------------------------------------

    def init_genesis(self, genesis: Genesis) -> None:
        """Start the chain at `genesis`, or check that the store already holds that chain."""
        if self.genesis is not None:
            if self.genesis.genesis_id != genesis.genesis_id:
                raise ChainError(
                    f"this data dir holds chain {self.genesis.chain_id!r} "
                    f"({self.genesis.genesis_id.hex()[:16]}), not the genesis given "
                    f"({genesis.chain_id!r}, {genesis.genesis_id.hex()[:16]}); "
                    "use another --data-dir for another chain")
            return

        def write(tx: Txn) -> None:
            rec = RecordingTxn(tx)
            self.app.init(rec, genesis)
            root = hashlib.sha256(b"genesis" + genesis.genesis_id + rec.writes.digest()).digest()
            tx.put(schema.CHAIN, schema.CHAIN_GENESIS, genesis.to_wire())
            tx.put(schema.CHAIN, schema.CHAIN_HEAD,
                   [0, genesis.genesis_id, root, genesis.time_ms])
            tx.put(schema.VALIDATOR_SETS, 0, [[k, p] for k, p in genesis.validators.members])

        try:
            self.storage.write(write)
        except (ValueError, TypeError, KeyError) as exc:
            raise GenesisError(f"the genesis cannot start this chain: {exc}") from None
        self.storage.sync()
        self.genesis = genesis
        self._head = None

    @property
    def chain_id(self) -> str:
        return self.require_genesis().chain_id

    def require_genesis(self) -> Genesis:
        """The chain's genesis; ChainError before it has one."""
        if self.genesis is None:
            raise ChainError("the chain has no genesis yet")
        return self.genesis

    def head(self) -> Head:
        """The last committed block (cached; every commit goes through this object)."""
        if self._head is None:
            raw = self.storage.read(lambda tx: tx.get(schema.CHAIN, schema.CHAIN_HEAD))
            if raw is None:
                raise ChainError("the chain has no genesis yet")
            self._head = Head(*raw)
        return self._head

    def validators_at(self, height: int) -> ValidatorSet:
        """The set that certifies blocks at `height` (fixed for its whole epoch)."""
        epoch = (height - 1) // self.require_genesis().epoch_blocks
        if epoch not in self._sets:
            raw = self.storage.read(lambda tx: tx.get(schema.VALIDATOR_SETS, epoch))
            if raw is None:
                raise ChainError(f"no validator set for height {height} yet")
            self._sets[epoch] = ValidatorSet(tuple((bytes(k), int(p)) for k, p in raw))
        return self._sets[epoch]

    def next_nonce(self, sender: bytes) -> int:
        """The nonce `sender`'s next transaction must carry."""
        return self.storage.read(lambda tx: tx.get(schema.NONCES, sender, 0)) + 1

    # --- reading blocks -------------------------------------------------------------------------

    def block(self, height: int) -> tuple[Block, CommitCertificate] | None:
        """A committed block and its certificate, or None above the head."""
        def read(tx: Txn) -> tuple[Any, Any]:
            return tx.get(schema.BLOCKS, height), tx.get(schema.CERTIFICATES, height)
        raw_block, raw_cert = self.storage.read(read)
        if raw_block is None:
            return None
        return Block.decode(raw_block), CommitCertificate.decode(raw_cert)

    def raw_blocks(self, first: int, max_bytes: int, max_blocks: int) -> list[list[bytes]]:
        """Encoded (block, certificate) pairs from `first` on, for block sync."""
        def read(tx: Txn) -> list[list[bytes]]:
            out, size = [], 0
            for h in range(first, first + max_blocks):
                raw = tx.get(schema.BLOCKS, h)
                if raw is None or (out and size + len(raw) > max_bytes):
                    break
                cert = tx.get(schema.CERTIFICATES, h)
                out.append([raw, cert])
                size += len(raw) + len(cert)
            return out
        return self.storage.read(read)

    def tx_result(self, tx_id: bytes) -> list | None:
        """[height, index, why rejected or None] of a committed transaction."""
        return self.storage.read(lambda tx: tx.get(schema.TX_RESULTS, tx_id))

    def tx_results(self, tx_ids: list[bytes]) -> dict[bytes, list | None]:
        """`tx_result` of many transactions, in one read."""
        return self.storage.read(lambda tx: {t: tx.get(schema.TX_RESULTS, t) for t in tx_ids})

    # --- executing ------------------------------------------------------------------------------

    def build_block(self, height: int, proposer: bytes, time_ms: int,
                    candidates: list[Transaction]) -> Block:
        """A block of the candidates that apply in order (others are left out), with the state
        root they produce."""
        head = self.head()
        time_ms = max(time_ms, head.time_ms + 1)

        def run(tx: Txn) -> tuple[list[Transaction], bytes]:
            rec = RecordingTxn(tx)
            taken: list[Transaction] = []
            size = 0
            for t in candidates:
                size += len(t.encode())
                if len(taken) >= MAX_BLOCK_TXS or size > MAX_BLOCK_BYTES - 4096:
                    break
                if tx.get(schema.NONCES, t.sender, 0) + 1 != t.nonce:
                    size -= len(t.encode())
                    continue
                self._deliver(rec, t, height, time_ms, len(taken))
                taken.append(t)
            self._end_block(rec, height)
            return taken, self._root(head, height, rec), rec.log

        taken, root, log = self._speculate(run)
        txs = tuple(taken)
        header = Header(self.chain_id, height, time_ms, head.block_id, proposer, txs_hash(txs),
                        root, self.validators_at(height).hash)
        block = Block(header, txs)
        self._remember(block.block_id, head.block_id, log, root)
        return block

    def check_block(self, block: Block, now_ms: int | None,
                    verified: Callable[[bytes], bool] = lambda _: False) -> str | None:
        """Why `block` cannot be the next block, or None. `now_ms` (None when syncing old
        blocks) bounds how far in the future its time may be; `verified(tx_id)` says a
        transaction's signature was already checked."""
        head = self.head()
        h = block.header
        if h.chain_id != self.chain_id or h.height != head.height + 1:
            return f"not the next block of this chain (height {h.height}, head {head.height})"
        if h.prev_id != head.block_id:
            return "its previous block is not our head"
        if h.time_ms <= head.time_ms:
            return "its time is not after the previous block's"
        if now_ms is not None and h.time_ms > now_ms + MAX_FUTURE_MS:
            return "its time is too far in the future"
        if h.validators_hash != self.validators_at(h.height).hash:
            return "it names another validator set"
        if len(block.txs) > MAX_BLOCK_TXS or len(block.encode()) > MAX_BLOCK_BYTES:
            return "it is too large"
        seen: set[bytes] = set()
        for t in block.txs:
            tid = t.tx_id
            if tid in seen:
                return "a transaction appears twice"
            seen.add(tid)
            if not verified(tid):
                try:
                    verify_tx(t, self.chain_id)
                except MessageRejected as exc:
                    return str(exc)
        try:
            root, log = self._speculate(lambda tx: self._execute(tx, block))
        except MessageRejected as exc:
            return str(exc)
        if root != h.state_root:
            return "its state root is not what its transactions produce"
        self._remember(block.block_id, head.block_id, log, root)
        return None

    def _remember(self, block_id: bytes, head_id: bytes, log: list, root: bytes) -> None:
        if len(self._speculated) >= SPECULATIONS_KEPT:
            self._speculated.pop(next(iter(self._speculated)))
        self._speculated[block_id] = (head_id, log, root)

    def commit(self, block: Block, cert: CommitCertificate) -> Head:
        """Execute and store `block` with its certificate in one write transaction (and make it
        durable). The caller has checked the certificate; a state root that differs from the
        header's means this node's state diverged, and raises ChainError."""
        def write(tx: Txn) -> Head:
            head = self._read_head(tx)
            if block.height != head.height + 1 or block.header.prev_id != head.block_id:
                raise ChainError(f"block {block.height} does not follow the head {head.height}")
            known = self._speculated.get(block.block_id)
            if known is not None and known[0] == head.block_id:
                # Executed on this very state already: write what it wrote (the last write of
                # each key is what stays).
                last = {(table.name, key): (table, key, record) for table, key, record in known[1]}
                for table, key, encoded in last.values():
                    if encoded is _DELETED:
                        tx.delete(table, key)
                    else:
                        tx.put(table, key, table.codec.decode(encoded, table.name))
                root = known[2]
            else:
                root, _ = self._execute(tx, block)
            if root != block.header.state_root:
                raise ChainError(
                    f"block {block.height} is certified with state root "
                    f"{block.header.state_root.hex()[:16]}, but executing it here gives "
                    f"{root.hex()[:16]}: this node's state diverged; restore the data dir "
                    "from a healthy node")
            tx.put(schema.BLOCKS, block.height, block.encode())
            tx.put(schema.CERTIFICATES, block.height, cert.encode())
            new = Head(block.height, block.block_id, root, block.header.time_ms)
            tx.put(schema.CHAIN, schema.CHAIN_HEAD,
                   [new.height, new.block_id, new.state_root, new.time_ms])
            tx.delete(schema.SIGNER, schema.SIGNER_STATE)
            return new

        try:
            self._head = self.storage.write(write)
        except MessageRejected as exc:
            raise ChainError(f"certified block {block.height} does not execute: {exc}") from None
        self._speculated.clear()  # all of them were executed on the old head
        return self._head

    def _execute(self, tx: Txn, block: Block) -> tuple[bytes, list]:
        """Apply `block`'s transactions inside `tx`; returns the state root and write log."""
        started = self.stopwatch() if self.stopwatch is not None else None
        head = self._read_head(tx)
        rec = RecordingTxn(tx)
        for i, t in enumerate(block.txs):
            if tx.get(schema.NONCES, t.sender, 0) + 1 != t.nonce:
                raise MessageRejected(f"transaction {i} has nonce {t.nonce}, not the next one")
            self._deliver(rec, t, block.height, block.header.time_ms, i)
        self._end_block(rec, block.height)
        if self.stopwatch is not None and started is not None:
            self.apply_ms[block.height] = (self.stopwatch() - started) * 1000
            if len(self.apply_ms) > APPLY_TIMES_KEPT:
                del self.apply_ms[min(self.apply_ms)]
        return self._root(head, block.height, rec), rec.log

    def _deliver(self, rec: RecordingTxn, t: Transaction, height: int, time_ms: int,
                 index: int) -> None:
        rec.put(schema.NONCES, t.sender, t.nonce)
        why = self.app.check(rec, t) or self.app.deliver(rec, t, height, time_ms)
        rec.put(schema.TX_RESULTS, t.tx_id, [height, index, why])

    def _end_block(self, rec: RecordingTxn, height: int) -> None:
        self.app.end_block(rec, height)
        epoch_blocks = self.require_genesis().epoch_blocks
        if height % epoch_blocks:
            return
        wanted = self.app.validators(rec)
        if wanted:
            # At most MAX_VALIDATORS, the most powerful (ties by key), so no committed block can
            # leave the next epoch without a valid set.
            ranked = sorted(((k, p) for k, p in wanted if p > 0), key=lambda kp: (-kp[1], kp[0]))
            members = sorted(ranked[:MAX_VALIDATORS])
            if members:
                rec.put(schema.VALIDATOR_SETS, height // epoch_blocks,
                        [[k, p] for k, p in members])
                return
        rec.put(schema.VALIDATOR_SETS, height // epoch_blocks,
                rec.get(schema.VALIDATOR_SETS, (height - 1) // epoch_blocks))

    @staticmethod
    def _root(head: Head, height: int, rec: RecordingTxn) -> bytes:
        return hashlib.sha256(head.state_root + height.to_bytes(8, "big")
                              + rec.writes.digest()).digest()

    def _read_head(self, tx: Txn) -> Head:
        return read_head(tx)

    def _speculate(self, fn: Callable[[Txn], Any]) -> Any:
        """Run `fn` in a write transaction that is always rolled back; its outcome is what it
        returned or raised in `_Rollback`."""
        def run(tx: Txn) -> None:
            raise _Rollback(fn(tx))
        try:
            self.storage.write(run)
        except _Rollback as rb:
            return rb.outcome
        raise AssertionError("unreachable")

    def evidence_count(self) -> int:
        """How many equivocations this node has kept evidence of."""
        return self.storage.read(lambda tx: tx.count(schema.EVIDENCE))
