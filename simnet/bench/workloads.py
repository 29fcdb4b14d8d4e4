"""Workloads end to end: submit to running and to result on real meshes, sandbox start, and the
wasm runtime's overhead.

- submit_to_running_ms / submit_to_result_ms (p50, p99): `jobs` prime-sieve jobs (a small
  argument, so the run itself is short), one after the other, each submitted through a node's
  control API (`blob_upload`, then `submit_job`) on a real mesh of `hmnode run` processes over loopback. Running:
  the runner's own record of when it started the job (`hmnode job` on the node that ran it;
  one machine, one clock) minus the wall time just before the submit. Result: when the
  submitter has read the result (`job_result` until it is here, then `blob_read`), polling
  every 20 ms once it is settled.
  Measured on a lone node and on `validators` validators (each offering its share; jobs land
  where allocation puts them).
- wasm_start_ms_p50: a trivial module run to its end by `WasmRuntime` (compiled module cached,
  the spare worker process ready), beside plain wasmtime instantiating and running the same
  module in this process. wasm_cold_start_ms_p50: the same, back to back, so each run waits
  for the worker process the last one left starting (what a burst of jobs sees).
- wasm_overhead_ratio: the prime sieve (10,000,000) under `WasmRuntime` (a worker process,
  memory limit, WASI capture, the time limit) over the same module under plain wasmtime (a
  default engine and WASI) in this process: the runs alternate, and the ratio is the median
  of each run's over the plain run just after it.
- process_start_ms_p50: `true` run to its end by `ProcessRuntime` (namespaces, rlimits, the
  scratch mount), beside a plain `subprocess.run(["true"])` (null where the sandbox cannot be
  made).
Floors: 4-node submit_to_running_ms_p50 <= 500; wasm_overhead_ratio <= 1.15.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime

from hmnode.catalog import TEMPLATES
from hmnode.errors import HmnodeError
from hmnode.jobspec import from_template, with_overrides
from hmnode.simnet.bench.consensus import call, percentile, temp_root, wait_chain
from hmnode.simnet.local import LocalMesh, node_name
from hmnode.process_runtime import ProcessLimits, ProcessRuntime, sandbox_unavailable
from hmnode.blob_control import fetch_result, upload_blob
from hmnode.wasm_runtime import WasmLimits, WasmRuntime

DEFAULT_RUNS = 1
STEPS_PER_RUN = 3
VALIDATORS = 4
JOBS = 20
SIEVE_ARG = "100000"  # a run of a few milliseconds: the figures are the mesh's, not the job's
OVERHEAD_ARG = "10000000"
OVERHEAD_RUNS = 9
START_RUNS = 50
COLD_RUNS = 10
READY_S = 90.0
OFFER_S = 90.0
JOB_S = 60.0
POLL_S = 0.02
FLOORS = {"submit_to_running_ms_p50": 500.0, "wasm_overhead_ratio": 1.15}
TRIVIAL_WAT = '(module (memory (export "memory") 1) (func (export "_start")))'


class BenchError(HmnodeError):
    """The mesh did not come up, or a job did not run, so there is nothing to measure."""


# --- the sandbox alone ----------------------------------------------------------------------

def _plain_run(engine: wasmtime.Engine, module: wasmtime.Module, args: list[str],
               work: Path) -> float:
    """Seconds to instantiate and run `module` under plain wasmtime with WASI."""
    started = time.perf_counter()
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["job", *args]
    wasi.stdout_file = str(work / "plain.out")
    store = wasmtime.Store(engine)
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    start(store)
    return time.perf_counter() - started


def sandbox_figures(work: Path) -> dict[str, Any]:
    """wasm start and overhead, each beside plain wasmtime."""
    runtime = WasmRuntime(work / "cache")
    engine = wasmtime.Engine()
    try:
        trivial = wasmtime.wat2wasm(TRIVIAL_WAT)
        sieve = TEMPLATES["prime-sieve"].program()
        limits = WasmLimits(time_s=60.0, memory_mib=64)
        runtime.module(trivial)  # compiled once: the figure is a cached start
        # Back to back, each run waits for the worker the last one left starting (the cold
        # start a burst of jobs sees); spaced out, the spare is ready (the usual case).
        cold = [_timed(lambda: runtime.run(trivial, [], b"", work / "s", work / "r", limits))
                for _ in range(COLD_RUNS)]
        ours = [_timed(lambda: runtime.run(trivial, [], b"", work / "s", work / "r", limits))
                for _ in range(START_RUNS) if runtime.warm()]
        plain_trivial = wasmtime.Module(engine, trivial)
        plain = [_plain_run(engine, plain_trivial, [], work) for _ in range(START_RUNS)]
        runtime.module(sieve)
        plain_sieve = wasmtime.Module(engine, sieve)
        # Interleaved, so a change in the machine's load falls on both alike.
        sandboxed, bare = [], []
        for _ in range(OVERHEAD_RUNS):
            runtime.warm()
            sandboxed.append(_timed(lambda: runtime.run(sieve, [OVERHEAD_ARG], b"", work / "s",
                                                        work / "r", limits)))
            bare.append(_plain_run(engine, plain_sieve, [OVERHEAD_ARG], work))
    finally:
        runtime.close()
    process: dict[str, Any] = {"process_start_ms_p50": None, "plain_process_start_ms_p50": None}
    if sandbox_unavailable() is None:
        sandbox = ProcessRuntime()
        limits_p = ProcessLimits(time_s=10.0, memory_mib=64)
        started = [_timed(lambda: sandbox.run(["true"], b"", work / "ps", work / "pr", limits_p))
                   for _ in range(START_RUNS)]
        plain_p = [_timed(lambda: subprocess.run(["true"], check=True))
                   for _ in range(START_RUNS)]
        process = {"process_start_ms_p50": round(statistics.median(started) * 1000, 3),
                   "plain_process_start_ms_p50": round(statistics.median(plain_p) * 1000, 3)}
    return {**process, "wasm_start_ms_p50": round(statistics.median(ours) * 1000, 3),
            "plain_wasm_start_ms_p50": round(statistics.median(plain) * 1000, 3),
            "wasm_cold_start_ms_p50": round(statistics.median(cold) * 1000, 3),
            "wasm_sieve_ms_p50": round(statistics.median(sandboxed) * 1000, 1),
            "plain_wasm_sieve_ms_p50": round(statistics.median(bare) * 1000, 1),
            "wasm_overhead_ratios": [round(ours / theirs, 3)
                                     for ours, theirs in zip(sandboxed, bare)],
            "wasm_overhead_ratio": round(statistics.median(
                ours / theirs for ours, theirs in zip(sandboxed, bare)), 3)}


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# --- jobs on a real mesh ---------------------------------------------------------------------

def mesh_figures(validators: int, jobs: int) -> dict[str, Any]:
    """submit-to-running and submit-to-result on a mesh of `validators` validators."""
    root = temp_root()
    mesh = LocalMesh(Path(root))
    try:
        mesh.up(validators, validators=validators, env={"HMNODE_CHAIN_EMPTY_BLOCK_S": "1"})
        names = [node_name(i) for i in range(validators)]
        wait_chain(mesh, names, validators, READY_S)
        _wait_offers(mesh, names)
        ids = {call(mesh, n, "status")["node_id"]: n for n in names}
        spec = with_overrides(from_template("prime-sieve"), args=(SIEVE_ARG,))
        submitter = names[0]
        if validators > 1:  # a lone node's chain credits it; a mesh's has a faucet
            call(mesh, submitter, "transaction", {"kind": "ledger.faucet",
                                                  "body": {"amount": 100_000}, "wait": 20},
                 timeout=30)
        running, results, where = [], [], set()
        socket = mesh.data_dir(submitter).control_socket
        for _ in range(jobs):
            t0 = time.time()
            program = upload_blob(socket, spec.program)
            answer = call(mesh, submitter, "submit_job", {
                "program": program, "stdin": None, "spec": spec.chain_spec(), "wait": 20},
                timeout=30)
            job = _wait_settled(mesh, submitter, answer["job_id"])
            result = fetch_result(socket, answer["job_id"], timeout=30)
            results.append(time.time() - t0)
            if result["exit_code"] != 0:
                raise BenchError(f"a job failed: {result['reason']}")
            runner = ids[job["node"]]
            where.add(runner)
            execution = call(mesh, runner, "job", {"job_id": answer["job_id"]})["execution"]
            running.append(execution["started"] - t0)
        return {"nodes": validators, "jobs": jobs, "runners": len(where),
                "submit_to_running_ms_p50": round(percentile(running, 0.5) * 1000, 1),
                "submit_to_running_ms_p99": round(percentile(running, 0.99) * 1000, 1),
                "submit_to_result_ms_p50": round(percentile(results, 0.5) * 1000, 1),
                "submit_to_result_ms_p99": round(percentile(results, 0.99) * 1000, 1)}
    finally:
        try:
            mesh.down(timeout=10.0)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _wait_offers(mesh: LocalMesh, names: list[str]) -> None:
    """Every node registers and offers its share by itself; wait for all of them."""
    deadline = time.monotonic() + OFFER_S
    while True:
        standing = [(call(mesh, n, "status")["chain"].get("registry") or {}) for n in names]
        if all(s.get("offering") for s in standing):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"not every node offered within {OFFER_S:g} s: {standing}")
        time.sleep(0.2)


def _wait_settled(mesh: LocalMesh, name: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_S
    while True:
        job = call(mesh, name, "job", {"job_id": job_id})
        if job["state"] == "settled":
            return job
        if job["state"] in ("expired", "cancelled", "lapsed") or time.monotonic() > deadline:
            raise BenchError(f"job {job_id} is {job['state']}: {job['why_waiting']}")
        time.sleep(POLL_S)


def run(runs: int = DEFAULT_RUNS, progress: Callable[[int], None] = lambda n: None,
        validators: int = VALIDATORS, jobs: int = JOBS) -> dict[str, Any]:
    """The sandbox figures, then jobs on a lone node and on `validators` validators; with
    several runs, the median of each figure."""
    results = []
    for _ in range(runs):
        work = Path(tempfile.mkdtemp(prefix="hmnode-bench-workloads-"))
        try:
            figures: dict[str, Any] = sandbox_figures(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        progress(1)
        figures.update({f"one_node_{k}": v for k, v in mesh_figures(1, jobs).items()})
        progress(1)
        figures.update({f"mesh_{k}": v for k, v in mesh_figures(validators, jobs).items()})
        progress(1)
        results.append(figures)
    figures = {k: None if results[0][k] is None else statistics.median(r[k] for r in results)
               for k in results[0]}
    # The keys: the mesh's figures (the lone node's are beside them).
    for key in ("submit_to_running_ms_p50", "submit_to_result_ms_p50"):
        figures[key] = figures[f"mesh_{key}"]
    figures["runs"] = runs
    figures["floors"] = FLOORS
    figures["floors_ok"] = (figures["submit_to_running_ms_p50"] <= FLOORS["submit_to_running_ms_p50"]
                            and figures["wasm_overhead_ratio"] <= FLOORS["wasm_overhead_ratio"])
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    """Lines for people."""
    f = figures
    return [
        f"wasm start      {f['wasm_start_ms_p50']:8.3f} ms p50 (plain wasmtime "
        f"{f['plain_wasm_start_ms_p50']:.3f} ms); back to back {f['wasm_cold_start_ms_p50']:.1f} ms",
        f"wasm sieve      {f['wasm_sieve_ms_p50']:8.1f} ms p50 (plain wasmtime "
        f"{f['plain_wasm_sieve_ms_p50']:.1f} ms): overhead x{f['wasm_overhead_ratio']} "
        f"(floor x{FLOORS['wasm_overhead_ratio']})",
        f"lone node       submit->running {f['one_node_submit_to_running_ms_p50']:7.1f} ms p50 "
        f"({f['one_node_submit_to_running_ms_p99']:.1f} p99), ->result "
        f"{f['one_node_submit_to_result_ms_p50']:.1f} ms p50 "
        f"({f['one_node_submit_to_result_ms_p99']:.1f} p99)",
        f"{f['mesh_nodes']} validators    submit->running {f['mesh_submit_to_running_ms_p50']:7.1f} ms "
        f"p50 ({f['mesh_submit_to_running_ms_p99']:.1f} p99), ->result "
        f"{f['mesh_submit_to_result_ms_p50']:.1f} ms p50 "
        f"({f['mesh_submit_to_result_ms_p99']:.1f} p99); ran on {f['mesh_runners']} nodes "
        f"(floor {FLOORS['submit_to_running_ms_p50']:.0f} ms p50)",
        "process start   not measured: the sandbox cannot be made here"
        if f["process_start_ms_p50"] is None else
        f"process start   {f['process_start_ms_p50']:8.3f} ms p50 (plain subprocess "
        f"{f['plain_process_start_ms_p50']:.3f} ms)",
    ]
