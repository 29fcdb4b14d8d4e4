"""What a sandboxed run produced, whatever its runtime, and the result blob a receipt names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from hmnode.errors import HmnodeError


@dataclass(frozen=True)
class RunResult:
    """How a run ended and what it used. `reason` is "exited" for a program that ended by
    itself; otherwise the limit it hit, the trap that ended it, or why it never started.
    `fuel` is the wasm runtime's measured work (0 for a process)."""

    exit_code: int
    reason: str
    stdout: bytes
    stderr: bytes
    wall_ms: int = 0
    cpu_ms: int = 0
    fuel: int = 0
    peak_memory_mib: int = 0

    @property
    def ok(self) -> bool:
        return self.reason == "exited" and self.exit_code == 0

    def result_blob(self) -> bytes:
        """The bytes whose id is the receipt's result hash: only what the program decides
        (its exit, why it ended, its output), so replicas of a deterministic job agree."""
        return msgpack.packb({"exit_code": self.exit_code, "reason": self.reason,
                              "stdout": self.stdout, "stderr": self.stderr}, use_bin_type=True)


def read_result(data: bytes) -> dict[str, Any]:
    """A result blob's fields (exit_code, reason, stdout, stderr); HmnodeError if not one."""
    try:
        result = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises many types for bad input
        result = None
    if not isinstance(result, dict) or not {"exit_code", "reason", "stdout", "stderr"} <= set(result):
        raise HmnodeError("this blob is not a job result")
    return result
