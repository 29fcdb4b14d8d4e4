"""Content-addressed blobs: kept whole or not at all, checked on every read, pinned ones kept
through garbage collection, and moved between two real nodes over QUIC in chunks, where a blob
damaged in transit is refused and fetched again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hmnode import schema
from hmnode.blob_transfer import CHUNK_BYTES, BlobServer, fetch_blob
from hmnode.blobs import BlobCorrupt, BlobMissing, BlobStore, blob_id, parse_blob_id
from hmnode.errors import HmnodeError
from hmnode.identity import NodeKey
from hmnode.store import Store
from hmnode.transport.connection import Handlers
from hmnode.transport.endpoint import Endpoint


@pytest.fixture
def blobs(tmp_path: Path) -> Any:
    with Store.open(tmp_path / "state") as store:
        yield BlobStore(tmp_path / "blobs", store)


def test_a_blob_is_named_by_its_hash_and_checked_when_read(blobs: BlobStore) -> None:
    digest = blobs.put(b"hello")
    assert digest == blob_id(b"hello") and blobs.get(digest) == b"hello"
    assert blobs.put(b"hello") == digest and blobs.info(digest).size == 5
    blobs.path(digest).write_bytes(b"hellO")  # damaged on disk
    with pytest.raises(BlobCorrupt, match="damaged on disk"):
        blobs.get(digest)
    assert not blobs.has(digest) and blobs.info(digest) is None
    with pytest.raises(BlobMissing):
        blobs.get(digest)
    with pytest.raises(HmnodeError, match="not a blob id"):
        parse_blob_id("xyz")


def test_garbage_collection_keeps_pinned_and_recent_blobs(blobs: BlobStore) -> None:
    pinned = blobs.put(b"p" * 100, pin=True)
    old = blobs.put(b"o" * 100)
    new = blobs.put(b"n" * 100)
    blobs.put(b"o" * 100)  # used again: now the newest
    assert blobs.collect(keep_bytes=100) == [new]
    assert blobs.has(pinned) and blobs.has(old) and not blobs.has(new)
    assert blobs.collect(keep_bytes=0) == [old] and blobs.has(pinned)
    assert blobs.store.read(lambda t: [d for d, _ in t.items(schema.BLOBS)]) == [pinned]


class _Damaging(BlobServer):
    """Serves chunks, flipping a byte of the first `times` whole transfers."""

    def __init__(self, store: BlobStore, times: int) -> None:
        super().__init__(store)
        self.times = times

    async def serve(self, conn: Any, body: Any) -> Any:
        answer = await super().serve(conn, body)
        if self.times and body["offset"] == 0:
            self.times -= 1
            answer["data"] = bytes([answer["data"][0] ^ 1]) + answer["data"][1:]
        return answer


@pytest.mark.parametrize("damaged,fetched", [(0, True), (1, True), (2, False)])
def test_a_blob_moves_over_quic_and_damage_in_transit_is_refused(
        tmp_path: Path, damaged: int, fetched: bool) -> None:
    async def main() -> None:
        with Store.open(tmp_path / "a") as sa, Store.open(tmp_path / "b") as sb:
            holder, fetcher = BlobStore(tmp_path / "ba", sa), BlobStore(tmp_path / "bb", sb)
            data = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)  # 3 chunks and a bit
            digest = holder.put(data)
            server = Endpoint(NodeKey.generate(), Handlers(rpc={
                "blob.get": _Damaging(holder, damaged).serve}))
            client = Endpoint(NodeKey.generate(), Handlers())
            (address, *_) = await server.start("127.0.0.1", 0)
            await client.start("127.0.0.1", 0)
            try:
                conn = await client.connect(address, server.key.node_id)
                seen: list[tuple[int, int]] = []
                if fetched:
                    await fetch_blob(conn, digest, fetcher,
                                     progress=lambda a, b: seen.append((a, b)))
                    assert fetcher.get(digest) == data
                    assert seen[-1] == (len(data), len(data)) and len(seen) >= 4
                else:
                    with pytest.raises(BlobCorrupt, match="arrived damaged 2 times"):
                        await fetch_blob(conn, digest, fetcher)
                    assert not fetcher.has(digest)
                # Nothing half-received is left behind.
                assert not list((tmp_path / "bb").glob(".incoming*"))
                with pytest.raises(BlobMissing):
                    await fetch_blob(conn, blob_id(b"nobody has this"), fetcher)
            finally:
                await client.close()
                await server.close()
    asyncio.run(main())
