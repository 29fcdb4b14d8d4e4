"""Who is in the mesh and whether its storage is still there: node registration (proof of
work), the beacon each period draws from the proof of time, and the space challenges it sets
every offering node.

- `node.register` carries a proof of work bound to the node and the chain, and the commitment
  of the node's plot. Registering is what admits a node; only a registered node may offer.
- Every `beacon_blocks` blocks a new period starts and its seed is fixed: a hash of the chain,
  the period and the previous block's id. Anyone may publish the period's beacon with
  `beacon.publish`: a proof of time over the seed, whose output is the beacon. Nobody can know
  the beacon before the seed plus the VDF's sequential delay, so nobody can prepare for it.
- Once a beacon is published, every node with an offer must answer it (`space.answer`: a proof
  of space for its registered plot, whose challenged labels the beacon draws) within
  `answer_blocks`. A node that misses the deadline has its offer suspended: nothing is allocated
  to it until it answers the current beacon again.
- An offer (`offer.commit`) carries a proof bundle: space (an answer to the current beacon) and
  stake (a signed claim of credits bonded, checked against the ledger).

The plot commitment is registered before the beacons it answers, so a node cannot pick its
plot after seeing the challenges (`hmnode.consensus.space`, "Grinding").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from hmnode import schema
from hmnode.consensus.bundle import DEFAULT_PARAMETERS, ProofBundle, Required, Statement, verify_bundle
from hmnode.consensus.chain import read_head
from hmnode.consensus.proof import ProofRejected, digest
from hmnode.consensus.space import DEFAULT_SPACE, PlotCommitment, SpaceProof, plot_id_for, verify_space
from hmnode.consensus.vdf import VDF_PARAMS, TimeProof, output, verify_time
from hmnode.consensus.work import WorkParams, WorkProof, verify_work
from hmnode.env import Txn
from hmnode.ledger import Ledger, LedgerRefused

BEACON_KEY = "beacon"
CHAIN_ID_KEY = "chain_id"
_TAG_SEED = b"hmnode/beacon/seed"
# What a registration's proof of work and an offer's proof of stake are bound to, besides the
# chain: a solution for one cannot be replayed as the other.
REGISTER_CONTEXT = b"register:"
OFFER_CONTEXT = b"offer:"


@dataclass(frozen=True)
class Beacon:
    """The beacon state: the current period and its seed, whether its beacon is still awaited,
    and the last published beacon (its value, period, answer deadline, and whether missed
    answers were already punished)."""

    period: int
    seed: bytes
    awaited: bool
    value: bytes
    value_period: int
    due: int
    enforced: bool

    def to_wire(self) -> list:
        return [self.period, self.seed, self.awaited, self.value, self.value_period, self.due,
                self.enforced]


def register_context(chain_id: str) -> bytes:
    """What a registration's proof of work is bound to."""
    return REGISTER_CONTEXT + chain_id.encode()


def offer_context(chain_id: str) -> bytes:
    """What an offer's proof of stake is bound to."""
    return OFFER_CONTEXT + chain_id.encode()


def seed_for(chain_id: str, period: int, previous_block: bytes) -> bytes:
    """The seed of `period`'s beacon (the proof of time's challenge)."""
    return digest(_TAG_SEED, chain_id.encode(), period.to_bytes(8, "big"), previous_block)


class BondedStake:
    """The ledger as a proof of stake's verifier sees it (`hmnode.consensus.stake.StakeLedger`).

    The chain checks a claim against the stake bonded now, when the offer is applied: stake can
    only have been unbonded or slashed since the claimed height, so this is the stricter test.
    """

    def __init__(self, ledger: Ledger, height: int) -> None:
        self._ledger = ledger
        self._height = height

    def height(self) -> int:
        return self._height

    def locked(self, node_id: bytes, height: int) -> int | None:
        return self._ledger.stake(node_id) if height <= self._height else None


@dataclass(frozen=True)
class RegistryRules:
    """The registry's part of a chain's rules (from its genesis)."""

    work_bits: int = 20
    min_plot_labels: int = 1024
    # A new beacon every this many blocks (only validators of a chain with offers spend the
    # proof of time on it), and the blocks an offering node has to answer it.
    beacon_blocks: int = 1000
    answer_blocks: int = 200
    vdf_version: int = 1


class NodeRegistry:
    """Registrations, the beacon and space challenges, through one write transaction."""

    def __init__(self, txn: Txn, rules: RegistryRules = RegistryRules()) -> None:
        self.txn = txn
        self.rules = rules
        self.work = WorkParams(1, rules.work_bits)
        self.vdf = VDF_PARAMS[rules.vdf_version]

    # --- genesis and reads --------------------------------------------------------------------

    def init(self, chain_id: str, genesis_id: bytes) -> None:
        """Period 0's beacon is known from the genesis: nobody offers before the chain starts,
        so nothing is challenged with it."""
        self.txn.put(schema.STATE, CHAIN_ID_KEY, chain_id)
        value = seed_for(chain_id, 0, genesis_id)
        self._put_beacon(Beacon(0, value, False, value, 0, 0, True))

    def chain_id(self) -> str:
        return self.txn.get(schema.STATE, CHAIN_ID_KEY, "")

    def beacon(self) -> Beacon:
        return Beacon(*self.txn.get(schema.STATE, BEACON_KEY))

    def node(self, node: bytes) -> dict | None:
        """A registered node's record: {"registered", "plot", "answered", "suspended"}."""
        return self.txn.get(schema.NODES, node)

    def plot(self, node: bytes) -> PlotCommitment | None:
        record = self.node(node)
        return None if record is None else PlotCommitment.from_wire(record["plot"])

    # --- transactions ---------------------------------------------------------------------------

    def register(self, node: bytes, body: dict, height: int) -> None:
        """Admit `node` (or change its plot): its proof of work and its plot commitment."""
        try:
            work = WorkProof.decode(_bytes(body, "work"))
            verify_work(work, "admission", node, register_context(self.chain_id()), self.work)
            plot = PlotCommitment.decode(_bytes(body, "plot"))
        except ProofRejected as exc:
            raise LedgerRefused(f"registration refused: {exc}") from None
        if plot.node_id != node or plot.version != DEFAULT_SPACE.version or \
                plot.plot_id != plot_id_for(node, plot.n_labels, DEFAULT_SPACE):
            raise LedgerRefused("registration refused: the plot commitment is not this node's "
                                f"plot under space parameter set {DEFAULT_SPACE.version}")
        if plot.n_labels < self.rules.min_plot_labels:
            raise LedgerRefused(f"registration refused: the plot has {plot.n_labels} labels; "
                                f"this chain asks for at least {self.rules.min_plot_labels}")
        record = self.node(node)
        if record is None:
            record = {"registered": height, "plot": plot.to_wire(), "answered": -1,
                      "suspended": None}
        elif record["plot"] != plot.to_wire():
            # A new plot has answered nothing yet: the offer waits for it to answer.
            record.update(plot=plot.to_wire(), answered=-1,
                          suspended="its plot changed; it has not answered the current beacon")
        else:
            raise LedgerRefused("this node is already registered with this plot")
        self.txn.put(schema.NODES, node, record)

    def publish(self, body: dict, height: int) -> None:
        """The awaited period's beacon: a proof of time over its seed."""
        beacon = self.beacon()
        if not beacon.awaited:
            raise LedgerRefused(f"the beacon of period {beacon.period} is already published")
        try:
            proof = TimeProof.decode(_bytes(body, "proof"))
            verify_time(proof, beacon.seed, self.vdf)
        except ProofRejected as exc:
            raise LedgerRefused(f"not the beacon of period {beacon.period}: {exc}") from None
        self._put_beacon(Beacon(beacon.period, beacon.seed, False, output(proof), beacon.period,
                                height + self.rules.answer_blocks, False))

    def answer(self, node: bytes, body: dict) -> None:
        """`node` answers the current beacon with a proof of space for its registered plot."""
        record = self._registered(node)
        beacon = self.beacon()
        if record["answered"] == beacon.value_period:
            raise LedgerRefused(f"this node already answered the beacon of period "
                                f"{beacon.value_period}")
        try:
            proof = SpaceProof.decode(_bytes(body, "proof"))
            verify_space(proof, node, beacon.value, DEFAULT_SPACE,
                         commitment=PlotCommitment.from_wire(record["plot"]))
        except ProofRejected as exc:
            raise LedgerRefused(f"space answer refused: {exc}") from None
        record.update(answered=beacon.value_period, suspended=None)
        self.txn.put(schema.NODES, node, record)

    def check_offer(self, node: bytes, body: dict, ledger: Ledger, height: int,
                    min_stake: int) -> None:
        """An offer's proofs: space (answering the current beacon) and stake (at least
        `min_stake` bonded); the node's record then counts the beacon as answered."""
        record = self._registered(node)
        beacon = self.beacon()
        chain_id = self.chain_id()
        try:
            bundle = ProofBundle.decode(_bytes(body, "proofs"))
            statement = Statement(node, context=offer_context(chain_id), beacon=beacon.value,
                                  plot=PlotCommitment.from_wire(record["plot"]),
                                  ledger=BondedStake(ledger, height))
            verify_bundle(bundle, statement, Required(space=True, stake=True),
                          DEFAULT_PARAMETERS)
        except ProofRejected as exc:
            raise LedgerRefused(f"offer refused: {exc}") from None
        if bundle.stake.amount < min_stake:
            raise LedgerRefused(f"offer refused: it proves {bundle.stake.amount} credits staked; "
                                f"this chain asks offers for at least {min_stake}")
        record.update(answered=beacon.value_period, suspended=None)
        self.txn.put(schema.NODES, node, record)

    # --- once per block -------------------------------------------------------------------------

    def end_block(self, height: int, offering: Callable[[], list[bytes]]) -> list[bytes]:
        """Start a new period every `beacon_blocks`, and past a beacon's deadline return the
        offering nodes that did not answer it (now suspended)."""
        beacon = self.beacon()
        if height % self.rules.beacon_blocks == 0:
            period = height // self.rules.beacon_blocks
            seed = seed_for(self.chain_id(), period, read_head(self.txn).block_id)
            beacon = Beacon(period, seed, True, beacon.value, beacon.value_period, beacon.due,
                            beacon.enforced)
            self._put_beacon(beacon)
        if beacon.enforced or height < beacon.due:
            return []
        missed = []
        for node in offering():
            record = self.node(node)
            if record is not None and record["answered"] < beacon.value_period:
                record["suspended"] = (f"it missed the space challenge of beacon period "
                                       f"{beacon.value_period} (due at height {beacon.due})")
                self.txn.put(schema.NODES, node, record)
                missed.append(node)
        self._put_beacon(Beacon(beacon.period, beacon.seed, beacon.awaited, beacon.value,
                                beacon.value_period, beacon.due, True))
        return missed

    def unavailable(self, node: bytes, ledger: Ledger, min_stake: int) -> str | None:
        """Why nothing may be allocated to `node`'s offer now, or None if it is live."""
        record = self.node(node)
        if record is None:
            return "it is not registered"
        if record["suspended"]:
            return record["suspended"]
        stake = ledger.stake(node)
        if stake < min_stake:
            return f"its stake ({stake}) is below the {min_stake} an offer needs"
        return None

    # --- helpers --------------------------------------------------------------------------------

    def _registered(self, node: bytes) -> dict:
        record = self.node(node)
        if record is None:
            raise LedgerRefused("this node is not registered: send node.register first")
        return record

    def _put_beacon(self, beacon: Beacon) -> None:
        self.txn.put(schema.STATE, BEACON_KEY, beacon.to_wire())


def _bytes(body: dict, name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, bytes):
        raise ProofRejected(f"{name} must be the encoded bytes")
    return value


