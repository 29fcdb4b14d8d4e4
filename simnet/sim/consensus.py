"""The `consensus` and `consensus-byzantine` scenarios: validators and a follower running the
real `ChainNode` (Tendermint engine, mempool, block sync, chain execution over a simulated
store) while clients submit transactions, under faults the seed picks; then checkers.

Faults (from the gossip scenario's `FaultPlan`, over the honest validators): loss, duplication,
corruption and reordering, a partition, a crash and restart from what the node had synced, a
pause, a thin uplink, and small clock offsets and drift. `consensus-byzantine` adds f = (n-1)//3
Byzantine validators (f=1 of 4, f=2 of 7) whose engine is honest but whose every outgoing
consensus message passes through a nemesis: proposals equivocate (a second block to half the
validators), votes equivocate (another block, or nil, to the other half), old messages are
replayed, signatures are spoiled, messages are withheld, and forged transactions are sent.

Checkers:
- agreement: no two honest validators commit different blocks at one height;
- validity: every committed transaction is signed by its sender, every client transaction in
  a block is one a client submitted, and every certificate verifies against the validator set;
- durability: a restarted validator still holds every block it had reported committed;
- liveness: after the heal, every honest validator and follower commits new blocks and reaches
  the same head, and every client transaction commits (clients send to validators and
  followers alike, and re-send what a crashed node's mempool lost);
- conservation: every honest node's ledger adds up (balances + stake + unbonding + escrow =
  minted - burned), row by row;
- allocation: no offer is given more than it shares, its books agree with its jobs, and every
  allocated job fits its offer's runtimes and its own price (clients submit jobs, honest
  validators offer);
- proofs: every validator registers (proof of work), offers (proofs of space and stake),
  publishes the beacon a period awaits and answers its space challenges through its
  `ProofKeeper`, as a running node does; no job is allocated to a node that is unregistered or
  suspended in the state that allocated it; beacons keep being published; and after the heal
  every honest offering validator is in good standing again;
- no_honest_equivocation: no evidence ever names an honest validator;
- no_crash: no core raised (invariant checks included) on any input, and no node sent a
  message the wire refuses.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from random import Random
from pathlib import Path
from typing import Any

import nacl.signing

from hmnode import schema
from hmnode.chain_node import ChainConfig, ChainNode
from hmnode.consensus.chain import Chain, ChainError, Genesis, Head
from hmnode.consensus.mempool import TxRefused
from hmnode.consensus.messages import (NIL, Block, CommitCertificate, Equivocation,
                                       MessageRejected, Proposal, Transaction, Vote, sign_proposal,
                                       sign_tx, sign_vote, verify_tx)
from hmnode.consensus.tendermint import Timeouts
from hmnode.consensus.validators import ValidatorSet
from hmnode.env import Env
from hmnode.identity import NodeId, NodeKey
from hmnode.ledger import Ledger, LedgerBroken
from hmnode.proof_keeper import ProofKeeper
from hmnode.registry import NodeRegistry
from hmnode.state_audit import allocation_problem, placement_problem, suspended_nodes
from hmnode.state_machine import MeshStateMachine

from .clock import NodeClock, VirtualClock
from .gossip import CALM, FaultPlan, Result, schedule_faults
from .network import SimNetwork, SimProcess
from .store import SimStore

CHECKERS = ("agreement", "validity", "durability", "liveness", "conservation", "allocation",
            "proofs", "no_honest_equivocation", "no_crash")
SCENARIOS = ("consensus", "consensus-byzantine")
CHAIN_ID = "sim"
MAX_CLOCK_OFFSET_S = 2.0  # well inside what block times tolerate (chain.MAX_FUTURE_MS)
MAX_CLOCK_DRIFT = 500e-6
CLIENTS = 4
CLIENT_CREDITS = 1_000_000
RESUBMIT_S = 3.0
# The registry's rules in the simulator: cheap proofs (the test VDF, 8-bit work, 16-label plots)
# and a beacon every 40 blocks, so that a run of a minute sees a few periods and their deadlines.
SIM_RULES = {"work_bits": 8, "min_plot_labels": 16, "beacon_blocks": 40, "answer_blocks": 4,
             "vdf_version": 0}
TEND_S = 1.0  # how often a node's ProofKeeper looks at the chain
PROOF_RETRY_S = 4.0
OFFER = {"cores": 16, "memory_mib": 32_768, "runtimes": ["wasm"], "expires_height": 1_000_000}


@dataclass(frozen=True)
class ChainSimSettings:
    """How the scenario runs."""

    faults: bool = True
    byzantine: int | None = None  # None: (n-1)//3 in consensus-byzantine, 0 otherwise
    load_every_s: float = 0.7  # a client submits a few transactions this often
    quiet_s: float = 30.0  # the last part of the run, after the heal
    timeouts: Timeouts = Timeouts(propose_s=0.6, propose_delta_s=0.3, prevote_s=0.3,
                                  prevote_delta_s=0.15, precommit_s=0.3, precommit_delta_s=0.15,
                                  resend_s=0.5)
    epoch_blocks: int = 20
    power_change: bool = True  # an honest validator changes its power mid-run
    followers: int = 1  # nodes that follow the chain without validating


class _SimNode(SimProcess):
    """One simulated node process (a validator, or a follower) over a disk that survives its
    crashes as far as it synced."""

    def __init__(self, sim: "ConsensusSim", index: int, key: NodeKey, byzantine: bool,
                 name: str) -> None:
        self.sim = sim
        self.index = index
        self.name = name
        self.key = key
        self.id = key.node_id
        self.byzantine = byzantine
        self.disk = SimStore(sync_on_commit=False)
        self.clock_offset = 0.0
        self.clock_drift = 0.0
        self.life = 0
        self.up = False
        self.node: ChainNode
        self.reported_height = 0  # the highest block it said it committed
        self.seen: list[tuple[str, bytes]] = []  # messages the nemesis may replay

    def boot(self) -> None:
        sim = self.sim
        self.life += 1
        self.up = True
        clock = NodeClock(sim.clock, self.clock_offset, self.clock_drift, self._wrap)
        env = Env(clock, sim.rng, self, self.disk)
        chain = Chain(self.disk, MeshStateMachine())
        chain.init_genesis(sim.genesis)
        if chain.head().height < self.reported_height:
            sim.problem("durability", f"{self.name} restarted at height {chain.head().height} "
                                      f"after reporting {self.reported_height} committed")
        self.node = ChainNode(self.key, env, chain, sim.config, observer=self)
        self.keeper = ProofKeeper(self.key, chain, sim.plots, retry_s=PROOF_RETRY_S)
        if self.life == 1:
            sim.net.attach(self.id, self.name, self._on_frame, self._on_unreachable)
        else:
            sim.net.restart(self.id, self._on_frame, self._on_unreachable)
        self._guard(self.node.start)

    def crash(self) -> None:
        self.up = False
        self.node.stop()
        self.disk.crash()
        self.sim.net.crash(self.id)

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - any exception from a core is the finding
            self.sim.core_error(self, exc)

    def _on_frame(self, src: Hashable, topic: str, body: Any) -> None:
        assert isinstance(src, NodeId)
        if self.byzantine and topic == "chain.consensus":
            self.seen.extend((k, raw) for k, raw in body.get("msgs", [])[:8]
                             if isinstance(raw, bytes))
            del self.seen[:-64]
        self._guard(lambda: self.node.receive(src, topic, body))

    def _on_unreachable(self, dst: Hashable) -> None:
        return None

    # --- hmnode.env.Network ---------------------------------------------------------------------

    def send(self, dst: NodeId, addr: str | None, topic: str, body: dict[str, Any]) -> None:
        if self.byzantine and topic == "chain.consensus":
            body = self.sim.nemesis(self, dst, body)
            if body is None:
                return
        self.sim.net.send(self.id, dst, topic, body)

    def disconnect(self, dst: NodeId, reason: str) -> None:
        return None

    def misbehaved(self, peer: NodeId, reason: str) -> None:
        self.sim.count("misbehaviour_noted")

    # --- ChainObserver --------------------------------------------------------------------------

    def block_committed(self, block: Block, cert: CommitCertificate, head: Head,
                        now: float) -> None:
        self.reported_height = max(self.reported_height, head.height)
        if not self.byzantine:
            self.sim.committed(self, block, cert)


class ConsensusSim:
    """One run of a consensus scenario."""

    def __init__(self, scenario: str, nodes: int, seed: int, duration: float,
                 settings: ChainSimSettings = ChainSimSettings()) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        if nodes < 1:
            raise ValueError("a consensus scenario needs at least 1 validator")
        self.scenario = scenario
        self.n = nodes
        self.seed = seed
        self.duration = duration
        self.settings = settings
        self.rng = Random(seed)
        self.clock = VirtualClock()
        self.net = SimNetwork(self.clock, self.rng, CALM)
        byz = settings.byzantine if settings.byzantine is not None else (
            (nodes - 1) // 3 if scenario == "consensus-byzantine" else 0)
        keys = [NodeKey(nacl.signing.SigningKey(self.rng.randbytes(32))) for _ in range(nodes)]
        # The Byzantine validators are the last ones; faults strike the honest ones.
        self.validators = [_SimNode(self, i, k, byzantine=i >= nodes - byz, name=f"v{i}")
                           for i, k in enumerate(keys)]
        self.honest = [v for v in self.validators if not v.byzantine]
        # Followers hold no stake: they take blocks by sync and check their certificates.
        self.followers = [_SimNode(self, nodes + j, NodeKey(nacl.signing.SigningKey(
            self.rng.randbytes(32))), byzantine=False, name=f"f{j}")
            for j in range(settings.followers)]
        self.by_id = {v.id: v for v in self.validators + self.followers}
        self.clients = [NodeKey(nacl.signing.SigningKey(self.rng.randbytes(32)))
                        for _ in range(CLIENTS)]
        balances = {str(c.node_id): CLIENT_CREDITS for c in self.clients}
        balances[str(keys[0].node_id)] = 1_000
        self.genesis = Genesis(CHAIN_ID, 1_700_000_000_000,
                               ValidatorSet.of((k.node_id.key, 100) for k in keys),
                               settings.epoch_blocks, dict(SIM_RULES, balances=balances))
        self.plots = Path(tempfile.mkdtemp(prefix="hmnode-sim-plots-"))
        self.config = ChainConfig(timeouts=settings.timeouts, empty_block_s=5.0,
                                  sync_poll_s=1.0)
        self._nonces = [0] * CLIENTS
        self.submitted: set[bytes] = set()
        self.pending: dict[bytes, Transaction] = {}  # submitted, not yet seen committed
        self.commits: dict[int, tuple[bytes, str]] = {}  # height -> (block id, first committer)
        self.counters: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        self.start_at = 1.0
        self.heal_at = max(self.start_at + 2.0, duration - settings.quiet_s)
        self.plan = (FaultPlan.pick(self.rng, len(self.honest), self.start_at + 2.0, self.heal_at)
                     if settings.faults else FaultPlan())
        if self.plan.clocks:
            spread = self.rng.uniform(0.0, MAX_CLOCK_OFFSET_S)
            self.plan = replace(self.plan, clocks=tuple(
                (self.rng.uniform(-spread, spread),
                 self.rng.uniform(-MAX_CLOCK_DRIFT, MAX_CLOCK_DRIFT)) for _ in self.honest))
        for v, (offset, drift) in zip(self.honest, self.plan.clocks):
            v.clock_offset, v.clock_drift = offset, drift
        self.height_at_heal: int | None = None
        honest_keys = sorted(v.id.key for v in self.honest)
        self._second_half = set(honest_keys[len(honest_keys) // 2:])
        self._alternatives: dict[tuple[int, int], Block] = {}

    # --- events ---------------------------------------------------------------------------------

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def problem(self, checker: str, text: str) -> None:
        self.problems.setdefault(checker, f"t={self.clock.now:.3f}: {text}")

    def core_error(self, v: _SimNode, exc: BaseException) -> None:
        self.count("core_exceptions")
        if isinstance(exc, ChainError) and v.byzantine:
            return
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.problem("no_crash", f"{v.name}: {type(exc).__name__}: {exc} "
                                 f"({where.filename.rsplit('/', 1)[-1]}:{where.lineno})")

    def committed(self, v: _SimNode, block: Block, cert: CommitCertificate) -> None:
        held = self.commits.get(block.height)
        if held is None:
            self.commits[block.height] = (block.block_id, v.name)
            self._check_block(v, block, cert)
            why, suspended = v.disk.read(lambda tx: (placement_problem(tx, block.height),
                                                      suspended_nodes(tx)))
            if why:
                self.problem("proofs", f"{v.name}: {why}")
            self.counters["suspended_node_blocks"] = \
                self.counters.get("suspended_node_blocks", 0) + suspended
        elif held[0] != block.block_id:
            self.problem("agreement", f"height {block.height}: {v.name} committed "
                                      f"{block.block_id.hex()[:12]}, {held[1]} committed "
                                      f"{held[0].hex()[:12]}")

    def _check_block(self, v: _SimNode, block: Block, cert: CommitCertificate) -> None:
        clients = {c.node_id.key for c in self.clients}
        for tx in block.txs:
            try:
                verify_tx(tx, CHAIN_ID)
            except MessageRejected as exc:
                self.problem("validity", f"block {block.height} holds a forged transaction: {exc}")
            if tx.sender in clients and tx.tx_id not in self.submitted:
                self.problem("validity", f"block {block.height} holds a client transaction "
                                         "no client submitted")
        try:
            v.node.chain.validators_at(block.height).check_certificate(
                cert, CHAIN_ID, block.height, block.block_id)
        except MessageRejected as exc:
            self.problem("validity", f"block {block.height}: {exc}")

    # --- the nemesis ------------------------------------------------------------------------------

    def nemesis(self, v: _SimNode, dst: NodeId, body: dict[str, Any]) -> dict[str, Any] | None:
        """What a Byzantine validator sends `dst` instead of its honest messages."""
        rng = self.rng
        if rng.random() < 0.15:
            self.count("nemesis_withheld")
            return None
        # The Byzantine validators act together: half the honest validators (by id) get one
        # story, the other half another.
        second_half = dst.key in self._second_half
        out = []
        for kind, raw in body["msgs"]:
            try:
                msg = Proposal.decode(raw) if kind == "p" else Vote.decode(raw)
            except MessageRejected:
                continue
            if second_half and rng.random() < 0.7:
                msg = self._equivocate(v, msg)
            if rng.random() < 0.1:
                self.count("nemesis_bad_signature")
                msg = replace(msg, signature=bytes(64))
            out.append(["p" if isinstance(msg, Proposal) else "v", msg.encode()])
        if v.seen and rng.random() < 0.3:
            self.count("nemesis_replayed")
            out.extend(rng.sample(v.seen, min(3, len(v.seen))))
        if rng.random() < 0.05:
            self.count("nemesis_forged_tx")
            forged = replace(sign_tx(v.key, CHAIN_ID, 1, "kv.put", {"key": "x", "value": b"y"}),
                             sender=self.clients[0].node_id.key)
            self.net.send(v.id, dst, "chain.txs", {"txs": [forged.encode()]})
        return {"msgs": out}

    def _equivocate(self, v: _SimNode, msg: Proposal | Vote) -> Proposal | Vote:
        if isinstance(msg, Proposal):
            h = msg.block.header
            if self.rng.random() < 0.2:
                # A block whose state root its transactions do not produce.
                other = Block(replace(h, state_root=self.rng.randbytes(32)), msg.block.txs)
                self.count("nemesis_invalid_proposal")
            else:
                # Another block, as valid as the first (the key-value state ignores times);
                # the same one to every validator of the second half.
                other = self._alternatives.get((msg.height, msg.round))
                if other is None:
                    other = Block(replace(h, time_ms=h.time_ms + 1 + self.rng.randrange(1000)),
                                  msg.block.txs)
                    self._alternatives[(msg.height, msg.round)] = other
                self.count("nemesis_equivocal_proposal")
            return sign_proposal(v.key, msg.height, msg.round, msg.valid_round, other)
        self.count("nemesis_equivocal_vote")
        alternative = self._alternatives.get((msg.height, msg.round))
        if alternative is not None and alternative.block_id != msg.block_id:
            other_id = alternative.block_id  # vote for the block the second half was shown
        else:
            other_id = NIL if msg.block_id != NIL else self.rng.randbytes(32)
        return sign_vote(v.key, CHAIN_ID, msg.kind, msg.height, msg.round, other_id)

    # --- load and faults ----------------------------------------------------------------------------

    def _load(self) -> None:
        if self.clock.now < self.duration - 3.0:
            i = self.rng.randrange(CLIENTS)
            target = self.rng.choice([v for v in self.honest + self.followers if v.up]
                                     or self.honest)
            for _ in range(self.rng.randint(1, 4)):
                self._nonces[i] += 1
                kind, body = self._client_tx()
                tx = sign_tx(self.clients[i], CHAIN_ID, self._nonces[i], kind, body)
                self.submitted.add(tx.tx_id)
                self.pending[tx.tx_id] = tx
                self._submit(target, tx)
        self.clock.call_later(self.settings.load_every_s * self.rng.uniform(0.5, 1.5), self._load)

    def _client_tx(self) -> tuple[str, dict[str, Any]]:
        """A key-value write, or now and then a job for the offers to take."""
        rng = self.rng
        if rng.random() < 0.3:
            height = max(v.node.head.height for v in self.honest if v.up) if any(
                v.up for v in self.honest) else 0
            return "job.submit", {
                "cores": rng.randint(1, 8), "memory_mib": rng.choice([512, 2048, 8192]),
                "runtime": rng.choice(["wasm", "wasm", "process"]),
                "duration_s": rng.randint(60, 7200), "max_price": rng.randint(5, 400),
                "gpu_count": rng.choice([0, 0, 0, 1]), "deadline_height": height + rng.randint(3, 60)}
        return "kv.put", {"key": f"k{rng.randrange(50)}", "value": rng.randbytes(8)}

    def _tend(self, v: _SimNode) -> None:
        """What a running node's ProofKeeper does, inline: register, offer (honest validators:
        one with GPUs), publish awaited beacons and answer space challenges."""
        if v.up:
            v._guard(lambda: self._prove(v))
        self.clock.call_later(TEND_S, lambda: self._tend(v))

    def _prove(self, v: _SimNode) -> None:
        tasks = v.keeper.due(self.clock.now)
        if not v.byzantine:
            price = {"core_hour": 1 + v.index * 3, "gib_hour": 1, "gpu_hour": 50, "start_fee": 2}
            body = dict(OFFER, price=price, gpus=[["A100", 2]] if v is self.honest[0] else [])
            step = v.keeper.keep_offer(body, self.clock.now)
            tasks += [step] if step is not None else []
        for task in tasks:
            self.count(f"proof_{task.kind}")
            v.node.sign_and_submit(task.kind, task.make())

    def _submit(self, target: _SimNode, tx: Transaction) -> None:
        def submit() -> None:
            try:
                target.node.submit(tx)
            except TxRefused:
                self.count("client_tx_refused")
        if target.up:
            target._guard(submit)

    def _resubmit(self) -> None:
        """As a wallet does: a transaction not committed after a while is sent again (a node
        that crashed lost its mempool)."""
        live = [v for v in self.honest if v.up]
        if live:
            probe = max(live, key=lambda v: v.node.head.height)
            for tid in [t for t in self.pending if probe.node.chain.tx_result(t) is not None]:
                del self.pending[tid]
            for tx in list(self.pending.values())[:200]:
                self.count("client_resubmitted")
                self._submit(self.rng.choice(live), tx)
        self.clock.call_later(RESUBMIT_S, self._resubmit)

    def _change_power(self) -> None:
        """The first honest validator doubles its stake; its power follows from the next
        epoch."""
        v = self.honest[0]
        if v.up:
            v._guard(lambda: v.node.sign_and_submit("stake.bond", {"amount": 100}))

    def _schedule_faults(self) -> None:
        schedule_faults(self.plan, self.clock, self.net, self.honest,
                        [v.id for v in self.validators], self.start_at + 2.0, self.heal_at,
                        restart=lambda v: v.boot())
        self.clock.call_at(self.heal_at, self._note_heal)

    def _note_heal(self) -> None:
        for v in self.honest:
            if not v.up:
                v.boot()  # a crash that outlived the faulty phase ends with it
        self.height_at_heal = max(v.node.head.height for v in self.honest)

    # --- run and verdicts ---------------------------------------------------------------------------

    def run(self) -> Result:
        # The nemesis makes every honest node log each equivocation it catches: that is the
        # point of the run, not news; errors still show.
        chain_log = logging.getLogger("hmnode.chain_node")
        level = chain_log.level
        chain_log.setLevel(logging.ERROR)
        try:
            self.start()
            self.clock.run_until(self.duration)
            return self.result()
        finally:
            chain_log.setLevel(level)
            shutil.rmtree(self.plots, ignore_errors=True)

    def start(self) -> None:
        """Schedule the boots, the load and the faults."""
        for v in self.validators + self.followers:
            self.clock.call_at(self.start_at * self.rng.random(), v.boot)
        self.clock.call_at(self.start_at, self._load)
        self.clock.call_at(self.start_at + RESUBMIT_S, self._resubmit)
        for v in self.validators:
            self.clock.call_at(self.start_at + 0.5 + self.rng.random(), lambda v=v: self._tend(v))
        if self.settings.power_change:
            self.clock.call_at(self.start_at + 3.0, self._change_power)
        self._schedule_faults()

    def result(self) -> Result:
        verdicts: dict[str, bool | str] = {}
        live = [v for v in self.honest + self.followers if v.up]
        heights = {v.name: v.node.head.height for v in live}
        top = max(heights.values(), default=0)
        if self.height_at_heal is not None and top <= self.height_at_heal:
            self.problem("liveness", f"no block committed in the {self.settings.quiet_s:g}s "
                                     f"after the heal (height {top})")
        lost = [t for t in self.pending if all(v.node.chain.tx_result(t) is None for v in live)]
        if lost and live:
            self.problem("liveness", f"{len(lost)} client transactions never committed")
        behind = {n: h for n, h in heights.items() if h != top}
        if behind:
            self.problem("liveness", f"honest nodes did not reach the head {top}: {behind}")
        for v in live:
            for raw in _evidence(v):
                ev = Equivocation.decode(raw)
                if ev.first.validator in {h.id.key for h in self.honest}:
                    self.problem("no_honest_equivocation",
                                 f"{v.name} holds evidence against honest "
                                 f"{self.by_id[NodeId(ev.first.validator)].name}")
        for v in live:
            try:
                totals = v.disk.read(lambda tx: Ledger(tx).audit())
            except LedgerBroken as exc:
                self.problem("conservation", f"{v.name}: {exc}")
                continue
            if totals.held() != totals.minted - totals.burned:
                self.problem("conservation", f"{v.name}: {totals}")
        for v in live:
            why = v.disk.read(allocation_problem)
            if why:
                self.problem("allocation", f"{v.name}: {why}")
        if live:
            why = live[0].disk.read(lambda tx: _standing_problem(
                tx, [v for v in self.honest if v.up]))
            if why:
                self.problem("proofs", f"{live[0].name}: {why}")
        refused = self.net.counters.get("refused", 0)
        if refused:
            self.problem("no_crash", f"nodes sent {refused} messages the wire refuses "
                                     "(too large or malformed)")
        for name in CHECKERS:
            verdicts[name] = self.problems.get(name, True)
        ok = all(v is True for v in verdicts.values())
        stats = {
            "plan": self.plan.describe(),
            "byzantine": len(self.validators) - len(self.honest),
            "followers": len(self.followers),
            "heal_at": round(self.heal_at, 3),
            "height": top,
            "height_at_heal": self.height_at_heal,
            "transactions_submitted": len(self.submitted),
            "transactions_committed": sum(_committed_txs(v) for v in live[:1]),
            "events": self.clock.events_run,
            "network": dict(sorted(self.net.counters.items())),
            "driver": dict(sorted(self.counters.items())),
            "evidence": max((len(_evidence(v)) for v in live), default=0),
            "jobs": _job_states(live[0]) if live else {},
        }
        return Result(self.scenario, self.n, self.seed, self.duration, self.net.trace_hash(), ok,
                      verdicts, stats)


def _standing_problem(tx: Any, honest: list[_SimNode]) -> str | None:
    """After the heal: beacons are published, and every honest validator that is up is
    registered, offering and not suspended."""
    registry = NodeRegistry(tx)
    beacon = registry.beacon()
    # A period's beacon may lag (its designated publisher may be Byzantine, and the others wait
    # before they back it up); by the second period, one must have come.
    if beacon.period >= 2 and beacon.value_period < 1:
        return f"period {beacon.period} has started and no beacon was ever published"
    for v in honest:
        record = registry.node(v.id.key)
        if record is None or tx.get(schema.OFFERS, v.id.key) is None:
            return f"{v.name} is not registered and offering at the end"
        if record["suspended"]:
            return f"{v.name} is still suspended at the end: {record['suspended']}"
    return None


def _job_states(v: _SimNode) -> dict[str, int]:
    """How many jobs on the node's chain are in each state."""
    def read(tx: Any) -> dict[str, int]:
        states: dict[str, int] = {}
        for _, record in tx.items(schema.JOBS):
            states[record["state"]] = states.get(record["state"], 0) + 1
        return dict(sorted(states.items()))
    return v.disk.read(read)


def _evidence(v: _SimNode) -> list[bytes]:
    return v.disk.read(lambda tx: [raw for _, raw in tx.items(schema.EVIDENCE)])


def _committed_txs(v: _SimNode) -> int:
    return v.disk.read(lambda tx: tx.count(schema.TX_RESULTS))


def run(scenario: str, nodes: int, seed: int, duration: float = 90.0,
        settings: ChainSimSettings = ChainSimSettings()) -> Result:
    """Run a consensus scenario; the seed fixes every key, fault and choice."""
    return ConsensusSim(scenario, nodes, seed, duration, settings).run()
