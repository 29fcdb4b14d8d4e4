"""A running node's workloads: its blobs (kept and served over QUIC), the executor that runs the
jobs allocated to it, the offer it keeps on the chain, and the control methods behind
`hmnode submit`, `hmnode job` and `hmnode result`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hmnode import schema
from hmnode.blob_control import BlobControl
from hmnode.blob_transfer import BlobServer
from hmnode.blobs import BlobStore, parse_blob_id
from hmnode.chain_service import ChainService, job_json
from hmnode.control import MethodError
from hmnode.errors import HmnodeError
from hmnode.executor import JobExecutor
from hmnode.hardware import GpuInfo
from hmnode.identity import NodeId, NodeKey
from hmnode.jobs import replica_id
from hmnode.process_runtime import ProcessRuntime
from hmnode.store import Store
from hmnode.wasm_runtime import WasmRuntime

log = logging.getLogger(__name__)

MAX_PROGRAM_BYTES = 64 << 20
COLLECT_S = 600.0
DEFAULT_DEADLINE_BLOCKS = 1_000
# Tests of replica validation set this to "wrong-result" on one node: it reports wrong results.
FAULT_ENV = "HMNODE_TEST_FAULT"
SETTLED_STATES = ("settled", "rejected", "expired", "cancelled", "lapsed")


class WorkloadService:
    """Blobs, the executor and the workload control methods of one node."""

    def __init__(self, key: NodeKey, store: Store, data_dir: Path, chain: ChainService,
                 mesh: Any, endpoint: Any, process: bool = False,
                 unsandboxed: bool = False,
                 gpus: Callable[[], tuple[GpuInfo, ...]] = tuple,
                 storage_bytes: Callable[[], int] = lambda: 1 << 30) -> None:
        self.key = key
        self.store = store
        self.storage_bytes = storage_bytes  # unpinned blobs kept, at most
        self.chain = chain
        self.mesh = mesh
        self.blobs = BlobStore(data_dir / "blobs", store)
        self.wasm = WasmRuntime(data_dir / "cache" / "wasm")
        self.process = ProcessRuntime(unsandboxed) if process else None
        if self.process is not None and self.process.unavailable is not None:
            if unsandboxed:
                log.warning("process jobs run WITHOUT a sandbox here (%s): rlimits only",
                            self.process.unavailable)
            else:
                log.warning("process jobs are not offered: %s", self.process.unavailable)
                self.process = None
        self.executor = JobExecutor(
            key, store, self.blobs, chain, mesh, data_dir / "work", self.wasm, self.process,
            wrong_results=os.environ.get(FAULT_ENV) == "wrong-result", gpus=gpus)
        endpoint.handlers.rpc = {**endpoint.handlers.rpc, "blob.get": BlobServer(self.blobs).serve}
        self.blob_control = BlobControl(self.blobs, mesh)
        chain.commit_listeners.append(self.executor.wake)

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes this node can run jobs with."""
        return ("wasm",) if self.process is None else ("wasm", "process")

    async def run(self) -> None:
        collecting = asyncio.ensure_future(self._collect())
        try:
            await self.executor.run()
        finally:
            collecting.cancel()
            self.blob_control.close()
            self.wasm.close()

    async def _collect(self) -> None:
        """Now and then, drop the blobs nobody pinned (programs and inputs pulled to run a
        job) past the storage the contributor shares, least recently used first."""
        while True:
            await asyncio.sleep(COLLECT_S)
            try:
                removed = self.blobs.collect(self.storage_bytes())
            except (HmnodeError, OSError) as exc:
                log.warning("cannot collect unused blobs: %s", exc)
                continue
            if removed:
                log.info("dropped %d unused blobs", len(removed))

    def methods(self) -> dict[str, Any]:
        """The control methods this service answers."""
        return {"submit_job": self._submit_job, "job": self._job, "job_result": self._job_result,
                **self.blob_control.methods()}

    # --- control methods ------------------------------------------------------------------------

    async def _submit_job(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """{"program": blob id, "stdin": blob id or None, "spec", "wait"}: the blobs were
        uploaded first (`blob_upload`) and stay here, pinned: the node that runs the job
        pulls them from this one."""
        program = self._held_blob(params.get("program"), "program")
        stdin = None if params.get("stdin") is None else self._held_blob(params["stdin"], "stdin")
        spec = params.get("spec")
        if not isinstance(spec, dict):
            raise MethodError("bad_request", "spec is a map (runtime, resources, price, ...)")
        body = dict(spec)
        args, fuel = body.pop("args", []), body.pop("fuel", None)
        deadline_blocks = body.pop("deadline_blocks", DEFAULT_DEADLINE_BLOCKS)
        if isinstance(deadline_blocks, bool) or not isinstance(deadline_blocks, int):
            raise MethodError("bad_request", "spec.deadline_blocks is a number of blocks")
        body.setdefault("deadline_height", self.chain.head_height() + deadline_blocks)
        body["program"] = {"blob": program, "args": args, "stdin": stdin}
        if fuel is not None:
            body["program"]["fuel"] = fuel
        try:
            tx = self.chain.sign_and_submit("job.submit", body)
        except HmnodeError as exc:
            raise MethodError("refused", str(exc)) from None
        wait = params.get("wait", 10)
        try:
            await self.chain.wait_committed(tx.tx_id, float(wait))
        except TimeoutError:
            raise MethodError("timeout", f"job {tx.tx_id.hex()} was not committed within "
                                         f"{wait} s; it may still be") from None
        done = self.chain.tx_result(tx.tx_id) or {}
        if not done.get("ok"):
            raise MethodError("refused", f"the chain refused the job: {done.get('rejected')}")
        return {"job_id": tx.tx_id.hex(), "height": done["height"]}

    def _held_blob(self, value: Any, name: str) -> bytes:
        try:
            digest = parse_blob_id(str(value))
        except HmnodeError as exc:
            raise MethodError("bad_request", f"{name}: {exc}") from None
        info = self.blobs.info(digest)
        if info is None or not self.blobs.has(digest):
            raise MethodError("bad_request", f"{name}: this node holds no blob {value}; "
                                             "upload it first (blob_upload)")
        if name == "program" and info.size > MAX_PROGRAM_BYTES:
            raise MethodError("bad_request", f"a program is at most {MAX_PROGRAM_BYTES} bytes")
        return digest

    def _record(self, params: Mapping[str, Any]) -> tuple[bytes, dict]:
        try:
            job_id = bytes.fromhex(str(params.get("job_id")))
        except ValueError:
            job_id = b""
        record = self.store.read(lambda txn: txn.get(schema.JOBS, job_id)) if job_id else None
        if record is None:
            raise MethodError("not_found", f"no job {params.get('job_id')} on this chain")
        return job_id, record

    def _agreed_replica(self, job_id: bytes, record: dict) -> tuple[bytes, dict]:
        """For a job of replicas: one that reported the agreed result (else `record`)."""
        agreed = (record.get("outcome") or {}).get("result_hash")
        if agreed is None:
            return job_id, record
        ids = [record["group"]] + [replica_id(record["group"], i)
                                   for i in range(1, record["replicas"])]
        for rid in ids:
            member = self.store.read(lambda txn, r=rid: txn.get(schema.JOBS, r))
            if member["state"] == "settled":
                return rid, member
        return job_id, record

    async def _job(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A job with its history: each state with its height and that block's time, and this
        node's run of it (started, finished) where it ran it."""
        job_id, record = self._record(params)
        out = job_json(job_id, record)
        times = self.chain.block_times([h for _, h in record["history"]])
        out["history"] = [{"state": s, "height": h, "at": times.get(h)}
                          for s, h in record["history"]]
        execution = self.executor.execution(job_id)
        if execution is not None:
            out["execution"] = {"state": execution["state"], "started": execution.get("started"),
                                "finished": execution.get("finished"),
                                "reason": (execution.get("result") or {}).get("reason")}
        return out

    async def _job_result(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Where a settled job's result is: {"state": "ready", "result_hash", "size", ...}
        once kept here (read it with `blob_read`), else {"state": "pulling", "got", "size"}
        while it is pulled from the node that ran it."""
        job_id, record = self._record(params)
        if record.get("replicas", 1) > 1:
            job_id, record = self._agreed_replica(job_id, record)
        receipt = record.get("receipt")
        if receipt is None:
            raise MethodError("not_ready", f"job {job_id.hex()} is {record['state']}; it has no "
                                           "result" + ("" if record["state"] in SETTLED_STATES
                                                       else " yet"))
        digest = receipt["result_hash"]
        pull = self.blob_control.pull(NodeId(record["node"]), digest)
        if pull is not None and pull.error is not None:
            raise MethodError("unavailable", f"cannot get the result of job {job_id.hex()}: "
                                             f"{pull.error}")
        if pull is not None:
            return {"state": "pulling", "got": pull.got, "size": pull.size}
        info = self.blobs.info(digest)
        return {"state": "ready", "job_id": job_id.hex(), "result_hash": digest.hex(),
                "size": None if info is None else info.size,
                "node": str(NodeId(record["node"])), "receipt": job_json(job_id, record)["receipt"]}
