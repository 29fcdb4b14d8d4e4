"""The BFT chain end to end, with real `hmnode run` processes on loopback: a lone node commits
through the CLI, four validators commit and agree, a validator killed with SIGKILL under load
comes back and agrees, and forged transactions and votes change nothing.

Every wait polls against a deadline; every mesh is stopped at teardown whatever the test left.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import hmnode, wait_until
from hmnode import control
from hmnode.consensus.messages import (PREVOTE, Transaction, Vote, sha256, sign_tx, sign_vote,
                                       vote_bytes)
from hmnode.errors import HmnodeError
from hmnode.identity import NodeId, NodeKey
from hmnode.chain_service import LOCAL_APP_STATE, LONE_NODE_CREDITS
from hmnode.simnet.local import LocalMesh, node_name
from hmnode.transport.endpoint import Endpoint
from hmnode.transport.reachability import parse_address

CALL_S = 5.0
COMMIT_S = 20.0
AGREE_S = 30.0
OUTAGE_PROGRESS_S = 20.0


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_validators() -> Iterator[LocalMesh]:
    """Four validators of one chain, shared by the tests that only add transactions to it (each
    with a client key of its own, so they cannot disturb one another)."""
    directory = tempfile.mkdtemp(prefix="hmc-")
    mesh = LocalMesh(Path(directory))
    try:
        # Not sharing: the nodes' own registrations and offers would add blocks the tests
        # do not expect.
        mesh.up(4, validators=4, env={"HMNODE_SHARE_ENABLED": "false"})
        yield mesh
    finally:
        try:
            if mesh.state_file.exists():
                mesh.down(timeout=5.0)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def names(n: int) -> list[str]:
    return [node_name(i) for i in range(n)]


def call(mesh: LocalMesh, name: str, method: str, params: dict[str, Any] | None = None,
         timeout: float = CALL_S) -> Any:
    return control.call(mesh.data_dir(name).control_socket, method, params, timeout=timeout)


def chain_status(mesh: LocalMesh, name: str) -> dict[str, Any]:
    return call(mesh, name, "status")["chain"]


def submit(mesh: LocalMesh, name: str, txs: list[bytes]) -> list[dict[str, Any]]:
    return call(mesh, name, "submit_txs", {"txs": txs})["results"]


def commit_heights(mesh: LocalMesh, name: str) -> dict[str, int]:
    """Transaction id (hex) -> the height that committed it, as `name` saw its commits."""
    return {tx_id: c["height"] for c in call(mesh, name, "commits", {"after": 0})["commits"]
            for tx_id in c["tx_ids"]}


def wait_committed(mesh: LocalMesh, name: str, tx_ids: list[str], timeout: float) -> int:
    """Wait until `name` committed every transaction of `tx_ids`; the highest height of them."""
    def done() -> int | None:
        seen = commit_heights(mesh, name)
        if all(t in seen for t in tx_ids):
            return max(seen[t] for t in tx_ids)
        return None
    return wait_until(done, f"{name} to commit {len(tx_ids)} transactions", timeout)


def wait_agreed(mesh: LocalMesh, nodes: list[str], at_least: int, timeout: float) -> int:
    """Wait until every node's head is one block (same height >= at_least, block id and state
    root); that height."""
    def agreed() -> int | None:
        heads = {(c["height"], c["block_id"], c["state_root"])
                 for c in (chain_status(mesh, n) for n in nodes)}
        if len(heads) == 1:
            height = next(iter(heads))[0]
            if height >= at_least:
                return height
        return None
    return wait_until(agreed, f"{nodes} to agree on one head at height >= {at_least}", timeout)


def assert_same_block(mesh: LocalMesh, nodes: list[str], height: int) -> dict[str, Any]:
    """The block at `height` as every node has it: one block id and state root for all."""
    blocks = {n: call(mesh, n, "chain", {"height": height}) for n in nodes}
    ids = {n: (b["block_id"], b["state_root"]) for n, b in blocks.items()}
    assert len(set(ids.values())) == 1, f"nodes disagree at height {height}: {ids}"
    return blocks[nodes[0]]


def kv_put_tx(key: NodeKey, chain_id: str, nonce: int, name: str, value: bytes) -> Transaction:
    return sign_tx(key, chain_id, nonce, "kv.put", {"key": name, "value": value})


def forge_votes(target_status: dict[str, Any], impersonated: NodeId, attacker: NodeKey,
                outsider: NodeKey | None) -> list[list[Any]]:
    """A prevote for the target's next height that names `impersonated` as its validator but is
    signed by `attacker`; and, with `outsider`, a correctly signed prevote of a non-validator."""
    chain = target_status["chain"]
    height, chain_id = chain["height"] + 1, chain["chain_id"]
    block_id = sha256(b"a block nobody proposed")
    forged = Vote(chain_id, PREVOTE, height, 0, block_id, impersonated.key,
                  attacker.sign(vote_bytes(chain_id, PREVOTE, height, 0, block_id)))
    msgs = [["v", forged.encode()]]
    if outsider is not None:
        msgs.append(["v", sign_vote(outsider, chain_id, PREVOTE, height, 0, block_id).encode()])
    return msgs


def send_over_quic(mesh: LocalMesh, target: str, attacker: NodeKey, msgs: list[list[Any]],
                   rejected_before: int) -> None:
    """Connect to `target` over QUIC as `attacker`, send `msgs` as consensus traffic, and wait
    (bounded) until the target has rejected every one of them."""
    status = call(mesh, target, "status")
    host, port = parse_address(status["addresses"][0])[:2]
    target_id = NodeId.parse(status["node_id"])

    def rejected() -> int:
        counters = chain_status(mesh, target)["counters"]
        return counters.get("consensus_rejected", 0)

    async def attack() -> None:
        endpoint = Endpoint(attacker)
        await endpoint.start("127.0.0.1", 0)
        try:
            conn = await endpoint.connect((host, port), target_id, timeout=CALL_S)
            assert conn.peer_id == target_id
            conn.notify("chain.consensus", {"msgs": msgs})
            deadline = time.monotonic() + COMMIT_S
            while await asyncio.to_thread(rejected) < rejected_before + len(msgs):
                assert time.monotonic() < deadline, "the target never processed the forged votes"
                await asyncio.sleep(0.05)
        finally:
            await endpoint.close()

    asyncio.run(asyncio.wait_for(attack(), COMMIT_S + 10))


# --- 1. one node ------------------------------------------------------------------------------


def test_one_node_commits_alone_through_the_cli(mesh_factory: Any) -> None:
    # Not sharing: the node's own registration and offer would add blocks while it is read.
    mesh = mesh_factory(1, env={"HMNODE_SHARE_ENABLED": "false"})
    data_dir = mesh.data_dir(node_name(0)).path

    put = hmnode("kv", "put", "greeting", "hello", "--data-dir", data_dir, "--json")
    assert put.returncode == 0, put.stdout + put.stderr
    committed = json.loads(put.stdout)
    assert committed["ok"] is True and committed["rejected"] is None, committed
    height = committed["height"]
    assert isinstance(height, int) and height >= 1

    got = hmnode("kv", "get", "greeting", "--data-dir", data_dir, "--json")
    assert got.returncode == 0, got.stderr
    value = json.loads(got.stdout)
    assert value["found"] is True and value["value"] == "hello", value
    text = hmnode("kv", "get", "greeting", "--data-dir", data_dir)
    assert text.returncode == 0 and text.stdout.strip() == "hello"

    shown = hmnode("chain", "--height", str(height), "--data-dir", data_dir, "--json")
    assert shown.returncode == 0, shown.stderr
    block = json.loads(shown.stdout)
    assert block["height"] == height
    txs = {tx["tx_id"]: tx for tx in block["transactions"]}
    assert committed["tx_id"] in txs, block["transactions"]
    mine = txs[committed["tx_id"]]
    assert mine["kind"] == "kv.put" and mine["ok"] is True and mine["nonce"] == committed["nonce"]
    cert = block["certificate"]
    assert cert["block_id"] == block["block_id"] and cert["kind"] == "precommit"
    assert cert["power"] == cert["total_power"] == 1
    assert len(cert["signatures"]) == 1

    status = hmnode("status", "--data-dir", data_dir, "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    chain = info["chain"]
    assert chain["height"] >= 1 and chain["is_validator"] is True and chain["halted"] is None
    assert isinstance(chain["last_commit_ms"], (int, float)) and chain["last_commit_ms"] >= 0
    # Its own chain: it is the one validator.
    assert [v["node_id"] for v in chain["validators"]] == [info["node_id"]]
    assert block["proposer"] == info["node_id"]

    head = hmnode("chain", "--data-dir", data_dir, "--json")
    assert head.returncode == 0 and json.loads(head.stdout)["height"] == chain["height"]


def test_credits_through_the_cli_on_a_lone_node(mesh_factory: Any) -> None:
    # The node offers only what the test commits (not its own share).
    mesh = mesh_factory(1, env={"HMNODE_SHARE_ENABLED": "false"})
    data_dir = mesh.data_dir(node_name(0)).path
    other = NodeKey.generate().node_id
    for args in (("faucet", "500"), ("stake", "200"), ("unstake", "50"),
                 ("transfer", str(other), "10")):
        done = hmnode(*args, "--data-dir", data_dir, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["ok"] is True
    refused = hmnode("faucet", "5000000", "--data-dir", data_dir)
    assert refused.returncode == 1 and "faucet gives at most" in refused.stderr
    shown = hmnode("ledger", "--data-dir", data_dir, "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    # Genesis staked 1 for the lone validator and gave it LONE_NODE_CREDITS; the faucet minted
    # 500.
    assert info["account"]["balance"] == LONE_NODE_CREDITS + 500 - 200 - 10
    assert info["account"]["stake"] == 1 + 200 - 50
    assert [u["amount"] for u in info["account"]["unbonding"]] == [50]
    totals = info["totals"]
    minted = 1 + LONE_NODE_CREDITS + 500
    assert totals["minted"] == minted and totals["supply"] == minted
    assert totals["balances"] + totals["stake"] + totals["unbonding"] + totals["escrow"] == minted
    assert {"node_id": str(other), "balance": 10, "stake": 0} in info["accounts"]

    # The node offers its cores; one job fits, one asks for a runtime nobody allows.
    sock = mesh.data_dir(node_name(0)).control_socket
    offer = {"cores": 8, "memory_mib": 4096, "runtimes": ["wasm"], "expires_height": 10_000,
             "price": {"core_hour": 10, "gib_hour": 0, "gpu_hour": 0, "start_fee": 1}}
    # The node has no plot and is not registered: the offer plots, registers with its proof of
    # work, then commits with its proofs of space and stake.
    assert control.call(sock, "transaction", {"kind": "offer.commit", "body": offer,
                                              "wait": 10}, timeout=60)["ok"]
    standing = json.loads(hmnode("status", "--data-dir", data_dir, "--json").stdout)
    registry = standing["chain"]["registry"]
    assert registry["registered"] and registry["offering"] and registry["suspended"] is None
    assert registry["plot"]["n_labels"] >= 1024 and registry["answered_period"] == 0
    shown = hmnode("status", "--data-dir", data_dir).stdout
    assert "standing   registered with a plot of 1024 labels; offering" in shown
    for runtime in ("wasm", "process"):
        spec = {"cores": 4, "memory_mib": 1024, "runtime": runtime, "duration_s": 3600,
                "max_price": 100, "deadline_height": 10_000}
        assert control.call(sock, "transaction", {"kind": "job.submit", "body": spec,
                                                  "wait": 10}, timeout=20)["ok"]
    listed = hmnode("jobs", "--data-dir", data_dir, "--json")
    assert listed.returncode == 0, listed.stderr
    by_runtime = {j["resources"]["runtime"]: j for j in json.loads(listed.stdout)["jobs"]}
    assert by_runtime["process"]["state"] == "queued"
    assert by_runtime["process"]["why_waiting"] == "no node allows the process runtime"
    # The wasm job was allocated here at a cost of 41; it names no program, so this node's
    # executor reports it at once (exit 125) and is paid for the second it measured.
    wasm_job = by_runtime["wasm"]["job_id"]
    assert by_runtime["wasm"]["cost"] == 41
    assert by_runtime["wasm"]["node"] == info["account"]["node_id"]

    def settled() -> Any:
        job = call_json("job", wasm_job)
        return job if job["state"] == "settled" else None

    def call_json(*args: str) -> Any:
        done = hmnode(*args, "--data-dir", data_dir, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    job = wait_until(settled, "the program-less job to be reported", timeout=20)
    assert job["receipt"]["exit_code"] == 125 and job["receipt"]["paid"] == 2
    assert [h["state"] for h in job["history"]] == ["queued", "allocated", "settled"]
    after = call_json("ledger")
    assert after["totals"]["escrow"] == 100  # the process job's, still queued
    assert after["account"]["balance"] == LONE_NODE_CREDITS + 290 - 100


def test_a_lone_node_publishes_beacons_and_answers_its_space_challenges(
        mesh_factory: Any) -> None:
    # Periods of 4 blocks, an empty block every second, the test VDF: a period a few seconds.
    rules = dict(LOCAL_APP_STATE, beacon_blocks=4, answer_blocks=2, vdf_version=0,
                 work_bits=12, min_plot_labels=64)
    mesh = mesh_factory(1, app_state=rules, env={"HMNODE_CHAIN_EMPTY_BLOCK_S": "1"})
    name = node_name(0)
    offer = {"cores": 2, "memory_mib": 1024, "runtimes": ["wasm"], "expires_height": 10_000,
             "price": {"core_hour": 1, "gib_hour": 0, "gpu_hour": 0, "start_fee": 0}}
    assert call(mesh, name, "transaction", {"kind": "offer.commit", "body": offer, "wait": 10},
                timeout=60)["ok"]

    def registry() -> dict[str, Any]:
        return call(mesh, name, "status")["chain"]["registry"]

    # Two periods later the node has published both beacons and answered both challenges in
    # time, so it was never suspended.
    wait_until(lambda: registry()["answered_period"] >= 2,
               "the node to answer the beacons of periods 1 and 2", timeout=60)
    standing = registry()
    assert standing["suspended"] is None and standing["beacon"]["published_period"] >= 2
    kinds = set()
    for height in range(1, call(mesh, name, "chain")["height"] + 1):
        kinds |= {t["kind"] for t in call(mesh, name, "chain", {"height": height})["transactions"]
                  if t["ok"]}
    assert {"node.register", "offer.commit", "beacon.publish", "space.answer"} <= kinds


# --- 2. four validators -------------------------------------------------------------------------


def test_four_validators_commit_and_agree(four_validators: LocalMesh) -> None:
    mesh, nodes = four_validators, names(4)
    chain_id = chain_status(mesh, nodes[0])["chain_id"]
    client = NodeKey.generate()
    count = 24
    txs = [kv_put_tx(client, chain_id, nonce, f"agree-{nonce}", b"value-%d" % nonce)
           for nonce in range(1, count + 1)]
    # Each to another node, one by one, in nonce order: every validator must learn of the rest.
    for i, tx in enumerate(txs):
        (result,) = submit(mesh, nodes[i % 4], [tx.encode()])
        assert result == {"tx_id": tx.tx_id.hex(), "accepted": True, "duplicate": False}, result
    tx_ids = [tx.tx_id.hex() for tx in txs]
    top = wait_committed(mesh, nodes[0], tx_ids, COMMIT_S)
    height = wait_agreed(mesh, nodes, top, AGREE_S)
    assert height >= top
    for h in range(1, top + 1):
        assert_same_block(mesh, nodes, h)

    # Every node committed every transaction once, in nonce order, all applied.
    seen: dict[str, tuple[int, int]] = {}
    for h in range(1, top + 1):
        block = call(mesh, nodes[2], "chain", {"height": h})
        assert block["certificate"]["power"] * 3 > block["certificate"]["total_power"] * 2
        for tx in block["transactions"]:
            if tx["tx_id"] in tx_ids:
                assert tx["tx_id"] not in seen
                assert tx["ok"] is True, tx
                seen[tx["tx_id"]] = (h, tx["nonce"])
    assert set(seen) == set(tx_ids)
    assert [seen[t][1] for t in sorted(tx_ids, key=lambda t: seen[t])] == list(range(1, count + 1))

    for name in nodes:
        for nonce in (1, count // 2, count):
            got = call(mesh, name, "kv_get", {"key": f"agree-{nonce}"})
            assert got["value"] == b"value-%d" % nonce, (name, got)
        status = chain_status(mesh, name)
        assert status["halted"] is None and status["is_validator"] is True


# --- 3. kill -9 under load ------------------------------------------------------------------------


class Load(threading.Thread):
    """Submits kv.put transactions of one client, nonces 1, 2, ..., each to two different live
    nodes (so a node killed right after taking one cannot lose it), until stopped or `limit`."""

    def __init__(self, mesh: LocalMesh, nodes: list[str], chain_id: str, limit: int,
                 rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.mesh, self.nodes, self.chain_id, self.limit, self.rng = mesh, nodes, chain_id, limit, rng
        self.client = NodeKey.generate()
        self.down: set[str] = set()
        self.stop = threading.Event()
        self.submitted: list[Transaction] = []
        self.errors: list[str] = []

    def run(self) -> None:
        nonce = 0
        while not self.stop.is_set() and nonce < self.limit:
            nonce += 1
            tx = kv_put_tx(self.client, self.chain_id, nonce, f"load-{nonce}", b"v%d" % nonce)
            taken = 0
            for name in self.rng.sample(self.nodes, len(self.nodes)):
                if taken == 2:
                    break
                if name in self.down:
                    continue
                try:
                    (result,) = submit(self.mesh, name, [tx.encode()])
                except HmnodeError:
                    continue  # it died under us; the next node takes it
                if result["accepted"] or "already used" in result["error"]:
                    taken += 1  # taken, or committed already through the other node
                else:
                    self.errors.append(f"{name} refused nonce {nonce}: {result}")
            if taken == 0:
                self.errors.append(f"no node took nonce {nonce}")
                return
            self.submitted.append(tx)
            self.stop.wait(0.02)

    def wait_for(self, count: int, timeout: float) -> None:
        wait_until(lambda: len(self.submitted) >= count or not self.is_alive(),
                   f"{count} transactions submitted", timeout, poll_s=0.02)
        assert not self.errors, self.errors


def test_validator_killed_under_load_restarts_and_agrees(mesh_factory: Any) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    mesh = mesh_factory(4, validators=4)
    nodes = names(4)
    chain_id = chain_status(mesh, nodes[0])["chain_id"]
    victim = rng.choice(nodes)
    survivors = [n for n in nodes if n != victim]
    load = Load(mesh, nodes, chain_id, limit=2_000, rng=rng)
    load.start()
    try:
        load.wait_for(rng.randint(10, 60), 30.0)
        load.down.add(victim)
        killed = mesh.kill(victim)
        at_kill = {n: chain_status(mesh, n)["height"] for n in survivors}
        # The other three (exactly a quorum) go on committing the load without it.
        wait_until(lambda: all(chain_status(mesh, n)["height"] > at_kill[n] + 1 for n in survivors),
                   f"the others to commit while {victim} is down (seed {seed})", OUTAGE_PROGRESS_S)
        with pytest.raises(HmnodeError):
            call(mesh, victim, "status", timeout=1.0)

        restarted = mesh.start(victim)
        assert restarted.pid != killed.pid and restarted.node_id == killed.node_id
        load.down.discard(victim)
        load.wait_for(len(load.submitted) + rng.randint(10, 40), 30.0)
    finally:
        load.stop.set()
        load.join(timeout=10.0)
    assert not load.is_alive()
    assert not load.errors, load.errors
    assert load.submitted, "no load was submitted"

    tx_ids = [tx.tx_id.hex() for tx in load.submitted]
    last = load.submitted[-1]
    top = wait_committed(mesh, survivors[0], tx_ids, AGREE_S)
    assert top == commit_heights(mesh, survivors[0])[last.tx_id.hex()]
    height = wait_agreed(mesh, nodes, top, AGREE_S)
    block = assert_same_block(mesh, nodes, height)
    assert_same_block(mesh, nodes, top)
    assert block["certificate"]["power"] * 3 > block["certificate"]["total_power"] * 2

    status = chain_status(mesh, victim)
    assert status["halted"] is None, f"{victim} halted after its restart: {status['halted']}"
    assert status["is_validator"] is True
    # Every node applied the whole load, the restarted one included.
    for name in nodes:
        got = call(mesh, name, "kv_get", {"key": f"load-{last.nonce}"})
        assert got["value"] == b"v%d" % last.nonce, (name, got, seed)
        assert chain_status(mesh, name)["halted"] is None


# --- 4. forged input --------------------------------------------------------------------------------


def test_forged_transactions_and_votes_are_refused_and_change_nothing(
        four_validators: LocalMesh) -> None:
    mesh, nodes = four_validators, names(4)
    target = nodes[1]
    status = call(mesh, target, "status")
    chain_id = status["chain"]["chain_id"]
    client = NodeKey.generate()

    good = kv_put_tx(client, chain_id, 1, "forged", b"never")
    raw = bytearray(good.encode())
    raw[-1] ^= 0x01  # the last byte of the signature
    flipped = bytes(raw)
    other_chain = kv_put_tx(client, chain_id + "-other", 1, "forged", b"never").encode()
    garbage = b"\x93this is not a transaction"
    forged = [flipped, other_chain, garbage]
    forged_ids = {sha256(t).hex() for t in forged}
    assert Transaction.decode(flipped).signature != good.signature  # still well formed

    before = {n: chain_status(mesh, n)["height"] for n in nodes}
    for name in (target, nodes[2]):
        results = submit(mesh, name, forged)
        assert len(results) == 3
        for what, result in zip(("flipped signature", "other chain", "garbage"), results):
            assert result["accepted"] is False, (what, result)
            assert result["error"], (what, result)
    # Nothing was taken, so nothing is proposed: every head stays where it was.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert {n: chain_status(mesh, n)["height"] for n in nodes} == before
        time.sleep(0.1)
    assert all(chain_status(mesh, n)["mempool"] == 0 for n in nodes)

    # Forged votes over a real QUIC connection: one in a validator's name signed by the
    # attacker, one correctly signed by a key that is no validator.
    attacker = NodeKey.generate()
    impersonated = NodeId.parse(next(v["node_id"] for v in status["chain"]["validators"]
                                     if v["node_id"] != status["node_id"]))
    rejected_before = status["chain"]["counters"].get("consensus_rejected", 0)
    blamed_before = call(mesh, target, "peers")["misbehaviour"]
    msgs = forge_votes(call(mesh, target, "status"), impersonated, attacker, NodeKey.generate())
    send_over_quic(mesh, target, attacker, msgs, rejected_before)

    after = call(mesh, target, "status")
    assert after["pid"] == status["pid"], "the target restarted"
    assert after["chain"]["halted"] is None
    assert after["chain"]["height"] == before[target]
    # The forgery is counted against the peer that sent it, never against the honest
    # validator whose name it bore.
    misbehaviour = call(mesh, target, "peers")["misbehaviour"]
    assert misbehaviour.get(str(attacker.node_id), 0) >= 1, misbehaviour
    assert misbehaviour.get(str(impersonated), 0) == blamed_before.get(str(impersonated), 0), \
        misbehaviour

    # The chain still commits: the honest transaction (the nonce the forgery carried).
    (taken,) = submit(mesh, nodes[3], [good.encode()])
    assert taken["accepted"] is True, taken
    top = wait_committed(mesh, target, [good.tx_id.hex()], COMMIT_S)
    assert top > before[target]
    wait_agreed(mesh, nodes, top, AGREE_S)
    assert_same_block(mesh, nodes, top)
    for name in nodes:
        assert call(mesh, name, "kv_get", {"key": "forged"})["value"] == b"never"
        assert not forged_ids & set(commit_heights(mesh, name)), name
        assert chain_status(mesh, name)["halted"] is None
    for h in range(before[target] + 1, top + 1):
        block = call(mesh, target, "chain", {"height": h})
        assert not forged_ids & {tx["tx_id"] for tx in block["transactions"]}

