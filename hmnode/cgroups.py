"""Control groups for process jobs: a group per run that caps its memory (resident, not just
address space), CPU (in cores) and process count, tells its peak memory and whether the kernel's
OOM killer ended it, and kills everything in it at the end.

cgroup v2 (one unified hierarchy) is used where it is mounted and the node may write to it;
otherwise the v1 hierarchies of the same controllers (memory, cpu, pids), as on hosts still
booted with them. Neither needs a daemon: the node writes the group's files itself, which
needs root (or a delegated hierarchy, which we do not look for).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "hmnode-jobs"  # the node's groups live under this one
CPU_PERIOD_US = 100_000
CONTROLLERS = ("memory", "cpu", "pids")
REMOVE_TRIES = 50  # x 20 ms: how long a killed group may take to empty


@dataclass(frozen=True)
class CgroupLimits:
    """What a group may use."""

    memory_bytes: int
    cores: float
    pids: int


def cgroup_version(root: Path = CGROUP_ROOT) -> tuple[str | None, str]:
    """Which cgroup interface this node can use ("v2", "v1" or None) and why (for status)."""
    if os.geteuid() != 0:
        return None, "the node is not root, so it cannot make control groups"
    if (root / "cgroup.controllers").exists():
        have = set((root / "cgroup.controllers").read_text().split())
        missing = [c for c in CONTROLLERS if c not in have]
        if missing:
            return None, f"cgroup v2 lacks the {', '.join(missing)} controller"
        if not os.access(root / "cgroup.subtree_control", os.W_OK):
            return None, "cgroup v2 is read-only here"
        return "v2", "cgroup v2 (memory, cpu, pids)"
    if all((root / c / "cgroup.procs").exists() for c in CONTROLLERS):
        if not all(os.access(root / c, os.W_OK) for c in CONTROLLERS):
            return None, "the cgroup v1 hierarchies are read-only here"
        return "v1", "cgroup v1 (memory, cpu, pids)"
    return None, "no cgroup hierarchy with the memory, cpu and pids controllers is mounted"


class JobCgroup:
    """One run's control group (the same name in each v1 hierarchy, or one v2 group)."""

    def __init__(self, version: str, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs  # controller -> its directory; v2: the same one for all

    @classmethod
    def create(cls, name: str, limits: CgroupLimits, root: Path = CGROUP_ROOT) -> JobCgroup:
        """A new group with `limits`; OSError if it cannot be made (see `cgroup_version`)."""
        version, why = cgroup_version(root)
        if version is None:
            raise OSError(why)
        if version == "v2":
            parent = root / PARENT
            parent.mkdir(exist_ok=True)
            enable = " ".join(f"+{c}" for c in CONTROLLERS)
            (root / "cgroup.subtree_control").write_text(enable)
            (parent / "cgroup.subtree_control").write_text(enable)
            group = parent / name
            group.mkdir(exist_ok=True)
            made = cls("v2", {c: group for c in CONTROLLERS})
        else:
            dirs = {}
            for controller in CONTROLLERS:
                dirs[controller] = root / controller / PARENT / name
                dirs[controller].mkdir(parents=True, exist_ok=True)
            made = cls("v1", dirs)
        try:
            made._limit(limits)
        except OSError:
            made.remove()
            raise
        return made

    def _limit(self, limits: CgroupLimits) -> None:
        quota = max(1000, round(limits.cores * CPU_PERIOD_US))
        memory, cpu, pids = self.dirs["memory"], self.dirs["cpu"], self.dirs["pids"]
        if self.version == "v2":
            (memory / "memory.max").write_text(str(limits.memory_bytes))
            _try_write(memory / "memory.swap.max", "0")
            (cpu / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            _try_write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))
        (pids / "pids.max").write_text(str(limits.pids))

    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to enter the group (each hierarchy's)."""
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    def pids(self) -> set[int]:
        """The processes in the group now."""
        found: set[int] = set()
        for path in self.procs_files():
            try:
                found.update(int(p) for p in path.read_text().split())
            except OSError:
                continue
        return found

    def peak_memory_bytes(self) -> int | None:
        """The most memory the group used (None where the kernel does not say)."""
        name = "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"
        try:
            return int((self.dirs["memory"] / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for going past its memory."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            for line in (self.dirs["memory"] / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self) -> None:
        """SIGKILL everything in the group, also what left the job's process group."""
        if self.version == "v2" and _try_write(self.dirs["memory"] / "cgroup.kill", "1"):
            return
        for _ in range(REMOVE_TRIES):  # a fork bomb forks while it is being killed
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        """Kill what is left and remove the group (directories of an empty group only)."""
        self.kill_all()
        for path in {d for d in self.dirs.values()}:
            for _ in range(REMOVE_TRIES):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)  # its last processes are still being reaped


def _try_write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
        return True
    except OSError:
        return False
