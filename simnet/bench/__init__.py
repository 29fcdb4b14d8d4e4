"""Benchmarks, run as `hmnode simnet bench NAME`.

Each is a module with `run(runs, progress) -> dict` (figures, each beside a baseline measured in
the same run, for `--json`), `report(figures) -> list[str]` (lines for people) and `STEPS_PER_RUN`
(progress steps a run reports); its docstring's first line describes it. A benchmark of a mesh
also takes `nodes` in `run` (the `--nodes` flag), one of a chain `validators` (the
`--validators` flag), and either may set `DEFAULT_RUNS`. `--list` shows them
in the order below.
"""

from __future__ import annotations

from types import ModuleType

from hmnode.simnet.bench import (allocation, consensus, gossip, proofs, sim_gossip, startup,
                                 transport, workloads)

BENCHMARKS: dict[str, ModuleType] = {
    "startup": startup,
    "transport": transport,
    "gossip": gossip,
    "sim-gossip": sim_gossip,
    "proofs": proofs,
    "consensus": consensus,
    "allocation": allocation,
    "workloads": workloads,
}
