"""The mempool: signed transactions waiting for a block, bounded, deduplicated and rate limited
per sender; it hands the proposer each sender's transactions in nonce order.

A transaction is admitted once (by id), only if its signature holds, its nonce is not already
used on chain, its sender is under its rate (a token bucket) and under its pending count, and
the pool is under its size bounds. `reap` takes, sender by sender in order of arrival, the run of
nonces that follows each sender's committed nonce, so a gap waits for the transaction that fills
it instead of failing in a block. `committed` drops what a block included or made stale.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from hmnode.errors import HmnodeError

from .messages import MessageRejected, Transaction, verify_tx


class TxRefused(HmnodeError):
    """A transaction the mempool will not hold; the message says why and what to do."""


@dataclass(frozen=True)
class MempoolLimits:
    """Bounds of the pool (CometBFT's defaults are 5,000 transactions and 1 GB)."""

    max_txs: int = 20_000
    max_bytes: int = 64 << 20
    max_per_sender: int = 4_096  # pending transactions of one sender
    sender_rate: float = 2_000.0  # transactions per second one sender may add, sustained
    sender_burst: float = 4_000.0
    max_senders_tracked: int = 10_000  # rate buckets kept (idle ones are dropped first)


@dataclass
class _Bucket:
    tokens: float
    at: float


class Mempool:
    """Pending transactions of one node (sans-IO: time is passed in)."""

    def __init__(self, chain_id: str, next_nonce: Callable[[bytes], int],
                 limits: MempoolLimits = MempoolLimits()) -> None:
        self.chain_id = chain_id
        self.limits = limits
        self._next_nonce = next_nonce
        self._by_id: dict[bytes, Transaction] = {}
        self._by_sender: OrderedDict[bytes, dict[int, Transaction]] = OrderedDict()
        self._committed_nonce: dict[bytes, int] = {}  # cache of next_nonce - 1
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()
        self._bytes = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._by_id

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def add(self, tx: Transaction, now: float) -> bool:
        """Admit `tx`; False if it is already here; TxRefused saying why it cannot be."""
        tid = tx.tx_id
        if tid in self._by_id:
            return False
        try:
            self._check_room(tx)
            # The signature before the rate: a forgery naming a sender must not spend its rate.
            verify_tx(tx, self.chain_id)
            self._charge(tx.sender, now)
        except (TxRefused, MessageRejected) as exc:
            self.refused += 1
            raise TxRefused(str(exc)) from None
        pending = self._by_sender.setdefault(tx.sender, {})
        pending[tx.nonce] = tx
        self._by_id[tid] = tx
        self._bytes += len(tx.encode())
        return True

    def _check_room(self, tx: Transaction) -> None:
        lim = self.limits
        if tx.nonce <= self._committed(tx.sender):
            raise TxRefused(f"nonce {tx.nonce} is already used; the sender's next is "
                            f"{self._committed(tx.sender) + 1}")
        pending = self._by_sender.get(tx.sender, {})
        if tx.nonce in pending:
            raise TxRefused(f"another transaction with nonce {tx.nonce} of this sender is "
                            "pending")
        if len(pending) >= lim.max_per_sender:
            raise TxRefused(f"the sender has {lim.max_per_sender} transactions pending; wait "
                            "for some to commit")
        if len(self._by_id) >= lim.max_txs or self._bytes + len(tx.encode()) > lim.max_bytes:
            raise TxRefused("the mempool is full; try again after the next block")
        if tx.nonce > self._committed(tx.sender) + lim.max_per_sender:
            raise TxRefused(f"nonce {tx.nonce} is too far ahead of the sender's next "
                            f"({self._committed(tx.sender) + 1})")

    def _charge(self, sender: bytes, now: float) -> None:
        lim = self.limits
        bucket = self._buckets.pop(sender, None) or _Bucket(lim.sender_burst, now)
        bucket.tokens = min(lim.sender_burst, bucket.tokens + (now - bucket.at) * lim.sender_rate)
        bucket.at = now
        self._buckets[sender] = bucket  # most recently used last
        while len(self._buckets) > lim.max_senders_tracked:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1.0:
            raise TxRefused(f"the sender is over {lim.sender_rate:g} transactions per second; "
                            "slow down")
        bucket.tokens -= 1.0

    def _committed(self, sender: bytes) -> int:
        # Cached only for senders with pending transactions (dropped with their last one), so
        # refused senders leave nothing behind.
        known = self._committed_nonce.get(sender)
        if known is not None:
            return known
        committed = self._next_nonce(sender) - 1
        if sender in self._by_sender:
            self._committed_nonce[sender] = committed
        return committed

    def pending_nonce(self, sender: bytes, nonce: int) -> bool:
        """Whether a transaction of `sender` with `nonce` is waiting here."""
        return nonce in self._by_sender.get(sender, {})

    def ready(self) -> bool:
        """Whether some sender has a transaction that can go into the next block."""
        return any(self._committed(s) + 1 in p for s, p in self._by_sender.items())

    def reap(self, max_txs: int, max_bytes: int) -> list[Transaction]:
        """Transactions for a block: each sender's run of consecutive nonces, senders in order
        of their first pending transaction."""
        out: list[Transaction] = []
        size = 0
        for sender, pending in self._by_sender.items():
            nonce = self._committed(sender) + 1
            while nonce in pending and len(out) < max_txs:
                tx = pending[nonce]
                n = len(tx.encode())
                if size + n > max_bytes:
                    return out
                out.append(tx)
                size += n
                nonce += 1
            if len(out) >= max_txs:
                break
        return out

    def committed(self, txs: tuple[Transaction, ...] | list[Transaction]) -> None:
        """A block committed `txs`: drop them, and whatever their nonces made stale."""
        floors: dict[bytes, int] = {}
        for tx in txs:
            floors[tx.sender] = max(floors.get(tx.sender, 0), tx.nonce)
        for sender, floor in floors.items():
            pending = self._by_sender.get(sender)
            if pending is None:
                continue
            self._committed_nonce[sender] = max(self._committed(sender), floor)
            for nonce in [n for n in pending if n <= floor]:
                self._drop(pending.pop(nonce))
            if not pending:
                del self._by_sender[sender]
                self._committed_nonce.pop(sender, None)

    def forget_nonces(self) -> None:
        """Re-read committed nonces from the chain (after block sync applied blocks we did not
        see as decisions)."""
        self._committed_nonce.clear()
        for sender in list(self._by_sender):
            pending = self._by_sender[sender]
            floor = self._committed(sender)
            for nonce in [n for n in pending if n <= floor]:
                self._drop(pending.pop(nonce))
            if not pending:
                del self._by_sender[sender]
                self._committed_nonce.pop(sender, None)

    def _drop(self, tx: Transaction) -> None:
        self._by_id.pop(tx.tx_id, None)
        self._bytes -= len(tx.encode())
