"""Options and output shared by the `hmnode` commands."""

from __future__ import annotations

import json
from typing import Any

import click


def json_option(fn: Any) -> Any:
    """The `--json` flag of a command that prints data."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(fn)


def print_json(obj: Any) -> None:
    """Print `obj` as indented JSON with sorted keys (what every `--json` prints)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True))
