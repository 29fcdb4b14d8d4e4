"""What the four proofs (work, time, space, stake) share: the error, the canonical encoding,
and versioned parameter sets.

Every proof is a frozen dataclass with `to_wire() -> list` (canonical: a msgpack array of
fixed layout, bytes as bin), `from_wire(list)` that checks every field's type and bound, and
`encode()` / `decode()` for the bytes. A proof names the version of the parameter set it was
made under; verifying with another parameter set refuses it. Verification never trusts a
field it has not checked, and every failure raises `ProofRejected` saying what was wrong.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import msgpack

from hmnode.errors import HmnodeError

# Encoded proofs are small; anything larger is refused before it is parsed.
MAX_PROOF_BYTES = 64 << 10


class ProofRejected(HmnodeError):
    """A proof that does not verify (forged, for another statement, or malformed)."""


class Proof(Protocol):
    """The shape every proof has (`WorkProof`, `TimeProof`, `SpaceProof`, `StakeProof`); each
    module adds `prove_*`, `verify_*` and a registry of versioned `*Params`."""

    version: int

    def to_wire(self) -> list: ...

    def encode(self) -> bytes: ...


def pack(fields: list[Any]) -> bytes:
    """The canonical bytes of a proof's wire form."""
    return msgpack.packb(fields, use_bin_type=True)


def unpack(data: bytes, what: str) -> list[Any]:
    """A proof's wire form from bytes; ProofRejected for anything but a bounded array."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_PROOF_BYTES:
        raise ProofRejected(f"{what}: not bytes of at most {MAX_PROOF_BYTES}")
    try:
        value = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True,
                                max_bin_len=MAX_PROOF_BYTES, max_str_len=1024,
                                max_array_len=4096, max_map_len=64)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise ProofRejected(f"{what}: not valid msgpack ({exc})") from None
    if not isinstance(value, list):
        raise ProofRejected(f"{what}: expected an array")
    return value


def field(wire: list[Any], index: int, kind: type | tuple[type, ...], what: str, name: str) -> Any:
    """Field `index` of a wire array, checked to be of `kind` (bool is never an int here)."""
    if index >= len(wire):
        raise ProofRejected(f"{what}: no {name}")
    value = wire[index]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProofRejected(f"{what}: {name} has the wrong type")
    if not isinstance(value, kind):
        raise ProofRejected(f"{what}: {name} has the wrong type")
    return value


def expect_length(wire: list[Any], n: int, what: str) -> None:
    """Refuse a wire array with missing or extra fields."""
    if len(wire) != n:
        raise ProofRejected(f"{what}: expected {n} fields, got {len(wire)}")


def digest(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts (no two part lists hash alike by concatenation)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()
