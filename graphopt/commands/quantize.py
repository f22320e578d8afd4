"""`graphopt quantize MODEL_DIR -o OUT`: weight-only int8 / int4 (MatMulNBits), or static W8A8 QDQ, with calibration.

Every default is the quantize config's own (``graphopt.quantization.QuantizeConfig``), read here.
"""

from __future__ import annotations

import click

from graphopt.commands import calibration_options, calibration_spec, default, report_step
from graphopt.evaluate import DEFAULT_TEXT
from graphopt.quantization import (BLOCK_SIZES, DOWN_PROJ, EMBEDDING_CHOICES, HEAD_CHOICES, METHODS, ROTATIONS,
                                   QuantizeConfig, quantize)
from graphopt.ranges import METHODS as CALIBRATION_METHODS


def _default(name: str):
    return default(QuantizeConfig, name)


@click.command("quantize")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default=_default("weights"), show_default=True,
              help="Weight precision.")
@click.option("--activations", type=click.Choice(["none", "int8"]), default=_default("activations"), show_default=True,
              help="none: weight-only MatMulNBits (what --weights int8 or --weights int4 alone gives); int8: "
                   "static W8A8 with Q/DQ (MatMulIntegerToFloat in ONNX Runtime), needs --weights int8.")
@click.option("--symmetric", is_flag=True, help="int8 symmetric activations (TensorRT) instead of uint8 asymmetric.")
@click.option("--reduce-range/--full-range", default=_default("reduce_range"), show_default=True,
              help="W8A8: 7-bit weights. x86 CPUs without VNNI (AVX2) saturate uint8 x int8 products in ONNX "
                   "Runtime's integer GEMM with 8-bit weights; use --full-range for VNNI, ARM, GPU or TensorRT.")
@click.option("--calibration", type=click.Choice(CALIBRATION_METHODS), default=_default("calibration"),
              show_default=True,
              help="How activation ranges are chosen from the calibration histograms. mse is the default: on "
                   "SmolLM2, percentile and entropy clip the few large down_proj inputs that matter.")
@click.option("--percentile", type=float, default=_default("percentile"), show_default=True,
              help="For --calibration percentile.")
@click.option("--block-size", type=click.Choice([str(size) for size in BLOCK_SIZES]), default=None,
              help="Weight-only: block along the input features (LM head included). Default: 64 for int8, 32 for "
                   "int4, and 64 for an int8 LM head (ONNX Runtime's CPU kernels pay per block; see "
                   "graphopt/cpu_kernels.py).")
@click.option("--pack/--no-pack", default=_default("pack"), show_default=True,
              help="Weight-only: pack the q/k/v and the gate/up MatMulNBits of each layer into one (same numbers, "
                   "fewer kernel calls).")
@click.option("--method", type=click.Choice(METHODS), default=_default("method"), show_default=True,
              help="Weight-only int4 rounding. auto: affine. affine: per-block min + scale x code, the offset as "
                   "an integer zero point plus 4-bit residual rows, a second digit where they have room (near "
                   "exact on models dequantized from Q4_1, "
                   "like the embedded SmolLM2; +0.3% perplexity there, where integer zero points alone lose "
                   "24-27%); mse: per-block range and integer zero point "
                   "minimizing the weight error; rtn: min/max range including zero; gptq: calibrated GPTQ on mse "
                   "blocks. int8 is always symmetric round to nearest.")
@click.option("--act-order", is_flag=True, help="GPTQ: columns by decreasing Hessian diagonal within each block.")
@click.option("--awq", is_flag=True,
              help="Weight-only: activation-aware per-channel scales (AWQ), searched per layer input on the "
                   "calibration data and folded into the norm or up projection before it.")
@click.option("--head", type=click.Choice(HEAD_CHOICES), default=_default("head"), show_default=True,
              help="LM head precision (auto: int8).")
@click.option("--embedding", type=click.Choice(EMBEDDING_CHOICES), default=_default("embedding"), show_default=True,
              help="Weight-only: the embedding table as GatherBlockQuantized. A tied table shares the "
                   "quantized head's codes (stored once); otherwise auto quantizes it to int8.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep in float: a node name glob (e.g. '/model/layers.0/mlp/down_proj/MatMul', dots and "
                   "slashes alike; a module prefix covers its nodes) or an op type. Repeatable.")
@click.option("--op-types", default=",".join(_default("op_types")), show_default=True,
              help="Comma-separated op types to quantize (MatMul with a constant weight is what is supported).")
@click.option("--smooth", type=float, default=None, metavar="ALPHA",
              help="W8A8: SmoothQuant migration strength (e.g. 0.5), folded into norms and up projections.")
@click.option("--rotation", type=click.Choice(ROTATIONS), default=_default("rotation"), show_default=True,
              help="Rotate first (QuaRot-style, lossless in float; spreads outlier channels): residual: the "
                   "residual stream by a randomized Hadamard folded into the weights; online: also a Hadamard "
                   "in the graph before each down_proj. auto, on a fused Llama-family graph: residual for W8A8 "
                   "(+8.3% -> +2.5% on SmolLM2), online for weight-only int8 (the kernel's int8 activations: "
                   "+0.71% -> -0.01%, at 0.95x decode), none for int4 (it cost int4 there).")
@click.option("--down-proj", type=click.Choice(DOWN_PROJ), default=_default("down_proj"), show_default=True,
              help="W8A8: the gated MLP's down projection (found by structure). Its input carries token-wise "
                   "massive activations (SmolLM2: 2,961 at the first position of layer 11, under 3 elsewhere) "
                   "that no static range covers: int8-weights runs it as weight-only int8 (activations quantized "
                   "per block at run time), float keeps it, w8a8 quantizes it like the rest. auto: int8-weights, "
                   "or w8a8 for a graph fused for tensorrt/onnx (no contrib ops there).")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PERCENT",
              help="Keep the most sensitive layers in float (W8A8) or int8 (int4 weight-only) until the "
                   "perplexity on the calibration data rises at most this many percent.")
@calibration_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the data-free calibration (sequences sampled from the model) and window choice.")
@click.option("--measure", is_flag=True,
              help=f"Also measure perplexity (float and quantized, on {DEFAULT_TEXT.name}) into the lineage.")
@click.option("--measure-windows", type=int, default=4, show_default=True, help="Windows of 512 tokens for --measure.")
def command(model_dir, output, force, block_size, exclude, op_types, seed, measure, measure_windows, **options) -> None:
    """Quantize MODEL_DIR into OUTPUT.

    Default: weight-only int8 (MatMulNBits, symmetric), the LM head int8 and a tied embedding table
    sharing its codes. --weights int4 alone: int4 linears with the affine method, head and embedding
    int8. Static W8A8 (int8 per-channel weights, uint8 activations, calibrated on sequences the
    model samples itself): --weights int8 --activations int8; on a fused graph it rotates the
    residual stream first and runs the down projections as weight-only int8.
    """
    # The options left in ``options`` are QuantizeConfig fields of the same names.
    config = QuantizeConfig(calib=calibration_spec(options, seed), block_size=int(block_size) if block_size else None,
                            exclude=tuple(exclude), op_types=tuple(op_types.split(",")),
                            measure_windows=measure_windows if measure else None, **options)
    result = quantize(model_dir, output, config, force=force)
    report_step(result.manifest.lineage[-1])
    click.echo(str(result.path))
