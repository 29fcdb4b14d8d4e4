"""Keeps this node in good standing with the chain's registry: registered with its plot,
answering every beacon's space challenge while it offers, and (as a validator) publishing the
beacon a period awaits. Sans-IO: `due(now)` says which proofs to make; whoever drives it makes
them (the slow ones, work and time, off the event loop), submits them, and reports back.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmnode import schema
from hmnode.consensus.chain import Chain
from hmnode.consensus.space import DEFAULT_SPACE, Plot, plot_directory, plot_id_for
from hmnode.errors import HmnodeError
from hmnode.identity import NodeKey
from hmnode.ledger import Ledger
from hmnode.prover import NodeProver, publish_beacon
from hmnode.registry import Beacon, NodeRegistry
from hmnode.state_machine import MeshStateMachine, StateParams

# A task that was submitted but whose effect has not shown in the committed state is tried
# again after this long (its transaction may have been refused or lost with a mempool).
RETRY_S = 30.0
# A validator other than the period's designated publisher waits this long before it
# publishes the beacon itself: one VDF per period, unless the designated one is down.
BACKUP_PUBLISH_S = 20.0


@dataclass(frozen=True)
class ProofTask:
    """One proof to make and submit: the transaction kind and a function that makes its body
    (seconds of CPU for work or time)."""

    key: tuple[str, int]
    kind: str
    make: Callable[[], dict]


@dataclass(frozen=True)
class Standing:
    """This node as the committed state sees it."""

    params: StateParams
    beacon: Beacon
    registered: dict | None
    offering: bool
    offer_expires: int  # the height its offer expires at (0 without one)
    offers: int  # offers on the chain: without any, no beacon is worth its proof of time
    stake: int
    validators: tuple[bytes, ...]


class OfferNotReady(HmnodeError):
    """This node cannot make an offer yet (not registered, or not enough stake)."""


class ProofKeeper:
    """What this node must prove next, from the committed state of `chain`."""

    def __init__(self, key: NodeKey, chain: Chain, data_dir: Path,
                 retry_s: float = RETRY_S) -> None:
        self.key = key
        self.chain = chain
        self.data_dir = data_dir
        self.retry_s = retry_s
        self._plot: Plot | None = None
        # The offer path and the keeper's own loop may both want the plot at once.
        self._plot_lock = threading.Lock()
        self._tried: dict[tuple[str, int], float] = {}  # task key -> when it was last handed out
        self._awaited_since: dict[int, float] = {}

    # --- the committed state --------------------------------------------------------------------

    def standing(self) -> Standing:
        """Read what the chain says about this node, in one read transaction."""
        me = self.key.node_id.key
        validators = tuple(k for k, _ in self.chain.validators_at(
            self.chain.head().height + 1).members)

        def read(txn: Any) -> Standing:
            registry = NodeRegistry(txn)
            offer = txn.get(schema.OFFERS, me)
            return Standing(MeshStateMachine().params(txn), registry.beacon(), registry.node(me),
                            offer is not None, 0 if offer is None else offer["offer"][4],
                            txn.count(schema.OFFERS), Ledger(txn).stake(me), validators)
        return self.chain.storage.read(read)

    # --- the plot -------------------------------------------------------------------------------

    def plot(self, min_labels: int) -> Plot:
        """This node's plot: the one it registered, else the largest finished one in the data
        dir with at least `min_labels`, else a new one of `min_labels` (plotted here)."""
        with self._plot_lock:
            return self._find_or_make_plot(min_labels)

    def _find_or_make_plot(self, min_labels: int) -> Plot:
        if self._plot is not None and self._plot.n_labels >= min_labels:
            return self._plot
        me = self.key.node_id.key
        best: Plot | None = None
        root = self.data_dir / "plots"
        for directory in sorted(root.iterdir()) if root.is_dir() else ():
            try:
                found = Plot.open(directory)
            except Exception:  # an unfinished or damaged plot is not used; `hmnode plot` says why
                continue
            if found.node_id == me and found.root is not None and found.n_labels >= min_labels \
                    and (best is None or found.n_labels > best.n_labels):
                best = found
        if best is None:
            directory = plot_directory(self.data_dir, plot_id_for(me, min_labels, DEFAULT_SPACE))
            best = Plot.create(directory, me, min_labels, DEFAULT_SPACE)
        self._plot = best
        return best

    def prover(self, standing: Standing) -> NodeProver:
        return NodeProver(self.key, self.plot(standing.params.min_plot_labels))

    # --- what to do next ------------------------------------------------------------------------

    def due(self, now: float) -> list[ProofTask]:
        """The proofs this node should make now. Each is handed out again only after
        `retry_s`, so a driver may call this on every commit."""
        standing = self.standing()
        tasks = []
        beacon, params = standing.beacon, standing.params
        me = self.key.node_id.key
        if beacon.awaited and standing.offers and me in standing.validators:
            since = self._awaited_since.setdefault(beacon.period, now)
            designated = standing.validators[beacon.period % len(standing.validators)]
            if designated == me or now - since >= BACKUP_PUBLISH_S:
                tasks.append(ProofTask(("beacon", beacon.period), "beacon.publish",
                                       lambda: publish_beacon(beacon.seed, params.vdf_version)))
        record = standing.registered
        if standing.offering and record is not None and \
                record["answered"] < beacon.value_period:
            tasks.append(ProofTask(("answer", beacon.value_period), "space.answer",
                                   lambda: self.prover(standing).answer(beacon.value)))
        return [t for t in tasks if self._hand_out(t.key, now)]

    def registration(self, standing: Standing | None = None) -> ProofTask | None:
        """The registration this node needs before it may offer (None: it has it)."""
        standing = standing or self.standing()
        if standing.registered is not None:
            return None
        chain_id = self.chain.chain_id
        work_bits = standing.params.work_bits
        return ProofTask(("register", 0), "node.register",
                         lambda: self.prover(standing).register(chain_id, work_bits))

    def keep_offer(self, body: dict, now: float, renew: bool = False,
                   standing: Standing | None = None) -> ProofTask | None:
        """The next step towards this node offering `body`: its registration, then the offer
        itself; None once it offers (unless `renew`), or while the step handed out last is
        still young. `standing`: one the caller has just read."""
        standing = standing or self.standing()
        if standing.offering and not renew:
            return None
        height = self.chain.head().height
        # Keyed by what the offer says, so that a changed offer (a pause) goes out at once
        # while the same one is retried only every `retry_s`.
        terms = {k: v for k, v in body.items() if k != "expires_height"}
        version = int.from_bytes(hashlib.sha256(repr(sorted(terms.items())).encode()).digest()[:4],
                                 "big")
        task = self.registration(standing) or ProofTask(
            ("offer", version), "offer.commit", lambda: self._offer_body(standing, body, height))
        return task if self._hand_out(task.key, now) else None

    def offer_body(self, body: dict) -> dict:
        """`body` with the proofs an offer carries (space for the current beacon, and all this
        node's bonded stake); OfferNotReady before the node's registration is committed."""
        return self._offer_body(self.standing(), body, self.chain.head().height)

    def _offer_body(self, standing: Standing, body: dict, height: int) -> dict:
        """As `offer_body`, from a standing already read (this runs off the event loop, where
        the store is not read)."""
        if standing.registered is None:
            raise OfferNotReady("this node is not registered yet: its registration is "
                                "submitted first, then the offer")
        if standing.stake < standing.params.offer_min_stake:
            # The chain would refuse it; say what to do instead.
            raise OfferNotReady(f"an offer needs at least {standing.params.offer_min_stake} "
                             f"credits staked; this node has {standing.stake}: "
                             "run `hmnode stake AMOUNT` first")
        proofs = self.prover(standing).offer_proofs(
            self.chain.chain_id, standing.beacon.value, standing.stake, height)
        return dict(body, proofs=proofs)

    def describe(self) -> dict[str, Any]:
        """This node's standing as `hmnode status` shows it."""
        standing = self.standing()
        record, beacon = standing.registered, standing.beacon
        plot = None if record is None else record["plot"]
        return {
            "registered": record is not None,
            "registered_height": None if record is None else record["registered"],
            "plot": None if plot is None else {"plot_id": plot[3].hex(), "n_labels": plot[4]},
            "offering": standing.offering, "stake": standing.stake,
            "answered_period": None if record is None else record["answered"],
            "suspended": None if record is None else record["suspended"],
            "beacon": {"period": beacon.period, "awaited": beacon.awaited,
                       "published_period": beacon.value_period, "answer_due": beacon.due},
        }

    def _hand_out(self, key: tuple[str, int], now: float) -> bool:
        last = self._tried.get(key)
        if last is not None and now - last < self.retry_s:
            return False
        self._tried[key] = now
        if len(self._tried) > 64:  # old periods' keys are never asked for again
            for old in sorted(self._tried, key=self._tried.__getitem__)[:-32]:
                del self._tried[old]
        if len(self._awaited_since) > 64:
            for period in sorted(self._awaited_since)[:-32]:
                del self._awaited_since[period]
        return True
