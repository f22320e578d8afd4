"""`graphopt quantize MODEL_DIR -o OUT`: static W8A8 QDQ, or weight-only int8 / int4, with calibration."""

from __future__ import annotations

import click

from graphopt.commands._options import calibration_options
from graphopt.evaluate import DEFAULT_TEXT


@click.command("quantize")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="Weight precision.")
@click.option("--activations", type=click.Choice(["int8", "none"]), default="int8", show_default=True,
              help="int8: static W8A8 with Q/DQ (MatMulIntegerToFloat in ONNX Runtime); none: weight-only "
                   "MatMulNBits.")
@click.option("--symmetric", is_flag=True, help="int8 symmetric activations (TensorRT) instead of uint8 asymmetric.")
@click.option("--reduce-range/--full-range", default=True, show_default=True,
              help="W8A8: 7-bit weights. x86 CPUs without VNNI (AVX2) saturate uint8 x int8 products in ONNX "
                   "Runtime's integer GEMM with 8-bit weights; use --full-range for VNNI, ARM, GPU or TensorRT.")
@click.option("--calibration", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="mse",
              show_default=True,
              help="How activation ranges are chosen from the calibration histograms. mse is the default: on "
                   "SmolLM2, percentile and entropy clip the few large down_proj inputs that matter.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --calibration percentile.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
              help="Weight-only: block along the input features (LM head included). Default: 64 for int8, 32 for "
                   "int4, and 64 for an int8 LM head (ONNX Runtime's CPU kernels pay per block; see "
                   "graphopt/cpu_kernels.py).")
@click.option("--pack/--no-pack", default=True, show_default=True,
              help="Weight-only: pack the q/k/v and the gate/up MatMulNBits of each layer into one (same numbers, "
                   "fewer kernel calls).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="Weight-only: round to nearest, or GPTQ (calibrated).")
@click.option("--head", type=click.Choice(["auto", "float", "int8", "int4"]), default="auto", show_default=True,
              help="LM head precision (auto: int8). The tied embedding table itself stays float.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep in float: a node name glob (e.g. '/model/layers.0/mlp/down_proj/MatMul', dots and "
                   "slashes alike; a module prefix covers its nodes) or an op type. Repeatable.")
@click.option("--op-types", default="MatMul", show_default=True,
              help="Comma-separated op types to quantize (MatMul with a constant weight is what is supported).")
@click.option("--smooth", type=float, default=None, metavar="ALPHA",
              help="W8A8: SmoothQuant migration strength (e.g. 0.5), folded into norms and up projections.")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PERCENT",
              help="W8A8: keep the most sensitive layers in float until the perplexity on the calibration "
                   "data rises at most this many percent.")
@calibration_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the data-free calibration (sequences sampled from the model) and window choice.")
@click.option("--measure", is_flag=True,
              help=f"Also measure perplexity (float and quantized, on {DEFAULT_TEXT.name}) into the lineage.")
@click.option("--measure-windows", type=int, default=4, show_default=True, help="Windows of 512 tokens for --measure.")
def command(model_dir, output, force, weights, activations, symmetric, reduce_range, calibration, percentile, block_size, pack, method,
            head, exclude, op_types, smooth, max_ppl_increase, calib_text, calib_npz, calib_samples, seq_len, seed, measure,
            measure_windows) -> None:
    """Quantize MODEL_DIR into OUTPUT.

    Default: static W8A8 (int8 per-channel weights, uint8 activations) calibrated on sequences the
    model samples itself. Weight-only: --activations none --weights int8|int4 [--block-size N].
    """
    from graphopt.calibration import CalibrationSpec
    from graphopt.cli import progress
    from graphopt.quantization import QuantizeConfig, quantize

    config = QuantizeConfig(weights=weights, activations=activations, symmetric=symmetric, reduce_range=reduce_range, calibration=calibration,
                            percentile=percentile, block_size=int(block_size) if block_size else None, pack=pack, method=method, head=head,
                            exclude=tuple(exclude), op_types=tuple(op_types.split(",")), smooth=smooth, max_ppl_increase=max_ppl_increase,
                            calib=CalibrationSpec(text=calib_text, npz=calib_npz, samples=calib_samples,
                                                  seq_len=seq_len, seed=seed))
    result = quantize(model_dir, output, config, force=force, progress=progress,
                      measure_windows=measure_windows if measure else None)
    step = result.manifest["lineage"][-1]
    for name, value in step["figures"].items():
        progress(f"  {name}: {value}")
    click.echo(str(result.path))
