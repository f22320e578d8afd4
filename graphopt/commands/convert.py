"""`graphopt convert MODEL_DIR -o OUT --dtype fp16`: float32 to float16, sensitive ops kept in float32."""

from __future__ import annotations

import click

from graphopt.commands import default, report_step
from graphopt.convert import DTYPES, ConvertConfig, convert


@click.command("convert")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--dtype", type=click.Choice(DTYPES), required=True, help="Target precision of weights, activations and cache.")
@click.option("--keep-softmax/--no-keep-softmax", default=default(ConvertConfig, "keep_softmax"), show_default=True,
              help="Run Softmax (where the attention mask meets the scores) in float32.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--validate/--no-validate", default=default(ConvertConfig, "validate"), show_default=True,
              help="Compare logits with the float32 source on CPU.")
def command(model_dir: str, output: str, dtype: str, keep_softmax: bool, force: bool, validate: bool) -> None:
    """Convert MODEL_DIR to DTYPE into OUTPUT (for CUDA / TensorRT; the CPU runs it, slowly).

    Example: graphopt convert smollm2-fused -o smollm2-fp16 --dtype fp16
    """
    converted = convert(model_dir, output, dtype=dtype, keep_softmax=keep_softmax, force=force, validate=validate)
    report_step(converted.manifest.lineage[-1])
    click.echo(str(converted.path))
