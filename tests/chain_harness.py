"""A mesh state machine on a real chain that tests drive block by block: one or more validators
whose blocks the test builds and commits, nodes with small plots, and cheap proof rules."""

from __future__ import annotations

import tempfile
from pathlib import Path
from random import Random
from typing import Any

import nacl.signing

from hmnode.consensus.chain import Chain, Genesis
from hmnode.consensus.messages import PRECOMMIT, CommitCertificate, sign_tx, sign_vote
from hmnode.consensus.space import Plot
from hmnode.consensus.validators import ValidatorSet
from hmnode.identity import NodeKey
from hmnode.ledger import Ledger
from hmnode.prover import NodeProver
from hmnode.registry import Beacon, NodeRegistry
from hmnode.simnet.sim.store import SimStore
from hmnode.state_machine import MeshStateMachine

rng = Random(4)
VALIDATOR, OTHER, ALICE, BOB = (NodeKey(nacl.signing.SigningKey(rng.randbytes(32)))
                                for _ in range(4))
CHAIN = "sm"


# Rules that keep proofs cheap in tests: an 8-bit proof of work, 16-label plots, the test VDF,
# a beacon every 10 blocks answered within 3.
TEST_RULES = {"work_bits": 8, "min_plot_labels": 16, "beacon_blocks": 10, "answer_blocks": 3,
              "vdf_version": 0}
OFFERER_FUNDS = 10  # what each offering node gets at genesis, and bonds when it joins


class Harness:
    """A one-validator chain whose blocks the test makes and commits."""

    def __init__(self, app_state: Any = None, epoch_blocks: int = 100,
                 validators: tuple[NodeKey, ...] = (VALIDATOR,),
                 offerers: tuple[NodeKey, ...] = ()) -> None:
        self.store = SimStore()
        self.chain = Chain(self.store, MeshStateMachine())
        self.validators = validators
        state = dict(TEST_RULES, **(app_state or {}))
        state["balances"] = dict(state.get("balances", {}),
                                 **{str(k.node_id): OFFERER_FUNDS for k in offerers})
        self.chain.init_genesis(Genesis(CHAIN, 1, ValidatorSet.of(
            (k.node_id.key, 1000) for k in validators), epoch_blocks, state))
        self.nonces: dict[bytes, int] = {}
        self._plots = tempfile.TemporaryDirectory()
        self.provers: dict[bytes, NodeProver] = {}

    def prover(self, key: NodeKey, n_labels: int = 16) -> NodeProver:
        """`key`'s node with a plot of `n_labels` (made once per harness)."""
        if key.node_id.key not in self.provers:
            plot = Plot.create(Path(self._plots.name) / key.node_id.key.hex(), key.node_id.key,
                               n_labels)
            self.provers[key.node_id.key] = NodeProver(key, plot)
        return self.provers[key.node_id.key]

    def join(self, key: NodeKey) -> None:
        """Register `key`'s node and bond its genesis funds, so that it can offer."""
        assert self.block(self.tx(key, "node.register", self.prover(key).register(CHAIN, 8)),
                          self.tx(key, "stake.bond", {"amount": OFFERER_FUNDS})) == [None, None]

    def beacon(self) -> Beacon:
        return self.store.read(lambda t: NodeRegistry(t).beacon())

    def offer(self, key: NodeKey, body: dict[str, Any], stake: int = OFFERER_FUNDS) -> Any:
        """An offer.commit from `key` with its proofs for the current beacon."""
        head = self.chain.head().height
        proofs = self.prover(key).offer_proofs(CHAIN, self.beacon().value, stake, head)
        return self.tx(key, "offer.commit", dict(body, proofs=proofs))

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
