"""Benchmarks, run as `hmnode simnet bench NAME`.

Each is a module with `run(runs, progress) -> dict` (figures, each beside a baseline measured in
the same run, for `--json`) and `report(figures) -> list[str]` (lines for people); its docstring's
first line describes it.
"""

from __future__ import annotations

from types import ModuleType

from hmnode.simnet.bench import startup

BENCHMARKS: dict[str, ModuleType] = {
    "startup": startup,
}
