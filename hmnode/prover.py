"""The bodies of the transactions by which a node proves itself to the chain: its registration
(proof of work and plot commitment), its offer's proofs (space and stake), its answers to space
challenges, and a period's beacon (proof of time). `hmnode.registry` checks what this makes."""

from __future__ import annotations

from dataclasses import dataclass

from hmnode.consensus.bundle import DEFAULT_PARAMETERS, ProofBundle
from hmnode.consensus.space import Plot
from hmnode.consensus.stake import prove_stake
from hmnode.consensus.vdf import VDF_PARAMS, prove_time
from hmnode.consensus.work import WorkParams, prove_work
from hmnode.identity import NodeKey
from hmnode.registry import offer_context, register_context


@dataclass(frozen=True)
class NodeProver:
    """A node's key and its finished plot, making the proofs its transactions carry."""

    key: NodeKey
    plot: Plot

    def register(self, chain_id: str, work_bits: int) -> dict:
        """A `node.register` body: work bound to this node and chain, and the plot commitment
        (solving the work takes about 2**work_bits hashes)."""
        work = prove_work("admission", self.key.node_id.key, register_context(chain_id),
                          WorkParams(1, work_bits))
        return {"work": work.encode(), "plot": self.plot.commitment().encode()}

    def offer_proofs(self, chain_id: str, beacon: bytes, stake: int, height: int) -> bytes:
        """An offer's "proofs": space answering `beacon`, and `stake` credits bonded as of
        `height` (a recent committed height)."""
        return ProofBundle(DEFAULT_PARAMETERS.version, space=self.plot.prove(beacon),
                           stake=prove_stake(self.key, stake, height,
                                             offer_context(chain_id))).encode()

    def answer(self, beacon: bytes) -> dict:
        """A `space.answer` body for `beacon`."""
        return {"proof": self.plot.prove(beacon).encode()}


def publish_beacon(seed: bytes, vdf_version: int) -> dict:
    """A `beacon.publish` body: the proof of time over `seed` (sequential: about a second at
    the default parameters)."""
    return {"proof": prove_time(seed, VDF_PARAMS[vdf_version]).encode()}
