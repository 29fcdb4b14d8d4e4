"""The `process` runtime: a native command, run only where the contributor allows it, in a
sandbox built from what the kernel offers.

The child process, before it executes the command:
- leaves the node's session (its own process group, killed whole at the end);
- gets its own network namespace (only a loopback that is down: no network) and its own mount
  namespace in which the job's scratch directory is mounted on /tmp, its cwd and HOME (a
  path any user may reach, unlike the node's private data dir), and every other mount is
  read-only;
- as root, drops to an unprivileged uid (`SANDBOX_UID`), so that a process-count limit holds
  and nothing it owns outside the scratch directory; otherwise it enters a user namespace of
  its own (root inside, the node's user outside);
- has rlimits: CPU seconds, address space, open files, processes, file size, no core dumps;
- sees a scrubbed environment (PATH, HOME and TMPDIR in the scratch directory, and
  CUDA_VISIBLE_DEVICES pinning the GPUs it was given).
Where the node may make control groups (root, cgroup v2, or v1 on hosts booted with it), each
run also gets one of its own (`hmnode/cgroups.py`): its resident memory, its cores and its
process count are capped there, its peak memory is read from it, and everything in it is
killed at the end, also what left the run's process group.
Past its time limit the whole group is killed. Where the namespaces cannot be made (a kernel
or container that forbids them) the job is refused, unless the contributor allows unsandboxed
jobs, in which case only the rlimits, the scrubbed environment and the scratch cwd remain.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hmnode.cgroups import CgroupLimits, JobCgroup, cgroup_version
from hmnode.errors import HmnodeError
from hmnode.pause_clock import PauseClock
from hmnode.run_result import RunResult

log = logging.getLogger(__name__)
_runs = itertools.count()

JOB_DIR = "/tmp"  # where a sandboxed job sees its scratch directory
SANDBOX_UID = 65534  # "nobody": owns nothing, may do nothing that matters
MAX_PROCESSES = 64
MAX_OPEN_FILES = 256
MAX_FILE_BYTES = 1 << 30
KILL_GRACE_S = 1.0
WAKE_S = 1.0  # how often a waiting run looks at its (pausable) deadline
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


class SandboxUnavailable(HmnodeError):
    """This kernel or container does not let the node build the process sandbox."""


@dataclass(frozen=True)
class ProcessLimits:
    """What one run may use."""

    time_s: float
    memory_mib: int
    output_bytes: int = 16 << 20
    gpus: tuple[str, ...] = ()  # the devices it may see (NVML UUIDs or indices)
    cores: int = 1


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def sandbox_unavailable() -> str | None:
    """Why the sandbox cannot be built here, or None when it can (tried in a throwaway child)."""
    try:
        probe = subprocess.run(["true"], preexec_fn=_isolate_fn(Path("/"), None, probe=True),
                               capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the sandbox cannot be made here ({exc})"
    if probe.returncode != 0:
        return "this kernel does not let the node make network and mount namespaces"
    return None


def _isolate_fn(scratch: Path, limits: ProcessLimits | None, probe: bool = False,
                cgroup: JobCgroup | None = None) -> Callable[[], None]:
    """What the child runs between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.getuid() == 0
    uid, gid = os.getuid(), os.getgid()
    scratch_b = str(scratch).encode()
    inside = JOB_DIR.encode()

    procs = [] if cgroup is None else cgroup.procs_files()
    address_space = _address_space(limits, cgroup)

    def isolate() -> None:
        _enter(procs)  # first, while still root: what it starts is in the group too
        os.setsid()
        flags = _CLONE_NEWNS | _CLONE_NEWNET | (0 if root else _CLONE_NEWUSER)
        _check(libc.unshare(flags), "unshare")
        if not root:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
        _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
        if probe:
            return
        # The scratch directory becomes the mount on /tmp, which stays writable when every
        # other mount is made read-only.
        _check(libc.mount(scratch_b, inside, None, _MS_BIND, None), "bind scratch")
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in points:
            if point != JOB_DIR:
                libc.mount(None, point.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)
        assert limits is not None
        cpu = int(limits.time_s) + 1
        for name, value in ((resource.RLIMIT_CPU, cpu),
                            (resource.RLIMIT_AS, address_space),
                            (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
                            (resource.RLIMIT_NPROC, MAX_PROCESSES),
                            (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
                            (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(name, (value, value))
        os.chdir(JOB_DIR)
        if root:
            os.setgroups([])
            os.setgid(SANDBOX_UID)
            os.setuid(SANDBOX_UID)

    return isolate


class ProcessRuntime:
    """Runs commands in the sandbox; `allow_unsandboxed` is the contributor's choice."""

    def __init__(self, allow_unsandboxed: bool = False) -> None:
        self.allow_unsandboxed = allow_unsandboxed
        self.unavailable = sandbox_unavailable()
        self.cgroups, self.cgroup_note = cgroup_version()
        self.clock = PauseClock()  # stands still while runs are suspended
        self._running: dict[str, subprocess.Popen] = {}  # by the token a run was given
        self._lock = threading.Lock()

    def suspend(self) -> None:
        """Stop every run's process group where it is (SIGSTOP), and their time limits."""
        self.clock.pause()
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        """Let suspended runs go on."""
        self._signal_all(signal.SIGCONT)
        self.clock.resume()

    def kill(self, token: str) -> bool:
        """End the run named `token` now (it ends "killed by SIGKILL"); whether it ran."""
        with self._lock:
            proc = self._running.get(token)
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
        return proc is not None

    def _signal_all(self, sig: int) -> None:
        with self._lock:
            for proc in self._running.values():
                _signal_group(proc, sig)

    def run(self, argv: list[str], stdin: bytes, scratch: Path, work: Path,
            limits: ProcessLimits, token: str | None = None) -> RunResult:
        """Run `argv` with `scratch` as its only writable directory; blocks until it ends.
        `token` names the run for `kill`."""
        token = token or f"run-{id(work)}-{time.monotonic_ns()}"
        if self.unavailable is not None and not self.allow_unsandboxed:
            raise SandboxUnavailable(f"{self.unavailable}; this node refuses process jobs "
                                     "(its contributor may allow unsandboxed ones)")
        scratch.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            os.chown(scratch, SANDBOX_UID, SANDBOX_UID)
        home = JOB_DIR if self.unavailable is None else str(scratch)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
               "LANG": "C.UTF-8",
               # None visible unless given: an empty value hides every device from CUDA.
               "CUDA_VISIBLE_DEVICES": ",".join(limits.gpus)}
        cgroup = self._cgroup(limits)
        try:
            return self._run(argv, stdin, scratch, work, limits, env, cgroup, token)
        finally:
            if cgroup is not None:
                cgroup.remove()  # kills what is left in it, also what left the session

    def _run(self, argv: list[str], stdin: bytes, scratch: Path, work: Path,
             limits: ProcessLimits, env: dict[str, str], cgroup: JobCgroup | None,
             token: str) -> RunResult:
        out_path, err_path = work / "stdout", work / "stderr"
        preexec = (_isolate_fn(scratch, limits, cgroup=cgroup) if self.unavailable is None
                   else _limits_only(scratch, limits, cgroup))
        started, usage_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        env=env, cwd=scratch, preexec_fn=preexec,
                                        close_fds=True)
            except (OSError, subprocess.SubprocessError) as exc:
                return RunResult(127, f"could not start: {exc}", b"", b"")
            with self._lock:
                self._running[token] = proc
                if self.clock.paused:  # suspended meanwhile: so is this one
                    _signal_group(proc, signal.SIGSTOP)
            reason = "exited"
            deadline = self.clock.now() + limits.time_s
            try:
                while True:
                    left = deadline - self.clock.now()
                    if left <= 0:
                        reason = f"time limit: it ran past {limits.time_s:g} s"
                        break
                    try:
                        proc.communicate(stdin, timeout=min(left, WAKE_S))
                        break
                    except subprocess.TimeoutExpired:
                        stdin = None  # given already; communicate goes on where it was
            finally:
                with self._lock:
                    self._running.pop(token, None)
                _kill_group(proc)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Without a group, the largest resident set of any child this node has waited for:
        # per run only when runs do not overlap (what getrusage can tell).
        peak = usage.ru_maxrss << 10
        code = proc.returncode
        if cgroup is not None:
            peak = cgroup.peak_memory_bytes() or peak
            if code < 0 and reason == "exited" and cgroup.oom_killed():
                reason = f"memory limit: it used more than {limits.memory_mib} MiB"
        if code < 0 and reason == "exited":
            sig = signal.Signals(-code).name
            reason = ("time limit: it used all its CPU seconds" if -code == signal.SIGXCPU
                      else f"killed by {sig}")
        cpu_ms = round(((usage.ru_utime - usage_before.ru_utime)
                        + (usage.ru_stime - usage_before.ru_stime)) * 1000)
        return RunResult(code if code >= 0 else 128 - code, reason,
                         _read(out_path, limits.output_bytes), _read(err_path, limits.output_bytes),
                         round((time.perf_counter() - started) * 1000), cpu_ms,
                         peak_memory_mib=-(-peak // (1 << 20)))

    def _cgroup(self, limits: ProcessLimits) -> JobCgroup | None:
        """A control group for one run, where this node can make them."""
        if self.cgroups is None:
            return None
        try:
            return JobCgroup.create(f"run-{os.getpid()}-{next(_runs)}", CgroupLimits(
                memory_bytes=limits.memory_mib << 20, cores=limits.cores,
                pids=MAX_PROCESSES))
        except OSError as exc:
            log.warning("cannot make a control group for a process job (%s); running it "
                        "with rlimits only", exc)
            return None


def _limits_only(scratch: Path, limits: ProcessLimits,
                 cgroup: JobCgroup | None) -> Callable[[], None]:
    """The unsandboxed fallback: rlimits, a control group where there is one, and its own
    session only."""
    procs = [] if cgroup is None else cgroup.procs_files()
    address_space = _address_space(limits, cgroup)

    def apply() -> None:
        _enter(procs)
        os.setsid()
        for name, value in ((resource.RLIMIT_CPU, int(limits.time_s) + 1),
                            (resource.RLIMIT_AS, address_space),
                            (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
                            (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
                            (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(name, (value, value))
    return apply


def _enter(procs: list[Path]) -> None:
    """Put this process in a control group (each hierarchy's `cgroup.procs`)."""
    for path in procs:
        path.write_text(str(os.getpid()))


def _address_space(limits: ProcessLimits | None, cgroup: JobCgroup | None) -> int:
    """The address-space rlimit: the memory limit itself without a control group; with one,
    which caps the resident memory, four times it, so that runtimes which reserve address
    space ahead (Go, the JVM, CUDA) still start."""
    if limits is None:
        return resource.RLIM_INFINITY
    memory = limits.memory_mib << 20
    return memory if cgroup is None else max(4 * memory, memory + (1 << 30))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the run's whole process group (what it left running in the background too)."""
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass


def _read(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit)
