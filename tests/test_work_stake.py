"""Proofs of work and of stake: honest proofs verify, and every forgery is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from hmnode.consensus.proof import ProofRejected
from hmnode.consensus.stake import (LockedCredits, StakeParams, StakeProof, prove_stake,
                                    verify_stake)
from hmnode.consensus.work import WorkParams, WorkProof, prove_work, verify_work
from hmnode.identity import NodeKey

EASY = WorkParams(1, 8)  # 256 hashes on average: the same code, a test-sized difficulty
KEY, OTHER = NodeKey.generate(), NodeKey.generate()
NODE = KEY.node_id.key


def flip(data: bytes, bit: int) -> bytes:
    bit %= len(data) * 8
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- work ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["admission", "spam"]))
def test_honest_work_verifies_and_round_trips(context: bytes, purpose: str) -> None:
    proof = prove_work(purpose, NODE, context, EASY)
    verify_work(proof, purpose, NODE, context, EASY)
    assert WorkProof.decode(proof.encode()) == proof


# 16 bits: a flipped nonce bit lands on another solution with odds of 1 in 65,536 (which would
# be a genuine solution, not a forgery); the default 20 bits makes that 1 in a million.
SOLID = WorkParams(1, 16)
SOLVED = prove_work("admission", NODE, b"epoch 7", SOLID)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0))
def test_work_with_any_bit_flipped_is_refused(bit: int) -> None:
    with pytest.raises(ProofRejected):
        forged = WorkProof.decode(flip(SOLVED.encode(), bit))
        verify_work(forged, "admission", NODE, b"epoch 7", SOLID)


def test_work_for_another_node_context_purpose_or_parameter_set_is_refused() -> None:
    proof = prove_work("admission", NODE, b"ctx", EASY)
    for purpose, node, context in [("spam", NODE, b"ctx"), ("admission", OTHER.node_id.key, b"ctx"),
                                   ("admission", NODE, b"other")]:
        with pytest.raises(ProofRejected, match="another"):
            verify_work(proof, purpose, node, context, EASY)
    with pytest.raises(ProofRejected, match="parameter set"):
        verify_work(proof, "admission", NODE, b"ctx", WorkParams(2, 8))
    harder = WorkParams(1, 40)
    with pytest.raises(ProofRejected, match="40 bits"):
        verify_work(proof, "admission", NODE, b"ctx", harder)


def test_work_decoding_refuses_malformed_input() -> None:
    good = prove_work("spam", NODE, b"", EASY).to_wire()
    for wire in [good[:-1], [*good, 0], ["stake", *good[1:]], [*good[:5], -1],
                 [*good[:5], True], [*good[:3], b"short", *good[4:]],
                 [*good[:2], "mining", *good[3:]]]:
        with pytest.raises(ProofRejected):
            WorkProof.from_wire(wire)
    for data in [b"", b"\xc1", b"\x92\x01", bytes(70_000)]:
        with pytest.raises(ProofRejected):
            WorkProof.decode(data)


# --- stake -----------------------------------------------------------------------------------


def ledger() -> LockedCredits:
    credits = LockedCredits()
    credits.lock(10, NODE, 500)
    credits.lock(10, OTHER.node_id.key, 50)
    credits.lock(12, NODE, 100)
    return credits


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 500), st.binary(max_size=64))
def test_honest_stake_verifies_and_round_trips(amount: int, context: bytes) -> None:
    proof = prove_stake(KEY, amount, 10, context)
    verify_stake(proof, ledger(), context, node_id=NODE)
    assert StakeProof.decode(proof.encode()) == proof


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=0))
def test_stake_with_any_bit_flipped_is_refused(bit: int) -> None:
    proof = prove_stake(KEY, 300, 10, b"offer 1")
    with pytest.raises(ProofRejected):
        verify_stake(StakeProof.decode(flip(proof.encode(), bit)), ledger(), b"offer 1", node_id=NODE)


def test_stake_refused_beyond_what_the_ledger_holds_or_for_the_wrong_statement() -> None:
    state = ledger()
    with pytest.raises(ProofRejected, match="the ledger says 100"):
        verify_stake(prove_stake(KEY, 101, 12), state)
    with pytest.raises(ProofRejected, match="beyond"):
        verify_stake(prove_stake(KEY, 1, 13), state)
    with pytest.raises(ProofRejected, match="does not know height 11"):
        verify_stake(prove_stake(KEY, 1, 11), state)
    with pytest.raises(ProofRejected, match="another context"):
        verify_stake(prove_stake(KEY, 1, 10, b"a"), state, b"b")
    with pytest.raises(ProofRejected, match="another node"):
        verify_stake(prove_stake(KEY, 1, 10), state, node_id=OTHER.node_id.key)
    with pytest.raises(ProofRejected, match="parameter set"):
        verify_stake(prove_stake(KEY, 1, 10), state, params=StakeParams(2, 100))
    state.lock(200, NODE, 500)
    with pytest.raises(ProofRejected, match="more than 100 blocks"):
        verify_stake(prove_stake(KEY, 1, 10), state)
    # Claiming another node's stake: its node id with our signature.
    mine = prove_stake(KEY, 10, 200)
    theirs = StakeProof(mine.version, OTHER.node_id.key, mine.amount, mine.height, mine.context,
                        mine.signature)
    with pytest.raises(ProofRejected, match="signature"):
        verify_stake(theirs, state)
