"""The mesh state machine under random transaction sequences (a hypothesis state machine):
registrations, beacons, space answers, offers, stake, jobs, receipts, cancels, slashing and
empty blocks, valid and not, from several nodes. After every block: the ledger conserves
credits, no node is given more than it shares, no job goes to an unregistered or suspended
node, and a second chain that checks and commits the same blocks has the same state root."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from chain_harness import ALICE, BOB, CHAIN, OFFERER_FUNDS, OTHER, VALIDATOR, Harness
from hmnode import schema
from hmnode.consensus.chain import Chain
from hmnode.consensus.messages import PREVOTE, Equivocation, sign_vote
from hmnode.jobs import replica_id
from hmnode.prover import publish_beacon
from hmnode.simnet.sim.store import SimStore
from hmnode.state_audit import allocation_problem, placement_problem, replica_problem
from hmnode.state_machine import MeshStateMachine

OFFERERS = (BOB, OTHER)
USERS = (ALICE, BOB, OTHER, VALIDATOR)
RULES = {"balances": {str(ALICE.node_id): 2_000}, "beacon_blocks": 6, "answer_blocks": 2,
         "unbonding_blocks": 4, "faucet_max": 500}

counts = st.integers(min_value=0, max_value=12)
job_specs = st.fixed_dictionaries({
    "cores": st.integers(min_value=1, max_value=10),
    "memory_mib": st.sampled_from([512, 512, 4096, 70_000]),
    "runtime": st.sampled_from(["wasm", "wasm", "process"]),
    "duration_s": st.integers(min_value=1, max_value=900),
    "max_price": st.integers(min_value=1, max_value=300),
    "gpu_count": st.sampled_from([0, 0, 0, 1, 2]),
    "deadline_height": st.integers(min_value=1, max_value=30),
    "replicas": st.sampled_from([1, 1, 1, 2, 3]),
})
# A malformed or hostile body for any transaction kind.
junk = st.dictionaries(st.sampled_from(["cores", "memory_mib", "runtime", "amount", "job_id",
                                        "proof", "proofs", "work", "plot", "price", "to"]),
                       st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
                       | st.text(max_size=5) | st.lists(st.integers(-9, 9), max_size=3), max_size=6)
offer_terms = {"paused": st.sampled_from(["on battery", "outside its time window"]),
               "allow": st.lists(st.sampled_from([k.node_id.key for k in USERS]), min_size=1,
                                 max_size=2)}
offer_specs = st.fixed_dictionaries({
    "cores": st.integers(min_value=0, max_value=16),
    "memory_mib": st.sampled_from([1024, 16_384, 65_536]),
    "runtimes": st.sampled_from([["wasm"], ["process"], ["wasm", "process"]]),
    "gpus": st.sampled_from([[], [["A100", 1]], [["T4", 2]]]),
    "expires_height": st.integers(min_value=1, max_value=60),
    "price": st.fixed_dictionaries({k: st.integers(min_value=0, max_value=4) for k in
                                    ("core_hour", "gib_hour", "gpu_hour", "start_fee")}),
}, optional=offer_terms)


class MeshMachine(RuleBasedStateMachine):
    """Random blocks on a one-validator chain, mirrored onto a second chain."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(RULES, offerers=OFFERERS)
        self.mirror = Chain(SimStore(), MeshStateMachine())
        self.mirror.init_genesis(self.h.chain.require_genesis())
        self.jobs: list[bytes] = []
        self.outcomes: dict[str, int] = {}

    def _block(self, *txs: Any) -> list[str | None]:
        results = self.h.block(*txs)
        block, cert = self.h.chain.block(self.h.chain.head().height)
        assert self.mirror.check_block(block, None) is None
        self.mirror.commit(block, cert)
        for why in results:
            key = "ok" if why is None else why.split(":")[0][:40]
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            if currently_in_test_context():  # `pytest --hypothesis-show-statistics` lists them
                event(f"outcome: {key}")
        return results

    def _height(self) -> int:
        return self.h.chain.head().height

    @initialize()
    def offerers_join(self) -> None:
        """Both offering nodes start registered and staked (the rules below also register
        without stake, and again)."""
        for key in OFFERERS:
            self.register(key, True)

    @rule(key=st.sampled_from(OFFERERS), bond=st.booleans())
    def register(self, key: Any, bond: bool) -> None:
        txs = [self.h.tx(key, "node.register", self.h.prover(key).register(CHAIN, 8))]
        if bond:
            txs.append(self.h.tx(key, "stake.bond", {"amount": OFFERER_FUNDS}))
        self._block(*txs)

    @rule(key=st.sampled_from(OFFERERS), spec=offer_specs, stake=st.integers(1, 11))
    def offer(self, key: Any, spec: dict, stake: int) -> None:
        spec = dict(spec, expires_height=self._height() + spec["expires_height"])
        self._block(self.h.offer(key, spec, stake=stake))

    @rule(key=st.sampled_from(OFFERERS))
    def withdraw(self, key: Any) -> None:
        self._block(self.h.tx(key, "offer.withdraw", {}))

    @rule(key=st.sampled_from(OFFERERS), stale=st.booleans())
    def answer(self, key: Any, stale: bool) -> None:
        beacon = self.h.beacon().value if not stale else b"\x01" * 32
        self._block(self.h.tx(key, "space.answer", self.h.prover(key).answer(beacon)))

    @rule(key=st.sampled_from(USERS), forged=st.booleans())
    def publish(self, key: Any, forged: bool) -> None:
        seed = self.h.beacon().seed if not forged else b"\x02" * 32
        self._block(self.h.tx(key, "beacon.publish", publish_beacon(seed, 0)))

    @rule(key=st.sampled_from((ALICE, ALICE, ALICE) + USERS), spec=job_specs)
    def submit(self, key: Any, spec: dict) -> None:
        spec = dict(spec, deadline_height=self._height() + spec["deadline_height"])
        tx = self.h.tx(key, "job.submit", spec)
        if self._block(tx) == [None]:
            self.jobs.append(tx.tx_id)

    @rule(key=st.sampled_from(USERS), kind=st.sampled_from(
        ["job.submit", "job.cancel", "job.receipt", "job.release", "offer.commit",
         "node.register",
         "space.answer", "beacon.publish", "ledger.transfer", "stake.bond", "stake.slash"]),
        body=junk)
    def malformed(self, key: Any, kind: str, body: dict) -> None:
        """Garbage (now and then valid by chance) applies or is refused with a reason; the
        invariants check what it left behind."""
        self._block(self.h.tx(key, kind, body))

    @precondition(lambda self: self.jobs)
    @rule(key=st.sampled_from(USERS), pick=st.integers(0, 1000), wall_ms=st.integers(0, 10**8),
          act=st.sampled_from(["receipt", "receipt", "cancel", "release"]))
    def finish(self, key: Any, pick: int, wall_ms: int, act: str) -> None:
        job_id = self.jobs[pick % len(self.jobs)]
        record = self.h.store.read(lambda t: t.get(schema.JOBS, job_id))
        if record.get("replicas", 1) > 1 and pick % 3 == 0:  # now and then another replica
            job_id = replica_id(job_id, 1 + pick % (record["replicas"] - 1))
        node = self.h.store.read(lambda t: t.get(schema.JOBS, job_id))["node"]
        if node is not None and pick % 2:  # usually from the node that runs it
            key = next(k for k in USERS if k.node_id.key == node)
        if act == "cancel":
            self._block(self.h.tx(key, "job.cancel", {"job_id": job_id}))
            return
        if act == "release":  # its node gives it back: it waits again
            self._block(self.h.tx(key, "job.release", {"job_id": job_id,
                                                       "reason": "paused: on battery"}))
            return
        self._block(self.h.tx(key, "job.receipt", {
            "job_id": job_id, "result_hash": b"\x07" * 32, "exit_code": 0, "wall_ms": wall_ms,
            "cpu_ms": wall_ms, "fuel": 0, "peak_memory_mib": 1}))

    @rule(key=st.sampled_from(USERS), kind=st.sampled_from(["stake.bond", "stake.unbond",
                                                             "ledger.faucet"]),
          amount=st.integers(-1, 600))
    def credits(self, key: Any, kind: str, amount: int) -> None:
        self._block(self.h.tx(key, kind, {"amount": amount}))

    @rule(source=st.sampled_from(USERS), to=st.sampled_from(USERS), amount=st.integers(1, 600))
    def transfer(self, source: Any, to: Any, amount: int) -> None:
        self._block(self.h.tx(source, "ledger.transfer", {"to": to.node_id.key,
                                                          "amount": amount}))

    @rule(offender=st.sampled_from(USERS))
    def slash(self, offender: Any) -> None:
        evidence = Equivocation(sign_vote(offender, CHAIN, PREVOTE, 3, 0, b"\x01" * 32),
                                sign_vote(offender, CHAIN, PREVOTE, 3, 0, b"\x02" * 32))
        self._block(self.h.tx(ALICE, "stake.slash", {"evidence": evidence.encode()}))

    @rule(n=st.integers(1, 4))
    def empty_blocks(self, n: int) -> None:
        for _ in range(n):
            self._block()

    @invariant()
    def credits_are_conserved(self) -> None:
        totals = self.h.audit()  # raises if any row disagrees with the running totals
        assert totals.held() == totals.minted - totals.burned

    @invariant()
    def allocations_fit_and_go_to_live_nodes(self) -> None:
        height = self._height()
        assert self.h.store.read(allocation_problem) is None
        assert self.h.store.read(lambda t: placement_problem(t, height)) is None
        assert self.h.store.read(replica_problem) is None

    @invariant()
    def the_mirror_agrees(self) -> None:
        assert self.mirror.head() == self.h.chain.head()

    def teardown(self) -> None:
        for _, record in self.h.store.read(lambda t: list(t.items(schema.JOBS))):
            if currently_in_test_context():
                event(f"a job ended {record['state']}")
        self.h._plots.cleanup()


MeshMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_random_transactions_keep_the_state_machine_invariants = MeshMachine.TestCase


def test_random_runs_reach_the_interesting_states() -> None:
    """The machine is not vacuous: a fixed run registers, offers, allocates and settles."""
    m = MeshMachine()
    m.offerers_join()
    m.offer(BOB, {"cores": 8, "memory_mib": 16_384, "runtimes": ["wasm"], "gpus": [],
                  "expires_height": 50, "price": {"core_hour": 1, "gib_hour": 0,
                                                  "gpu_hour": 0, "start_fee": 1}}, stake=5)
    m.submit(ALICE, {"cores": 2, "memory_mib": 512, "runtime": "wasm", "duration_s": 60,
                     "max_price": 10, "gpu_count": 0, "deadline_height": 20})
    m.finish(BOB, 0, wall_ms=30_000, act="receipt")
    record = m.h.store.read(lambda t: t.get(schema.JOBS, m.jobs[0]))
    assert record["state"] == "settled" and m.outcomes["ok"] >= 4
    m.credits_are_conserved()
    m.allocations_fit_and_go_to_live_nodes()
    m.the_mirror_agrees()
    m.teardown()


def test_a_paused_offer_takes_nothing_and_a_released_job_waits_again() -> None:
    m = MeshMachine()
    m.offerers_join()
    offer = {"cores": 8, "memory_mib": 16_384, "runtimes": ["wasm"], "gpus": [],
             "expires_height": 50, "price": {"core_hour": 1, "gib_hour": 0, "gpu_hour": 0,
                                             "start_fee": 1}}
    job = {"cores": 2, "memory_mib": 512, "runtime": "wasm", "duration_s": 60, "max_price": 10,
           "gpu_count": 0, "deadline_height": 40}

    def record(i: int) -> dict:
        return m.h.store.read(lambda t: t.get(schema.JOBS, m.jobs[i]))
    m.offer(BOB, dict(offer, paused="on battery"), stake=5)
    m.submit(ALICE, job)
    assert record(0)["state"] == "queued"
    assert "held back: node" in record(0)["reason"] and "paused sharing: on battery" in \
        record(0)["reason"]
    m.offer(BOB, offer, stake=5)  # resumed: the job is placed at the end of that block
    assert record(0)["state"] == "allocated"
    # Given back (paused past its grace): queued again in its old place, then placed again.
    m.finish(BOB, 0, wall_ms=0, act="release")
    assert [s for s, _ in record(0)["history"]] == ["queued", "allocated", "released",
                                                      "allocated"]
    assert record(0)["released"].endswith("paused: on battery")
    # An offer for one submitter only: another's job waits, and says why.
    m.offer(BOB, dict(offer, allow=[OTHER.node_id.key]), stake=5)
    m.submit(ALICE, job)
    assert record(1)["state"] == "queued"
    assert "take only the jobs of submitters they allow" in record(1)["reason"]
    m.credits_are_conserved()
    m.allocations_fit_and_go_to_live_nodes()
    m.the_mirror_agrees()
    m.teardown()
