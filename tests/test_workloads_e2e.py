"""Workloads end to end with real `hmnode run` processes: a lone node runs a submitted WASM job
(it is its own validator and contributor) and settles it in its ledger; on a mesh of three, a
job submitted by one node runs on another, which pulls the program from the submitter over
QUIC, and the submitter fetches the result back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from conftest import hmnode, wait_until
from hmnode import control
from hmnode.errors import ControlError
from hmnode.process_runtime import sandbox_unavailable
from hmnode.simnet.local import LocalMesh, node_name

FAST = {"HMNODE_CHAIN_EMPTY_BLOCK_S": "1"}


def run_json(data_dir: Path, *args: str, timeout: float = 60) -> Any:
    done = hmnode(*args, "--data-dir", data_dir, "--json", timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def offering(mesh: LocalMesh, name: str) -> bool:
    status = control.call(mesh.data_dir(name).control_socket, "status")
    return bool((status["chain"].get("registry") or {}).get("offering"))


def test_a_lone_node_runs_a_submitted_job_end_to_end(mesh_factory: Any, tmp_path: Path) -> None:
    mesh = mesh_factory(1, env=FAST)
    data_dir = mesh.data_dir(node_name(0)).path
    # The node registers and offers its share by itself; an offer asked for meanwhile (which
    # plots and registers too) waits for the same plot and takes the node's registration.
    offer = {"cores": 2, "memory_mib": 2048, "runtimes": ["wasm"], "expires_height": 100_000,
             "price": {"core_hour": 10, "gib_hour": 1, "gpu_hour": 0, "start_fee": 1}}
    asked = control.call(mesh.data_dir(node_name(0)).control_socket, "transaction",
                         {"kind": "offer.commit", "body": offer, "wait": 30}, timeout=60)
    assert asked["ok"], asked
    wait_until(lambda: offering(mesh, node_name(0)), "the node to offer its share", timeout=60)
    before = run_json(data_dir, "ledger")["account"]["balance"]

    done = hmnode("submit", "--template", "prime-sieve", "--wait", "--data-dir", data_dir,
                  timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "primes below 10000000: 664579\n"
    assert "exit 0 (exited)" in done.stderr
    job_id = done.stderr.split()[1]

    job = run_json(data_dir, "job", job_id)
    assert job["state"] == "settled" and job["node"] == job["owner"]
    assert [h["state"] for h in job["history"]] == ["queued", "allocated", "settled"]
    assert all(h["at"] for h in job["history"]) and job["execution"]["state"] == "reported"
    receipt = job["receipt"]
    # Not metered: its work is the CPU time it used.
    assert receipt["exit_code"] == 0 and receipt["fuel"] == 0 and receipt["cpu_ms"] > 0
    assert 0 < receipt["paid"] <= job["cost"]
    # It paid itself: the escrow is empty, its balance is back where it was.
    ledger = run_json(data_dir, "ledger")
    assert ledger["totals"]["escrow"] == 0 and ledger["account"]["balance"] == before

    out = tmp_path / "out"
    fetched = hmnode("result", job_id, "-o", out, "--data-dir", data_dir)
    assert fetched.returncode == 0, fetched.stderr
    assert (out / "stdout").read_text() == "primes below 10000000: 664579\n"
    assert json.loads((out / "result.json").read_text())["exit_code"] == 0

    # A job with a bad argument runs, fails, and says why; the node is still paid.
    bad = hmnode("submit", "--template", "prime-sieve", "--arg", "lots", "--wait",
                 "--data-dir", data_dir, "--json", timeout=120)
    assert bad.returncode == 0, bad.stderr
    assert json.loads(bad.stdout)["exit_code"] == 2
    # Blobs through the control API: bad uploads and reads are refused and change nothing.
    socket = mesh.data_dir(node_name(0)).control_socket
    for method, params, why in (
            ("blob_upload", {"data": b"x" * (2 << 20)}, "data is at most"),
            ("blob_upload", {"upload": "feedbeef", "data": b"x"}, "no upload feedbeef"),
            ("blob_read", {"id": "00" * 32}, "does not hold blob"),
            ("blob_read", {"id": "nothex"}, "is not a blob id"),
            ("submit_job", {"program": "00" * 32, "spec": {"runtime": "wasm"}},
             "upload it first")):
        with pytest.raises(ControlError, match=why):
            control.call(socket, method, params)
    # A fuel budget meters the run, and running out ends it with that reason.
    metered = hmnode("submit", "--template", "prime-sieve", "--fuel", "100000", "--wait",
                     "--data-dir", data_dir, "--json", timeout=120)
    assert metered.returncode == 0, metered.stderr
    outcome = json.loads(metered.stdout)
    assert outcome["reason"] == "fuel limit: it burned all 100000 units of fuel"
    assert run_json(data_dir, "job", outcome["job_id"])["receipt"]["fuel"] == 100_000


def test_a_job_runs_on_another_node_and_its_result_comes_back(mesh_factory: Any,
                                                             tmp_path: Path) -> None:
    # Node 0 is the one validator, so the only node with stake to offer; node 1 submits.
    mesh = mesh_factory(3, env=FAST)
    submitter = mesh.data_dir(node_name(1)).path
    wait_until(lambda: offering(mesh, node_name(0)), "node 0 to offer its share", timeout=60)
    assert run_json(submitter, "faucet", "1000")["ok"]
    runner_dir = mesh.data_dir(node_name(0)).path
    balance_before = run_json(runner_dir, "ledger")["account"]["balance"]
    job = run_json(submitter, "submit", "--template", "prime-sieve", "--arg", "1000000",
                   "--wait", timeout=120)
    assert job["stdout"] == "primes below 1000000: 78498\n" and job["exit_code"] == 0
    runner = control.call(mesh.data_dir(node_name(0)).control_socket, "status")["node_id"]
    assert job["node"] == runner
    # The runner pulled the program from the submitter; the submitter pulled the result.
    record = run_json(submitter, "job", job["job_id"])
    assert record["owner"] != runner and record["receipt"]["exit_code"] == 0
    # The runner's earnings are what the chain paid it, and what its balance gained.
    earned = run_json(runner_dir, "earnings")
    assert [(j["job_id"], j["paid"]) for j in earned["jobs"]] == [
        (job["job_id"], record["receipt"]["paid"])]
    assert earned["balance"] - balance_before == earned["total"] > 0

    # Larger than a control message both ways: a 5 MiB program, 6.4 MiB of output. They move
    # in chunks (the CLI's upload, QUIC between the nodes, the CLI's read), with a progress bar.
    program = tmp_path / "big.wasm"
    program.write_bytes(with_padding(wasmtime.wat2wasm(WRITES_6_MIB), 5 << 20))
    submitted = run_json(submitter, "submit", "--wasm", program, "--time-limit", "30")
    wait_until(lambda: run_json(submitter, "job", submitted["job_id"])["state"] == "settled",
               "the big job to settle", timeout=120)
    out = tmp_path / "out"
    fetched = hmnode("result", submitted["job_id"], "-o", out, "--data-dir", submitter)
    assert fetched.returncode == 0, fetched.stderr
    assert "fetching the result" in fetched.stderr
    assert (out / "stdout").read_bytes() == b"x" * (100 * 65536)


# Fills its first page with "x" and writes it to stdout 100 times.
WRITES_6_MIB = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $i i32)
    (memory.fill (i32.const 0) (i32.const 120) (i32.const 65536))
    (i32.store (i32.const 65536) (i32.const 0)) (i32.store (i32.const 65540) (i32.const 65536))
    (loop $l
      (drop (call $w (i32.const 1) (i32.const 65536) (i32.const 1) (i32.const 65544)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))))"""


def with_padding(wasm: bytes, size: int) -> bytes:
    """`wasm` with a custom section (which runtimes ignore) that makes it `size` bytes or so."""
    name = b"padding"
    payload = bytes([len(name)]) + name + b"\0" * size
    length, leb = len(payload), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        leb.append(byte | (0x80 if length else 0))
        if not length:
            break
    return wasm + b"\0" + bytes(leb) + payload


def test_a_job_interrupted_by_a_crash_runs_again(mesh_factory: Any, tmp_path: Path) -> None:
    mesh = mesh_factory(1, env=FAST)
    name = node_name(0)
    data_dir = mesh.data_dir(name).path
    wait_until(lambda: offering(mesh, name), "the node to offer its share", timeout=60)
    loop = tmp_path / "loop.wat"
    loop.write_text('(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))')
    submitted = run_json(data_dir, "submit", "--wasm", loop, "--time-limit", "4")
    job_id = submitted["job_id"]

    def running() -> bool:
        return (run_json(data_dir, "job", job_id).get("execution") or {}).get("state") == "running"
    wait_until(running, "the job to start", timeout=30)
    mesh.kill(name)
    mesh.start(name)
    # Restarted, the node finds the run it lost and runs the job again, to its time limit.
    settled = wait_until(lambda: run_json(data_dir, "job", job_id)["state"] == "settled",
                         "the job to run again and settle", timeout=60)
    assert settled
    result = run_json(data_dir, "result", job_id)
    assert result["reason"] == "time limit: it ran past 4 s" and result["exit_code"] == 1
    assert "running it again" in mesh.log_file(name).read_text()

    # SIGTERM while a long job runs: the node stops cleanly within 5 s, without waiting for it.
    job_id = run_json(data_dir, "submit", "--wasm", loop, "--time-limit", "60")["job_id"]
    wait_until(running, "the long job to start", timeout=30)
    started = time.monotonic()
    (outcome,) = mesh.down(timeout=5.0)
    assert outcome.outcome == "clean" and time.monotonic() - started < 5.0, outcome


def test_replicas_agree_and_the_node_with_a_wrong_result_is_not_paid(mesh_factory: Any) -> None:
    # Three validators, each offering its share; node 2 reports wrong results (a test fault).
    mesh = mesh_factory(3, validators=3, env=FAST)
    faulty = node_name(2)
    mesh.kill(faulty)
    mesh.start(faulty, env={"HMNODE_TEST_FAULT": "wrong-result"})
    for i in range(3):
        wait_until(lambda i=i: offering(mesh, node_name(i)), f"node {i} to offer", timeout=90)
    submitter = mesh.data_dir(node_name(0)).path
    assert run_json(submitter, "faucet", "1000")["ok"]
    before = {i: run_json(mesh.data_dir(node_name(i)).path, "ledger")["account"]["balance"]
              for i in range(3)}
    result = run_json(submitter, "submit", "--template", "prime-sieve", "--arg", "1000",
                      "--replicas", "3", "--wait", timeout=120)
    assert result["stdout"] == "primes below 1000: 168\n"
    job = run_json(submitter, "job", result["job_id"])
    outcome = job["outcome"]
    wrong = control.call(mesh.data_dir(faulty).control_socket, "status")["node_id"]
    assert outcome["agreeing"] == 2 and outcome["reported"] == 3
    assert outcome["disagreeing"] == [wrong] and outcome["quorum"] == 2
    after = {i: run_json(mesh.data_dir(node_name(i)).path, "ledger")["account"]["balance"]
             for i in range(3)}
    assert after[2] == before[2]  # the wrong one was not paid
    assert after[1] > before[1]  # an agreeing one was (node 0 paid itself as well)


@pytest.mark.skipif(sandbox_unavailable() is not None,
                    reason=f"no process sandbox here: {sandbox_unavailable()}")
def test_process_jobs_run_sandboxed_where_the_contributor_allows(mesh_factory: Any,
                                                                  tmp_path: Path) -> None:
    mesh = mesh_factory(1, env={**FAST, "HMNODE_SHARE_PROCESS": "true"})
    data_dir = mesh.data_dir(node_name(0)).path
    wait_until(lambda: offering(mesh, node_name(0)), "the node to offer", timeout=60)
    text = tmp_path / "text.txt"
    text.write_text("the cat saw the dog\nthe end\n")
    counted = hmnode("submit", "--template", "word-count", "--stdin", text, "--wait",
                     "--data-dir", data_dir, timeout=120)
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.splitlines()[:2] == ["lines 2 words 7 characters 28", "       3 the"]
    escape = run_json(data_dir, "submit", "--cmd",
                      "echo hi; echo x > /etc/hmnode-escape || echo refused; "
                      "ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 || echo offline", "--wait",
                      timeout=120)
    assert escape["stdout"] == "hi\nrefused\noffline\n" and escape["exit_code"] == 0
    assert not Path("/etc/hmnode-escape").exists()
