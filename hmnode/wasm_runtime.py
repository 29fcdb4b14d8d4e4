"""The `wasm` runtime: a WASI module run by wasmtime in a worker process of its own.

- Isolation: every run gets a fresh worker process (`hmnode.wasm_worker`), so a run can leave
  nothing behind for the next and a crash in wasmtime cannot take the node down. One spare
  worker is kept started, so a run does not wait for Python and wasmtime to load.
- Time: the node kills the worker at the run's time limit (and the worker kills itself a
  moment later, should the node be gone). No per-loop checks are compiled in: epoch
  interruption cost a third of a tight loop's speed, and a contributor is paid by the time
  measured, so that third would be billed to the submitter for nothing.
- Work: CPU time of the run, from the worker's own accounting; fuel only when a run asks for
  a fuel budget (`WasmLimits.fuel`), which costs more than half again on tight loops but is
  deterministic: running out ends the run with that reason.
- Memory: store limits cap the linear memory; a module that grows past it gets no memory and,
  as modules do, traps.
- Files: WASI with only the job's scratch directory preopened (as `/`), so nothing outside it
  can be named; no sockets (WASI preview 1 has none); stdin from a file outside the scratch
  directory; stdout and stderr written beside it, each kept up to `output_bytes`.
- Compiled modules are cached on disk by the hash of their bytes and the engine's settings;
  a worker maps the compiled file instead of compiling.
"""

from __future__ import annotations

import hashlib
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
import wasmtime

from hmnode.errors import HmnodeError
from hmnode.pause_clock import PauseClock
from hmnode.run_result import RunResult

PAGE_BYTES = 64 << 10
DEFAULT_OUTPUT_BYTES = 16 << 20
WORKER_START_S = 30.0  # a worker that is not ready by then is broken, not slow
SPARE_DELAY_S = 1.0  # the next spare starts when a run ends, or this long after it started
KILL_GRACE_S = 1.0
WAKE_S = 1.0  # how often a waiting run looks at its (pausable) deadline  # past its time limit, how long a worker may take to end by itself


class WasmRejected(HmnodeError):
    """A module that is not valid WebAssembly, or does not export `_start`."""


class WasmWorkerFailed(HmnodeError):
    """The worker process that runs modules could not be started or died unexplained."""


@dataclass(frozen=True)
class WasmLimits:
    """What one run may use. `fuel`, when set, meters the run (deterministic, slower)."""

    time_s: float
    memory_mib: int
    fuel: int | None = None
    output_bytes: int = DEFAULT_OUTPUT_BYTES


def make_engine(metered: bool) -> wasmtime.Engine:
    """The engine both the node (to compile) and a worker (to run) use: compiled modules are
    only valid for an engine of the same settings."""
    config = wasmtime.Config()
    config.consume_fuel = metered
    return wasmtime.Engine(config)


class WasmRuntime:
    """Compiles and caches modules, and runs each in a fresh worker process."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._engines: dict[bool, wasmtime.Engine] = {}
        self._compiled: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._spares: queue.Queue[_Worker] = queue.Queue(maxsize=1)
        self._taken = threading.Event()
        self._run_ended = threading.Event()
        self._running: dict[str, _Worker] = {}  # by the token a run was given
        self.clock = PauseClock()  # stands still while runs are suspended
        self._ending: list[_Worker] = []  # answered, not yet reaped
        self._spawner: threading.Thread | None = None

    def close(self) -> None:
        """Kill the spare and every running worker (their runs are lost: the executor runs
        a job found unfinished again at the next start)."""
        self._stop.set()
        if self._spawner is not None:
            self._spawner.join(timeout=WORKER_START_S)
        with self._lock:
            doomed = list(self._running.values()) + self._ending
        while not self._spares.empty():
            doomed.append(self._spares.get_nowait())
        for worker in doomed:
            worker.kill()
        for worker in doomed:
            try:
                worker.proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass  # unkillable for now (a stuck disk): its parent's death still ends it

    # --- modules --------------------------------------------------------------------------------

    def module(self, wasm: bytes, metered: bool = False) -> tuple[Path, bool]:
        """The compiled file for `wasm` and whether it was already there; WasmRejected for
        bytes that are not a WASI command."""
        digest = hashlib.sha256(wasm).hexdigest()
        path = self.cache_dir / f"{digest}-{'metered' if metered else 'plain'}.cwasm"
        with self._lock:
            if path in self._compiled:
                return path, True
            engine = self._engines.get(metered)
            if engine is None:
                engine = self._engines[metered] = make_engine(metered)
        cached = path.exists() and _loads(engine, path)
        if not cached:
            try:
                module = wasmtime.Module(engine, wasm)
            except wasmtime.WasmtimeError as exc:
                raise WasmRejected(f"not a valid WebAssembly module: {_first_line(exc)}") from None
            if not any(e.name == "_start" for e in module.exports):
                raise WasmRejected("the module exports no `_start` function (a WASI command "
                                   "has one)")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(module.serialize())
            tmp.replace(path)
        with self._lock:
            self._compiled.add(path)
        return path, cached

    # --- runs -----------------------------------------------------------------------------------

    def run(self, wasm: bytes, args: list[str], stdin: bytes, scratch: Path, work: Path,
            limits: WasmLimits, token: str | None = None) -> RunResult:
        """Run `wasm`'s `_start` with `args`, `stdin`, and `scratch` as its only directory;
        `work` (outside `scratch`) holds its stdin and captured output. Blocks until it ends.
        `token` names the run for `kill`."""
        token = token or f"run-{id(work)}-{time.monotonic_ns()}"
        compiled, _ = self.module(wasm, metered=limits.fuel is not None)
        started = time.perf_counter()
        work.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        (work / "stdin").write_bytes(stdin)
        worker = self._take_worker(token)
        try:
            request = {"module": str(compiled), "args": args, "stdin": str(work / "stdin"),
                       "scratch": str(scratch), "stdout": str(work / "stdout"),
                       "stderr": str(work / "stderr"), "memory_mib": limits.memory_mib,
                       "fuel": limits.fuel, "output_bytes": limits.output_bytes,
                       "time_s": limits.time_s}
            reply, cpu_ms = worker.serve(request, limits.time_s, self.clock)
        finally:
            with self._lock:
                self._running.pop(token, None)
                self._ending = [w for w in self._ending if not w.reap()] + [worker]
            self._run_ended.set()
        wall_ms = round((time.perf_counter() - started) * 1000)
        out, err = _read(work / "stdout"), _read(work / "stderr")
        if reply is None:
            if worker.timed_out:
                return RunResult(1, f"time limit: it ran past {limits.time_s:g} s", out, err,
                                 wall_ms, cpu_ms)
            raise WasmWorkerFailed(f"the wasm worker died ({worker.ended_by}); its errors are "
                                   f"in {self.cache_dir / 'worker.log'}")
        reason, peak = reply["reason"], reply["peak_bytes"]
        if reason == "out of fuel":
            reason = f"fuel limit: it burned all {limits.fuel} units of fuel"
        # A refused memory.grow is not reported as such; a module that traps with its memory
        # nearly full (90%) is taken to have died of it, as a program whose allocation failed.
        if reason.startswith("trap") and peak * 10 >= (limits.memory_mib << 20) * 9:
            reason = f"memory limit: it asked for more than {limits.memory_mib} MiB"
        return RunResult(reply["exit_code"], reason, out, err, wall_ms, cpu_ms,
                         reply["fuel"], -(-peak // (1 << 20)))

    def warm(self, timeout: float = WORKER_START_S) -> bool:
        """Start the spare worker if none is, and wait up to `timeout` for it to be ready:
        the next run then starts at once. Whether it is ready."""
        self._start_spawner()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._spares.mutex:
                spare = self._spares.queue[0] if self._spares.queue else None
            if spare is not None and spare.is_ready():
                return True
            time.sleep(0.005)
        return False

    def _start_spawner(self) -> None:
        with self._lock:
            if self._stop.is_set():
                raise WasmWorkerFailed("the wasm runtime is closed")
            if self._spawner is None:
                # Workers are started by one long-lived thread: a worker dies with the thread
                # that started it (PR_SET_PDEATHSIG), and must not die with a run's thread.
                self._spawner = threading.Thread(target=self._keep_spare, name="wasm-spawner",
                                                 daemon=True)
                self._spawner.start()

    def suspend(self) -> None:
        """Stop every run where it is (SIGSTOP) and the clock of their time limits."""
        self.clock.pause()
        with self._lock:
            for worker in self._running.values():
                worker.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let suspended runs go on."""
        with self._lock:
            for worker in self._running.values():
                worker.signal(signal.SIGCONT)
        self.clock.resume()

    def kill(self, token: str) -> bool:
        """End the run named `token` now (it fails with WasmWorkerFailed); whether it ran."""
        with self._lock:
            worker = self._running.get(token)
        if worker is not None:
            worker.kill()
        return worker is not None

    def _take_worker(self, token: str) -> _Worker:
        self._start_spawner()
        try:
            worker = self._spares.get(timeout=WORKER_START_S)
        except queue.Empty:
            raise WasmWorkerFailed(f"no wasm worker started within {WORKER_START_S:g} s") from None
        self._taken.set()
        worker.wait_ready()
        with self._lock:
            self._running[token] = worker
            if self.clock.paused:  # suspended meanwhile: so is this one
                worker.signal(signal.SIGSTOP)
        return worker

    def _keep_spare(self) -> None:
        """Keep exactly one started worker waiting: start the next once the last is taken."""
        log = self.cache_dir / "worker.log"
        while not self._stop.is_set():
            try:
                worker = _Worker.start(log)
            except OSError:
                self._stop.wait(1.0)
                continue
            self._spares.put(worker)
            while not self._taken.wait(0.2):
                if self._stop.is_set():
                    return  # close() kills the spare
            self._taken.clear()
            # Python and wasmtime loading take a quarter of a second of CPU: not while the
            # run that took the spare starts, unless it runs long.
            self._run_ended.wait(SPARE_DELAY_S)
            self._run_ended.clear()


class _Worker:
    """One worker process: started ahead, given one run, then gone."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.ready_cpu_s = 0.0
        self.timed_out = False
        self.ended_by = ""

    @classmethod
    def start(cls, log: Path) -> _Worker:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as errors:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hmnode.wasm_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=errors, close_fds=True,
                env={k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH")})
        return cls(proc)

    def is_ready(self) -> bool:
        """Whether the worker has said it is ready (without waiting)."""
        assert self.proc.stdout is not None
        return bool(select.select([self.proc.stdout], [], [], 0)[0])

    def wait_ready(self) -> None:
        """Block until the worker has loaded wasmtime (it says so with its CPU time so far)."""
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready.startswith(b"ready "):
            self.kill()
            raise WasmWorkerFailed("the wasm worker did not start; is wasmtime installed?")
        self.ready_cpu_s = float(ready.split()[1])

    def serve(self, request: dict[str, Any], time_s: float,
              clock: PauseClock) -> tuple[dict | None, int]:
        """Hand the worker its run and wait for its reply, killing it at the time limit (on
        `clock`, which stands still while the run is suspended); the reply (None if it gave
        none) and the run's CPU milliseconds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(msgpack.packb(request, use_bin_type=True))
            self.proc.stdin.close()
        except OSError:
            pass  # it died: its status says how
        deadline = clock.now() + time_s
        while True:
            left = deadline - clock.now()
            if left <= 0:
                self.timed_out, reply = True, None
                self.kill()
                break
            if select.select([self.proc.stdout], [], [], min(left, WAKE_S))[0]:
                reply = _read_reply(self.proc.stdout)
                break
        if reply is not None:
            # It has answered and is ending: reaped later (`reap`), so the run's result does
            # not wait for the process to be torn down.
            return reply, max(0, round((reply["cpu_s"] - self.ready_cpu_s) * 1000))
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.ended_by = (f"signal {signal.Signals(-self.proc.returncode).name}"
                         if self.proc.returncode < 0 else f"exit {self.proc.returncode}")
        cpu_s = usage.ru_utime + usage.ru_stime - self.ready_cpu_s
        return None, max(0, round(cpu_s * 1000))

    def reap(self) -> bool:
        """Whether the worker has ended (and is reaped)."""
        return self.proc.poll() is not None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except OSError:
                pass


def _read_reply(stream: IO[bytes]) -> dict | None:
    """The worker's length-prefixed reply; None if it died first."""
    try:
        size = int.from_bytes(stream.read(4) or b"\xff" * 4, "big")
        data = stream.read(size) if size < 1 << 20 else b""
        reply = msgpack.unpackb(data, raw=False) if len(data) == size else None
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    return reply if isinstance(reply, dict) else None


def _loads(engine: wasmtime.Engine, path: Path) -> bool:
    """Whether the compiled file at `path` is usable by `engine` (one left by another
    wasmtime version is not: it is compiled again)."""
    try:
        wasmtime.Module.deserialize_file(engine, str(path))
        return True
    except wasmtime.WasmtimeError:
        path.unlink(missing_ok=True)
        return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
