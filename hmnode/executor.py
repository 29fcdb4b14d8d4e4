"""Runs the jobs the chain allocates to this node, and reports each with a signed receipt.

After every commit the executor looks for jobs allocated to this node that it has not run. For
each it first records the execution in LMDB (`schema.EXECUTIONS`, state "running"), fetches
the program and stdin blobs (kept here, or pulled from the job's owner over QUIC), runs it in
its runtime's sandbox, keeps the result as a blob (exit code, why it ended, stdout, stderr: the
result hash is its id), records it ("finished") and submits the receipt ("reported").

Nothing is dropped silently: a node restarted in the middle of a job finds it "running" and
runs it again while the job is still allocated to it; one that finished but was not reported
is reported; a job that cannot run (no program, a runtime this node lacks, a blob nobody
serves) is reported with that reason as its result and a non-zero exit code.

When the contributor's rules pause sharing, the runs are suspended (and no new one starts);
past the grace period every job allocated here is given back to the mesh (`job.release`, with
the reason; state "released"), its run killed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

from hmnode import schema
from hmnode.blob_transfer import blob_from
from hmnode.blobs import BlobStore
from hmnode.errors import HmnodeError
from hmnode.hardware import GpuInfo
from hmnode.identity import NodeId, NodeKey
from hmnode.store import Store
from hmnode.supervisor import in_daemon_thread
from hmnode.transport.connection import TransportError
from hmnode.process_runtime import ProcessLimits, ProcessRuntime
from hmnode.run_result import RunResult
from hmnode.wasm_runtime import WasmLimits, WasmRuntime

log = logging.getLogger(__name__)

RUNNING, FINISHED, REPORTED, RELEASED = "running", "finished", "reported", "released"
SCAN_S = 2.0  # looks for work at least this often, besides after every commit
RECEIPT_RETRY_S = 30.0  # a receipt not committed by then is submitted again
EXIT_CANNOT_RUN = 125  # the job never started (as a shell reports a command it cannot run)


def pick_gpus(gpus: tuple[GpuInfo, ...], model: str | None, count: int,
               busy: set[str]) -> tuple[str, ...] | None:
    """The UUIDs of `count` GPUs of `model` (the one allocation chose) that no other job on
    this node holds, lowest index first; None if there are not that many free."""
    free = [g for g in sorted(gpus, key=lambda g: g.index)
            if (model is None or g.name == model) and g.uuid not in busy]
    return tuple(g.uuid for g in free[:count]) if len(free) >= count else None


class JobExecutor:
    """This node's side of the jobs allocated to it."""

    def __init__(self, key: NodeKey, store: Store, blobs: BlobStore, chain: Any, mesh: Any,
                 work_dir: Path, wasm: WasmRuntime, process: ProcessRuntime | None = None,
                 slots: int = 2, wrong_results: bool = False,
                 gpus: Callable[[], tuple[GpuInfo, ...]] = tuple) -> None:
        self.key = key
        self.store = store
        self.blobs = blobs
        self.chain = chain  # ChainService: sign_and_submit, tx_result
        self.mesh = mesh  # Mesh: connect, addresses_of
        self.work_dir = work_dir
        self.wasm = wasm
        self.process = process  # None: this node runs no process jobs
        # A fault for tests of replica validation: every result this node reports is wrong.
        self.wrong_results = wrong_results
        self._slots = asyncio.Semaphore(slots)
        self._wake = asyncio.Event()
        self._active: dict[bytes, asyncio.Task] = {}
        self.gpus = gpus  # this node's GPUs, as last probed
        self._pinned: dict[bytes, tuple[str, ...]] = {}  # job -> the GPUs it holds
        self._cores: dict[bytes, int] = {}  # job -> the cores it runs on, while it runs
        self.suspended = False
        # Per runtime: runs, CPU and wall seconds, limits hit, the last run's peak memory.
        self.sandbox_stats: dict[str, dict[str, float]] = {}
        self._giving_back: str | None = None  # why jobs go back to the mesh, while they do

    # --- the contributor's rules ----------------------------------------------------------------

    def suspend(self) -> None:
        """Sharing paused: suspend what runs, start nothing new."""
        self.suspended = True
        self.wasm.suspend()
        if self.process is not None:
            self.process.suspend()

    def resume(self) -> None:
        """Sharing resumed: let the runs go on, and look for work."""
        self.suspended, self._giving_back = False, None
        self.wasm.resume()
        if self.process is not None:
            self.process.resume()
        self.wake()

    def give_back(self, reason: str) -> None:
        """Paused past the grace period: every job allocated here goes back to the mesh,
        once the chain holds this node's offer as paused (else a job given back could be
        placed here again at once)."""
        self._giving_back = reason
        self.wake()

    def _kill_runs(self) -> None:
        for job_id in list(self._active):
            token = job_id.hex()
            if not self.wasm.kill(token) and self.process is not None:
                self.process.kill(token)

    def _offer_paused(self, txn: Any) -> bool:
        held = txn.get(schema.OFFERS, self.key.node_id.key)
        return held is None or "paused" in held

    def cores_in_use(self) -> int:
        """Cores the jobs running here were given."""
        return sum(self._cores.values())

    def wake(self) -> None:
        """A block committed: look for new work."""
        self._wake.set()

    async def run(self) -> None:
        """Look for work after each commit (and every SCAN_S) until cancelled."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), SCAN_S)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                try:
                    self._scan()
                except HmnodeError as exc:
                    log.warning("cannot look for jobs to run: %s", exc)
        finally:
            for task in self._active.values():
                task.cancel()

    def _scan(self) -> None:
        me = self.key.node_id.key

        def read(txn: Any) -> tuple[list[tuple[bytes, dict, dict | None]], bool]:
            mine = []
            for key, job_id in txn.items(schema.JOB_INDEX):
                if key[:1] != b"a":
                    continue
                record = txn.get(schema.JOBS, job_id)
                if record["node"] == me:
                    mine.append((job_id, record, txn.get(schema.EXECUTIONS, job_id)))
            return mine, self._offer_paused(txn)
        now = time.time()
        mine, paused = self.store.read(read)
        giving_back = self._giving_back if paused else None
        if giving_back is not None:
            self._kill_runs()
        for job_id, record, execution in mine:
            if job_id in self._active:
                continue
            state = None if execution is None else execution["state"]
            if state == RELEASED and self._giving_back is None:
                execution, state = None, None  # given back once, allocated here again
            if giving_back is not None and state in (None, RUNNING, RELEASED):
                if state != RELEASED or now - execution["released"] >= RECEIPT_RETRY_S:
                    self._release(job_id, giving_back)
                continue
            if self.suspended and state in (None, RUNNING):
                continue  # started when sharing resumes
            if state == REPORTED and now - execution["reported"] < RECEIPT_RETRY_S:
                continue
            if state == RUNNING:
                log.warning("job %s was running when this node stopped; running it again",
                            job_id.hex(), extra={"event": "job_interrupted",
                                                 "job_id": job_id.hex()})
            task = asyncio.ensure_future(self._handle(job_id, record, execution))
            self._active[job_id] = task
            task.add_done_callback(lambda _, j=job_id: self._active.pop(j, None))

    async def _handle(self, job_id: bytes, record: dict, execution: dict | None) -> None:
        try:
            if execution is None or execution["state"] == RUNNING:
                async with self._slots:
                    execution = await self._execute(job_id, record)
            if self._giving_back is not None and execution["state"] == RUNNING:
                self._release(job_id, self._giving_back)  # its run was killed for it
                return
            self._report(job_id, execution)
        except Exception:  # noqa: BLE001 - one job's failure must not stop the others
            log.exception("job %s failed in this node's executor", job_id.hex())

    async def _execute(self, job_id: bytes, record: dict) -> dict:
        started = time.time()
        self._put(job_id, {"state": RUNNING, "started": started})
        log.info("job %s started", job_id.hex(), extra={"event": "job_started",
                                                       "job_id": job_id.hex()})
        self._cores[job_id] = record["spec"][0]
        try:
            outcome = await self._outcome(job_id, record)
        finally:
            self._cores.pop(job_id, None)
        if self._giving_back is not None:
            return {"state": RUNNING, "started": started}  # killed to be given back
        self._count(record["spec"][2], outcome)
        digest = self.blobs.put(outcome.result_blob(), pin=True)
        execution = {"state": FINISHED, "started": started, "finished": time.time(),
                     "result": {"result_hash": digest, "exit_code": outcome.exit_code,
                                "reason": outcome.reason, "wall_ms": outcome.wall_ms,
                                "cpu_ms": outcome.cpu_ms, "fuel": outcome.fuel,
                                "peak_memory_mib": outcome.peak_memory_mib}}
        self._put(job_id, execution)
        log.info("job %s finished: exit %d, %s", job_id.hex(), outcome.exit_code, outcome.reason,
                 extra={"event": "job_finished", "job_id": job_id.hex()})
        return execution

    async def _outcome(self, job_id: bytes, record: dict) -> RunResult:
        cores, memory_mib, runtime, duration_s, *_ = record["spec"]
        program = record.get("program")
        if program is None:
            return RunResult(EXIT_CANNOT_RUN, "the job names no program to run", b"", b"")
        if runtime == "process" and self.process is None:
            return RunResult(EXIT_CANNOT_RUN, "this node does not run process jobs", b"", b"")
        owner = NodeId(record["owner"])
        try:
            code = await blob_from(self.blobs, self.mesh, owner, program["blob"])
            stdin = b"" if program["stdin"] is None else await blob_from(
                self.blobs, self.mesh, owner, program["stdin"])
        except (HmnodeError, TransportError) as exc:
            return RunResult(EXIT_CANNOT_RUN, f"cannot get the job's blobs: {exc}", b"", b"")
        work = self.work_dir / job_id.hex()
        shutil.rmtree(work, ignore_errors=True)  # what a run interrupted here left
        args, name = list(program["args"]), f"hmnode-job-{job_id.hex()[:8]}"
        try:
            if runtime == "wasm":
                result = await in_daemon_thread(
                    self.wasm.run, code, args, stdin, work / "scratch", work / "run",
                    WasmLimits(time_s=float(duration_s), memory_mib=memory_mib,
                               fuel=program.get("fuel")), job_id.hex(), name=name)
            else:
                assert self.process is not None
                gpu_count = record["spec"][5]
                busy = {u for held in self._pinned.values() for u in held}
                pinned = pick_gpus(self.gpus(), record.get("gpu"), gpu_count, busy)
                if pinned is None:
                    return RunResult(EXIT_CANNOT_RUN, f"this node has not {gpu_count} free GPUs "
                                     f"of model {record.get('gpu')}", b"", b"")
                self._pinned[job_id] = pinned
                # The program lands in the scratch directory as ./program; the args are the
                # command (./program itself when there are none).
                (work / "scratch").mkdir(parents=True)
                (work / "scratch" / "program").write_bytes(code)
                (work / "scratch" / "program").chmod(0o755)
                result = await in_daemon_thread(
                    self.process.run, args or ["./program"], stdin, work / "scratch",
                    work / "run", ProcessLimits(time_s=float(duration_s), memory_mib=memory_mib,
                                                gpus=pinned, cores=cores),
                    job_id.hex(), name=name)
        except HmnodeError as exc:
            return RunResult(EXIT_CANNOT_RUN, str(exc), b"", b"")
        finally:
            self._pinned.pop(job_id, None)
            shutil.rmtree(work, ignore_errors=True)
        if self.wrong_results:
            return replace(result, stdout=result.stdout + b" (wrong on purpose)")
        return result

    def _count(self, runtime: str, outcome: RunResult) -> None:
        stats = self.sandbox_stats.setdefault(runtime, {"runs": 0, "cpu_s": 0.0, "wall_s": 0.0,
                                                        "limits": 0, "peak_bytes": 0})
        stats["runs"] += 1
        stats["cpu_s"] += outcome.cpu_ms / 1000
        stats["wall_s"] += outcome.wall_ms / 1000
        stats["limits"] += outcome.reason.split(":")[0] in ("time limit", "memory limit",
                                                             "fuel limit")
        stats["peak_bytes"] = outcome.peak_memory_mib << 20

    def states(self) -> dict[str, int]:
        """How many jobs this node has run, runs, or gave back, by state."""
        counts: dict[str, int] = {}
        for _, execution in self.store.read(lambda txn: list(txn.items(schema.EXECUTIONS))):
            counts[execution["state"]] = counts.get(execution["state"], 0) + 1
        return counts

    def _release(self, job_id: bytes, reason: str) -> None:
        """Give the job back to the mesh, saying why; it will not run here."""
        try:
            tx = self.chain.sign_and_submit("job.release", {"job_id": job_id,
                                                            "reason": reason[:200]})
        except HmnodeError as exc:
            log.warning("cannot give job %s back: %s", job_id.hex(), exc)
            return
        self._put(job_id, {"state": RELEASED, "released": time.time(), "reason": reason,
                           "release_tx": tx.tx_id})
        log.info("job %s given back to the mesh (%s)", job_id.hex(), reason,
                 extra={"event": "job_released", "job_id": job_id.hex(), "reason": reason})

    def _report(self, job_id: bytes, execution: dict) -> None:
        result = execution["result"]
        body = {"job_id": job_id, **{k: result[k] for k in (
            "result_hash", "exit_code", "wall_ms", "cpu_ms", "fuel", "peak_memory_mib")}}
        tx = self.chain.sign_and_submit("job.receipt", body)
        self._put(job_id, {**execution, "state": REPORTED, "reported": time.time(),
                           "receipt_tx": tx.tx_id})
        log.info("job %s reported (receipt %s)", job_id.hex(), tx.tx_id.hex(),
                 extra={"event": "job_reported", "job_id": job_id.hex()})

    def _put(self, job_id: bytes, execution: dict) -> None:
        self.store.write(lambda txn: txn.put(schema.EXECUTIONS, job_id, execution))

    def execution(self, job_id: bytes) -> dict | None:
        """This node's record of running `job_id`, if it ran it."""
        return self.store.read(lambda txn: txn.get(schema.EXECUTIONS, job_id))
