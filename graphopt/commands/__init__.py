"""The `graphopt` commands, one module each exposing ``command`` (a click command), and what they share."""

from __future__ import annotations

import dataclasses

import click

from graphopt.calibration import CalibrationSpec
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


def calibration_options(command):
    """--calib-text, --calib-npz, --calib-samples and --seq-len (quantize, prune), as CalibrationSpec takes them."""
    for option in reversed((
        click.option("--calib-text", type=click.Path(), default=None, help="Calibration text (UTF-8), cut into windows."),
        click.option("--calib-npz", type=click.Path(), default=None, help="Calibration token ids (samples, seq_len)."),
        click.option("--calib-samples", type=int, default=default(CalibrationSpec, "samples"), show_default=True,
                     help="Calibration sequences."),
        click.option("--seq-len", type=int, default=default(CalibrationSpec, "seq_len"), show_default=True,
                     help="Tokens per calibration sequence."),
    )):
        command = option(command)
    return command


def calibration_spec(options: dict, seed: int) -> CalibrationSpec:
    """The spec that :func:`calibration_options`' values say, taken out of a command's ``options``."""
    return CalibrationSpec(text=options.pop("calib_text"), npz=options.pop("calib_npz"),
                           samples=options.pop("calib_samples"), seq_len=options.pop("seq_len"), seed=seed)
