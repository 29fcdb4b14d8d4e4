"""`hmnode simnet`: run meshes locally and benchmark them."""

from __future__ import annotations

import json

import click

from hmnode.simnet.bench import BENCHMARKS


@click.group()
def simnet() -> None:
    """Local meshes and benchmarks."""


@simnet.command()
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)), required=False)
@click.option("--runs", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Repetitions; figures are medians.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks.")
def bench(name: str | None, runs: int, as_json: bool, list_only: bool) -> None:
    """Run benchmark NAME; each figure is printed beside a baseline from the same run."""
    if list_only or name is None:
        for bench_name, module in sorted(BENCHMARKS.items()):
            click.echo(f"{bench_name:12} {(module.__doc__ or '').strip().splitlines()[0]}")
        return
    module = BENCHMARKS[name]
    with click.progressbar(length=runs * module.STEPS_PER_RUN, label=f"bench {name}", file=click.get_text_stream("stderr")) as bar:
        figures = module.run(runs=runs, progress=bar.update)
    for line in module.report(figures):
        click.echo(line, err=as_json)
    if as_json:
        click.echo(json.dumps(figures, sort_keys=True))
