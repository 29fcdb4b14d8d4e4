"""The process runtime's sandbox, with real processes: a command runs in its scratch directory
with a scrubbed environment; it cannot write outside it, reach the network, exhaust memory,
fork without bound, or outlive its time limit. Needs root or user namespaces; skipped with the
reason where the kernel offers neither."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hmnode.process_runtime import ProcessLimits, ProcessRuntime, SandboxUnavailable, \
    sandbox_unavailable

WHY = sandbox_unavailable()
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
                 " echo; cat; echo made > here.txt; pwd", stdin=b"from stdin\n", gpus=(1,))
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
    result = run(tmp_path, PY, "-c", "x = bytearray(1 << 30)", memory_mib=256)
    assert result.exit_code != 0 and b"MemoryError" in result.stderr


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
