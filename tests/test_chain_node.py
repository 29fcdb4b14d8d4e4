"""ChainNode, the node-side driver of the chain: persist before send, block sync of a node that
was away, and refusal of forged input, on a hand-driven network and a clock moved by hand."""

from __future__ import annotations

from collections.abc import Callable
from random import Random
from typing import Any

import nacl.signing
import pytest

from hmnode import schema
from hmnode.chain_node import ChainConfig, ChainNode
from hmnode.consensus.chain import Chain, Genesis
from hmnode.consensus.kvapp import KeyValueApp
from hmnode.consensus.messages import Proposal, Vote, sign_tx, sign_vote, PREVOTE
from hmnode.consensus.tendermint import SignerState
from hmnode.consensus.validators import ValidatorSet
from hmnode.env import Env
from hmnode.identity import NodeId, NodeKey
from hmnode.simnet.sim.clock import NodeClock, VirtualClock
from hmnode.simnet.sim.store import SimStore
from hmnode.transport.wire import Notify, encode_message


def _keys(n: int, seed: int = 1) -> list[NodeKey]:
    rng = Random(seed)
    return [NodeKey(nacl.signing.SigningKey(rng.randbytes(32))) for _ in range(n)]


class _DurableLog(SimStore):
    """A SimStore that remembers the signer state as of the last sync (what a crash keeps)."""

    def _durable_row(self, table: schema.Table, key: str) -> Any:
        raw = self._durable.get(table.name, {}).get(table.key.encode(key))
        return None if raw is None else table.codec.decode(raw, table.name)

    def durable_signer(self) -> SignerState | None:
        wire = self._durable_row(schema.SIGNER, schema.SIGNER_STATE)
        return None if wire is None else SignerState.from_wire(wire)

    def durable_height(self) -> int:
        head = self._durable_row(schema.CHAIN, schema.CHAIN_HEAD)
        return 0 if head is None else head[0]


class _Cluster:
    """Validators over a network the test delivers by hand, one virtual clock."""

    def __init__(self, n: int, config: ChainConfig = ChainConfig()) -> None:
        self.clock = VirtualClock()
        self.keys = _keys(n)
        self.genesis = Genesis("t", 1_000, ValidatorSet.of((k.node_id.key, 1) for k in self.keys))
        self.queue: list[tuple[NodeId, NodeId, str, Any]] = []
        self.sent_unpersisted: list[str] = []
        self.misbehaviour: list[tuple[NodeId, str]] = []
        self.stores = [_DurableLog(sync_on_commit=False) for _ in range(n)]
        self.nodes = [self._boot(i, config) for i in range(n)]

    def _boot(self, i: int, config: ChainConfig) -> ChainNode:
        cluster, me = self, self.keys[i].node_id

        class Net:
            def send(self, dst: NodeId, addr: str | None, topic: str, body: dict) -> None:
                encode_message(Notify(topic, body))  # what the wire refuses fails the test
                cluster._check_persisted(i, topic, body)
                cluster.queue.append((me, dst, topic, body))

            def disconnect(self, dst: NodeId, reason: str) -> None:
                pass

            def misbehaved(self, peer: NodeId, reason: str) -> None:
                cluster.misbehaviour.append((peer, reason))

        chain = Chain(self.stores[i], KeyValueApp())
        chain.init_genesis(self.genesis)
        env = Env(NodeClock(self.clock), Random(i), Net(), self.stores[i])
        node = ChainNode(self.keys[i], env, chain, config)
        node.start()
        return node

    def _check_persisted(self, i: int, topic: str, body: dict) -> None:
        """Every message a validator signed must be durable (in its signer state, or under a
        block it committed) by the time it is sent."""
        if topic != "chain.consensus":
            return
        store, me = self.stores[i], self.keys[i].node_id.key
        state = store.durable_signer()
        for kind, raw in body["msgs"]:
            msg = Proposal.decode(raw) if kind == "p" else Vote.decode(raw)
            author = msg.proposer if isinstance(msg, Proposal) else msg.validator
            if author != me or msg.height <= store.durable_height():
                continue
            if state is None or msg not in state.sent.values():
                self.sent_unpersisted.append(f"{type(msg).__name__} h{msg.height} r{msg.round}")

    def deliver(self, until: Callable[[], bool], drop: Callable[[NodeId, NodeId], bool] =
                lambda a, b: False, max_steps: int = 100_000, must: bool = True) -> None:
        by_id = {k.node_id: node for k, node in zip(self.keys, self.nodes)}
        for _ in range(max_steps):
            if until():
                return
            if self.queue:
                src, dst, topic, body = self.queue.pop(0)
                if dst in by_id and not drop(src, dst):
                    by_id[dst].receive(src, topic, body)
            else:
                self.clock.run_until(self.clock.now + 0.05)
        if must:
            raise AssertionError("the cluster did not get there")


def test_every_signed_message_is_durable_before_it_is_sent() -> None:
    c = _Cluster(4)
    client = _keys(1, seed=9)[0]
    for nonce in range(1, 21):
        c.nodes[nonce % 4].submit(sign_tx(client, "t", nonce, "kv.put",
                                          {"key": f"k{nonce}", "value": b"v"}))
        c.deliver(lambda: False, max_steps=40, must=False)
    c.deliver(lambda: all(n.head.height >= 1 and n.mempool.ready() is False for n in c.nodes))
    assert c.sent_unpersisted == []
    roots = {n.head.state_root for n in c.nodes}
    heights = {n.head.height for n in c.nodes}
    assert len(roots) == 1 and len(heights) == 1


def test_a_validator_that_was_away_catches_up_by_block_sync() -> None:
    c = _Cluster(4)
    away = c.keys[3].node_id
    client = _keys(1, seed=9)[0]
    for nonce in range(1, 6):
        c.nodes[0].submit(sign_tx(client, "t", nonce, "kv.put", {"key": "k", "value": b"%d" % nonce}))
        c.deliver(lambda: c.nodes[0].head.height >= nonce,
                  drop=lambda a, b: away in (a, b))
    assert c.nodes[3].head.height == 0
    # Back on the network: its periodic ask (or the others' next messages) brings it up.
    c.deliver(lambda: c.nodes[3].head.height == c.nodes[0].head.height)
    assert c.nodes[3].head.state_root == c.nodes[0].head.state_root
    assert c.nodes[3].counters.get("blocks_synced", 0) >= 1


def test_block_sync_of_full_blocks_fits_the_wire() -> None:
    # Blocks near the size limit: a sync answer must still fit one transport frame.
    c = _Cluster(4)
    away = c.keys[3].node_id
    clients = _keys(8, seed=11)
    nonce = 0
    for height in range(1, 5):
        nonce += 1
        for client in clients:
            for j in range(40):
                c.nodes[0].submit(sign_tx(client, "t", (nonce - 1) * 40 + j + 1, "kv.put",
                                          {"key": f"k{j}", "value": bytes(2000)}))
        c.deliver(lambda: c.nodes[0].head.height >= height and not c.nodes[0].mempool.ready(),
                  drop=lambda a, b: away in (a, b))
    assert c.nodes[3].head.height == 0 and c.nodes[0].head.height >= 4
    c.deliver(lambda: c.nodes[3].head.height == c.nodes[0].head.height)
    assert c.nodes[3].head.state_root == c.nodes[0].head.state_root


def test_forged_votes_and_transactions_are_refused_and_blamed() -> None:
    c = _Cluster(4)
    attacker = _keys(1, seed=5)[0]
    victim = c.nodes[0]
    honest = c.keys[1]
    # A vote that claims an honest validator but is signed by the attacker.
    forged = sign_vote(attacker, "t", PREVOTE, 1, 0, b"\x01" * 32)
    forged = Vote(forged.chain_id, forged.kind, 1, 0, forged.block_id, honest.node_id.key,
                  forged.signature)
    # A correctly signed vote from a key that is no validator.
    outsider = sign_vote(attacker, "t", PREVOTE, 1, 0, b"\x01" * 32)
    victim.receive(attacker.node_id, "chain.consensus",
                   {"msgs": [["v", forged.encode()], ["v", outsider.encode()], ["v", b"junk"]]})
    bad_tx = sign_tx(attacker, "t", 1, "kv.put", {"key": "x", "value": b"y"})
    bad_tx = type(bad_tx)(bad_tx.chain_id, honest.node_id.key, 1, bad_tx.kind, bad_tx.body,
                          bad_tx.signature)
    victim.receive(attacker.node_id, "chain.txs", {"txs": [bad_tx.encode()]})
    assert len(victim.mempool) == 0
    engine = victim.engine
    assert engine is not None and not any(engine.votes.values())
    blamed = [why for who, why in c.misbehaviour if who == attacker.node_id]
    assert len(blamed) >= 3, blamed
    # The chain still works.
    client = _keys(1, seed=9)[0]
    victim.submit(sign_tx(client, "t", 1, "kv.put", {"key": "a", "value": b"b"}))
    c.deliver(lambda: all(n.head.height >= 1 for n in c.nodes))


@pytest.mark.parametrize("bad", [
    {"msgs": "nope"}, {"msgs": [["v"]]}, {}, {"txs": [1, 2]}, {"from": -1}, {"blocks": [["a"]]},
])
def test_malformed_bodies_change_nothing(bad: dict) -> None:
    c = _Cluster(1)
    node = c.nodes[0]
    before = node.head
    for topic in ("chain.consensus", "chain.txs", "chain.sync", "chain.blocks"):
        node.receive(c.keys[0].node_id, topic, bad)
    assert node.head == before and node.halted is None
