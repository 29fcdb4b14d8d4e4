"""The mempool, the chain with the key-value application over the real LMDB store, and the
Tendermint engine for one height, driven by hand with time passed in as numbers."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from hmnode import schema
from hmnode.consensus.chain import MAX_FUTURE_MS, Chain, ChainError, Genesis, RecordingTxn
from hmnode.consensus.kvapp import KeyValueApp
from hmnode.consensus.mempool import Mempool, MempoolLimits, TxRefused
from hmnode.consensus.messages import (MAX_VALIDATORS, NIL, PRECOMMIT, PREVOTE, Block,
                                       CommitCertificate, Header, Proposal, Transaction, Vote,
                                       check_equivocation, sign_proposal, sign_tx, sign_vote,
                                       txs_hash)
from hmnode.consensus.tendermint import (PROPOSE, Ready, SignerState, Tendermint, Timeouts)
from hmnode.consensus.validators import ValidatorSet
from hmnode.identity import NodeKey
from hmnode.simnet.sim.store import SimStore
from hmnode.store import Store

CHAIN = "kv-test"
GENESIS_MS = 1_700_000_000_000
KEYS = [NodeKey(nacl.signing.SigningKey(bytes([i + 1]) * 32)) for i in range(6)]
ALICE, BOB, CAROL = KEYS[3], KEYS[4], KEYS[5]  # transaction senders, not validators
OUTSIDER = NodeKey(nacl.signing.SigningKey(bytes([77]) * 32))


def put(key: NodeKey, nonce: int, k: str = "key", v: bytes = b"value",
        chain_id: str = CHAIN) -> Transaction:
    return sign_tx(key, chain_id, nonce, "kv.put", {"key": k, "value": v})


def flip(data: bytes, index: int = 0) -> bytes:
    out = bytearray(data)
    out[index % len(out)] ^= 0x01
    return bytes(out)


# --- mempool ---------------------------------------------------------------------------------


def pool(limits: MempoolLimits = MempoolLimits(),
         nonces: dict[bytes, int] | None = None) -> Mempool:
    """A mempool whose chain says each sender's next nonce is in `nonces` (1 if absent)."""
    table = nonces if nonces is not None else {}
    return Mempool(CHAIN, lambda sender: table.get(sender, 1), limits)


def test_mempool_adds_once() -> None:
    mp = pool()
    tx = put(ALICE, 1)
    assert mp.add(tx, 0.0) is True
    assert mp.add(tx, 0.0) is False
    assert mp.add(Transaction.decode(tx.encode()), 0.0) is False  # same id from the wire
    assert len(mp) == 1 and tx.tx_id in mp
    assert mp.size_bytes == len(tx.encode())
    assert mp.refused == 0


def test_mempool_refuses_a_bad_signature_and_another_chain() -> None:
    mp = pool()
    tx = put(ALICE, 1)
    with pytest.raises(TxRefused, match="bad signature"):
        mp.add(dataclasses.replace(tx, signature=flip(tx.signature)), 0.0)
    with pytest.raises(TxRefused, match="bad signature"):
        mp.add(dataclasses.replace(tx, body=tx.body + b"\x00"), 0.0)
    with pytest.raises(TxRefused, match="chain"):
        mp.add(put(ALICE, 1, chain_id="other-chain"), 0.0)
    assert len(mp) == 0 and mp.size_bytes == 0 and mp.refused == 3
    assert mp.add(tx, 0.0)  # the genuine one still gets in


def test_mempool_refuses_a_used_nonce() -> None:
    mp = pool(nonces={ALICE.node_id.key: 4})
    for nonce in (1, 3):
        with pytest.raises(TxRefused, match="already used"):
            mp.add(put(ALICE, nonce), 0.0)
    assert mp.add(put(ALICE, 4), 0.0)


def test_mempool_refuses_a_second_transaction_with_a_pending_nonce() -> None:
    mp = pool()
    assert mp.add(put(ALICE, 1, v=b"first"), 0.0)
    with pytest.raises(TxRefused, match="nonce 1"):
        mp.add(put(ALICE, 1, v=b"second"), 0.0)
    assert len(mp) == 1
    assert mp.reap(10, 1 << 20) == [put(ALICE, 1, v=b"first")]


def test_mempool_refuses_over_max_per_sender() -> None:
    mp = pool(MempoolLimits(max_per_sender=2))
    assert mp.add(put(ALICE, 1), 0.0) and mp.add(put(ALICE, 2), 0.0)
    with pytest.raises(TxRefused, match="pending"):
        mp.add(put(ALICE, 3), 0.0)
    assert mp.add(put(BOB, 1), 0.0)  # another sender is not held back
    # A nonce far ahead of the committed one is refused too (it could fill the sender's slots).
    mp2 = pool(MempoolLimits(max_per_sender=2))
    with pytest.raises(TxRefused, match="too far ahead"):
        mp2.add(put(ALICE, 4), 0.0)


def test_mempool_refuses_when_full() -> None:
    mp = pool(MempoolLimits(max_txs=2))
    assert mp.add(put(ALICE, 1), 0.0) and mp.add(put(BOB, 1), 0.0)
    with pytest.raises(TxRefused, match="full"):
        mp.add(put(CAROL, 1), 0.0)
    size = len(put(ALICE, 1).encode())
    mp = pool(MempoolLimits(max_bytes=2 * size + 10))
    assert mp.add(put(ALICE, 1), 0.0) and mp.add(put(BOB, 1), 0.0)
    with pytest.raises(TxRefused, match="full"):
        mp.add(put(CAROL, 1), 0.0)
    mp.committed([put(ALICE, 1)])
    assert mp.add(put(CAROL, 1), 0.0)  # room again after a block


def test_mempool_rate_limits_each_sender_and_refills_with_time() -> None:
    mp = pool(MempoolLimits(sender_rate=1.0, sender_burst=2.0))
    assert mp.add(put(ALICE, 1), 0.0) and mp.add(put(ALICE, 2), 0.0)  # the burst
    with pytest.raises(TxRefused, match="per second"):
        mp.add(put(ALICE, 3), 0.0)
    assert mp.add(put(BOB, 1), 0.0)  # each sender has its own bucket
    with pytest.raises(TxRefused, match="per second"):
        mp.add(put(ALICE, 3), 0.5)  # half a token so far
    assert mp.add(put(ALICE, 3), 1.0)  # a whole one now
    with pytest.raises(TxRefused, match="per second"):
        mp.add(put(ALICE, 4), 1.0)
    # The bucket fills up to the burst and no further, however long the sender was idle.
    assert mp.add(put(ALICE, 4), 100.0) and mp.add(put(ALICE, 5), 100.0)
    with pytest.raises(TxRefused, match="per second"):
        mp.add(put(ALICE, 6), 100.0)


def test_mempool_forged_transactions_do_not_spend_the_real_senders_rate() -> None:
    mp = pool(MempoolLimits(sender_rate=1.0, sender_burst=2.0))
    victim = ALICE.node_id.key
    for nonce in (1, 2):
        forged = dataclasses.replace(put(BOB, nonce), sender=victim)
        with pytest.raises(TxRefused, match="bad signature"):
            mp.add(forged, 0.0)
    assert mp.add(put(ALICE, 1), 0.0)


def test_mempool_keeps_bounded_state_for_refused_senders() -> None:
    mp = pool(MempoolLimits(max_senders_tracked=10))
    template = put(ALICE, 1)
    for i in range(300):
        forged = dataclasses.replace(template, sender=hashlib.sha256(b"%d" % i).digest())
        with pytest.raises(TxRefused, match="bad signature"):
            mp.add(forged, 0.0)
    assert len(mp) == 0
    # Per-sender state of senders with nothing pending stays within the tracked bound.
    assert len(getattr(mp, "_committed_nonce", {})) <= 10


def test_mempool_reap_waits_for_a_gap_to_fill() -> None:
    mp = pool()
    t1, t2, t3 = put(ALICE, 1), put(ALICE, 2), put(ALICE, 3)
    mp.add(t1, 0.0)
    mp.add(t3, 0.0)
    assert mp.reap(100, 1 << 20) == [t1]
    mp.add(t2, 0.0)
    assert mp.reap(100, 1 << 20) == [t1, t2, t3]
    assert mp.ready()


def test_mempool_reap_holds_a_sender_whose_next_nonce_is_missing() -> None:
    mp = pool()
    mp.add(put(ALICE, 2), 0.0)
    assert not mp.ready()
    assert mp.reap(100, 1 << 20) == []
    mp.add(put(BOB, 1), 0.0)
    assert mp.ready()
    assert mp.reap(100, 1 << 20) == [put(BOB, 1)]


def test_mempool_reap_orders_senders_by_arrival_and_respects_bounds() -> None:
    mp = pool()
    a = [put(ALICE, n) for n in (1, 2, 3)]
    b = [put(BOB, n) for n in (1, 2)]
    for tx in (b[0], a[0], a[1], b[1], a[2]):
        mp.add(tx, 0.0)
    everything = mp.reap(100, 1 << 20)
    assert everything == [b[0], b[1], a[0], a[1], a[2]]
    assert mp.reap(3, 1 << 20) == everything[:3]
    assert mp.reap(0, 1 << 20) == []
    size = len(everything[0].encode())
    assert mp.reap(100, 2 * size) == everything[:2]
    assert mp.reap(100, 2 * size + size // 2) == everything[:2]
    assert mp.reap(100, size - 1) == []


def test_mempool_committed_drops_included_and_stale_transactions() -> None:
    chain: dict[bytes, int] = {}  # what the chain says: each sender's next nonce
    mp = pool(nonces=chain)
    a = [put(ALICE, n) for n in (1, 2, 3)]
    for tx in a + [put(BOB, 1)]:
        mp.add(tx, 0.0)
    chain[ALICE.node_id.key] = 3
    mp.committed(a[:2])
    assert len(mp) == 2 and a[0].tx_id not in mp and a[2].tx_id in mp
    assert mp.reap(100, 1 << 20) == [a[2], put(BOB, 1)]  # Alice arrived first
    # Another transaction with Bob's nonce 1 (from another node's mempool) made his stale.
    chain[BOB.node_id.key] = 2
    mp.committed([put(BOB, 1, v=b"elsewhere")])
    assert put(BOB, 1).tx_id not in mp
    assert mp.reap(100, 1 << 20) == [a[2]]
    assert mp.size_bytes == len(a[2].encode())
    # Its nonce is used now.
    with pytest.raises(TxRefused, match="already used"):
        mp.add(put(BOB, 1), 0.0)
    mp.committed([a[2]])
    assert len(mp) == 0 and mp.size_bytes == 0 and not mp.ready()


def test_mempool_forget_nonces_rereads_the_chain() -> None:
    nonces: dict[bytes, int] = {}
    mp = pool(nonces=nonces)
    mp.add(put(ALICE, 1), 0.0)
    mp.add(put(ALICE, 2), 0.0)
    nonces[ALICE.node_id.key] = 2  # block sync applied nonce 1 behind the pool's back
    mp.forget_nonces()
    assert mp.reap(100, 1 << 20) == [put(ALICE, 2)]


# --- the chain -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def genesis(validators: list[NodeKey] | None = None, epoch_blocks: int = 100,
            power: int = 10, app_state: Any = None) -> Genesis:
    members = validators if validators is not None else [KEYS[0]]
    return Genesis(CHAIN, GENESIS_MS, ValidatorSet.of((k.node_id.key, power) for k in members),
                   epoch_blocks, app_state)


def open_chain(storage: Any, g: Genesis | None = None) -> Chain:
    chain = Chain(storage, KeyValueApp())
    chain.init_genesis(g if g is not None else genesis())
    return chain


def certify(block: Block, signers: list[NodeKey] | None = None, round_: int = 0) -> CommitCertificate:
    return CommitCertificate.from_votes(
        [sign_vote(k, block.header.chain_id, PRECOMMIT, block.height, round_, block.block_id)
         for k in (signers if signers is not None else [KEYS[0]])])


def build(chain: Chain, txs: list[Transaction], time_ms: int | None = None) -> Block:
    head = chain.head()
    return chain.build_block(head.height + 1, KEYS[0].node_id.key,
                             time_ms if time_ms is not None else head.time_ms + 1000, txs)


def kv_get(storage: Any, key: str) -> bytes | None:
    return storage.read(lambda tx: KeyValueApp().get(tx, key))


def rebuilt(block: Block, txs: tuple[Transaction, ...] | None = None, **header: Any) -> Block:
    """`block` with header fields replaced (and `txs`, with the header's hash to match)."""
    txs = block.txs if txs is None else txs
    return Block(dataclasses.replace(block.header, txs_hash=txs_hash(txs), **header), txs)


def test_genesis_head_and_app_state(store: Store) -> None:
    g = genesis(app_state={"kv": {"greeting": "hello", "raw": b"\x00"}})
    chain = open_chain(store, g)
    head = chain.head()
    assert (head.height, head.block_id, head.time_ms) == (0, g.genesis_id, GENESIS_MS)
    assert chain.chain_id == CHAIN
    assert chain.validators_at(1) == g.validators
    assert kv_get(store, "greeting") == b"hello" and kv_get(store, "raw") == b"\x00"
    assert chain.next_nonce(ALICE.node_id.key) == 1
    assert chain.block(1) is None
    # Opening the store again finds the same chain.
    again = open_chain(store, g)
    assert again.head() == head


def test_build_check_and_commit_a_block(store: Store) -> None:
    chain = open_chain(store)
    txs = [put(ALICE, 1, "key", b"v1"), put(ALICE, 2, "key", b"v2"), put(BOB, 1, "b", b"bee")]
    block = build(chain, txs)
    assert block.txs == tuple(txs) and block.height == 1
    assert block.header.prev_id == chain.head().block_id
    assert chain.check_block(block, now_ms=block.header.time_ms) is None
    assert kv_get(store, "key") is None  # checking changed nothing
    assert chain.next_nonce(ALICE.node_id.key) == 1
    cert = certify(block)
    chain.validators_at(1).check_certificate(cert, CHAIN, 1, block.block_id)
    head = chain.commit(block, cert)
    assert head == chain.head()
    assert (head.height, head.block_id, head.state_root) == (1, block.block_id,
                                                             block.header.state_root)
    assert kv_get(store, "key") == b"v2" and kv_get(store, "b") == b"bee"
    assert chain.next_nonce(ALICE.node_id.key) == 3 and chain.next_nonce(BOB.node_id.key) == 2
    for i, tx in enumerate(txs):
        assert chain.tx_result(tx.tx_id) == [1, i, None]
    stored_block, stored_cert = chain.block(1)
    assert stored_block == block and stored_cert == cert
    # A fresh Chain on the same store reads the same head.
    assert open_chain(store).head() == head
    # The next block follows it.
    nxt = build(chain, [put(ALICE, 3, "key", b"v3")])
    assert nxt.header.prev_id == block.block_id and chain.check_block(nxt, None) is None
    chain.commit(nxt, certify(nxt))
    assert kv_get(store, "key") == b"v3" and chain.head().height == 2


def test_build_block_leaves_out_transactions_that_do_not_apply_in_order(store: Store) -> None:
    chain = open_chain(store)
    block = build(chain, [put(ALICE, 2), put(ALICE, 1), put(BOB, 1), put(BOB, 1, v=b"again")])
    assert block.txs == (put(ALICE, 1), put(BOB, 1))
    assert chain.check_block(block, None) is None


def test_build_block_time_is_after_the_previous_block(store: Store) -> None:
    chain = open_chain(store)
    block = build(chain, [], time_ms=GENESIS_MS - 5)  # a proposer's clock behind
    assert block.header.time_ms == GENESIS_MS + 1
    assert chain.check_block(block, None) is None


@pytest.fixture
def next_block(store: Store) -> tuple[Chain, Block]:
    chain = open_chain(store)
    chain.commit(first := build(chain, [put(ALICE, 1)]), certify(first))
    return chain, build(chain, [put(ALICE, 2, "key", b"two"), put(BOB, 1, "b", b"x")])


def test_check_block_accepts_the_built_block(next_block: tuple[Chain, Block]) -> None:
    chain, block = next_block
    assert chain.check_block(block, block.header.time_ms) is None
    assert chain.check_block(block, None) is None
    assert chain.check_block(Block.decode(block.encode()), None) is None


@pytest.mark.parametrize("change,why", [
    (lambda b, h: rebuilt(b, height=3), "not the next block"),
    (lambda b, h: rebuilt(b, height=1), "not the next block"),
    (lambda b, h: rebuilt(b, chain_id="other"), "not the next block"),
    (lambda b, h: rebuilt(b, prev_id=bytes(32)), "previous block"),
    (lambda b, h: rebuilt(b, time_ms=h.time_ms), "time is not after"),
    (lambda b, h: rebuilt(b, time_ms=h.time_ms - 1), "time is not after"),
    (lambda b, h: rebuilt(b, state_root=flip(b.header.state_root)), "state root"),
    (lambda b, h: rebuilt(b, validators_hash=bytes(32)), "validator set"),
    (lambda b, h: rebuilt(b, txs=b.txs[:1]), "state root"),
    (lambda b, h: rebuilt(b, txs=b.txs[::-1]), "state root"),
], ids=["height-ahead", "height-behind", "chain", "prev-id", "same-time", "earlier-time",
        "state-root", "validators", "dropped-tx", "reordered-txs"])
def test_check_block_refuses(next_block: tuple[Chain, Block], change: Callable[..., Block],
                             why: str) -> None:
    chain, block = next_block
    head = chain.head()
    assert chain.check_block(change(block, head), None) is not None
    assert why in chain.check_block(change(block, head), None)
    assert chain.head() == head


def test_check_block_refuses_a_time_too_far_in_the_future(next_block: tuple[Chain, Block]) -> None:
    chain, block = next_block
    t = block.header.time_ms
    assert chain.check_block(block, now_ms=t - MAX_FUTURE_MS) is None
    assert "future" in chain.check_block(block, now_ms=t - MAX_FUTURE_MS - 1)
    assert chain.check_block(block, now_ms=None) is None  # syncing old blocks: no clock bound


def test_check_block_refuses_a_bad_transaction_signature(next_block: tuple[Chain, Block]) -> None:
    chain, block = next_block
    bad = dataclasses.replace(block.txs[0], signature=flip(block.txs[0].signature, 7))
    forged = rebuilt(block, txs=(bad,) + block.txs[1:])
    assert "bad signature" in chain.check_block(forged, None)
    # A transaction the caller says it verified already is not checked again.
    assert "bad signature" not in (chain.check_block(forged, None, verified=lambda _: True) or "")
    other_chain = put(ALICE, 2, chain_id="other-chain")
    assert "chain" in chain.check_block(rebuilt(block, txs=(other_chain,)), None)


def test_check_block_refuses_a_wrong_nonce_and_a_repeated_transaction(
        next_block: tuple[Chain, Block]) -> None:
    chain, block = next_block
    for txs in ((put(ALICE, 1),), (put(ALICE, 3),), (put(CAROL, 2),),
                (put(ALICE, 2), put(ALICE, 4))):
        assert "nonce" in chain.check_block(rebuilt(block, txs=txs), None)
    twice = rebuilt(block, txs=(block.txs[0], block.txs[0]))
    assert "twice" in chain.check_block(twice, None)


def test_commit_with_a_wrong_state_root_changes_nothing(next_block: tuple[Chain, Block]) -> None:
    chain, block = next_block
    storage = chain.storage
    head = chain.head()
    forged = rebuilt(block, state_root=flip(block.header.state_root))
    with pytest.raises(ChainError, match="diverged"):
        chain.commit(forged, certify(forged))
    assert chain.head() == head
    assert open_chain(storage).head() == head  # nothing reached the store either
    assert kv_get(storage, "key") == b"value" and kv_get(storage, "b") is None
    assert chain.next_nonce(ALICE.node_id.key) == 2 and chain.next_nonce(BOB.node_id.key) == 1
    assert chain.tx_result(block.txs[0].tx_id) is None
    assert chain.block(2) is None
    # The genuine block still commits.
    chain.commit(block, certify(block))
    assert kv_get(storage, "key") == b"two"


def test_commit_of_a_block_that_does_not_execute_raises_chain_error(
        next_block: tuple[Chain, Block]) -> None:
    chain, block = next_block
    head = chain.head()
    bad_nonce = rebuilt(block, txs=(put(ALICE, 5),))
    with pytest.raises(ChainError, match="does not execute"):
        chain.commit(bad_nonce, certify(bad_nonce))
    not_next = rebuilt(block, height=5)
    with pytest.raises(ChainError, match="does not follow"):
        chain.commit(not_next, certify(not_next))
    assert chain.head() == head and chain.next_nonce(ALICE.node_id.key) == 2


def test_a_rejected_transaction_is_recorded_and_uses_its_nonce(store: Store) -> None:
    chain = open_chain(store)
    delete_missing = sign_tx(ALICE, CHAIN, 1, "kv.delete", {"key": "missing"})
    unknown_kind = sign_tx(ALICE, CHAIN, 2, "kv.frobnicate", {})
    bad_body = sign_tx(ALICE, CHAIN, 3, "kv.put", [1, 2])
    good = put(ALICE, 4, "key", b"v")
    delete_present = sign_tx(ALICE, CHAIN, 5, "kv.delete", {"key": "key"})
    block = build(chain, [delete_missing, unknown_kind, bad_body, good, delete_present])
    assert len(block.txs) == 5
    assert chain.check_block(block, None) is None
    chain.commit(block, certify(block))
    assert chain.tx_result(delete_missing.tx_id) == [1, 0, "no such key"]
    assert "unknown transaction kind" in chain.tx_result(unknown_kind.tx_id)[2]
    assert "not a map" in chain.tx_result(bad_body.tx_id)[2]
    assert chain.tx_result(good.tx_id) == [1, 3, None]
    assert chain.tx_result(delete_present.tx_id) == [1, 4, None]
    assert chain.next_nonce(ALICE.node_id.key) == 6
    assert kv_get(store, "key") is None


STATE_TABLES = (schema.KV, schema.KV_POWER, schema.NONCES, schema.TX_RESULTS,
                schema.VALIDATOR_SETS, schema.BLOCKS, schema.CERTIFICATES, schema.CHAIN)


def dump(storage: Any) -> dict[str, list]:
    """Every row of the chain's tables."""
    return storage.read(lambda tx: {t.name: list(tx.items(t)) for t in STATE_TABLES})


def test_stores_applying_the_same_blocks_agree(tmp_path: Path) -> None:
    """One store builds each block, one checks it first, one commits it unseen (so it executes
    it at commit): all three end with the same rows and the same head."""
    stores = [Store.open(tmp_path / name) for name in ("built", "checked", "blind")]
    try:
        g = genesis([KEYS[0], KEYS[1]], epoch_blocks=2, app_state={"kv": {"seed": "s"}})
        builder, checker, blind = (open_chain(s, g) for s in stores)
        assert builder.head() == checker.head() == blind.head()
        batches = [
            [put(ALICE, 1, "x", b"1"), put(BOB, 1, "y", b"2"),
             sign_tx(KEYS[2], CHAIN, 1, "kv.power", {"power": 4})],
            [sign_tx(ALICE, CHAIN, 2, "kv.delete", {"key": "x"}),
             sign_tx(BOB, CHAIN, 2, "kv.delete", {"key": "nope"}),
             put(ALICE, 3, "x", b"again"), sign_tx(ALICE, CHAIN, 4, "kv.delete", {"key": "x"}),
             sign_tx(KEYS[1], CHAIN, 1, "kv.power", {"power": 0})],  # epoch end
            [],
            [put(CAROL, 1, "z", b"3"), sign_tx(ALICE, CHAIN, 5, "kv.delete", {"key": "seed"})],
        ]
        for txs in batches:
            block = build(builder, txs)
            assert len(block.txs) == len(txs)
            assert checker.check_block(block, None) is None
            cert = certify(block, [KEYS[0], KEYS[1]] if block.height <= 2 else None)
            heads = {c.commit(block, cert) for c in (builder, checker, blind)}
            assert heads == {builder.head()}
            assert builder.head().state_root == block.header.state_root
        assert dump(stores[0]) == dump(stores[1]) == dump(stores[2])
        assert kv_get(stores[2], "x") is None and kv_get(stores[2], "seed") is None
        assert kv_get(stores[2], "y") == b"2" and kv_get(stores[2], "z") == b"3"
        assert blind.validators_at(3).members == tuple(sorted(
            [(KEYS[0].node_id.key, 10), (KEYS[2].node_id.key, 4)]))
        assert dump(stores[2])["kv_power"] == []  # the requests were consumed at the epoch end
        # Another order of the same writes gives another root: the root commits to history.
        c_store = Store.open(tmp_path / "c")
        c = open_chain(c_store, g)
        first = builder.block(1)[0]
        other = c.build_block(1, KEYS[0].node_id.key, first.header.time_ms,
                              [first.txs[1], first.txs[0], first.txs[2]])
        assert other.header.state_root != first.header.state_root
        c_store.close()
    finally:
        for s in stores:
            s.close()


def test_commit_after_speculation_on_another_head_executes_again(store: Store) -> None:
    """A block checked on one head and committed on another state is executed afresh: the
    remembered writes of a speculation never apply to a state they were not computed on."""
    chain = open_chain(store)
    a = build(chain, [put(ALICE, 1, "k", b"a")])
    b = build(chain, [put(BOB, 1, "k", b"b")], time_ms=a.header.time_ms + 1)
    assert chain.check_block(a, None) is None and chain.check_block(b, None) is None
    chain.commit(a, certify(a))
    with pytest.raises(ChainError):
        chain.commit(b, certify(b))  # height 1 is taken
    assert kv_get(store, "k") == b"a" and chain.next_nonce(BOB.node_id.key) == 1
    nxt = build(chain, [put(BOB, 1, "k", b"b2")])
    chain.commit(nxt, certify(nxt))
    assert kv_get(store, "k") == b"b2"


def test_init_genesis_with_another_genesis_is_refused(store: Store) -> None:
    chain = open_chain(store)
    chain.init_genesis(genesis())  # the same one again is fine
    other = dataclasses.replace(genesis(), chain_id="another-chain")
    with pytest.raises(ChainError, match="another"):
        chain.init_genesis(other)
    with pytest.raises(ChainError):
        Chain(store, KeyValueApp()).init_genesis(genesis(epoch_blocks=5))
    with pytest.raises(ChainError):
        Chain(store, KeyValueApp()).init_genesis(genesis(power=11))
    assert Chain(store, KeyValueApp()).head() == chain.head()


def test_chain_without_genesis_says_so(store: Store) -> None:
    chain = Chain(store, KeyValueApp())
    with pytest.raises(ChainError, match="genesis"):
        chain.head()
    with pytest.raises(ChainError, match="genesis"):
        chain.validators_at(1)


def test_epoch_change_from_a_power_transaction(store: Store) -> None:
    newcomer = KEYS[1]
    chain = open_chain(store, genesis(epoch_blocks=2))
    first = build(chain, [sign_tx(newcomer, CHAIN, 1, "kv.power", {"power": 5})])
    assert len(first.txs) == 1
    chain.commit(first, certify(first))
    with pytest.raises(ChainError):
        chain.validators_at(3)  # the next epoch's set is not known before its last block
    second = build(chain, [])
    assert chain.check_block(second, None) is None
    chain.commit(second, certify(second))
    before, after = chain.validators_at(2), chain.validators_at(3)
    assert newcomer.node_id.key not in before and before == chain.validators_at(1)
    assert after.power(newcomer.node_id.key) == 5
    assert after.power(KEYS[0].node_id.key) == 10
    assert after.total == 15
    assert chain.validators_at(4) == after
    # Block 3 names the new set, and must be certified by it.
    third = build(chain, [])
    assert third.header.validators_hash == after.hash
    assert chain.check_block(third, None) is None
    with pytest.raises(Exception):
        after.check_certificate(certify(third), CHAIN, 3, third.block_id)  # 10 of 15: no quorum
    after.check_certificate(certify(third, [KEYS[0], newcomer]), CHAIN, 3, third.block_id)
    # A fresh Chain over the store reads the same sets.
    again = open_chain(store, genesis(epoch_blocks=2))
    assert again.validators_at(3) == after and again.validators_at(2) == before


def test_epoch_without_requests_keeps_the_set(store: Store) -> None:
    chain = open_chain(store, genesis(epoch_blocks=1))
    for _ in range(3):
        block = build(chain, [put(ALICE, chain.next_nonce(ALICE.node_id.key))])
        chain.commit(block, certify(block))
    assert chain.validators_at(4) == chain.validators_at(1)


def test_power_zero_leaves_the_set_but_never_empties_it(store: Store) -> None:
    chain = open_chain(store, genesis([KEYS[0], KEYS[1]], epoch_blocks=1))
    block = build(chain, [sign_tx(KEYS[1], CHAIN, 1, "kv.power", {"power": 0})])
    chain.commit(block, certify(block, [KEYS[0], KEYS[1]]))
    assert chain.validators_at(2).members == ((KEYS[0].node_id.key, 10),)
    block = build(chain, [sign_tx(KEYS[0], CHAIN, 1, "kv.power", {"power": 0})])
    chain.commit(block, certify(block))
    assert chain.validators_at(3).members == ((KEYS[0].node_id.key, 10),)


def test_a_certified_block_never_leaves_the_chain_without_a_validator_set(store: Store) -> None:
    chain = open_chain(store, genesis(epoch_blocks=1))
    joiners = [sign_tx(NodeKey(nacl.signing.SigningKey(i.to_bytes(32, "big"))), CHAIN, 1,
                       "kv.power", {"power": 1}) for i in range(1000, 1000 + MAX_VALIDATORS)]
    block = build(chain, joiners)
    if chain.check_block(block, None) is None:
        chain.commit(block, certify(block))
    nxt = chain.validators_at(chain.head().height + 1)
    assert 1 <= len(nxt) <= MAX_VALIDATORS


def test_recording_txn_digests_every_write_in_order() -> None:
    disk = SimStore()

    def digest(ops: list[tuple[str, bytes, Any]]) -> bytes:
        def run(tx: Any) -> bytes:
            rec = RecordingTxn(tx)
            for op, key, value in ops:
                if op == "put":
                    rec.put(schema.KV, key, value)
                else:
                    rec.delete(schema.KV, key)
            return rec.writes.digest()
        return disk.write(run)

    a = [("put", b"a", b"1"), ("put", b"b", b"2")]
    assert digest(a) == digest(list(a))
    assert digest(a) != digest(a[::-1])
    assert digest(a) != digest([("put", b"a", b"1"), ("put", b"b", b"3")])
    assert digest(a) != digest(a + [("delete", b"c", None)])


def test_commit_is_all_or_nothing_across_a_crash() -> None:
    disk = SimStore(sync_on_commit=False)
    chain = open_chain(disk)  # init_genesis syncs
    genesis_head = chain.head()
    block = build(chain, [put(ALICE, 1, "key", b"v")])
    chain.commit(block, certify(block))
    assert kv_get(disk, "key") == b"v"
    assert disk.crash() == 1  # the commit was not synced: all of it is lost, nothing half
    restarted = open_chain(disk)
    assert restarted.head() == genesis_head
    assert kv_get(disk, "key") is None
    assert restarted.next_nonce(ALICE.node_id.key) == 1
    assert restarted.tx_result(block.txs[0].tx_id) is None and restarted.block(1) is None
    # Applied again and synced, it survives the next crash whole.
    restarted.commit(block, certify(block))
    disk.sync()
    disk.crash()
    again = open_chain(disk)
    assert again.head().block_id == block.block_id
    assert kv_get(disk, "key") == b"v" and again.next_nonce(ALICE.node_id.key) == 2


def test_speculation_leaves_no_trace_in_a_sim_store() -> None:
    disk = SimStore(sync_on_commit=False)
    chain = open_chain(disk)
    block = build(chain, [put(ALICE, 1, "key", b"v")])
    assert chain.check_block(block, None) is None
    assert kv_get(disk, "key") is None and chain.next_nonce(ALICE.node_id.key) == 1
    assert disk.crash() == 0  # building and checking committed nothing


# --- the Tendermint engine -------------------------------------------------------------------

VALIDATORS = KEYS[:3] + [KEYS[3]]  # four validators of equal power (KEYS[3] doubles as Alice)
BLOCK_MS = GENESIS_MS + 1000
TIMEOUTS = Timeouts()


def engine_for(chain: Chain, key: NodeKey | None, now: float = 0.0,
               restored: SignerState | None = None, txs: list[Transaction] | None = None,
               time_ms: int = BLOCK_MS) -> Tendermint:
    validators = chain.validators_at(1)

    def make_block(height: int, round_: int) -> Block:
        assert key is not None
        return chain.build_block(height, key.node_id.key, time_ms + round_, list(txs or []))

    return Tendermint(CHAIN, 1, validators, key, TIMEOUTS, make_block,
                      lambda block: chain.check_block(block, None), now, restored)


class Net:
    """Engines of one height connected by hand: every message reaches every other engine,
    except what a silent validator sends."""

    def __init__(self, engines: list[Tendermint], silent: frozenset[int] = frozenset()) -> None:
        self.engines = engines
        self.silent = silent
        self.decided: dict[int, tuple[Block, CommitCertificate]] = {}
        self.sent: dict[int, list[Any]] = {i: [] for i in range(len(engines))}
        self.readies: list[tuple[int, Ready]] = []

    def pump(self, now: float, limit: int = 200) -> None:
        """Deliver until nothing is left to deliver."""
        for _ in range(limit):
            moved = False
            for i, engine in enumerate(self.engines):
                engine.check_invariants()
                ready = engine.ready()
                self.readies.append((i, ready))
                if ready.decided is not None:
                    self.decided.setdefault(i, ready.decided)
                self.sent[i].extend(ready.messages)
                if i in self.silent:
                    continue
                for msg in ready.messages:
                    moved = True
                    for j, other in enumerate(self.engines):
                        if j != i:
                            other.receive(msg, now)
                            other.check_invariants()
            if not moved:
                return
        raise AssertionError("messages kept flowing")

    def run(self, now: float, until: Callable[[], bool], max_steps: int = 100) -> float:
        """Tick every engine at its next deadline until `until()`; returns the time reached."""
        self.pump(now)
        for _ in range(max_steps):
            if until():
                return now
            now = min(e.next_deadline() for e in self.engines)
            for engine in self.engines:
                engine.tick(now)
                engine.check_invariants()
            self.pump(now)
        raise AssertionError("no decision")


@pytest.fixture
def four(store: Store) -> Chain:
    return open_chain(store, genesis(VALIDATORS))


def test_single_validator_decides_at_once(store: Store) -> None:
    key = KEYS[0]
    chain = open_chain(store)
    mp = Mempool(CHAIN, chain.next_nonce)
    mp.add(put(ALICE, 1, "key", b"v"), 0.0)

    def make_block(height: int, round_: int) -> Block:
        return chain.build_block(height, key.node_id.key, BLOCK_MS, mp.reap(100, 1 << 20))

    engine = Tendermint(CHAIN, 1, chain.validators_at(1), key, TIMEOUTS, make_block,
                        lambda b: chain.check_block(b, None), 0.0)
    assert engine.waiting and engine.ready().decided is None  # nothing before wake
    engine.wake(0.0)
    ready = engine.ready()
    assert ready.decided is not None  # no persist/ack round trip needed to decide
    block, cert = ready.decided
    assert block.txs == (put(ALICE, 1, "key", b"v"),)
    assert cert.block_id == block.block_id and cert.height == 1 and cert.round == 0
    assert [v for v, _ in cert.signatures] == [key.node_id.key]
    chain.validators_at(1).check_certificate(cert, CHAIN, 1, block.block_id)
    kinds = [(type(m).__name__, getattr(m, "kind", None)) for m in ready.messages]
    assert kinds == [("Proposal", None), ("Vote", PREVOTE), ("Vote", PRECOMMIT)]
    assert not getattr(ready, "rejected", []) and not ready.evidence and engine.rejected == 0
    engine.check_invariants()
    chain.commit(block, cert)
    mp.committed(block.txs)
    assert kv_get(store, "key") == b"v" and len(mp) == 0


def test_a_follower_signs_nothing_but_decides(four: Chain) -> None:
    engines = [engine_for(four, k) for k in VALIDATORS] + [engine_for(four, OUTSIDER)]
    assert engines[-1].key is None
    for e in engines:
        e.wake(0.0)
    net = Net(engines)
    net.pump(0.0)
    # It relays what it saw (a polka, the certificate's precommits) but signs none of it.
    me = OUTSIDER.node_id.key
    assert all((m.proposer if isinstance(m, Proposal) else m.validator) != me
               for m in net.sent[4])
    assert all(ready.persist is None for i, ready in net.readies if i == 4)
    assert set(net.decided) == {0, 1, 2, 3, 4}


def test_four_validators_decide_the_same_block_without_timeouts(four: Chain) -> None:
    engines = [engine_for(four, k) for k in VALIDATORS]
    for e in engines:
        e.wake(0.0)
    net = Net(engines)
    net.pump(0.0)  # no tick at all
    assert set(net.decided) == {0, 1, 2, 3}
    ids = {b.block_id for b, _ in net.decided.values()}
    assert len(ids) == 1
    block, cert = net.decided[0]
    proposer = four.validators_at(1).proposer(1, 0)
    assert block.header.proposer == proposer and cert.round == 0
    for _, (b, c) in net.decided.items():
        four.validators_at(1).check_certificate(c, CHAIN, 1, b.block_id)
    assert four.check_block(block, None) is None
    four.commit(block, cert)
    assert four.head().block_id == block.block_id


def test_a_message_wakes_a_waiting_validator(four: Chain) -> None:
    engines = [engine_for(four, k) for k in VALIDATORS]
    proposer = VALIDATORS.index(next(k for k in VALIDATORS
                                     if k.node_id.key == four.validators_at(1).proposer(1, 0)))
    engines[proposer].wake(0.0)  # only the proposer had transactions
    net = Net(engines)
    net.pump(0.0)
    assert set(net.decided) == {0, 1, 2, 3}
    assert not any(e.waiting for e in engines)


def test_a_silent_proposer_costs_a_round(four: Chain) -> None:
    vs = four.validators_at(1)
    silent = next(i for i, k in enumerate(VALIDATORS) if k.node_id.key == vs.proposer(1, 0))
    engines = [engine_for(four, k) for k in VALIDATORS]
    for e in engines:
        e.wake(0.0)
    net = Net(engines, silent=frozenset({silent}))
    net.pump(0.0)
    assert not net.decided  # nobody decides before a timeout
    others = [i for i in range(4) if i != silent]
    now = net.run(0.0, lambda: all(i in net.decided for i in others))
    assert now >= TIMEOUTS.propose(0) + TIMEOUTS.precommit(0)
    ids = {net.decided[i][0].block_id for i in others}
    assert len(ids) == 1
    block, cert = net.decided[others[0]]
    assert cert.round >= 1
    assert block.header.proposer == vs.proposer(1, cert.round) != vs.proposer(1, 0)
    vs.check_certificate(cert, CHAIN, 1, block.block_id)
    assert all(VALIDATORS[silent].node_id.key != v for v, _ in cert.signatures)  # never sent


def _round0_prevote(key: NodeKey, block_id: bytes, valid: bool = True) -> Vote:
    vote = sign_vote(key, CHAIN, PREVOTE, 1, 0, block_id)
    return vote if valid else dataclasses.replace(vote, signature=flip(vote.signature, 3))


def _refusals(engine: Tendermint, msgs: list[Any], now: float) -> tuple[list[str], Ready]:
    """Feed `msgs`; the reasons the engine gave for refusing them, and what it produced.
    (The engine reports a refusal as receive()'s result, or in Ready.rejected where it has
    that field; both are read, so the test holds for either.)"""
    whys = [engine.receive(msg, now) for msg in msgs]
    ready = engine.ready()
    reported = [why for _, why in getattr(ready, "rejected", [])]
    return [w for w in whys if w is not None] or reported, ready


def test_bad_votes_are_rejected_and_change_nothing(four: Chain) -> None:
    engine = engine_for(four, VALIDATORS[0])
    engine.ready()
    before = (engine.waiting, dict(engine.votes), dict(engine.highest_round),
              SignerState.to_wire(engine.state))
    bad_sig = _round0_prevote(VALIDATORS[1], bytes(32), valid=False)
    outsider = sign_vote(OUTSIDER, CHAIN, PREVOTE, 1, 0, bytes(32))
    other_chain = sign_vote(VALIDATORS[1], "other", PREVOTE, 1, 0, bytes(32))
    other_height = sign_vote(VALIDATORS[1], CHAIN, PREVOTE, 2, 0, bytes(32))
    whys, ready = _refusals(engine, [bad_sig, outsider, other_chain, other_height], 0.0)
    assert whys == ["vote with a bad signature", "vote from a non-validator",
                    "not for this chain and height", "not for this chain and height"]
    if hasattr(ready, "rejected"):
        assert [s for s, _ in ready.rejected] == [
            VALIDATORS[1].node_id.key, OUTSIDER.node_id.key, VALIDATORS[1].node_id.key,
            VALIDATORS[1].node_id.key]
    assert engine.rejected == 4
    assert not ready.messages and ready.persist is None and ready.decided is None
    assert not ready.evidence
    assert (engine.waiting, engine.votes, engine.highest_round,
            engine.state.to_wire()) == before
    # The genuine vote is still taken afterwards.
    assert engine.receive(_round0_prevote(VALIDATORS[1], bytes(32)), 0.0) is None
    assert engine.rejected == 4 and not engine.waiting


def test_bad_proposals_are_rejected(four: Chain) -> None:
    vs = four.validators_at(1)
    proposer = next(k for k in VALIDATORS if k.node_id.key == vs.proposer(1, 0))
    not_proposer = next(k for k in VALIDATORS if k is not proposer)
    engine = engine_for(four, next(k for k in VALIDATORS if k not in (proposer, not_proposer)))
    block = four.build_block(1, proposer.node_id.key, BLOCK_MS, [])
    good = sign_proposal(proposer, 1, 0, -1, block)
    whys, ready = _refusals(engine, [sign_proposal(not_proposer, 1, 0, -1, block),
                                     dataclasses.replace(good, signature=flip(good.signature))],
                            0.0)
    assert whys == ["not the proposer of round 0", "proposal with a bad signature"]
    assert engine.proposals == {} and engine.waiting and engine.rejected == 2
    assert not ready.messages


def test_two_votes_of_one_validator_in_one_round_are_evidence(four: Chain) -> None:
    engine = engine_for(four, VALIDATORS[0])
    first = _round0_prevote(VALIDATORS[2], bytes(32))
    second = _round0_prevote(VALIDATORS[2], NIL)
    engine.receive(first, 0.0)
    engine.receive(first, 0.0)  # a duplicate is no evidence
    assert engine.ready().evidence == []
    engine.receive(second, 0.0)
    ready = engine.ready()
    assert len(ready.evidence) == 1
    ev = ready.evidence[0]
    assert {ev.first.block_id, ev.second.block_id} == {bytes(32), NIL}
    check_equivocation(ev)
    # A precommit of the same validator in the same round is no conflict with its prevote.
    engine.receive(sign_vote(VALIDATORS[2], CHAIN, PRECOMMIT, 1, 0, bytes(32)), 0.0)
    assert engine.ready().evidence == []


def test_an_equivocating_validator_is_caught_by_every_honest_one(four: Chain) -> None:
    vs = four.validators_at(1)
    engines = [engine_for(four, k) for k in VALIDATORS]
    for e in engines:
        e.wake(0.0)
    net = Net(engines)
    liar = next(i for i, k in enumerate(VALIDATORS) if k.node_id.key != vs.proposer(1, 0))
    lie = sign_vote(VALIDATORS[liar], CHAIN, PREVOTE, 1, 0, bytes([7]) * 32)
    for j, e in enumerate(engines):
        if j != liar:
            e.receive(lie, 0.0)
    net.pump(0.0)
    for j in range(4):
        if j == liar:
            continue
        evidence = [ev for i, r in net.readies if i == j for ev in r.evidence]
        assert evidence and all(ev.first.validator == VALIDATORS[liar].node_id.key
                                for ev in evidence)
        for ev in evidence:
            check_equivocation(ev)
    assert len({b.block_id for b, _ in net.decided.values()}) == 1


def _prevoted(four: Chain) -> tuple[Tendermint, NodeKey, Vote, list, Block, NodeKey]:
    """A non-proposer that received the round-0 proposal and prevoted it; returns it, its key,
    its prevote, the persisted state's wire, the block and the proposer's key."""
    vs = four.validators_at(1)
    proposer = next(k for k in VALIDATORS if k.node_id.key == vs.proposer(1, 0))
    key = next(k for k in VALIDATORS if k is not proposer)
    engine = engine_for(four, key)
    block = four.build_block(1, proposer.node_id.key, BLOCK_MS, [])
    engine.receive(sign_proposal(proposer, 1, 0, -1, block), 0.0)
    ready = engine.ready()
    prevotes = [m for m in ready.messages if isinstance(m, Vote) and m.kind == PREVOTE]
    assert len(prevotes) == 1 and prevotes[0].block_id == block.block_id
    assert ready.persist is not None
    wire = ready.persist.to_wire()  # what the driver writes before sending
    return engine, key, prevotes[0], wire, block, proposer


def _prevotes_signed(msgs: list[Any], key: NodeKey) -> set[bytes]:
    return {m.block_id for m in msgs
            if isinstance(m, Vote) and m.kind == PREVOTE and m.round == 0
            and m.validator == key.node_id.key}


def test_restart_resends_the_same_prevote_and_never_signs_another(four: Chain) -> None:
    _, key, prevote, wire, block, proposer = _prevoted(four)
    restored = SignerState.from_wire(wire)
    assert restored.sent[("prevote", 0)].encode() == prevote.encode()
    engine = engine_for(four, key, now=10.0, restored=restored)
    assert not engine.waiting
    first = engine.ready()
    resent = [m for m in first.messages if isinstance(m, Vote)]
    assert [m.encode() for m in resent] == [prevote.encode()]  # the same bytes, signature too
    seen = list(first.messages)
    # The proposer equivocates: another block for round 0 reaches the restarted validator,
    # and the other validators prevote that one.
    other = four.build_block(1, proposer.node_id.key, BLOCK_MS + 77, [])
    assert other.block_id != block.block_id
    engine.receive(sign_proposal(proposer, 1, 0, -1, other), 10.0)
    seen += engine.ready().messages
    for k in VALIDATORS:
        if k is not key:
            engine.receive(sign_vote(k, CHAIN, PREVOTE, 1, 0, other.block_id), 10.0)
            seen += engine.ready().messages
    for t in (11.0, 12.0, 15.0, 20.0):
        engine.tick(t)
        seen += engine.ready().messages
    assert _prevotes_signed(seen, key) == {block.block_id}
    assert engine.state.sent[("prevote", 0)].encode() == prevote.encode()


def test_restart_never_resigns_even_if_the_step_was_lost(four: Chain) -> None:
    """The (kind, round) slot alone guards the signature: a state rewound to the propose step
    that then sees a conflicting proposal still signs no other prevote."""
    _, key, prevote, wire, block, proposer = _prevoted(four)
    restored = SignerState.from_wire(wire)
    restored.step = PROPOSE
    engine = engine_for(four, key, now=0.0, restored=restored)
    seen = list(engine.ready().messages)
    other = four.build_block(1, proposer.node_id.key, BLOCK_MS + 99, [])
    engine.receive(sign_proposal(proposer, 1, 0, -1, other), 0.0)
    assert engine.state.step != PROPOSE  # it took the prevote step: only the slot held it back
    seen += engine.ready().messages
    engine.tick(TIMEOUTS.propose(0) + 1)  # the propose timeout would prevote nil
    seen += engine.ready().messages
    assert _prevotes_signed(seen, key) == {block.block_id}


def test_signer_state_round_trips_through_its_wire(four: Chain) -> None:
    engines = [engine_for(four, k) for k in VALIDATORS]
    for e in engines:
        e.wake(0.0)
    net = Net(engines)
    net.pump(0.0)
    for _, ready in net.readies:
        if ready.persist is None:
            continue
        wire = ready.persist.to_wire()
        back = SignerState.from_wire(wire)
        assert back.to_wire() == wire
        assert {k: m.encode() for k, m in back.sent.items()} == \
            {k: m.encode() for k, m in ready.persist.sent.items()}


def test_a_restarted_validator_rejoins_and_the_height_decides(four: Chain) -> None:
    """Crash a validator right after it prevoted (its state persisted); the restarted engine
    with the others reaches the same decision."""
    vs = four.validators_at(1)
    engines = [engine_for(four, k) for k in VALIDATORS]
    for e in engines:
        e.wake(0.0)
    victim = next(i for i, k in enumerate(VALIDATORS) if k.node_id.key != vs.proposer(1, 0))
    # Deliver only the proposal first, so the victim prevotes and nothing more.
    proposer = next(i for i, k in enumerate(VALIDATORS) if k.node_id.key == vs.proposer(1, 0))
    proposal = next(m for m in engines[proposer].ready().messages if isinstance(m, Proposal))
    engines[victim].receive(proposal, 0.0)
    wire = engines[victim].ready().persist.to_wire()
    engines[victim] = engine_for(four, VALIDATORS[victim], 0.5, SignerState.from_wire(wire))
    for j, e in enumerate(engines):
        if j not in (proposer, victim):
            e.receive(proposal, 0.5)
    net = Net(engines)
    net.run(0.5, lambda: len(net.decided) == 4)
    assert len({b.block_id for b, _ in net.decided.values()}) == 1
    assert net.decided[victim][0].block_id == proposal.block.block_id


def test_header_fields_of_decided_block(four: Chain) -> None:
    engines = [engine_for(four, k, txs=[put(KEYS[5], 1, "k", b"v")]) for k in VALIDATORS]
    for e in engines:
        e.wake(0.0)
    net = Net(engines)
    net.pump(0.0)
    block, cert = net.decided[0]
    assert isinstance(block.header, Header)
    assert block.header.validators_hash == four.validators_at(1).hash
    assert block.txs == (put(KEYS[5], 1, "k", b"v"),)
    four.commit(block, cert)
    assert kv_get(four.storage, "k") == b"v"
