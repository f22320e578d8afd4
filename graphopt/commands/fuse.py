"""`graphopt fuse MODEL_DIR -o OUT --target cpu|cuda|tensorrt|onnx`: one fused op per attention layer."""

from __future__ import annotations

import click

from graphopt.commands import default, report_step, say
from graphopt.fusion import FuseConfig, fuse
from graphopt.passes.targets import TARGETS


@click.command("fuse")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--target", required=True, type=click.Choice(list(TARGETS)),
              help="Where the model will run: cpu/cuda use ONNX Runtime contrib ops, tensorrt/onnx standard opset 23.")
@click.option("--explain", is_flag=True, help="Say why each rule that fused nothing did not match.")
@click.option("--require", is_flag=True, help="Fail (exit 2) unless every attention layer fuses.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--validate/--no-validate", default=default(FuseConfig, "validate"), show_default=True,
              help="Compare fused and source logits on CPU (prefill, decode, multi-token on cache).")
@click.option("--pack-qkv", is_flag=True,
              help="One MatMul for the query, key and value projections (cpu/cuda): fewer kernels per layer on a GPU.")
@click.option("--pack-gate-up", is_flag=True,
              help="One MatMul and a Split for sibling projections on one input (the MLP's gate and up).")
def command(model_dir: str, output: str, target: str, explain: bool, require: bool, force: bool, validate: bool,
            pack_qkv: bool, pack_gate_up: bool) -> None:
    """Fuse attention, norms and GELU of MODEL_DIR for TARGET into OUTPUT."""
    fused, counts = fuse(model_dir, output, target, require=require, explain=explain, force=force, validate=validate,
                         pack_qkv=pack_qkv, pack_gate_up=pack_gate_up)
    if not counts:
        say("  nothing fused (model unchanged)")
    report_step(fused.manifest.lineage[-1])
    click.echo(str(fused.path))
