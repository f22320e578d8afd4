"""`graphopt export SRC -o OUT`: checkpoint to a validated KV-cache ONNX model directory."""

from __future__ import annotations

import click

from graphopt import sources


@click.command("export")
@click.argument("src", required=False, default=sources.DEFAULT_MODEL)
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch (logits and 32 greedy tokens).")
@click.option("--tolerance", type=float, default=1e-3, show_default=True, help="Max |logits diff| accepted.")
@click.option("--opset", type=click.IntRange(18, 23), default=18, show_default=True, help="ONNX opset of the graph.")
def command(src: str, output: str, force: bool, validate: bool, tolerance: float, opset: int) -> None:
    """Export SRC (a registry name, a Hugging Face checkpoint directory or a .gguf file) to OUTPUT."""
    from graphopt.cli import progress
    from graphopt.export import export

    model_dir = export(src, output, force=force, run_validation=validate, tolerance=tolerance, opset=opset,
                       progress=progress)
    step = model_dir.manifest["lineage"][-1]
    for name, value in step.get("figures", {}).items():
        progress(f"  {name}: {value:.3g}" if isinstance(value, float) else f"  {name}: {value}")
    click.echo(str(model_dir.path))
