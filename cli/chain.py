"""`hmnode chain`, `hmnode kv` and `hmnode genesis`: the committed chain, its key-value test
application, and the file that starts a chain."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from hmnode import control
from hmnode.cli.options import data_dir_option, json_option, print_json, resolve_data_dir
from hmnode.chain_service import write_genesis
from hmnode.consensus.chain import DEFAULT_EPOCH_BLOCKS, Genesis
from hmnode.consensus.validators import ValidatorSet
from hmnode.errors import ControlError, UsageError
from hmnode.identity import NodeId


@click.command()
@data_dir_option
@click.option("--height", type=click.IntRange(0), default=None,
              help="The block to show [default: the head].")
@json_option
def chain(data_dir: Path | None, height: int | None, as_json: bool) -> None:
    """Show a committed block: its header, transactions and commit certificate."""
    dd = resolve_data_dir(data_dir)
    params: dict[str, Any] = {} if height is None else {"height": height}
    try:
        info = control.call(dd.control_socket, "chain", params)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        print_json(info)
        return
    if info["height"] == 0:
        genesis = info["genesis"]
        click.echo(f"height 0 (genesis of chain {genesis['chain_id']})")
        for v in genesis["validators"]:
            click.echo(f"  validator {v['node_id']} power {v['power']}")
        return
    cert = info["certificate"]
    click.echo(f"height     {info['height']}  block {info['block_id']}")
    click.echo(f"chain      {info['chain_id']}")
    click.echo(f"time       {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['time_ms'] / 1000))}")
    click.echo(f"proposer   {info['proposer']}")
    click.echo(f"state root {info['state_root']}")
    click.echo(f"certified  round {cert['round']}, {len(cert['signatures'])} precommits, "
               f"power {cert['power']} of {cert['total_power']}")
    click.echo(f"transactions ({len(info['transactions'])}):")
    for tx in info["transactions"][:50]:
        verdict = "ok" if tx["ok"] else f"rejected: {tx['rejected']}"
        click.echo(f"  {tx['tx_id'][:16]} {tx['kind']:10} {tx['sender'][:13]} nonce {tx['nonce']} "
                   f"{verdict}")
    if len(info["transactions"]) > 50:
        click.echo(f"  ... and {len(info['transactions']) - 50} more (--json shows all)")


@click.group()
def kv() -> None:
    """The chain's key-value test application: put and get through consensus."""


@kv.command("put")
@data_dir_option
@click.argument("key")
@click.argument("value")
@click.option("--wait", type=click.FloatRange(0, 600), default=10.0, show_default=True,
              help="Seconds to wait for the commit (0: do not wait).")
@json_option
def kv_put(data_dir: Path | None, key: str, value: str, wait: float, as_json: bool) -> None:
    """Set KEY to VALUE by a transaction this node signs."""
    dd = resolve_data_dir(data_dir)
    try:
        info = control.call(dd.control_socket, "kv_put",
                            {"key": key, "value": value.encode(), "wait": wait},
                            timeout=wait + 10)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        print_json(info)
    elif "height" in info:
        click.echo(f"committed at height {info['height']} (tx {info['tx_id'][:16]})"
                   + ("" if info["ok"] else f"; rejected: {info['rejected']}"))
    else:
        click.echo(f"submitted tx {info['tx_id']}")


@kv.command("get")
@data_dir_option
@click.argument("key")
@json_option
def kv_get(data_dir: Path | None, key: str, as_json: bool) -> None:
    """Print KEY's committed value."""
    dd = resolve_data_dir(data_dir)
    info = control.call(dd.control_socket, "kv_get", {"key": key})
    if as_json:
        value = info["value"]
        print_json({**info, "value": None if value is None else value.decode(errors="replace")})
        return
    if not info["found"]:
        raise click.ClickException(f"no key {key!r} at height {info['height']}")
    click.echo(info["value"].decode(errors="replace"))


@click.command()
@click.option("--validator", "validators", multiple=True, required=True, metavar="NODE_ID[=POWER]",
              help="A validator and its voting power (default 1); repeat for each.")
@click.option("--chain-id", default=None, help="The chain's name [default: derived from the time].")
@click.option("--epoch-blocks", type=click.IntRange(1, 1_000_000), default=DEFAULT_EPOCH_BLOCKS,
              show_default=True, help="Blocks per epoch (validator set changes take effect at "
                                      "epoch boundaries).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the genesis file (JSON).")
@json_option
def genesis(validators: tuple[str, ...], chain_id: str | None, epoch_blocks: int,
            output: Path, as_json: bool) -> None:
    """Write a genesis file for a chain validated by the given nodes; start each validator with
    `hmnode run --genesis FILE`."""
    members = []
    for text in validators:
        ident, _, power = text.partition("=")
        try:
            members.append((NodeId.parse(ident).key, int(power) if power else 1))
        except ValueError as exc:
            raise UsageError(f"bad --validator {text!r}: {exc}") from None
    now_ms = int(time.time() * 1000)
    try:
        doc = Genesis(chain_id or f"hmnode-{now_ms}", now_ms, ValidatorSet.of(members),
                      epoch_blocks)
    except ValueError as exc:
        raise UsageError(f"not a valid validator set: {exc}") from None
    if output.exists():
        raise UsageError(f"{output} exists; remove it or choose another --output")
    write_genesis(output, doc)
    if as_json:
        print_json({"path": str(output), **doc.to_json()})
    else:
        click.echo(f"wrote {output}: chain {doc.chain_id}, {len(doc.validators)} validators, "
                   f"total power {doc.validators.total}")


__all__ = ["chain", "genesis", "kv"]
