"""`hmnode share` and `hmnode earnings`: what a contributor gives the mesh, when, at what price,
and what it earned."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from hmnode import control
from hmnode.cli.options import data_dir_option, json_option, print_json, resolve_data_dir
from hmnode.config import load_config, set_config_values
from hmnode.errors import AgentNotRunning, ControlError, HmnodeError, UsageError

# Each option of `hmnode share` and the setting it writes.
OPTIONS = {
    "enable": "share.enabled", "cores": "share.cores", "memory": "share.memory",
    "storage": "share.storage", "gpus": "share.gpus", "process": "share.process",
    "window": "share.windows", "idle_only": "share.idle_only",
    "idle_minutes": "share.idle_minutes", "idle_cpu_percent": "share.idle_cpu_percent",
    "pause_on_battery": "share.pause_on_battery", "max_cpu_temp": "share.max_cpu_temp_c",
    "max_gpu_temp": "share.max_gpu_temp_c", "keep_free_disk": "share.keep_free_disk",
    "allow": "share.allow", "grace": "share.grace_s", "core_hour": "price.core_hour",
    "gib_hour": "price.gib_hour", "gpu_hour": "price.gpu_hour",
    "gpu_model_price": "price.gpu_models", "start_fee": "price.start_fee",
    "dynamic": "price.dynamic", "floor": "price.floor",
}
# Settings the running node takes only at its next start.
AT_START = ("share.process",)


@click.command()
@click.option("--enable/--disable", default=None, help="Share at all (share.enabled).")
@click.option("--cores", metavar="N|P%", help="Cores to share: a count or a share, '50%'.")
@click.option("--memory", metavar="SIZE|P%", help="Memory to share: '8 GiB' or '50%'.")
@click.option("--storage", metavar="SIZE|P%", help="Disk for other nodes' blobs: '10 GiB'.")
@click.option("--gpus", metavar="all|none|I,J", help="GPUs to share (indices from `hmnode assets`).")
@click.option("--process/--no-process", default=None,
              help="Run native `process` jobs in a sandbox (off by default; at next start).")
@click.option("--window", multiple=True, metavar="WINDOW",
              help="When to share, repeatable: 'Mon-Fri 18:00-08:00', 'Sat,Sun'; 'always' "
                   "clears them.")
@click.option("--idle-only/--not-idle-only", default=None,
              help="Share only when no one uses the machine.")
@click.option("--idle-minutes", type=float, help="Minutes without input and load first [3].")
@click.option("--idle-cpu-percent", type=float, help="Other programs' CPU load that counts as "
              "use [25].")
@click.option("--pause-on-battery/--run-on-battery", default=None,
              help="Pause while on battery [pause].")
@click.option("--max-cpu-temp", type=float, metavar="CELSIUS", help="Pause above it; 0: none [90].")
@click.option("--max-gpu-temp", type=float, metavar="CELSIUS", help="Pause above it; 0: none [85].")
@click.option("--keep-free-disk", metavar="SIZE|P%", help="Pause below this much free disk.")
@click.option("--allow", metavar="everyone|owner|ID,...", help="Whose jobs to run.")
@click.option("--grace", type=float, metavar="SECONDS",
              help="How long paused jobs wait before going back to the mesh [300].")
@click.option("--core-hour", type=int, metavar="CREDITS", help="Price of a core-hour.")
@click.option("--gib-hour", type=int, metavar="CREDITS", help="Price of a GiB-hour of memory.")
@click.option("--gpu-hour", type=int, metavar="CREDITS", help="Price of a GPU-hour.")
@click.option("--gpu-model-price", metavar="MODEL=CREDITS,...",
              help="GPU-hour prices by model.")
@click.option("--start-fee", type=int, metavar="CREDITS", help="Price per job started.")
@click.option("--dynamic", type=float, metavar="0..1",
              help="How far prices follow the node's load (0: fixed).")
@click.option("--floor", type=float, metavar="0..1",
              help="Lowest share of the prices the dynamic factor goes down to.")
@data_dir_option
@json_option
def share(data_dir: Path | None, as_json: bool, **given: Any) -> None:
    """Show or set what this machine shares, when, for whom and at what price. Settings are
    saved in config.toml and a running node applies them at once; with no options, shows them
    and whether the node shares right now (and if not, why)."""
    dd = resolve_data_dir(data_dir)
    values = {OPTIONS[name]: value for name, value in given.items()
              if value is not None and value != ()}
    if "share.windows" in values:
        windows = [w for w in values["share.windows"] if w.lower() != "always"]
        values["share.windows"] = windows
    if values:
        try:
            dd.create()  # a node not yet started: its settings wait in its data dir
            set_config_values(dd.config_file, values)
        except HmnodeError as exc:
            raise UsageError(str(exc)) from None
    try:
        info = control.call(dd.control_socket, "share_reload" if values else "share")
    except AgentNotRunning:
        info = {"settings": _file_settings(dd.config_file), "status": None}
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        print_json(info)
        return
    for key, value in info["settings"].items():
        click.echo(f"{key:<24} {_shown(value)}")
    status = info["status"]
    if status is None:
        click.echo("the node is not running" + ("; the settings take effect when it starts"
                                                 if values else ""))
        return
    if status["sharing"]:
        click.echo(f"sharing now: {status.get('cores')} cores, {status.get('memory_mib')} MiB, "
                   f"{', '.join(status.get('runtimes', []))}")
    else:
        click.echo("not sharing now: " + "; ".join(status["why_not"]))
    later = [k for k in values if k in AT_START]
    if later:
        click.echo(f"{', '.join(later)} takes effect when the node next starts")


def _file_settings(path: Path) -> dict[str, Any]:
    try:
        config = load_config(path)
    except HmnodeError as exc:
        raise click.ClickException(str(exc)) from None
    return config.show("share.", "price.")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "-"
    return str(value).lower() if isinstance(value, bool) else str(value)


_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> int:
    """A time as ms since the epoch: '24h', '7d', '30m' ago, or a date or date and time
    ('2026-11-01', '2026-11-01T18:00'), local time."""
    now = time.time() if now is None else now
    match = _AGO.match(text)
    if match:
        return int((now - float(match[1]) * _UNIT_S[match[2]]) * 1000)
    try:
        return int(datetime.fromisoformat(text.strip()).timestamp() * 1000)
    except ValueError:
        raise UsageError(f"--since takes a time ago ('24h', '7d') or a date ('2026-11-01', "
                         f"'2026-11-01T18:00'), not {text!r}") from None


@click.command()
@click.option("--since", metavar="WHEN", help="Only what was paid since: '24h', '7d', "
                                              "'2026-11-01'.")
@data_dir_option
@json_option
def earnings(since: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Show the credits this node earned running jobs, per job and in total (from the
    chain's records)."""
    since_ms = 0 if since is None else parse_since(since)
    try:
        info = control.call(resolve_data_dir(data_dir).control_socket, "earnings",
                            {"since_ms": since_ms})
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        print_json(info)
        return
    for job in info["jobs"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["at_ms"] / 1000))
        click.echo(f"{at}  job {job['job_id'][:16]}  {job['runtime']:<7}  "
                   f"{job['wall_ms'] / 1000:8.1f} s  {job['paid']:>10} credits  "
                   f"from {job['owner'][:16]}")
    span = "" if since is None else f" since {since}"
    click.echo(f"total      {info['total']} credits from {len(info['jobs'])} jobs{span}")
    click.echo(f"balance    {info['balance']} credits (height {info['height']})")
