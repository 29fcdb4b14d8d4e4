"""The consensus wire schema: signed transactions, blocks, proposals, votes, commit
certificates and equivocation evidence, with their canonical bytes and bounded decoders.

Everything here is a frozen dataclass with `to_wire()` (a msgpack array of fixed layout) and a
`from_wire()` that checks every field's type and bound; `encode()`/`decode()` give the bytes.
Every signature covers a domain tag and the chain id, so a vote, a proposal or a transaction
signed for one purpose or one chain is worthless for another. Decoding never verifies a
signature (that needs the validator set); `verify_*` does, and raises `MessageRejected`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgpack

from hmnode.errors import HmnodeError
from hmnode.identity import NodeId, NodeKey, verify

ID_BYTES = 32
SIG_BYTES = 64
MAX_CHAIN_ID = 64
MAX_TX_BYTES = 4096  # one encoded transaction
MAX_TX_KIND = 32
MAX_BLOCK_TXS = 2048
MAX_BLOCK_BYTES = 768 << 10  # under the transport's 1 MiB frame, with room for the envelope
MAX_VALIDATORS = 256
MAX_ROUND = 1 << 30
MAX_HEIGHT = (1 << 62) - 1
NIL = b""  # the block id of a vote for nothing

PREVOTE = 1
PRECOMMIT = 2
VOTE_KINDS = {PREVOTE: "prevote", PRECOMMIT: "precommit"}

_TX_TAG = "hmnode-tx-v1"
_PROPOSAL_TAG = "hmnode-proposal-v1"
_VOTE_TAG = "hmnode-vote-v1"


class MessageRejected(HmnodeError):
    """A consensus message or transaction that is malformed, badly signed or out of bounds."""


def pack(value: Any) -> bytes:
    """Canonical msgpack bytes (bin for bytes, no maps with unsorted keys in signed data)."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: Any, what: str, limit: int) -> Any:
    """Bounded msgpack decoding; MessageRejected for anything malformed or too large."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > limit:
        raise MessageRejected(f"{what}: not bytes of at most {limit}")
    try:
        return msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True,
                               max_bin_len=limit, max_str_len=limit,
                               max_array_len=MAX_BLOCK_TXS + 16, max_map_len=256)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise MessageRejected(f"{what}: not valid msgpack ({exc})") from None


def sha256(data: bytes) -> bytes:
    """SHA-256 of `data` (block ids, transaction ids)."""
    return hashlib.sha256(data).digest()


class _Fields:
    """Reads a wire array field by field, refusing wrong types, bounds and lengths."""

    def __init__(self, wire: Any, n: int, what: str) -> None:
        if not isinstance(wire, list) or len(wire) != n:
            raise MessageRejected(f"{what}: expected an array of {n} fields")
        self.wire = wire
        self.what = what
        self.i = 0

    def _next(self, name: str) -> Any:
        value = self.wire[self.i]
        self.i += 1
        return value

    def int(self, name: str, lo: int, hi: int) -> int:
        value = self._next(name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise MessageRejected(f"{self.what}: {name} is not an integer in {lo}..{hi}")
        return value

    def bytes(self, name: str, lengths: tuple[int, ...] | None = None, limit: int = 1 << 20) -> bytes:
        value = self._next(name)
        if not isinstance(value, bytes) or len(value) > limit or (
                lengths is not None and len(value) not in lengths):
            raise MessageRejected(f"{self.what}: {name} is not bytes of the right length")
        return value

    def str(self, name: str, limit: int) -> str:
        value = self._next(name)
        if not isinstance(value, str) or not 0 < len(value) <= limit:
            raise MessageRejected(f"{self.what}: {name} is not text of 1..{limit} characters")
        return value

    def list(self, name: str, limit: int) -> list:
        value = self._next(name)
        if not isinstance(value, list) or len(value) > limit:
            raise MessageRejected(f"{self.what}: {name} is not a list of at most {limit}")
        return value


# --- transactions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Transaction:
    """A signed instruction to the replicated state machine. `nonce` counts the sender's
    transactions from 1, so each one applies once and in the order its sender meant."""

    chain_id: str
    sender: bytes
    nonce: int
    kind: str
    body: bytes  # the application's payload (msgpack), opaque to consensus
    signature: bytes = field(default=b"", compare=False)

    def signed_bytes(self) -> bytes:
        return pack([_TX_TAG, self.chain_id, self.sender, self.nonce, self.kind, self.body])

    def to_wire(self) -> list:
        return [self.chain_id, self.sender, self.nonce, self.kind, self.body, self.signature]

    def encode(self) -> bytes:
        return self.encoded

    @cached_property
    def encoded(self) -> bytes:
        return pack(self.to_wire())

    @cached_property
    def tx_id(self) -> bytes:
        return sha256(self.encoded)

    @cached_property
    def payload(self) -> Any:
        """The body decoded (bounded), or None when it is not valid msgpack; decoded once, as
        a block's transactions are executed more than once."""
        try:
            return unpack(self.body, "transaction body", MAX_TX_BYTES)
        except MessageRejected:
            return None

    @classmethod
    def from_wire(cls, wire: Any) -> "Transaction":
        f = _Fields(wire, 6, "transaction")
        return cls(f.str("chain id", MAX_CHAIN_ID), f.bytes("sender", (ID_BYTES,)),
                   f.int("nonce", 1, MAX_HEIGHT), f.str("kind", MAX_TX_KIND),
                   f.bytes("body", limit=MAX_TX_BYTES), f.bytes("signature", (SIG_BYTES,)))

    @classmethod
    def decode(cls, data: Any) -> "Transaction":
        return cls.from_wire(unpack(data, "transaction", MAX_TX_BYTES))


def sign_tx(key: NodeKey, chain_id: str, nonce: int, kind: str, body: Any) -> Transaction:
    """A transaction of `kind` with `body` (any msgpack value), signed by `key`."""
    unsigned = Transaction(chain_id, key.node_id.key, nonce, kind, pack(body))
    tx = Transaction(chain_id, unsigned.sender, nonce, kind, unsigned.body,
                     key.sign(unsigned.signed_bytes()))
    if len(tx.encode()) > MAX_TX_BYTES:
        raise MessageRejected(f"transaction: over {MAX_TX_BYTES} bytes encoded; send less per "
                              "transaction")
    return tx


def verify_tx(tx: Transaction, chain_id: str) -> None:
    """Refuse a transaction for another chain or with a bad signature."""
    if tx.chain_id != chain_id:
        raise MessageRejected(f"transaction for chain {tx.chain_id!r}, not {chain_id!r}")
    if not verify(NodeId(tx.sender), tx.signed_bytes(), tx.signature):
        raise MessageRejected("transaction: bad signature")


# --- blocks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What a block commits to; its hash is the block id that votes name."""

    chain_id: str
    height: int
    time_ms: int  # the proposer's clock; checked only to be after the previous block's
    prev_id: bytes  # the previous block's id (the genesis id at height 1)
    proposer: bytes
    txs_hash: bytes  # sha256 over the transactions' ids in order
    state_root: bytes  # the application state after this block's transactions
    validators_hash: bytes  # the validator set that must certify this block

    def to_wire(self) -> list:
        return [self.chain_id, self.height, self.time_ms, self.prev_id, self.proposer,
                self.txs_hash, self.state_root, self.validators_hash]

    @classmethod
    def from_wire(cls, wire: Any) -> "Header":
        f = _Fields(wire, 8, "block header")
        return cls(f.str("chain id", MAX_CHAIN_ID), f.int("height", 1, MAX_HEIGHT),
                   f.int("time", 0, 1 << 53), f.bytes("previous id", (ID_BYTES,)),
                   f.bytes("proposer", (ID_BYTES,)), f.bytes("txs hash", (ID_BYTES,)),
                   f.bytes("state root", (ID_BYTES,)), f.bytes("validators hash", (ID_BYTES,)))

    @cached_property
    def block_id(self) -> bytes:
        return sha256(pack(self.to_wire()))


def txs_hash(txs: tuple[Transaction, ...]) -> bytes:
    """The header's commitment to a block's transactions, in order."""
    h = hashlib.sha256(b"txs")
    for tx in txs:
        h.update(tx.tx_id)
    return h.digest()


@dataclass(frozen=True)
class Block:
    """A header and the transactions it commits to."""

    header: Header
    txs: tuple[Transaction, ...]

    @property
    def block_id(self) -> bytes:
        return self.header.block_id

    @property
    def height(self) -> int:
        return self.header.height

    def to_wire(self) -> list:
        return [self.header.to_wire(), [tx.to_wire() for tx in self.txs]]

    def encode(self) -> bytes:
        return self.encoded

    @cached_property
    def encoded(self) -> bytes:
        # Blocks travel in proposals, signer states and the store: encode each one once.
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls, wire: Any) -> "Block":
        f = _Fields(wire, 2, "block")
        header = Header.from_wire(f.list("header", 8))
        txs = tuple(Transaction.from_wire(t) for t in f.list("transactions", MAX_BLOCK_TXS))
        block = cls(header, txs)
        if txs_hash(txs) != header.txs_hash:
            raise MessageRejected("block: the transactions do not match the header's hash")
        return block

    @classmethod
    def decode(cls, data: Any) -> "Block":
        return cls.from_wire(unpack(data, "block", MAX_BLOCK_BYTES))


# --- proposals and votes --------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    """A proposer's signed offer of `block` for (height, round); `valid_round` is the round in
    which the proposer saw a quorum prevote it (-1 if none), as Tendermint's algorithm has it."""

    chain_id: str
    height: int
    round: int
    valid_round: int
    block: Block
    proposer: bytes
    signature: bytes = field(default=b"", compare=False)

    def signed_bytes(self) -> bytes:
        return pack([_PROPOSAL_TAG, self.chain_id, self.height, self.round, self.valid_round,
                     self.block.block_id, self.proposer])

    def to_wire(self) -> list:
        return [self.chain_id, self.height, self.round, self.valid_round, self.block.encode(),
                self.proposer, self.signature]

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls, wire: Any) -> "Proposal":
        f = _Fields(wire, 7, "proposal")
        proposal = cls(f.str("chain id", MAX_CHAIN_ID), f.int("height", 1, MAX_HEIGHT),
                       f.int("round", 0, MAX_ROUND), f.int("valid round", -1, MAX_ROUND),
                       Block.decode(f.bytes("block", limit=MAX_BLOCK_BYTES)),
                       f.bytes("proposer", (ID_BYTES,)),
                       f.bytes("signature", (SIG_BYTES,)))
        if proposal.valid_round >= proposal.round:
            raise MessageRejected("proposal: its valid round is not before its round")
        # The block's own proposer may be another validator: a proposer re-proposes the block
        # an earlier round found valid, unchanged.
        if proposal.block.height != proposal.height:
            raise MessageRejected("proposal: its block is for another height")
        return proposal

    @classmethod
    def decode(cls, data: Any) -> "Proposal":
        return cls.from_wire(unpack(data, "proposal", MAX_BLOCK_BYTES + 1024))


@dataclass(frozen=True)
class Vote:
    """A validator's signed prevote or precommit for a block id (NIL: for no block)."""

    chain_id: str
    kind: int
    height: int
    round: int
    block_id: bytes
    validator: bytes
    signature: bytes = field(default=b"", compare=False)

    def signed_bytes(self) -> bytes:
        return vote_bytes(self.chain_id, self.kind, self.height, self.round, self.block_id)

    def to_wire(self) -> list:
        return [self.chain_id, self.kind, self.height, self.round, self.block_id,
                self.validator, self.signature]

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls, wire: Any) -> "Vote":
        f = _Fields(wire, 7, "vote")
        chain_id = f.str("chain id", MAX_CHAIN_ID)
        kind = f.int("kind", PREVOTE, PRECOMMIT)
        return cls(chain_id, kind, f.int("height", 1, MAX_HEIGHT), f.int("round", 0, MAX_ROUND),
                   f.bytes("block id", (0, ID_BYTES)), f.bytes("validator", (ID_BYTES,)),
                   f.bytes("signature", (SIG_BYTES,)))

    @classmethod
    def decode(cls, data: Any) -> "Vote":
        return cls.from_wire(unpack(data, "vote", 512))


def vote_bytes(chain_id: str, kind: int, height: int, round_: int, block_id: bytes) -> bytes:
    """What a validator signs to vote; a commit certificate's signatures are over these too."""
    return pack([_VOTE_TAG, chain_id, kind, height, round_, block_id])


def sign_vote(key: NodeKey, chain_id: str, kind: int, height: int, round_: int,
              block_id: bytes) -> Vote:
    """`key`'s vote of `kind` for `block_id` at (height, round)."""
    return Vote(chain_id, kind, height, round_, block_id, key.node_id.key,
                key.sign(vote_bytes(chain_id, kind, height, round_, block_id)))


def sign_proposal(key: NodeKey, height: int, round_: int, valid_round: int,
                  block: Block) -> Proposal:
    """`key`'s proposal of `block` at (height, round)."""
    unsigned = Proposal(block.header.chain_id, height, round_, valid_round, block,
                        key.node_id.key)
    return Proposal(unsigned.chain_id, height, round_, valid_round, block, unsigned.proposer,
                    key.sign(unsigned.signed_bytes()))


# --- certificates and evidence ----------------------------------------------------------------


@dataclass(frozen=True)
class CommitCertificate:
    """Precommits for one block from validators holding more than 2/3 of the stake: the proof
    that the block is final, which any node can check against the validator set."""

    chain_id: str
    height: int
    round: int
    block_id: bytes
    signatures: tuple[tuple[bytes, bytes], ...]  # (validator, signature), sorted by validator

    def to_wire(self) -> list:
        return [self.chain_id, self.height, self.round, self.block_id,
                [[v, s] for v, s in self.signatures]]

    def encode(self) -> bytes:
        return pack(self.to_wire())

    def votes(self) -> list[Vote]:
        """The precommits this certificate carries."""
        return [Vote(self.chain_id, PRECOMMIT, self.height, self.round, self.block_id, v, s)
                for v, s in self.signatures]

    @classmethod
    def from_votes(cls, votes: list[Vote]) -> "CommitCertificate":
        first = votes[0]
        return cls(first.chain_id, first.height, first.round, first.block_id,
                   tuple(sorted((v.validator, v.signature) for v in votes)))

    @classmethod
    def from_wire(cls, wire: Any) -> "CommitCertificate":
        f = _Fields(wire, 5, "commit certificate")
        chain_id = f.str("chain id", MAX_CHAIN_ID)
        height = f.int("height", 1, MAX_HEIGHT)
        round_ = f.int("round", 0, MAX_ROUND)
        block_id = f.bytes("block id", (ID_BYTES,))
        sigs = []
        for pair in f.list("signatures", MAX_VALIDATORS):
            p = _Fields(pair, 2, "commit signature")
            sigs.append((p.bytes("validator", (ID_BYTES,)), p.bytes("signature", (SIG_BYTES,))))
        return cls(chain_id, height, round_, block_id, tuple(sigs))

    @classmethod
    def decode(cls, data: Any) -> "CommitCertificate":
        return cls.from_wire(unpack(data, "commit certificate", 64 << 10))


@dataclass(frozen=True)
class Equivocation:
    """Two votes by one validator for one (kind, height, round) naming different blocks: proof
    that it broke the protocol, which anyone can check from the two signatures."""

    first: Vote
    second: Vote

    def to_wire(self) -> list:
        return [self.first.to_wire(), self.second.to_wire()]

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @property
    def evidence_id(self) -> bytes:
        a, b = sorted([self.first.encode(), self.second.encode()])
        return sha256(a + b)

    @classmethod
    def from_wire(cls, wire: Any) -> "Equivocation":
        f = _Fields(wire, 2, "equivocation")
        return cls(Vote.from_wire(f.list("first", 7)), Vote.from_wire(f.list("second", 7)))

    @classmethod
    def decode(cls, data: Any) -> "Equivocation":
        return cls.from_wire(unpack(data, "equivocation", 1024))


def check_equivocation(ev: Equivocation) -> None:
    """Refuse evidence that does not show one validator signing two conflicting votes."""
    a, b = ev.first, ev.second
    if (a.chain_id, a.kind, a.height, a.round, a.validator) != (
            b.chain_id, b.kind, b.height, b.round, b.validator):
        raise MessageRejected("equivocation: the votes are not for the same place and validator")
    if a.block_id == b.block_id:
        raise MessageRejected("equivocation: the votes agree")
    for vote in (a, b):
        if not verify(NodeId(vote.validator), vote.signed_bytes(), vote.signature):
            raise MessageRejected("equivocation: a vote's signature is bad")
