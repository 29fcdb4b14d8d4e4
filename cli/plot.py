"""`hmnode plot`: create or resume this node's proof-of-space plot in its data dir."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from hmnode.cli.options import json_option, print_json
from hmnode.config import default_data_dir
from hmnode.consensus.space import DEFAULT_SPACE, Plot, SpaceParams, plot_directory, plot_id_for
from hmnode.datadir import DataDir
from hmnode.errors import UsageError
from hmnode.identity import load_or_create_key

# Binary and decimal byte units; a bare number counts labels.
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str, params: SpaceParams = DEFAULT_SPACE) -> int:
    """The number of labels SIZE names: `64MiB` (bytes, rounded down to whole labels) or
    `1000` (labels); UsageError outside 1..max_labels."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS and unit != "labels"):
        raise UsageError(f"bad --size {text!r}: give a number of labels (e.g. 1048576) or bytes "
                         "with a unit (e.g. 64MiB; B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")
    amount = int(match.group(1))
    n_labels = amount if unit in ("", "labels") else amount * _UNITS[unit] // params.label_bytes
    if not 1 <= n_labels <= params.max_labels:
        raise UsageError(
            f"--size {text} is {n_labels} labels; a plot has 1 to {params.max_labels} labels "
            f"({params.max_labels * params.label_bytes // 2**20} MiB of "
            f"{params.label_bytes}-byte labels)")
    return n_labels


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@click.command("plot")
@click.option("--size", "size", required=True, metavar="SIZE",
              help="Plot size: bytes with a unit (64MiB, 1GiB) or a number of labels.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="HMNODE_DATA_DIR", default=None, show_envvar=True,
              help="Node data directory [default: $XDG_DATA_HOME/hmnode or ~/.local/share/hmnode].")
@json_option
def plot(size: str, data_dir: Path | None, as_json: bool) -> None:
    """Create (or resume) this node's proof-of-space plot of SIZE and print its commitment.

    The plot lives in DATA_DIR/plots/<plot id>/. An interrupted plot (Ctrl-C, a full disk, a
    crash) resumes where it stopped when the same command runs again; a finished one is
    reported as it is, without plotting again.
    """
    params = DEFAULT_SPACE
    n_labels = parse_size(size, params)
    dd = DataDir((data_dir or default_data_dir()).expanduser().absolute())
    dd.create()
    key, created_key = load_or_create_key(dd.key_file)
    node_id = key.node_id
    if created_key:
        click.echo(f"hmnode: created the node key {dd.key_file} for {node_id}", err=True)
    directory = plot_directory(dd.path, plot_id_for(node_id.key, n_labels, params))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def progress(done: int, total: int) -> None:
            # The bar appears with the first labels to plot: a finished plot shows none.
            if not bars:
                bars.append(stack.enter_context(click.progressbar(
                    length=total, label=f"plotting {total} labels", file=sys.stderr,
                    show_pos=True, show_eta=True)))
            bars[0].update(done - bars[0].pos)

        try:
            result = Plot.create(directory, node_id.key, n_labels, params, progress=progress)
        except KeyboardInterrupt:
            stack.close()
            click.echo(f"\nhmnode: interrupted; the plot in {directory} is kept and resumes "
                       f"when `hmnode plot --size {size}` runs again", err=True)
            sys.exit(130)
    elapsed = time.monotonic() - started
    commitment = result.commitment()
    if result.labels_computed == 0 and result.resumed_from == n_labels:
        status = "complete"  # nothing was plotted in this run
    elif result.resumed_from:
        status = "resumed"
    else:
        status = "created"
    on_disk = result.labels_on_disk()
    info: dict[str, Any] = {
        "node_id": str(node_id), "plot_id": commitment.plot_id.hex(),
        "n_labels": commitment.n_labels, "bytes": commitment.n_labels * params.label_bytes,
        "root": commitment.root.hex(), "params_version": commitment.version,
        "directory": str(directory), "status": status, "resumed_from": result.resumed_from,
        "labels_computed": result.labels_computed, "labels_on_disk": on_disk,
        "elapsed_s": round(elapsed, 3),
    }
    if on_disk < n_labels:
        click.echo(f"hmnode: warning: {n_labels - on_disk} of the plot's labels are missing "
                   f"from {directory}; proofs that hit them will fail: delete {directory} and "
                   "run this command again to plot anew", err=True)
    if as_json:
        print_json(info)
        return
    click.echo(f"plot id    {info['plot_id']}")
    click.echo(f"node id    {info['node_id']}")
    click.echo(f"labels     {n_labels} ({_human_bytes(info['bytes'])}, parameter set "
               f"{commitment.version})")
    click.echo(f"root       {info['root']}")
    click.echo(f"directory  {directory}")
    if status == "complete":
        click.echo("status     complete (already plotted; nothing to do)")
    else:
        rate = f", {result.labels_computed / elapsed:.0f} labels/s" if elapsed > 0 else ""
        click.echo(f"status     {status}: {result.labels_computed} labels computed in "
                   f"{elapsed:.1f} s{rate}")
