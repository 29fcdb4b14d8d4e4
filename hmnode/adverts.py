"""Signed asset advertisements, and the store that keeps the newest one per node.

An advert says what a node shares, at what price, where to reach it, and until when. It is
signed by the node's key over a canonical encoding, so anyone may relay it and everyone can check
it. The store is sans-IO: time is passed in; it keeps the highest sequence number per node, drops
expired adverts, and refuses forged, malformed or stale ones with a reason.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hmnode.errors import HmnodeError
from hmnode.identity import NodeId, NodeKey, verify

# Domain separation: a signature over an advert can never be replayed as some other signed object.
_DOMAIN = b"hmnode/advert/v1"
ADVERT_VERSION = 1
MAX_ADDRESSES = 16
# Long enough for a relayed address (a node id, a relay's IPv6 address and port, "/relay").
MAX_ADDRESS_CHARS = 128
MAX_ADVERT_BYTES = 64 << 10
# How far in the future an advert may claim to have been issued (clock skew between nodes).
MAX_CLOCK_SKEW_S = 300.0
MAX_TTL_S = 24 * 3600.0
PRICE_KEYS = ("core_hour", "gb_hour", "gpu_hour", "start_fee")
DIGEST_BUCKETS = 256


class AdvertRejected(HmnodeError):
    """An advert is forged, malformed, expired or older than one already known."""


@dataclass(frozen=True)
class Advert:
    """One node's signed statement of what it offers and where to reach it."""

    node_id: NodeId
    seq: int
    addresses: tuple[str, ...]
    inventory: dict[str, Any]
    prices: dict[str, float]
    issued_at: float
    expires_at: float
    signature: bytes = field(default=b"", compare=False)

    # Cached: an advert is checked, hashed and relayed many times, and it is frozen.
    @functools.cached_property
    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers."""
        return _DOMAIN + msgpack.packb(
            [ADVERT_VERSION, self.node_id.key, self.seq, list(self.addresses), self.inventory,
             sorted(self.prices.items()), self.issued_at, self.expires_at], use_bin_type=True)

    @functools.cached_property
    def msg_id(self) -> bytes:
        """A short id for gossip dedup: differs for every distinct signed advert."""
        return hashlib.blake2b(self.signed_bytes + self.signature, digest_size=16).digest()

    def verify(self) -> bool:
        """Whether the signature is the node's own over this advert's content."""
        return verify(self.node_id, self.signed_bytes, self.signature)

    def to_wire(self) -> dict[str, Any]:
        """The advert as a msgpack-able map."""
        return {"v": ADVERT_VERSION, "node": self.node_id.key, "seq": self.seq,
                "addrs": list(self.addresses), "inv": self.inventory, "prices": dict(self.prices),
                "issued": self.issued_at, "expires": self.expires_at, "sig": self.signature}

    @classmethod
    def from_wire(cls, data: Any) -> "Advert":
        """Read an advert from its map; raises AdvertRejected saying what is malformed."""
        if not isinstance(data, dict):
            raise AdvertRejected("an advert is a map")
        expected = {"v", "node", "seq", "addrs", "inv", "prices", "issued", "expires", "sig"}
        if set(data) != expected:
            raise AdvertRejected(f"advert fields {sorted(map(str, data))} are not {sorted(expected)}")
        if data["v"] != ADVERT_VERSION:
            raise AdvertRejected(f"advert version {data['v']!r} is not {ADVERT_VERSION}")
        node, seq, addrs, inv = data["node"], data["seq"], data["addrs"], data["inv"]
        prices, issued, expires, sig = data["prices"], data["issued"], data["expires"], data["sig"]
        if not isinstance(node, bytes) or len(node) != 32:
            raise AdvertRejected("advert node id is not 32 bytes")
        if not _is_int(seq) or not 0 <= seq < 1 << 63:
            raise AdvertRejected("advert sequence is not a non-negative integer")
        _check_addresses(addrs)
        if not isinstance(inv, dict):
            raise AdvertRejected("advert inventory is not a map")
        if (not isinstance(prices, dict) or set(prices) != set(PRICE_KEYS)
                or not all(_is_number(v) and v >= 0 for v in prices.values())):
            raise AdvertRejected(f"advert prices must be non-negative numbers for {', '.join(PRICE_KEYS)}")
        if not (_is_number(issued) and _is_number(expires)) or not issued < expires:
            raise AdvertRejected("advert times are not numbers with issued before expiry")
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise AdvertRejected("advert signature is not 64 bytes")
        # Values stay exactly as received: converting (say int to float) would change the
        # signed bytes and fail a genuine signature.
        return cls(NodeId(node), seq, tuple(addrs), inv, prices, issued, expires, sig)


def _check_addresses(addrs: Any) -> None:
    if (not isinstance(addrs, list) or len(addrs) > MAX_ADDRESSES
            or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDRESS_CHARS for a in addrs)):
        raise AdvertRejected(f"advert addresses must be up to {MAX_ADDRESSES} strings of up to "
                             f"{MAX_ADDRESS_CHARS} characters")


def make_advert(key: NodeKey, seq: int, addresses: list[str], inventory: dict[str, Any],
                prices: dict[str, float] | None, now: float, ttl_s: float) -> Advert:
    """A new advert signed by `key`, valid from `now` for `ttl_s` seconds; refused (as a
    peer would refuse it) when its content breaks the limits."""
    _check_addresses(list(addresses))
    prices = prices or {name: 0.0 for name in PRICE_KEYS}
    unsigned = Advert(key.node_id, seq, tuple(addresses), inventory, prices, now, now + ttl_s)
    try:
        signed = unsigned.signed_bytes
    except (OverflowError, TypeError, ValueError) as exc:
        raise AdvertRejected(f"advert content cannot be encoded: {exc}") from None
    advert = dataclasses.replace(unsigned, signature=key.sign(signed))
    if len(msgpack.packb(advert.to_wire(), use_bin_type=True)) > MAX_ADVERT_BYTES:
        raise AdvertRejected(f"advert over {MAX_ADVERT_BYTES} bytes; share less detail")
    return advert


class AdvertStore:
    """The newest valid advert of every node (sans-IO: the caller passes `now`).

    The anti-entropy digest is kept per bucket and recomputed only for buckets that changed,
    so a digest costs the same in a mesh of ten nodes or a hundred thousand.
    """

    def __init__(self, max_adverts: int = 100_000,
                 verifier: Callable[[Advert], bool] = Advert.verify) -> None:
        self.max_adverts = max_adverts
        # Pluggable so that a simulator of many nodes can share one cache of a pure function.
        self.verifier = verifier
        self._adverts: dict[NodeId, Advert] = {}
        self._buckets: list[dict[bytes, int]] = [{} for _ in range(DIGEST_BUCKETS)]
        self._bucket_hash: list[bytes | None] = [None] * DIGEST_BUCKETS

    def check(self, advert: Advert, now: float) -> None:
        """Raise AdvertRejected if `advert` would not be accepted now (nothing changes)."""
        self.check_genuine(advert, now)
        self.check_fits(advert)

    def check_fits(self, advert: Advert) -> None:
        """Raise AdvertRejected unless `advert` is newer than the one held and there is room
        for it (its signature is `check_genuine`'s business)."""
        known = self._adverts.get(advert.node_id)
        if known is not None and advert.seq <= known.seq:
            raise AdvertRejected(
                f"advert of {advert.node_id.short()} seq {advert.seq} is not newer than {known.seq}")
        if known is None and len(self._adverts) >= self.max_adverts:
            raise AdvertRejected(f"advert store full ({self.max_adverts} nodes)")

    def check_genuine(self, advert: Advert, now: float) -> None:
        """Raise AdvertRejected unless `advert` is signed by its node and current, whether or
        not it is newer than the one held."""
        if not self.verifier(advert):
            raise AdvertRejected(f"advert of {advert.node_id.short()} seq {advert.seq} has a bad signature")
        if advert.expires_at <= now:
            raise AdvertRejected(f"advert of {advert.node_id.short()} seq {advert.seq} has expired")
        if advert.issued_at > now + MAX_CLOCK_SKEW_S or advert.expires_at - advert.issued_at > MAX_TTL_S:
            raise AdvertRejected(f"advert of {advert.node_id.short()} claims implausible times")

    def offer(self, advert: Advert, now: float) -> None:
        """Keep `advert` if it is valid and newer than what is known; else AdvertRejected."""
        self.check(advert, now)
        self._adverts[advert.node_id] = advert
        self._mark(advert.node_id.key, advert.seq)

    def is_news(self, advert: Advert) -> bool:
        """Whether `advert` is newer than the one held (without checking its signature)."""
        known = self._adverts.get(advert.node_id)
        return known is None or advert.seq > known.seq

    def get(self, node_id: NodeId) -> Advert | None:
        return self._adverts.get(node_id)

    def seq_of(self, key: bytes) -> int:
        """The sequence held for the node with public key `key` (-1: none)."""
        if len(key) < 1:
            return -1
        return self._buckets[key[0]].get(key, -1)

    def all(self) -> list[Advert]:
        """Every advert, by node id."""
        return sorted(self._adverts.values(), key=lambda a: a.node_id.key)

    def __len__(self) -> int:
        return len(self._adverts)

    def expire(self, now: float) -> list[Advert]:
        """Drop and return the adverts that have expired."""
        gone = [a for a in self.all() if a.expires_at <= now]
        for advert in gone:
            del self._adverts[advert.node_id]
            self._mark(advert.node_id.key, None)
        return gone

    def _mark(self, key: bytes, seq: int | None) -> None:
        bucket = self._buckets[key[0]]
        if seq is None:
            bucket.pop(key, None)
        else:
            bucket[key] = seq
        self._bucket_hash[key[0]] = None

    def digest(self) -> list[bytes]:
        """A fixed-size summary for anti-entropy: per bucket of node ids (by first key byte), a
        hash of its (node, sequence) pairs. 256 entries whatever the mesh's size."""
        hashes = self._bucket_hash
        for i, cached in enumerate(hashes):
            if cached is None:
                bucket = self._buckets[i]
                hashes[i] = hashlib.blake2b(b"".join(
                    key + bucket[key].to_bytes(8, "big") for key in sorted(bucket)),
                    digest_size=8).digest()
        return list(hashes)  # type: ignore[arg-type]

    def differing_summary(self, digest: list[bytes]) -> list[tuple[bytes, int]]:
        """(node key, sequence) of every advert in the buckets whose hash differs from the
        peer's `digest`: what the peer may lack, at a few dozen bytes an entry."""
        mine = self.digest()
        out: list[tuple[bytes, int]] = []
        for i in range(DIGEST_BUCKETS):
            if i >= len(digest) or digest[i] != mine[i]:
                out.extend(sorted(self._buckets[i].items()))
        return out

    def differing(self, digest: list[bytes]) -> list[Advert]:
        """The adverts in every bucket whose hash differs from the peer's `digest`: a superset of
        what the peer lacks (it ignores the ones it already has)."""
        return [self._adverts[NodeId(key)] for key, _ in self.differing_summary(digest)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
