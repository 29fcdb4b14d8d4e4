"""Prometheus exposition of a node (prometheus-client), on 127.0.0.1:9464 by default.

The HTTP server runs on a thread of its own, so it never reads the node's state directly: the
node hands it a snapshot (`NodeSnapshot`, plain numbers) every SNAPSHOT_S, and the collector
turns the latest into metric families at each scrape. Commit latency is a histogram, observed
as blocks commit.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SNAPSHOT_S = 5.0
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class NodeSnapshot:
    """What the metrics say, taken on the node's event loop."""

    node_id: str = ""
    version: str = ""
    peers: int = 0
    paths: dict[str, int] = field(default_factory=dict)  # "direct" / "relayed" -> count
    gossip: dict[str, int] = field(default_factory=dict)  # broadcast counters
    height: int = 0
    validators: int = 0
    is_validator: bool = False
    mempool: int = 0
    jobs: dict[str, int] = field(default_factory=dict)  # on the chain, by state
    executions: dict[str, int] = field(default_factory=dict)  # run here, by state
    sandbox: dict[str, dict[str, float]] = field(default_factory=dict)  # per runtime
    earned: int = 0
    balance: int = 0
    sharing: bool = False
    why_not: int = 0


class NodeCollector(Collector):
    """Metric families from the latest snapshot."""

    def __init__(self) -> None:
        self.snapshot = NodeSnapshot()
        self._lock = threading.Lock()

    def update(self, snapshot: NodeSnapshot) -> None:
        with self._lock:
            self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        with self._lock:
            s = self.snapshot
        info = GaugeMetricFamily("hmnode_info", "This node: its id and version (always 1).",
                                 labels=["node_id", "version"])
        info.add_metric([s.node_id, s.version], 1)
        yield info
        yield GaugeMetricFamily("hmnode_peers", "Peers connected now.", value=s.peers)
        paths = GaugeMetricFamily("hmnode_paths", "Connections by path.", labels=["path"])
        for path in ("direct", "relayed"):
            paths.add_metric([path], s.paths.get(path, 0))
        yield paths
        for name, key, help_text in (
                ("hmnode_gossip_messages", "delivered", "Gossip messages delivered here."),
                ("hmnode_gossip_duplicates", "duplicates", "Gossip messages received again."),
                ("hmnode_gossip_invalid", "invalid", "Gossip messages refused as invalid.")):
            yield CounterMetricFamily(name, help_text, value=s.gossip.get(key, 0))
        yield GaugeMetricFamily("hmnode_consensus_height", "Height of the last committed block.",
                                value=s.height)
        yield GaugeMetricFamily("hmnode_consensus_validators", "Validators of the next block.",
                                value=s.validators)
        yield GaugeMetricFamily("hmnode_consensus_is_validator",
                                "Whether this node validates (1) or follows (0).",
                                value=int(s.is_validator))
        yield GaugeMetricFamily("hmnode_mempool_transactions", "Transactions waiting.",
                                value=s.mempool)
        jobs = GaugeMetricFamily("hmnode_jobs", "Jobs on the chain by state.", labels=["state"])
        for state, n in sorted(s.jobs.items()):
            jobs.add_metric([state], n)
        yield jobs
        runs = GaugeMetricFamily("hmnode_executions", "Jobs this node ran or runs, by state.",
                                 labels=["state"])
        for state, n in sorted(s.executions.items()):
            runs.add_metric([state], n)
        yield runs
        for name, key, help_text in (
                ("hmnode_sandbox_runs", "runs", "Sandboxed runs ended here."),
                ("hmnode_sandbox_cpu_seconds", "cpu_s", "CPU seconds of sandboxed runs."),
                ("hmnode_sandbox_wall_seconds", "wall_s", "Wall seconds of sandboxed runs."),
                ("hmnode_sandbox_limit_hits", "limits", "Runs ended by a limit (time, "
                                                        "memory, fuel).")):
            family = CounterMetricFamily(name, help_text, labels=["runtime"])
            for runtime, figures in sorted(s.sandbox.items()):
                family.add_metric([runtime], figures.get(key, 0))
            yield family
        peak = GaugeMetricFamily("hmnode_sandbox_peak_memory_bytes",
                                 "Peak memory of the last sandboxed run.", labels=["runtime"])
        for runtime, figures in sorted(s.sandbox.items()):
            peak.add_metric([runtime], figures.get("peak_bytes", 0))
        yield peak
        yield CounterMetricFamily("hmnode_earned_credits", "Credits paid to this node for jobs.",
                                  value=s.earned)
        yield GaugeMetricFamily("hmnode_balance_credits", "This node's balance.",
                                value=s.balance)
        yield GaugeMetricFamily("hmnode_sharing", "Whether this node shares now (1) or not.",
                                value=int(s.sharing))
        yield GaugeMetricFamily("hmnode_sharing_blockers",
                                "How many reasons keep this node from sharing now.",
                                value=s.why_not)


class MetricsServer:
    """The /metrics endpoint: the node's collector and the commit-latency histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.collector = NodeCollector()
        self.registry.register(self.collector)
        self.commit_latency = Histogram(
            "hmnode_consensus_commit_latency_seconds",
            "From a block's proposal being awaited to its commit, as this node saw it.",
            buckets=COMMIT_BUCKETS, registry=self.registry)
        self._server: Any = None
        self.address: tuple[str, int] | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve on host:port (0: any free port); where it listens. OSError if it cannot."""
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._server = server
        self.address = (host, server.server_port)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
