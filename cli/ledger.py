"""`hmnode ledger`, `hmnode stake`, `hmnode unstake`, `hmnode transfer`, `hmnode faucet` and
`hmnode jobs`: credits and jobs on the chain, through the running node (which signs with its
key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hmnode import control
from hmnode.cli.options import data_dir_option, json_option, print_json, resolve_data_dir
from hmnode.errors import ControlError, UsageError
from hmnode.identity import NodeId


@click.command()
@data_dir_option
@json_option
def ledger(data_dir: Path | None, as_json: bool) -> None:
    """Show this node's balance, stake and unbonding stake, the chain's totals, and the largest
    accounts."""
    info = _call(data_dir, "ledger", {})
    if as_json:
        print_json(info)
        return
    me, totals = info["account"], info["totals"]
    click.echo(f"height     {info['height']}")
    click.echo(f"balance    {me['balance']}")
    click.echo(f"stake      {me['stake']}")
    for entry in me["unbonding"]:
        click.echo(f"unbonding  {entry['amount']} (paid at height {entry['release_height']})")
    click.echo(f"supply     {totals['supply']} (minted {totals['minted']}, burned "
               f"{totals['burned']}); staked {totals['stake']}, in escrow {totals['escrow']}")
    if info["jailed"]:
        click.echo(f"jailed     {', '.join(info['jailed'])}")
    click.echo(f"accounts ({len(info['accounts'])} largest):")
    for account in info["accounts"][:20]:
        click.echo(f"  {account['node_id']}  balance {account['balance']:>12}  "
                   f"stake {account['stake']:>12}")


@click.command()
@data_dir_option
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="How many of the newest jobs to show.")
@json_option
def jobs(data_dir: Path | None, limit: int, as_json: bool) -> None:
    """Show the chain's newest jobs: state, node, cost, and why a queued job waits."""
    info = _call(data_dir, "jobs", {"limit": limit})
    if as_json:
        print_json(info)
        return
    if not info["jobs"]:
        click.echo(f"no jobs on the chain (height {info['height']})")
        return
    for job in info["jobs"]:
        where = (f"on {job['node'][:13]} for {job['cost']}" if job["node"] else
                 f"waiting: {job['why_waiting']}" if job["state"] == "queued" else "")
        click.echo(f"{job['job_id'][:16]} {job['state']:9} {where}")


def _amount_command(name: str, kind: str, doc: str) -> click.Command:
    @click.command(name, help=doc)
    @data_dir_option
    @click.argument("amount", type=click.IntRange(1))
    @_wait_option
    @json_option
    def command(data_dir: Path | None, amount: int, wait: float, as_json: bool) -> None:
        _report(_call(data_dir, "transaction", {"kind": kind, "body": {"amount": amount},
                                                "wait": wait}, wait), as_json)
    return command


def _wait_option(fn: Any) -> Any:
    return click.option("--wait", type=click.FloatRange(0, 600), default=10.0,
                        show_default=True,
                        help="Seconds to wait for the commit (0: do not wait).")(fn)


stake = _amount_command("stake", "stake.bond",
                        "Bond AMOUNT credits of this node's balance as stake (its voting "
                        "power from the next epoch).")
unstake = _amount_command("unstake", "stake.unbond",
                          "Unbond AMOUNT credits of stake; they return to the balance after "
                          "the chain's unbonding period.")
faucet = _amount_command("faucet", "ledger.faucet",
                         "Mint AMOUNT credits to this node, on a chain that has a faucet (a "
                         "local mesh).")


@click.command()
@data_dir_option
@click.argument("node_id", metavar="NODE_ID")
@click.argument("amount", type=click.IntRange(1))
@_wait_option
@json_option
def transfer(data_dir: Path | None, node_id: str, amount: int, wait: float,
             as_json: bool) -> None:
    """Send AMOUNT credits from this node to NODE_ID."""
    try:
        to = NodeId.parse(node_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _report(_call(data_dir, "transaction", {"kind": "ledger.transfer",
                                            "body": {"to": to.key, "amount": amount},
                                            "wait": wait}, wait), as_json)


def _call(data_dir: Path | None, method: str, params: dict[str, Any], wait: float = 0) -> Any:
    try:
        return control.call(resolve_data_dir(data_dir).control_socket, method, params,
                            timeout=wait + 10)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


def _report(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(info)
    elif "height" not in info:
        click.echo(f"submitted {info['kind']} transaction {info['tx_id']}")
    elif info["ok"]:
        click.echo(f"committed at height {info['height']} (tx {info['tx_id'][:16]})")
    else:
        raise click.ClickException(f"the chain refused the transaction at height "
                                   f"{info['height']}: {info['rejected']}")
