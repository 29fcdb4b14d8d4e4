"""The benchmark command runs real agents and prints the figures its note quotes."""

from __future__ import annotations

import json

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
