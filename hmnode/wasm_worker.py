"""A worker process of the wasm runtime: loads wasmtime, says it is ready, reads one run
from stdin, runs it and writes its outcome to stdout. Started ahead by `WasmRuntime`, which
kills it at the run's time limit; it dies with the node (PR_SET_PDEATHSIG) and, should that
fail, kills itself a moment past the time limit."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Any

import msgpack

_PR_SET_PDEATHSIG = 1
SELF_KILL_GRACE_S = 2.0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the self-kill past the time limit still holds
    if os.getppid() == 1:
        os._exit(1)  # the node died before the line above took effect


class CappedFile:
    """A run's stdout or stderr: written to a file up to `limit` bytes; the rest is dropped,
    so a module that writes without end fills neither memory nor disk."""

    def __init__(self, path: str, limit: int) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed when the process ends
        self.room = limit

    def write(self, data: bytes) -> int:
        if self.room > 0:
            kept = bytes(data[:self.room])
            self.file.write(kept)
            self.file.flush()
            self.room -= len(kept)
        return len(data)


def prepare(metered: bool) -> tuple[Any, Any]:
    """An engine and a WASI linker for it (made before a run is asked for, when unmetered)."""
    import wasmtime

    from hmnode.wasm_runtime import make_engine

    engine = make_engine(metered)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    return engine, linker


def run(request: dict[str, Any], prepared: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run the module `request` names; its exit code, reason, fuel burned, memory size, and
    this process's CPU seconds when it ended."""
    import wasmtime

    metered = request["fuel"] is not None
    engine, linker = prepared if prepared is not None and not metered else prepare(metered)
    module = wasmtime.Module.deserialize_file(engine, request["module"])
    out = CappedFile(request["stdout"], request["output_bytes"])
    err = CappedFile(request["stderr"], request["output_bytes"])
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["job", *request["args"]]
    wasi.env = []
    wasi.stdin_file = request["stdin"]
    wasi.stdout_custom = out.write
    wasi.stderr_custom = err.write
    wasi.preopen_dir(request["scratch"], "/")
    store = wasmtime.Store(engine)
    store.set_wasi(wasi)
    store.set_limits(memory_size=request["memory_mib"] << 20)
    if metered:
        store.set_fuel(request["fuel"])
    exit_code, reason, instance = 0, "exited", None
    try:
        instance = linker.instantiate(store, module)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
    except wasmtime.ExitTrap as exc:
        exit_code = exc.code
    except wasmtime.Trap as exc:
        exit_code = 1
        reason = ("out of fuel" if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL
                  else f"trap: {_cause(exc)}")
    except wasmtime.WasmtimeError as exc:  # a host call refused what the module passed it
        exit_code, reason = 1, f"error: {_cause(exc)}"
    peak = 0
    if instance is not None:
        memory = instance.exports(store).get("memory")
        if isinstance(memory, wasmtime.Memory):
            peak = memory.size(store) * (64 << 10)
    fuel = request["fuel"] - store.get_fuel() if metered else 0
    return {"exit_code": exit_code, "reason": reason, "fuel": fuel, "peak_bytes": peak,
            "cpu_s": time.process_time()}


def _cause(exc: BaseException) -> str:
    """The innermost cause wasmtime gives (its first line is only "error while executing")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Caused by:" in lines:
        cause = lines[-1]
        return cause.split(":", 1)[1].strip() if cause[:1].isdigit() else cause
    return lines[0] if lines else type(exc).__name__


def main() -> None:
    _die_with_parent()
    # Loaded and linked before "ready", so a run does not wait for it.
    prepared = prepare(metered=False)
    sys.stdout.buffer.write(f"ready {time.process_time():.6f}\n".encode())
    sys.stdout.buffer.flush()
    data = sys.stdin.buffer.read()
    if not data:
        os._exit(0)  # the node closed without giving it a run
    request = msgpack.unpackb(data, raw=False)
    # SIGPROF's default action ends the process: the self-kill needs no thread. It counts CPU
    # time, which stands still while the node has the run suspended.
    signal.setitimer(signal.ITIMER_PROF, request["time_s"] + SELF_KILL_GRACE_S)
    reply = msgpack.packb(run(request, prepared), use_bin_type=True)
    # Length first: the node takes the reply without waiting for this process to be torn down.
    sys.stdout.buffer.write(len(reply).to_bytes(4, "big") + reply)
    sys.stdout.buffer.flush()
    os._exit(0)  # nothing to tear down; quicker than the interpreter's exit


if __name__ == "__main__":
    main()
