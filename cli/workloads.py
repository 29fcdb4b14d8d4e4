"""`hmnode submit`, `hmnode job`, `hmnode result`, `hmnode cancel` and `hmnode catalog`: jobs
for the mesh, through the running node (which keeps their blobs and signs with its key)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from hmnode import control
from hmnode.blob_control import fetch_result, upload_blob
from hmnode.catalog import TEMPLATES
from hmnode.cli.options import data_dir_option, json_option, print_json, resolve_data_dir
from hmnode.errors import ControlError, UsageError
from hmnode.jobspec import JobSpec, check, from_template, load_spec, read_program, with_overrides

SETTLED = ("settled", "rejected", "expired", "cancelled", "lapsed")
BAR_BYTES = 4 << 20  # transfers smaller than this show no progress bar
T = TypeVar("T")
POLL_S = 0.2


def _call(data_dir: Path | None, method: str, params: dict[str, Any], timeout: float = 10) -> Any:
    return _guard(lambda: control.call(resolve_data_dir(data_dir).control_socket, method,
                                       params, timeout=timeout))


@click.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--template", "template", metavar="NAME", help="A job from `hmnode catalog`.")
@click.option("--wasm", "wasm", type=click.Path(dir_okay=False, path_type=Path),
              help="A WebAssembly module (.wasm, or .wat text) to run.")
@click.option("--cmd", "cmd", metavar="COMMAND",
              help="A shell command to run (the process runtime, on nodes that allow it).")
@click.option("--arg", "args", multiple=True, help="An argument for the program (repeat).")
@click.option("--stdin", "stdin", type=click.Path(dir_okay=False, path_type=Path),
              help="A file the program reads as its standard input.")
@click.option("--cores", type=int, help="Cores it needs [default: 1].")
@click.option("--memory-mib", type=int, help="Memory it needs, MiB [default: 64].")
@click.option("--time-limit", "time_limit_s", type=int, metavar="SECONDS",
              help="Stop it past this [default: 60].")
@click.option("--max-price", type=int, help="Credits held in escrow, at most paid [default: 100].")
@click.option("--deadline-blocks", type=int, help="Blocks it may wait and run [default: 1000].")
@click.option("--replicas", type=int, help="Distinct nodes that run it [default: 1].")
@click.option("--quorum", type=int,
              help="Replicas whose results must agree to be paid [default: a majority].")
@click.option("--fuel", type=int,
              help="wasm only: meter the run and stop it past this much work (slower).")
@click.option("--wait", is_flag=True, help="Wait for it to end and print its result.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds --wait waits.")
@data_dir_option
@json_option
def submit(spec_file: Path | None, template: str | None, wasm: Path | None, cmd: str | None,
           args: tuple[str, ...],
           stdin: Path | None, cores: int | None, memory_mib: int | None,
           time_limit_s: int | None, max_price: int | None, deadline_blocks: int | None,
           replicas: int | None, quorum: int | None, fuel: int | None, wait: bool, timeout: float, data_dir: Path | None, as_json: bool) -> None:
    """Submit a job: SPEC_FILE (TOML), --template NAME, --wasm FILE or --cmd COMMAND; prints
    its id (and with --wait its result). Flags override what the spec or template says."""
    given = [x for x in (spec_file, template, wasm, cmd) if x is not None]
    if len(given) != 1:
        raise UsageError("give one of SPEC_FILE, --template NAME, --wasm FILE or --cmd COMMAND")
    if spec_file is not None:
        spec = load_spec(spec_file)
    elif template is not None:
        spec = from_template(template)
    elif wasm is not None:
        spec = check(JobSpec("wasm", read_program(wasm, "wasm"), source=str(wasm)))
    else:
        assert cmd is not None
        spec = check(JobSpec("process", cmd.encode(), ("/bin/sh", "program"), source="--cmd"))
    spec = with_overrides(spec, args=tuple(args) or None,
                          stdin=None if stdin is None else _read(stdin), cores=cores,
                          memory_mib=memory_mib, time_limit_s=time_limit_s, max_price=max_price,
                          deadline_blocks=deadline_blocks, replicas=replicas, quorum=quorum,
                          fuel=fuel)
    socket = resolve_data_dir(data_dir).control_socket
    blobs = [spec.program] + ([] if spec.stdin is None else [spec.stdin])
    with _bar(sum(map(len, blobs)), "uploading") as bar:
        ids = [_guard(lambda b=b: upload_blob(socket, b, progress=bar.update)) for b in blobs]
    answer = _call(data_dir, "submit_job", {"program": ids[0],
                                            "stdin": ids[1] if len(ids) > 1 else None,
                                            "spec": spec.chain_spec(), "wait": 20}, timeout=30)
    if not wait:
        if as_json:
            print_json(answer)
        else:
            click.echo(f"job {answer['job_id']} submitted (height {answer['height']})")
        return
    click.echo(f"job {answer['job_id']} submitted; waiting for it", err=True)
    job = _wait(data_dir, answer["job_id"], timeout)
    if job["state"] != "settled" and not (job.get("outcome") or {}).get("result_hash"):
        raise click.ClickException(f"job {answer['job_id']} ended {job['state']}"
                                   + (f": {job['why_waiting']}" if job.get("why_waiting") else ""))
    _print_result(_fetch_result(data_dir, answer["job_id"]), as_json, None)


def _wait(data_dir: Path | None, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = _call(data_dir, "job", {"job_id": job_id})
        if job["state"] in SETTLED:
            return job
        if time.monotonic() > deadline:
            raise click.ClickException(f"job {job_id} is still {job['state']} after {timeout:g} s"
                                       + (f" ({job['why_waiting']})" if job["why_waiting"] else "")
                                       + f"; `hmnode job {job_id}` follows it")
        time.sleep(POLL_S)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


@click.command("job")
@click.argument("job_id")
@data_dir_option
@json_option
def job_command(job_id: str, data_dir: Path | None, as_json: bool) -> None:
    """Show a job: its state, node, cost, why it waits, and its history with times."""
    job = _call(data_dir, "job", {"job_id": job_id})
    if as_json:
        print_json(job)
        return
    click.echo(f"job        {job['job_id']}")
    click.echo(f"state      {job['state']}" + (f" ({job['why_waiting']})"
                                               if job["why_waiting"] else ""))
    if job["node"]:
        click.echo(f"node       {job['node']} for {job['cost']} (at most {job['max_price']})")
    for step in job["history"]:
        at = "" if step["at"] is None else time.strftime(" %Y-%m-%d %H:%M:%S",
                                                          time.localtime(step["at"] / 1000))
        click.echo(f"  {step['state']:<10} height {step['height']}{at}")
    receipt = job.get("receipt")
    if receipt:
        work = f"fuel {receipt['fuel']}" if receipt["fuel"] else f"CPU {receipt['cpu_ms']} ms"
        click.echo(f"receipt    exit {receipt['exit_code']}, {receipt['wall_ms']} ms, {work}, "
                   f"paid {receipt.get('paid')}")


@click.command()
@click.argument("job_id")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path),
              help="Write stdout, stderr and result.json into this directory.")
@data_dir_option
@json_option
def result(job_id: str, output: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Fetch a settled job's result (from the node that ran it) and print its output."""
    _print_result(_fetch_result(data_dir, job_id), as_json, output)


def _fetch_result(data_dir: Path | None, job_id: str) -> dict[str, Any]:
    """The job's result, with a progress bar while a large one moves."""
    socket = resolve_data_dir(data_dir).control_socket
    bar: Any = None
    shown = 0

    def progress(got: int, size: int) -> None:
        nonlocal bar, shown
        if bar is None and size >= BAR_BYTES:
            bar = click.progressbar(length=size, label="fetching the result", file=sys.stderr)
            bar.__enter__()
        if bar is not None:
            bar.update(max(0, got - shown))
        shown = got if got < size else 0  # the pull is followed by the read, from 0 again
    try:
        return _guard(lambda: fetch_result(socket, job_id, progress=progress))
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _bar(total: int, label: str) -> Iterator[Any]:
    """A progress bar on stderr for `total` bytes, only when there are enough to wait for."""
    if total < BAR_BYTES:
        yield _NoBar()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar


def _guard(fn: Callable[[], T]) -> T:
    """`fn()`, with the node's refusal as the CLI's error."""
    try:
        return fn()
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


def _print_result(res: dict[str, Any], as_json: bool, output: Path | None) -> None:
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "stdout").write_bytes(res["stdout"])
        (output / "stderr").write_bytes(res["stderr"])
        meta = {k: v for k, v in res.items() if k not in ("stdout", "stderr")}
        (output / "result.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if as_json:
        print_json({**res, "stdout": res["stdout"].decode(errors="replace"),
                    "stderr": res["stderr"].decode(errors="replace")})
        return
    if output is None:
        sys.stdout.buffer.write(res["stdout"])
        sys.stdout.flush()
        if res["stderr"]:
            sys.stderr.buffer.write(res["stderr"])
    click.echo(f"exit {res['exit_code']} ({res['reason']}) on {res['node']}", err=True)


@click.command()
@click.argument("job_id")
@data_dir_option
@json_option
def cancel(job_id: str, data_dir: Path | None, as_json: bool) -> None:
    """Cancel a job of yours that is still queued; its escrow comes back."""
    try:
        raw = bytes.fromhex(job_id)
    except ValueError:
        raise UsageError(f"{job_id!r} is not a job id (hex)") from None
    done = _call(data_dir, "transaction", {"kind": "job.cancel", "body": {"job_id": raw},
                                           "wait": 10}, timeout=20)
    if as_json:
        print_json(done)
    elif done.get("ok"):
        click.echo(f"job {job_id} cancelled at height {done['height']}")
    else:
        raise click.ClickException(f"not cancelled: {done.get('rejected')}")


@click.command()
@json_option
def catalog(as_json: bool) -> None:
    """List the bundled job templates (`hmnode submit --template NAME`)."""
    rows = [{"name": t.name, "runtime": t.runtime, "description": t.description,
             "args": list(t.args), "cores": t.cores, "memory_mib": t.memory_mib,
             "time_limit_s": t.duration_s, "gpu_count": t.gpu_count} for t in TEMPLATES.values()]
    if as_json:
        print_json({"templates": rows})
        return
    for row in rows:
        click.echo(f"{row['name']:<14} {row['runtime']:<8} {row['description']}")
