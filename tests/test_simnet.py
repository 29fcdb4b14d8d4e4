"""Local meshes of real `hmnode run` processes: `hmnode simnet up/status/down`, convergence,
failure detection and rejoin after a crash, and the gossip benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import hmnode, wait_until
from hmnode.simnet.bench import gossip
from hmnode.simnet.local import LocalMesh, NodeRecord

CONVERGE_S = 60.0
DETECT_S = 30.0
# A restarted node's fresh advert spreads by anti-entropy pulls (every ~5 s per node) when it
# was published before the node had neighbours again.
SPREAD_S = 60.0


def _gone(pid: int) -> bool:
    """Whether pid no longer runs (a zombie waiting for a parent that never reaps counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _call(mesh: LocalMesh, name: str, method: str) -> Any:
    return mesh.call(name, method, timeout=5.0)


@pytest.fixture
def mesh_dir(tmp_path: Path):
    """A mesh directory whose nodes are stopped at teardown, whatever the test left."""
    directory = tmp_path / "m"
    yield directory
    mesh = LocalMesh(directory)
    if mesh.state_file.exists():
        mesh.down(timeout=5.0)


def test_up_status_down_through_the_cli(mesh_dir: Path) -> None:
    up = hmnode("simnet", "up", "-n", "3", "--dir", mesh_dir, "--json", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    summary = json.loads(up.stdout)
    assert summary["converged"] is True
    nodes = summary["nodes"]
    assert [n["name"] for n in nodes] == ["node00", "node01", "node02"]
    ids = {n["node_id"] for n in nodes}
    assert len(ids) == 3
    # Every node knows every advert: asked of each node itself, not of the summary.
    for n in nodes:
        status = hmnode("status", "--json", "--data-dir", mesh_dir / n["name"])
        assert json.loads(status.stdout)["node_id"] == n["node_id"]
        mesh = hmnode("assets", "--mesh", "--json", "--data-dir", mesh_dir / n["name"])
        assert {ad["node_id"] for ad in json.loads(mesh.stdout)} == ids
    assert "converged" in up.stderr  # people's output goes to stderr under --json

    again = hmnode("simnet", "up", "-n", "2", "--dir", mesh_dir)
    assert again.returncode == 2
    assert "already running" in again.stderr and "simnet down" in again.stderr

    status = hmnode("simnet", "status", "--dir", mesh_dir, "--json")
    assert status.returncode == 0, status.stderr
    listed = json.loads(status.stdout)["nodes"]
    assert len(listed) == 3 and all(n["alive"] and n["adverts_known"] == 3 for n in listed)
    text = hmnode("simnet", "status", "--dir", mesh_dir)
    assert "node02" in text.stdout and "3 of 3 nodes running" in text.stdout

    pids = [n["pid"] for n in nodes]
    down = hmnode("simnet", "down", "--dir", mesh_dir, "--json", timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    outcomes = json.loads(down.stdout)["nodes"]
    assert [o["outcome"] for o in outcomes] == ["clean"] * 3
    assert all(_gone(pid) for pid in pids)
    assert not (mesh_dir / "simnet.json").exists()
    assert hmnode("simnet", "status", "--dir", mesh_dir).returncode == 3


def test_down_never_signals_a_process_that_reused_a_recorded_pid(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "m")
    mesh.dir.mkdir()
    me = psutil.Process(os.getpid())
    # This very test process stands in for an unrelated process that now holds a node's pid:
    # once with another start time, once with the right start time but not `hmnode run`.
    mesh._write_records([NodeRecord("node00", me.pid, me.create_time() - 100, "127.0.0.1", 4000, "x"),
                         NodeRecord("node01", me.pid, me.create_time(), "127.0.0.2", 4001, "y")])
    outcomes = mesh.down(timeout=1.0)
    assert [o.outcome for o in outcomes] == ["not running", "not running"]
    assert not mesh.state_file.exists()
    missing = hmnode("simnet", "down", "--dir", tmp_path / "m")
    assert missing.returncode == 3 and "simnet up" in missing.stderr


def _believed_alive_at(mesh: LocalMesh, observer: str, node_id: str) -> bool:
    """Whether `observer` still lists `node_id` as alive in its active or passive view.

    (Its QUIC connection to a dead node lingers until the 60 s idle timeout, so connections are
    not what failure detection is judged by.)"""
    info = _call(mesh, observer, "peers")
    return any(m["node_id"] == node_id and m["state"] == "alive"
               for view in ("active", "passive") for m in info[view])


def test_ten_nodes_converge_and_a_crashed_node_is_detected_and_rejoins(mesh_dir: Path) -> None:
    mesh = LocalMesh(mesh_dir)
    records = mesh.up(10)
    assert mesh.wait_converged(CONVERGE_S), [s.to_dict() for s in mesh.status()]

    victim = records[3]
    old_seq = next(ad["seq"] for ad in _call(mesh, "node00", "adverts")
                   if ad["node_id"] == victim.node_id)
    mesh.kill(victim.name)
    assert _gone(victim.pid)
    others = [rec.name for rec in records if rec.name != victim.name]
    wait_until(lambda: not any(_believed_alive_at(mesh, name, victim.node_id) for name in others),
           f"every node to notice that {victim.name} died", DETECT_S)
    assert [s.alive for s in mesh.status()].count(False) == 1

    restarted = mesh.start(victim.name)
    assert restarted.address == victim.address and restarted.node_id == victim.node_id
    assert restarted.pid != victim.pid
    wait_until(lambda: (_call(mesh, victim.name, "mesh_stats")["active"] or 0) > 0,
           f"{victim.name} to rejoin through its stored peers", DETECT_S)
    assert mesh.wait_converged(CONVERGE_S)
    # A restart with nothing changed keeps its advert (peers hold it already); a new one it
    # makes now reaches every node: it rejoined, not just restarted.
    assert _call(mesh, victim.name, "advertise")["seq"] > old_seq
    wait_until(lambda: all(next(ad["seq"] for ad in _call(mesh, name, "adverts")
                            if ad["node_id"] == victim.node_id) > old_seq for name in others),
           f"{victim.name}'s new advert to reach every node", SPREAD_S)

    outcomes = mesh.down()
    assert {o.outcome for o in outcomes} == {"clean"}, outcomes
    assert all(_gone(rec.pid) for rec in [*records, restarted])


def test_gossip_bench_smoke_returns_every_figure() -> None:
    figures = gossip.run(runs=1, nodes=3, adverts=6, idle_s=1.0, seed=1)
    for key in ("nodes", "delivery_ratio", "dissemination_ms_p50", "dissemination_ms_p99",
                "duplicates_per_msg", "rss_mb_per_node", "cpu_pct_per_node",
                "baseline_advertise_call_ms", "baseline_python_rss_mb", "rss_ratio"):
        assert figures[key] is not None, key
    assert figures["nodes"] == 3 and figures["adverts"] == 6
    assert figures["delivery_ratio"] == 1.0
    assert 0 < figures["dissemination_ms_p50"] <= figures["dissemination_ms_p99"]
    assert figures["rss_mb_per_node"] > 0 and figures["duplicates_per_msg"] >= 0
    assert any("dissemination p50" in line for line in gossip.report(figures))


def test_bench_nodes_flag_is_for_mesh_benchmarks_only() -> None:
    listed = hmnode("simnet", "bench", "--list")
    assert "gossip" in listed.stdout
    wrong = hmnode("simnet", "bench", "startup", "--nodes", "3")
    assert wrong.returncode == 2 and "--nodes" in wrong.stderr
