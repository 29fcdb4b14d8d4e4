"""Job specs: what a user asks the mesh to run, from a TOML file, a catalog template or flags,
checked here with errors that say what to fix, before anything reaches the chain.

```toml
runtime = "wasm"              # or "process" (only on nodes that allow it)
program = "sieve.wasm"        # a file (.wasm, or .wat text for wasm), relative to the spec
args = ["1000000"]
stdin = "input.txt"           # optional file
cores = 1
memory_mib = 64
time_limit_s = 60             # the job is stopped past this, and billed for at most this
gpu_count = 0
gpu_model = "A100"            # optional: any model when absent
max_price = 100               # credits held in escrow, at most paid
deadline_blocks = 1000        # blocks it may wait for a node and run
replicas = 1                  # nodes that run it (distinct ones), each paid from its escrow
quorum = 1                    # replicas whose results must agree (a majority by default)
fuel = 1_000_000_000          # optional, wasm only: meter the run and stop it past this much
                              # work (deterministic, but tight loops run about 1.6x slower)
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import wasmtime

from hmnode.catalog import TEMPLATES, Template
from hmnode.errors import UsageError
from hmnode.jobs import (MAX_ARG_CHARS, MAX_ARGS, MAX_CORES, MAX_DURATION_S, MAX_FUEL,
                         MAX_GPUS, MAX_MEMORY_MIB, MAX_REPLICAS, RUNTIMES)

MAX_PROGRAM_BYTES = 64 << 20
KEYS = {"runtime", "program", "args", "stdin", "cores", "memory_mib", "time_limit_s", "gpu_count",
        "gpu_model", "max_price", "deadline_blocks", "replicas", "quorum", "fuel"}


@dataclass(frozen=True)
class JobSpec:
    """A checked job: its program's bytes and everything the chain is told about it."""

    runtime: str
    program: bytes
    args: tuple[str, ...] = ()
    stdin: bytes | None = None
    cores: int = 1
    memory_mib: int = 64
    time_limit_s: int = 60
    gpu_count: int = 0
    gpu_model: str | None = None
    max_price: int = 100
    deadline_blocks: int = 1000
    replicas: int = 1
    quorum: int | None = None  # None: a majority of the replicas
    fuel: int | None = None  # None: not metered
    source: str = field(default="", compare=False)  # where it came from, for messages

    def chain_spec(self) -> dict[str, Any]:
        """The `job.submit` fields besides the program (the node adds the blob ids)."""
        spec: dict[str, Any] = {
            "runtime": self.runtime, "cores": self.cores, "memory_mib": self.memory_mib,
            "duration_s": self.time_limit_s, "max_price": self.max_price,
            "gpu_count": self.gpu_count, "args": list(self.args),
            "deadline_blocks": self.deadline_blocks}
        if self.gpu_model is not None:
            spec["gpu_model"] = self.gpu_model
        if self.fuel is not None:
            spec["fuel"] = self.fuel
        if self.replicas > 1:
            spec["replicas"] = self.replicas
            spec["quorum"] = self.quorum if self.quorum is not None else self.replicas // 2 + 1
        return spec


def _int(data: dict[str, Any], name: str, lo: int, hi: int, where: str) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{where}: {name} must be a whole number from {lo} to {hi}, not {value!r}")
    return value


def check(spec: JobSpec) -> JobSpec:
    """`spec` if every field is within bounds; UsageError naming the first that is not."""
    where = spec.source or "job spec"
    if spec.runtime not in RUNTIMES:
        raise UsageError(f"{where}: runtime must be one of {', '.join(RUNTIMES)}, "
                         f"not {spec.runtime!r}")
    if not 0 < len(spec.program) <= MAX_PROGRAM_BYTES:
        raise UsageError(f"{where}: the program must be 1 byte to {MAX_PROGRAM_BYTES >> 20} MiB")
    if spec.runtime == "wasm":
        if not spec.program.startswith(b"\0asm"):
            raise UsageError(f"{where}: a wasm program must be a WebAssembly module (.wasm) or "
                             "its text (.wat)")
        try:
            wasmtime.Module.validate(wasmtime.Engine(), spec.program)
        except wasmtime.WasmtimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise UsageError(f"{where}: the program is not valid WebAssembly: {first}") from None
    if len(spec.args) > MAX_ARGS or any(len(a) > MAX_ARG_CHARS for a in spec.args):
        raise UsageError(f"{where}: at most {MAX_ARGS} args of at most {MAX_ARG_CHARS} characters")
    fields = {"cores": (1, MAX_CORES), "memory_mib": (1, MAX_MEMORY_MIB),
              "time_limit_s": (1, MAX_DURATION_S), "gpu_count": (0, MAX_GPUS),
              "max_price": (1, 1 << 50), "deadline_blocks": (1, 1_000_000),
              "replicas": (1, MAX_REPLICAS)}
    values = {"cores": spec.cores, "memory_mib": spec.memory_mib,
              "time_limit_s": spec.time_limit_s, "gpu_count": spec.gpu_count,
              "max_price": spec.max_price, "deadline_blocks": spec.deadline_blocks,
              "replicas": spec.replicas}
    for name, (lo, hi) in fields.items():
        _int(values, name, lo, hi, where)
    if spec.quorum is not None:
        _int({"quorum": spec.quorum}, "quorum", spec.replicas // 2 + 1, spec.replicas, where)
    if spec.fuel is not None:
        if spec.runtime != "wasm":
            raise UsageError(f"{where}: fuel meters wasm programs only")
        _int({"fuel": spec.fuel}, "fuel", 1, MAX_FUEL, where)
    if spec.gpu_model is not None and not 0 < len(spec.gpu_model) <= 64:
        raise UsageError(f"{where}: gpu_model is 1 to 64 characters")
    return spec


def read_program(path: Path, runtime: str) -> bytes:
    """A program file's bytes: .wat text is assembled to WebAssembly."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the program {path}: {exc.strerror}") from None
    if runtime == "wasm" and path.suffix == ".wat":
        try:
            return wasmtime.wat2wasm(data.decode())
        except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "not text"
            raise UsageError(f"{path} is not valid WebAssembly text: {first}") from None
    return data


def load_spec(path: Path) -> JobSpec:
    """A job spec from a TOML file; UsageError saying what is wrong with it."""
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the job spec {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    runtime = data.get("runtime", "wasm")
    if not isinstance(data.get("program"), str):
        raise UsageError(f"{where}: program must name the program's file")
    args = data.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UsageError(f"{where}: args must be a list of strings")
    stdin = data.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise UsageError(f"{where}: stdin must name a file")
    base = path.parent
    numbers = {k: data[k] for k in ("cores", "memory_mib", "time_limit_s", "gpu_count",
                                    "max_price", "deadline_blocks", "replicas", "quorum", "fuel")
               if k in data}
    return check(JobSpec(
        runtime=str(runtime), program=read_program(base / data["program"], str(runtime)),
        args=tuple(args), stdin=None if stdin is None else _read(base / stdin),
        gpu_model=data.get("gpu_model"), source=where, **numbers))


def from_template(name: str) -> JobSpec:
    """The catalog's template `name` as a job spec."""
    template: Template | None = TEMPLATES.get(name)
    if template is None:
        raise UsageError(f"no template {name!r} in the catalog; `hmnode catalog` lists them "
                         f"({', '.join(sorted(TEMPLATES))})")
    return check(JobSpec(template.runtime, template.program(), template.args,
                         cores=template.cores, memory_mib=template.memory_mib,
                         time_limit_s=template.duration_s, gpu_count=template.gpu_count,
                         source=f"template {name}"))


def with_overrides(spec: JobSpec, **overrides: Any) -> JobSpec:
    """`spec` with the flags a user gave (None: not given) applied and checked again."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return check(replace(spec, **given))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
