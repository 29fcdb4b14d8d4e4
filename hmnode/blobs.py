"""Content-addressed blobs in the data dir: programs, inputs and results of jobs.

A blob is named by the SHA-256 of its bytes and kept as `blobs/<first 2 hex>/<hex>`; its
metadata (size, pinned, when added and last used) lives in LMDB (`schema.BLOBS`). A blob is
written to a temporary file, synced and renamed into place before its metadata is committed,
so a crash leaves either the whole blob or none. Every read checks the bytes against the name:
a blob damaged on disk is dropped and reported, never used. Blobs that are not pinned are
garbage-collected, least recently used first, past a byte budget.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hmnode import schema
from hmnode.datadir import fsync_dir
from hmnode.errors import HmnodeError
from hmnode.store import Store, Txn

HASH_BYTES = 32
MAX_BLOB_BYTES = 1 << 30


class BlobMissing(HmnodeError):
    """This node does not hold the blob."""


class BlobCorrupt(HmnodeError):
    """A blob whose bytes do not hash to its name (damaged on disk or in transit)."""


@dataclass(frozen=True)
class BlobInfo:
    """What the store knows of one blob."""

    digest: bytes
    size: int
    pinned: bool
    added: float
    used: float


def blob_id(data: bytes) -> bytes:
    """A blob's name: the SHA-256 of its bytes."""
    return hashlib.sha256(data).digest()


def parse_blob_id(text: str) -> bytes:
    """A blob id from its 64 hex characters; HmnodeError otherwise."""
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != HASH_BYTES:
        raise HmnodeError(f"{text!r} is not a blob id (64 hex characters of a SHA-256)")
    return digest


class BlobStore:
    """The blobs of one data dir."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store

    def path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def put(self, data: bytes, pin: bool = False) -> bytes:
        """Keep `data` (idempotent); its id. Pinning is sticky: a pinned blob stays pinned."""
        if len(data) > MAX_BLOB_BYTES:
            raise HmnodeError(f"a blob is at most {MAX_BLOB_BYTES} bytes, not {len(data)}")
        digest = blob_id(data)
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            fsync_dir(path.parent)
        now = time.time()

        def record(txn: Txn) -> None:
            held = txn.get(schema.BLOBS, digest)
            txn.put(schema.BLOBS, digest, {
                "size": len(data), "pinned": bool(pin or (held and held["pinned"])),
                "added": held["added"] if held else now, "used": now})
        self.store.write(record)
        return digest

    def get(self, digest: bytes) -> bytes:
        """The blob's bytes, checked against its id; BlobMissing or BlobCorrupt."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"this node does not hold blob {digest.hex()}") from None
        if blob_id(data) != digest:
            self.remove(digest)
            raise BlobCorrupt(f"blob {digest.hex()} was damaged on disk; it was dropped, "
                              "fetch it again")
        return data

    def has(self, digest: bytes) -> bool:
        return self.path(digest).exists()

    def info(self, digest: bytes) -> BlobInfo | None:
        raw = self.store.read(lambda txn: txn.get(schema.BLOBS, digest))
        return None if raw is None else BlobInfo(digest, raw["size"], raw["pinned"],
                                                 raw["added"], raw["used"])

    def remove(self, digest: bytes) -> None:
        self.path(digest).unlink(missing_ok=True)
        self.store.write(lambda txn: txn.delete(schema.BLOBS, digest))

    def collect(self, keep_bytes: int) -> list[bytes]:
        """Remove blobs that are not pinned, least recently used first, until the unpinned
        ones take at most `keep_bytes`; the ids removed."""
        rows = self.store.read(lambda txn: [(d, r) for d, r in txn.items(schema.BLOBS)
                                            if not r["pinned"]])
        total = sum(r["size"] for _, r in rows)
        removed = []
        for digest, raw in sorted(rows, key=lambda row: row[1]["used"]):
            if total <= keep_bytes:
                break
            self.remove(digest)
            total -= raw["size"]
            removed.append(digest)
        return removed
