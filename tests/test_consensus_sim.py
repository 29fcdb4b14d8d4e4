"""The consensus scenarios of the simulator: the real ChainNode (Tendermint engine, mempool,
block sync, chain execution) under faults and a Byzantine nemesis, with checkers that hold for
f of 3f+1 Byzantine stake and that do catch a broken run when f+1 are Byzantine."""

from __future__ import annotations

import json

from click.testing import CliRunner

from hmnode.cli.main import main
from hmnode.simnet.sim.consensus import CHECKERS, ChainSimSettings, run


def _swarm(scenario: str, nodes: int, seeds: str, duration: int) -> dict:
    result = CliRunner().invoke(main, ["simnet", "sim", "--scenario", scenario, "--nodes",
                                       str(nodes), "--seeds", seeds, "--duration", str(duration),
                                       "--json"])
    report = json.loads(result.output.strip().splitlines()[-1])
    assert result.exit_code == 0, report["violations"][:3]
    return report


def test_swarm_one_byzantine_of_four_hundred_seeds() -> None:
    report = _swarm("consensus-byzantine", 4, "1..100", 60)
    assert report["ok"] and report["seeds"] == 100 and not report["violations"]


def test_swarm_two_byzantine_of_seven() -> None:
    report = _swarm("consensus-byzantine", 7, "1..6", 60)
    assert report["ok"] and not report["violations"]


def test_swarm_crash_partition_loss_without_byzantine() -> None:
    report = _swarm("consensus", 4, "1..10", 60)
    assert report["ok"] and not report["violations"]


def test_one_validator_commits_every_transaction_alone() -> None:
    result = run("consensus", 1, seed=3, duration=30.0)
    assert result.ok, result.verdicts
    assert result.stats["height"] > 10
    # Every client transaction (and nothing else but nonces) made it into a block.
    assert result.stats["transactions_committed"] >= result.stats["transactions_submitted"]


def test_the_nemesis_acts_and_is_caught_as_evidence() -> None:
    result = run("consensus-byzantine", 4, seed=4, duration=40.0)
    assert result.ok, result.verdicts
    driver = result.stats["driver"]
    for act in ("nemesis_equivocal_vote", "nemesis_equivocal_proposal", "nemesis_bad_signature",
                "nemesis_replayed", "nemesis_withheld", "nemesis_forged_tx"):
        assert driver.get(act, 0) > 0, act
    assert result.stats["evidence"] > 0
    assert driver.get("misbehaviour_noted", 0) > 0
    # Clients' jobs were placed, and some waited: the allocation checker had work to check.
    jobs = result.stats["jobs"]
    assert jobs.get("allocated", 0) + jobs.get("lapsed", 0) > 0 and len(jobs) >= 2, jobs


def test_agreement_checker_catches_f_plus_one_byzantine() -> None:
    # Two coordinated Byzantine validators of four hold half the stake: the honest ones can
    # then commit different blocks, and the checker must say so (in most seeds).
    broken = [run("consensus-byzantine", 4, seed, 30.0, ChainSimSettings(byzantine=2))
              for seed in range(1, 6)]
    caught = [r for r in broken if r.verdicts["agreement"] is not True]
    assert len(caught) >= 3, [r.verdicts for r in broken]
    assert all(set(r.verdicts) == set(CHECKERS) for r in broken)


def test_same_seed_same_trace() -> None:
    a = run("consensus-byzantine", 4, seed=9, duration=20.0)
    b = run("consensus-byzantine", 4, seed=9, duration=20.0)
    c = run("consensus-byzantine", 4, seed=10, duration=20.0)
    assert a.trace_hash == b.trace_hash != c.trace_hash
    assert a.stats == b.stats


def test_cli_one_seed_names_its_replay_command() -> None:
    result = CliRunner().invoke(main, ["simnet", "sim", "--scenario", "consensus-byzantine",
                                       "--nodes", "4", "--seed", "2", "--duration", "20",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["scenario"] == "consensus-byzantine" and report["ok"]
    assert set(report["verdicts"]) == set(CHECKERS)
