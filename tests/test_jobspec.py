"""Job specs from TOML files, templates and flags: good ones become the chain's job fields,
bad ones are refused with a message that names what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmnode.catalog import TEMPLATES
from hmnode.errors import UsageError
from hmnode.jobspec import from_template, load_spec, with_overrides

WAT = '(module (memory (export "memory") 1) (func (export "_start")))'


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "prog.wat").write_text(WAT)
    (tmp_path / "in.txt").write_text("input")
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_a_toml_spec_becomes_the_chains_job_fields(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, 'program = "prog.wat"\nargs = ["7"]\nstdin = "in.txt"\n'
                                     'cores = 2\nmemory_mib = 128\ntime_limit_s = 30\n'
                                     'max_price = 50\ndeadline_blocks = 20\n'))
    assert spec.program.startswith(b"\0asm") and spec.stdin == b"input"
    assert spec.chain_spec() == {"runtime": "wasm", "cores": 2, "memory_mib": 128,
                                 "duration_s": 30, "max_price": 50, "gpu_count": 0,
                                 "args": ["7"], "deadline_blocks": 20}
    metered = load_spec(write(tmp_path, 'program = "prog.wat"\nfuel = 5_000_000\n'))
    assert metered.chain_spec()["fuel"] == 5_000_000


@pytest.mark.parametrize("text,why", [
    ('program = "prog.wat"\ncores = 0\n', "cores must be a whole number from 1"),
    ('program = "prog.wat"\ncolour = "red"\n', "unknown key colour"),
    ('program = "missing.wasm"\n', "cannot read the program"),
    ('cores = 1\n', "program must name the program's file"),
    ('program = "prog.wat"\nruntime = "docker"\n', "runtime must be one of wasm, process"),
    ('program = "in.txt"\n', "must be a WebAssembly module"),
    ('program = "prog.wat"\nargs = "x"\n', "args must be a list of strings"),
    ('program = "prog.wat"\nreplicas = 9\n', "replicas must be a whole number from 1 to 7"),
    ('program = "prog.wat"\nreplicas = 3\nquorum = 1\n', "quorum must be a whole number from 2 to 3"),
    ('program = [\n', "is not valid TOML"),
    ('program = "prog.wat"\nfuel = 0\n', "fuel must be a whole number from 1"),
    ('program = "in.txt"\nruntime = "process"\nfuel = 10\n', "fuel meters wasm programs only"),
])
def test_bad_specs_say_what_to_fix(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        load_spec(write(tmp_path, text))


def test_bad_webassembly_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'program = "prog.wat"\n')
    (tmp_path / "prog.wat").write_text("(module (func $f (i32.bogus)))")
    with pytest.raises(UsageError, match="not valid WebAssembly text"):
        load_spec(path)
    (tmp_path / "prog.wat").write_text("(module (func $f (i32.add)))")  # parses, fails to validate
    with pytest.raises(UsageError, match="the program is not valid WebAssembly"):
        load_spec(path)


def test_templates_and_flags() -> None:
    spec = from_template("prime-sieve")
    assert spec.runtime == "wasm" and spec.args == TEMPLATES["prime-sieve"].args
    assert with_overrides(spec, args=("100",), cores=None).args == ("100",)
    with pytest.raises(UsageError, match="memory_mib must be"):
        with_overrides(spec, memory_mib=0)
    with pytest.raises(UsageError, match="no template 'nope'"):
        from_template("nope")
