"""`graphopt prune MODEL_DIR -o OUT`: remove attention heads, MLP channels or whole layers from the graph."""

from __future__ import annotations

import click

from graphopt.commands import calibration_options, calibration_spec, default, report_step
from graphopt.errors import GraphoptError
from graphopt.pruning import IMPORTANCE, SPLITS, PruneConfig, prune


@click.command("prune")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--heads", type=float, default=None, metavar="F",
              help="Fraction of query heads to remove, as whole KV groups (the KV cache shrinks with them).")
@click.option("--channels", type=float, default=None, metavar="F", help="Fraction of every layer's MLP channels to remove.")
@click.option("--layers", type=int, default=None, metavar="N", help="Number of decoder layers to drop.")
@click.option("--params", type=float, default=None, metavar="F",
              help="Fraction of all parameters to remove, divided as --split says (not with the three above).")
@click.option("--split", type=click.Choice(SPLITS), default=default(PruneConfig, "split"), show_default=True,
              help="For --params: channels only, heads and channels at one fraction, or layers first.")
@click.option("--importance", type=click.Choice(IMPORTANCE), default=default(PruneConfig, "importance"), show_default=True,
              help="Measured on calibration data, or seeded random (the control).")
@calibration_options
@click.option("--seed", type=int, default=default(PruneConfig, "seed"), show_default=True,
              help="Seed of the data-free calibration, the window choice and --importance random.")
def command(model_dir, output, force, seed, **options) -> None:
    """Prune MODEL_DIR into OUTPUT (an unfused or fused float model; prune before quantizing).

    Example: graphopt prune smollm2 -o smollm2-pruned --params 0.25
    """
    if all(options[name] is None for name in ("heads", "channels", "layers", "params")):
        raise GraphoptError("say what to remove: --heads F, --channels F, --layers N or --params F")
    # The options left in ``options`` are PruneConfig fields of the same names.
    result = prune(model_dir, output, force=force, seed=seed, calib=calibration_spec(options, seed), **options)
    report_step(result.manifest.lineage[-1])
    click.echo(str(result.path))
