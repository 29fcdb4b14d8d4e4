"""The mesh's state machine on a real chain (one validator, blocks built and committed): ledger
transactions with their recorded reasons, unbonding through blocks, and slashing an
equivocator out of the validator set at the next epoch."""

from __future__ import annotations

from random import Random
from typing import Any

import nacl.signing
import pytest

from hmnode.consensus.chain import Chain, Genesis, GenesisError
from hmnode.consensus.messages import (PRECOMMIT, PREVOTE, CommitCertificate, Equivocation,
                                       sign_tx, sign_vote)
from hmnode.consensus.validators import ValidatorSet
from hmnode.identity import NodeKey
from hmnode.ledger import Ledger
from hmnode.simnet.sim.store import SimStore
from hmnode.state_machine import MeshStateMachine

rng = Random(4)
VALIDATOR, OTHER, ALICE, BOB = (NodeKey(nacl.signing.SigningKey(rng.randbytes(32)))
                                for _ in range(4))
CHAIN = "sm"


class Harness:
    """A one-validator chain whose blocks the test makes and commits."""

    def __init__(self, app_state: Any = None, epoch_blocks: int = 100,
                 validators: tuple[NodeKey, ...] = (VALIDATOR,)) -> None:
        self.store = SimStore()
        self.chain = Chain(self.store, MeshStateMachine())
        self.validators = validators
        self.chain.init_genesis(Genesis(CHAIN, 1, ValidatorSet.of(
            (k.node_id.key, 1000) for k in validators), epoch_blocks, app_state))
        self.nonces: dict[bytes, int] = {}

    def tx(self, key: NodeKey, kind: str, body: Any) -> Any:
        n = self.nonces[key.node_id.key] = self.nonces.get(key.node_id.key, 0) + 1
        return sign_tx(key, CHAIN, n, kind, body)

    def block(self, *txs: Any) -> list[str | None]:
        """Commit one block of `txs`; what each did (None, or why it was refused)."""
        head = self.chain.head()
        block = self.chain.build_block(head.height + 1, VALIDATOR.node_id.key,
                                       head.time_ms + 1000, list(txs))
        assert len(block.txs) == len(txs)
        votes = [sign_vote(k, CHAIN, PRECOMMIT, block.height, 0, block.block_id)
                 for k in self.validators]
        self.chain.commit(block, CommitCertificate.from_votes(votes))
        return [self.chain.tx_result(t.tx_id)[2] for t in txs]

    def balance(self, key: NodeKey) -> int:
        return self.store.read(lambda tx: Ledger(tx).balance(key.node_id.key))

    def stake(self, key: NodeKey) -> int:
        return self.store.read(lambda tx: Ledger(tx).stake(key.node_id.key))

    def audit(self) -> Any:
        return self.store.read(lambda tx: Ledger(tx).audit())


def test_genesis_stakes_the_validators_and_funds_the_balances() -> None:
    h = Harness({"balances": {str(ALICE.node_id): 500}})
    assert h.stake(VALIDATOR) == 1000 and h.balance(ALICE) == 500
    totals = h.audit()
    assert totals.minted == 1500 and totals.held() == 1500


def test_transfer_and_refusals_are_recorded_and_change_nothing() -> None:
    h = Harness({"balances": {str(ALICE.node_id): 500}})
    results = h.block(h.tx(ALICE, "ledger.transfer", {"to": BOB.node_id.key, "amount": 200}),
                      h.tx(ALICE, "ledger.transfer", {"to": BOB.node_id.key, "amount": 301}),
                      h.tx(ALICE, "ledger.transfer", {"to": b"short", "amount": 1}),
                      h.tx(BOB, "ledger.transfer", {"to": ALICE.node_id.key, "amount": -5}),
                      h.tx(BOB, "ledger.faucet", {"amount": 10}),
                      h.tx(BOB, "ledger.mint", {"amount": 10}))
    assert results[0] is None
    assert "balance is 300, not 301" in results[1]
    assert "32-byte account" in results[2]
    assert "whole number" in results[3]
    assert "no faucet" in results[4]
    assert "unknown transaction kind" in results[5]
    assert (h.balance(ALICE), h.balance(BOB)) == (300, 200)
    h.audit()


def test_faucet_on_a_local_mesh_is_capped() -> None:
    h = Harness({"faucet_max": 50})
    assert h.block(h.tx(ALICE, "ledger.faucet", {"amount": 50}),
                   h.tx(ALICE, "ledger.faucet", {"amount": 51})) == [
        None, "the faucet gives at most 50"]
    assert h.balance(ALICE) == 50 and h.audit().minted == 1050


def test_unbonded_stake_comes_back_after_the_unbonding_blocks() -> None:
    h = Harness({"balances": {str(ALICE.node_id): 100}, "unbonding_blocks": 3})
    assert h.block(h.tx(ALICE, "stake.bond", {"amount": 80})) == [None]
    assert h.block(h.tx(ALICE, "stake.unbond", {"amount": 30}),
                   h.tx(ALICE, "stake.unbond", {"amount": 51})) == [None, "only 50 credits are staked"]
    assert (h.balance(ALICE), h.stake(ALICE)) == (20, 50)
    h.block()
    h.block()
    assert h.balance(ALICE) == 20  # height 4: not yet (unbonded at 2, paid at 5)
    h.block()
    assert h.balance(ALICE) == 50
    h.audit()


def _equivocation(key: NodeKey, chain_id: str = CHAIN) -> Equivocation:
    return Equivocation(sign_vote(key, chain_id, PREVOTE, 3, 0, b"\x01" * 32),
                        sign_vote(key, chain_id, PREVOTE, 3, 0, b"\x02" * 32))


def test_slashing_burns_and_jails_at_the_next_epoch() -> None:
    h = Harness({"slash": [1, 10]}, epoch_blocks=2, validators=(VALIDATOR, OTHER))
    evidence = _equivocation(OTHER)
    assert h.block(h.tx(ALICE, "stake.slash", {"evidence": evidence.encode()})) == [None]
    assert h.stake(OTHER) == 900 and h.audit().burned == 100
    # The same proof twice, a forged one, one from another chain: refused.
    forged = Equivocation(evidence.first, sign_vote(ALICE, CHAIN, PREVOTE, 3, 0, b"\x03" * 32))
    results = h.block(h.tx(ALICE, "stake.slash", {"evidence": evidence.encode()}),
                      h.tx(ALICE, "stake.slash", {"evidence": forged.encode()}),
                      h.tx(ALICE, "stake.slash", {"evidence": _equivocation(OTHER, "x").encode()}),
                      h.tx(ALICE, "stake.slash", {"evidence": b"junk"}))
    assert "already punished" in results[0]
    assert all("not evidence" in r or "another chain" in r for r in results[1:])
    # Block 2 ended the epoch: from height 3 the equivocator no longer validates.
    assert [k for k, _ in h.chain.validators_at(3).members] == [VALIDATOR.node_id.key]
    assert [k for k, _ in h.chain.validators_at(2).members] != [VALIDATOR.node_id.key]
    h.audit()


@pytest.mark.parametrize("app_state", [{"slash": [3, 2]}, {"unbonding_blocks": 0},
                                       {"faucet_max": -1}])
def test_bad_genesis_rules_are_refused(app_state: Any) -> None:
    with pytest.raises(GenesisError, match="ledger rules"):
        Harness(app_state)
