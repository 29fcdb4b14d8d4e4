"""The stake-weighted validator set: quorums, the proposer of each round, and checking a
commit certificate against it.

A quorum is more than 2/3 of the total power and "f+1" is more than 1/3, so with n = 3f+1
equal validators a quorum is 2f+1 of them. Each height draws an order of all validators,
weighted by stake, and round r's proposer is the r-th of it: the first proposer of a height is
drawn in proportion to stake, and within a height no validator proposes twice before every
other one has, so f Byzantine proposers cost at most f rounds in a row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from hmnode.identity import NodeId, verify

from .messages import (ID_BYTES, MAX_VALIDATORS, PRECOMMIT, CommitCertificate,
                       MessageRejected, pack, vote_bytes)

MAX_POWER = 1 << 40


@dataclass(frozen=True)
class ValidatorSet:
    """Validators (32-byte keys) and their voting power, sorted by key."""

    members: tuple[tuple[bytes, int], ...]
    total: int = field(init=False, compare=False)
    _power: dict[bytes, int] = field(init=False, compare=False, repr=False)
    _orders: dict[int, tuple[bytes, ...]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        keys = [k for k, _ in self.members]
        if not self.members or len(self.members) > MAX_VALIDATORS:
            raise ValueError(f"a validator set has 1..{MAX_VALIDATORS} members")
        if keys != sorted(set(keys)):
            raise ValueError("validators must be distinct and sorted by key")
        for key, power in self.members:
            if len(key) != ID_BYTES or not 0 < power <= MAX_POWER:
                raise ValueError(f"a validator is a 32-byte key with power 1..{MAX_POWER}")
        object.__setattr__(self, "_power", dict(self.members))
        object.__setattr__(self, "total", sum(p for _, p in self.members))
        object.__setattr__(self, "_orders", {})

    @classmethod
    def of(cls, powers: Iterable[tuple[bytes, int]]) -> "ValidatorSet":
        """A set from (key, power) pairs in any order; zero-power entries are left out."""
        return cls(tuple(sorted((k, p) for k, p in powers if p > 0)))

    def power(self, key: bytes) -> int:
        """`key`'s voting power (0 for a non-member)."""
        return self._power.get(key, 0)

    def __contains__(self, key: object) -> bool:
        return key in self._power

    def __len__(self) -> int:
        return len(self.members)

    def has_quorum(self, power: int) -> bool:
        """More than 2/3 of the total power."""
        return 3 * power > 2 * self.total

    def exceeds_third(self, power: int) -> bool:
        """More than 1/3 of the total: at least one honest validator is among them."""
        return 3 * power > self.total

    def proposer(self, height: int, round_: int) -> bytes:
        """The validator that proposes at (height, round)."""
        order = self._orders.get(height)
        if order is None:
            if len(self._orders) >= 64:
                self._orders.clear()
            order = self._orders[height] = self._proposer_order(height)
        return order[round_ % len(order)]

    def _proposer_order(self, height: int) -> tuple[bytes, ...]:
        # Stake-weighted sampling without replacement, in integers only (every platform must
        # agree): each draw picks from the validators not yet drawn, by a hash of the height.
        remaining = list(self.members)
        order: list[bytes] = []
        while remaining:
            seed = hashlib.sha256(b"proposer" + height.to_bytes(8, "big")
                                  + len(order).to_bytes(2, "big") + self.hash).digest()
            slot = int.from_bytes(seed, "big") % sum(p for _, p in remaining)
            for i, (key, power) in enumerate(remaining):
                if slot < power:
                    order.append(key)
                    del remaining[i]
                    break
                slot -= power
        return tuple(order)

    @cached_property
    def hash(self) -> bytes:
        """What a block header names, so a certificate is checked against the right set."""
        return hashlib.sha256(pack([[k, p] for k, p in self.members])).digest()

    def to_json(self) -> list[dict[str, object]]:
        return [{"node_id": str(NodeId(k)), "power": p} for k, p in self.members]

    def check_certificate(self, cert: CommitCertificate, chain_id: str, height: int,
                          block_id: bytes) -> None:
        """Refuse a certificate that is not a quorum of valid precommits for `block_id`."""
        if (cert.chain_id, cert.height, cert.block_id) != (chain_id, height, block_id):
            raise MessageRejected(f"commit certificate is not for block {block_id.hex()[:16]} "
                                  f"at height {height}")
        signed = vote_bytes(chain_id, PRECOMMIT, height, cert.round, block_id)
        seen: set[bytes] = set()
        power = 0
        for validator, signature in cert.signatures:
            if validator in seen or validator not in self:
                raise MessageRejected("commit certificate: a signer is repeated or not a validator")
            if not verify(NodeId(validator), signed, signature):
                raise MessageRejected("commit certificate: a precommit's signature is bad")
            seen.add(validator)
            power += self.power(validator)
        if not self.has_quorum(power):
            raise MessageRejected(f"commit certificate: signers hold {power} of "
                                  f"{self.total} power, not more than 2/3")
