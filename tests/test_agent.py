"""The agent as users meet it: real `hmnode` subprocesses, the real control socket, real LMDB."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from conftest import clean_env, hmnode
from hmnode import __version__, schema
from hmnode.store import Store

COMMANDS = ["init", "run", "id", "status", "assets", "peers"]


def _files(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its content (the lock and LMDB files as they are)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _runs_and_events(data_dir: Path) -> tuple[list, list]:
    with Store.open(data_dir / "state.lmdb") as store:
        return store.read(lambda tx: (
            [r for _, r in tx.items(schema.RUNS)], [e for _, e in tx.items(schema.EVENTS)]))


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = hmnode(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    if command not in (None, "run"):
        assert "--data-dir" in result.stdout


def test_init_creates_private_key_and_config(data_dir: Path) -> None:
    result = hmnode("init", "--json", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["created_key"] and created["created_config"]
    assert stat.S_IMODE((data_dir / "node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert "[node]" in (data_dir / "config.toml").read_text()
    # The id is shown the same everywhere, and a second init changes nothing.
    assert hmnode("id", "--data-dir", data_dir).stdout.strip() == created["node_id"]
    before = (data_dir / "node.key").read_bytes()
    again = json.loads(hmnode("init", "--json", "--data-dir", data_dir).stdout)
    assert again == {**created, "created_key": False, "created_config": False}
    assert (data_dir / "node.key").read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_readable_by_others_is_refused_with_the_fix(data_dir: Path, mode: int) -> None:
    assert hmnode("init", "--data-dir", data_dir).returncode == 0
    key = data_dir / "node.key"
    key.chmod(mode)
    before = _files(data_dir)
    for command in (["run"], ["id"]):
        result = hmnode(*command, "--data-dir", data_dir)
        assert result.returncode == 2, result.stderr
        assert f"chmod 600 {key}" in result.stderr
    assert _files(data_dir) == before
    key.chmod(0o600)
    assert hmnode("id", "--data-dir", data_dir).returncode == 0


def test_run_status_and_sigterm(data_dir: Path, agents) -> None:
    """A first `hmnode run` initialises on defaults, answers status, and stops cleanly."""
    agent = agents(data_dir)
    status = agent.wait_ready()
    node_id = hmnode("id", "--data-dir", data_dir).stdout.strip()
    assert status["node_id"] == node_id
    assert status["version"] == __version__
    assert status["pid"] == agent.proc.pid
    assert status["data_dir"] == str(data_dir)
    assert 0 <= status["uptime_s"] < 60
    assert stat.S_IMODE((data_dir / "control.sock").stat().st_mode) == 0o600
    time.sleep(0.2)
    assert hmnode("status", "--json", "--data-dir", data_dir).returncode == 0
    later = json.loads(hmnode("status", "--json", "--data-dir", data_dir).stdout)
    assert later["uptime_s"] > status["uptime_s"]
    text = hmnode("status", "--data-dir", data_dir)
    assert node_id in text.stdout and "uptime" in text.stdout

    started = time.monotonic()
    code, err = agent.stop(signal.SIGTERM)
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 5.0
    assert not (data_dir / "control.sock").exists()
    runs, events = _runs_and_events(data_dir)
    assert runs[-1].stopped_at is not None and runs[-1].exit_reason == "signal SIGTERM"
    assert [e.kind for e in events][-2:] == ["started", "stopped"]


def test_sigint_stops_cleanly_too(data_dir: Path, agents) -> None:
    agent = agents(data_dir)
    agent.wait_ready()
    code, err = agent.stop(signal.SIGINT)
    assert code == 0, err
    runs, _ = _runs_and_events(data_dir)
    assert runs[-1].exit_reason == "signal SIGINT"


def test_second_agent_on_one_data_dir_is_refused(data_dir: Path, agents) -> None:
    first = agents(data_dir)
    first.wait_ready()
    second = hmnode("run", "--data-dir", data_dir, timeout=20)
    assert second.returncode == 2
    assert "in use by another hmnode agent" in second.stderr
    assert f"pid {first.proc.pid}" in second.stderr
    # The first agent is untouched: it still answers, on the same control socket.
    assert json.loads(hmnode("status", "--json", "--data-dir", data_dir).stdout)["pid"] == first.proc.pid


def test_status_without_agent_exits_3_with_one_line(data_dir: Path) -> None:
    result = hmnode("status", "--data-dir", data_dir)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"hmnode: no agent is running for data dir {data_dir}; start one with `hmnode run`"]


def test_killed_agent_leaves_state_that_a_restart_recovers(data_dir: Path, agents) -> None:
    first = agents(data_dir)
    first_id = first.wait_ready()["node_id"]
    first.proc.kill()
    first.proc.wait()
    # The stale socket is not mistaken for a running agent.
    assert hmnode("status", "--data-dir", data_dir).returncode == 3
    second = agents(data_dir)
    assert second.wait_ready()["node_id"] == first_id
    assert second.stop()[0] == 0
    runs, events = _runs_and_events(data_dir)
    assert len(runs) == 2 and runs[0].stopped_at is None and runs[1].stopped_at is not None
    assert "unclean_stop" in [e.kind for e in events]


@pytest.mark.parametrize("content, needle", [
    ('[node]\nlisen = "0.0.0.0:4819"\n', "node.lisen"),
    ('[nod]\nlisten = "0.0.0.0:4819"\n', "nod"),
    ('[node]\nlisten = "nowhere"\n', "node.listen"),
    ('[inventory]\ninterval_s = -5\n', "inventory.interval_s"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ('[node\nlisten = "0.0.0.0:1"\n', "not valid TOML"),
])
def test_bad_config_exits_2_naming_the_key_and_changes_nothing(
        data_dir: Path, content: str, needle: str) -> None:
    data_dir.mkdir()
    config = data_dir / "config.toml"
    config.write_text(content)
    before = _files(data_dir)
    for command in ("run", "init"):
        result = hmnode(command, "--data-dir", data_dir)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and str(config) in result.stderr
        assert _files(data_dir) == before


def test_bad_environment_value_names_the_variable(data_dir: Path) -> None:
    result = hmnode("run", "--data-dir", data_dir, env=clean_env(HMNODE_LISTEN="1.2.3.4:99999"))
    assert result.returncode == 2
    assert "HMNODE_LISTEN" in result.stderr
    assert not data_dir.exists()


def test_precedence_flag_over_environment_over_file(data_dir: Path, agents) -> None:
    # Distinct loopback hosts, port 0: each source is recognisable and never collides.
    assert hmnode("init", "--listen", "127.0.0.2:0", "--data-dir", data_dir).returncode == 0
    without_listen = {k: v for k, v in clean_env().items() if k != "HMNODE_LISTEN"}
    env = {**without_listen, "HMNODE_LISTEN": "127.0.0.3:0"}
    for args, run_env, host in [((), without_listen, "127.0.0.2"), ((), env, "127.0.0.3"),
                                (("--listen", "127.0.0.4:0"), env, "127.0.0.4")]:
        agent = agents(data_dir, *args, env=run_env)
        status = agent.wait_ready()
        assert status["listen"] == f"{host}:0"
        [bound] = status["addresses"]
        assert bound.startswith(f"{host}:") and int(bound.rsplit(":", 1)[1]) > 0
        assert agent.stop()[0] == 0
    # The flags of a run are not written back to the file.
    assert '"127.0.0.2:0"' in (data_dir / "config.toml").read_text()


def test_a_taken_port_fails_the_start_cleanly(data_dir: Path, agents) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = hmnode("run", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--listen" in result.stderr
    # Nothing was recorded as a run: the next start is not told of an unclean stop.
    runs, events = _runs_and_events(data_dir)
    assert runs == [] and "unclean_stop" not in [e.kind for e in events]


def test_peers_lists_nothing_before_any_peer_connects(data_dir: Path, agents) -> None:
    agent = agents(data_dir)
    assert agent.wait_ready()["peers"] == 0
    result = hmnode("peers", "--json", "--data-dir", data_dir)
    assert result.returncode == 0
    views = json.loads(result.stdout)
    assert views["active"] == [] and views["passive"] == [] and views["connections"] == []
    assert "no peers connected" in hmnode("peers", "--data-dir", data_dir).stdout
    assert hmnode("peers", "--data-dir", data_dir / "none").returncode == 3


def test_data_dir_from_environment(tmp_path: Path) -> None:
    data_dir = tmp_path / "envdir"
    result = hmnode("init", "--json", env=clean_env(HMNODE_DATA_DIR=str(data_dir)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data_dir"] == str(data_dir)
    assert (data_dir / "node.key").exists()


def test_data_dir_defaults_to_xdg_data_home(tmp_path: Path) -> None:
    result = hmnode("init", "--json", env=clean_env(XDG_DATA_HOME=str(tmp_path / "xdg")))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data_dir"] == str(tmp_path / "xdg" / "hmnode")


def test_json_logs_are_one_object_a_line(data_dir: Path, agents) -> None:
    agent = agents(data_dir, "--log-format", "json")
    status = agent.wait_ready()
    code, err = agent.stop()
    assert code == 0
    entries = [json.loads(line) for line in err.splitlines()]
    ready = [e for e in entries if e.get("event") == "ready"]
    assert ready and ready[0]["node_id"] == status["node_id"] and ready[0]["level"] == "info"
    assert any(e.get("event") == "stopped" and e["clean"] for e in entries)


def test_assets_from_the_agent_and_without_one(data_dir: Path, agents) -> None:
    offline = hmnode("assets", "--json", "--data-dir", data_dir)
    assert offline.returncode == 0, offline.stderr
    # Not sharing: this test is about assets, and stopping a node while it computes its
    # registration's proofs once failed to stop cleanly under CI's load (see the note).
    agent = agents(data_dir, env=clean_env(HMNODE_SHARE_ENABLED="false"))
    agent.wait_ready()
    online = hmnode("assets", "--json", "--data-dir", data_dir)
    assert online.returncode == 0, online.stderr
    for result in (offline, online):
        inventory = json.loads(result.stdout)
        assert inventory["cpu"]["logical_cores"] == os.cpu_count()
        assert inventory["memory"]["total_bytes"] > 0
        assert inventory["gpu"]["gpus"] or inventory["gpu"]["reason"]
    human = hmnode("assets", "--data-dir", data_dir)
    assert "# agent" in human.stdout and "GPU" in human.stdout
    code, err = agent.stop()
    assert code == 0, err[-3000:]
    # The agent stored what it measured.
    with Store.open(data_dir / "state.lmdb") as store:
        stored = store.read(lambda tx: tx.get(schema.INVENTORY, schema.INVENTORY_LATEST))
    assert stored.to_dict() == json.loads(online.stdout)
