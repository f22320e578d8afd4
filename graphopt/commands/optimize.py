"""`graphopt optimize [SRC] -o OUT [--recipe NAME]`: checkpoint to a deployable, measured target and draft."""

from __future__ import annotations

import pathlib

import click

from graphopt import sources
from graphopt.commands import default
from graphopt.optimize import MeasureSettings, optimize, table
from graphopt.recipes import DEFAULT_RECIPE, RECIPES, describe


def _list_recipes(ctx, _parameter, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    for recipe in RECIPES.values():
        click.echo(describe(recipe))
    ctx.exit(0)


@click.command("optimize")
@click.argument("src", required=False, default=sources.DEFAULT_MODEL)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Directory to create: target/, draft/ (when it pays), report.*")
@click.option("--recipe", default=DEFAULT_RECIPE, show_default=True, help="Pipeline to run (see --list-recipes).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--list-recipes", is_flag=True, expose_value=False, is_eager=True, callback=_list_recipes,
              help="Print the recipes and their stages, then exit.")
@click.option("--tokens", type=click.IntRange(2, 4096), default=default(MeasureSettings, "tokens"), show_default=True,
              help="New tokens per decode measurement.")
@click.option("--eval-windows", type=click.IntRange(1, 1000), default=default(MeasureSettings, "eval_windows"),
              show_default=True, help="Perplexity windows (of up to --window tokens) per model.")
@click.option("--window", type=click.IntRange(8, 8192), default=default(MeasureSettings, "window"), show_default=True,
              help="Perplexity window.")
@click.option("--reference/--no-reference", default=default(MeasureSettings, "reference_tools"), show_default=True,
              help="Also measure transformers generate on the checkpoint (when SRC is one).")
@click.option("--with-peers", is_flag=True, help="Also measure onnxruntime.quantization.quantize_dynamic on the export.")
@click.option("--keep-draft", is_flag=True,
              help="Write draft/ even when target + draft decoded slower than the target alone.")
def command(src: str, output: str, recipe: str, force: bool, tokens: int, eval_windows: int, window: int,
            reference: bool, with_peers: bool, keep_draft: bool) -> None:
    """Export SRC, then prune, fuse, quantize, validate and draft as RECIPE says, measuring every stage.

    SRC is a registry name (default: the embedded SmolLM2-135M-Instruct), a Hugging Face checkpoint
    directory, a .gguf file, or a float32 graphopt model directory (used as the export).

    Example: graphopt optimize -o smollm2-opt --recipe cpu-int4
    """
    settings = MeasureSettings(tokens=tokens, eval_windows=eval_windows, window=window, reference_tools=reference,
                               with_peers=with_peers)
    out = optimize(src, output, recipe, force=force, settings=settings, keep_draft=keep_draft)
    click.echo(table(pathlib.Path(out) / "report.md"))
    click.echo(str(out))
