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
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from hmnode import schema
from hmnode.datadir import fsync_dir
from hmnode.errors import HmnodeError
from hmnode.store import Store, Txn

HASH_BYTES = 32
MAX_BLOB_BYTES = 1 << 30
STALE_INCOMING_S = 3600.0  # a blob still arriving after this long was abandoned


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
        writer = self.writer()
        try:
            writer.write(data)
            return writer.commit(pin=pin)
        finally:
            writer.abort()

    def writer(self) -> BlobWriter:
        """A blob written in pieces (as it arrives), hashed on the way, kept on `commit`."""
        return BlobWriter(self)

    def _record(self, digest: bytes, size: int, pin: bool) -> None:
        now = time.time()

        def record(txn: Txn) -> None:
            held = txn.get(schema.BLOBS, digest)
            txn.put(schema.BLOBS, digest, {
                "size": size, "pinned": bool(pin or (held and held["pinned"])),
                "added": held["added"] if held else now, "used": now})
        self.store.write(record)

    def read_chunk(self, digest: bytes, offset: int, limit: int) -> tuple[int, bytes]:
        """The blob's size and up to `limit` of its bytes from `offset`, unchecked (whoever
        reads the whole checks it against the id); BlobMissing."""
        try:
            with self.path(digest).open("rb") as f:
                size = f.seek(0, 2)
                f.seek(offset)
                return size, f.read(limit)
        except FileNotFoundError:
            raise BlobMissing(f"this node does not hold blob {digest.hex()}") from None

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
        ones take at most `keep_bytes`, and what abandoned transfers left; the ids removed."""
        stale = time.time() - STALE_INCOMING_S
        for tmp in self.root.glob(".incoming.*.tmp"):  # left by a crash mid-transfer
            try:
                if tmp.stat().st_mtime < stale:
                    tmp.unlink()
            except FileNotFoundError:
                pass
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


class BlobWriter:
    """One blob on its way in: written to a temporary file and hashed as it comes, so its
    size costs disk, not memory; `commit` checks it, syncs it and renames it into place
    before its metadata is written (a crash leaves the whole blob or none)."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        blobs.root.mkdir(parents=True, exist_ok=True)
        self.tmp = blobs.root / f".incoming.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        self._file = self.tmp.open("wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append `data`; HmnodeError past MAX_BLOB_BYTES."""
        if self.size + len(data) > MAX_BLOB_BYTES:
            raise HmnodeError(f"a blob is at most {MAX_BLOB_BYTES} bytes")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, expect: bytes | None = None, pin: bool = False) -> bytes:
        """Keep what was written; its id. BlobCorrupt (and nothing kept) if it is not `expect`."""
        digest = self._hash.digest()
        if expect is not None and digest != expect:
            self.abort()
            raise BlobCorrupt(f"blob {expect.hex()} arrived damaged ({self.size} bytes that "
                              "hash to something else); it was not kept")
        path = self.blobs.path(digest)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if path.exists():
            self.tmp.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.replace(path)
            fsync_dir(path.parent)
        self.blobs._record(digest, self.size, pin)
        return digest

    def abort(self) -> None:
        """Drop what was written (a no-op once committed)."""
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)
