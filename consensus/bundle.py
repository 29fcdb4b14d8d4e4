"""The four proofs together: one versioned parameter set, and a bundle an advert or a
transaction carries (where: space, who: stake, what: work, when: time).

A bundle holds any subset of the four; what a statement needs is the verifier's to say
(`Required`). `verify_bundle` checks each present proof against its own statement, and that
every required one is there, so a bundle that drops a proof is refused like a forged one.
"""

from __future__ import annotations

from dataclasses import dataclass

from hmnode.consensus.proof import ProofRejected, expect_length, field, pack, unpack
from hmnode.consensus.space import DEFAULT_SPACE, PlotCommitment, SpaceParams, SpaceProof, verify_space
from hmnode.consensus.stake import DEFAULT_STAKE, StakeLedger, StakeParams, StakeProof, verify_stake
from hmnode.consensus.vdf import DEFAULT_VDF, TimeProof, VdfParams, verify_time
from hmnode.consensus.work import DEFAULT_WORK, WorkParams, WorkProof, verify_work


@dataclass(frozen=True)
class ProofParameters:
    """The parameter sets of all four proofs, versioned together."""

    version: int
    work: WorkParams
    time: VdfParams
    space: SpaceParams
    stake: StakeParams


PARAMETER_SETS: dict[int, ProofParameters] = {
    1: ProofParameters(1, DEFAULT_WORK, DEFAULT_VDF, DEFAULT_SPACE, DEFAULT_STAKE),
}
DEFAULT_PARAMETERS = PARAMETER_SETS[1]


@dataclass(frozen=True)
class Statement:
    """What a bundle must prove, as the verifier knows it."""

    node_id: bytes
    work_purpose: str = "admission"
    context: bytes = b""  # what work and stake are bound to (an epoch, an offer)
    time_challenge: bytes | None = None
    beacon: bytes | None = None  # draws the space challenges
    # The plot registered before the beacon was known: a prover who could pick its plot after
    # seeing the beacon could re-roll it until the challenges miss what it deleted.
    plot: PlotCommitment | None = None
    ledger: StakeLedger | None = None


@dataclass(frozen=True)
class Required:
    """Which of the four proofs a statement needs."""

    work: bool = False
    time: bool = False
    space: bool = False
    stake: bool = False


@dataclass(frozen=True)
class ProofBundle:
    """Up to one proof of each kind, under one parameter-set version."""

    version: int
    work: WorkProof | None = None
    time: TimeProof | None = None
    space: SpaceProof | None = None
    stake: StakeProof | None = None

    def to_wire(self) -> list:
        """The canonical wire form: a msgpack array, nil for an absent proof."""
        return ["bundle", self.version, *(None if p is None else p.to_wire()
                                          for p in (self.work, self.time, self.space, self.stake))]

    @classmethod
    def from_wire(cls, wire: list) -> "ProofBundle":
        """Parse every present proof; ProofRejected for anything malformed."""
        what = "proof bundle"
        expect_length(wire, 6, what)
        if wire[0] != "bundle":
            raise ProofRejected(f"{what}: not a proof bundle")
        version = field(wire, 1, int, what, "version")
        parts = []
        for index, kind in enumerate((WorkProof, TimeProof, SpaceProof, StakeProof), start=2):
            item = wire[index]
            if item is None:
                parts.append(None)
            elif isinstance(item, list):
                parts.append(kind.from_wire(item))
            else:
                raise ProofRejected(f"{what}: field {index} is neither a proof nor nil")
        return cls(version, *parts)

    def encode(self) -> bytes:
        """The canonical bytes."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> "ProofBundle":
        """A bundle from its bytes; ProofRejected for anything malformed."""
        return cls.from_wire(unpack(data, "proof bundle"))


def verify_bundle(bundle: ProofBundle, statement: Statement, required: Required = Required(),
                  params: ProofParameters = DEFAULT_PARAMETERS) -> None:
    """Every present proof holds for `statement` and every required one is present."""
    if bundle.version != params.version:
        raise ProofRejected(f"proof bundle made under parameter set {bundle.version}, "
                            f"not {params.version}")
    for kind in ("work", "time", "space", "stake"):
        if getattr(required, kind) and getattr(bundle, kind) is None:
            raise ProofRejected(f"proof bundle lacks the proof of {kind} this statement needs")
    if bundle.work is not None:
        verify_work(bundle.work, statement.work_purpose, statement.node_id, statement.context,
                    params.work)
    if bundle.time is not None:
        if statement.time_challenge is None:
            raise ProofRejected("a proof of time, but no challenge to check it against")
        verify_time(bundle.time, statement.time_challenge, params.time)
    if bundle.space is not None:
        if statement.beacon is None:
            raise ProofRejected("a proof of space, but no beacon to draw its challenges")
        verify_space(bundle.space, statement.node_id, statement.beacon, params.space,
                     commitment=statement.plot)
    if bundle.stake is not None:
        if statement.ledger is None:
            raise ProofRejected("a proof of stake, but no ledger to check it against")
        verify_stake(bundle.stake, statement.ledger, statement.context, params.stake,
                     node_id=statement.node_id)
