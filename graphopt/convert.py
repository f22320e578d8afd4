"""`graphopt convert`: change a model directory's float precision (float32 -> float16) for GPUs.

float16 halves the weights and the KV cache and runs on CUDA's tensor cores; the numerically
sensitive ops stay in float32 (``passes.convert_fp16``). On CPU, ONNX Runtime runs float16 where it
has float16 kernels and casts around the others (correct, usually slower than float32): float16 is
for CUDA and TensorRT, and the CPU is only where it is checked.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np

from graphopt import ir as graph_ir
from graphopt.errors import GraphoptError, ValidationError
from graphopt.modeldir import MODEL_FILE, ModelDir, atomic_output, derive

logger = logging.getLogger(__name__)

DTYPES = ("fp16",)
# Max |logits diff| to the float32 source at which a float16 model passes validation; float16 keeps
# ~3 significant digits, and rounding errors add up over the layers, so this is per unit of logits
# scale: tolerance * max(1, max |logits|).
FP16_RELATIVE_TOLERANCE = 2e-2


def compare_logits(reference: os.PathLike, candidate: os.PathLike, vocab_size: int, ep: str = "cpu",
                   seed: int = 0) -> dict[str, float]:
    """Prefill 8 random tokens, decode 1, then a 3-token forward on the cache; max |diff| and argmax agreement."""
    from graphopt.runtime.decoder import Decoder

    ids = np.random.default_rng(seed).integers(0, vocab_size, size=12).tolist()
    outputs = []
    for path in (reference, candidate):
        decoder = Decoder(path, ep=ep)
        outputs.append(np.concatenate([decoder.forward(ids[:8]), decoder.forward(ids[8:9]), decoder.forward(ids[9:12])]))
    reference_logits, candidate_logits = outputs
    return {"max_abs_logits_diff": float(np.abs(reference_logits - candidate_logits).max()),
            "max_abs_logits": float(np.abs(reference_logits).max()),
            "argmax_agreement": float((reference_logits.argmax(-1) == candidate_logits.argmax(-1)).mean()),
            "finite": bool(np.isfinite(candidate_logits).all())}


def convert(model_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp16", keep_softmax: bool = True,
            force: bool = False, validate: bool = True, progress: Callable[[str], None] = lambda message: None) -> ModelDir:
    """Convert MODEL_DIR's float32 graph to ``dtype`` into a new model directory at ``output`` (atomic).

    Validation compares logits with the source on CPU (prefill, decode, multi-token on the cache).

    Raises:
        GraphoptError: unknown dtype, or the model is not float32.
        ValidationError: non-finite logits, or logits further from the source than
            ``FP16_RELATIVE_TOLERANCE`` allows.
    """
    from graphopt.passes.convert_fp16 import ConvertFloat16Pass, is_float16

    if dtype not in DTYPES:
        raise GraphoptError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    source = ModelDir.open(model_dir)
    manifest = source.manifest
    if manifest.get("quantization"):
        raise GraphoptError(f"{source.path} is quantized ({manifest['quantization']}); convert the float model, "
                            "then quantize if needed")
    started = time.perf_counter()
    progress(f"converting {source.path} to float16 (RMSNorm variance, LayerNorm{', Softmax' if keep_softmax else ''} "
             "and logits stay float32)")
    model = graph_ir.load(source.model_path)
    if is_float16(model) or manifest.get("dtype") == "float16":
        raise GraphoptError(f"{source.path} is already float16")
    conversion = ConvertFloat16Pass(keep_softmax=keep_softmax)
    model = conversion(model).model
    with atomic_output(output, force=force) as scratch:
        graph_ir.save(model, scratch / MODEL_FILE)
        figures: dict = {}
        if validate:
            progress("validating float16 against float32 on CPU (prefill, decode, multi-token on cache)")
            figures = compare_logits(source.model_path, scratch / MODEL_FILE, int(manifest.get("vocab_size", 100)))
            bound = FP16_RELATIVE_TOLERANCE * max(1.0, figures["max_abs_logits"])
            if not figures["finite"]:
                raise ValidationError("float16 model produces non-finite logits")
            if figures["max_abs_logits_diff"] > bound:
                raise ValidationError(f"float16 logits differ from float32 by {figures['max_abs_logits_diff']:.3g} "
                                      f"> {bound:.3g}")
        step = {"pass": "convert", "parameters": {"dtype": dtype, "keep_softmax": keep_softmax, "validate": validate},
                "counts": conversion.counts, "figures": figures, "seconds": round(time.perf_counter() - started, 1)}
        cache = dict(manifest.get("cache", {}))
        cache["dtype"] = "float16"
        derive(source, scratch, step, dtype="float16", cache=cache)
    return ModelDir(output)
