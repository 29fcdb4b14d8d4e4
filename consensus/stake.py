"""Proof of stake: a signed statement that credits are locked in the ledger at a height.

The node signs (domain tag, parameter version, its node id, the amount, the ledger height,
a context) with its Ed25519 key. A verifier checks the signature and then asks the replicated
state whether at least that amount was locked for that node at that height, and that the
height is recent. The state is anything with the `StakeLedger` shape: until the replicated
state machine exists, `LockedCredits` is a plain in-memory one that tests and benchmarks build.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Protocol

from hmnode.consensus.proof import ProofRejected, expect_length, field, pack, unpack
from hmnode.identity import NodeId, NodeKey, verify

TAG = "hmnode/stake/v1"
MAX_CONTEXT_BYTES = 256
MAX_AMOUNT = (1 << 63) - 1


@dataclass(frozen=True)
class StakeParams:
    """A versioned rule: how many blocks old the referenced height may be."""

    version: int
    max_age_blocks: int


STAKE_PARAMS: dict[int, StakeParams] = {1: StakeParams(1, 100)}
DEFAULT_STAKE = STAKE_PARAMS[1]


class StakeLedger(Protocol):
    """What a stake verifier asks the replicated state."""

    def height(self) -> int:
        """The latest committed height."""

    def locked(self, node_id: bytes, height: int) -> int | None:
        """Credits `node_id` had locked at `height` (None if that height is unknown)."""


@dataclass
class LockedCredits:
    """An in-memory StakeLedger: locked credits per node, per height."""

    at_height: dict[int, dict[bytes, int]] = dataclass_field(default_factory=dict)

    def lock(self, height: int, node_id: bytes, amount: int) -> None:
        """Record `amount` locked by `node_id` at `height`."""
        self.at_height.setdefault(height, {})[node_id] = amount

    def height(self) -> int:
        return max(self.at_height, default=0)

    def locked(self, node_id: bytes, height: int) -> int | None:
        if height not in self.at_height:
            return None
        return self.at_height[height].get(node_id, 0)


@dataclass(frozen=True)
class StakeProof:
    """A node's signed claim of `amount` credits locked at `height`, for `context`."""

    version: int
    node_id: bytes
    amount: int
    height: int
    context: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        """What the signature covers."""
        return pack([TAG, self.version, self.node_id, self.amount, self.height, self.context])

    def to_wire(self) -> list:
        """The canonical wire form (a msgpack array)."""
        return ["stake", self.version, self.node_id, self.amount, self.height, self.context,
                self.signature]

    @classmethod
    def from_wire(cls, wire: list) -> "StakeProof":
        """Parse and check every field; ProofRejected otherwise."""
        what = "stake proof"
        expect_length(wire, 7, what)
        if wire[0] != "stake":
            raise ProofRejected(f"{what}: not a stake proof")
        version = field(wire, 1, int, what, "version")
        node_id = field(wire, 2, bytes, what, "node id")
        amount = field(wire, 3, int, what, "amount")
        height = field(wire, 4, int, what, "height")
        context = field(wire, 5, bytes, what, "context")
        signature = field(wire, 6, bytes, what, "signature")
        if (len(node_id) != 32 or len(signature) != 64 or len(context) > MAX_CONTEXT_BYTES
                or not 0 < amount <= MAX_AMOUNT or not 0 <= height <= MAX_AMOUNT):
            raise ProofRejected(f"{what}: a field is out of bounds")
        return cls(version, node_id, amount, height, context, signature)

    def encode(self) -> bytes:
        """The canonical bytes."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> "StakeProof":
        """A proof from its bytes; ProofRejected for anything malformed."""
        return cls.from_wire(unpack(data, "stake proof"))


def prove_stake(key: NodeKey, amount: int, height: int, context: bytes = b"",
                params: StakeParams = DEFAULT_STAKE) -> StakeProof:
    """Sign a claim of `amount` credits locked at `height`."""
    if not 0 < amount <= MAX_AMOUNT or height < 0 or len(context) > MAX_CONTEXT_BYTES:
        raise ValueError("stake: amount must be positive, height non-negative, context short")
    unsigned = StakeProof(params.version, key.node_id.key, amount, height, context, b"")
    return StakeProof(params.version, key.node_id.key, amount, height, context,
                      key.sign(unsigned.signed_bytes()))


def verify_stake(proof: StakeProof, ledger: StakeLedger, context: bytes = b"",
                 params: StakeParams = DEFAULT_STAKE, node_id: bytes | None = None) -> None:
    """The signature is the node's, the height recent, and the ledger agrees that at least
    `amount` was locked then; ProofRejected otherwise."""
    if proof.version != params.version:
        raise ProofRejected(f"stake proof made under parameter set {proof.version}, "
                            f"not {params.version}")
    if node_id is not None and proof.node_id != node_id:
        raise ProofRejected("stake proof is another node's")
    if proof.context != context:
        raise ProofRejected("stake proof is for another context")
    try:
        signer = NodeId(proof.node_id)
    except ValueError:
        raise ProofRejected("stake proof names no valid node id") from None
    if not verify(signer, proof.signed_bytes(), proof.signature):
        raise ProofRejected("stake proof's signature is not its node's")
    now = ledger.height()
    if proof.height > now:
        raise ProofRejected(f"stake proof refers to height {proof.height}, beyond {now}")
    if now - proof.height > params.max_age_blocks:
        raise ProofRejected(f"stake proof refers to height {proof.height}, more than "
                            f"{params.max_age_blocks} blocks before {now}")
    locked = ledger.locked(proof.node_id, proof.height)
    if locked is None:
        raise ProofRejected(f"the ledger does not know height {proof.height}")
    if locked < proof.amount:
        raise ProofRejected(f"stake proof claims {proof.amount} credits locked at height "
                            f"{proof.height}; the ledger says {locked}")
