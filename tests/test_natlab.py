"""The NAT lab (`hmnode simnet nat-lab`): its NAT kinds behave as their kinds, it tears down
whatever happens, and, end to end, real nodes behind real NATs reach the connectivity floors.

The tests that build namespaces need root, `ip` and `iptables` (CI runs as root and `.ci/run`
installs them); elsewhere they are skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from conftest import HMNODE, clean_env, wait_until
from hmnode.datadir import DataDir
from hmnode.errors import ControlError
from hmnode.simnet import natlab, natlab_topology
from hmnode.simnet.natlab import (FULL, REDUCED, Fallback, NatLab, PairResult, floors_met,
                                  pair_class, read_node_log, round_robin, run_lab, summarise)
from hmnode.simnet.natlab_topology import (NODE_PORT, NatKindMisbehaves, Site, judge,
                                           list_namespaces, missing_requirements, require_kinds,
                                           run_cmd, self_check, in_ns)


@pytest.fixture
def lab_machine() -> None:
    """Skip, saying why, where namespaces and iptables cannot be used."""
    missing = missing_requirements()
    if missing:
        pytest.skip(reason=f"the NAT lab needs {', '.join(missing)} (CI runs as root; `.ci/run` "
                           "installs iproute2, iptables and conntrack)")


def _ours(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix)]


# --- without root ------------------------------------------------------------------------------


def test_round_robin_pairs_every_node_once_per_round() -> None:
    for n in range(2, 10):
        rounds = round_robin(n)
        pairs = [p for rnd in rounds for p in rnd]
        assert sorted(pairs) == [(a, b) for a in range(n) for b in range(a + 1, n)]
        for rnd in rounds:
            members = [x for p in rnd for x in p]
            assert len(members) == len(set(members))


def test_pair_classes_and_figures() -> None:
    assert pair_class("cone", "double") == "cone"
    assert pair_class("public", "symmetric") == "easy_hard"
    assert pair_class("symmetric", "symmetric") == "hard_hard"

    def pair(a: str, b: str, connected: bool, direct_ms: float | None) -> PairResult:
        return PairResult(a, b, a, b, connected, "direct" if direct_ms else "relayed", direct_ms,
                          1.0, None, None)

    pairs = [pair("cone", "cone", True, 100.0), pair("cone", "symmetric", True, None),
             pair("public", "symmetric", True, 5.0), pair("double", "cone", False, None)]
    summary = summarise(pairs, Fallback(True))
    assert summary["connected_ratio"] == 0.75
    assert summary["direct_ratio"] == 0.5
    assert summary["direct_ratio_cone_pairs"] == 0.5
    assert summary["direct_ratio_easy_hard"] == 0.5
    assert summary["direct_ratio_hard_hard"] is None
    assert summary["time_to_direct_ms_p50"] == 52.5
    assert summary["time_to_direct_ms_p50_natted"] == 100.0
    floors = floors_met(summary)
    assert not floors["connected_ratio"]["ok"] and floors["fallback_ok"]["ok"]
    assert not floors_met({**summary, "fallback_ok": None})["fallback_ok"]["ok"]


def test_judge_tells_each_kind_from_the_others() -> None:
    def site(kind: str) -> Site:
        return Site("s", kind, 2, "ns", "10.2.0.2", "11.0.2.2", ("r",))

    same = ("11.0.2.2:4819", "11.0.2.2:4819")
    moved = ("11.0.2.2:4819", "11.0.2.2:5000")
    assert judge(site("cone"), same, (False, False)) is None
    assert "unsolicited" in judge(site("cone"), same, (False, True))
    assert "one port" in judge(site("cone"), moved, (False, False))
    assert judge(site("symmetric"), moved, (False, False)) is None
    assert "not symmetric" in judge(site("symmetric"), same, (False, False))
    assert judge(site("fullcone"), same, (True, True)) is None
    assert "reachable" in judge(site("fullcone"), same, (True, False))
    assert "public address" in judge(site("double"), ("10.9.0.1:4819",) * 2, (False, False))
    assert "did not all answer" in judge(site("cone"), ("11.0.2.2:4819", None), ())


def test_node_log_problems_are_counted(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_text("\n".join([
        json.dumps({"level": "info", "msg": "fine"}),
        json.dumps({"level": "warning", "msg": "odd"}),
        json.dumps({"level": "error", "msg": "broke", "exc": "Traceback...\nValueError: x"}),
        "Traceback (most recent call last):",
    ]) + "\n")
    entry = read_node_log("cone-1", log, kept=True)
    assert (entry.lines, entry.warnings, entry.errors, entry.tracebacks, entry.not_json) == \
        (4, 1, 1, 2, 1)
    assert any("ValueError: x" in p for p in entry.first_problems)


class _ScriptedNode(natlab._Node):
    """A node whose control answers are scripted: `connect` answers `connect` (or raises it),
    `peers` shows the connection relayed `relayed_polls` times, then direct."""

    def __init__(self, name: str, kind: str, connect: object, relayed_polls: int) -> None:
        site = Site(name, kind, 2, "ns", "10.2.0.2", "11.0.2.2", ("r",))
        super().__init__(site, DataDir(Path("/nonexistent") / name), node_id=f"id-{name}")
        self.connect_answer = connect
        self.relayed_polls = relayed_polls

    def call(self, method: str, params: dict | None = None, timeout: float = 1.0) -> object:
        if method == "connect":
            if isinstance(self.connect_answer, Exception):
                raise self.connect_answer
            return self.connect_answer
        assert method == "peers"
        self.relayed_polls -= 1
        path = "relayed" if self.relayed_polls >= 0 else "direct"
        return {"connections": [{"node_id": "id-b", "path": path}]}


def test_a_pair_is_direct_only_once_peers_show_it(monkeypatch) -> None:
    monkeypatch.setattr(natlab, "DIRECT_POLL_S", 0.01)
    lab = NatLab(["public", "cone"])
    b = _ScriptedNode("b", "cone", None, 0)
    slow = _ScriptedNode("a", "cone", {"path": "relayed", "rtt_ms": 3.0}, relayed_polls=5)
    result = lab.connect_pair(slow, b)
    assert result.connected and result.path == "direct" and result.rtt_ms == 3.0
    assert result.time_to_direct_ms is not None and result.time_to_direct_ms >= 50
    fast = _ScriptedNode("a", "cone", {"path": "direct"}, relayed_polls=99)
    at_once = lab.connect_pair(fast, b)
    assert at_once.path == "direct" and at_once.time_to_direct_ms == at_once.connect_ms
    refused = _ScriptedNode("a", "cone", ControlError("agent refused connect: no route"), 0)
    failed = lab.connect_pair(refused, b)
    assert not failed.connected and failed.time_to_direct_ms is None
    assert "no route" in failed.error
    monkeypatch.setattr(natlab, "DIRECT_WAIT_S", 0.2)
    never = lab.connect_pair(_ScriptedNode("a", "cone", {"path": "relayed"}, 10**6), b)
    assert never.connected and never.path == "relayed" and never.time_to_direct_ms is None
    assert not lab.workdir.exists()  # nothing was made before the nodes start


def test_nat_lab_without_root_exits_2_saying_what_is_missing(monkeypatch) -> None:
    from hmnode.cli.main import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["simnet", "nat-lab"])
    assert result.exit_code == 2, result.output
    assert "needs root" in result.output and ".ci/run" in result.output


# --- with root: the network ---------------------------------------------------------------------


@pytest.mark.root
def test_every_nat_kind_behaves_as_its_kind_and_teardown_leaves_nothing(lab_machine) -> None:
    with NatLab(FULL) as lab:
        topology = lab.build()
        assert len(_ours(lab.prefix)) >= len(FULL) + 2  # the sites, the core, the probe
        checks = lab.check_kinds()
        assert [c.kind for c in checks] == list(FULL)
        assert all(c.ok for c in checks), [c.to_dict() for c in checks]
        by_kind = {c.kind: c for c in checks}
        # The properties the kinds stand for, spelled out.
        assert len({o.rpartition(":")[2] for o in by_kind["cone"].observed}) == 1
        assert len({o.rpartition(":")[2] for o in by_kind["symmetric"].observed}) == 2
        assert by_kind["fullcone"].unsolicited_reached == (True, True)
        assert by_kind["cone"].unsolicited_reached == (False, False)
        double = topology.site(by_kind["double"].site)
        assert len(double.routers) == 2 and by_kind["double"].observed[0].startswith(
            double.public_ip + ":")
    assert _ours(lab.prefix) == []
    assert not lab.workdir.exists()


@pytest.mark.root
def test_the_self_check_catches_a_nat_that_is_not_its_kind(lab_machine) -> None:
    with NatLab(["public", "cone", "symmetric"]) as lab:
        topology = lab.build()
        cone, symmetric = topology.sites[1], topology.sites[2]
        # The cone router forwards the node port (a full cone, then), and the symmetric one
        # loses --random-fully (a cone, then).
        run_cmd(in_ns(cone.routers[0], "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan",
                      "-p", "udp", "--dport", str(NODE_PORT), "-j", "DNAT", "--to-destination",
                      f"{cone.host_ip}:{NODE_PORT}"))
        run_cmd(in_ns(symmetric.routers[0], "iptables", "-t", "nat", "-F", "POSTROUTING"))
        run_cmd(in_ns(symmetric.routers[0], "iptables", "-t", "nat", "-A", "POSTROUTING", "-o",
                      "wan", "-j", "MASQUERADE"))
        checks = self_check(topology, lab.helpers)
        assert [c.ok for c in checks] == [True, False, False], [c.to_dict() for c in checks]
        with pytest.raises(NatKindMisbehaves, match="cone-1.*unsolicited.*symmetric-1.*not "
                                                    "symmetric"):
            require_kinds(checks)
    assert _ours(lab.prefix) == []


@pytest.mark.root
def test_teardown_happens_when_the_lab_fails_midway(lab_machine) -> None:
    with pytest.raises(RuntimeError, match="injected"):
        with NatLab(["public", "cone"]) as lab:
            lab.build()
            lab.start_nodes()
            pids = [node.proc.pid for node in lab.nodes.values()]
            assert all(psutil.pid_exists(pid) for pid in pids)
            raise RuntimeError("injected failure after the nodes started")
    assert _ours(lab.prefix) == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not lab.workdir.exists()


@pytest.mark.root
def test_sigterm_tears_the_lab_down(lab_machine, tmp_path: Path) -> None:
    proc = subprocess.Popen([*HMNODE, "simnet", "nat-lab", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    prefix = f"{natlab_topology.PREFIX}{proc.pid}-"
    try:
        # Once the nodes run (their data dirs exist under the run's namespaces), stop it.
        wait_until(lambda: any(ns.endswith("-nat") for ns in _ours(prefix)) or proc.poll(),
                   "the lab to build its namespaces", timeout=60)
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "SIGTERM" in err
    assert _ours(prefix) == []


@pytest.mark.root
def test_leftovers_of_dead_runs_are_cleaned(lab_machine) -> None:
    # A namespace named as a run of a pid that cannot be alive (above the kernel's pid_max).
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    dead = f"{natlab_topology.PREFIX}{pid_max + 1}-beef-core"
    live = f"{natlab_topology.PREFIX}{os.getpid()}-beef-core"
    dead_dir = Path(tempfile.gettempdir()) / f"{natlab_topology.PREFIX}{pid_max + 1}-beef"
    (dead_dir / "public").mkdir(parents=True)
    for ns in (dead, live):
        run_cmd(["ip", "netns", "add", ns])
    try:
        removed = natlab_topology.clean_leftovers()
        assert dead in removed and live not in removed
        assert dead not in list_namespaces() and live in list_namespaces()
        assert not dead_dir.exists()
    finally:
        for ns in (dead, live):
            run_cmd(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(dead_dir, ignore_errors=True)


# --- with root: the whole lab -------------------------------------------------------------------


@pytest.mark.root
def test_reduced_lab_end_to_end_meets_the_floors(lab_machine) -> None:
    lines: list[str] = []
    report = run_lab(REDUCED, progress=lines.append)
    assert report["teardown_problems"] == []
    assert _ours(report["prefix"]) == []
    figures = {k: report[k] for k in ("connected_ratio", "direct_ratio_cone_pairs",
                                      "direct_ratio_easy_hard", "fallback_ok")}
    problems = [f"{log['site']}: {p}" for log in report["node_logs"] for p in log["first_problems"]]
    context = "\n".join([f"figures: {figures}", f"readiness: {report['readiness']}",
                         "node log problems:", *problems[:10], "the run:", *lines[-30:]])
    assert report["connected_ratio"] == 1.0, context
    assert report["direct_ratio_cone_pairs"] == 1.0, context
    assert report["direct_ratio_easy_hard"] >= 0.9, context
    assert report["fallback_ok"] is True, f"{report['fallback']}\n{context}"


def _path(node, peer_id: str) -> str | None:
    conns = node.call("peers").get("connections", [])
    return next((c.get("path") for c in conns if c.get("node_id") == peer_id), None)


def test_a_blocked_direct_path_falls_back_to_the_relay_and_is_retried(lab_machine) -> None:
    """The internet drops the two NATs' traffic to each other: within 10 s the pair talks
    through the relay again, and once the path is open again it goes direct again (a punch is
    tried at once, three times, then about every 60 s)."""
    with NatLab(["public", "cone", "cone"]) as lab:
        topo = lab.build()
        lab.start_nodes()
        lab.wait_ready()
        a, b = lab.nodes["cone-1"], lab.nodes["cone-2"]
        assert lab.connect_pair(a, b).path == "direct"
        ips = (topo.site("cone-1").public_ip, topo.site("cone-2").public_ip)
        rules = [["-s", ips[0], "-d", ips[1], "-p", "udp", "-j", "DROP"],
                 ["-s", ips[1], "-d", ips[0], "-p", "udp", "-j", "DROP"]]
        for rule in rules:
            run_cmd(in_ns(topo.core_ns, "iptables", "-I", "FORWARD", *rule))
        blocked_at = time.monotonic()
        wait_until(lambda: _path(a, b.node_id) == "relayed", "a relayed path", 15.0, 0.1)
        assert time.monotonic() - blocked_at < 10.0
        answer = a.call("connect", {"node_id": b.node_id, "timeout": 10.0}, timeout=15.0)
        assert answer["path"] == "relayed"
        for rule in rules:
            run_cmd(in_ns(topo.core_ns, "iptables", "-D", "FORWARD", *rule))
        wait_until(lambda: _path(a, b.node_id) == "direct" or _path(b, a.node_id) == "direct",
                   "direct again", 90.0, 0.5)
