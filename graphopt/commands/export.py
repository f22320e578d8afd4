"""`graphopt export SRC -o OUT`: checkpoint to a validated KV-cache ONNX model directory."""

from __future__ import annotations

import pathlib
import tempfile

import click

from graphopt import sources
from graphopt.commands import report_step
from graphopt.export import DEFAULT_OPSET, export
from graphopt.fusion import fuse
from graphopt.modeldir import check_output
from graphopt.passes.targets import TARGETS


@click.command("export")
@click.argument("src", required=False, default=sources.DEFAULT_MODEL)
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch (logits and 32 greedy tokens).")
@click.option("--tolerance", type=float, default=1e-3, show_default=True, help="Max |logits diff| accepted.")
@click.option("--opset", type=click.IntRange(18, 23), default=DEFAULT_OPSET, show_default=True, help="ONNX opset of the graph.")
@click.option("--fuse", "fuse_target", type=click.Choice(list(TARGETS)), default=None,
              help="Also fuse attention for this target (as `graphopt fuse`), in one step.")
@click.option("--keep-quantization", is_flag=True,
              help="GGUF source: keep its quantized linears as MatMulNBits with no float round trip (Q8_0, Q4_0 "
                   "exactly; Q4_1's codes as they are, offsets within 1/28 of a step); others are requantized and their "
                   "error reported. The tied embedding is stored once, quantized.")
def command(src: str, output: str, force: bool, validate: bool, tolerance: float, opset: int,
            fuse_target: str | None, keep_quantization: bool) -> None:
    """Export SRC (a registry name, a Hugging Face checkpoint directory or a .gguf file) to OUTPUT."""
    if keep_quantization:
        from graphopt.gguf_import import export_keeping_quantization

        model_dir = export_keeping_quantization(src, output, force, validate, tolerance, opset, fuse_target,
                                                _export_fused)
    elif fuse_target is None:
        model_dir = export(src, output, force=force, run_validation=validate, tolerance=tolerance, opset=opset)
    else:
        model_dir = _export_fused(src, output, force, validate, tolerance, opset, fuse_target)
    for step in model_dir.manifest.lineage[-(1 + bool(fuse_target) + keep_quantization):]:
        report_step(step)
    click.echo(str(model_dir.path))


def _export_fused(src, output, force, validate, tolerance, opset, target):
    """Export into a hidden directory beside OUTPUT, fuse from it into OUTPUT, drop the plain export.

    ``fuse`` writes OUTPUT atomically, so a failure anywhere leaves OUTPUT as it was.
    """
    target_path = check_output(output, force, sources=[src])
    target_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target_path.name}.", suffix=".export", dir=target_path.parent) as scratch:
        plain = export(src, pathlib.Path(scratch) / "plain", run_validation=validate, tolerance=tolerance, opset=opset)
        fused, _counts = fuse(plain.path, output, target, force=force, validate=validate, tolerance=tolerance)
    return fused
