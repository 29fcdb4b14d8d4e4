"""The mesh's replicated state machine: what the validators agree on, applied block by block.

So far: the ledger (credits moved, bonded as stake, unbonded after a delay, slashed for
equivocation) and the validator set drawn from stake; the key-value test transactions are kept
for tests and demonstrations. Every transaction is checked in full before it writes, so one
that is refused changes nothing but its sender's nonce, and its reason is recorded.

Transactions (kind: body):
- `ledger.transfer`: {"to": 32-byte account, "amount": credits}
- `ledger.faucet`: {"amount": credits}, only where the genesis enables a faucet (a local mesh)
- `stake.bond` / `stake.unbond`: {"amount": credits}; unbonded stake is paid back after
  `unbonding_blocks` and stays slashable until then
- `stake.slash`: {"evidence": an encoded Equivocation}: burns a share of the offender's stake
  and removes it from the validator set from the next epoch
- `node.register`: {"work": an encoded WorkProof, "plot": an encoded PlotCommitment}: admits
  the sender (see `hmnode.registry`)
- `beacon.publish`: {"proof": an encoded TimeProof over the awaited period's seed}
- `space.answer`: {"proof": an encoded SpaceProof for the current beacon}
- `offer.commit`: what the sender's node shares and at what price (see `hmnode.jobs`), with
  "proofs": an encoded ProofBundle of space (the current beacon) and stake; only from a
  registered node; it may say it is "paused" (with why: nothing is placed on it meanwhile)
  and "allow" only some submitters' jobs; `offer.withdraw`: {}
- `job.submit`: a job spec; its maximum price is held in escrow; `job.cancel`: {"job_id"}
- `job.receipt`: {"job_id", "result_hash", "exit_code", "wall_ms", "cpu_ms", "fuel",
  "peak_memory_mib"} from the node the job was allocated to: it is paid, the rest refunded;
  `job.release`: {"job_id", "reason"} from that node: the job waits in the queue again
- `kv.put` / `kv.delete`: as in `hmnode.consensus.kvapp`

At the end of every block, matured unbondings are paid, a new beacon period starts where one
is due, offering nodes that missed their space challenge are suspended, and pending jobs are
allocated to the offers of live nodes (`hmnode.jobs`, `hmnode.allocation`).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

from hmnode import schema
from hmnode.consensus.chain import Genesis
from hmnode.consensus.kvapp import KeyValueApp
from hmnode.consensus.messages import (ID_BYTES, Equivocation, MessageRejected, Transaction,
                                       check_equivocation)
from hmnode.env import Txn
from hmnode.identity import NodeId
from hmnode.consensus.vdf import VDF_PARAMS
from hmnode.jobs import JobBook, parse_offer, parse_offer_terms
from hmnode.ledger import Ledger, LedgerParams, LedgerRefused, MAX_AMOUNT
from hmnode.registry import NodeRegistry, RegistryRules

PARAMS_KEY = "params"
JAILED_KEY = "jailed"
KV_KINDS = ("kv.put", "kv.delete")
KINDS = ("ledger.transfer", "ledger.faucet", "stake.bond", "stake.unbond", "stake.slash",
         "node.register", "beacon.publish", "space.answer", "offer.commit", "offer.withdraw",
         "job.submit", "job.cancel", "job.receipt", "job.release") + KV_KINDS


@dataclass(frozen=True)
class StateParams:
    """The rules of one chain, from its genesis, kept in its state."""

    unbonding_blocks: int = 100
    slash_numerator: int = 1
    slash_denominator: int = 20
    faucet_max: int = 0  # the most one faucet transaction may mint; 0: no faucet
    # Admission and liveness (`hmnode.registry`): the registration's proof of work, the
    # smallest plot, how often a beacon draws space challenges and how long a node has to
    # answer, the proof of time's parameter set, and the stake an offer must prove.
    work_bits: int = RegistryRules.work_bits
    min_plot_labels: int = RegistryRules.min_plot_labels
    beacon_blocks: int = RegistryRules.beacon_blocks
    answer_blocks: int = RegistryRules.answer_blocks
    vdf_version: int = RegistryRules.vdf_version
    offer_min_stake: int = 1

    def ledger(self) -> LedgerParams:
        return LedgerParams(self.unbonding_blocks, self.slash_numerator, self.slash_denominator)

    def registry(self) -> RegistryRules:
        return RegistryRules(self.work_bits, self.min_plot_labels, self.beacon_blocks,
                             self.answer_blocks, self.vdf_version)

    @classmethod
    def from_app_state(cls, app_state: Any) -> "StateParams":
        """The rules a genesis's app_state sets (every key optional); ValueError if bad."""
        state = app_state if isinstance(app_state, dict) else {}
        defaults = cls()
        try:
            slash = state.get("slash", [1, 20])
            params = cls(int(state.get("unbonding_blocks", 100)), int(slash[0]), int(slash[1]),
                         *(int(state.get(name, getattr(defaults, name))) for name in (
                             "faucet_max", "work_bits", "min_plot_labels", "beacon_blocks",
                             "answer_blocks", "vdf_version", "offer_min_stake")))
        except (TypeError, ValueError, IndexError, KeyError):
            raise ValueError("genesis app_state has a rule that is not a whole number") from None
        if not (1 <= params.unbonding_blocks <= 10_000_000
                and 0 <= params.slash_numerator <= params.slash_denominator
                and params.slash_denominator >= 1 and 0 <= params.faucet_max <= MAX_AMOUNT
                and 1 <= params.work_bits <= 40 and 1 <= params.min_plot_labels <= 1 << 26
                and 2 <= params.beacon_blocks <= 1_000_000
                and 1 <= params.answer_blocks < params.beacon_blocks
                and params.vdf_version in VDF_PARAMS
                and 1 <= params.offer_min_stake <= MAX_AMOUNT):
            raise ValueError(f"genesis app_state has bad rules: {params}")
        return params


def _amount(body: dict) -> int:
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_AMOUNT:
        raise LedgerRefused(f"amount must be a whole number of credits in 1..{MAX_AMOUNT}")
    return amount


class MeshStateMachine:
    """The chain's application (`hmnode.consensus.chain.Application`)."""

    def __init__(self) -> None:
        self._kv = KeyValueApp()

    def init(self, txn: Txn, genesis: Genesis) -> None:
        """Genesis: the rules, the validators' stake (their power, in credits) and the initial
        balances ({"balances": {node id: credits}} in the app state)."""
        params = StateParams.from_app_state(genesis.app_state)
        txn.put(schema.STATE, PARAMS_KEY, list(astuple(params)))
        NodeRegistry(txn, params.registry()).init(genesis.chain_id, genesis.genesis_id)
        ledger = Ledger(txn, params.ledger())
        for key, power in genesis.validators.members:
            ledger.mint(key, power)
            ledger.bond(key, power)
        state = genesis.app_state if isinstance(genesis.app_state, dict) else {}
        for node_id, amount in sorted((state.get("balances") or {}).items()):
            ledger.mint(NodeId.parse(node_id).key, int(amount))
        self._kv.init(txn, genesis)

    def params(self, txn: Txn) -> StateParams:
        raw = txn.get(schema.STATE, PARAMS_KEY)
        return StateParams() if raw is None else StateParams(*raw)

    def check(self, txn: Txn, tx: Transaction) -> str | None:
        """Why `tx` can never apply (kind or body), or None."""
        if tx.kind not in KINDS:
            return f"unknown transaction kind {tx.kind!r}"
        if tx.kind in KV_KINDS:
            return self._kv.check(txn, tx)
        body = tx.payload
        if not isinstance(body, dict):
            return "the body is not a map"
        return None

    def deliver(self, txn: Txn, tx: Transaction, height: int, time_ms: int) -> str | None:
        """Apply `tx`; None, or why it was refused (and then nothing changed)."""
        if tx.kind in KV_KINDS:
            return self._kv.deliver(txn, tx, height, time_ms)
        body = tx.payload
        params = self.params(txn)
        ledger = Ledger(txn, params.ledger())
        try:
            if tx.kind == "ledger.transfer":
                to = body.get("to")
                if not isinstance(to, bytes) or len(to) != ID_BYTES:
                    raise LedgerRefused("to must be a 32-byte account (a node id's key)")
                ledger.transfer(tx.sender, to, _amount(body))
            elif tx.kind == "ledger.faucet":
                amount = _amount(body)
                if amount > params.faucet_max:
                    raise LedgerRefused("this chain has no faucet" if not params.faucet_max
                                        else f"the faucet gives at most {params.faucet_max}")
                ledger.mint(tx.sender, amount)
            elif tx.kind == "stake.bond":
                ledger.bond(tx.sender, _amount(body))
            elif tx.kind == "stake.unbond":
                ledger.unbond(tx.sender, _amount(body), height)
            elif tx.kind == "stake.slash":
                self._slash(txn, ledger, tx, height)
            elif tx.kind == "node.register":
                NodeRegistry(txn, params.registry()).register(tx.sender, body, height)
            elif tx.kind == "beacon.publish":
                NodeRegistry(txn, params.registry()).publish(body, height)
            elif tx.kind == "space.answer":
                NodeRegistry(txn, params.registry()).answer(tx.sender, body)
            elif tx.kind == "offer.commit":
                # Capacity first: a malformed offer is refused before any proof is checked.
                parse_offer(tx.sender, body, height)
                parse_offer_terms(body)
                NodeRegistry(txn, params.registry()).check_offer(
                    tx.sender, body, ledger, height, params.offer_min_stake)
                JobBook(txn, ledger).commit_offer(tx.sender, body, height)
            elif tx.kind == "offer.withdraw":
                JobBook(txn, ledger).withdraw_offer(tx.sender)
            elif tx.kind == "job.submit":
                JobBook(txn, ledger).submit(tx.sender, tx.tx_id, body, height)
            elif tx.kind == "job.receipt":
                JobBook(txn, ledger).receipt(tx.sender, body, height)
            elif tx.kind == "job.release":
                JobBook(txn, ledger).release(tx.sender, body, height)
            else:
                JobBook(txn, ledger).cancel(tx.sender, body.get("job_id"), height)
        except LedgerRefused as exc:
            return str(exc)
        return None

    def _slash(self, txn: Txn, ledger: Ledger, tx: Transaction, height: int) -> None:
        try:
            evidence = Equivocation.decode(tx.payload.get("evidence"))
            check_equivocation(evidence)
        except MessageRejected as exc:
            raise LedgerRefused(f"not evidence of an equivocation: {exc}") from None
        if evidence.first.chain_id != tx.chain_id:
            raise LedgerRefused("the evidence is from another chain")
        if txn.get(schema.SLASHED, evidence.evidence_id) is not None:
            raise LedgerRefused("this equivocation was already punished")
        offender = evidence.first.validator
        txn.put(schema.SLASHED, evidence.evidence_id, height)
        ledger.slash(offender)
        jailed = set(self.jailed(txn))
        if offender not in jailed:
            txn.put(schema.STATE, JAILED_KEY, sorted(jailed | {offender}))

    def jailed(self, txn: Txn) -> list[bytes]:
        """Accounts removed from the validator set for equivocating."""
        return [bytes(k) for k in txn.get(schema.STATE, JAILED_KEY, [])]

    def end_block(self, txn: Txn, height: int) -> None:
        params = self.params(txn)
        ledger = Ledger(txn, params.ledger())
        ledger.release(height)
        registry = NodeRegistry(txn, params.registry())
        book = JobBook(txn, ledger)
        registry.end_block(height, book.offering_nodes)
        book.end_block(height, lambda node: registry.unavailable(node, ledger,
                                                                  params.offer_min_stake))

    def validators(self, txn: Txn) -> list[tuple[bytes, int]] | None:
        """Everyone with stake and not jailed, with power equal to its stake."""
        jailed = set(self.jailed(txn))
        stakes = [(k, s) for k, s in Ledger(txn).stakes() if k not in jailed]
        return stakes or None
