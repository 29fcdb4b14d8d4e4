"""The wasm runtime on real wasmtime and real worker processes: a module runs and its output,
exit code, CPU time (or fuel, when metered) and memory are reported; an infinite loop ends at
its time limit, a memory bomb at its memory limit, fuel runs out, output past the cap is
dropped, a module cannot open a file outside its scratch directory, compiled modules come from
the cache, and no worker outlives the runtime or the node that started it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from hmnode.catalog import TEMPLATES
from hmnode.wasm_runtime import WasmLimits, WasmRejected, WasmRuntime, WasmWorkerFailed

WASI = '(import "wasi_snapshot_preview1" "{name}" (func ${name} {sig}))'
FD_WRITE = WASI.format(name="fd_write", sig="(param i32 i32 i32 i32) (result i32)")
PROC_EXIT = WASI.format(name="proc_exit", sig="(param i32)")
PATH_OPEN = WASI.format(name="path_open",
                        sig="(param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)")
FD_READ = WASI.format(name="fd_read", sig="(param i32 i32 i32 i32) (result i32)")


def module(body: str, *imports: str) -> bytes:
    return wasmtime.wat2wasm(f'(module {" ".join(imports)} (memory (export "memory") 1) {body})')


LOOP = module('(func (export "_start") (loop $l (br $l)))')
# Grows by 1 MiB until refused, then traps, as a program does on a failed allocation.
BOMB = module('''(func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable)''')
# Writes its 64 KiB page to stdout, forever.
FLOOD = module('''(func (export "_start")
    (i32.store (i32.const 0) (i32.const 0)) (i32.store (i32.const 4) (i32.const 65536))
    (loop $l (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
             (br $l)))''', FD_WRITE)
# Opens `path` (in data at 100) under the first preopened directory (fd 3) and exits with the
# WASI errno, or 0 if it opened; then copies what it read to stdout.
def opener(path: str) -> bytes:
    return module(f'''(data (i32.const 100) "{path}")
    (func (export "_start") (local $e i32)
      (local.set $e (call $path_open (i32.const 3) (i32.const 0) (i32.const 100)
                                     (i32.const {len(path)}) (i32.const 0) (i64.const 2)
                                     (i64.const 0) (i32.const 0) (i32.const 200)))
      (if (local.get $e) (then (call $proc_exit (local.get $e))))
      (i32.store (i32.const 300) (i32.const 400)) (i32.store (i32.const 304) (i32.const 100))
      (drop (call $fd_read (i32.load (i32.const 200)) (i32.const 300) (i32.const 1) (i32.const 308)))
      (i32.store (i32.const 304) (i32.load (i32.const 308)))
      (drop (call $fd_write (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 308))))''',
                  FD_WRITE, PROC_EXIT, PATH_OPEN, FD_READ)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[WasmRuntime]:
    rt = WasmRuntime(tmp_path / "cache")
    yield rt
    rt.close()


def run(rt: WasmRuntime, tmp_path: Path, wasm: bytes, args: list[str] = [],
        **limits: object) -> object:
    settings = dict(time_s=5.0, memory_mib=64)
    settings.update(limits)
    return rt.run(wasm, args, b"", tmp_path / "scratch", tmp_path / "work",
                  WasmLimits(**settings))  # type: ignore[arg-type]


def test_the_prime_sieve_runs_and_reports_its_work(runtime: WasmRuntime, tmp_path: Path) -> None:
    wasm = TEMPLATES["prime-sieve"].program()
    result = run(runtime, tmp_path, wasm, ["1000000"])
    assert result.ok and result.stdout == b"primes below 1000000: 78498\n"
    assert result.fuel == 0 and 1 <= result.peak_memory_mib <= 2
    assert 0 < result.cpu_ms <= result.wall_ms + 50
    # Asked for a fuel budget, the run is metered: the same answer, and the fuel it burned.
    metered = run(runtime, tmp_path, wasm, ["1000000"], fuel=10**12)
    assert metered.stdout == result.stdout and metered.fuel > 1_000_000
    bad = run(runtime, tmp_path, wasm, ["12x"])
    assert bad.exit_code == 2 and bad.reason == "exited" and not bad.ok


def test_an_infinite_loop_ends_at_its_time_limit(runtime: WasmRuntime, tmp_path: Path) -> None:
    result = run(runtime, tmp_path, LOOP, time_s=0.3)
    assert result.reason == "time limit: it ran past 0.3 s" and result.exit_code != 0
    assert 250 <= result.wall_ms < 3000


def test_a_memory_bomb_ends_at_its_memory_limit(runtime: WasmRuntime, tmp_path: Path) -> None:
    result = run(runtime, tmp_path, BOMB, memory_mib=32)
    assert result.reason == "memory limit: it asked for more than 32 MiB"
    assert 30 <= result.peak_memory_mib <= 32
    trapped = run(runtime, tmp_path, module('(func (export "_start") unreachable)'))
    assert trapped.reason.startswith("trap: ") and "unreachable" in trapped.reason


def test_fuel_runs_out(runtime: WasmRuntime, tmp_path: Path) -> None:
    result = run(runtime, tmp_path, LOOP, fuel=100_000)
    assert result.reason.startswith("fuel limit") and result.fuel == 100_000


def test_output_is_capped(runtime: WasmRuntime, tmp_path: Path) -> None:
    result = run(runtime, tmp_path, FLOOD, time_s=0.3, output_bytes=100_000)
    assert len(result.stdout) == 100_000 and result.reason.startswith("time limit")


def test_only_the_scratch_directory_can_be_opened(runtime: WasmRuntime, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "input.txt").write_text("inside")
    inside = run(runtime, tmp_path, opener("input.txt"))
    assert inside.ok and inside.stdout == b"inside"
    for escape in ("../secret", "/etc/passwd", "../../../../../etc/passwd"):
        result = run(runtime, tmp_path, opener(escape))
        assert result.exit_code != 0 and result.stdout == b"", escape


def test_bad_modules_are_refused_and_compiled_ones_cached(runtime: WasmRuntime,
                                                          tmp_path: Path) -> None:
    with pytest.raises(WasmRejected, match="not a valid WebAssembly module"):
        runtime.module(b"\x00asm garbage")
    with pytest.raises(WasmRejected, match="no `_start`"):
        runtime.module(module('(func (export "main"))'))
    wasm = TEMPLATES["prime-sieve"].program()
    assert runtime.module(wasm)[1] is False
    assert runtime.module(wasm)[1] is True
    # A new runtime over the same cache directory loads it compiled from disk.
    again = WasmRuntime(tmp_path / "cache")
    try:
        assert again.module(wasm)[1] is True
        assert run(again, tmp_path, wasm, ["100"]).stdout == b"primes below 100: 25\n"
    finally:
        again.close()


def _workers() -> set[int]:
    """Pids of this machine's wasm workers."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"hmnode.wasm_worker" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def test_closing_the_runtime_kills_its_running_worker(tmp_path: Path) -> None:
    rt = WasmRuntime(tmp_path / "cache")
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_try_run(rt, tmp_path, LOOP)))
    before = _workers()
    thread.start()
    time.sleep(1.0)
    assert _workers() - before, "a worker runs the loop"
    started = time.monotonic()
    rt.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert isinstance(outcome[0], WasmWorkerFailed)
    assert not (_workers() - before)


def _try_run(rt: WasmRuntime, tmp_path: Path, wasm: bytes) -> object:
    try:
        return run(rt, tmp_path, wasm, time_s=60.0)
    except WasmWorkerFailed as exc:
        return exc


def test_a_worker_dies_with_the_node_that_started_it(tmp_path: Path) -> None:
    """A node killed with SIGKILL mid-run leaves no worker spinning on its loop."""
    loop = tmp_path / "loop.wasm"
    loop.write_bytes(LOOP)
    script = (
        "import sys; from pathlib import Path\n"
        "from hmnode.wasm_runtime import WasmRuntime, WasmLimits\n"
        f"rt = WasmRuntime(Path({str(tmp_path / 'cache')!r}))\n"
        f"rt.run(Path({str(loop)!r}).read_bytes(), [], b'', Path({str(tmp_path / 's')!r}),\n"
        f"       Path({str(tmp_path / 'w')!r}), WasmLimits(time_s=120.0, memory_mib=16))\n")
    before = _workers()
    node = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while len(_workers() - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the running worker and the spare
        assert len(_workers() - before) == 2
        node.kill()
        node.wait()
        deadline = time.monotonic() + 5
        while _workers() - before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (_workers() - before), "workers outlived the node"
    finally:
        node.kill()


def test_a_suspended_run_stops_and_its_time_limit_waits(runtime: WasmRuntime,
                                                        tmp_path: Path) -> None:
    assert runtime.warm()
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(run(runtime, tmp_path, LOOP,
                                                                time_s=1.0)))
    thread.start()
    time.sleep(0.4)
    runtime.suspend()
    time.sleep(1.5)  # past the time limit, had the clock run
    assert thread.is_alive()
    runtime.resume()
    thread.join(timeout=10)
    (result,) = outcome
    assert result.reason == "time limit: it ran past 1 s"
    # It ran about one second of its 2.5 s: suspended, it used no CPU.
    assert result.wall_ms >= 2400 and result.cpu_ms <= result.wall_ms - 1000


def test_a_run_can_be_killed_by_its_token(runtime: WasmRuntime, tmp_path: Path) -> None:
    outcome: list = []

    def go() -> None:
        try:
            runtime.run(LOOP, [], b"", tmp_path / "s", tmp_path / "w",
                        WasmLimits(time_s=30.0, memory_mib=16), token="job-1")
        except WasmWorkerFailed as exc:
            outcome.append(exc)
    thread = threading.Thread(target=go)
    thread.start()
    deadline = time.monotonic() + 10
    while not runtime.kill("job-1") and time.monotonic() < deadline:
        time.sleep(0.05)
    thread.join(timeout=5)
    assert not thread.is_alive() and "SIGKILL" in str(outcome[0])
    assert runtime.kill("job-1") is False  # gone
