"""Time from `hmnode run` to a ready control API, stop time, and idle RSS, against bare Python.

Each run starts a real agent process on a fresh data dir (first start: key, config and store are
created), then restarts it on the same dir. The baseline is the same interpreter starting, and
idling, with nothing imported: the ratio is what hmnode adds over Python itself.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from hmnode import control
from hmnode.datadir import DataDir
from hmnode.errors import HmnodeError

READY_TIMEOUT_S = 30.0
STEPS_PER_RUN = 1
IDLE_S = 2.0


def _wait_ready(proc: subprocess.Popen, socket: Path, started: float) -> float:
    deadline = started + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode} before it was ready")
        try:
            control.call(socket, "status", timeout=1.0)
            return time.monotonic() - started
        except HmnodeError:
            time.sleep(0.005)
    raise RuntimeError(f"agent not ready within {READY_TIMEOUT_S} s")


def _agent_once(data_dir: DataDir) -> tuple[float, float, int]:
    """(seconds to ready, seconds to stop after SIGTERM, idle RSS bytes) of one agent run."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hmnode", "run", "--data-dir", str(data_dir.path),
         "--listen", "127.0.0.1:0", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = _wait_ready(proc, data_dir.control_socket, started)
        time.sleep(IDLE_S)
        rss = psutil.Process(proc.pid).memory_info().rss
        stop_started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        if code != 0:
            raise RuntimeError(f"agent exited with {code} after SIGTERM")
        return ready, time.monotonic() - stop_started, rss
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _baseline_once() -> tuple[float, int]:
    """(seconds for bare Python to start and exit, RSS of a bare Python process idling)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    elapsed = time.monotonic() - started
    return elapsed, bare_python_rss()


def bare_python_rss() -> int:
    """RSS of a bare Python interpreter idling, in bytes (a baseline for a node's RSS)."""
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        return psutil.Process(idle.pid).memory_info().rss
    finally:
        idle.kill()
        idle.wait()


def run(runs: int = 5, progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Measure `runs` first starts and restarts; returns the medians and their ratios."""
    first, restart, stop, rss, base_start, base_rss = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="hmbench") as tmp:
        for i in range(runs):
            dd = DataDir(Path(tmp) / f"n{i}")
            ready, stopped, mem = _agent_once(dd)
            first.append(ready)
            stop.append(stopped)
            ready, stopped, mem = _agent_once(dd)
            restart.append(ready)
            stop.append(stopped)
            rss.append(mem)
            elapsed, mem = _baseline_once()
            base_start.append(elapsed)
            base_rss.append(mem)
            progress(1)
    med = statistics.median
    mib = 1 << 20
    return {
        "name": "startup",
        "runs": runs,
        "ready_s": round(med(first), 4),
        "restart_ready_s": round(med(restart), 4),
        "stop_s": round(med(stop), 4),
        "idle_rss_mib": round(med(rss) / mib, 1),
        "baseline_start_s": round(med(base_start), 4),
        "baseline_rss_mib": round(med(base_rss) / mib, 1),
        "ready_ratio": round(med(first) / med(base_start), 2),
        "rss_ratio": round(med(rss) / med(base_rss), 2),
    }


def report(figures: dict[str, Any]) -> list[str]:
    """Human-readable lines: each figure beside its baseline."""
    return [
        f"ready after start     {figures['ready_s'] * 1000:8.1f} ms  (first start, creates key and store)",
        f"ready after restart   {figures['restart_ready_s'] * 1000:8.1f} ms",
        f"bare python start     {figures['baseline_start_s'] * 1000:8.1f} ms  "
        f"-> ratio {figures['ready_ratio']:.2f}",
        f"stop after SIGTERM    {figures['stop_s'] * 1000:8.1f} ms",
        f"idle RSS              {figures['idle_rss_mib']:8.1f} MiB",
        f"bare python RSS       {figures['baseline_rss_mib']:8.1f} MiB -> ratio {figures['rss_ratio']:.2f}",
    ]
