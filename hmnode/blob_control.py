"""Blobs through the control API, both halves: the node's methods (`blob_upload`,
`blob_read`, and pulls from other nodes it runs in the background and reports on) and the
client's loops over them (`upload_blob`, `read_blob`), which the CLI drives with progress
bars. Everything moves in chunks well under a control frame, so a 64 MiB program or a large
result never has to fit in one message, nor in the node's memory."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmnode import control
from hmnode.blob_transfer import pull_from
from hmnode.blobs import MAX_BLOB_BYTES, BlobMissing, BlobStore, BlobWriter, parse_blob_id
from hmnode.control import MethodError
from hmnode.errors import ControlError, HmnodeError
from hmnode.run_result import read_result
from hmnode.transport.connection import TransportError

CONTROL_CHUNK_BYTES = 1 << 20  # a quarter of a control frame
MAX_UPLOADS = 8  # at once; a client that opens more waits for one to end or go stale
UPLOAD_IDLE_S = 600.0  # an upload not written to for this long is dropped


@dataclass
class _Upload:
    writer: BlobWriter
    pin: bool
    touched: float


@dataclass
class Pull:
    """One blob being pulled from another node: how far it is, and how it ended."""

    got: int = 0
    size: int | None = None
    error: str | None = None
    task: asyncio.Task | None = field(default=None, repr=False)


class BlobControl:
    """The node's blob methods of the control API, and its background pulls."""

    def __init__(self, blobs: BlobStore, mesh: Any) -> None:
        self.blobs = blobs
        self.mesh = mesh
        self._uploads: dict[str, _Upload] = {}
        self._pulls: dict[bytes, Pull] = {}

    def methods(self) -> dict[str, Any]:
        """The control methods this answers."""
        return {"blob_upload": self._upload, "blob_read": self._read}

    async def _upload(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """{"upload": token or absent, "data": bytes, "done": bool, "pin": bool}: appends to
        the upload (a new one without a token); with done, keeps the blob and gives its id."""
        self._drop_stale(time.monotonic())
        data, token = params.get("data", b""), params.get("upload")
        if not isinstance(data, bytes) or len(data) > CONTROL_CHUNK_BYTES:
            raise MethodError("bad_request", f"data is at most {CONTROL_CHUNK_BYTES} bytes")
        if token is None:
            if len(self._uploads) >= MAX_UPLOADS:
                raise MethodError("busy", f"{MAX_UPLOADS} uploads are already open; try again "
                                          "when one has ended")
            token = secrets.token_hex(8)
            self._uploads[token] = _Upload(self.blobs.writer(), bool(params.get("pin")), 0.0)
        upload = self._uploads.get(token)
        if upload is None:
            raise MethodError("not_found", f"no upload {token} (it may have gone stale after "
                                           f"{UPLOAD_IDLE_S:g} s); start it again")
        upload.touched = time.monotonic()
        try:
            upload.writer.write(data)
            if not params.get("done"):
                return {"upload": token, "received": upload.writer.size}
            digest = upload.writer.commit(pin=upload.pin)
        except (HmnodeError, OSError) as exc:
            self._uploads.pop(token, None)
            upload.writer.abort()
            raise MethodError("refused", f"the blob was not kept: {exc}") from None
        del self._uploads[token]
        return {"id": digest.hex(), "size": upload.writer.size}

    def _drop_stale(self, now: float) -> None:
        for token, upload in list(self._uploads.items()):
            if now - upload.touched > UPLOAD_IDLE_S:
                upload.writer.abort()
                del self._uploads[token]

    async def _read(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """{"id": hex, "offset": int}: {"size", "data"}, a chunk of a blob kept here."""
        offset = params.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise MethodError("bad_request", "offset is a whole number of bytes")
        try:
            digest = parse_blob_id(str(params.get("id")))
            size, data = self.blobs.read_chunk(digest, offset, CONTROL_CHUNK_BYTES)
        except BlobMissing as exc:
            raise MethodError("not_found", str(exc)) from None
        except HmnodeError as exc:
            raise MethodError("bad_request", str(exc)) from None
        return {"size": size, "data": data}

    def pull(self, holder: Any, digest: bytes) -> Pull | None:
        """None once blob `digest` is kept here; else its pull from node `holder`, started if
        none runs (one that failed is reported once, then may be started again)."""
        if self.blobs.has(digest):
            self._pulls.pop(digest, None)
            return None
        pull = self._pulls.get(digest)
        if pull is not None and pull.error is not None:
            del self._pulls[digest]  # reported now; the next call tries again
            return pull
        if pull is None:
            pull = self._pulls[digest] = Pull()
            pull.task = asyncio.ensure_future(self._run_pull(pull, holder, digest))
        return pull

    async def _run_pull(self, pull: Pull, holder: Any, digest: bytes) -> None:
        def progress(got: int, size: int) -> None:
            pull.got, pull.size = got, size
        try:
            await pull_from(self.blobs, self.mesh, holder, digest, progress)
        except (HmnodeError, TransportError, OSError) as exc:
            pull.error = str(exc)

    def close(self) -> None:
        """Drop open uploads and stop pulls (what they wrote so far is removed)."""
        for upload in self._uploads.values():
            upload.writer.abort()
        self._uploads.clear()
        for pull in self._pulls.values():
            if pull.task is not None:
                pull.task.cancel()


# --- the client's side ---------------------------------------------------------------------------

Progress = Callable[[int], None]  # told how many more bytes moved


def upload_blob(socket: Path, data: bytes, pin: bool = True,
                progress: Progress | None = None) -> str:
    """Send `data` to the node as a blob, chunk by chunk; its id."""
    token, offset = None, 0
    while True:
        chunk = data[offset:offset + CONTROL_CHUNK_BYTES]
        offset += len(chunk)
        done = offset >= len(data)
        answer = control.call(socket, "blob_upload", {"upload": token, "data": chunk,
                                                      "done": done, "pin": pin}, timeout=60)
        if progress is not None:
            progress(len(chunk))
        if done:
            return answer["id"]
        token = answer["upload"]


def read_blob(socket: Path, blob: str, progress: Callable[[int, int], None] | None = None) -> bytes:
    """A blob the node keeps, read chunk by chunk and checked against its id (`progress` is
    told each chunk's length and the size)."""
    parts, got, size = [], 0, None
    digest = hashlib.sha256()
    while size is None or got < size:
        answer = control.call(socket, "blob_read", {"id": blob, "offset": got}, timeout=60)
        size, chunk = answer["size"], answer["data"]
        if not chunk and got < size or size > MAX_BLOB_BYTES:
            raise ControlError(f"the node's blob {blob} ended early")
        parts.append(chunk)
        digest.update(chunk)
        got += len(chunk)
        if progress is not None:
            progress(len(chunk), size)
    if digest.hexdigest() != blob:
        raise ControlError(f"blob {blob} was damaged on the node's disk; ask again (the node "
                           "drops a damaged blob when it next reads it)")
    return b"".join(parts)


def fetch_result(socket: Path, job_id: str, timeout: float = 120.0,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """A settled job's result (exit_code, reason, stdout, stderr, node, receipt): the node
    pulls it from the node that ran it (`progress` is told the bytes so far and the size,
    first of that pull, then of reading it here), then it is read chunk by chunk."""
    deadline = time.monotonic() + timeout
    while True:
        answer = control.call(socket, "job_result", {"job_id": job_id}, timeout=30)
        if answer["state"] == "ready":
            break
        if progress is not None and answer.get("size"):
            progress(answer["got"], answer["size"])
        if time.monotonic() > deadline:
            raise ControlError(f"the result of job {job_id} is still on its way after "
                               f"{timeout:g} s ({answer['got']} bytes so far)")
        time.sleep(0.05)
    got = 0

    def read(n: int, size: int) -> None:
        nonlocal got
        got += n
        if progress is not None:
            progress(got, size)
    data = read_blob(socket, answer["result_hash"], read)
    try:
        result = read_result(data)
    except HmnodeError as exc:
        raise ControlError(str(exc)) from None
    return {**{k: v for k, v in answer.items() if k != "state"}, **result}
