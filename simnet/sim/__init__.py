"""A deterministic simulator: the real protocol cores over a virtual clock and network."""

from .clock import VirtualClock
from .gossip import CHECKERS, FaultPlan, Result, SimSettings, reproduce_command, run
from . import consensus
from .network import NetParams, SimNetwork, TraceEntry

SCENARIOS = ("gossip",) + consensus.SCENARIOS


def run_scenario(scenario: str, nodes: int, seed: int, duration: float) -> Result:
    """One run of any scenario, with its default settings."""
    if scenario == "gossip":
        return run(nodes, seed, duration)
    return consensus.run(scenario, nodes, seed, duration)

__all__ = ["CHECKERS", "SCENARIOS", "FaultPlan", "NetParams", "Result", "SimNetwork",
           "SimSettings", "TraceEntry", "VirtualClock", "reproduce_command", "run", "run_scenario"]
