"""The `hmnode` command: a click group whose commands drive a data dir or a running agent."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from hmnode.cli.options import data_dir_option, json_option, print_json, resolve_data_dir
from hmnode import __version__, control
from hmnode.agent import initialise, run_agent
from hmnode.config import Config, PeerAddress, add_bootstrap, load_config, write_config
from hmnode.errors import AgentNotRunning, ControlError, HmnodeError, UsageError
from hmnode.hardware import Inventory, collect_inventory, summary_lines
from hmnode.identity import load_key
from hmnode import logs
from hmnode.cli.simnet import simnet
from hmnode.cli.plot import plot
from hmnode.cli.chain import chain, genesis, kv
from hmnode.cli.ledger import faucet, jobs, ledger, stake, transfer, unstake
from hmnode.cli.share import earnings, share
from hmnode.cli.workloads import cancel, catalog, job_command, result, submit


class HmnodeGroup(click.Group):
    """Turns HmnodeError into one line on stderr and its exit code, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HmnodeError as exc:
            click.echo(f"hmnode: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=HmnodeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hmnode")
def main() -> None:
    """hmnode: share this machine's CPU, memory, GPU and storage with a peer-to-peer mesh."""


main.add_command(simnet)
main.add_command(plot)
main.add_command(chain)
main.add_command(kv)
main.add_command(genesis)
for _command in (ledger, stake, unstake, transfer, faucet, jobs, submit, job_command, result,
                 cancel, catalog, share, earnings):
    main.add_command(_command)


@main.command()
@data_dir_option
@click.option("--listen", metavar="HOST:PORT", help="UDP address to listen on (written to config.toml).")
@json_option
def init(data_dir: Path | None, listen: str | None, as_json: bool) -> None:
    """Create the node key, config.toml and store in the data dir (idempotent)."""
    dd = resolve_data_dir(data_dir)
    # The file gets the embedded defaults and this command's flags, not the environment's values.
    config = load_config(dd.config_file, env={}, flags={"node.listen": listen})
    if listen is not None and dd.config_file.exists():
        raise HmnodeError(f"{dd.config_file} already exists; edit node.listen there instead")
    dd.create()
    with dd.lock():
        key, store, done = initialise(dd, config)
        store.close()
    if as_json:
        print_json({"node_id": str(done.node_id), "data_dir": str(dd.path),
                     "created_key": done.created_key, "created_config": done.created_config})
        return
    click.echo(f"node id   {done.node_id}")
    click.echo(f"key       {dd.key_file} ({'created' if done.created_key else 'existing'})")
    click.echo(f"config    {dd.config_file} ({'created' if done.created_config else 'existing'})")
    click.echo(f"store     {dd.store_dir}")


@main.command()
@data_dir_option
@click.option("--listen", metavar="HOST:PORT", help="UDP address to listen on [env: HMNODE_LISTEN].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least severe log level [env: HMNODE_LOG_LEVEL].")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="Logs for people (text) or machines (json) [env: HMNODE_LOG_FORMAT].")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="ID@HOST:PORT",
              help="Join the mesh through this peer (repeatable; recorded in config.toml).")
@click.option("--genesis", "genesis_file", type=click.Path(dir_okay=False, exists=True),
              help="Run the chain this genesis file starts (see `hmnode genesis`) "
                   "[env: HMNODE_CHAIN_GENESIS].")
def run(data_dir: Path | None, listen: str | None, log_level: str | None,
        log_format: str | None, bootstrap: tuple[str, ...], genesis_file: str | None) -> None:
    """Run the node in the foreground until SIGINT or SIGTERM (initialises on first start)."""
    dd = resolve_data_dir(data_dir)
    config = load_config(dd.config_file, flags={
        "node.listen": listen, "log.level": log_level, "log.format": log_format,
        "chain.genesis": None if genesis_file is None else str(Path(genesis_file).absolute())})
    peers = _parse_peers(bootstrap)
    logs.configure(config.log_level, config.log_format)
    if peers:
        dd.create()
        if not dd.config_file.exists():
            write_config(dd.config_file, Config())
        for peer in peers:
            add_bootstrap(dd.config_file, peer)
        config = load_config(dd.config_file, flags={
            "node.listen": listen, "log.level": log_level, "log.format": log_format,
        "chain.genesis": None if genesis_file is None else str(Path(genesis_file).absolute())})
    # A first start writes the embedded defaults, not this run's flags, to config.toml.
    sys.exit(run_agent(dd, config, file_defaults=Config()))


def _parse_peers(texts: tuple[str, ...]) -> list[PeerAddress]:
    peers = []
    for text in texts:
        try:
            peer = PeerAddress.parse(text)
        except ValueError as exc:
            raise UsageError(f"bad peer address {text!r}: {exc}") from None
        if peer.node_id is None:
            click.echo(f"hmnode: warning: {text} is unpinned: the node id will be learnt from "
                       "whoever answers there; give ID@HOST:PORT to pin it", err=True)
        peers.append(peer)
    return peers


@main.command()
@data_dir_option
@click.argument("peer", metavar="ID@HOST:PORT")
@json_option
def join(data_dir: Path | None, peer: str, as_json: bool) -> None:
    """Record PEER as a bootstrap peer and, if the agent runs, join the mesh through it now.

    PEER is ID@HOST:PORT, or HOST:PORT to learn the id from the handshake (unpinned).
    """
    dd = resolve_data_dir(data_dir)
    [parsed] = _parse_peers((peer,))
    load_config(dd.config_file, env={})  # a broken config is refused before it is rewritten
    dd.create()
    if not dd.config_file.exists():
        write_config(dd.config_file, Config())
    added = add_bootstrap(dd.config_file, parsed)
    result: dict[str, Any] = {"peer": str(parsed), "recorded": added, "agent_running": True}
    try:
        answer = control.call(dd.control_socket, "join", {"peer": str(parsed)}, timeout=30.0)
        result["node_id"] = answer["node_id"]
        result["joined"] = True
    except AgentNotRunning:
        result["agent_running"] = False
        result["joined"] = False
    except ControlError as exc:
        result["joined"] = False
        result["error"] = str(exc)
    if as_json:
        print_json(result)
    else:
        click.echo(f"recorded {parsed} in {dd.config_file}" if added
                   else f"{parsed} was already in {dd.config_file}")
        if not result["agent_running"]:
            click.echo("no agent is running; it will join through this peer when started")
        elif result["joined"]:
            click.echo(f"joined the mesh through {result['node_id']}")
        else:
            click.echo(f"hmnode: could not join through {parsed}: {result['error']}", err=True)
    if result["agent_running"] and not result["joined"]:
        sys.exit(1)


@main.command("id")
@data_dir_option
@json_option
def id_(data_dir: Path | None, as_json: bool) -> None:
    """Print this node's id."""
    dd = resolve_data_dir(data_dir)
    node_id = load_key(dd.key_file).node_id
    if as_json:
        print_json({"node_id": str(node_id), "public_key_hex": node_id.key.hex()})
    else:
        click.echo(str(node_id))


@main.command()
@data_dir_option
@json_option
def status(data_dir: Path | None, as_json: bool) -> None:
    """Show the running agent's identity, version and uptime."""
    dd = resolve_data_dir(data_dir)
    info = control.call(dd.control_socket, "status")
    if as_json:
        print_json(info)
        return
    click.echo(f"node id    {info['node_id']}")
    click.echo(f"version    {info['version']}")
    click.echo(f"pid        {info['pid']}")
    click.echo(f"uptime     {info['uptime_s']:.0f} s")
    click.echo(f"listen     {', '.join(info['addresses'])} (configured {info['listen']})")
    click.echo(f"peers      {info['peers']}")
    nat = info.get("nat") or {}
    if nat:
        click.echo(f"reachable  {nat['reachability']}"
                   + (f" (observed {', '.join(nat['observed'])})" if nat["observed"] else ""))
        relay = nat.get("relay")
        click.echo(f"relayed at {relay['address']}" if relay else "relayed at -")
    chain_info = info.get("chain") or {}
    if chain_info.get("ready"):
        role = "validator" if chain_info["is_validator"] else "follower"
        last = chain_info.get("last_commit_ms")
        click.echo(f"chain      {chain_info['chain_id']} height {chain_info['height']} ({role} of "
                   f"{len(chain_info['validators'])}"
                   + (f", last commit {last:.1f} ms)" if last is not None else ")")
                   + (f" HALTED: {chain_info['halted']}" if chain_info.get("halted") else ""))
        click.echo(f"standing   {_standing(chain_info.get('registry'))}")
        sharing = info.get("share") or {}
        click.echo("sharing    " + ("yes" if sharing.get("sharing") else
                                    "NO: " + "; ".join(sharing.get("why_not") or ["-"])))
    else:
        click.echo("chain      starting (fetching its genesis)")
    click.echo(f"data dir   {info['data_dir']}")


def _sharing(share: dict[str, Any] | None) -> str:
    """What an advert says of its node's sharing, for `hmnode assets --mesh`."""
    if not share:
        return ""
    if not share.get("sharing"):
        return "; not sharing now"
    return f"; sharing {share.get('cores')} cores, {share.get('memory_mib')} MiB"


def _standing(registry: dict[str, Any] | None) -> str:
    """One line on this node's standing in the chain's registry."""
    if registry is None:
        return "-"
    if not registry["registered"]:
        return "not registered (an offer registers it)"
    plot = registry["plot"]
    line = (f"registered with a plot of {plot['n_labels']} labels; "
            + ("offering" if registry["offering"] else "not offering")
            + f", beacon period {registry['answered_period']} answered")
    if registry["suspended"]:
        line += f"; HELD BACK: {registry['suspended']}"
    return line


@main.command()
@data_dir_option
@json_option
def peers(data_dir: Path | None, as_json: bool) -> None:
    """List the peers this node is connected to, with address, RTT and bytes in and out."""
    dd = resolve_data_dir(data_dir)
    info = control.call(dd.control_socket, "peers")
    if as_json:
        print_json(info)
        return
    for view in ("active", "passive"):
        members = info.get(view, [])
        click.echo(f"{view} view ({len(members)}): " + (", ".join(
            f"{m['node_id'][:13]}@{m['addr']} {m['state']}" for m in members) or "empty"))
    rows = info["connections"]
    if not rows:
        click.echo("no peers connected")
        return
    click.echo(f"{'node id':58} {'dir':3} {'path':7} {'address':24} {'rtt ms':>8} {'bytes in':>10} "
               f"{'bytes out':>10}")
    for row in rows:
        rtt = "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f}"
        click.echo(f"{row['node_id']:58} {row['direction']:3} {row.get('path', 'direct'):7} "
                   f"{row['address']:24} {rtt:>8} {row['bytes_in']:>10} {row['bytes_out']:>10}")


@main.command()
@data_dir_option
@click.argument("node_id", metavar="NODE_ID")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=20.0, show_default=True,
              help="Seconds to keep trying.")
@json_option
def connect(data_dir: Path | None, node_id: str, timeout: float, as_json: bool) -> None:
    """Connect the running agent to NODE_ID (directly, through its relay, or by hole punching)
    and show the path it got."""
    dd = resolve_data_dir(data_dir)
    try:
        info = control.call(dd.control_socket, "connect", {"node_id": node_id, "timeout": timeout},
                            timeout=timeout + 5)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        print_json(info)
        return
    via = f" through relay {info['relay']}" if info.get("relay") else ""
    rtt = "" if info["rtt_ms"] is None else f", rtt {info['rtt_ms']:.1f} ms"
    click.echo(f"connected to {info['node_id']}: {info['path']}{via} in {info['elapsed_ms']:.0f} ms{rtt}")


@main.command()
@data_dir_option
@click.option("--mesh", is_flag=True, help="List every advert this node knows, from the running agent.")
@json_option
def assets(data_dir: Path | None, mesh: bool, as_json: bool) -> None:
    """Show the hardware this node could share (from the agent, or measured now if none runs)."""
    dd = resolve_data_dir(data_dir)
    if mesh:
        adverts = control.call(dd.control_socket, "adverts")
        if as_json:
            print_json(adverts)
            return
        for ad in adverts:
            cpu = ad["inventory"].get("cpu", {})
            click.echo(f"{ad['node_id']} seq {ad['seq']}: {cpu.get('logical_cores', '?')} cores, "
                       f"{ad['inventory'].get('memory_bytes', 0) / 2**30:.1f} GiB, "
                       f"{len(ad['inventory'].get('gpus', []))} GPU, at {', '.join(ad['addresses'])}"
                       + _sharing(ad["inventory"].get("share")))
        click.echo(f"{len(adverts)} adverts")
        return
    try:
        inventory = Inventory.from_dict(control.call(dd.control_socket, "assets"))
        source = "agent"
    except AgentNotRunning:
        inventory = collect_inventory(dd.path, time.time())
        source = "measured now (no agent running)"
    if as_json:
        print_json(inventory.to_dict())
        return
    click.echo(f"# {source}")
    for line in summary_lines(inventory):
        click.echo(line)
