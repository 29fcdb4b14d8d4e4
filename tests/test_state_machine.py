"""The mesh's state machine on a real chain (one validator, blocks built and committed): ledger
transactions with their recorded reasons, unbonding through blocks, and slashing an
equivocator out of the validator set at the next epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chain_harness import ALICE, BOB, CHAIN, OFFERER_FUNDS, OTHER, VALIDATOR, Harness
from hmnode import schema
from hmnode.consensus.chain import GenesisError
from hmnode.consensus.messages import PREVOTE, Equivocation, sign_vote
from hmnode.consensus.space import Plot
from hmnode.identity import NodeKey
from hmnode.jobs import replica_id
from hmnode.prover import NodeProver, publish_beacon

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
                                       {"faucet_max": -1}, {"work_bits": 0},
                                       {"vdf_version": 7}, {"answer_blocks": 10},
                                       {"offer_min_stake": 0}])
def test_bad_genesis_rules_are_refused(app_state: Any) -> None:
    with pytest.raises(GenesisError, match="bad rules"):
        Harness(app_state)


# --- offers and jobs -----------------------------------------------------------------------------

OFFER = {"cores": 8, "memory_mib": 16_384, "runtimes": ["wasm"],
         "price": {"core_hour": 10, "gib_hour": 0, "gpu_hour": 0, "start_fee": 1},
         "expires_height": 1_000}


def job_body(**over: Any) -> dict[str, Any]:
    body = {"cores": 4, "memory_mib": 1024, "runtime": "wasm", "duration_s": 3600,
            "max_price": 100, "deadline_height": 10}
    body.update(over)
    return body


def job(h: Harness, tx: Any) -> dict[str, Any]:
    return h.store.read(lambda t: t.get(schema.JOBS, tx.tx_id))


def offering(app_state: Any = None) -> Harness:
    """A chain where ALICE has 500 credits and BOB has joined, ready to offer."""
    h = Harness(dict({"balances": {str(ALICE.node_id): 500}}, **(app_state or {})),
                offerers=(BOB,))
    h.join(BOB)
    return h


def test_a_job_is_allocated_to_an_offer_with_its_escrow_held() -> None:
    h = offering()
    assert h.block(h.offer(BOB, OFFER)) == [None]
    submit = h.tx(ALICE, "job.submit", job_body())
    assert h.block(submit) == [None]
    record = job(h, submit)
    assert record["state"] == "allocated" and record["node"] == BOB.node_id.key
    assert record["cost"] == 41  # 4 cores x 10 an hour, for an hour, plus the start fee
    assert [s for s, _ in record["history"]] == ["queued", "allocated"]
    assert h.balance(ALICE) == 400 and h.audit().escrow == 100
    used = h.store.read(lambda t: t.get(schema.OFFERS, BOB.node_id.key))["used"]
    assert used[:2] == [4, 1024]


def test_a_job_that_fits_nowhere_waits_with_a_reason_then_expires_refunded() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER))
    submit = h.tx(ALICE, "job.submit", job_body(gpu_count=1, deadline_height=5))
    h.block(submit)
    record = job(h, submit)
    assert record["state"] == "queued" and record["reason"] == "no node with 1 GPU"
    while h.chain.head().height < 5:
        h.block()
    record = job(h, submit)
    assert record["state"] == "expired" and h.balance(ALICE) == 500 and h.audit().escrow == 0


def test_cancel_and_the_refusals_around_it() -> None:
    h = offering()
    queued = h.tx(ALICE, "job.submit", job_body())
    h.block(queued)  # no offer: it waits
    assert job(h, queued)["reason"] == "no node offers anything right now"
    results = h.block(h.tx(BOB, "job.cancel", {"job_id": queued.tx_id}),
                      h.tx(ALICE, "job.cancel", {"job_id": queued.tx_id}),
                      h.tx(ALICE, "job.cancel", {"job_id": queued.tx_id}),
                      h.tx(ALICE, "job.submit", job_body(max_price=10_000)))
    assert results[0] == "no such job of yours" and results[1] is None
    assert "cancelled, not queued" in results[2] and "balance is 500" in results[3]
    assert job(h, queued)["state"] == "cancelled" and h.balance(ALICE) == 500


def test_an_allocated_job_without_a_receipt_lapses_and_frees_its_node() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER))
    first = h.tx(ALICE, "job.submit", job_body(cores=8, deadline_height=4))
    second = h.tx(ALICE, "job.submit", job_body(cores=8, deadline_height=20))
    h.block(first, second)
    assert job(h, first)["state"] == "allocated"
    assert job(h, second)["reason"] == "every node that could run it is busy; it waits for capacity"
    shrink = dict(OFFER, cores=4)
    other_runtime = dict(OFFER, runtimes=["process"])
    assert h.block(h.offer(BOB, shrink), h.offer(BOB, other_runtime),
                   h.tx(BOB, "offer.withdraw", {})) == [
        "the offer would be smaller than what its running jobs use",
        "the offer drops the wasm runtime its running jobs use",
        "jobs are running on this offer; it can only be withdrawn once they end"]
    h.block()
    assert job(h, first)["state"] == "lapsed"
    assert job(h, second)["state"] == "allocated"
    assert h.balance(ALICE) == 400  # the lapsed job's escrow came back; the second's is held
    h.audit()


@pytest.mark.parametrize("body,why", [
    (dict(OFFER, runtimes=["docker"]), "runtimes is a list"),
    (dict(OFFER, cores=-1), "cores must be"),
    (dict(OFFER, expires_height=0), "expires_height must be"),
    (dict(OFFER, gpus=[["A100"]]), "gpus is a list"),
    (dict(OFFER, price="cheap"), "price is a map"),
])
def test_malformed_offers_are_refused_with_a_reason(body: dict, why: str) -> None:
    h = offering()
    assert why in h.block(h.offer(BOB, body))[0]


def receipt_body(job_id: bytes, **over: Any) -> dict[str, Any]:
    body = {"job_id": job_id, "result_hash": b"\x07" * 32, "exit_code": 0, "wall_ms": 3_600_000,
            "cpu_ms": 1100, "fuel": 0, "peak_memory_mib": 64}
    body.update(over)
    return body


def test_a_receipt_settles_the_job_pays_the_node_and_refunds_the_rest() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER))
    submit = h.tx(ALICE, "job.submit", job_body())
    h.block(submit)
    results = h.block(h.tx(ALICE, "job.receipt", receipt_body(submit.tx_id)),
                      h.tx(BOB, "job.receipt", receipt_body(submit.tx_id, result_hash=b"x")),
                      h.tx(BOB, "job.receipt", receipt_body(submit.tx_id)),
                      h.tx(BOB, "job.receipt", receipt_body(submit.tx_id)))
    assert results[0] == "no job allocated to this node with that id"
    assert results[1] == "result_hash is 32 bytes"
    assert results[2] is None
    assert results[3] == "no job allocated to this node with that id"  # paid once only
    record = job(h, submit)
    assert record["state"] == "settled" and record["receipt"]["wall_ms"] == 3_600_000
    assert [s for s, _ in record["history"]] == ["queued", "allocated", "settled"]
    assert h.balance(BOB) == 41 and h.balance(ALICE) == 500 - 41
    used = h.store.read(lambda t: t.get(schema.OFFERS, BOB.node_id.key))["used"]
    assert used == [0, 0, {}, {}]
    totals = h.audit()
    assert totals.escrow == 0 and totals.held() == totals.minted


def test_a_short_run_is_paid_for_the_time_it_measured_and_the_rest_refunded() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER))
    submit = h.tx(ALICE, "job.submit", job_body())
    h.block(submit)
    assert h.block(h.tx(BOB, "job.receipt", receipt_body(submit.tx_id, wall_ms=90_001))) == [None]
    # 4 cores at 10 an hour for 91 whole seconds (1.01 credits, rounded up to 2) plus the fee.
    assert job(h, submit)["receipt"]["paid"] == 3
    assert h.balance(BOB) == 3 and h.balance(ALICE) == 497
    h.audit()


# --- registration, beacons and space challenges --------------------------------------------------

def test_registration_needs_the_nodes_own_work_and_plot() -> None:
    h = Harness(offerers=(BOB,))
    good = h.prover(BOB).register(CHAIN, 8)
    other_chain = h.prover(BOB).register("another-chain", 8)
    alices = h.prover(ALICE).register(CHAIN, 8)
    small = NodeProver(BOB, Plot.create(Path(h._plots.name) / "small", BOB.node_id.key, 8))
    results = h.block(h.tx(BOB, "offer.commit", dict(OFFER, proofs=b"")),
                      h.tx(BOB, "node.register", other_chain),
                      h.tx(BOB, "node.register", alices),
                      h.tx(BOB, "node.register", dict(good, plot=alices["plot"])),
                      h.tx(BOB, "node.register", small.register(CHAIN, 8)),
                      h.tx(BOB, "node.register", {"work": b"junk", "plot": good["plot"]}),
                      h.tx(BOB, "node.register", good),
                      h.tx(BOB, "node.register", good))
    assert "not registered: send node.register first" in results[0]
    assert "work proof" in results[1] and "work proof" in results[2]
    assert "not this node's plot" in results[3]
    assert "plot has 8 labels; this chain asks for at least 16" in results[4]
    assert "registration refused" in results[5]
    assert results[6] is None and "already registered" in results[7]


def test_an_offer_must_prove_its_space_and_stake() -> None:
    h = offering({"offer_min_stake": 5})
    prover, head = h.prover(BOB), h.chain.head().height
    beacon = h.beacon().value
    stale = prover.offer_proofs(CHAIN, b"\x09" * 32, OFFERER_FUNDS, head)
    too_much = prover.offer_proofs(CHAIN, beacon, OFFERER_FUNDS + 1, head)
    too_little = prover.offer_proofs(CHAIN, beacon, 4, head)
    alices = NodeProver(ALICE, prover.plot).offer_proofs(CHAIN, beacon, OFFERER_FUNDS, head)
    results = h.block(*(h.tx(BOB, "offer.commit", dict(OFFER, proofs=p))
                        for p in (stale, too_much, too_little, alices, b"\x00")))
    assert "another (stale or future) beacon" in results[0]
    assert "claims 11 credits locked" in results[1]
    assert "proves 4 credits staked; this chain asks offers for at least 5" in results[2]
    assert "stake proof is another node's" in results[3]
    assert "offer refused" in results[4]
    assert h.store.read(lambda t: t.get(schema.OFFERS, BOB.node_id.key)) is None
    assert h.block(h.offer(BOB, OFFER)) == [None]


def test_a_node_that_misses_its_space_challenge_is_suspended_until_it_answers() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER))
    while h.chain.head().height < 10:
        h.block()
    beacon = h.beacon()
    assert beacon.period == 1 and beacon.awaited  # height 10 started period 1
    wrong = publish_beacon(b"\x05" * 32, 0)
    assert "not the beacon of period 1" in h.block(h.tx(ALICE, "beacon.publish", wrong))[0]
    right = publish_beacon(beacon.seed, 0)
    assert h.block(h.tx(ALICE, "beacon.publish", right),
                   h.tx(VALIDATOR, "beacon.publish", right)) == [
        None, "the beacon of period 1 is already published"]
    published = h.beacon()
    assert published.value_period == 1 and published.value != beacon.value
    assert published.due == 12 + 3
    while h.chain.head().height < published.due:
        h.block()
    submit = h.tx(ALICE, "job.submit", job_body(deadline_height=40))
    h.block(submit)
    record = job(h, submit)
    assert record["state"] == "queued"
    assert "held back" in record["reason"] and "missed the space challenge of beacon period 1" \
        in record["reason"]
    # An answer to the old beacon does not count; the current one does, once.
    stale = {"proof": h.prover(BOB).plot.prove(beacon.value).encode()}
    answer = h.prover(BOB).answer(published.value)
    assert h.block(h.tx(BOB, "space.answer", stale), h.tx(BOB, "space.answer", answer),
                   h.tx(BOB, "space.answer", answer))[0::2] == [
        "space answer refused: space proof answers another (stale or future) beacon",
        "this node already answered the beacon of period 1"]
    assert job(h, submit)["state"] == "allocated"  # live again at the end of that block


def test_a_node_without_enough_stake_is_held_back() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER), h.tx(BOB, "stake.unbond", {"amount": OFFERER_FUNDS}))
    submit = h.tx(ALICE, "job.submit", job_body())
    h.block(submit)
    assert "its stake (0) is below the 1 an offer needs" in job(h, submit)["reason"]


def test_a_new_plot_must_answer_before_its_node_gets_work_again() -> None:
    h = offering()
    h.block(h.offer(BOB, OFFER))
    bigger = NodeProver(BOB, Plot.create(Path(h._plots.name) / "bigger", BOB.node_id.key, 32))
    assert h.block(h.tx(BOB, "node.register", bigger.register(CHAIN, 8))) == [None]
    submit = h.tx(ALICE, "job.submit", job_body())
    h.block(submit)
    assert "its plot changed" in job(h, submit)["reason"]
    assert h.block(h.tx(BOB, "space.answer", bigger.answer(h.beacon().value))) == [None]
    assert job(h, submit)["state"] == "allocated"


def test_replicas_run_on_distinct_nodes_and_only_the_agreeing_ones_are_paid() -> None:
    h = Harness({"balances": {str(ALICE.node_id): 500}}, offerers=(BOB, OTHER, VALIDATOR))
    for key in (BOB, OTHER, VALIDATOR):
        h.join(key)
    h.block(*(h.offer(key, OFFER) for key in (BOB, OTHER, VALIDATOR)))
    submit = h.tx(ALICE, "job.submit", job_body(replicas=3, quorum=2, deadline_height=30))
    assert h.block(submit) == [None]
    assert h.audit().escrow == 300 and h.balance(ALICE) == 200
    replicas = [submit.tx_id] + [replica_id(submit.tx_id, i) for i in (1, 2)]
    records = [h.store.read(lambda t, r=r: t.get(schema.JOBS, r)) for r in replicas]
    nodes = {r["node"] for r in records}
    assert all(r["state"] == "allocated" for r in records) and len(nodes) == 3
    by_node = {r["node"]: rid for rid, r in zip(replicas, records)}
    good, bad = receipt_body(b"", result_hash=b"\x01" * 32), receipt_body(b"", result_hash=b"\x02" * 32)
    results = h.block(h.tx(BOB, "job.receipt", dict(good, job_id=by_node[BOB.node_id.key])),
                      h.tx(OTHER, "job.receipt", dict(bad, job_id=by_node[OTHER.node_id.key])))
    assert results == [None, None]
    # Two of three have reported: nothing is paid until the third has.
    assert h.balance(BOB) == 0 and h.audit().escrow == 300
    assert h.block(h.tx(VALIDATOR, "job.receipt",
                        dict(good, job_id=by_node[VALIDATOR.node_id.key]))) == [None]
    final = {r: h.store.read(lambda t, r=r: t.get(schema.JOBS, r)) for r in replicas}
    states = {f["node"]: f["state"] for f in final.values()}
    assert states == {BOB.node_id.key: "settled", VALIDATOR.node_id.key: "settled",
                      OTHER.node_id.key: "rejected"}
    outcome = final[submit.tx_id]["outcome"]
    assert outcome["result_hash"] == b"\x01" * 32 and outcome["agreeing"] == 2
    assert outcome["disagreeing"] == [OTHER.node_id.key]
    assert h.balance(BOB) == 41 and h.balance(OTHER) == 0 and h.balance(ALICE) == 500 - 82
    assert h.audit().escrow == 0


def test_replicas_without_a_quorum_pay_nobody_and_refund_everything() -> None:
    h = Harness({"balances": {str(ALICE.node_id): 500}}, offerers=(BOB, OTHER))
    for key in (BOB, OTHER):
        h.join(key)
    h.block(*(h.offer(key, OFFER) for key in (BOB, OTHER)))
    submit = h.tx(ALICE, "job.submit", job_body(replicas=3, deadline_height=12))
    h.block(submit)
    third = h.store.read(lambda t: t.get(schema.JOBS, replica_id(submit.tx_id, 2)))
    assert third["state"] == "queued" and "busy" in third["reason"]  # only two nodes
    placed = {r: h.store.read(lambda t, r=r: t.get(schema.JOBS, r))["node"]
              for r in (submit.tx_id, replica_id(submit.tx_id, 1))}
    h.block(*(h.tx(BOB if node == BOB.node_id.key else OTHER, "job.receipt",
                   receipt_body(rid, result_hash=bytes([i + 1]) * 32))
              for i, (rid, node) in enumerate(placed.items())))
    while h.chain.head().height < 12:
        h.block()
    first = h.store.read(lambda t: t.get(schema.JOBS, submit.tx_id))
    assert first["state"] == "rejected" and first["outcome"]["result_hash"] is None
    assert h.balance(ALICE) == 500 and h.balance(BOB) == 0 and h.audit().escrow == 0
    assert "replicas must be" in h.block(h.tx(ALICE, "job.submit",
                                              job_body(replicas=9, deadline_height=100)))[0]
