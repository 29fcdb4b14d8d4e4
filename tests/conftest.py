"""Shared test helpers: run the real `hmnode` CLI and real agents in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hmnode.simnet.local import LocalMesh

HMNODE = [sys.executable, "-m", "hmnode"]
READY_TIMEOUT_S = 20.0


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without HMNODE_* settings, plus `extra`.

    Agents listen, and serve their metrics, on free loopback ports unless a test says
    otherwise, so that tests running side by side never fight over the default ports.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMNODE_")}
    env["HMNODE_LISTEN"] = "127.0.0.1:0"
    env["HMNODE_METRICS_LISTEN"] = "127.0.0.1:0"
    env.update(extra)
    return env


def hmnode(*args: str | os.PathLike, env: dict[str, str] | None = None,
           timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run one `hmnode` command to completion."""
    return subprocess.run([*HMNODE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())


def wait_until(check: Callable[[], Any], what: str, timeout: float, poll_s: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class AgentProcess:
    """A real `hmnode run` subprocess on a data dir."""

    data_dir: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=clean_env)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> "AgentProcess":
        self.proc = subprocess.Popen(
            [*HMNODE, "run", "--data-dir", str(self.data_dir), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
        )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Poll `hmnode status --json` until the agent answers; returns the status."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"agent exited {self.proc.returncode} before ready:\n{err}")
            result = hmnode("status", "--json", "--data-dir", self.data_dir, env=self.env)
            if result.returncode == 0:
                return json.loads(result.stdout)
            time.sleep(0.05)
        raise AssertionError(f"agent not ready within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        """Send `sig`, wait for the exit; returns (exit code, stderr)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir path that does not exist yet (short, so the control socket path fits)."""
    return tmp_path / "d"


@pytest.fixture
def agents():
    """Start agents with `agents(data_dir, *args)`; all are killed at teardown."""
    started: list[AgentProcess] = []

    def start(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(data_dir, args, env or clean_env()).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


@pytest.fixture
def mesh_factory() -> Iterator[Any]:
    """`start(n, validators, **up)`: a LocalMesh in a short directory (the control socket paths must
    fit), stopped and removed at teardown."""
    made: list[tuple[LocalMesh, str]] = []

    def start(n: int, validators: int = 1, **up: Any) -> LocalMesh:
        directory = tempfile.mkdtemp(prefix="hmc-")
        mesh = LocalMesh(Path(directory))
        made.append((mesh, directory))
        mesh.up(n, validators=validators, **up)
        return mesh

    yield start
    for mesh, directory in made:
        try:
            if mesh.state_file.exists():
                mesh.down(timeout=5.0)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
