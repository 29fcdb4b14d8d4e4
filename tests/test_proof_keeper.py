"""The ProofKeeper on a chain driven block by block: it registers a node before its offer,
publishes the beacon a period awaits (the designated validator at once, another as a backup),
answers every space challenge while the node offers, and finds or makes the node's plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from chain_harness import ALICE, BOB, OFFERER_FUNDS, OTHER, VALIDATOR, Harness
from hmnode.consensus.space import Plot, plot_directory, plot_id_for
from hmnode.identity import NodeKey
from hmnode.proof_keeper import BACKUP_PUBLISH_S, OfferNotReady, ProofKeeper, ProofTask

OFFER = {"cores": 4, "memory_mib": 4096, "runtimes": ["wasm"], "expires_height": 1_000,
         "price": {"core_hour": 1, "gib_hour": 0, "gpu_hour": 0, "start_fee": 0}}


def run(h: Harness, key: NodeKey, tasks: list[ProofTask]) -> list[str | None]:
    """Make every task's body and commit them in one block; what each did."""
    return h.block(*(h.tx(key, t.kind, t.make()) for t in tasks))


def until(h: Harness, height: int) -> None:
    while h.chain.head().height < height:
        h.block()


def test_an_offer_starts_with_the_registration_then_the_offer(tmp_path: Path) -> None:
    h = Harness(offerers=(BOB,))
    keeper = ProofKeeper(BOB, h.chain, tmp_path, retry_s=5)
    with pytest.raises(OfferNotReady, match="not registered"):
        keeper.offer_body(OFFER)
    step = keeper.keep_offer(OFFER, now=0)
    assert step is not None and step.kind == "node.register"
    assert keeper.keep_offer(OFFER, now=1) is None  # handed out; not again before retry_s
    assert run(h, BOB, [step]) == [None]
    step = keeper.keep_offer(OFFER, now=2)
    assert step is not None and step.kind == "offer.commit"
    with pytest.raises(OfferNotReady, match="run `hmnode stake AMOUNT` first"):
        step.make()  # registered, but nothing staked yet
    h.block(h.tx(BOB, "stake.bond", {"amount": OFFERER_FUNDS}))
    assert keeper.keep_offer(OFFER, now=3) is None
    step = keeper.keep_offer(OFFER, now=8)  # retried after retry_s
    assert step is not None and run(h, BOB, [step]) == [None]
    assert keeper.keep_offer(OFFER, now=20) is None and keeper.standing().offering
    # The plot it made for the registration is in the data dir, of the chain's smallest size.
    assert plot_directory(tmp_path, plot_id_for(BOB.node_id.key, 16)).is_dir()


def test_the_designated_validator_publishes_and_another_backs_it_up(tmp_path: Path) -> None:
    h = Harness(validators=(VALIDATOR, OTHER), offerers=(BOB,))
    keepers = {k.node_id.key: ProofKeeper(k, h.chain, tmp_path / k.node_id.key.hex()[:8])
               for k in (VALIDATOR, OTHER)}
    assert all(k.due(0) == [] for k in keepers.values())  # period 0 needs no beacon
    until(h, 10)
    beacon = h.beacon()
    assert beacon.awaited and beacon.period == 1
    # Nothing is offered: no beacon is worth its proof of time.
    assert all(k.due(1000.0) == [] for k in keepers.values())
    h.join(BOB)
    h.block(h.offer(BOB, OFFER))
    order = [k for k, _ in h.chain.validators_at(h.chain.head().height + 1).members]
    designated, backup = keepers[order[1 % 2]], keepers[order[0]]
    assert backup.due(100.0) == []
    tasks = designated.due(100.0)
    assert [t.kind for t in tasks] == ["beacon.publish"]
    # The designated one is down: the other publishes once BACKUP_PUBLISH_S has passed.
    (task,) = backup.due(100.0 + BACKUP_PUBLISH_S)
    assert run(h, backup.key, [task]) == [None]
    assert not h.beacon().awaited and h.beacon().value_period == 1
    assert designated.due(200.0) == []


def test_an_offering_node_answers_each_beacon_once(tmp_path: Path) -> None:
    h = Harness({"balances": {str(ALICE.node_id): 10}}, offerers=(BOB,))
    keeper = ProofKeeper(BOB, h.chain, tmp_path, retry_s=5)
    h.block(h.tx(BOB, "stake.bond", {"amount": OFFERER_FUNDS}))
    for now in (0, 10):
        step = keeper.keep_offer(OFFER, now)
        assert step is not None and run(h, BOB, [step]) == [None]
    assert keeper.due(11) == []  # the offer answered period 0's beacon
    until(h, 10)
    publish = ProofKeeper(VALIDATOR, h.chain, tmp_path / "v").due(12)
    assert run(h, VALIDATOR, publish) == [None]
    (answer,) = keeper.due(13)
    assert answer.kind == "space.answer" and keeper.due(14) == []
    assert run(h, BOB, [answer]) == [None]
    assert keeper.due(30) == []  # answered: nothing more until the next beacon
    standing = keeper.describe()
    assert standing["answered_period"] == 1 and standing["suspended"] is None


def test_the_keeper_uses_the_largest_finished_plot_of_its_node(tmp_path: Path) -> None:
    h = Harness()
    me = BOB.node_id.key
    Plot.create(plot_directory(tmp_path, plot_id_for(me, 32)), me, 32)
    Plot.create(plot_directory(tmp_path, plot_id_for(me, 64)), me, 64)
    theirs = ALICE.node_id.key
    Plot.create(plot_directory(tmp_path, plot_id_for(theirs, 128)), theirs, 128)
    (tmp_path / "plots" / "junk").mkdir()  # an unreadable directory is passed over
    assert ProofKeeper(BOB, h.chain, tmp_path).plot(16).n_labels == 64
    assert ProofKeeper(BOB, h.chain, tmp_path).plot(100).n_labels == 100  # none large enough
