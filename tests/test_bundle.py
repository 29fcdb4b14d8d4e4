"""The proof bundle: all four proofs under one parameter set, as an advert or a transaction
carries them; a bundle verifies only for its own statement and only with every proof needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from hmnode.consensus.bundle import (DEFAULT_PARAMETERS, PARAMETER_SETS, ProofBundle,
                                     ProofParameters, Required, Statement, verify_bundle)
from hmnode.consensus.proof import ProofRejected
from hmnode.consensus.space import DEFAULT_SPACE, Plot
from hmnode.consensus.stake import DEFAULT_STAKE, LockedCredits, prove_stake
from hmnode.consensus.vdf import TEST_VDF, prove_time
from hmnode.consensus.work import WorkParams, prove_work
from hmnode.identity import NodeKey

# The default parameters but a test-sized work difficulty and T (the same code paths).
PARAMS = ProofParameters(1, WorkParams(1, 12), TEST_VDF, DEFAULT_SPACE, DEFAULT_STAKE)
KEY = NodeKey.generate()
NODE = KEY.node_id.key
BEACON = bytes(range(32))
CHALLENGE = b"epoch 12 beacon"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> ProofBundle:
    plot = Plot.create(Path(tmp_path_factory.mktemp("plot")), NODE, 256, PARAMS.space)
    return ProofBundle(
        1,
        work=prove_work("admission", NODE, b"offer", PARAMS.work),
        time=prove_time(CHALLENGE, PARAMS.time),
        space=plot.prove(BEACON),
        stake=prove_stake(KEY, 40, 9, b"offer"),
    )


def statement(**changes) -> Statement:
    ledger = LockedCredits()
    ledger.lock(9, NODE, 100)
    base = dict(node_id=NODE, context=b"offer", time_challenge=CHALLENGE, beacon=BEACON,
                ledger=ledger)
    return Statement(**{**base, **changes})


ALL = Required(work=True, time=True, space=True, stake=True)


def test_an_honest_bundle_verifies_and_round_trips(bundle: ProofBundle) -> None:
    verify_bundle(bundle, statement(), ALL, PARAMS)
    again = ProofBundle.decode(bundle.encode())
    assert again == bundle
    verify_bundle(again, statement(), ALL, PARAMS)
    assert DEFAULT_PARAMETERS is PARAMETER_SETS[1]


def test_a_bundle_for_another_statement_is_refused(bundle: ProofBundle, tmp_path: Path) -> None:
    other = NodeKey.generate().node_id.key
    verify_bundle(bundle, statement(plot=bundle.space.commitment), ALL, PARAMS)
    registered = Plot.create(tmp_path, NODE, 128, PARAMS.space).commitment()
    with pytest.raises(ProofRejected):  # proven from a plot other than the one registered
        verify_bundle(bundle, statement(plot=registered), ALL, PARAMS)
    for wrong in (statement(node_id=other), statement(context=b"another offer"),
                  statement(time_challenge=b"another epoch"), statement(beacon=bytes(32))):
        with pytest.raises(ProofRejected):
            verify_bundle(bundle, wrong, ALL, PARAMS)


def test_a_bundle_missing_a_needed_proof_is_refused(bundle: ProofBundle) -> None:
    for kind in ("work", "time", "space", "stake"):
        partial = ProofBundle(1, **{k: getattr(bundle, k) for k in ("work", "time", "space", "stake")
                                    if k != kind})
        with pytest.raises(ProofRejected, match=f"lacks the proof of {kind}"):
            verify_bundle(partial, statement(), ALL, PARAMS)
        verify_bundle(partial, statement(), Required(**{k: k != kind for k in ("work", "time", "space", "stake")}), PARAMS)


def test_a_bundle_under_another_parameter_set_is_refused(bundle: ProofBundle) -> None:
    with pytest.raises(ProofRejected, match="parameter set"):
        verify_bundle(bundle, statement(), ALL, ProofParameters(2, *[getattr(PARAMS, k) for k in
                                                                     ("work", "time", "space", "stake")]))
    with pytest.raises(ProofRejected, match="parameter set"):
        verify_bundle(bundle, statement(), ALL, DEFAULT_PARAMETERS.__class__(
            1, WorkParams(2, 12), PARAMS.time, PARAMS.space, PARAMS.stake))


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=0))
def test_a_bundle_with_any_bit_flipped_is_refused(bundle: ProofBundle, bit: int) -> None:
    data = bytearray(bundle.encode())
    bit %= len(data) * 8
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProofRejected):
        verify_bundle(ProofBundle.decode(bytes(data)), statement(), ALL, PARAMS)
