"""Joining and adverts through real agents: `hmnode join`, convergence of two nodes, and forged
or replayed adverts sent by a real (hostile) QUIC peer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from conftest import hmnode, wait_until
from hmnode.adverts import make_advert
from hmnode.identity import NodeId, NodeKey
from hmnode.transport.connection import Handlers
from hmnode.transport.endpoint import Endpoint

WAIT_S = 30.0


def _json(*args: Any) -> Any:
    result = hmnode(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_join_without_an_agent_records_the_peer(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    peer_id = NodeKey.generate().node_id
    result = hmnode("join", f"{peer_id}@127.0.0.1:4999", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert "will join through this peer when started" in result.stdout
    assert f'"{peer_id}@127.0.0.1:4999"' in (data_dir / "config.toml").read_text()
    unpinned = hmnode("join", "127.0.0.1:5000", "--data-dir", data_dir)
    assert unpinned.returncode == 0 and "unpinned" in unpinned.stderr
    again = hmnode("join", "127.0.0.1:5000", "--data-dir", data_dir)
    assert "already in" in again.stdout
    assert hmnode("join", "nonsense", "--data-dir", data_dir).returncode == 2


def test_two_agents_join_and_learn_each_others_adverts(tmp_path: Path, agents) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a, b = agents(a_dir), agents(b_dir)
    a_status, b_status = a.wait_ready(), b.wait_ready()
    [a_addr] = a_status["addresses"]
    joined = _json("join", f"{a_status['node_id']}@{a_addr}", "--json", "--data-dir", b_dir)
    assert joined["joined"] and joined["node_id"] == a_status["node_id"]
    both = {a_status["node_id"], b_status["node_id"]}
    for data_dir in (a_dir, b_dir):
        wait_until(lambda: {ad["node_id"] for ad in
                            _json("assets", "--mesh", "--json", "--data-dir", data_dir)} == both,
                   f"both adverts at {data_dir.name}", WAIT_S)
    views = _json("peers", "--json", "--data-dir", a_dir)
    assert [m["node_id"] for m in views["active"]] == [b_status["node_id"]]
    assert views["connections"][0]["node_id"] == b_status["node_id"]
    text = hmnode("assets", "--mesh", "--data-dir", a_dir).stdout
    assert "2 adverts" in text


def test_join_that_fails_says_why_and_exits_non_zero(tmp_path: Path, agents) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a, b = agents(a_dir), agents(b_dir)
    a_status = a.wait_ready()
    b.wait_ready()
    [a_addr] = a_status["addresses"]
    impostor = NodeKey.generate().node_id
    wrong = hmnode("join", f"{impostor}@{a_addr}", "--data-dir", b_dir, timeout=60)
    assert wrong.returncode == 1
    assert str(impostor) in wrong.stderr and a_status["node_id"] in wrong.stderr
    host, port = a_addr.rsplit(":", 1)
    a.stop()
    nobody = hmnode("join", f"{a_status['node_id']}@{a_addr}", "--data-dir", b_dir, timeout=60)
    assert nobody.returncode == 1 and "could not join" in nobody.stderr


def test_forged_and_replayed_adverts_are_refused_and_forgeries_counted(tmp_path: Path, agents) -> None:
    a = agents(tmp_path / "a")
    status = a.wait_ready()
    host, port = status["addresses"][0].rsplit(":", 1)
    target = NodeId.parse(status["node_id"])
    rogue_key, victim_key = NodeKey.generate(), NodeKey.generate()

    def gossip(advert) -> dict[str, Any]:
        return {"k": "gossip", "id": advert.msg_id, "p": advert.to_wire(), "h": 0}

    async def attack() -> None:
        rogue = Endpoint(rogue_key, Handlers())
        await rogue.start("127.0.0.1", 0)
        try:
            conn = await rogue.connect((host, int(port)), target)
            now = time.time()
            own = make_advert(rogue_key, 5, ["127.0.0.1:1"], {"cpu": {}}, None, now, 600)
            conn.notify("bc", gossip(own))
            # Replayed: a genuinely signed but older advert of the rogue itself.
            conn.notify("bc", gossip(make_advert(rogue_key, 3, ["127.0.0.1:1"], {}, None, now, 600)))
            # Forged: claims to be the victim, signed with the rogue's key.
            genuine = make_advert(victim_key, 1, ["127.0.0.1:2"], {}, None, now, 600)
            forged = type(genuine)(victim_key.node_id, 1, ("127.0.0.1:2",), {}, genuine.prices,
                                   now, now + 600, rogue_key.sign(genuine.signed_bytes))
            conn.notify("bc", gossip(forged))
            await asyncio.sleep(1.0)
        finally:
            await rogue.close()

    asyncio.run(attack())
    adverts = {ad["node_id"]: ad for ad in _json("assets", "--mesh", "--json", "--data-dir", tmp_path / "a")}
    assert adverts[str(rogue_key.node_id)]["seq"] == 5
    assert str(victim_key.node_id) not in adverts
    assert set(adverts) == {status["node_id"], str(rogue_key.node_id)}
    views = _json("peers", "--json", "--data-dir", tmp_path / "a")
    # The forgery counts against the rogue; the older advert does not, since an honest peer
    # passes one on when a newer one overtook it.
    assert views["misbehaviour"][str(rogue_key.node_id)] >= 1


def test_connect_status_and_peers_show_paths_and_reachability(tmp_path: Path, agents) -> None:
    dirs = [tmp_path / name for name in "abc"]
    nodes = [agents(d) for d in dirs]
    statuses = [n.wait_ready() for n in nodes]
    boot = f"{statuses[0]['node_id']}@{statuses[0]['addresses'][0]}"
    for d in dirs[1:]:
        assert _json("join", boot, "--json", "--data-dir", d)["joined"]
    c_id = statuses[2]["node_id"]
    wait_until(lambda: c_id in {ad["node_id"] for ad in
                                _json("assets", "--mesh", "--json", "--data-dir", dirs[1])},
               "c's advert at b", WAIT_S)
    got = _json("connect", c_id, "--json", "--data-dir", dirs[1])
    assert got["node_id"] == c_id and got["path"] == "direct" and got["relay"] is None
    assert got["elapsed_ms"] >= 0
    text = hmnode("connect", c_id, "--data-dir", dirs[1])
    assert text.returncode == 0 and f"connected to {c_id}: direct" in text.stdout
    peers = _json("peers", "--json", "--data-dir", dirs[1])
    row = next(r for r in peers["connections"] if r["node_id"] == c_id)
    assert row["path"] == "direct" and row["relay"] is None
    # On loopback every node is reachable unasked: a dial-back confirms it.
    nat = wait_until(lambda: (s := _json("status", "--json", "--data-dir", dirs[1])["nat"])
                     ["reachability"] == "public" and s, "b public", WAIT_S)
    assert nat["confirmed"] and nat["relay"] is None
    assert "reachable  public" in hmnode("status", "--data-dir", dirs[1]).stdout
    stranger = NodeKey.generate().node_id
    refused = hmnode("connect", str(stranger), "--timeout", "1", "--data-dir", dirs[1])
    assert refused.returncode == 1 and "no advert" in refused.stderr
    bad = hmnode("connect", "not-a-node-id", "--data-dir", dirs[1])
    assert bad.returncode != 0 and bad.stderr
