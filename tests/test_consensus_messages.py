"""The consensus wire schema and the validator set: encodings round-trip, decoders refuse
garbage with MessageRejected only, forgeries are refused, equivocation evidence and commit
certificates are checked, and quorums and proposer order follow the stake."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hmnode.consensus.messages import (MAX_HEIGHT, MAX_ROUND, NIL, PRECOMMIT, PREVOTE, Block,
                                       CommitCertificate, Equivocation, Header,
                                       MessageRejected, Proposal, Transaction, Vote,
                                       check_equivocation, sign_proposal, sign_tx, sign_vote,
                                       txs_hash, verify_tx)
from hmnode.consensus.validators import ValidatorSet
from hmnode.identity import NodeKey

# Fixed keys, so hypothesis can replay a failing example exactly.
KEYS = [NodeKey(nacl.signing.SigningKey(bytes([i + 1]) * 32)) for i in range(4)]
OUTSIDER = NodeKey(nacl.signing.SigningKey(bytes([99]) * 32))
CHAIN = "test-chain"
BID = bytes(range(32))
OTHER_BID = bytes(range(1, 33))

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def flip(data: bytes, index: int = 0) -> bytes:
    out = bytearray(data)
    out[index % len(out)] ^= 0x01
    return bytes(out)


# --- strategies ----------------------------------------------------------------------------

keys = st.sampled_from(KEYS)
chain_ids = st.text(min_size=1, max_size=64)
heights = st.integers(1, MAX_HEIGHT)
rounds = st.integers(0, MAX_ROUND)
ids32 = st.binary(min_size=32, max_size=32)
block_ids = st.one_of(st.just(NIL), ids32)
kinds = st.text(min_size=1, max_size=32)
bodies = st.one_of(st.binary(max_size=256), st.text(max_size=64),
                   st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**63 - 1),
                                   max_size=4),
                   st.lists(st.integers(0, 1000), max_size=8), st.none())


@st.composite
def transactions(draw: Any, chain_id: Any = chain_ids) -> Transaction:
    return sign_tx(draw(keys), draw(chain_id), draw(st.integers(1, MAX_HEIGHT)), draw(kinds),
                   draw(bodies))


@st.composite
def votes(draw: Any) -> Vote:
    return sign_vote(draw(keys), draw(chain_ids), draw(st.sampled_from([PREVOTE, PRECOMMIT])),
                     draw(heights), draw(rounds), draw(block_ids))


@st.composite
def blocks(draw: Any, height: Any = heights) -> Block:
    chain_id = draw(chain_ids)
    txs = tuple(draw(st.lists(transactions(st.just(chain_id)), max_size=3)))
    header = Header(chain_id, draw(height), draw(st.integers(0, 1 << 53)), draw(ids32),
                    draw(keys).node_id.key, txs_hash(txs), draw(ids32), draw(ids32))
    return Block(header, txs)


@st.composite
def proposals(draw: Any) -> Proposal:
    height = draw(heights)
    round_ = draw(st.integers(0, MAX_ROUND))
    valid_round = draw(st.integers(-1, round_ - 1))
    return sign_proposal(draw(keys), height, round_, valid_round, draw(blocks(st.just(height))))


@st.composite
def certificates(draw: Any) -> CommitCertificate:
    signers = draw(st.lists(keys, min_size=1, max_size=4, unique_by=lambda k: k.node_id.key))
    chain_id, height, round_, bid = draw(chain_ids), draw(heights), draw(rounds), draw(ids32)
    return CommitCertificate.from_votes(
        [sign_vote(k, chain_id, PRECOMMIT, height, round_, bid) for k in signers])


@st.composite
def equivocations(draw: Any) -> Equivocation:
    key = draw(keys)
    chain_id, kind, height, round_ = (draw(chain_ids), draw(st.sampled_from([PREVOTE, PRECOMMIT])),
                                      draw(heights), draw(rounds))
    a = draw(block_ids)
    b = draw(block_ids.filter(lambda x: x != a))
    return Equivocation(sign_vote(key, chain_id, kind, height, round_, a),
                        sign_vote(key, chain_id, kind, height, round_, b))


# msgpack-able nested values (no ints outside msgpack's 64 bits)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=70), st.binary(max_size=80))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=9),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 9)),
                                            inner, max_size=4)),
    max_leaves=12)

# Six decoders each: few examples per decoder keep each test well under a second.
GARBAGE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DECODERS = [Transaction, Vote, Proposal, Block, CommitCertificate, Equivocation]
DECODER_IDS = [c.__name__ for c in DECODERS]


# --- round trips -----------------------------------------------------------------------------


@FAST
@given(transactions())
def test_transaction_round_trips(tx: Transaction) -> None:
    back = Transaction.decode(tx.encode())
    assert back == tx and back.signature == tx.signature
    assert back.tx_id == tx.tx_id
    verify_tx(back, tx.chain_id)


@FAST
@given(votes())
def test_vote_round_trips(vote: Vote) -> None:
    back = Vote.decode(vote.encode())
    assert back == vote and back.signature == vote.signature
    assert back.encode() == vote.encode()


@FAST
@given(blocks())
def test_block_round_trips(block: Block) -> None:
    back = Block.decode(block.encode())
    assert back == block
    assert back.block_id == block.block_id
    assert [t.signature for t in back.txs] == [t.signature for t in block.txs]
    assert back.encode() == block.encode()


@FAST
@given(proposals())
def test_proposal_round_trips(proposal: Proposal) -> None:
    back = Proposal.decode(proposal.encode())
    assert back == proposal and back.signature == proposal.signature
    assert back.encode() == proposal.encode()


@FAST
@given(certificates())
def test_certificate_round_trips(cert: CommitCertificate) -> None:
    back = CommitCertificate.decode(cert.encode())
    assert back == cert
    assert back.encode() == cert.encode()
    assert [v.encode() for v in back.votes()] == [v.encode() for v in cert.votes()]


@FAST
@given(equivocations())
def test_equivocation_round_trips(ev: Equivocation) -> None:
    back = Equivocation.decode(ev.encode())
    assert back == ev
    assert back.encode() == ev.encode()
    assert back.evidence_id == ev.evidence_id
    check_equivocation(back)


# --- garbage ---------------------------------------------------------------------------------


def _decode_only_rejects(cls: Any, data: Any) -> None:
    try:
        cls.decode(data)
    except MessageRejected:
        pass


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=600))
def test_decoders_refuse_arbitrary_bytes(cls: Any, data: bytes) -> None:
    _decode_only_rejects(cls, data)


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
@GARBAGE
@given(value=values)
def test_decoders_refuse_arbitrary_msgpack(cls: Any, value: Any) -> None:
    with pytest.raises(MessageRejected):
        cls.decode(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
@GARBAGE
@given(value=values, fill=st.integers(0, 8))
def test_decoders_refuse_arrays_of_the_right_length_with_wrong_fields(cls: Any, value: Any,
                                                                        fill: int) -> None:
    # Arrays of every plausible length, so the field checks (not the length check) refuse.
    for n in (2, 5, 6, 7, 8):
        wire = [value] * n
        wire[fill % n] = None
        with pytest.raises(MessageRejected):
            cls.decode(msgpack.packb(wire, use_bin_type=True))


SAMPLES = {
    Transaction: sign_tx(KEYS[0], CHAIN, 1, "kv.put", {"key": "k", "value": b"v"}),
    Vote: sign_vote(KEYS[0], CHAIN, PREVOTE, 3, 1, BID),
    CommitCertificate: CommitCertificate.from_votes(
        [sign_vote(k, CHAIN, PRECOMMIT, 3, 0, BID) for k in KEYS[:3]]),
    Equivocation: Equivocation(sign_vote(KEYS[0], CHAIN, PREVOTE, 3, 0, BID),
                               sign_vote(KEYS[0], CHAIN, PREVOTE, 3, 0, NIL)),
}
_txs = (SAMPLES[Transaction],)
SAMPLES[Block] = Block(Header(CHAIN, 3, 1000, BID, KEYS[1].node_id.key, txs_hash(_txs), BID,
                              OTHER_BID), _txs)
SAMPLES[Proposal] = sign_proposal(KEYS[1], 3, 2, 0, SAMPLES[Block])


def _replace_at(wire: Any, path: list[int], value: Any) -> Any:
    """`wire` with the element at `path` (indices into nested arrays, taken modulo) replaced."""
    if not path or not isinstance(wire, list) or not wire:
        return value
    i = path[0] % len(wire)
    return [_replace_at(w, path[1:], value) if j == i else w for j, w in enumerate(wire)]


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
@GARBAGE
@given(path=st.lists(st.integers(0, 10), min_size=1, max_size=4), value=values)
def test_decoders_survive_one_field_replaced(cls: Any, path: list[int], value: Any) -> None:
    """A valid message with any one (nested) field replaced decodes or is refused, nothing else."""
    wire = _replace_at(SAMPLES[cls].to_wire(), path, value)
    _decode_only_rejects(cls, msgpack.packb(wire, use_bin_type=True))


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
@settings(max_examples=100, deadline=None)
@given(index=st.integers(0, 10_000), cut=st.integers(0, 10_000))
def test_decoders_survive_flipped_and_truncated_bytes(cls: Any, index: int, cut: int) -> None:
    data = SAMPLES[cls].encode()
    _decode_only_rejects(cls, flip(data, index))
    with pytest.raises(MessageRejected):
        cls.decode(data[:cut % len(data)])


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
def test_decoders_refuse_non_bytes_and_oversized(cls: Any) -> None:
    for data in (None, "text", 7, [1, 2], memoryview(b"\x90")):
        with pytest.raises(MessageRejected):
            cls.decode(data)
    with pytest.raises(MessageRejected):
        cls.decode(b"\xc4" + b"\x00" * (2 << 20))
    # Deeply nested arrays, map keys msgpack refuses, and a malformed timestamp extension.
    for data in (b"\x91" * 3000 + b"\xc0", b"\x81\x01\x02", b"\xd6\xff\x00\x00\x00",
                 b"\xc7\x03\xff\x00\x00\x00"):
        with pytest.raises(MessageRejected):
            cls.decode(data)


@pytest.mark.parametrize("cls", DECODERS, ids=DECODER_IDS)
def test_samples_decode(cls: Any) -> None:
    assert cls.decode(SAMPLES[cls].encode()) == SAMPLES[cls]


# --- forgeries -------------------------------------------------------------------------------


def test_transaction_with_a_flipped_signature_byte_is_refused() -> None:
    tx = SAMPLES[Transaction]
    verify_tx(tx, CHAIN)
    for i in (0, 31, 63):
        forged = dataclasses.replace(tx, signature=flip(tx.signature, i))
        assert Transaction.decode(forged.encode()) == forged  # decoding does not verify
        with pytest.raises(MessageRejected, match="bad signature"):
            verify_tx(Transaction.decode(forged.encode()), CHAIN)


def test_transaction_for_another_chain_is_refused() -> None:
    tx = sign_tx(KEYS[0], "other-chain", 1, "kv.put", {"key": "k", "value": b"v"})
    verify_tx(tx, "other-chain")
    with pytest.raises(MessageRejected, match="chain"):
        verify_tx(tx, CHAIN)
    # Relabelling the chain id breaks the signature, which covers it.
    relabelled = dataclasses.replace(tx, chain_id=CHAIN)
    with pytest.raises(MessageRejected, match="bad signature"):
        verify_tx(relabelled, CHAIN)


def test_transaction_with_a_changed_body_sender_nonce_or_kind_is_refused() -> None:
    tx = SAMPLES[Transaction]
    for change in ({"body": tx.body + b"\x00"}, {"nonce": 2}, {"kind": "kv.delete"},
                   {"sender": KEYS[1].node_id.key}):
        forged = dataclasses.replace(tx, **change)
        with pytest.raises(MessageRejected, match="bad signature"):
            verify_tx(Transaction.decode(forged.encode()), CHAIN)


def test_sign_tx_refuses_an_oversized_transaction() -> None:
    with pytest.raises(MessageRejected, match="over"):
        sign_tx(KEYS[0], CHAIN, 1, "kv.put", b"x" * 5000)


def test_block_whose_transactions_do_not_match_its_header_is_refused() -> None:
    block = SAMPLES[Block]
    other = sign_tx(KEYS[0], CHAIN, 2, "kv.put", {"key": "k", "value": b"w"})
    for txs in ((), (other,), (block.txs[0], other), (other, block.txs[0])):
        with pytest.raises(MessageRejected, match="do not match"):
            Block.decode(Block(block.header, txs).encode())
    # A changed signature changes the transaction id, so it does not match either.
    resigned = dataclasses.replace(block.txs[0], signature=flip(block.txs[0].signature))
    with pytest.raises(MessageRejected, match="do not match"):
        Block.decode(Block(block.header, (resigned,)).encode())


@pytest.mark.parametrize("round_,valid_round", [(0, 0), (2, 2), (2, 3), (0, 5)])
def test_proposal_with_valid_round_not_before_round_is_refused(round_: int,
                                                               valid_round: int) -> None:
    forged = sign_proposal(KEYS[1], 3, round_, valid_round, SAMPLES[Block])
    with pytest.raises(MessageRejected, match="valid round"):
        Proposal.decode(forged.encode())


def test_proposal_for_a_block_of_another_height_is_refused() -> None:
    forged = sign_proposal(KEYS[1], 4, 1, -1, SAMPLES[Block])
    with pytest.raises(MessageRejected, match="another height"):
        Proposal.decode(forged.encode())


def test_vote_decoder_refuses_bad_kinds_and_block_id_lengths() -> None:
    good = SAMPLES[Vote].to_wire()
    for index, value in ((1, 0), (1, 3), (1, True), (4, b"x" * 31), (4, b"x" * 33),
                         (5, b"x" * 31), (6, b"x" * 63), (2, 0), (3, -1), (0, ""),
                         (0, "x" * 65)):
        wire = list(good)
        wire[index] = value
        with pytest.raises(MessageRejected):
            Vote.decode(msgpack.packb(wire, use_bin_type=True))


# --- equivocation evidence -------------------------------------------------------------------


def test_check_equivocation_accepts_two_conflicting_signed_votes() -> None:
    for kind in (PREVOTE, PRECOMMIT):
        for a, b in ((BID, OTHER_BID), (BID, NIL), (NIL, OTHER_BID)):
            check_equivocation(Equivocation(sign_vote(KEYS[2], CHAIN, kind, 5, 3, a),
                                            sign_vote(KEYS[2], CHAIN, kind, 5, 3, b)))


@pytest.mark.parametrize("second", [
    sign_vote(KEYS[0], CHAIN, PREVOTE, 5, 3, BID),  # agrees
    sign_vote(KEYS[1], CHAIN, PREVOTE, 5, 3, OTHER_BID),  # another validator
    sign_vote(KEYS[0], CHAIN, PREVOTE, 5, 4, OTHER_BID),  # another round
    sign_vote(KEYS[0], CHAIN, PREVOTE, 6, 3, OTHER_BID),  # another height
    sign_vote(KEYS[0], CHAIN, PRECOMMIT, 5, 3, OTHER_BID),  # another kind
    sign_vote(KEYS[0], "other-chain", PREVOTE, 5, 3, OTHER_BID),  # another chain
], ids=["agreeing", "validator", "round", "height", "kind", "chain"])
def test_check_equivocation_refuses_votes_that_do_not_conflict(second: Vote) -> None:
    first = sign_vote(KEYS[0], CHAIN, PREVOTE, 5, 3, BID)
    with pytest.raises(MessageRejected):
        check_equivocation(Equivocation(first, second))
    with pytest.raises(MessageRejected):
        check_equivocation(Equivocation(second, first))


def test_check_equivocation_refuses_a_bad_signature() -> None:
    first = sign_vote(KEYS[0], CHAIN, PREVOTE, 5, 3, BID)
    second = sign_vote(KEYS[0], CHAIN, PREVOTE, 5, 3, OTHER_BID)
    bad = dataclasses.replace(second, signature=flip(second.signature, 10))
    for ev in (Equivocation(first, bad), Equivocation(bad, first)):
        with pytest.raises(MessageRejected, match="signature"):
            check_equivocation(ev)
    # Someone else's signature under this validator's name is no evidence either.
    framed = dataclasses.replace(
        sign_vote(KEYS[1], CHAIN, PREVOTE, 5, 3, OTHER_BID), validator=KEYS[0].node_id.key)
    with pytest.raises(MessageRejected, match="signature"):
        check_equivocation(Equivocation(first, framed))


@FAST
@given(equivocations(), st.integers(0, 63))
def test_check_equivocation_refuses_any_flipped_signature_byte(ev: Equivocation,
                                                               index: int) -> None:
    check_equivocation(ev)
    bad = dataclasses.replace(ev.second, signature=flip(ev.second.signature, index))
    with pytest.raises(MessageRejected):
        check_equivocation(Equivocation(ev.first, bad))


# --- the validator set -----------------------------------------------------------------------


def _key(i: int) -> bytes:
    return bytes([i]) * 32


def test_quorum_arithmetic_with_equal_powers() -> None:
    vs = ValidatorSet.of([(_key(i), 1) for i in range(1, 5)])
    assert vs.total == 4 and len(vs) == 4
    assert vs.has_quorum(3) and vs.has_quorum(4)
    assert not vs.has_quorum(2)
    assert vs.exceeds_third(2)
    assert not vs.exceeds_third(1)


def test_quorum_arithmetic_with_unequal_powers() -> None:
    vs = ValidatorSet.of([(_key(1), 5), (_key(2), 3), (_key(3), 1)])
    assert vs.total == 9
    assert vs.has_quorum(7) and not vs.has_quorum(6)  # 3*6 == 2*9: exactly 2/3 is not enough
    assert vs.exceeds_third(4) and not vs.exceeds_third(3)  # exactly 1/3 is not more
    assert vs.power(_key(1)) == 5 and vs.power(_key(9)) == 0
    # The heaviest alone is no quorum, but it and the next are.
    assert not vs.has_quorum(vs.power(_key(1)))
    assert vs.has_quorum(vs.power(_key(1)) + vs.power(_key(2)))


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=20))
def test_quorum_is_more_than_two_thirds(powers: list[int]) -> None:
    vs = ValidatorSet.of([(_key(i + 1), p) for i, p in enumerate(powers)])
    total = sum(powers)
    for power in {0, total // 3, total // 3 + 1, 2 * total // 3, 2 * total // 3 + 1, total}:
        assert vs.has_quorum(power) == (3 * power > 2 * total)
        assert vs.exceeds_third(power) == (3 * power > total)
    # Two quorums always share more than a third: an honest validator under f < n/3.
    q = 2 * total // 3 + 1
    assert vs.has_quorum(q) and vs.exceeds_third(2 * q - total)


def test_of_leaves_out_zero_power_and_sorts() -> None:
    vs = ValidatorSet.of([(_key(3), 2), (_key(1), 0), (_key(2), 7)])
    assert vs.members == ((_key(2), 7), (_key(3), 2))
    assert _key(1) not in vs and _key(2) in vs
    assert vs.total == 9
    with pytest.raises(ValueError):
        ValidatorSet.of([(_key(1), 0)])
    with pytest.raises(ValueError):
        ValidatorSet(((_key(2), 1), (_key(1), 1)))  # not sorted
    with pytest.raises(ValueError):
        ValidatorSet(((_key(1), 1), (_key(1), 2)))  # repeated
    with pytest.raises(ValueError):
        ValidatorSet(((b"short", 1),))


def test_proposer_is_deterministic() -> None:
    a = ValidatorSet.of([(_key(i), i) for i in range(1, 6)])
    b = ValidatorSet.of([(_key(i), i) for i in reversed(range(1, 6))])
    for h in range(1, 30):
        for r in range(7):
            assert a.proposer(h, r) == b.proposer(h, r) == a.proposer(h, r)
    # Rounds past the set's size wrap around the same order.
    assert [a.proposer(9, r) for r in range(5)] == [a.proposer(9, r) for r in range(5, 10)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1 << 40), min_size=1, max_size=12), st.integers(1, MAX_HEIGHT))
def test_every_validator_proposes_once_in_the_first_n_rounds(powers: list[int],
                                                              height: int) -> None:
    vs = ValidatorSet.of([(_key(i + 1), p) for i, p in enumerate(powers)])
    order = [vs.proposer(height, r) for r in range(len(vs))]
    assert sorted(order) == sorted(k for k, _ in vs.members)


def test_proposer_frequency_follows_power() -> None:
    heavy, light1, light2 = _key(1), _key(2), _key(3)
    vs = ValidatorSet.of([(heavy, 2), (light1, 1), (light2, 1)])
    counts = Counter(vs.proposer(h, 0) for h in range(1, 4001))
    # Expected: heavy 2000, each light 1000 (binomial sd about 30).
    assert 1750 < counts[heavy] < 2250
    for light in (light1, light2):
        assert 800 < counts[light] < 1200
    assert 1.6 < counts[heavy] / counts[light1] < 2.5


# --- commit certificates ---------------------------------------------------------------------

VSET = ValidatorSet.of([(k.node_id.key, 1) for k in KEYS])


def _cert(signers: list[NodeKey], chain_id: str = CHAIN, height: int = 7, round_: int = 1,
          block_id: bytes = BID) -> CommitCertificate:
    return CommitCertificate.from_votes(
        [sign_vote(k, chain_id, PRECOMMIT, height, round_, block_id) for k in signers])


def test_certificate_with_a_quorum_of_precommits_is_accepted() -> None:
    VSET.check_certificate(_cert(KEYS[:3]), CHAIN, 7, BID)
    VSET.check_certificate(_cert(KEYS), CHAIN, 7, BID)
    decoded = CommitCertificate.decode(_cert(KEYS[1:]).encode())
    VSET.check_certificate(decoded, CHAIN, 7, BID)


def test_certificate_with_unequal_powers() -> None:
    vs = ValidatorSet.of([(KEYS[0].node_id.key, 5), (KEYS[1].node_id.key, 3),
                          (KEYS[2].node_id.key, 1)])
    vs.check_certificate(_cert(KEYS[:2]), CHAIN, 7, BID)  # 8 of 9
    with pytest.raises(MessageRejected, match="power"):
        vs.check_certificate(_cert([KEYS[0], KEYS[2]]), CHAIN, 7, BID)  # 6 of 9


def test_certificate_with_too_little_power_is_refused() -> None:
    for signers in ([], KEYS[:1], KEYS[:2]):
        cert = CommitCertificate(CHAIN, 7, 1, BID, tuple(
            sorted((k.node_id.key, sign_vote(k, CHAIN, PRECOMMIT, 7, 1, BID).signature)
                   for k in signers)))
        with pytest.raises(MessageRejected, match="power"):
            VSET.check_certificate(cert, CHAIN, 7, BID)


def test_certificate_with_a_repeated_signer_is_refused() -> None:
    cert = _cert(KEYS[:2])
    repeated = dataclasses.replace(cert, signatures=cert.signatures + cert.signatures[:1])
    with pytest.raises(MessageRejected, match="repeated"):
        VSET.check_certificate(repeated, CHAIN, 7, BID)


def test_certificate_with_a_non_member_signer_is_refused() -> None:
    with pytest.raises(MessageRejected, match="not a validator"):
        VSET.check_certificate(_cert(KEYS[:3] + [OUTSIDER]), CHAIN, 7, BID)


def test_certificate_with_a_bad_signature_is_refused() -> None:
    cert = _cert(KEYS)
    sigs = list(cert.signatures)
    sigs[2] = (sigs[2][0], flip(sigs[2][1], 5))
    with pytest.raises(MessageRejected, match="signature"):
        VSET.check_certificate(dataclasses.replace(cert, signatures=tuple(sigs)), CHAIN, 7, BID)
    # A prevote's signature is not a precommit's.
    prevotes = CommitCertificate(CHAIN, 7, 1, BID, tuple(sorted(
        (k.node_id.key, sign_vote(k, CHAIN, PREVOTE, 7, 1, BID).signature) for k in KEYS)))
    with pytest.raises(MessageRejected, match="signature"):
        VSET.check_certificate(prevotes, CHAIN, 7, BID)
    # Signatures for another round do not hold for the certificate's round.
    moved = dataclasses.replace(_cert(KEYS, round_=1), round=2)
    with pytest.raises(MessageRejected, match="signature"):
        VSET.check_certificate(moved, CHAIN, 7, BID)


def test_certificate_for_another_block_height_or_chain_is_refused() -> None:
    with pytest.raises(MessageRejected):
        VSET.check_certificate(_cert(KEYS, block_id=OTHER_BID), CHAIN, 7, BID)
    with pytest.raises(MessageRejected):
        VSET.check_certificate(_cert(KEYS, height=8), CHAIN, 7, BID)
    with pytest.raises(MessageRejected):
        VSET.check_certificate(_cert(KEYS, chain_id="other-chain"), CHAIN, 7, BID)
    # Relabelled to claim the wanted block, height or chain: the signatures no longer hold.
    for source in (_cert(KEYS, block_id=OTHER_BID), _cert(KEYS, height=8),
                   _cert(KEYS, chain_id="other-chain")):
        forged = dataclasses.replace(source, block_id=BID, height=7, chain_id=CHAIN)
        with pytest.raises(MessageRejected, match="signature"):
            VSET.check_certificate(forged, CHAIN, 7, BID)
