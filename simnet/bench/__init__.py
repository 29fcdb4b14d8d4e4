"""Benchmarks, run as `hmnode simnet bench NAME`.

Each is a module with `run(runs, progress) -> dict` (figures, each beside a baseline measured in
the same run, for `--json`), `report(figures) -> list[str]` (lines for people) and `STEPS_PER_RUN`
(progress steps a run reports); its docstring's first line describes it.
"""

from __future__ import annotations

from types import ModuleType

from hmnode.simnet.bench import startup, transport

BENCHMARKS: dict[str, ModuleType] = {
    "startup": startup,
    "transport": transport,
}
