"""The ledger: conservation after every operation (a hypothesis state machine drives random
sequences), refused operations change nothing, unbonding matures, slashing burns."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hmnode import schema
from hmnode.ledger import Ledger, LedgerParams, LedgerRefused, Totals
from hmnode.simnet.sim.store import SimStore

ACCOUNTS = [bytes([i]) * 32 for i in range(4)]
JOBS = [b"J" + bytes([i]) * 31 for i in range(3)]
PARAMS = LedgerParams(unbonding_blocks=5, slash_numerator=1, slash_denominator=4)
LEDGER_TABLES = (schema.LEDGER_ACCOUNTS, schema.LEDGER_UNBONDING, schema.LEDGER_ESCROW,
                 schema.LEDGER_TOTALS)


def snapshot(store: SimStore) -> dict[str, list[tuple[Any, Any]]]:
    return store.read(lambda tx: {t.name: list(tx.items(t)) for t in LEDGER_TABLES})


def apply(store: SimStore, op: Callable[[Ledger], Any]) -> Any:
    """One operation in one write transaction, as a block applies a transaction."""
    return store.write(lambda tx: op(Ledger(tx, PARAMS)))


class LedgerMachine(RuleBasedStateMachine):
    """Random operations; a refused one must leave every ledger row as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.store = SimStore()
        self.height = 0
        self.refused = 0

    def _do(self, op: Callable[[Ledger], Any]) -> None:
        before = snapshot(self.store)
        try:
            apply(self.store, op)
        except LedgerRefused:
            self.refused += 1
            assert snapshot(self.store) == before

    accounts = st.sampled_from(ACCOUNTS)
    amounts = st.integers(min_value=-5, max_value=3_000) | st.just(True)

    @rule(account=accounts, amount=st.integers(min_value=1, max_value=1_000))
    def mint(self, account: bytes, amount: int) -> None:
        self._do(lambda lg: lg.mint(account, amount))

    @rule(source=accounts, dest=accounts, amount=amounts)
    def transfer(self, source: bytes, dest: bytes, amount: Any) -> None:
        self._do(lambda lg: lg.transfer(source, dest, amount))

    @rule(account=accounts, amount=amounts)
    def bond(self, account: bytes, amount: Any) -> None:
        self._do(lambda lg: lg.bond(account, amount))

    @rule(account=accounts, amount=amounts)
    def unbond(self, account: bytes, amount: Any) -> None:
        self._do(lambda lg: lg.unbond(account, amount, self.height))

    @rule(blocks=st.integers(min_value=0, max_value=4))
    def advance(self, blocks: int) -> None:
        self.height += blocks
        self._do(lambda lg: lg.release(self.height))

    @rule(payer=accounts, job=st.sampled_from(JOBS), amount=amounts)
    def lock(self, payer: bytes, job: bytes, amount: Any) -> None:
        self._do(lambda lg: lg.lock(payer, job, amount))

    @rule(job=st.sampled_from(JOBS), payee=accounts, amount=amounts)
    def pay(self, job: bytes, payee: bytes, amount: Any) -> None:
        self._do(lambda lg: lg.pay(job, payee, amount))

    @rule(job=st.sampled_from(JOBS))
    def refund(self, job: bytes) -> None:
        self._do(lambda lg: lg.refund(job))

    @rule(account=accounts)
    def slash(self, account: bytes) -> None:
        self._do(lambda lg: lg.slash(account))

    @invariant()
    def conserves(self) -> None:
        totals = self.store.read(lambda tx: Ledger(tx, PARAMS).audit())
        assert totals.held() == totals.minted - totals.burned


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_bond_unbond_and_release_at_maturity() -> None:
    store = SimStore()
    a = ACCOUNTS[0]
    apply(store, lambda lg: lg.mint(a, 100))
    apply(store, lambda lg: lg.bond(a, 60))
    release = apply(store, lambda lg: lg.unbond(a, 20, height=10))
    assert release == 15
    assert apply(store, lambda lg: lg.release(14)) == 0
    assert store.read(lambda tx: (Ledger(tx).balance(a), Ledger(tx).stake(a))) == (40, 40)
    assert apply(store, lambda lg: lg.release(15)) == 20
    assert store.read(lambda tx: (Ledger(tx).balance(a), Ledger(tx).unbonding(a))) == (60, [])


def test_slash_burns_stake_and_unbonding_stake() -> None:
    store = SimStore()
    a = ACCOUNTS[1]
    apply(store, lambda lg: lg.mint(a, 1_000))
    apply(store, lambda lg: lg.bond(a, 800))
    apply(store, lambda lg: lg.unbond(a, 400, height=0))
    burned = apply(store, lambda lg: lg.slash(a))
    assert burned == 100 + 100  # a quarter of 400 staked and of 400 unbonding
    totals = store.read(lambda tx: Ledger(tx, PARAMS).audit())
    assert totals == Totals(balances=200, stake=300, unbonding=300, minted=1_000, burned=200)


def test_escrow_pays_and_refunds_the_rest() -> None:
    store = SimStore()
    payer, worker = ACCOUNTS[0], ACCOUNTS[2]
    apply(store, lambda lg: lg.mint(payer, 50))
    apply(store, lambda lg: lg.lock(payer, JOBS[0], 30))
    with pytest.raises(LedgerRefused, match="already has an escrow"):
        apply(store, lambda lg: lg.lock(payer, JOBS[0], 5))
    apply(store, lambda lg: lg.pay(JOBS[0], worker, 12))
    with pytest.raises(LedgerRefused, match="holds 18"):
        apply(store, lambda lg: lg.pay(JOBS[0], worker, 19))
    assert apply(store, lambda lg: lg.refund(JOBS[0])) == 18
    assert store.read(lambda tx: (Ledger(tx).balance(payer), Ledger(tx).balance(worker))) == (38, 12)


@pytest.mark.parametrize("amount", [0, -1, True, 1.5, "3", 1 << 62])
def test_bad_amounts_are_refused_with_a_reason(amount: Any) -> None:
    store = SimStore()
    apply(store, lambda lg: lg.mint(ACCOUNTS[0], 10))
    before = snapshot(store)
    with pytest.raises(LedgerRefused, match="whole number"):
        apply(store, lambda lg: lg.transfer(ACCOUNTS[0], ACCOUNTS[1], amount))
    assert snapshot(store) == before
