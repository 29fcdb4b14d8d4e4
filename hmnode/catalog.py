"""Bundled job templates (`hmnode catalog`, `hmnode submit --template NAME`): what each runs,
with which runtime and resources. The WASM one ships as WebAssembly text inside the package and
is assembled when it is used, so the package carries no binary."""

from __future__ import annotations

from dataclasses import dataclass, field

import wasmtime

# Counts the primes below argv[1] (1,000,000 without it; at most 100,000,000) with a sieve of
# Eratosthenes, one byte per number, and prints "primes below N: COUNT". Exit 2: a bad number;
# exit 3: it could not get the memory.
PRIME_SIEVE_WAT = r"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 400) "primes below ")
  (data (i32.const 420) ": ")
  (data (i32.const 430) "\n")

  ;; argv[1] as a decimal number (at most 100,000,000), or 1,000,000 without one; exit 2 if bad
  (func $limit (result i32)
    (local $argc i32) (local $p i32) (local $n i32) (local $c i32)
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $argc (i32.load (i32.const 16)))
    (if (i32.lt_u (local.get $argc) (i32.const 2)) (then (return (i32.const 1000000))))
    (if (i32.or (i32.gt_u (local.get $argc) (i32.const 8))
                (i32.gt_u (i32.load (i32.const 20)) (i32.const 256)))
      (then (call $proc_exit (i32.const 2))))
    (drop (call $args_get (i32.const 32) (i32.const 128)))
    (local.set $p (i32.load (i32.const 36)))
    (if (i32.eqz (i32.load8_u (local.get $p))) (then (call $proc_exit (i32.const 2))))
    (block $done
      (loop $digits
        (local.set $c (i32.load8_u (local.get $p)))
        (br_if $done (i32.eqz (local.get $c)))
        (if (i32.or (i32.lt_u (local.get $c) (i32.const 48)) (i32.gt_u (local.get $c) (i32.const 57)))
          (then (call $proc_exit (i32.const 2))))
        (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10))
                               (i32.sub (local.get $c) (i32.const 48))))
        (if (i32.gt_u (local.get $n) (i32.const 100000000)) (then (call $proc_exit (i32.const 2))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $digits)))
    (local.get $n))

  ;; the decimal digits of $v written to end just before $end; returns where they start
  (func $utoa (param $v i32) (param $end i32) (result i32)
    (local $p i32)
    (local.set $p (local.get $end))
    (loop $l
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $l (local.get $v)))
    (local.get $p))

  (func (export "_start")
    (local $n i32) (local $i i32) (local $j i32) (local $count i32) (local $need i32) (local $p i32)
    (local.set $n (call $limit))
    ;; one byte per number from offset 1024: grow the memory to hold them
    (local.set $need (i32.add (i32.div_u (i32.add (local.get $n) (i32.const 1024)) (i32.const 65536))
                              (i32.const 1)))
    (if (i32.gt_u (local.get $need) (memory.size))
      (then (if (i32.eq (memory.grow (i32.sub (local.get $need) (memory.size))) (i32.const -1))
              (then (call $proc_exit (i32.const 3))))))
    (local.set $i (i32.const 2))
    (block $end (loop $outer
      (br_if $end (i32.gt_u (i32.mul (local.get $i) (local.get $i)) (local.get $n)))
      (if (i32.eqz (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
        (then
          (local.set $j (i32.mul (local.get $i) (local.get $i)))
          (block $jend (loop $inner
            (br_if $jend (i32.ge_u (local.get $j) (local.get $n)))
            (i32.store8 (i32.add (i32.const 1024) (local.get $j)) (i32.const 1))
            (local.set $j (i32.add (local.get $j) (local.get $i)))
            (br $inner)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $outer)))
    (local.set $i (i32.const 2))
    (block $cend (loop $cl
      (br_if $cend (i32.ge_u (local.get $i) (local.get $n)))
      (if (i32.eqz (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
        (then (local.set $count (i32.add (local.get $count) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $cl)))
    ;; "primes below N: COUNT\n", built backwards to end at 760, in one iovec at 800
    (local.set $p (i32.const 759))
    (i32.store8 (local.get $p) (i32.const 10))
    (local.set $p (call $utoa (local.get $count) (local.get $p)))
    (local.set $p (i32.sub (local.get $p) (i32.const 2)))
    (memory.copy (local.get $p) (i32.const 420) (i32.const 2))
    (local.set $p (call $utoa (local.get $n) (local.get $p)))
    (local.set $p (i32.sub (local.get $p) (i32.const 13)))
    (memory.copy (local.get $p) (i32.const 400) (i32.const 13))
    (i32.store (i32.const 800) (local.get $p))
    (i32.store (i32.const 804) (i32.sub (i32.const 760) (local.get $p)))
    (drop (call $fd_write (i32.const 1) (i32.const 800) (i32.const 1) (i32.const 840))))
)
"""


@dataclass(frozen=True)
class Template:
    """A job ready to submit: its runtime, program, arguments and resources."""

    name: str
    description: str
    runtime: str
    args: tuple[str, ...] = ()
    cores: int = 1
    memory_mib: int = 64
    duration_s: int = 60
    gpu_count: int = 0
    program_text: str = ""  # WebAssembly text (wasm) or a script (process)
    command: tuple[str, ...] = field(default=())

    def program(self) -> bytes:
        """The program's bytes as the job runs them (a WASM module, or the script)."""
        if self.runtime == "wasm":
            return wasmtime.wat2wasm(self.program_text)
        return self.program_text.encode()


# Reads text on stdin and prints its line, word and character counts and its most common
# words (the process runtime, on nodes that run it).
WORD_COUNT_PY = """import collections, sys
text = sys.stdin.read()
words = text.split()
print(f"lines {text.count(chr(10))} words {len(words)} characters {len(text)}")
for word, n in collections.Counter(w.lower() for w in words).most_common(5):
    print(f"{n:8} {word}")
"""

# Says which GPUs the job was given and what the driver sees of them.
GPU_CHECK_SH = """echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
else
    echo "nvidia-smi is not installed on this node"
    exit 1
fi
"""

TEMPLATES: dict[str, Template] = {
    "prime-sieve": Template(
        "prime-sieve", "count the primes below 10,000,000 (WebAssembly, about 0.1 s)", "wasm",
        args=("10000000",), memory_mib=32, duration_s=60, program_text=PRIME_SIEVE_WAT),
    "word-count": Template(
        "word-count", "count the lines and words of stdin with a Python script (process)",
        "process", args=("python3", "program"), memory_mib=256, duration_s=60,
        program_text=WORD_COUNT_PY),
    "gpu-check": Template(
        "gpu-check", "list the GPU the job is given, with nvidia-smi (process, 1 GPU)",
        "process", args=("/bin/sh", "program"), memory_mib=128, duration_s=60, gpu_count=1,
        program_text=GPU_CHECK_SH),
}
