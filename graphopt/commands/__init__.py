"""The `graphopt` commands, one module each; each exposes ``command`` (a click command).

Commands print what a step did with :func:`report_step`; progress while it runs comes from the
``graphopt`` loggers, which the CLI (``graphopt.cli``) shows on stderr.
"""

from __future__ import annotations

import dataclasses

import click

from graphopt.manifest import LineageStep


def default(config_type, name: str):
    """The default of a config field: parameters are defaulted once, in their config type."""
    return next(field.default for field in dataclasses.fields(config_type) if field.name == name)


def say(message: str) -> None:
    """A line on stderr (stdout stays clean for --json and for the output path)."""
    click.echo(f"graphopt: {message}", err=True)


def report_step(step: LineageStep) -> None:
    """The counts and figures of one lineage step, one per line."""
    for name, count in step.counts.items():
        say(f"  {name}: {count}")
    for name, value in step.figures.items():
        if isinstance(value, list) and len(value) > 8:  # e.g. the linears kept int8: all of them are in graphopt.json
            value = f"{len(value)} ({', '.join(map(str, value[:3]))}, ...; the list is in graphopt.json)"
        say(f"  {name}: {value:.3g}" if isinstance(value, float) else f"  {name}: {value}")
