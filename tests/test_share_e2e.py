"""Sharing with real `hmnode run` processes: `hmnode share` saves settings and a running node
applies them at once; a node outside its time window pauses, its offer says so, and a job
submitted meanwhile is not placed there and says why; a job running when sharing pauses is
suspended and, past the grace period, goes back to the mesh, then runs once sharing resumes;
another node's view of the advert changes; /metrics, scraped over real HTTP, has the series;
earnings match the chain's records and the ledger."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import wasmtime

from conftest import clean_env, hmnode, wait_until
from hmnode import control
from hmnode.simnet.local import LocalMesh, node_name

FAST = {"HMNODE_CHAIN_EMPTY_BLOCK_S": "1"}
LOOP_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'


def run_json(data_dir: Path, *args: str, timeout: float = 60) -> Any:
    done = hmnode(*args, "--data-dir", data_dir, "--json", timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def closed_window() -> str:
    """A daily one-minute window twelve hours from now: the node is outside it."""
    start = datetime.now() + timedelta(hours=12)
    end = start + timedelta(minutes=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def share_status(mesh: LocalMesh, name: str) -> dict[str, Any]:
    return control.call(mesh.data_dir(name).control_socket, "status")["share"]


def registry(data_dir: Path) -> dict[str, Any]:
    """This node's standing in the chain's registry (registered, offering, ...)."""
    status = run_json(data_dir, "status")
    return (status["chain"].get("registry") or {}) if status["chain"].get("ready") else {}


def test_share_settings_are_checked_and_saved_without_a_node(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    assert hmnode("init", "--data-dir", data_dir).returncode == 0
    before = (data_dir / "config.toml").read_text()
    bad = hmnode("share", "--cores", "150%", "--data-dir", data_dir)
    assert bad.returncode != 0 and "share.cores" in bad.stderr and "50%" in bad.stderr
    assert (data_dir / "config.toml").read_text() == before  # nothing changed
    done = run_json(data_dir, "share", "--cores", "2", "--window", "Mon-Fri 18:00-08:00",
                    "--idle-only", "--allow", "owner", "--core-hour", "25")
    assert done["status"] is None  # no node running: saved for its start
    settings = done["settings"]
    assert settings["share.cores"] == "2" and settings["share.windows"] == ["Mon-Fri 18:00-08:00"]
    assert settings["share.idle_only"] is True and settings["share.allow"] == "owner"
    assert settings["price.core_hour"] == 25
    text = hmnode("share", "--data-dir", data_dir)
    assert "share.windows" in text.stdout and "not running" in text.stdout
    # A data dir no node has used yet keeps the settings for the node's first start.
    fresh = run_json(tmp_path / "fresh", "share", "--memory", "25%")
    assert fresh["settings"]["share.memory"] == "25%"
    assert "25%" in (tmp_path / "fresh" / "config.toml").read_text()


def test_a_paused_node_takes_no_job_and_gives_back_a_running_one(mesh_factory: Any,
                                                               tmp_path: Path) -> None:
    mesh = mesh_factory(2, env=FAST)
    runner = mesh.data_dir(node_name(0)).path  # node 1 only watches the advert
    wait_until(lambda: registry(runner).get("offering"), "node 0 to offer",
               timeout=60)
    assert share_status(mesh, node_name(0))["sharing"] is True

    # A long job runs; then the node leaves its time window with a short grace.
    loop = tmp_path / "loop.wasm"
    loop.write_bytes(wasmtime.wat2wasm(LOOP_WAT))
    job_id = run_json(runner, "submit", "--wasm", loop, "--time-limit", "8")["job_id"]
    wait_until(lambda: (run_json(runner, "job", job_id).get("execution") or {}).get("state")
               == "running", "the job to start", timeout=30)
    done = run_json(runner, "share", "--window", closed_window(), "--grace", "3")
    assert done["settings"]["share.grace_s"] == 3.0
    wait_until(lambda: not share_status(mesh, node_name(0))["sharing"], "sharing to pause",
               timeout=15)
    why = share_status(mesh, node_name(0))["why_not"]
    assert why and why[0].startswith("outside its time window")
    # The other node's view of the advert changes within a refresh.
    wait_until(lambda: any(not (a["inventory"].get("share") or {}).get("sharing", True)
                           for a in control.call(mesh.data_dir(node_name(1)).control_socket,
                                                 "adverts")),
               "the advert to say the node does not share", timeout=20)
    # Past the grace the job goes back to the mesh, with the reason.
    wait_until(lambda: "released" in run_json(runner, "job", job_id), "the job to go back",
               timeout=30)
    job = run_json(runner, "job", job_id)
    assert "paused sharing: outside its time window" in job["released"]
    assert job["state"] == "queued" and "paused sharing: outside its time window" in \
        job["why_waiting"]
    # A job submitted now is not placed either, and says why.
    other = run_json(runner, "submit", "--template", "prime-sieve", "--arg", "1000")["job_id"]
    wait_until(lambda: "paused sharing" in (run_json(runner, "job", other)["why_waiting"] or ""),
               "the new job's reason", timeout=20)
    assert run_json(runner, "job", other)["state"] == "queued"

    # Back in its window: both run.
    run_json(runner, "share", "--window", "always")
    for jid in (other, job_id):
        wait_until(lambda j=jid: run_json(runner, "job", j)["state"] == "settled",
                   f"job {jid[:8]} to settle", timeout=60)
    states = [h["state"] for h in run_json(runner, "job", job_id)["history"]]
    assert states == ["queued", "allocated", "released", "allocated", "settled"]

    # Metrics, over real HTTP.
    address = run_json(runner, "status")["metrics"]
    body = urllib.request.urlopen(address, timeout=10).read().decode()
    for series in ("hmnode_peers ", "hmnode_paths{path=\"direct\"}", "hmnode_gossip_messages_total",
                   "hmnode_gossip_duplicates_total", "hmnode_consensus_height ",
                   "hmnode_consensus_commit_latency_seconds_bucket", "hmnode_jobs{state=\"settled\"}",
                   "hmnode_sandbox_cpu_seconds_total{runtime=\"wasm\"}",
                   "hmnode_earned_credits_total", "hmnode_sharing 1.0"):
        assert series in body, series

    # Earnings: what the chain paid this node for each job, and its balance.
    earned = run_json(runner, "earnings")
    paid = {j["job_id"]: j["paid"] for j in earned["jobs"]}
    for jid in (job_id, other):
        assert paid[jid] == run_json(runner, "job", jid)["receipt"]["paid"] > 0
    assert earned["total"] == sum(paid.values())
    assert earned["balance"] == run_json(runner, "ledger")["account"]["balance"]
    assert run_json(runner, "earnings", "--since", "1h")["total"] == earned["total"]
    assert run_json(runner, "earnings", "--since", "2999-01-01")["jobs"] == []
    bad = hmnode("earnings", "--since", "yesterday-ish", "--data-dir", runner)
    assert bad.returncode != 0 and "--since takes" in bad.stderr


def test_a_taken_metrics_port_costs_only_the_metrics(agents: Any, data_dir: Path) -> None:
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        agent = agents(data_dir, env=clean_env(HMNODE_METRICS_LISTEN=f"127.0.0.1:{taken}"))
        status = agent.wait_ready()
        assert status["metrics"] is None
        code, err = agent.stop()
        assert code == 0 and "metrics are not served: cannot listen on" in err
    finally:
        holder.close()
    off = agents(data_dir, env=clean_env(HMNODE_METRICS_LISTEN="off"))
    assert off.wait_ready()["metrics"] is None
    assert off.stop()[0] == 0
