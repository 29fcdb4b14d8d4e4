"""The benchmark command runs real agents and prints the figures its note quotes."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import hmnode


def test_startup_bench_prints_figures_beside_baselines_as_json() -> None:
    result = hmnode("simnet", "bench", "startup", "--runs", "1", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("ready_s", "restart_ready_s", "stop_s", "idle_rss_mib", "baseline_start_s",
                "baseline_rss_mib", "ready_ratio", "rss_ratio"):
        assert figures[key] > 0, key
    # The ratio is of the unrounded medians, so allow for the rounding of the printed ones.
    assert figures["ready_ratio"] == pytest.approx(
        figures["ready_s"] / figures["baseline_start_s"], rel=0.02)
    assert "ratio" in result.stderr


def test_bench_list_names_every_benchmark() -> None:
    result = hmnode("simnet", "bench", "--list")
    assert result.returncode == 0
    assert result.stdout.startswith("startup")


def test_transport_bench_measures_ours_beside_stock_aioquic() -> None:
    """A small run through both real processes: every key the issue names, with sane values."""
    from hmnode.simnet.bench import transport

    counts = transport.Counts(bulk_bytes=4 << 20, handshakes=20, rpcs=200, datagrams=500)
    figures = transport.run(runs=1, counts=counts)
    for prefix in ("", "loopback_"):
        for key in ("throughput_mbps", "baseline_mbps", "handshake_ms_p50", "handshake_ms_p99",
                    "rpc_per_s", "datagrams_per_s"):
            assert figures[prefix + key] > 0, prefix + key
        assert figures[prefix + "ratio"] == pytest.approx(
            figures[prefix + "throughput_mbps"] / figures[prefix + "baseline_mbps"], rel=0.01)
        assert figures[prefix + "handshake_ms_p50"] <= figures[prefix + "handshake_ms_p99"]
        assert 0 < figures[prefix + "datagrams_delivered"] <= 1
    assert any("stock aioquic" in line for line in transport.report(figures))


def test_sim_gossip_bench_gives_the_issue_keys_through_the_cli() -> None:
    """A small mesh through the command: every key the issue names, and the floors that hold
    at any size (everything delivered, few duplicates, no running node declared dead)."""
    result = hmnode("simnet", "bench", "sim-gossip", "--nodes", "40", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("nodes", "delivery_ratio", "hops_p99", "dissemination_ms_p99",
                "duplicates_per_msg", "failure_detect_s_p99", "false_positive_deaths", "wall_s"):
        assert key in figures, key
    assert figures["nodes"] == 40 and figures["ok"] is True
    assert figures["delivery_ratio"] == 1.0
    assert figures["duplicates_per_msg"] <= 2
    assert figures["detected"] == figures["crashes"] and figures["failure_detect_s_p99"] > 0
    assert figures["false_positive_deaths"] == 0
    assert "ratio" in result.stderr


def test_proofs_bench_gives_every_key_the_issue_names() -> None:
    result = hmnode("simnet", "bench", "proofs", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for kind, unit in (("work", "us"), ("time", "ms"), ("space", "ms"), ("stake", "us")):
        assert figures[f"{kind}_verify_{unit}"] > 0 and figures[f"{kind}_prove_ms"] > 0, kind
        assert figures[f"{kind}_bytes"] > 0 and figures[f"{kind}_verify_ratio"] > 0, kind
    assert figures["time_t"] > 0 and figures["squarings_per_s"] > 0
    assert figures["time_verify_ratio"] == pytest.approx(
        figures["time_verify_ms"] / figures["modexp_ms"], rel=0.02)
    assert isinstance(figures["verify_floor_ok"], bool)
    assert "every verify" in result.stderr


def test_consensus_bench_commits_every_transaction_on_four_validators() -> None:
    """A small load on four real validators and the one-validator baseline: every key the issue
    names, everything submitted committed; and --validators only for chain benchmarks."""
    from hmnode.simnet.bench import consensus

    steps: list[int] = []
    figures = consensus.run(runs=1, progress=steps.append, validators=4, transactions=1000,
                            duration_s=1.0)
    figures = json.loads(json.dumps(figures))
    for key in ("validators", "tx_per_s", "commit_ms_p50", "commit_ms_p99", "baseline_tx_per_s",
                "baseline_commit_ms_p50", "baseline_commit_ms_p99", "tx_per_s_ratio",
                "commit_p50_ratio", "node_cpu_us_per_tx"):
        assert figures[key] is not None, key
    assert figures["validators"] == 4 and sum(steps) == consensus.STEPS_PER_RUN
    assert figures["committed"] == figures["transactions"] == 1000
    assert figures["baseline_committed"] == 1000
    assert figures["latency_committed"] == figures["latency_transactions"] > 0
    assert figures["tx_per_s"] > 0 and figures["baseline_tx_per_s"] > 0
    assert 0 < figures["commit_ms_p50"] <= figures["commit_ms_p99"]
    assert figures["tx_per_s_ratio"] == pytest.approx(
        figures["tx_per_s"] / figures["baseline_tx_per_s"], rel=0.01)
    assert any("1 validator" in line for line in consensus.report(figures))

    refused = hmnode("simnet", "bench", "startup", "--validators", "4")
    assert refused.returncode == 2 and "--validators does not apply" in refused.stderr


def test_allocation_bench_gives_the_issue_keys_through_the_cli() -> None:
    """One run of the full market through the command: every key the issue names, a real
    end_block that placed jobs, and allocate() beside the plain rules (which the run checks
    agree); then a small market straight through run(), which reports its progress."""
    result = hmnode("simnet", "bench", "allocation", "--runs", "1", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["offers"] == 1000 and figures["jobs"] == 1000 and figures["runs"] == 1
    for key in ("allocations_per_s", "core_allocations_per_s", "reference_allocations_per_s",
                "ratio"):
        assert figures[key] > 0, key
    assert figures["ratio"] == pytest.approx(
        figures["core_allocations_per_s"] / figures["reference_allocations_per_s"], rel=0.01)
    # The market leaves some jobs waiting, as a real one does.
    assert figures["placed"] > 0 and figures["unplaced"] > 0
    assert figures["placed"] + figures["unplaced"] == 1000
    assert "plain rules" in result.stderr
    # Blocks of jobs on the real 4-validator mesh, beside blocks of key-value writes.
    assert figures["mesh_validators"] == 4 and figures["mesh_offers"] == 4
    assert figures["mesh_allocated"] > 0 and figures["mesh_job_blocks"] >= 2
    assert figures["block_apply_ms_p50"] > 0 and figures["kv_block_apply_ms_p50"] > 0
    assert figures["apply_ratio"] == pytest.approx(
        figures["block_apply_ms_p50"] / figures["kv_block_apply_ms_p50"], rel=0.02)

    from hmnode.simnet.bench import allocation

    steps: list[int] = []
    small = allocation.run(runs=1, progress=steps.append, offers=50, jobs=80, mesh_jobs=0)
    assert small["offers"] == 50 and small["jobs"] == 80 and small["allocations_per_s"] > 0
    assert sum(steps) == allocation.STEPS_PER_RUN


def test_workloads_bench_gives_the_issue_keys() -> None:
    """A short run: two jobs on a lone node and two on four validators, the sandbox figures
    beside plain wasmtime, and every key the issue names."""
    from hmnode.simnet.bench import workloads

    steps: list[int] = []
    figures = workloads.run(runs=1, progress=steps.append, jobs=2)
    for key in ("submit_to_running_ms_p50", "submit_to_result_ms_p50", "wasm_start_ms_p50",
                "wasm_overhead_ratio"):
        assert figures[key] > 0, key
    assert "process_start_ms_p50" in figures
    assert figures["submit_to_running_ms_p50"] < figures["submit_to_result_ms_p50"]
    assert figures["mesh_nodes"] == 4 and figures["one_node_runners"] == 1
    # The ratio is the median of each run's over the plain run beside it.
    ratios = figures["wasm_overhead_ratios"]
    assert len(ratios) == workloads.OVERHEAD_RUNS and all(r > 0 for r in ratios)
    assert figures["wasm_overhead_ratio"] == pytest.approx(statistics.median(ratios), abs=0.001)
    assert figures["wasm_cold_start_ms_p50"] > 0
    assert sum(steps) == workloads.STEPS_PER_RUN
    assert any(line.startswith("wasm sieve") for line in workloads.report(figures))
