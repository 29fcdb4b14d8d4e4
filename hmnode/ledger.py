"""The ledger of the replicated state machine: balances, stake, unbonding stake and job escrow,
kept in the chain's LMDB tables and changed only inside a block's write transaction.

Conservation is the invariant: balances + stake + unbonding + escrow = minted - burned. Every
operation checks its inputs first and writes after, so a refused one raises `LedgerRefused`
(whose message the chain records as the transaction's reason) and changes nothing; running
totals are kept with the accounts and checked after every operation, and `audit` recomputes
them from every row (the simulator and the property tests call it).

Amounts are whole credits (integers); nothing here reads a clock or a random source.
"""

from __future__ import annotations

from dataclasses import dataclass

from hmnode import schema
from hmnode.env import Txn
from hmnode.errors import HmnodeError

MAX_AMOUNT = (1 << 62) - 1
MAX_UNBONDING_ENTRIES = 16  # per account; more must wait for earlier ones to mature
TOTALS_KEY = "totals"
_TOTAL_FIELDS = ("balances", "stake", "unbonding", "escrow", "minted", "burned")


class LedgerRefused(HmnodeError):
    """A ledger operation that cannot happen (too little balance, a bad amount, ...)."""


class LedgerBroken(AssertionError):
    """The ledger's totals no longer add up: a bug, never an input problem."""


@dataclass(frozen=True)
class LedgerParams:
    """The chain's monetary rules (from its genesis)."""

    unbonding_blocks: int = 100  # unbonded stake stays slashable this long before it is paid
    slash_numerator: int = 1  # the share of an equivocator's stake that is burnt
    slash_denominator: int = 20


@dataclass(frozen=True)
class Totals:
    """The ledger's running sums."""

    balances: int = 0
    stake: int = 0
    unbonding: int = 0
    escrow: int = 0
    minted: int = 0
    burned: int = 0

    def held(self) -> int:
        return self.balances + self.stake + self.unbonding + self.escrow


def _amount(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_AMOUNT:
        raise LedgerRefused(f"{what} must be a whole number of credits in 1..{MAX_AMOUNT}")
    return value


class Ledger:
    """The ledger as seen through one write transaction."""

    def __init__(self, txn: Txn, params: LedgerParams = LedgerParams()) -> None:
        self.txn = txn
        self.params = params

    # --- reading --------------------------------------------------------------------------------

    def balance(self, account: bytes) -> int:
        return self._account(account)[0]

    def stake(self, account: bytes) -> int:
        return self._account(account)[1]

    def unbonding(self, account: bytes) -> list[tuple[int, int]]:
        """(release height, amount) of the account's unbonding stake."""
        return [(int(h), int(a)) for h, a in self.txn.get(schema.LEDGER_UNBONDING, account, [])]

    def escrow(self, job_id: bytes) -> tuple[bytes, int] | None:
        """(payer, amount) held for a job, or None."""
        held = self.txn.get(schema.LEDGER_ESCROW, job_id)
        return None if held is None else (bytes(held[0]), int(held[1]))

    def totals(self) -> Totals:
        raw = self.txn.get(schema.LEDGER_TOTALS, TOTALS_KEY)
        return Totals() if raw is None else Totals(**{k: int(raw[k]) for k in _TOTAL_FIELDS})

    def stakes(self) -> list[tuple[bytes, int]]:
        """Every account with stake, and its stake (the validator set is drawn from this)."""
        return [(k, int(v[1])) for k, v in self.txn.items(schema.LEDGER_ACCOUNTS) if v[1] > 0]

    # --- operations -----------------------------------------------------------------------------

    def mint(self, account: bytes, amount: int) -> None:
        """New credits to `account` (genesis allocation, a local mesh's faucet)."""
        amount = _amount(amount, "the amount")
        balance, stake = self._account(account)
        totals = self.totals()
        if totals.minted + amount > MAX_AMOUNT:
            raise LedgerRefused("the supply would pass its maximum")
        self._put_account(account, balance + amount, stake)
        self._change(balances=amount, minted=amount)

    def transfer(self, source: bytes, target: bytes, amount: int) -> None:
        amount = _amount(amount, "the amount")
        self._take(source, amount)
        balance, stake = self._account(target)
        self._put_account(target, balance + amount, stake)

    def bond(self, account: bytes, amount: int) -> None:
        """Move credits from the balance into stake."""
        amount = _amount(amount, "the stake")
        self._take(account, amount)
        balance, stake = self._account(account)
        self._put_account(account, balance, stake + amount)
        self._change(balances=-amount, stake=amount)

    def unbond(self, account: bytes, amount: int, height: int) -> int:
        """Start returning stake to the balance; paid at the returned height (stake that is
        unbonding can still be slashed for what it did while bonded)."""
        amount = _amount(amount, "the amount to unbond")
        balance, stake = self._account(account)
        if amount > stake:
            raise LedgerRefused(f"only {stake} credits are staked")
        entries = self.unbonding(account)
        if len(entries) >= MAX_UNBONDING_ENTRIES:
            raise LedgerRefused(f"{MAX_UNBONDING_ENTRIES} unbondings are already pending; wait "
                                "for one to mature")
        release = height + self.params.unbonding_blocks
        self._put_account(account, balance, stake - amount)
        self.txn.put(schema.LEDGER_UNBONDING, account, [[h, a] for h, a in entries]
                     + [[release, amount]])
        self._change(stake=-amount, unbonding=amount)
        return release

    def release(self, height: int) -> int:
        """Pay out every unbonding that matured by `height`; returns how many credits."""
        paid = 0
        for account, raw in list(self.txn.items(schema.LEDGER_UNBONDING)):
            entries = [(int(h), int(a)) for h, a in raw]
            due = sum(a for h, a in entries if h <= height)
            if not due:
                continue
            rest = [[h, a] for h, a in entries if h > height]
            if rest:
                self.txn.put(schema.LEDGER_UNBONDING, account, rest)
            else:
                self.txn.delete(schema.LEDGER_UNBONDING, account)
            balance, stake = self._account(account)
            self._put_account(account, balance + due, stake)
            paid += due
        if paid:
            self._change(unbonding=-paid, balances=paid)
        return paid

    def lock(self, payer: bytes, job_id: bytes, amount: int) -> None:
        """Hold `amount` of the payer's balance for a job."""
        amount = _amount(amount, "the escrow")
        if self.txn.get(schema.LEDGER_ESCROW, job_id) is not None:
            raise LedgerRefused("this job already has an escrow")
        self._take(payer, amount)
        self.txn.put(schema.LEDGER_ESCROW, job_id, [payer, amount])
        self._change(balances=-amount, escrow=amount)

    def pay(self, job_id: bytes, payee: bytes, amount: int) -> None:
        """Pay `amount` from a job's escrow to `payee`."""
        amount = _amount(amount, "the payment")
        held = self.escrow(job_id)
        if held is None or held[1] < amount:
            raise LedgerRefused(f"the job's escrow holds {0 if held is None else held[1]}, "
                                f"not {amount}")
        payer, left = held
        self._set_escrow(job_id, payer, left - amount)
        balance, stake = self._account(payee)
        self._put_account(payee, balance + amount, stake)
        self._change(escrow=-amount, balances=amount)

    def refund(self, job_id: bytes) -> int:
        """Return what is left of a job's escrow to its payer; returns the amount."""
        held = self.escrow(job_id)
        if held is None:
            return 0
        payer, left = held
        self.txn.delete(schema.LEDGER_ESCROW, job_id)
        if left:
            balance, stake = self._account(payer)
            self._put_account(payer, balance + left, stake)
            self._change(escrow=-left, balances=left)
        return left

    def slash(self, account: bytes) -> int:
        """Burn the params' share of an account's stake and unbonding stake; returns how much."""
        p = self.params
        balance, stake = self._account(account)
        cut = stake * p.slash_numerator // p.slash_denominator
        entries = self.unbonding(account)
        cuts = [a * p.slash_numerator // p.slash_denominator for _, a in entries]
        if cut:
            self._put_account(account, balance, stake - cut)
        if any(cuts):
            kept = [[h, a - c] for (h, a), c in zip(entries, cuts) if a - c > 0]
            if kept:
                self.txn.put(schema.LEDGER_UNBONDING, account, kept)
            else:
                self.txn.delete(schema.LEDGER_UNBONDING, account)
        burned = cut + sum(cuts)
        if burned:
            self._change(stake=-cut, unbonding=-sum(cuts), burned=burned)
        return burned

    # --- checks ---------------------------------------------------------------------------------

    def audit(self) -> Totals:
        """Recompute the totals from every row; LedgerBroken if they differ from the running
        ones or do not conserve."""
        balances = stake = unbonding = escrow = 0
        for _, (b, s) in self.txn.items(schema.LEDGER_ACCOUNTS):
            if b < 0 or s < 0:
                raise LedgerBroken("a negative balance or stake")
            balances += b
            stake += s
        for _, entries in self.txn.items(schema.LEDGER_UNBONDING):
            unbonding += sum(a for _, a in entries)
        for _, (_, amount) in self.txn.items(schema.LEDGER_ESCROW):
            escrow += amount
        totals = self.totals()
        found = (balances, stake, unbonding, escrow)
        if found != (totals.balances, totals.stake, totals.unbonding, totals.escrow):
            raise LedgerBroken(f"rows add up to {found}, running totals say {totals}")
        return totals

    # --- helpers --------------------------------------------------------------------------------

    def _account(self, account: bytes) -> tuple[int, int]:
        raw = self.txn.get(schema.LEDGER_ACCOUNTS, account)
        return (0, 0) if raw is None else (int(raw[0]), int(raw[1]))

    def _put_account(self, account: bytes, balance: int, stake: int) -> None:
        if balance or stake:
            self.txn.put(schema.LEDGER_ACCOUNTS, account, [balance, stake])
        else:
            self.txn.delete(schema.LEDGER_ACCOUNTS, account)

    def _take(self, account: bytes, amount: int) -> None:
        balance, stake = self._account(account)
        if balance < amount:
            raise LedgerRefused(f"the balance is {balance}, not {amount}")
        self._put_account(account, balance - amount, stake)

    def _set_escrow(self, job_id: bytes, payer: bytes, amount: int) -> None:
        self.txn.put(schema.LEDGER_ESCROW, job_id, [payer, amount])

    def _change(self, **delta: int) -> None:
        now = self.totals()
        new = Totals(**{k: getattr(now, k) + delta.get(k, 0) for k in _TOTAL_FIELDS})
        if new.held() != new.minted - new.burned or min(
                getattr(new, k) for k in _TOTAL_FIELDS) < 0:
            raise LedgerBroken(f"totals would not conserve: {new}")
        self.txn.put(schema.LEDGER_TOTALS, TOTALS_KEY, {k: getattr(new, k) for k in _TOTAL_FIELDS})
