"""The process runtime's sandbox, with real processes: a command runs in its scratch directory
with a scrubbed environment; it cannot write outside it, reach the network, exhaust memory,
fork without bound, or outlive its time limit. Needs root or user namespaces; skipped with the
reason where the kernel offers neither. Where the node can make control groups, a run's
resident memory is capped and nothing it started survives it, even outside its session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hmnode.cgroups import PARENT, CgroupLimits, JobCgroup, cgroup_version
from hmnode.process_runtime import ProcessLimits, ProcessRuntime, SandboxUnavailable, \
    sandbox_unavailable

WHY = sandbox_unavailable()
CGROUPS, CGROUPS_WHY = cgroup_version()
needs_cgroups = pytest.mark.skipif(CGROUPS is None, reason=f"no control groups: {CGROUPS_WHY}")
# A Python the sandboxed user may run (the test's own may live in a home it cannot reach).
PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
needs_python = pytest.mark.skipif(PY is None, reason="no python3 on the sandbox's PATH")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no process sandbox here: {WHY}")


def run(tmp_path: Path, *argv: str, stdin: bytes = b"", **limits: object) -> object:
    settings = dict(time_s=10.0, memory_mib=256)
    settings.update(limits)
    return ProcessRuntime().run(list(argv), stdin, tmp_path / "scratch", tmp_path / "work",
                                ProcessLimits(**settings))  # type: ignore[arg-type]


def test_a_command_runs_in_its_scratch_directory(tmp_path: Path) -> None:
    result = run(tmp_path, "sh", "-c", "echo $HOME; env | sort | cut -d= -f1 | tr '\\n' ' ';"
                 " echo; cat; echo made > here.txt; pwd", stdin=b"from stdin\n", gpus=("GPU-5c1f",))
    assert result.ok, result
    home, names, rest = result.stdout.decode().split("\n", 2)
    assert home == "/tmp"  # the scratch directory, mounted where the job can reach it
    assert set(names.split()) <= {"PATH", "HOME", "TMPDIR", "LANG", "CUDA_VISIBLE_DEVICES", "PWD",
                                  "SHLVL", "_", "OLDPWD"}
    assert rest == "from stdin\n/tmp\n"
    assert (tmp_path / "scratch" / "here.txt").read_text() == "made\n"


def test_writes_outside_the_scratch_directory_fail(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    result = run(tmp_path, "sh", "-c", f"echo x > {target} || echo refused; "
                 "touch /var/tmp/hmnode-escape-test 2>&1 || echo refused")
    assert result.stdout.decode().count("refused") == 2
    assert not target.exists() and not Path("/var/tmp/hmnode-escape-test").exists()


@needs_python
def test_there_is_no_network(tmp_path: Path) -> None:
    code = ("import socket\nfor host in ('127.0.0.1', '1.1.1.1'):\n try:\n"
            "  socket.create_connection((host, 53), timeout=2); print('connected')\n"
            " except OSError as e: print(e.errno)")
    result = run(tmp_path, PY, "-c", code)
    assert result.ok and b"connected" not in result.stdout
    # No interface is up: the loopback is refused too (101 ENETUNREACH or 99 EADDRNOTAVAIL).
    assert set(result.stdout.split()) <= {b"101", b"99", b"111"}


@needs_python
def test_a_memory_bomb_fails_inside_its_limit(tmp_path: Path) -> None:
    # Writes 1 GiB (not a zeroed allocation, which would not be resident).
    result = run(tmp_path, PY, "-c", "x = b'x' * (1 << 30)", memory_mib=256)
    assert result.exit_code != 0
    if CGROUPS is None:  # the address-space limit refuses the allocation
        assert b"MemoryError" in result.stderr
    else:  # the group's limit: the kernel kills it at 256 MiB resident
        assert result.reason == "memory limit: it used more than 256 MiB", result
        assert 200 <= result.peak_memory_mib <= 257


@needs_cgroups
def test_a_control_group_caps_a_run_and_goes_with_it(tmp_path: Path) -> None:
    group = JobCgroup.create("test-limits", CgroupLimits(memory_bytes=64 << 20, cores=1.5,
                                                         pids=10))
    memory = group.dirs["memory"]
    limit = "memory.max" if CGROUPS == "v2" else "memory.limit_in_bytes"
    assert int((memory / limit).read_text()) == 64 << 20
    assert int((group.dirs["pids"] / "pids.max").read_text()) == 10
    cpu = group.dirs["cpu"]
    quota = ((cpu / "cpu.max").read_text().split()[0] if CGROUPS == "v2"
             else (cpu / "cpu.cfs_quota_us").read_text().strip())
    assert int(quota) == 150_000
    sleeper = subprocess.Popen(["sleep", "30"])
    for path in group.procs_files():
        path.write_text(str(sleeper.pid))
    assert group.pids() == {sleeper.pid}
    group.remove()
    assert sleeper.wait(timeout=5) == -9
    assert not any(d.exists() for d in group.dirs.values())


@needs_cgroups
def test_nothing_a_run_started_outlives_it(tmp_path: Path) -> None:
    # `setsid` leaves the run's process group, so only its control group still holds it.
    result = run(tmp_path, "sh", "-c", "setsid sleep 31 >/dev/null 2>&1 & sleep 0.3; echo started")
    assert result.ok and result.stdout == b"started\n"
    left = subprocess.run(["pgrep", "-f", "sleep 31"], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    assert not [p for p in Path("/sys/fs/cgroup").glob(f"**/{PARENT}/run-*")]


def test_a_fork_bomb_is_bounded_and_cleaned_up(tmp_path: Path) -> None:
    result = run(tmp_path, "sh", "-c", "i=0; while [ $i -lt 500 ]; do sleep 30 & i=$((i+1)); "
                 "done 2>/dev/null; echo spawned", time_s=3.0)
    # The process limit stops the forks; the time limit ends it; nothing is left running.
    assert result.wall_ms < 10_000
    left = subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_the_time_limit_ends_it(tmp_path: Path) -> None:
    result = run(tmp_path, "sleep", "30", time_s=0.5)
    assert result.reason == "time limit: it ran past 0.5 s" and result.wall_ms < 5_000


def test_without_namespaces_jobs_are_refused_unless_allowed(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    runtime.unavailable = "no namespaces (as on a locked-down kernel)"
    with pytest.raises(SandboxUnavailable, match="refuses process jobs"):
        runtime.run(["true"], b"", tmp_path / "s", tmp_path / "w", ProcessLimits(1.0, 64))
    runtime.allow_unsandboxed = True
    assert runtime.run(["true"], b"", tmp_path / "s", tmp_path / "w",
                       ProcessLimits(1.0, 64)).ok



@needs_python
def test_a_suspended_run_stops_and_its_time_limit_waits(tmp_path: Path) -> None:
    import threading
    import time
    runtime = ProcessRuntime()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\nprint('done')"
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(runtime.run(
        [PY, "-c", busy], b"", tmp_path / "scratch", tmp_path / "work",
        ProcessLimits(time_s=2.5, memory_mib=256), token="job-1")))
    thread.start()
    time.sleep(0.5)
    runtime.suspend()
    time.sleep(2.0)  # past its 2.5 s with the 1.5 s of CPU it still needs, had the clock run
    runtime.resume()
    thread.join(timeout=15)
    (result,) = outcome
    assert result.ok and result.stdout == b"done\n", result
    assert result.wall_ms > 3000
    # And a run can be ended by its token.
    outcome.clear()
    thread = threading.Thread(target=lambda: outcome.append(runtime.run(
        ["sleep", "30"], b"", tmp_path / "scratch", tmp_path / "work",
        ProcessLimits(time_s=60, memory_mib=64), token="job-2")))
    thread.start()
    deadline = time.monotonic() + 10
    while not runtime.kill("job-2") and time.monotonic() < deadline:
        time.sleep(0.05)
    thread.join(timeout=10)
    assert outcome[0].reason == "killed by SIGKILL"
