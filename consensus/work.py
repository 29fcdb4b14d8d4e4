"""Proof of work: a hashcash puzzle bound to (purpose, node id, context).

The prover searches for a nonce such that SHA-256 over the domain tag, the parameter version,
the purpose, the node id, the context and the nonce starts with `bits` zero bits; the verifier
computes one hash. Binding the node id and the context means a solution cannot be reused by
another node or for another statement (another epoch's admission, another transaction).

Costs, measured with Python's hashlib on a 2-core x86_64 machine (about 0.84 M hashes/s with a
copied prefix hasher): a puzzle of b bits takes 2^b hashes on average, so the default 20 bits
(identity admission) is about 1.2 s of one core, and each further bit doubles it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from hmnode.consensus.proof import ProofRejected, expect_length, field, pack, unpack

TAG = b"hmnode/work/v1"
PURPOSES = ("admission", "spam")
MAX_CONTEXT_BYTES = 256
MAX_NONCE = (1 << 64) - 1


@dataclass(frozen=True)
class WorkParams:
    """A versioned difficulty, in leading zero bits of the puzzle's hash."""

    version: int
    bits: int


WORK_PARAMS: dict[int, WorkParams] = {1: WorkParams(1, 20)}
DEFAULT_WORK = WORK_PARAMS[1]


@dataclass(frozen=True)
class WorkProof:
    """A nonce that solves the puzzle for (purpose, node id, context) under a parameter set."""

    version: int
    purpose: str
    node_id: bytes
    context: bytes
    nonce: int

    def to_wire(self) -> list:
        """The canonical wire form (a msgpack array)."""
        return ["work", self.version, self.purpose, self.node_id, self.context, self.nonce]

    @classmethod
    def from_wire(cls, wire: list) -> "WorkProof":
        """Parse and check every field; ProofRejected otherwise."""
        what = "work proof"
        expect_length(wire, 6, what)
        if wire[0] != "work":
            raise ProofRejected(f"{what}: not a work proof")
        version = field(wire, 1, int, what, "version")
        purpose = field(wire, 2, str, what, "purpose")
        node_id = field(wire, 3, bytes, what, "node id")
        context = field(wire, 4, bytes, what, "context")
        nonce = field(wire, 5, int, what, "nonce")
        if purpose not in PURPOSES:
            raise ProofRejected(f"{what}: unknown purpose {purpose!r}")
        if len(node_id) != 32 or len(context) > MAX_CONTEXT_BYTES or not 0 <= nonce <= MAX_NONCE:
            raise ProofRejected(f"{what}: a field is out of bounds")
        return cls(version, purpose, node_id, context, nonce)

    def encode(self) -> bytes:
        """The canonical bytes."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> "WorkProof":
        """A proof from its bytes; ProofRejected for anything malformed."""
        return cls.from_wire(unpack(data, "work proof"))


def _prefix(version: int, purpose: str, node_id: bytes, context: bytes) -> "hashlib._Hash":
    h = hashlib.sha256(TAG)
    h.update(pack([version, purpose, node_id, context]))
    return h


def _leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def prove_work(purpose: str, node_id: bytes, context: bytes = b"",
               params: WorkParams = DEFAULT_WORK,
               progress: Callable[[int], None] | None = None, start: int = 0) -> WorkProof:
    """Search nonces from `start` until the puzzle is solved (2^bits hashes on average);
    `progress` is told the number of hashes tried every 2^16."""
    if purpose not in PURPOSES or len(node_id) != 32 or len(context) > MAX_CONTEXT_BYTES:
        raise ValueError("work: purpose must be one of PURPOSES, node_id 32 bytes, context short")
    prefix = _prefix(params.version, purpose, node_id, context)
    need = params.bits
    nonce = start
    while nonce <= MAX_NONCE:
        h = prefix.copy()
        h.update(nonce.to_bytes(8, "big"))
        if _leading_zero_bits(h.digest()) >= need:
            return WorkProof(params.version, purpose, node_id, context, nonce)
        nonce += 1
        if progress is not None and not (nonce - start) & 0xFFFF:
            progress(nonce - start)
    raise RuntimeError("work: nonce space exhausted")  # 2^64 hashes: not in this universe


def verify_work(proof: WorkProof, purpose: str, node_id: bytes, context: bytes = b"",
                params: WorkParams = DEFAULT_WORK) -> None:
    """One hash: the proof solves this very puzzle at the required difficulty."""
    if proof.version != params.version:
        raise ProofRejected(f"work proof made under parameter set {proof.version}, "
                            f"not {params.version}")
    if (proof.purpose, proof.node_id, proof.context) != (purpose, node_id, context):
        raise ProofRejected("work proof is for another purpose, node or context")
    h = _prefix(proof.version, proof.purpose, proof.node_id, proof.context)
    h.update(proof.nonce.to_bytes(8, "big"))
    if _leading_zero_bits(h.digest()) < params.bits:
        raise ProofRejected(f"work proof does not reach {params.bits} bits")
