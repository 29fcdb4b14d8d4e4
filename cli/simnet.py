"""`hmnode simnet`: run meshes locally and benchmark them."""

from __future__ import annotations

import inspect
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click

from hmnode.cli.options import json_option, print_json
from hmnode.config import default_data_dir
from hmnode.simnet.bench import BENCHMARKS
from hmnode.simnet.local import LocalMesh, NodeStatus, NoMesh, StopOutcome, log_tail

REFRESH_S = 0.5
DEFAULT_RUNS = 5


@click.group()
def simnet() -> None:
    """Local meshes and benchmarks."""


def _default_dir() -> Path:
    return default_data_dir().parent / "hmnode-simnet"


def _dir_option(fn: Any) -> Any:
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Directory of the mesh: one data dir per node and simnet.json "
             "[default: hmnode-simnet beside the default data dir].")(fn)


def _mesh(directory: Path | None) -> LocalMesh:
    return LocalMesh((directory or _default_dir()).expanduser().absolute())


def _dir_flag(mesh: LocalMesh) -> str:
    """` --dir DIR` for the commands this one suggests, or nothing for the default DIR."""
    return "" if mesh.dir == _default_dir().expanduser().absolute() else f" --dir {mesh.dir}"


# --- the node table -------------------------------------------------------------------------

_HEADER = f"{'node':8} {'node id':15} {'address':21} {'pid':>8} {'state':9} {'peers':>5} " \
          f"{'passive':>7} {'adverts':>9} {'RSS MiB':>8}"


def _row(s: NodeStatus, n: int) -> str:
    state = "down" if not s.alive else ("no answer" if s.error else "up")

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    adverts = "-" if s.adverts_known is None else f"{s.adverts_known}/{n}"
    rss = "-" if s.rss_bytes is None else f"{s.rss_bytes / 2**20:.1f}"
    return (f"{s.name:8} {s.node_id[:13] or '-':15} {s.address:21} {s.pid:>8} {state:9} "
            f"{num(s.peers):>5} {num(s.passive):>7} {adverts:>9} {rss:>8}")


def table_lines(statuses: list[NodeStatus]) -> list[str]:
    """The node table: one header line and a line per node."""
    n = len(statuses)
    return [_HEADER, *(_row(s, n) for s in statuses)]


class _LiveTable:
    """Shows the table as it changes: redrawn in place on a terminal, otherwise a line for each
    node whose row changed (so that a log of the output reads top to bottom)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0
        self._rows: dict[str, str] = {}

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def update(self, statuses: list[NodeStatus], note: str = "") -> None:
        lines = table_lines(statuses)
        elapsed = time.monotonic() - self.started
        if self.tty:
            # Up to the first line drawn last time, clear to the end, draw again.
            prefix = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            body = [*lines, f"{elapsed:5.1f} s  {note}"]
            self._write(prefix + "\n".join(body) + "\n")
            self._drawn = len(body)
            return
        n = len(statuses)
        for s in statuses:
            # RSS moves by a few KiB all the time; only the mesh's state makes a new line.
            key = repr((s.alive, s.error is None, s.peers, s.passive, s.adverts_known))
            if self._rows.get(s.name) != key:
                self._rows[s.name] = key
                self._write(f"[{elapsed:6.1f} s] {_row(s, n)}\n")

    def clear(self) -> None:
        """Remove the live table from a terminal, so the final table is printed once."""
        if self.tty and self._drawn:
            self._write(f"\x1b[{self._drawn}F\x1b[J")
        self._drawn = 0


def _print_table(statuses: list[NodeStatus], stream: IO[str]) -> None:
    for line in table_lines(statuses):
        click.echo(line, file=stream)


def _summary(mesh: LocalMesh, statuses: list[NodeStatus], converged: bool) -> dict[str, Any]:
    return {"dir": str(mesh.dir), "converged": converged,
            "nodes": [{**s.to_dict(), "log": str(mesh.log_file(s.name)),
                       "data_dir": str(mesh.data_dir(s.name).path)} for s in statuses]}


# --- commands -------------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM arrived while `up --foreground` was attached."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


@simnet.command(short_help="Start N nodes on loopback, joined into one mesh.")
@click.option("-n", "--nodes", "n", type=click.IntRange(1, 500), required=True,
              help="How many nodes to start.")
@_dir_option
@click.option("--base-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="node00 listens on this UDP port, node01 on the next, ...; 0 picks free ports.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds to wait for every node to know every advert.")
@click.option("--foreground", is_flag=True,
              help="Stay attached after convergence; Ctrl-C or SIGTERM stops the mesh.")
@click.option("--validators", type=click.IntRange(1, 500), default=1, show_default=True,
              help="How many of the nodes validate the mesh's chain (the others follow it).")
@json_option
def up(n: int, directory: Path | None, base_port: int, timeout: float, foreground: bool,
       validators: int, as_json: bool) -> None:
    """Start N real nodes on loopback, joined into one mesh, and show them until every node knows
    every node's advert.

    The nodes keep running after this command returns (unless --foreground); `hmnode simnet
    status` shows them and `hmnode simnet down` stops them. Each node's data dir is DIR/nodeNN, so
    `hmnode status --data-dir DIR/node03` and the other commands work on it; its log is
    DIR/nodeNN/agent.log. Exit 1 if the mesh did not converge in time (the nodes are left running
    to be looked at), 2 if a mesh already runs in DIR.
    """
    mesh = _mesh(directory)
    # With --json, stdout carries one JSON object and nothing else.
    out = click.get_text_stream("stderr" if as_json else "stdout")
    if foreground:
        signal.signal(signal.SIGTERM, _raise_stop)
    started = time.monotonic()
    try:
        # Lines about single nodes are indented under the one that starts them all.
        mesh.up(n, base_port, validators=validators, progress=lambda line: click.echo(
            line if line.startswith("starting") else f"  {line}", file=out))
    except (KeyboardInterrupt, _Stop):
        # up() has stopped the nodes it had started.
        click.echo("\ninterrupted; the nodes started were stopped", file=out)
        sys.exit(130)
    live = _LiveTable(out)
    try:
        converged = mesh.wait_converged(timeout, REFRESH_S, lambda s: live.update(
            s, "waiting for every node to know every advert"))
        converge_s = time.monotonic() - started
        statuses = mesh.status()
        live.clear()
        _print_table(statuses, out)
        if converged:
            click.echo(f"converged: all {n} nodes know all {n} adverts after {converge_s:.1f} s",
                       file=out)
        else:
            dead = [s for s in statuses if not s.alive]
            click.echo(f"{len(dead)} node{'s' if len(dead) != 1 else ''} exited; not converged"
                       if dead else f"not converged within {timeout:g} s", file=out)
            for s in statuses:
                if not (s.alive and s.adverts_known == n):
                    click.echo(f"  {s.name}: {mesh.log_file(s.name)}", file=out)
            for s in dead[:3]:
                click.echo(f"the end of {s.name}'s log:", file=out)
                for line in log_tail(mesh.log_file(s.name), lines=8).splitlines():
                    click.echo(f"    {line}", file=out)
        if as_json:
            click.echo(json.dumps({**_summary(mesh, statuses, converged),
                                   "converge_s": round(converge_s, 3)}, sort_keys=True))
        if foreground and converged:
            click.echo("attached; Ctrl-C or SIGTERM stops the mesh", file=out)
            live = _LiveTable(out)
            while True:
                live.update(mesh.status(), "Ctrl-C stops the mesh")
                time.sleep(REFRESH_S)
    except (KeyboardInterrupt, _Stop):
        if not foreground:
            click.echo(f"\ninterrupted; the nodes are left running: `hmnode simnet "
                       f"down{_dir_flag(mesh)}` stops them", file=out)
            sys.exit(130)
        click.echo("", file=out)
        converged = True  # stopped on request after converging is a success
    if foreground:
        _report_down(mesh.down(), out)
    elif converged:
        click.echo(f"the nodes keep running: `hmnode simnet status{_dir_flag(mesh)}` shows them, "
                   f"`hmnode simnet down{_dir_flag(mesh)}` stops them", file=out)
    else:
        click.echo(f"the nodes still running are left to be looked at; `hmnode simnet "
                   f"down{_dir_flag(mesh)}` stops them", file=out)
    if not converged:
        sys.exit(1)


@simnet.command(short_help="Show the mesh's nodes.")
@_dir_option
@json_option
def status(directory: Path | None, as_json: bool) -> None:
    """Show the mesh's nodes: pid, neighbours, adverts known and RSS (exit 3 if none runs)."""
    mesh = _mesh(directory)
    statuses = mesh.status()
    converged = mesh.converged(statuses)
    if as_json:
        print_json(_summary(mesh, statuses, converged))
    else:
        _print_table(statuses, sys.stdout)
        alive = sum(s.alive for s in statuses)
        click.echo(f"{alive} of {len(statuses)} nodes running"
                   + ("; converged" if converged else "; not converged") + f" ({mesh.dir})")
    if not any(s.alive for s in statuses):
        raise NoMesh(f"no node of the mesh in {mesh.dir} is running; `hmnode simnet "
                     f"down{_dir_flag(mesh)}` clears it, `hmnode simnet up` starts one")


def _report_down(outcomes: list[StopOutcome], out: IO[str]) -> None:
    for o in outcomes:
        click.echo(f"{o.name:8} pid {o.pid:>8}: {o.outcome}" + (f" ({o.detail})" if o.detail else ""),
                   file=out)
    counts = {kind: sum(o.outcome == kind for o in outcomes)
              for kind in ("clean", "unclean", "killed", "not running")}
    click.echo(f"{len(outcomes)} nodes: " + ", ".join(
        f"{count} {'stopped cleanly' if kind == 'clean' else kind}"
        for kind, count in counts.items() if count), file=out)


@simnet.command(short_help="Stop every node of the mesh.")
@_dir_option
@click.option("--timeout", type=click.FloatRange(0, 600), default=10.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@json_option
def down(directory: Path | None, timeout: float, as_json: bool) -> None:
    """Stop every node of the mesh (SIGTERM, then SIGKILL after --timeout); exit 1 if any did not
    stop cleanly."""
    mesh = _mesh(directory)
    outcomes = mesh.down(timeout)
    if as_json:
        print_json({"dir": str(mesh.dir), "nodes": [o.to_dict() for o in outcomes]})
    else:
        _report_down(outcomes, sys.stdout)
    if any(o.outcome in ("killed", "unclean") for o in outcomes):
        sys.exit(1)


@simnet.command()
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)), required=False)
@click.option("--runs", type=click.IntRange(1, 100), default=None,
              help=f"Repetitions; figures are medians [default: {DEFAULT_RUNS}, 1 for gossip and "
                   "consensus].")
@click.option("--nodes", type=click.IntRange(2, 500), default=None,
              help="Nodes in the mesh, for benchmarks of a mesh (gossip) [default: 10].")
@click.option("--validators", type=click.IntRange(1, 64), default=None,
              help="Validators of the chain, for benchmarks of a chain (consensus) [default: 4].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks.")
def bench(name: str | None, runs: int | None, nodes: int | None, validators: int | None,
          as_json: bool, list_only: bool) -> None:
    """Run benchmark NAME; each figure is printed beside a baseline from the same run."""
    if list_only or name is None:
        for bench_name, module in BENCHMARKS.items():
            click.echo(f"{bench_name:12} {(module.__doc__ or '').strip().splitlines()[0]}")
        return
    module = BENCHMARKS[name]
    kwargs: dict[str, Any] = {}
    # Only mesh benchmarks take a node count; say so rather than ignore the flag.
    if "nodes" in inspect.signature(module.run).parameters:
        if nodes is not None:
            kwargs["nodes"] = nodes
    elif nodes is not None:
        raise click.UsageError(f"--nodes does not apply to the {name} benchmark")
    # Likewise only chain benchmarks take a validator count.
    if "validators" in inspect.signature(module.run).parameters:
        if validators is not None:
            kwargs["validators"] = validators
    elif validators is not None:
        raise click.UsageError(f"--validators does not apply to the {name} benchmark")
    runs = runs or getattr(module, "DEFAULT_RUNS", DEFAULT_RUNS)
    with click.progressbar(length=runs * module.STEPS_PER_RUN, label=f"bench {name}", file=click.get_text_stream("stderr")) as bar:
        figures = module.run(runs=runs, progress=bar.update, **kwargs)
    for line in module.report(figures):
        click.echo(line, err=as_json)
    if as_json:
        click.echo(json.dumps(figures, sort_keys=True))


def _seed_range(text: str) -> list[int]:
    """`A..B` (inclusive) as a list of seeds."""
    first, sep, last = text.partition("..")
    try:
        a, b = int(first), int(last)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not A..B (two integers)") from None
    if not sep or b < a or b - a >= 100_000:
        raise click.BadParameter(f"{text!r} is not A..B with A <= B (at most 100000 seeds)")
    return list(range(a, b + 1))


@simnet.command(short_help="Run a deterministic simulation and check what it promised.")
@click.option("--scenario", type=click.Choice(["gossip", "consensus", "consensus-byzantine"]),
              default="gossip", show_default=True,
              help="What to simulate: gossip and membership; consensus under faults; or "
                   "consensus with f=(n-1)//3 Byzantine validators as well.")
@click.option("--nodes", type=click.IntRange(1, 2000), default=20, show_default=True,
              help="Simulated nodes (validators in the consensus scenarios).")
@click.option("--seed", type=int, default=None,
              help="Seed of one run: it fixes keys, faults and every random choice [default: 1].")
@click.option("--seeds", "seed_range", default=None, metavar="A..B",
              help="Run a swarm of seeds A..B (inclusive); each seed picks its own faults.")
@click.option("--duration", type=click.FloatRange(1.0, 86_400.0), default=90.0, show_default=True,
              help="Virtual seconds to simulate; the last 40 s or more are a quiet phase.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last.")
def sim(scenario: str, nodes: int, seed: int | None, seed_range: str | None, duration: float,
        as_json: bool) -> None:
    """Run a simulated mesh (real protocol cores, virtual clock and network, faults picked by
    the seed); print the trace hash and each checker's verdict. Exits 1 on any violation."""
    from hmnode.simnet.sim import run_scenario

    if scenario == "gossip" and nodes < 2:
        raise click.BadParameter("the gossip scenario needs at least 2 nodes", param_hint="--nodes")
    if scenario != "gossip" and nodes > 64:
        raise click.BadParameter("the consensus scenarios run at most 64 validators",
                                 param_hint="--nodes")

    def run_sim(n: int, one: int, length: float) -> Any:
        return run_scenario(scenario, n, one, length)

    if seed is not None and seed_range is not None:
        raise click.UsageError("give --seed or --seeds, not both")
    out = click.get_text_stream("stderr") if as_json else click.get_text_stream("stdout")
    if seed_range is None:
        result = run_sim(nodes, 1 if seed is None else seed, duration)
        click.echo(f"{scenario} nodes={nodes} seed={result.seed} duration={duration:g}s "
                   f"trace {result.trace_hash}", file=out)
        for name, verdict in result.verdicts.items():
            click.echo(f"  {name:15} {'ok' if verdict is True else 'VIOLATED: ' + str(verdict)}",
                       file=out)
        if not result.ok:
            click.echo(f"reproduce: {result.reproduce}", file=out)
        if as_json:
            click.echo(json.dumps(result.to_json(), sort_keys=True))
        if not result.ok:
            sys.exit(1)
        return
    seeds = _seed_range(seed_range)
    violations: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}
    started = time.monotonic()
    for one in seeds:
        result = run_sim(nodes, one, duration)
        hashes[str(one)] = result.trace_hash
        bad = {k: v for k, v in result.verdicts.items() if v is not True}
        click.echo(f"seed {one:6} {result.trace_hash[:16]} "
                   f"{'ok' if not bad else 'VIOLATED ' + ', '.join(bad)}", file=out)
        for checker, verdict in bad.items():
            violations.append({"seed": one, "checker": checker, "detail": verdict,
                               "reproduce": result.reproduce})
    click.echo(f"{len(seeds)} seeds, {len({v['seed'] for v in violations})} with violations, "
               f"{time.monotonic() - started:.1f}s", file=out)
    for v in violations:
        click.echo(f"  seed {v['seed']} {v['checker']}: {v['detail']}\n    {v['reproduce']}",
                   file=out)
    if as_json:
        click.echo(json.dumps({"scenario": scenario, "nodes": nodes, "duration": duration,
                               "seeds": len(seeds), "seed_range": [seeds[0], seeds[-1]],
                               "trace_hashes": hashes,
                               "violations": violations, "ok": not violations}, sort_keys=True))
    if violations:
        sys.exit(1)


# --- nat-lab ------------------------------------------------------------------------------------


def _nat_lab_table(report: dict[str, Any]) -> list[str]:
    """The matrix as a grid (D ms: direct after so long; R: connected, never direct; x: not
    connected), then the figures, the floors and what the node logs hold."""
    names = [s["name"] for s in report["sites"]]
    cells: dict[tuple[str, str], str] = {}
    for p in report["pairs"]:
        cell = ("x" if not p["connected"] else
                f"D {p['time_to_direct_ms']:.0f}" if p["time_to_direct_ms"] is not None else "R")
        cells[p["a"], p["b"]] = cells[p["b"], p["a"]] = cell
    width = max(8, *(len(n) for n in names)) + 1
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    for row in names:
        lines.append(f"{row:<{width}}" + "".join(
            f"{'-' if row == col else cells.get((row, col), '?'):>{width}}" for col in names))
    lines.append("D ms: direct after so many ms; R: connected but never direct; x: not connected")
    lines.append("")
    ready = report["readiness"]
    lines.append(f"{'relay reservations':30} " + (", ".join(
        f"{site} {state}" for site, state in ready["relays"].items()) or "no NATed site"))
    lines.append(f"{'adverts before the matrix':30} " + (
        "all known and current" if ready["adverts_current"] else
        f"missing {ready['adverts_missing']}, stale {ready['adverts_stale']}"))
    for key in ("connected_ratio", "direct_ratio", "direct_ratio_cone_pairs",
                "direct_ratio_easy_hard", "direct_ratio_hard_hard", "time_to_direct_ms_p50",
                "time_to_direct_ms_p50_natted", "fallback_ok"):
        lines.append(f"{key:30} {report[key]}")
    fb = report["fallback"]
    if fb["reason"]:
        lines.append(f"{'fallback':30} {fb['reason']}")
    lines.append(f"{'floors':30} " + ", ".join(
        f"{k} {'ok' if v['ok'] else 'MISSED (' + str(v['got']) + ')'}"
        for k, v in report["floors"].items()))
    failed = [p for p in report["pairs"] if p["error"]]
    for p in failed[:5]:
        lines.append(f"  {p['a']} -> {p['b']}: {p['error']}")
    for log in report["node_logs"]:
        if log["errors"] or log["tracebacks"] or log["not_json"]:
            lines.append(f"{log['site']}'s log: {log['errors']} errors, {log['tracebacks']} "
                         f"tracebacks, {log['warnings']} warnings"
                         + (f" ({log['path']})" if log["path"] else ""))
            lines.extend(f"    {problem}" for problem in log["first_problems"])
    lines.append(f"{report['wall_s']:.1f} s in all")
    return lines


@simnet.command("nat-lab", short_help="Real nodes behind real NATs: a connectivity matrix.")
@click.option("--full", is_flag=True,
              help="The full matrix (public, cone x2, symmetric x2, fullcone, double) instead "
                   "of the reduced one (public, cone x2, symmetric, double).")
@click.option("--sites", "sites_text", default=None, metavar="KIND,KIND,...",
              help="The sites, in order (public first): public, cone, symmetric, fullcone, "
                   "double.")
@click.option("--keep-logs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep each node's data dir and log under DIR (else a temporary dir, removed).")
@click.option("--check", is_flag=True,
              help="Exit 1 unless the floors hold (every pair connects, every cone pair and 90% "
                   "of easy/hard pairs go direct, the fallback works).")
@click.option("--clean", is_flag=True,
              help="Only remove the namespaces left by lab runs that died, then exit.")
@json_option
def nat_lab(full: bool, sites_text: str | None, keep_logs: Path | None, check: bool,
            clean: bool, as_json: bool) -> None:
    """Build Linux network namespaces behind iptables NATs (cone, symmetric, port-forwarded,
    double) around a core router, check each NAT behaves as its kind, run a real `hmnode run` in
    every site, connect every pair of nodes and report the matrix: what connected, what went
    direct and how fast, and whether a pair reconnects after its NAT binding is killed.

    Needs root, `ip` and `iptables` (exit 2 without them); `conntrack` is used when there.
    Everything the lab creates is removed when it ends, also on Ctrl-C or SIGTERM.
    """
    from hmnode.simnet import natlab
    from hmnode.simnet import natlab_topology as topo

    err = click.get_text_stream("stderr")
    topo.check_requirements()
    if clean:
        removed = topo.clean_leftovers(lambda line: click.echo(line, file=err))
        if as_json:
            print_json({"removed": removed})
        else:
            click.echo(f"removed {len(removed)} namespace{'s' if len(removed) != 1 else ''}")
        return
    if sites_text is not None and full:
        raise click.UsageError("give --full or --sites, not both")
    kinds = ([k.strip() for k in sites_text.split(",") if k.strip()] if sites_text is not None
             else list(natlab.FULL if full else natlab.REDUCED))
    try:
        report = natlab.run_lab(kinds, keep_logs, progress=lambda line: click.echo(line, file=err))
    except KeyboardInterrupt:
        click.echo("\ninterrupted; the lab was torn down", file=err)
        sys.exit(130)
    if as_json:
        print_json(report)
    else:
        for line in _nat_lab_table(report):
            click.echo(line)
    if check and not all(v["ok"] for v in report["floors"].values()):
        sys.exit(1)
