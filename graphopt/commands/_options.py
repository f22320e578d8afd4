"""Options shared by commands that calibrate on data (quantize, prune)."""

from __future__ import annotations

import click

from graphopt.calibration import CalibrationSpec
from graphopt.commands import default


def calibration_options(command):
    """--calib-text, --calib-npz, --calib-samples and --seq-len, as graphopt.calibration.CalibrationSpec takes them."""
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
