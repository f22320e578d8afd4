"""`graphopt fetch NAME`: put a registry model into the local cache and print its path."""

from __future__ import annotations

import click

from graphopt import sources


@click.command("fetch")
@click.argument("name", required=False, default=sources.DEFAULT_MODEL)
@click.option("--list", "list_models", is_flag=True, help="List the models graphopt can fetch.")
def command(name: str, list_models: bool) -> None:
    """Download NAME (default: smollm2-135m) into $GRAPHOPT_HOME once, verify it, print its path."""
    if list_models:
        for entry in sources.REGISTRY.values():
            click.echo(f"{entry.name}\t{entry.description}")
        return
    click.echo(str(sources.fetch(name)))
