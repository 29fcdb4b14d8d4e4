"""A deterministic simulator: the real protocol cores over a virtual clock and network."""

from .clock import VirtualClock
from .gossip import CHECKERS, FaultPlan, Result, SimSettings, reproduce_command, run
from .network import NetParams, SimNetwork, TraceEntry

SCENARIOS = ("gossip",)

__all__ = ["CHECKERS", "SCENARIOS", "FaultPlan", "NetParams", "Result", "SimNetwork",
           "SimSettings", "TraceEntry", "VirtualClock", "reproduce_command", "run"]
