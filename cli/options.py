"""Options and output shared by the `hmnode` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hmnode.config import default_data_dir
from hmnode.datadir import DataDir


def data_dir_option(fn: Any) -> Any:
    """The `--data-dir` option of every command that works on a node."""
    return click.option(
        "--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="HMNODE_DATA_DIR",
        default=None, show_envvar=True,
        help="Node data directory [default: $XDG_DATA_HOME/hmnode or ~/.local/share/hmnode].",
    )(fn)


def resolve_data_dir(data_dir: Path | None) -> DataDir:
    """The data dir the user named, or the default one."""
    return DataDir((data_dir or default_data_dir()).expanduser().absolute())


def json_option(fn: Any) -> Any:
    """The `--json` flag of a command that prints data."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(fn)


def print_json(obj: Any) -> None:
    """Print `obj` as indented JSON with sorted keys (what every `--json` prints)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True))
