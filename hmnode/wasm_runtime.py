"""The `wasm` runtime: a WASI module run by wasmtime in a sandbox of its own.

- Time: epoch interruption. One ticker thread advances the engine's epoch every TICK_S; each
  run's store is interrupted after its time limit in ticks, so runs never disturb each other.
- Work: fuel metering. A run gets a fuel budget; what it burned is the measured work a receipt
  reports (and running out ends it with that reason).
- Memory: store limits cap the linear memory; a module that grows past it gets no memory and,
  as modules do, traps.
- Files: WASI with only the job's scratch directory preopened (as `/`), so nothing outside it
  can be named; no sockets (WASI preview 1 has none); stdin from a file outside the scratch
  directory; stdout and stderr captured in memory, each kept up to `output_bytes`.
- Compiled modules are cached in memory and on disk by the hash of their bytes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from hmnode.errors import HmnodeError
from hmnode.run_result import RunResult

TICK_S = 0.01
MAX_FUEL = (1 << 63) - 1
MODULES_CACHED = 32  # compiled modules kept in memory
PAGE_BYTES = 64 << 10
DEFAULT_OUTPUT_BYTES = 16 << 20


class WasmRejected(HmnodeError):
    """A module that is not valid WebAssembly, or does not export `_start`."""


@dataclass(frozen=True)
class WasmLimits:
    """What one run may use."""

    time_s: float
    memory_mib: int
    fuel: int = MAX_FUEL
    output_bytes: int = DEFAULT_OUTPUT_BYTES


class WasmRuntime:
    """One wasmtime engine, its epoch ticker and its compiled-module cache."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self.cache_dir = cache_dir
        self._modules: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop the epoch ticker."""
        self._stop.set()
        self._ticker.join(timeout=1.0)

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self.engine.increment_epoch()

    # --- modules --------------------------------------------------------------------------------

    def module(self, wasm: bytes) -> tuple[wasmtime.Module, bool]:
        """The compiled module for `wasm` and whether it came from the cache."""
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            found = self._modules.get(digest)
            if found is not None:
                self._modules.move_to_end(digest)
                return found, True
        module, cached = self._load_or_compile(digest, wasm)
        with self._lock:
            self._modules[digest] = module
            while len(self._modules) > MODULES_CACHED:
                self._modules.popitem(last=False)
        return module, cached

    def _load_or_compile(self, digest: str, wasm: bytes) -> tuple[wasmtime.Module, bool]:
        path = None if self.cache_dir is None else self.cache_dir / f"{digest}.cwasm"
        if path is not None and path.exists():
            try:
                return wasmtime.Module.deserialize_file(self.engine, str(path)), True
            except wasmtime.WasmtimeError:
                path.unlink(missing_ok=True)  # from another wasmtime version: compile again
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise WasmRejected(f"not a valid WebAssembly module: {_first_line(exc)}") from None
        if not any(e.name == "_start" for e in module.exports):
            raise WasmRejected("the module exports no `_start` function (a WASI command has one)")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(module.serialize())
            tmp.replace(path)
        return module, False

    # --- runs -----------------------------------------------------------------------------------

    def run(self, wasm: bytes, args: list[str], stdin: bytes, scratch: Path, work: Path,
            limits: WasmLimits) -> RunResult:
        """Run `wasm`'s `_start` with `args`, `stdin`, and `scratch` as its only directory;
        `work` (outside `scratch`) holds its captured output. Blocks until it ends."""
        module, _ = self.module(wasm)
        started, cpu_started = time.perf_counter(), time.thread_time()
        work.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        stdin_path = work / "stdin"
        stdin_path.write_bytes(stdin)
        out, err = _Capped(limits.output_bytes), _Capped(limits.output_bytes)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["job", *args]
        wasi.env = []
        wasi.stdin_file = str(stdin_path)
        wasi.stdout_custom = out.write
        wasi.stderr_custom = err.write
        wasi.preopen_dir(str(scratch), "/")
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasi)
        store.set_limits(memory_size=limits.memory_mib << 20)
        store.set_fuel(limits.fuel)
        store.set_epoch_deadline(max(1, round(limits.time_s / TICK_S)))
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        exit_code, reason = 0, "exited"
        instance = None
        try:
            instance = linker.instantiate(store, module)
            start = instance.exports(store)["_start"]
            assert isinstance(start, wasmtime.Func)
            start(store)
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
        except wasmtime.Trap as exc:
            exit_code, reason = 1, _trap_reason(exc, limits)
        except wasmtime.WasmtimeError as exc:  # a host call refused what the module passed it
            exit_code, reason = 1, f"error: {_cause(exc)}"
        fuel = limits.fuel - store.get_fuel()
        peak = 0
        if instance is not None:
            memory = instance.exports(store).get("memory")
            if isinstance(memory, wasmtime.Memory):
                peak = memory.size(store) * PAGE_BYTES
        # A refused memory.grow is not reported as such; a module that traps with its memory
        # nearly full (90%) is taken to have died of it, as a program whose allocation failed.
        if reason.startswith("trap") and peak * 10 >= (limits.memory_mib << 20) * 9:
            reason = f"memory limit: it asked for more than {limits.memory_mib} MiB"
        return RunResult(exit_code, reason, out.data(), err.data(),
                          round((time.perf_counter() - started) * 1000),
                          round((time.thread_time() - cpu_started) * 1000), fuel,
                          -(-peak // (1 << 20)))


def _trap_reason(exc: wasmtime.Trap, limits: WasmLimits) -> str:
    code = exc.trap_code
    if code == wasmtime.TrapCode.INTERRUPT:
        return f"time limit: it ran past {limits.time_s:g} s"
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return f"fuel limit: it burned all {limits.fuel} units of fuel"
    return f"trap: {_cause(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cause(exc: BaseException) -> str:
    """The innermost cause wasmtime gives (its first line is only "error while executing")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Caused by:" in lines:
        cause = lines[-1]
        return cause.split(":", 1)[1].strip() if cause[:1].isdigit() else cause
    return lines[0] if lines else type(exc).__name__


class _Capped:
    """Captured output, kept up to `limit` bytes; the rest is counted and dropped, so a module
    that writes without end fills neither memory nor disk."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def write(self, data: bytes) -> int:
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(bytes(data[:room]))
            self.kept += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))
        return len(data)

    def data(self) -> bytes:
        return b"".join(self.parts)
