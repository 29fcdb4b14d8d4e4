"""Blobs between nodes over QUIC: the `blob.get` RPC serves a blob in chunks, and `fetch_blob`
pulls one chunk at a time (each request waits for its answer, which is the backpressure),
writes it to disk as it comes, checks the whole against its id and keeps it. A blob that arrives damaged is refused and
fetched once more before the fetch fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hmnode.blobs import (HASH_BYTES, MAX_BLOB_BYTES, BlobCorrupt, BlobMissing, BlobStore,
                          BlobWriter)
from hmnode.transport.connection import PeerConnection, RemoteError

CHUNK_BYTES = 256 << 10  # well under a frame's 1 MiB
FETCH_ATTEMPTS = 2
CHUNK_TIMEOUT_S = 30.0


class BlobServer:
    """Answers `blob.get` {"id", "offset"} with {"size", "data"} from this node's blobs."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    async def serve(self, conn: PeerConnection, body: Any) -> Any:
        digest = body.get("id") if isinstance(body, dict) else None
        offset = body.get("offset", 0) if isinstance(body, dict) else None
        if not isinstance(digest, bytes) or len(digest) != HASH_BYTES or isinstance(
                offset, bool) or not isinstance(offset, int) or offset < 0:
            raise RemoteError("bad_request", "blob.get takes {id: 32 bytes, offset: int >= 0}")
        try:
            size, data = self.blobs.read_chunk(digest, offset, CHUNK_BYTES)
        except BlobMissing:
            raise RemoteError("not_found", f"this node does not hold blob {digest.hex()}") from None
        return {"size": size, "data": data}


async def fetch_blob(conn: PeerConnection, digest: bytes, blobs: BlobStore,
                     progress: Callable[[int, int], None] | None = None,
                     pin: bool = False) -> None:
    """Pull blob `digest` from the peer of `conn` into `blobs`, checked against its id; the
    pieces go to disk as they come. BlobMissing if the peer lacks it, BlobCorrupt if it
    arrives damaged twice."""
    for _ in range(FETCH_ATTEMPTS):
        writer = blobs.writer()
        try:
            await _pull(conn, digest, writer, progress)
            writer.commit(expect=digest, pin=pin)
            return
        except BlobCorrupt:
            continue
        finally:
            writer.abort()
    raise BlobCorrupt(f"blob {digest.hex()} arrived damaged {FETCH_ATTEMPTS} times from "
                      f"{conn.peer_id}; it was not kept")


async def pull_from(blobs: BlobStore, mesh: Any, holder: Any, digest: bytes,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Make sure blob `digest` is kept here: pulled from node `holder` through the mesh
    (which finds a path to it: its advertised addresses, relay or hole punching) if not."""
    if blobs.has(digest):
        return
    addresses = mesh.addresses_of(holder)
    conn = await mesh.connect(holder, addresses[0] if addresses else None)
    await fetch_blob(conn, digest, blobs, progress)


async def blob_from(blobs: BlobStore, mesh: Any, holder: Any, digest: bytes) -> bytes:
    """Blob `digest`'s bytes: kept here, else pulled from node `holder` first."""
    await pull_from(blobs, mesh, holder, digest)
    return blobs.get(digest)


async def _pull(conn: PeerConnection, digest: bytes, writer: BlobWriter,
                progress: Callable[[int, int], None] | None) -> None:
    got, size = 0, None
    while size is None or got < size:
        try:
            answer = await conn.request("blob.get", {"id": digest, "offset": got},
                                        timeout=CHUNK_TIMEOUT_S)
        except RemoteError as exc:
            if exc.code == "not_found":
                raise BlobMissing(f"{conn.peer_id} does not hold blob {digest.hex()}") from None
            raise
        chunk, total = answer.get("data"), answer.get("size")
        if not isinstance(chunk, bytes) or isinstance(total, bool) or not isinstance(total, int) \
                or not 0 <= total <= MAX_BLOB_BYTES or (size is not None and total != size) \
                or (not chunk and got < total):
            raise BlobCorrupt(f"{conn.peer_id} sent a malformed chunk of blob {digest.hex()}")
        size = total
        got += len(chunk)
        if got > size:
            raise BlobCorrupt(f"{conn.peer_id} sent more of blob {digest.hex()} than its size")
        writer.write(chunk)
        if progress is not None:
            progress(got, size)
