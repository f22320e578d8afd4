"""`graphopt convert`: change a model directory's float precision (float32 -> float16) for GPUs.

float16 halves the weights and the KV cache and runs on CUDA's tensor cores; the numerically
sensitive ops stay in float32 (``passes.convert_fp16``). On CPU, ONNX Runtime runs float16 where it
has float16 kernels and casts around the others (correct, usually slower than float32): float16 is
for CUDA and TensorRT, and the CPU is only where it is checked.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import onnx_ir as ir

from graphopt.errors import GraphoptError, ValidationError
from graphopt.evaluate import compare_logits
from graphopt.modeldir import ModelDir
from graphopt.steps import Step, StepConfig, StepOutput, run_step

logger = logging.getLogger(__name__)

DTYPES = ("fp16",)
# Max |logits diff| to the float32 source at which a float16 model passes validation; float16 keeps
# ~3 significant digits, and rounding errors add up over the layers, so this is per unit of logits
# scale: tolerance * max(1, max |logits|).
FP16_RELATIVE_TOLERANCE = 2e-2
# The same for a weight-only quantized source. On the CPU its float32 MatMulNBits run with int8
# activations (accuracy level 4) and the float16 ones with float16 activations, so the difference
# is mostly that activation rounding, not float16's: seen on SmolLM2 0.11 (int8) and 0.07 (int4).
QUANTIZED_FP16_RELATIVE_TOLERANCE = 0.15


@dataclasses.dataclass(frozen=True)
class ConvertConfig(StepConfig):
    """``graphopt convert``'s parameters; ``keep_softmax`` runs Softmax in float32."""

    dtype: str = "fp16"
    keep_softmax: bool = True
    validate: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise GraphoptError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")


class ConvertStep(Step):
    """float32 -> float16, with RMSNorm variance, LayerNorm, Softmax and logits kept in float32."""

    name = "convert"
    config_type = ConvertConfig

    def refuse(self, source: ModelDir, config: ConvertConfig) -> None:
        # Weight-only models (MatMulNBits, GatherBlockQuantized) convert: their scales become float16, as
        # the CUDA kernels want. Static QDQ ranges were calibrated on float32 activations: convert first.
        if source.manifest.quantization not in (None, "int8", "int4"):
            raise GraphoptError(f"{source.path} is quantized ({source.manifest.quantization}); convert the float "
                                "model, then quantize if needed")
        if source.manifest.dtype == "float16":
            raise GraphoptError(f"{source.path} is already float16")

    def run(self, source: ModelDir, model: ir.Model, config: ConvertConfig, work) -> StepOutput:
        from graphopt.passes.convert_fp16 import ConvertFloat16Pass, is_float16

        if is_float16(model):
            raise GraphoptError(f"{source.path} is already float16")
        logger.info("converting %s to float16 (RMSNorm variance, LayerNorm%s and logits stay float32)", source.path,
                    ", Softmax" if config.keep_softmax else "")
        conversion = ConvertFloat16Pass(keep_softmax=config.keep_softmax)
        model = conversion(model).model
        cache = {**source.manifest.cache, "dtype": "float16"}
        return StepOutput(model, conversion.counts, changes={"dtype": "float16", "cache": cache})

    def check(self, source: ModelDir, written: ModelDir, config: ConvertConfig) -> dict:
        if not config.validate:
            return {}
        logger.info("validating float16 against float32 on CPU (prefill, decode, multi-token on cache)")
        figures = compare_logits(source.model_path, written.model_path, source.manifest.vocab_size)
        tolerance = QUANTIZED_FP16_RELATIVE_TOLERANCE if source.manifest.quantization else FP16_RELATIVE_TOLERANCE
        bound = tolerance * max(1.0, figures["max_abs_logits"])
        if not figures["finite"]:
            raise ValidationError("float16 model produces non-finite logits")
        if figures["max_abs_logits_diff"] > bound:
            raise ValidationError(f"float16 logits differ from float32 by {figures['max_abs_logits_diff']:.3g} "
                                  f"> {bound:.3g}")
        return figures


def convert(model_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp16", force: bool = False,
            **parameters) -> ModelDir:
    """Convert MODEL_DIR's float32 graph to ``dtype`` into a new model directory at ``output``."""
    return run_step(ConvertStep(), model_dir, output, ConvertConfig(dtype=dtype, **parameters), force=force).output
